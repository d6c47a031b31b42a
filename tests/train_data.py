"""Tiny on-disk datasets of every task and run settings shared by the training tests (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sidetune.train import TrainConfig, read_log

CLASSES = ("cat", "dog", "fox")
RED, BLUE = (220, 30, 30), (30, 30, 220)
IMG = 32  # test_vit at 32 px: a 2x2 patch grid, a few milliseconds per batch


def write_image(path: Path, label: int, rng: np.random.Generator, size: int = 12) -> None:
    """A noisy image whose mean colour tells its class, so a few steps learn something."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., label % 3] = 180.0
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_image_folder(root: Path, train_per_class: int = 6, test_per_class: int = 2, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/<i>.png`` with the classes of :data:`CLASSES`."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", label, rng)
    return root


def config(data: Path | None, output: Path, **overrides: Any) -> TrainConfig:
    """A run of ``test_vit`` that takes about a second: 2 epochs of 3 steps on 18 images."""
    values: dict[str, Any] = dict(
        backbone="test_vit",
        method="linear",
        data=str(data) if data is not None else None,
        img_size=IMG,
        epochs=2,
        batch_size=6,
        lr=1e-2,
        warmup_epochs=0.5,
        workers=0,
        output=str(output),
    )
    values.update(overrides)
    return TrainConfig(**values)


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir / "log.jsonl") if r["type"] == "step"]


def comparable_log(run_dir: Path) -> list[dict[str, Any]]:
    """The whole log without its clock readings: what an interrupted and resumed run must reproduce exactly."""
    clocks = ("step_time_s", "data_time_s", "elapsed_s")
    return [{k: v for k, v in r.items() if k not in clocks} for r in read_log(run_dir / "log.jsonl")]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (its run lock aside) and its bytes: what a refused run must leave as it was."""
    return {
        str(f.relative_to(folder)): f.read_bytes()
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != ".lock"
    }


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


SWIN = "swin_tiny_patch4_window7_224"


def task_config(task: str, data: Path | None, output: Path, **overrides: Any) -> TrainConfig:
    """A tiny run of ``task``: test_vit at 32 px for classification, a tiny Swin at 64 px for the dense tasks."""
    from conftest import SWIN_TINY

    if task == "classification":
        return config(data, output, **overrides)
    values: dict[str, Any] = dict(
        backbone=SWIN,
        method="e3va",
        task=task,
        data=str(data) if data is not None else None,
        img_size=64,
        backbone_kwargs=dict(SWIN_TINY),
        head_options={"channels": 16} if task == "segmentation" else {"fpn_channels": 16, "box_head_dim": 32},
        epochs=2,
        batch_size=2,
        lr=5e-3 if task == "segmentation" else 1e-3,
        warmup_epochs=0.5,
        output=str(output),
    )
    values.update(overrides)
    return TrainConfig(**values)


def make_task_data(task: str, root: Path) -> Path:
    """A small dataset of ``task`` under ``root``."""
    if task == "classification":
        return make_image_folder(root)
    if task == "segmentation":
        return make_camvid(root, counts=(("train", 8), ("val", 2)))
    return make_voc(root, counts=(("train", 6), ("val", 2)))
