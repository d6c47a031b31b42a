"""Tests for sidetune.train.dense: fit_dense (segmentation, detection), evaluate/predict with saved adapters, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidetune.train.dense import (
    DenseConfig,
    build_dense_dataset,
    evaluate_dense_adapter,
    fit_dense,
    main,
    predict_dense_adapter,
    saved_task,
)
from sidetune.train.metrics import read_log

from conftest import SWIN_TINY

SWIN = "swin_tiny_patch4_window7_224"
RED, BLUE = (220, 30, 30), (30, 30, 220)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_camvid(root: Path, counts=(("train", 8), ("val", 4)), size=(64, 48)) -> Path:
    """SegNet layout; each image is half red (class 0) and half blue (class 1), the side and split random."""
    rng = np.random.default_rng(0)
    w, h = size
    for split, n in counts:
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            labels = np.zeros((h, w), dtype=np.uint8)
            if rng.random() < 0.5:
                labels[:, w // 2 :] = 1
            else:
                labels[h // 2 :, :] = 1
            if rng.random() < 0.5:
                labels = 1 - labels
            labels[:2, :2] = 11  # a few void pixels (ignored)
            rgb = np.where(labels[..., None] == 1, BLUE, RED).astype(np.uint8)
            noise = rng.integers(-15, 16, size=rgb.shape)
            Image.fromarray((rgb.astype(int) + noise).clip(0, 255).astype(np.uint8)).save(root / split / f"{i}.png")
            Image.fromarray(labels, mode="L").save(root / f"{split}annot" / f"{i}.png")
    return root


def make_voc(root: Path, counts=(("train", 6), ("val", 3)), size=(64, 64)) -> Path:
    """VOC detection layout: a bright square (WBC) or a red square (RBC) on a dark background."""
    rng = np.random.default_rng(1)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    for split, n in counts:
        names = []
        for i in range(n):
            name = f"{split}{i}"
            names.append(name)
            arr = np.full((h, w, 3), 30, dtype=np.uint8)
            x, y, s = int(rng.integers(4, 28)), int(rng.integers(4, 28)), int(rng.integers(16, 30))
            cls = "WBC" if i % 2 else "RBC"
            arr[y : y + s, x : x + s] = (240, 240, 240) if cls == "WBC" else (220, 40, 40)
            Image.fromarray(arr).save(root / "JPEGImages" / f"{name}.jpg")
            obj = (
                f"<object><name>{cls}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin>"
                f"<xmax>{x + s}</xmax><ymax>{y + s}</ymax></bndbox></object>"
            )
            (root / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><filename>{name}.jpg</filename><size><width>{w}</width><height>{h}</height>"
                f"<depth>3</depth></size>{obj}</annotation>"
            )
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def seg_config(tmp_path: Path, data: Path, **overrides) -> DenseConfig:
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
    return DenseConfig(**values)


def test_fit_dense_segmentation_learns_and_saves(tmp_path: Path):
    data = make_camvid(tmp_path / "camvid")
    result = fit_dense(seg_config(tmp_path, data))
    out = result.output
    for name in ("summary.json", "log.jsonl", "train_config.json"):
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
    epochs = [r for r in read_log(out / "log.jsonl") if "train_loss" in r]
    steps = [r for r in read_log(out / "log.jsonl") if "loss" in r and "train_loss" not in r]
    assert len(epochs) == 6 and len(steps) == 6 * 2
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]

    # eval reloads the adapter (random tiny backbone rebuilt from the recorded seed) and agrees with training
    metrics = evaluate_dense_adapter(out / "best", data, "val")
    assert metrics["task"] == "segmentation" and metrics["count"] == 4
    assert math.isclose(metrics["mIoU"], summary["metrics"]["best_val"], rel_tol=1e-5, abs_tol=1e-6)

    # predict: a palette PNG mask of the image's own size and an overlay per image
    pred = predict_dense_adapter(out / "best", data / "val", tmp_path / "pred")
    assert pred["images"] == 4
    mask = Image.open(tmp_path / "pred" / "0.png")
    assert mask.mode == "P" and mask.size == (64, 48)
    assert set(np.unique(np.asarray(mask)).tolist()) <= set(range(11))
    assert Image.open(tmp_path / "pred" / "0_overlay.png").size == (64, 48)


def test_fit_dense_refuses_an_occupied_output(tmp_path: Path):
    from sidetune.errors import ConfigError

    data = make_camvid(tmp_path / "camvid", counts=(("train", 4), ("val", 2)))
    config = seg_config(tmp_path, data, epochs=1, val_split=None)
    result = fit_dense(config)
    assert (result.output / "best").is_dir() and result.summary["metrics"]["best_val"] is None
    with pytest.raises(ConfigError, match="already holds a run"):
        fit_dense(config)


def test_fit_dense_detection_end_to_end(tmp_path: Path):
    data = make_voc(tmp_path / "voc")
    config = DenseConfig(
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
    result = fit_dense(config)
    out = result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "detection" and summary["data"]["classes"] == ["RBC", "WBC"]
    final = summary["metrics"]["final_val"]
    assert {"bbox_mAP", "bbox_mAP_50"} <= set(final) and final["count"] == 3
    assert 0.0 <= final["bbox_mAP"] <= 1.0
    assert (out / "best" / "adapter_model.safetensors").is_file() and (out / "last" / "inference.json").is_file()
    assert saved_task(out / "last") == "detection"

    metrics = evaluate_dense_adapter(out / "last", data, "val")
    assert metrics["task"] == "detection" and "bbox_mAP" in metrics

    pred = predict_dense_adapter(out / "last", data / "JPEGImages", tmp_path / "pred", score_threshold=0.0)
    assert pred["images"] == 9
    entries = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert isinstance(entries, list) and len(entries) == pred["detections"]
    for e in entries:
        assert {"image_id", "file_name", "category_id", "bbox", "score"} <= set(e) and len(e["bbox"]) == 4
        assert 1 <= e["category_id"] <= 2
    assert (tmp_path / "pred" / "train0_overlay.png").is_file()


def test_dense_datasets_layouts(tmp_path: Path):
    data = make_camvid(tmp_path / "camvid", counts=(("train", 2),))
    ds = build_dense_dataset("segmentation", data, "train", layout="camvid", img_size=32, mean=(0.5,) * 3,
                             std=(0.5,) * 3, train=True, limit=1)  # fmt: skip
    image, mask = ds[0]
    assert len(ds) == 1 and image.shape == (3, 32, 32) and mask.shape == (32, 32)
    voc = make_voc(tmp_path / "voc", counts=(("train", 2),))
    det = build_dense_dataset("detection", voc, "train")
    image, target = det[0]
    assert image.max() <= 1 and target["boxes"].shape == (1, 4)


def test_cli_train_eval_predict(tmp_path: Path, capsys):
    data = make_camvid(tmp_path / "camvid", counts=(("train", 4), ("val", 2)))
    swin = [f"--backbone-opt=embed_dim={SWIN_TINY['embed_dim']}", "--backbone-opt=depths=1,1,2,1",
            "--backbone-opt=num_heads=1,1,2,2", "--backbone-opt=window_size=4"]  # fmt: skip
    run = tmp_path / "cli"
    assert main(["train", SWIN, "linear", "--task", "segmentation", "--data", str(data), "--layout", "camvid",
                 "--img-size", "64", "--epochs", "1", "--batch-size", "2", "--head-opt", "channels=16",
                 "--output", str(run), *swin]) == 0  # fmt: skip
    assert (run / "best" / "adapter_config.json").is_file()
    assert main(["eval", str(run / "best"), "--data", str(data), "--split", "val"]) == 0
    assert "mIoU" in json.loads((run / "best" / "eval_val.json").read_text())
    assert main(["predict", str(run / "best"), str(data / "val"), "--output", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "1.png").is_file()
    capsys.readouterr()


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


def make_coco(root: Path, counts=(("train", 4), ("val", 2)), size=(64, 64)) -> Path:
    """COCO layout with polygon masks: one square per image (category id 7 or 9)."""
    rng = np.random.default_rng(2)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    w, h = size
    for split, n in counts:
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            arr = np.full((h, w, 3), 30, dtype=np.uint8)
            x, y, s = int(rng.integers(4, 28)), int(rng.integers(4, 28)), int(rng.integers(16, 30))
            arr[y : y + s, x : x + s] = 230
            Image.fromarray(arr).save(root / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
            poly = [x, y, x + s, y, x + s, y + s, x, y + s]
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 7 if i % 2 else 9, "iscrowd": 0,
                         "bbox": [x, y, s, s], "area": s * s, "segmentation": [poly]})  # fmt: skip
        cats = [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


def test_fit_dense_instance_segmentation(tmp_path: Path):
    data = make_coco(tmp_path / "coco")
    config = DenseConfig(
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
    result = fit_dense(config)
    final = result.summary["metrics"]["final_val"]
    assert {"bbox_mAP", "segm_mAP"} <= set(final)
    assert saved_task(result.output / "best") == "instance"
    pred = predict_dense_adapter(result.output / "best", data / "val", tmp_path / "pred", score_threshold=0.0)
    assert pred["images"] == 2 and (tmp_path / "pred" / "predictions.json").is_file()


# -- resumable state and gradient accumulation ---------------------------------------------------------------------
def crash_at(step: int):
    def callback(event, record):
        if event == "step" and record["step"] == step:
            raise KeyboardInterrupt  # what Ctrl-C does mid-epoch

    return callback


def step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r]


def epoch_records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_log(run / "log.jsonl") if "train_loss" in r]


def same_adapters(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def trainer_state(run: Path) -> tuple[int, int, int]:
    from sidetune.train import find_checkpoint

    state = json.loads((find_checkpoint(run) / "trainer_state.json").read_text())
    return state["step"], state["epoch"], state["batch_in_epoch"]


def test_dense_segmentation_resume_mid_epoch_replays_the_uninterrupted_run_exactly(tmp_path: Path):
    # scale-jitter crops, flips, the head's Dropout2d and accumulation all draw on state the checkpoint must carry
    data = make_camvid(tmp_path / "camvid", counts=(("train", 8), ("val", 2)))
    opts = dict(epochs=3, batch_size=2, grad_accum=2, save_every_steps=1, cpu=True)  # 4 micro-batches, 2 steps/epoch
    fit_dense(seg_config(tmp_path, data, output=str(tmp_path / "straight"), **opts))
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        fit_dense(seg_config(tmp_path, data, output=str(stopped), **opts), callback=crash_at(4))
    assert trainer_state(stopped) == (3, 1, 2)  # epoch 2 (steps 3, 4) stopped after 2 of its 4 micro-batches
    assert len(step_losses(stopped)) == 4  # the step that died is in the log until the resume drops it
    result = fit_dense(seg_config(tmp_path, data, output=str(stopped), resume=str(stopped), **opts))
    straight = step_losses(tmp_path / "straight")
    assert len(straight) == 6 and step_losses(stopped) == straight
    assert epoch_records(stopped) == epoch_records(tmp_path / "straight")  # train_loss of the resumed epoch too
    for sub in ("best", "last"):
        assert same_adapters(tmp_path / "straight" / sub, stopped / sub), sub
    assert result.summary["resumed_from"].endswith("step-00000003") and result.summary["timing"]["steps"] == 6


def test_dense_detection_resume_mid_epoch_replays_the_uninterrupted_run_exactly(tmp_path: Path):
    # the RPN and ROI heads sample proposals with the global RNG: restored from the checkpoint
    data = make_voc(tmp_path / "voc", counts=(("train", 6),))

    def config(out: Path, **extra) -> DenseConfig:
        return DenseConfig(
            backbone=SWIN, method="e3va", task="detection", data=str(data), img_size=64, val_split=None,
            backbone_kwargs=dict(SWIN_TINY), head_options={"fpn_channels": 16, "box_head_dim": 32},
            epochs=2, batch_size=2, lr=1e-3, save_every_steps=1, cpu=True, output=str(out), **extra,
        )  # fmt: skip

    fit_dense(config(tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        fit_dense(config(tmp_path / "stopped"), callback=crash_at(5))
    assert trainer_state(tmp_path / "stopped") == (4, 1, 1)
    fit_dense(config(tmp_path / "stopped", resume=str(tmp_path / "stopped")))
    straight = step_losses(tmp_path / "straight")
    assert len(straight) == 6 and step_losses(tmp_path / "stopped") == straight
    parts = [{k: v for k, v in r.items() if k.startswith("loss_")} for r in read_log(tmp_path / "stopped/log.jsonl")]
    assert {"loss_classifier", "loss_box_reg", "loss_objectness"} <= set(parts[0])
    assert same_adapters(tmp_path / "straight" / "last", tmp_path / "stopped" / "last")


def test_dense_failure_during_save_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch):
    from sidetune.train import checkpoint as checkpoint_module
    from sidetune.train import find_checkpoint

    class Crash(Exception):
        pass

    data = make_camvid(tmp_path / "camvid", counts=(("train", 4),))
    real_save = checkpoint_module.torch.save
    calls = {"n": 0}

    def flaky_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # a checkpoint makes 3 torch.save calls (rng, optimizer, scheduler); die in the 2nd's
            raise Crash("disk full")
        return real_save(obj, path, *args, **kwargs)

    out = tmp_path / "run"
    opts = dict(epochs=3, val_split=None, cpu=True)  # 4 images, batch 4: one step and one checkpoint an epoch
    monkeypatch.setattr(checkpoint_module.torch, "save", flaky_save)
    with pytest.raises(Crash):
        fit_dense(seg_config(tmp_path, data, output=str(out), **opts))
    monkeypatch.undo()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-00000001"]  # no half-written folder
    assert find_checkpoint(out) == root / "step-00000001"
    fit_dense(seg_config(tmp_path, data, output=str(out), resume=str(out), **opts))
    fit_dense(seg_config(tmp_path, data, output=str(tmp_path / "straight"), **opts))
    assert step_losses(out) == step_losses(tmp_path / "straight") and len(step_losses(out)) == 3


def test_dense_resume_from_another_method_or_task_names_both(tmp_path: Path):
    from sidetune.errors import ConfigError
    from sidetune.train import CheckpointError

    data = make_camvid(tmp_path / "camvid", counts=(("train", 4),))
    fit_dense(seg_config(tmp_path, data, epochs=1, val_split=None))
    run = str(tmp_path / "run")
    with pytest.raises(
        CheckpointError,
        match=rf"method 'e3va' on backbone '{SWIN}' for task 'segmentation', but this run trains method 'losa' "
        rf"on backbone '{SWIN}' for task 'segmentation'",
    ):
        fit_dense(seg_config(tmp_path, data, method="losa", output=str(tmp_path / "losa"), resume=run))
    assert not (tmp_path / "losa").exists()  # refused before writing anything
    voc = make_voc(tmp_path / "voc", counts=(("train", 2),))
    with pytest.raises(CheckpointError, match=r"for task 'segmentation', but this run .* for task 'detection'"):
        fit_dense(seg_config(tmp_path, voc, task="detection", output=str(tmp_path / "det"), resume=run))
    assert not (tmp_path / "det").exists()
    with pytest.raises(
        CheckpointError, match=r"head_options is \{'channels': 16\} but this run's is \{'channels': 8\}"
    ):
        fit_dense(seg_config(tmp_path, data, head_options={"channels": 8}, output=str(tmp_path / "c8"), resume=run))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        fit_dense(seg_config(tmp_path, data, output=str(tmp_path / "x"), resume=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="pass --resume"):
        fit_dense(seg_config(tmp_path, data, epochs=1, val_split=None))


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


def test_dense_grad_accum_matches_one_big_batch(tmp_path: Path):
    data = FlatSquares(8)
    opts = dict(epochs=1, warmup_epochs=0.0, val_split=None, head_options={"channels": 16, "dropout": 0.0}, cpu=True)
    big = fit_dense(seg_config(tmp_path, None, output=str(tmp_path / "big"), batch_size=8, **opts), train_dataset=data)
    accum = fit_dense(
        seg_config(tmp_path, None, output=str(tmp_path / "accum"), batch_size=4, grad_accum=2, **opts),
        train_dataset=data,
    )
    assert accum.summary["timing"]["steps"] == big.summary["timing"]["steps"] == 1  # one optimizer step each
    assert accum.summary["timing"]["images_per_step"] == 8
    assert step_losses(tmp_path / "accum") == pytest.approx(step_losses(tmp_path / "big"), rel=1e-5)
    pairs = zip(big.model.named_trainable_parameters(), accum.model.named_trainable_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # not vacuous: batch 4 without accumulation takes two different steps and ends elsewhere
    half = fit_dense(
        seg_config(tmp_path, None, output=str(tmp_path / "half"), batch_size=4, **opts), train_dataset=data
    )
    assert half.summary["timing"]["steps"] == 2
    pairs = zip(big.model.trainable_parameters(), half.model.trainable_parameters(), strict=True)
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs)


def test_dense_schedule_steps_once_per_optimizer_step_with_a_partial_last_window(tmp_path: Path):
    from sidetune.train.loop import WarmupCosine

    # 5 micro-batches of 2 per epoch, 2 per step: steps of 2, 2 and 1 micro-batches, 3 steps per epoch
    opts = dict(epochs=2, batch_size=2, grad_accum=2, warmup_epochs=1.0, lr=1e-3, val_split=None, cpu=True)
    result = fit_dense(seg_config(tmp_path, None, **opts), train_dataset=FlatSquares(10))
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
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
    assert "With a dense --task, --grad-accum, --resume and --save-every-steps work as for classification" in text
    assert "--batch-size 8" in text and "Classification only: --config" in text
