"""Backprop-free methods: the side network reads taps of a frozen backbone (E3VA, LoSA, LST, linear probes)."""

from .base import SideMethod, carry_across_stage, features_from_final
from .e3va import E3VA, DualLowRankLinear, E3VAAdapter, E3VAConfig
from .linear import LinearConfig, LinearProbe
from .losa import LoSA, LoSAConfig, LowRankMixer, LowRankTokenMixer
from .lst import LST, LSTConfig
from .probe import MultiLayerProbe, ProbeConfig

__all__ = [
    "E3VA",
    "LST",
    "DualLowRankLinear",
    "E3VAAdapter",
    "E3VAConfig",
    "LSTConfig",
    "LinearConfig",
    "LinearProbe",
    "LoSA",
    "LoSAConfig",
    "LowRankMixer",
    "LowRankTokenMixer",
    "MultiLayerProbe",
    "ProbeConfig",
    "SideMethod",
    "carry_across_stage",
    "features_from_final",
]
