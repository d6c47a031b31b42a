"""Dense tasks through the one loop: segmentation, detection and instance segmentation train, evaluate, predict.

The guarantees every task shares (seeded losses, exact resume, accumulation) are tested once for all tasks in
test_pipeline.py; this file tests what is particular to the dense tasks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidetune.tasks import make_task
from sidetune.train import TrainConfig, evaluate_adapter, fit, predict, read_log
from train_data import SWIN, make_camvid, make_coco, make_voc

from conftest import SWIN_TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_task(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["task"]


def seg_config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    values = dict(
        backbone=SWIN,
        method="e3va",
        task="segmentation",
        data=str(data),
        img_size=64,
        backbone_kwargs=dict(SWIN_TINY),
        head_options={"channels": 16},
        epochs=6,
        batch_size=4,
        lr=5e-3,
        warmup_epochs=0.5,
        output=str(tmp_path / "run"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_fit_dense_segmentation_learns_and_saves(tmp_path: Path):
    data = make_camvid(tmp_path / "camvid")
    result = fit(seg_config(tmp_path, data))
    out = result.output
    for name in ("summary.json", "log.jsonl", "train_config.yaml", "curves.png"):
        assert (out / name).is_file(), name
    for sub in ("best", "last"):
        assert (out / sub / "adapter_model.safetensors").is_file()
        assert (out / sub / "inference.json").is_file()
        assert saved_task(out / sub) == "segmentation"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "segmentation"
    assert summary["model"]["trainable_parameters"] > 0
    assert summary["timing"]["median_step_time_s"] > 0 and summary["memory"]["bytes"] > 0
    final = summary["metrics"]["final_val"]
    assert set(final["IoU"]) >= {"sky", "building"}  # CamVid names: classes 0 and 1
    # two colours, two classes: chance (one class everywhere) is mIoU 0.25; the model must separate them
    assert summary["metrics"]["best_val"] > 0.6, summary["metrics"]
    epochs = [r for r in read_log(out / "log.jsonl") if r["type"] == "epoch"]
    steps = [r for r in read_log(out / "log.jsonl") if r["type"] == "step"]
    assert len(epochs) == 6 and len(steps) == 6 * 2
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]

    # eval reloads the adapter (random tiny backbone rebuilt from the recorded seed) and agrees with training
    metrics = evaluate_adapter(out / "best", data, "val")
    assert metrics["task"] == "segmentation" and metrics["count"] == 4
    assert math.isclose(metrics["mIoU"], summary["metrics"]["best_val"], rel_tol=1e-5, abs_tol=1e-6)

    # predict: a palette PNG mask of the image's own size and an overlay per image
    pred = predict(out / "best", data / "val", tmp_path / "pred")
    assert pred["images"] == 4
    mask = Image.open(tmp_path / "pred" / "0.png")
    assert mask.mode == "P" and mask.size == (64, 48)
    assert set(np.unique(np.asarray(mask)).tolist()) <= set(range(11))
    assert Image.open(tmp_path / "pred" / "0_overlay.png").size == (64, 48)


def test_fit_dense_refuses_an_occupied_output(tmp_path: Path):
    from sidetune.errors import ConfigError

    data = make_camvid(tmp_path / "camvid", counts=(("train", 4), ("val", 2)))
    config = seg_config(tmp_path, data, epochs=1, val_split=None)
    result = fit(config)
    assert (result.output / "best").is_dir() and result.summary["metrics"]["best_val"] is None
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(config)


def test_fit_dense_detection_end_to_end(tmp_path: Path):
    data = make_voc(tmp_path / "voc")
    config = TrainConfig(
        backbone=SWIN,
        method="e3va",
        task="detection",
        data=str(data),
        img_size=64,
        backbone_kwargs=dict(SWIN_TINY),
        head_options={"detector": "faster_rcnn", "fpn_channels": 16, "box_head_dim": 32},
        epochs=2,
        batch_size=3,
        lr=1e-3,
        output=str(tmp_path / "det"),
    )
    result = fit(config)
    out = result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "detection" and summary["data"]["classes"] == ["RBC", "WBC"]
    final = summary["metrics"]["final_val"]
    assert {"bbox_mAP", "bbox_mAP_50"} <= set(final) and final["count"] == 3
    assert 0.0 <= final["bbox_mAP"] <= 1.0
    assert (out / "best" / "adapter_model.safetensors").is_file() and (out / "last" / "inference.json").is_file()
    assert saved_task(out / "last") == "detection"

    metrics = evaluate_adapter(out / "last", data, "val")
    assert metrics["task"] == "detection" and "bbox_mAP" in metrics

    pred = predict(out / "last", data / "JPEGImages", tmp_path / "pred", score_threshold=0.0)
    assert pred["images"] == 9
    entries = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert isinstance(entries, list) and len(entries) == pred["detections"]
    for e in entries:
        assert {"image_id", "file_name", "category_id", "bbox", "score"} <= set(e) and len(e["bbox"]) == 4
        assert 1 <= e["category_id"] <= 2
    assert (tmp_path / "pred" / "train0_overlay.png").is_file()


def test_dense_task_datasets_and_transforms(tmp_path: Path):
    import sidetune

    model = sidetune.create(SWIN, "linear", task="segmentation", num_classes=11, img_size=64,
                            backbone_kwargs=dict(SWIN_TINY), head_options={"channels": 16})  # fmt: skip
    task = make_task("segmentation")
    data = make_camvid(tmp_path / "camvid", counts=(("train", 2),))
    ds = task.dataset(data, "train", "camvid", task.transforms(model, "standard", train=True))
    image, mask = ds[0]
    assert len(ds) == 2 and image.shape == (3, 64, 64) and mask.shape == (64, 64)  # cropped to the model's size
    image, mask = task.dataset(data, "train", "camvid", task.transforms(model, "none", train=False))[0]
    assert image.shape == (3, 48, 64) and mask.shape == (48, 64)  # evaluation keeps the image's own size
    voc = make_voc(tmp_path / "voc", counts=(("train", 2),))
    detection = make_task("detection")
    det = detection.dataset(voc, "train", "auto", detection.transforms(model, "none", train=False))
    image, target = det[0]
    assert image.max() <= 1 and target["boxes"].shape == (1, 4)


def test_sidetune_cli_routes_dense_tasks(tmp_path: Path, capsys):
    from sidetune.cli import main as sidetune_main

    data = make_camvid(tmp_path / "camvid", counts=(("train", 4), ("val", 2)))
    swin = ["--backbone-opt", "embed_dim=16", "--backbone-opt", "depths=1,1,2,1", "--backbone-opt",
            "num_heads=1,1,2,2", "--backbone-opt", "window_size=4"]  # fmt: skip
    run = tmp_path / "run"
    assert sidetune_main(["train", SWIN, "e3va", "--task", "segmentation", "--data", str(data), "--layout", "camvid",
                          "--img-size", "64", "--epochs", "1", "--batch-size", "2", "--head-opt", "channels=16",
                          "--output", str(run), *swin]) == 0  # fmt: skip
    assert json.loads((run / "summary.json").read_text())["task"] == "segmentation"
    assert sidetune_main(["eval", str(run / "best"), "--data", str(data), "--split", "val"]) == 0
    assert "mIoU" in json.loads((run / "best" / "eval_val.json").read_text())
    assert sidetune_main(["predict", str(run / "best"), str(data / "val"), "--output", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "0_overlay.png").is_file()
    capsys.readouterr()


def test_fit_dense_instance_segmentation(tmp_path: Path):
    data = make_coco(tmp_path / "coco")
    config = TrainConfig(
        backbone=SWIN,
        method="losa",
        task="instance",
        data=str(data),
        layout="coco",
        img_size=64,
        backbone_kwargs=dict(SWIN_TINY),
        head_options={"fpn_channels": 16, "box_head_dim": 32, "mask_head_channels": 16},
        epochs=1,
        batch_size=2,
        output=str(tmp_path / "inst"),
    )
    result = fit(config)
    final = result.summary["metrics"]["final_val"]
    assert {"bbox_mAP", "segm_mAP"} <= set(final)
    assert saved_task(result.output / "best") == "instance"
    pred = predict(result.output / "best", data / "val", tmp_path / "pred", score_threshold=0.0)
    assert pred["images"] == 2 and (tmp_path / "pred" / "predictions.json").is_file()


def test_dense_resume_from_another_method_or_task_names_both(tmp_path: Path):
    from sidetune.errors import ConfigError
    from sidetune.train import CheckpointError

    data = make_camvid(tmp_path / "camvid", counts=(("train", 4),))
    fit(seg_config(tmp_path, data, epochs=1, val_split=None))
    run = str(tmp_path / "run")
    with pytest.raises(
        CheckpointError,
        match=rf"method 'e3va' on backbone '{SWIN}' for task 'segmentation', but this run trains method 'losa' "
        rf"on backbone '{SWIN}' for task 'segmentation'",
    ):
        fit(seg_config(tmp_path, data, method="losa", output=str(tmp_path / "losa"), resume=run))
    assert not (tmp_path / "losa").exists()  # refused before writing anything
    voc = make_voc(tmp_path / "voc", counts=(("train", 2),))
    with pytest.raises(CheckpointError, match=r"for task 'segmentation', but this run .* for task 'detection'"):
        fit(seg_config(tmp_path, voc, task="detection", output=str(tmp_path / "det"), resume=run))
    assert not (tmp_path / "det").exists()
    with pytest.raises(
        CheckpointError, match=r"head_options is \{'channels': 16\} but this run's is \{'channels': 8\}"
    ):
        fit(seg_config(tmp_path, data, head_options={"channels": 8}, output=str(tmp_path / "c8"), resume=run))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        fit(seg_config(tmp_path, data, output=str(tmp_path / "x"), resume=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="pass --resume"):
        fit(seg_config(tmp_path, data, epochs=1, val_split=None))


class FlatSquares(torch.utils.data.Dataset):
    """Segmentation samples with no ignored pixel and no augmentation: every image weighs the same in the loss."""

    classes = ("red", "blue")

    def __init__(self, n: int, size: int = 64) -> None:
        g = torch.Generator().manual_seed(3)
        self.masks = (torch.rand(n, 1, size // 8, size // 8, generator=g) > 0.5).long()
        self.masks = torch.nn.functional.interpolate(self.masks.float(), size=(size, size)).long()[:, 0]
        self.images = self.masks[:, None].float().expand(-1, 3, -1, -1) + 0.3 * torch.randn(
            n, 3, size, size, generator=g
        )

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int):
        return self.images[i], self.masks[i]


def test_dense_schedule_steps_once_per_optimizer_step_with_a_partial_last_window(tmp_path: Path):
    from sidetune.train import WarmupCosine

    # 5 micro-batches of 2 per epoch, 2 per step: steps of 2, 2 and 1 micro-batches, 3 steps per epoch
    opts = dict(epochs=2, batch_size=2, grad_accum=2, warmup_epochs=1.0, lr=1e-3, val_split=None, cpu=True)
    result = fit(seg_config(tmp_path, None, **opts), train_dataset=FlatSquares(10))
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["type"] == "step"]
    assert result.summary["timing"]["steps"] == 6 and result.summary["timing"]["steps_per_epoch"] == 3
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and [r["epoch"] for r in records] == [1, 1, 1, 2, 2, 2]
    schedule = WarmupCosine(3, 6)
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * schedule(k) for k in range(6)])
    assert all(math.isfinite(r["loss"]) for r in records)


def test_sidetune_cli_dense_grad_accum_and_resume(tmp_path: Path, capsys):
    from sidetune.cli import main as sidetune_main

    data = make_camvid(tmp_path / "camvid", counts=(("train", 4),))
    run = tmp_path / "run"
    args = ["train", SWIN, "e3va", "--task", "segmentation", "--data", str(data), "--layout", "camvid",
            "--img-size", "64", "--epochs", "1", "--batch-size", "2", "--grad-accum", "2", "--save-every-steps", "1",
            "--val-split", "none", "--head-opt", "channels=16", "--output", str(run), "--backbone-opt", "embed_dim=16",
            "--backbone-opt", "depths=1,1,2,1", "--backbone-opt", "num_heads=1,1,2,2", "--backbone-opt",
            "window_size=4"]  # fmt: skip
    assert sidetune_main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["grad_accum"] == 2 and summary["timing"]["steps"] == 1
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-00000001"
    capsys.readouterr()
    assert sidetune_main(args) == 2  # the CLI prints the ConfigError and fails
    assert "already holds a run" in capsys.readouterr().err
    assert sidetune_main([*args, "--resume", str(run)]) == 0  # a finished run: nothing left to train
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000001") and summary["timing"]["steps"] == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sidetune_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{classification,segmentation,detection,instance}" in text and "docs/data.md" in text
    assert "camvid CamVid as SegNet ships it" in text and "coco COCO: <split>/ images" in text  # a line per layout
    assert "default: 32 classification, 8 dense tasks" in text


def test_cli_refuses_an_option_the_task_does_not_use(tmp_path: Path, capsys):
    from sidetune.cli import main as sidetune_main

    data = make_camvid(tmp_path / "camvid", counts=(("train", 2),))
    base = ["train", SWIN, "e3va", "--task", "segmentation", "--data", str(data), "--output", str(tmp_path / "r")]
    assert sidetune_main([*base, "--label-smoothing", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--label-smoothing: not an option of --task segmentation" in err and "--eval-mode" in err
    assert sidetune_main(["train", "test_vit", "linear", "--data", str(data), "--head-opt", "channels=8"]) == 2
    assert "--head-opt is for the dense tasks" in capsys.readouterr().err
    assert sidetune_main([*base, "--augmentation", "vtab"]) == 2
    assert "not one of the segmentation recipes: standard, none" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
