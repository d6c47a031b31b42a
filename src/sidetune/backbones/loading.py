"""Loading a timm backbone: by hub name, from a local file, or random; and fingerprinting its weights.

Local files go through timm's own pretrained-loading path (``pretrained_cfg_overlay=dict(file=PATH)``), so
the family's checkpoint filter runs: position embeddings are resampled to the requested image size and
classifier weights are dropped, exactly as for hub weights.
"""

from __future__ import annotations

import hashlib
import logging
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


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _key_mismatch_error(model: nn.Module, path: str, err: Exception) -> WeightsError:
    """Explain a weights file that does not fit: list missing and unexpected keys (timm's error is a wall)."""
    try:
        file_keys = set(_read_state_dict(path))
    except Exception as read_err:
        return WeightsError(f"could not read weights file {path!r}: {read_err}")
    model_keys = set(model.state_dict())
    missing = sorted(model_keys - file_keys)
    unexpected = sorted(file_keys - model_keys)

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"

    detail = str(err).splitlines()[0][:300]
    return WeightsError(
        f"weights file {path!r} does not fit the model. Missing keys: {show(missing)}. "
        f"Unexpected keys: {show(unexpected)}. (timm said: {detail}) Check that the file holds weights of this "
        f"architecture in timm's key names."
    )


def create_timm_model(
    name: str,
    *,
    weights: str | None,
    img_size: int | None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, Family]:
    """Build a timm backbone without a classifier.

    Args:
        name: timm model name of a supported family.
        weights: ``None`` (random), ``"hub"`` or a normalized file path (see :func:`normalize_weights`).
        img_size: input resolution (ViT/Swin are built for it; CNNs accept any size and ignore it here).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (tiny test configs use this).

    Returns:
        The model (``num_classes=0``) and its family.
    """
    family = family_of(name)
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if img_size is not None and family.accepts_img_size:
        kwargs["img_size"] = img_size
    pretrained = weights is not None
    if weights is not None and weights != HUB:
        kwargs["pretrained_cfg_overlay"] = dict(file=weights)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as err:
        if weights is not None and weights != HUB and ("state_dict" in str(err) or "size mismatch" in str(err)):
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
            raise _key_mismatch_error(model, weights, err) from None
        raise
    except TypeError as err:
        raise ConfigError(f"timm could not build {name!r} with options {sorted(kwargs)}: {err}") from None
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
