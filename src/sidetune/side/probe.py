"""Multi-layer linear probe: a linear head on frozen features of several blocks, concatenated.

The ceiling of what frozen features allow a linear classifier: no side network, nothing in the backbone trains,
and the head reads more than the last block. For each chosen block ``l`` (default: the last four) the block's
output tokens are standardised per token (a LayerNorm without parameters: blocks differ in scale by orders of
magnitude, and the linear head absorbs any per-channel scale and shift) and reduced to

* the class token, when the backbone has one (``class_token``), and
* the mean of the patch tokens (``mean_tokens``; prefix tokens, class and registers, left out),

and the head reads the concatenation over the chosen blocks: ``(B, sum_l k C_l)`` with ``k`` the number of
parts (2 for a ViT with a class token, 1 for Swin and CNNs). It is the linear evaluation of DINOv2 (Oquab et al.,
2023: class tokens of the last four blocks and the mean patch token) for any block set, and the "probe" row of
sidetune's results: the frozen-feature ceiling a side network should reach.

Dense tasks: the probe's pyramid is the linear probe's, the raw output of every stage (the dense head adds its own
norms and reads every stage already).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones import FrozenBackbone, TapRequest, Taps
from ..errors import ConfigError, require_positive_int
from ..features import Features
from ..method_spec import MethodSpec
from .base import BlockReadout, SideMethod, dense_stage_ends, stage_pyramid


@dataclass
class ProbeConfig:
    """Multi-layer probe options.

    Attributes:
        blocks: indices of the blocks read (None: the last ``last_blocks`` blocks; for a CNN, blocks are stages).
        last_blocks: how many of the last blocks to read when ``blocks`` is None.
        class_token: read each block's class token (where the backbone has one).
        mean_tokens: read each block's mean patch token.
    """

    blocks: tuple[int, ...] | None = None
    last_blocks: int = 4
    class_token: bool = True
    mean_tokens: bool = True

    def __post_init__(self) -> None:
        require_positive_int("last_blocks", self.last_blocks, "probe")
        if not (self.class_token or self.mean_tokens):
            raise ConfigError("probe: read the class token, the mean patch token or both (both are off).")
        if self.blocks is not None:
            self.blocks = tuple(sorted({int(b) for b in self.blocks}))
            if not self.blocks:
                raise ConfigError("probe: blocks must name at least one block (or be None for the last ones).")


class MultiLayerProbe(SideMethod):
    """Frozen per-token-standardised class and mean patch tokens of several blocks, concatenated.

    ``pooled_width`` is the width of ``Features.pooled`` (the classification head's input), which is not the
    backbone's ``num_features``.

    Args:
        backbone: the frozen backbone.
        config: which blocks and parts.
        task: ``classification`` (the probe) or a dense task (the linear probe's stage pyramid).
    """

    def __init__(self, backbone: FrozenBackbone, config: ProbeConfig, task: str = "classification") -> None:
        super().__init__(backbone)
        self.config = config
        layout = self.layout
        n = layout.num_blocks
        blocks = config.blocks if config.blocks is not None else tuple(range(max(0, n - config.last_blocks), n))
        bad = [i for i in blocks if not 0 <= i < n]
        if bad:
            raise ConfigError(f"probe: blocks {bad} out of range for a backbone with {n} blocks (0..{n - 1}).")
        self.blocks = tuple(blocks)
        self.readout = BlockReadout.of(backbone, self.blocks, config.class_token, config.mean_tokens)
        self.pooled_width = self.readout.width
        self.stage_ends = dense_stage_ends(layout, task)
        if self.stage_ends:  # dense tasks: every stage's raw output, as the linear probe
            self.tap_request = TapRequest.of(out=self.stage_ends)
            self.pyramid_stages = tuple(range(layout.num_stages))
        else:
            self.tap_request = TapRequest.of(out=self.blocks)

    def forward_taps(self, taps: Taps) -> Features:
        if self.stage_ends:
            pyramid = stage_pyramid(taps, self.stage_ends)
            pooled = torch.cat([p.mean((2, 3)) for p in pyramid], 1)
            strides = [self.layout.stage_strides[s] for s in self.pyramid_stages]
            return Features(pooled=pooled, pyramid=pyramid, strides=strides)
        return Features(pooled=self.readout(taps))


SPECS = [
    MethodSpec(
        name="probe",
        description="Multi-layer linear probe: a linear head on class and mean patch tokens of the last blocks",
        kind="side",
        config_cls=ProbeConfig,
        build=lambda backbone, config, task: MultiLayerProbe(backbone, config, task),
        families=("vit", "swin", "cnn"),
    )
]
