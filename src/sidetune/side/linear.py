"""Fixed (linear probe): the head alone trains, on the frozen backbone's pooled features.

The papers' "Fixed" baseline. No side network: it is the floor of every side method in parameters,
memory and time, and like them it never back-propagates into the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones import FrozenBackbone, TapRequest, Taps
from ..features import Features
from ..method_spec import MethodSpec
from .base import SideMethod, dense_stage_ends, features_from_final, stage_pyramid


@dataclass
class LinearConfig:
    """Linear probing has no options: the head is configured by the task."""


class LinearProbe(SideMethod):
    """Frozen features, pooled by the backbone's own head logic (class token, average or attention pool)."""

    reads_final = True

    def __init__(self, backbone: FrozenBackbone, config: LinearConfig, task: str = "classification") -> None:
        super().__init__(backbone)
        self.config = config
        self.stage_ends = dense_stage_ends(self.layout, task)
        if self.stage_ends:  # dense tasks read every stage's output (normalised by the head's stage norms)
            self.tap_request = TapRequest.of(out=self.stage_ends)
            self.pyramid_stages = tuple(range(self.layout.num_stages))

    def forward_taps(self, taps: Taps) -> Features:
        features = features_from_final(self.backbone, taps.final)
        if self.stage_ends:
            features.pyramid = stage_pyramid(taps, self.stage_ends)
            features.strides = [self.layout.stage_strides[s] for s in self.pyramid_stages]
        return features


SPECS = [
    MethodSpec(
        name="linear",
        description="Fixed / linear probe: only the head trains on frozen pooled features",
        kind="side",
        config_cls=LinearConfig,
        build=lambda backbone, config, task: LinearProbe(backbone, config, task),
        families=("vit", "swin", "cnn"),
    )
]
