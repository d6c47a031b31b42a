"""LST: Ladder Side-Tuning (Sung et al., NeurIPS 2022, "LST: Ladder Side-Tuning for Parameter and Memory
Efficient Transfer Learning", sec. 3, fig. 2).

A narrow side network runs beside the frozen backbone and reads its block outputs through "ladders":
per block ``i`` a linear down-projection ``down_i`` (C -> d, d = C / reduction) and a learned gate::

    h = side_0(down_0(b[0]))
    h = side_i(mu_i * h + (1 - mu_i) * down_i(b[i]))      mu_i = sigmoid(w_i / T),   i = 1 .. L-1
    head input = up(LN(h))                                 (d -> C)

``side_i`` is a transformer block of the backbone's own kind at width d (LST's side network is the
backbone shrunk by ``reduction``): timm's ViT ``Block`` for a ViT, timm's ``SwinTransformerBlock`` with the
same window and shift for a Swin. The backbone runs once without autograd; gradients reach only the
side network, the ladders and the gates.

Where LST (written for T5) leaves a choice for vision backbones, as config fields:

* ``reduction`` = 8 (the paper's default factor), ``gate_temperature`` T = 0.1 and gates starting at
  ``w_i = 0`` (mu = 0.5), as in the paper's code.
* The side network starts from block 0's output: sidetune taps block outputs, not the embedding that
  LST's first down-projection reads.
* Swin: one side block per backbone block, at width ``C_s / reduction`` in stage ``s``; between stages
  the side state passes through a trainable patch merging at side width (timm's ``PatchMerging``,
  d_s -> d_{s+1}), mirroring the backbone's.
* Heads: the backbone block's head count (head width divided by ``reduction``), or ``num_heads``.
* Initialisation: random (timm's defaults). LST initialises the side network by pruning the backbone's
  weights (Fisher-information structural pruning); sidetune does not implement that pruning.
* The head reads ``up(LN(h))`` through the backbone's own pooling (class token or average), like LST's
  up-projection into the frozen LM head; it does not add the backbone's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from ..backbones import FrozenBackbone, TapRequest, Taps
from ..errors import ConfigError, require_non_negative_int, require_positive, require_positive_int
from ..features import Features
from ..method_spec import MethodSpec
from .base import SideMethod, to_final_format, to_map


@dataclass
class LSTConfig:
    """LST options.

    Attributes:
        reduction: side width = backbone width / reduction, per stage.
        gate_temperature: T in ``mu = sigmoid(w / T)``.
        gate_init: initial gate logit ``w`` (0: mu = 0.5).
        num_heads: attention heads of every side block; None = the backbone block's head count.
        mlp_ratio: side MLP hidden width / side width.
        probe_blocks: the classification head also reads the multi-layer probe's features of the last
            ``probe_blocks`` blocks (each block's class and mean patch token, standardised per token; see
            ``probe``), concatenated after the method's own pooled feature. 0 (default): LST's head.
            Not the paper's; docs/methods.md gives the reason and the evidence.
    """

    reduction: int = 8
    gate_temperature: float = 0.1
    gate_init: float = 0.0
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    probe_blocks: int = 0

    def __post_init__(self) -> None:
        require_non_negative_int("probe_blocks", self.probe_blocks, "LST")
        require_positive_int("reduction", self.reduction, "LST")
        if not isinstance(self.reduction, int):
            raise ConfigError(f"LST: reduction must be an integer, got {self.reduction!r}.")
        require_positive("gate_temperature", self.gate_temperature, "LST")
        require_positive("mlp_ratio", self.mlp_ratio, "LST")
        if not isinstance(self.gate_init, int | float) or isinstance(self.gate_init, bool):
            raise ConfigError(f"LST: gate_init must be a number, got {self.gate_init!r}.")
        if self.num_heads is not None:
            require_positive_int("num_heads", self.num_heads, "LST")


class LST(SideMethod):
    """The ladder side network on a frozen ViT or Swin.

    Args:
        backbone: the frozen backbone.
        config: reduction, gates, heads.
    """

    def __init__(self, backbone: FrozenBackbone, config: LSTConfig, task: str = "classification") -> None:
        super().__init__(backbone)
        self.config = config
        layout = self.layout
        n = layout.num_blocks
        self.tap_request = TapRequest.of(out=range(n))
        self.swin = layout.family == "swin"
        widths = []
        for c in layout.stage_dims:
            if c // config.reduction < 1:
                raise ConfigError(f"LST: reduction {config.reduction} leaves no channel of a {c}-channel stage.")
            widths.append(c // config.reduction)
        self.widths = tuple(widths)
        self.downs = nn.ModuleList(nn.Linear(layout.stage_dims[s], widths[s]) for s in layout.block_stage)
        self.side_blocks = nn.ModuleList(self._side_block(ref, widths[ref.stage]) for ref in backbone.blocks)
        self.merges = nn.ModuleList(PatchMerging(widths[s - 1], widths[s]) for s in range(1, layout.num_stages))
        self.gates = nn.Parameter(torch.full((n - 1,), float(config.gate_init))) if n > 1 else None
        self.side_norm = nn.LayerNorm(widths[-1])
        self.up = nn.Linear(widths[-1], layout.stage_dims[-1])
        self.declare_pooled(config.probe_blocks, task, "LST")

    def _side_block(self, ref, width: int) -> nn.Module:
        heads = self.config.num_heads or ref.module.attn.num_heads
        if width % heads:
            raise ConfigError(
                f"LST: side width {width} (backbone width / {self.config.reduction}) is not divisible by {heads} "
                f"attention heads; pass num_heads= a divisor of {width}."
            )
        if not self.swin:
            return Block(width, heads, mlp_ratio=self.config.mlp_ratio, qkv_bias=True)
        blk = ref.module
        return SwinTransformerBlock(
            width,
            blk.input_resolution,
            num_heads=heads,
            window_size=blk.window_size,
            shift_size=blk.shift_size,
            always_partition=blk.always_partition,
            dynamic_mask=blk.dynamic_mask,
            mlp_ratio=self.config.mlp_ratio,
        )

    def _ladder(self, taps: Taps, i: int) -> torch.Tensor:
        """down_i(b[i]) in the side block's layout: (B, N, d) for ViT, (B, H, W, d) for Swin."""
        x = self.downs[i](taps.out[i])
        if self.swin:
            h, w = self.layout.stage_grids[self.layout.block_stage[i]]
            x = x.reshape(x.shape[0], h, w, x.shape[-1])
        return x

    def forward_taps(self, taps: Taps) -> Features:
        layout = self.layout
        h = self.side_blocks[0](self._ladder(taps, 0))
        for i in range(1, layout.num_blocks):
            stage = layout.block_stage[i]
            if stage != layout.block_stage[i - 1]:
                h = self.merges[stage - 1](h)  # (B, H, W, d_s-1) -> (B, H/2, W/2, d_s)
            mu = torch.sigmoid(self.gates[i - 1] / self.config.gate_temperature)
            h = self.side_blocks[i](mu * h + (1 - mu) * self._ladder(taps, i))
        tokens = self.up(self.side_norm(h))
        if self.swin:
            tokens = tokens.flatten(1, 2)  # (B, N, C)
        last = layout.num_stages - 1
        return Features(
            pooled=self.read_out(taps, self.backbone.pool(to_final_format(tokens, layout))),
            tokens=tokens,
            pyramid=[to_map(tokens, layout, last)],
            strides=[layout.stage_strides[last]],
        )


def _build(backbone: FrozenBackbone, config: LSTConfig, task: str) -> LST:
    return LST(backbone, config, task)


SPECS = [
    MethodSpec(
        name="lst",
        description="LST: ladder side tuning, a narrow side transformer fed by gated down-projected block outputs",
        kind="side",
        config_cls=LSTConfig,
        build=_build,
        families=("vit", "swin"),
        why_not={
            "cnn": "LST's side network is the backbone's transformer blocks at reduced width, fed block by block; "
            "timm CNNs expose stage outputs only and have no transformer blocks to shrink"
        },
    )
]
