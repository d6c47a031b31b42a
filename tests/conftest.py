"""Shared test fixtures: the tiny backbone matrix and the offline assets in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# pytest-xdist runs one worker per core: one torch thread each avoids oversubscribing the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ASSETS = SHARED / "assets"
DINOV2_WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
EFFICIENTNET_WEIGHTS = ASSETS / "weights" / "efficientnet_lite0.imagenet.safetensors"
DATA = ASSETS / "data"

SWIN_TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=4)
IMG = 64

# name -> (timm model, create_model kwargs, image size). Every case builds and runs in well under a second.
TINY_BACKBONES: dict[str, tuple[str, dict, int]] = {
    "vit": ("test_vit", {}, IMG),  # class token, depth 6, width 64
    "vit_reg": ("test_vit2", {}, IMG),  # 1 register token, no class token, layer-scale, avg pool
    "dinov2_reg": (
        "vit_small_patch14_dinov2",
        dict(embed_dim=48, depth=3, num_heads=2, reg_tokens=4),
        56,
    ),  # class + 4 registers, layer-scale
    "swin": ("swin_tiny_patch4_window7_224", SWIN_TINY, IMG),
    "efficientnet": ("test_efficientnet", {}, IMG),
    "convnext": ("test_convnext", {}, IMG),
}
TRANSFORMERS = ("vit", "vit_reg", "dinov2_reg", "swin")


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): small models run faster without thread hand-offs, and the
    numbers of reproducibility tests do not depend on the thread count. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def require_asset(path: Path) -> Path:
    """Skip the test, with a message, when ../shared (real weights and data) is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"{path} not found: real-weights/data tests need ../shared beside the checkout")
    return path


def tiny(key: str, method: str, num_classes: int = 5, seed: int = 0, **options):
    """Build a sidetune model on one of the tiny backbones, with a fixed seed."""
    import sidetune

    name, kwargs, size = TINY_BACKBONES[key]
    torch.manual_seed(seed)
    return sidetune.create(name, method, num_classes=num_classes, img_size=size, backbone_kwargs=kwargs, **options)


def images(key: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = TINY_BACKBONES[key][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
