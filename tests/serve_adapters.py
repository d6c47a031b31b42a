"""Tiny task adapters on one random backbone for the serving tests, and each adapter's single-model reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import sidetune
from sidetune.data import build_transforms
from sidetune.heads import predict_segmentation

from conftest import TINY_BACKBONES

KEY = "vit"  # test_vit: patch 16, 64 px, width 64, depth 6
SEG = {"channels": 16, "pool_scales": (1, 2)}
DET = {"fpn_channels": 32, "box_head_dim": 64}
# name -> (method, task, num_classes, head_options, inference.json extras)
ADAPTERS: dict[str, tuple[str, str, int, dict, dict]] = {
    "cls-losa": ("losa", "classification", 5, {}, {"augmentation": "vtab"}),
    "cls-e3va": ("e3va", "classification", 4, {}, {"augmentation": "none"}),
    "seg": ("e3va", "segmentation", 3, SEG, {"eval_mode": "whole"}),
    "seg-slide": ("losa", "segmentation", 3, SEG, {"eval_mode": "slide"}),
    "det": ("losa", "detection", 2, DET, {}),
    "inst": ("lst", "instance", 2, {**DET, "mask_head_channels": 16}, {}),
}


def build_adapter(
    directory: Path, method: str, task: str, num_classes: int, head_options: dict, extras: dict, *, seed: int = 0
) -> Path:
    """Create a tiny model on the shared random backbone (seed 0), give its trainable tensors random values (a
    trained adapter's are not at their initialisation: E3VA's up-projections start at zero), save it with an
    ``inference.json``."""
    name, kwargs, size = TINY_BACKBONES[KEY]
    torch.manual_seed(0)
    model = sidetune.create(
        name,
        method,
        task=task,
        num_classes=num_classes,
        img_size=size,
        backbone_kwargs=kwargs,
        head_options=head_options or None,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_adapter(directory)
    classes = [f"{task[:3]}{k}" for k in range(num_classes)]
    (directory / "inference.json").write_text(json.dumps({"classes": classes, "seed": 0, **extras}))
    return directory


def build_all(root: Path) -> dict[str, Path]:
    return {name: build_adapter(root / name, *spec, seed=i) for i, (name, spec) in enumerate(ADAPTERS.items())}


def sample_images(seed: int = 0) -> list[Image.Image]:
    """Three images at the backbone's size, one wide and one larger than it (other preprocessing paths)."""
    size = TINY_BACKBONES[KEY][2]
    rng = np.random.default_rng(seed)
    shapes = [(size, size), (size, size), (size, size), (40, 72), (96, 80)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def load_single(directory: Path) -> sidetune.SidetuneModel:
    """The adapter loaded alone, on its own backbone (seeded as it was created)."""
    torch.manual_seed(0)
    return sidetune.load(directory).eval()


@torch.no_grad()
def single_outputs(directory: Path, images: list[Image.Image]):
    """What the adapter's model alone gives for ``images``, through the project's single-model inference paths:
    classification as ``sidetune.train.inference`` (eval transform, stacked batch), segmentation as
    ``evaluate_dense`` (images normalised at their own size, same-size images batched, ``predict_segmentation``),
    detection as ``predict_dense`` (images in [0, 1], the detector letterboxes them)."""
    model = load_single(directory)
    info = json.loads((directory / "inference.json").read_text())
    task = model.config.task
    if task == "classification":
        tf = build_transforms(model.data_config, tuple(model.config.img_size), info.get("augmentation", "vtab"))
        return model(torch.stack([tf(im) for im in images]))
    if task == "segmentation":
        mean = torch.tensor(model.data_config["mean"]).view(3, 1, 1)
        std = torch.tensor(model.data_config["std"]).view(3, 1, 1)
        x = [(pil_to_tensor(im).float().div(255) - mean) / std for im in images]
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(x):
            groups.setdefault(tuple(t.shape), []).append(i)
        for group in groups.values():
            logits = predict_segmentation(
                model, torch.stack([x[i] for i in group]), tuple(model.config.img_size), mode=info["eval_mode"]
            )
            for i, lg in zip(group, logits, strict=True):
                out[i] = lg
        return out
    return model([pil_to_tensor(im).float().div(255) for im in images])
