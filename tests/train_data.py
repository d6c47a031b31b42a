"""Tiny on-disk image datasets and run settings shared by the training tests (not a test module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sidetune.train import TrainConfig, read_log

CLASSES = ("cat", "dog", "fox")
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
