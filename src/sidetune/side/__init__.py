"""Backprop-free methods: the side network reads taps of a frozen backbone (E3VA, LoSA, linear probe)."""

from .base import SideMethod, carry_across_stage
from .e3va import E3VA, DualLowRankLinear, E3VAAdapter, E3VAConfig
from .linear import LinearConfig, LinearProbe
from .losa import LoSA, LoSAConfig, LowRankMixer, LowRankTokenMixer

__all__ = [
    "E3VA",
    "DualLowRankLinear",
    "E3VAAdapter",
    "E3VAConfig",
    "LinearConfig",
    "LinearProbe",
    "LoSA",
    "LoSAConfig",
    "LowRankMixer",
    "LowRankTokenMixer",
    "SideMethod",
    "carry_across_stage",
]
