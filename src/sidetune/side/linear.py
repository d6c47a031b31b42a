"""Fixed (linear probe): the head alone trains, on the frozen backbone's pooled features.

The papers' "Fixed" baseline. No side network: it is the floor of every side method in parameters,
memory and time, and like them it never back-propagates into the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones import FrozenBackbone, Taps
from ..features import Features
from ..methods import MethodSpec
from .base import SideMethod, to_map


@dataclass
class LinearConfig:
    """Linear probing has no options: the head is configured by the task."""


class LinearProbe(SideMethod):
    """Frozen features, pooled by the backbone's own head logic (class token, average or attention pool)."""

    def __init__(self, backbone: FrozenBackbone, config: LinearConfig) -> None:
        super().__init__(backbone)
        self.config = config

    def forward_taps(self, taps: Taps) -> Features:
        layout = self.layout
        final = taps.final
        if layout.final_format == "nlc":
            tokens = final
        elif layout.final_format == "nhwc":
            tokens = final.flatten(1, 2)
        else:
            tokens = final.flatten(2).transpose(1, 2)
        last = layout.num_stages - 1
        pyramid = [to_map(tokens, layout, last)] if tokens.shape[1] == layout.num_tokens(last) else None
        return Features(
            pooled=self.backbone.pool(final),
            tokens=tokens,
            pyramid=pyramid,
            strides=[layout.stage_strides[last]] if pyramid else None,
        )


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
