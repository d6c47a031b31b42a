"""AdaptFormer: a scaled bottleneck in parallel with each block's MLP (Chen et al., NeurIPS 2022,
"AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", sec. 3.2, eqs. 1-2).

With ``x'`` the residual stream entering the MLP sub-block of a block::

    x = x' + MLP(LN(x')) + s * up(ReLU(down(u)))

where ``u`` is ``x'`` itself (the official code's ``adaptmlp(x)``: ``input="residual"``) or ``LN(x')``, the
MLP's own normalised input (the paper's eq. 1: ``input="normed"``). The adapter's output joins the MLP
branch before the residual add (after layer-scale in ViT, so the scale ``s`` alone weighs it).

Implemented with hooks on the timm block: a forward hook on ``norm2`` computes the adapter's output from
the norm's input (or output), a forward pre-hook on ``drop_path2`` (where the branch output meets the
residual add) adds it. ``positions=("attn", "mlp")`` also puts one beside the attention branch (reading
``norm1``): AdaptFormer has only the MLP one, but E3VA's table 1 count for AdaptFormer (3.11M on Swin-B,
the same as its Adapter) is only reached with two per block (see ``docs/param_counts.md``).

Choices: bottleneck 64 and s = 0.1 (the paper's defaults for ViT), ReLU, up-projection zero so the model
starts as the frozen one (the paper's initialisation), no hidden dropout (the official code uses 0.1:
``dropout``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import TimmBackbone
from ..errors import ConfigError, require_positive, require_positive_int
from ..method_spec import MethodSpec
from .adapter import ACTIVATIONS, Bottleneck, check_positions
from .base import InplaceConfig, InplaceMethod

INPUTS = ("residual", "normed")


@dataclass
class AdaptFormerConfig(InplaceConfig):
    """AdaptFormer options.

    Attributes:
        bottleneck: hidden width of each parallel adapter.
        scale: the fixed scale ``s`` of the adapter's output.
        act: nonlinearity (``relu`` in the paper).
        dropout: dropout on the hidden activation.
        input: what the adapter reads: ``residual`` (the sub-block's input, official code) or ``normed``
            (its LayerNorm output, the paper's eq. 1).
        positions: branches with a parallel adapter: ``("mlp",)`` (the paper) or ``("attn", "mlp")``.
    """

    bottleneck: int = 64
    scale: float = 0.1
    act: str = "relu"
    dropout: float = 0.0
    input: str = "residual"
    positions: tuple[str, ...] = ("mlp",)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("bottleneck", self.bottleneck, "AdaptFormer")
        require_positive("scale", self.scale, "AdaptFormer")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"AdaptFormer: act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"AdaptFormer: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.input not in INPUTS:
            raise ConfigError(f"AdaptFormer: input must be one of {INPUTS}, got {self.input!r}.")
        self.positions = check_positions(self.positions, "AdaptFormer")


class AdaptFormer(InplaceMethod):
    """Parallel scaled bottlenecks beside the MLP (and optionally the attention) of every block.

    Args:
        backbone: a ViT or Swin backbone (all parameters frozen on arrival).
        config: width, scale, input, positions.
        task: ``classification`` or a dense task (see :class:`~sidetune.inplace.base.InplaceMethod`).

    Attributes:
        adapters: position (``attn`` / ``mlp``) -> one :class:`~sidetune.inplace.adapter.Bottleneck` per block.
    """

    def __init__(self, backbone: TimmBackbone, config: AdaptFormerConfig, task: str = "classification") -> None:
        super().__init__(backbone, config, task)
        layout = backbone.layout
        dims = [layout.stage_dims[s] for s in layout.block_stage]
        self.adapters = nn.ModuleDict(
            {
                pos: nn.ModuleList(Bottleneck(c, config.bottleneck, config.act, config.dropout) for c in dims)
                for pos in config.positions
            }
        )
        # The adapter's output travels from the norm hook to the branch-end hook of the same block.
        self._pending: dict[tuple[int, str], torch.Tensor] = {}
        for i, ref in enumerate(backbone.blocks):
            for pos in config.positions:
                norm = ref.module.norm1 if pos == "attn" else ref.module.norm2
                branch_end = ref.attn if pos == "attn" else ref.mlp
                # Partials of bound methods, not closures: deepcopy and pickle remap them to the copy.
                norm.register_forward_hook(functools.partial(self._read, (i, pos)))
                branch_end.register_forward_pre_hook(functools.partial(self._add, (i, pos)))

    def _read(self, key: tuple[int, str], module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
        u = args[0] if self.config.input == "residual" else output
        self._pending[key] = self.config.scale * self.adapters[key[1]][key[0]](u)

    def _add(self, key: tuple[int, str], module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] + self._pending.pop(key), *args[1:])

    def forward(self, images: torch.Tensor):
        self._pending.clear()  # an earlier forward that raised may have left a tensor (and its graph) here
        return super().forward(images)


def _build(backbone: TimmBackbone, config: AdaptFormerConfig, task: str) -> AdaptFormer:
    return AdaptFormer(backbone, config, task)


SPECS = [
    MethodSpec(
        name="adaptformer",
        description="AdaptFormer: scaled bottleneck in parallel with each block's MLP",
        kind="inplace",
        config_cls=AdaptFormerConfig,
        build=_build,
        families=("vit", "swin"),
        why_not={
            "cnn": "it puts a bottleneck beside the MLP branch of transformer blocks, which timm CNN blocks do not "
            "have (use lora, bitfit, norm or partial-k on CNNs)"
        },
    )
]
