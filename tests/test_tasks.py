"""What each task owns: class-weighted losses, per-class metrics and the collapse warnings (no useless model looks
like a result), options refused with the task's own."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sidetune.errors import ConfigError
from sidetune.tasks import TaskData, make_task
from sidetune.train import fit
from train_data import make_camvid, task_config

pytestmark = pytest.mark.usefixtures("one_thread")


class Logits(torch.nn.Module):
    """A 'model' returning fixed logits, so a task's loss can be compared with a hand computation."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits


def test_classification_class_weights_weigh_the_loss_as_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 2])
    task = make_task("classification", {"class_weights": (1.0, 2.0, 4.0)})
    task.prepare(TaskData(None, None, None, ["a", "b", "c"], source="test"))
    out = task.step(Logits(logits), (torch.zeros(4, 3, 2, 2), labels))
    w = torch.tensor([1.0, 2.0, 4.0])
    nll = -F.log_softmax(logits, -1)[torch.arange(4), labels]
    assert out.loss.item() == pytest.approx((w[labels] * nll).sum().item() / w[labels].sum().item(), rel=1e-6)
    plain = make_task("classification").step(Logits(logits), (torch.zeros(4, 3, 2, 2), labels)).loss
    assert plain.item() == pytest.approx(nll.mean().item(), rel=1e-6) and plain.item() != pytest.approx(out.loss.item())


def test_segmentation_class_weights_auto_come_from_the_training_pixels(tmp_path):
    data = make_camvid(tmp_path / "camvid", counts=(("train", 4),))
    config = task_config(
        "segmentation", data, tmp_path / "run", val_split="none", task_options={"class_weights": "auto"}
    )
    result = fit(config)
    counts = result.summary["data"]["class_counts"]["counts"]
    present = [c for c in counts if c > 0]
    assert len(present) == 2  # the two colours of make_camvid (sky, building); void pixels are not counted
    task = make_task("segmentation", {"class_weights": "auto"})
    import sidetune
    from sidetune.data import class_weights, count_classes

    model = sidetune.create(config.backbone, "linear", task="segmentation", num_classes=11, img_size=64,
                            backbone_kwargs=config.backbone_kwargs, head_options={"channels": 16})  # fmt: skip
    built = task.build_data(config, model)
    expected = class_weights(built.train, "auto", counts=count_classes(built.train))
    torch.testing.assert_close(task.weight, expected)
    sky, building = counts[0], counts[1]
    assert (task.weight[0] / task.weight[1]).item() == pytest.approx(building / sky, rel=1e-5)  # inverse frequency
    softer = make_task("segmentation", {"class_weights": "sqrt"})
    softer.prepare(built)
    assert (softer.weight[0] / softer.weight[1]).item() == pytest.approx((building / sky) ** 0.5, rel=1e-5)
    with pytest.raises(ConfigError, match="class_weights has 2 values for 11 classes"):
        make_task("segmentation", {"class_weights": (1.0, 2.0)}).prepare(built)
    with pytest.raises(ConfigError, match="--class-weights must be 'auto', 'sqrt' or one number per class"):
        make_task("segmentation", {"class_weights": "inverse"})


def test_a_segmentation_model_that_predicts_one_class_is_flagged(tmp_path, monkeypatch):
    """Collapse to one class: the per-class IoU shows 0 for the others, a warning says so, the summary flags it."""
    from sidetune.heads.segmentation import UPerNetHead

    real = UPerNetHead.forward

    def one_class(self, features, size=None):
        out = real(self, features, size)
        bias = torch.zeros(out.shape[1], device=out.device)
        bias[0] = 5.0  # every pixel: class 0
        return out * 0 + bias.view(1, -1, 1, 1)

    monkeypatch.setattr(UPerNetHead, "forward", one_class)
    data = make_camvid(tmp_path / "camvid", counts=(("train", 4), ("val", 2)))
    result = fit(task_config("segmentation", data, tmp_path / "run", epochs=1))
    metrics = result.summary["metrics"]
    warnings = " ".join(result.summary["warnings"])
    assert metrics["collapsed"] is True
    assert "never predicted" in warnings and "no better than labelling every pixel" in warnings
    task = make_task("segmentation")
    text = task.format_metrics(metrics["final_val"], result.summary["data"]["classes"])
    assert "per class, worst first (IoU)" in text and "warning:" in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["collapsed"] is True


def test_a_learning_classifier_is_not_flagged(tmp_path):
    from train_data import config, make_image_folder

    data = make_image_folder(tmp_path / "images", train_per_class=8)
    result = fit(config(data, tmp_path / "run", method="linear", epochs=6, lr=5e-2))
    assert result.summary["metrics"]["test"]["top1"] > 0.6 and result.summary["metrics"]["collapsed"] is False


def test_task_options_are_checked_by_the_task():
    with pytest.raises(ConfigError, match=r"'smoothing' \(did you mean 'label_smoothing'\?\)"):
        make_task("classification", {"smoothing": 0.1})
    with pytest.raises(ConfigError, match="eval_mode must be 'whole' or 'slide'"):
        make_task("segmentation", {"eval_mode": "tiles"})
    with pytest.raises(ConfigError, match="detector 'mask_rcnn' is not a detection detector"):
        make_task("detection", {"detector": "mask_rcnn"})
    with pytest.raises(ConfigError, match="class weights must be positive finite"):
        make_task("classification", {"class_weights": (1.0, -2.0)})
