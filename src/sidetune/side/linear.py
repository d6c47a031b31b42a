"""Fixed (linear probe): the head alone trains, on the frozen backbone's pooled features.

The papers' "Fixed" baseline. No side network: it is the floor of every side method in parameters,
memory and time, and like them it never back-propagates into the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones import FrozenBackbone, Taps
from ..features import Features
from ..methods import MethodSpec
from .base import SideMethod, features_from_final


@dataclass
class LinearConfig:
    """Linear probing has no options: the head is configured by the task."""


class LinearProbe(SideMethod):
    """Frozen features, pooled by the backbone's own head logic (class token, average or attention pool)."""

    def __init__(self, backbone: FrozenBackbone, config: LinearConfig) -> None:
        super().__init__(backbone)
        self.config = config

    def forward_taps(self, taps: Taps) -> Features:
        return features_from_final(self.backbone, taps.final)


SPECS = [
    MethodSpec(
        name="linear",
        description="Fixed / linear probe: only the head trains on frozen pooled features",
        kind="side",
        config_cls=LinearConfig,
        build=lambda backbone, config, task: LinearProbe(backbone, config),
        families=("vit", "swin", "cnn"),
    )
]
