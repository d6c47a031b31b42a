"""Image transforms built from a backbone's own data config (timm's mean, std, size, interpolation).

Three recipes (``augmentation``):

* ``"vtab"``: the VTAB-1k protocol of the visual PETL papers: resize straight to ``img_size`` (no crop, no
  flip, aspect ratio not kept), to tensor, normalise with the backbone's mean/std. The same for train and
  eval.
* ``"none"``: timm's eval transform: resize to ``img_size / crop_pct``, center crop ``img_size``, normalise.
  The same for train and eval.
* ``"standard"``: timm's train recipe when ``train=True`` (random resized crop, horizontal flip, colour
  jitter 0.4; no RandAugment unless ``auto_augment=`` is passed through), timm's eval transform otherwise.

Every recipe starts with :class:`ToRGB`, so grayscale, palette and RGBA images give 3-channel tensors.

Image size: ``img_size`` wins; else, for a model whose patch embedding was built at a fixed size (a timm ViT
created with ``img_size=224`` keeps its pretrained config's 518), that size; else the config's
``input_size``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import MaybeToTensor, str_to_interp_mode
from torch import nn
from torchvision import transforms as T

from sidetune.data.catalog import AUGMENTATIONS
from sidetune.data.files import to_rgb
from sidetune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["AUGMENTATIONS", "ToRGB", "build_transforms", "resolve_backbone_data_config"]

Augmentation = Literal["none", "vtab", "standard"]
# timm asserts that one source of config is non-empty; everything not given here takes timm's defaults.
_DEFAULT_CFG: dict[str, Any] = {"input_size": (3, 224, 224)}


class ToRGB:
    """Convert a PIL image (any mode) or a ``(C, H, W)`` tensor with 1 or 4 channels to 3-channel RGB."""

    def __call__(self, img: Any) -> Any:
        if isinstance(img, Image.Image):
            return to_rgb(img)
        if isinstance(img, torch.Tensor) and img.ndim == 3:
            if img.shape[0] == 1:
                return img.expand(3, -1, -1)
            if img.shape[0] == 4:
                return img[:3]
        return img

    def __repr__(self) -> str:
        return "ToRGB()"


def _timm_module(model: nn.Module) -> nn.Module | None:
    """The first (sub)module carrying a timm ``pretrained_cfg`` (wrappers such as a frozen backbone hold one)."""
    for module in model.modules():
        if getattr(module, "pretrained_cfg", None):
            return module
    return None


def _model_img_size(module: nn.Module) -> tuple[int, int] | None:
    size = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def resolve_backbone_data_config(
    model_or_data_config: nn.Module | Mapping[str, Any] | str,
    img_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Resolve timm's data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``).

    Args:
        model_or_data_config: A timm model (or a module wrapping one), a data-config mapping (missing keys take
            timm's defaults), or a timm model name (its pretrained config, no weights loaded).
        img_size: Override of the input size (int for square, or ``(height, width)``).

    Returns:
        The data config, with ``input_size`` as ``(3, height, width)``.

    Raises:
        ConfigError: Unknown model name.
    """
    model_size = None
    if isinstance(model_or_data_config, nn.Module):
        module = _timm_module(model_or_data_config)
        if module is None:
            warnings.warn(
                f"{type(model_or_data_config).__name__} carries no timm pretrained_cfg; using timm's default data "
                "config (ImageNet mean/std, 224 px). Pass the backbone's data config to be sure.",
                stacklevel=3,
            )
            config = resolve_data_config(args={}, pretrained_cfg=_DEFAULT_CFG)
        else:
            config = resolve_data_config(model=module)
            model_size = _model_img_size(module)
    elif isinstance(model_or_data_config, str):
        cfg = timm.models.get_pretrained_cfg(model_or_data_config)
        if cfg is None:
            raise ConfigError(
                f"unknown timm model {model_or_data_config!r}; see timm.list_models() or pass a data config dict."
            )
        config = resolve_data_config(pretrained_cfg=cfg.to_dict())
    else:
        config = resolve_data_config(args=dict(model_or_data_config), pretrained_cfg=_DEFAULT_CFG)

    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        config["input_size"] = (3, int(h), int(w))
    elif model_size is not None and tuple(config["input_size"][1:]) != model_size:
        logger.info("using the model's built input size %s instead of its pretrained config's", model_size)
        config["input_size"] = (3, *model_size)
    return config


def build_transforms(
    model_or_data_config: nn.Module | Mapping[str, Any] | str,
    img_size: int | tuple[int, int] | None = None,
    augmentation: Augmentation = "none",
    train: bool = False,
    **create_transform_kwargs: Any,
) -> T.Compose:
    """Build the image transform for a backbone: PIL image (any mode) -> normalised ``(3, H, W)`` float tensor.

    Args:
        model_or_data_config: See :func:`resolve_backbone_data_config`.
        img_size: Output size (int for square, or ``(height, width)``); default: the backbone's.
        augmentation: ``"vtab"``, ``"none"`` or ``"standard"`` (see the module docstring).
        train: Training transform; only ``"standard"`` differs between train and eval.
        **create_transform_kwargs: Passed to ``timm.data.create_transform`` for ``"none"`` and ``"standard"``
            (e.g. ``auto_augment="rand-m9-mstd0.5"``, ``hflip=0.0``, ``scale=(0.5, 1.0)``).

    Returns:
        A ``torchvision.transforms.Compose`` beginning with :class:`ToRGB`.

    Raises:
        ConfigError: Unknown ``augmentation``, or extra keyword arguments with ``"vtab"``.
    """
    if augmentation not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {augmentation!r}; choose from {AUGMENTATIONS}.")
    config = resolve_backbone_data_config(model_or_data_config, img_size)
    size = tuple(config["input_size"][1:])
    if augmentation == "vtab":
        if create_transform_kwargs:
            raise ConfigError(f"augmentation='vtab' takes no extra options, got {sorted(create_transform_kwargs)}.")
        steps = [
            T.Resize(size, interpolation=str_to_interp_mode(config["interpolation"])),
            MaybeToTensor(),
            T.Normalize(mean=config["mean"], std=config["std"]),
        ]
    else:
        is_training = train and augmentation == "standard"
        tf = create_transform(**config, is_training=is_training, **create_transform_kwargs)
        steps = list(tf.transforms) if isinstance(tf, T.Compose) else [tf]
    logger.debug("transform %s (train=%s): %s", augmentation, train, steps)
    return T.Compose([ToRGB(), *steps])
