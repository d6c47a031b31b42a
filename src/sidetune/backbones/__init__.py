"""Frozen timm backbones and the activations (taps) that side networks read."""

from .families import FAMILIES, BlockRef, Family, family_of, list_backbones
from .frozen import FrozenBackbone, TapLayout, TapRequest, Taps, TimmBackbone
from .loading import create_timm_model, fingerprint, normalize_weights

__all__ = [
    "FAMILIES",
    "BlockRef",
    "Family",
    "FrozenBackbone",
    "TapLayout",
    "TapRequest",
    "Taps",
    "TimmBackbone",
    "create_timm_model",
    "family_of",
    "fingerprint",
    "list_backbones",
    "normalize_weights",
]
