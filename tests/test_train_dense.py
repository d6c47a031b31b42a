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
