"""Loading a timm backbone: by hub name, from a local file, or random; and fingerprinting its weights.

Local files go through timm's own checkpoint loading (``timm.models.load_checkpoint``) with the family's own
``checkpoint_filter_fn`` (the one timm applies to hub weights), so position embeddings are resampled to the
requested image size. Unlike timm's pretrained path, which silently turns non-strict when the classifier
is removed, every key must fit: classifier weights are dropped, anything else missing or unexpected is an
error that lists the keys.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from .families import Family, family_of

logger = logging.getLogger(__name__)

HUB = "hub"
_HUB_ALIASES = {"hub", "pretrained", "imagenet"}


def normalize_weights(weights: str | Path | bool | None) -> str | None:
    """Turn the user's ``weights`` argument into ``None`` (random), ``"hub"``, or an absolute file path."""
    if weights is None or weights is False or (isinstance(weights, str) and weights.lower() in {"", "none", "random"}):
        return None
    if weights is True or (isinstance(weights, str) and weights.lower() in _HUB_ALIASES):
        return HUB
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(weights)!r} does not exist. Pass a .safetensors or .pth file of timm weights, "
            f"weights='hub' for the timm hub weights, or weights=None for a random backbone."
        )
    if path.suffix not in {".safetensors", ".pth", ".pt", ".bin"}:
        raise WeightsError(f"weights file {str(path)!r} must be .safetensors, .pth, .pt or .bin; got {path.suffix!r}.")
    return str(path.resolve())


def _show(keys: list[str]) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_weights_file(model: nn.Module, path: str) -> None:
    """Load a local timm checkpoint strictly (but for the classifier), through the family's filter function.

    Raises:
        WeightsError: the file cannot be read, or its keys or shapes do not fit the model.
    """
    family_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)

    def filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(tuple(c + "." for c in classifiers))}
        return family_filter(state_dict, model) if family_filter is not None else state_dict

    try:
        # a caller's autocast must not reach the filter functions (position-embedding resampling fails under it)
        with torch.autocast("cpu", enabled=False):
            result = timm.models.load_checkpoint(model, path, strict=False, filter_fn=filter_fn)
    except RuntimeError as err:  # shape mismatches raise even when not strict
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        detail = "; ".join(lines[:4]) or str(err).splitlines()[0][:300]
        raise WeightsError(f"weights file {path!r} does not fit the model: {detail}") from None
    except Exception as err:  # an unreadable or corrupt file is the user's file problem
        raise WeightsError(f"could not read weights file {path!r}: {err}") from None
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path!r} does not fit the model. Missing keys: {_show(missing)}. "
            f"Unexpected keys: {_show(unexpected)}. Check that the file holds weights of this architecture "
            f"in timm's key names."
        )


def create_timm_model(
    name: str,
    *,
    weights: str | None,
    img_size: int | tuple[int, int] | None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, Family]:
    """Build a timm backbone without a classifier.

    Args:
        name: timm model name of a supported family.
        weights: ``None`` (random), ``"hub"`` or a normalized file path (see :func:`normalize_weights`).
        img_size: input resolution, an int or (H, W) (ViT/Swin are built for it; CNNs take any size).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (tiny test configs use this).

    Returns:
        The model (``num_classes=0``) and its family.
    """
    family = family_of(name)
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if img_size is not None and family.accepts_img_size:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=weights == HUB, num_classes=0, **kwargs)
    except TypeError as err:
        raise ConfigError(f"timm could not build {name!r} with options {sorted(kwargs)}: {err}") from None
    if weights is not None and weights != HUB:
        load_weights_file(model, weights)
    if not family.model_check(model):
        raise ConfigError(
            f"backbone {name!r} matched the {family.name!r} family by name but timm built a "
            f"{type(model).__name__}, which sidetune cannot tap."
        )
    return model, family


def fingerprint(module: nn.Module) -> str:
    """A SHA-256 over the names, dtypes, shapes and bytes of a module's state dict.

    Two backbones share a fingerprint exactly when their weights are bit-identical, so an adapter trained on
    one can be refused on another.
    """
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()
