"""Adapter: sequential bottleneck adapters in every block (Houlsby et al., ICML 2019, "Parameter-Efficient
Transfer Learning for NLP", sec. 2.1 and fig. 2).

Each adapter maps a sub-layer's output ``x`` (B, N, C) to ``x + up(act(down(x)))`` with ``down`` C -> m and
``up`` m -> C, and sits after the attention and after the MLP branch of every block, before the branch is
added to the residual stream (Houlsby's placement, "twice per layer"). In timm ViT and Swin blocks the
branch output reaches the residual add through ``drop_path1`` / ``drop_path2`` (after layer-scale in ViT);
a forward pre-hook on those modules replaces their input ``x`` with the adapted one, so the timm model
stays a timm model and its parameter names are unchanged.

Choices, as config fields:

* ``bottleneck`` m = 64 for every block (E3VA's table 1 Adapter count, 3.11M on Swin-B, is two adapters
  per block at m = 64 with biases: 3,107,328).
* Activation GELU (Houlsby leaves the nonlinearity open).
* Initialisation: the up-projection is zero (weight and bias), so every adapter starts as the identity and
  the model as the frozen one (Houlsby initialise near identity for the same reason).
* LayerNorms stay frozen. Houlsby et al. also train the layer norms (fig. 2); the E3VA paper's count for
  this baseline (3.11M on Swin-B) is the adapters alone, so sidetune follows the table it is compared with.
  Combine with ``norm`` tuning by hand if you want Houlsby's exact setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import TimmBackbone
from ..errors import ConfigError, require_positive_int
from ..method_spec import MethodSpec
from .base import InplaceConfig, InplaceMethod

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
POSITIONS = ("attn", "mlp")


def check_positions(positions: tuple[str, ...] | list[str], owner: str) -> tuple[str, ...]:
    positions = tuple(positions)
    bad = [p for p in positions if p not in POSITIONS]
    if not positions or bad or len(set(positions)) != len(positions):
        raise ConfigError(f"{owner}: positions must be distinct names among {POSITIONS}, got {positions!r}.")
    return positions


class Bottleneck(nn.Module):
    """``up(act(down(x)))``, C -> m -> C, with the up-projection at zero. (..., C) -> (..., C).

    Parameters: ``2 C m + m + C``.
    """

    def __init__(self, channels: int, width: int, act: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(channels, width)
        self.act = ACTIVATIONS[act]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(width, channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def adapt_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Forward pre-hook: replace the hooked module's input x (a branch output) with x + adapter(x)."""
        return (args[0] + self(args[0]), *args[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x))))


@dataclass
class AdapterConfig(InplaceConfig):
    """Adapter options.

    Attributes:
        bottleneck: hidden width m of every adapter.
        act: nonlinearity: ``gelu``, ``relu`` or ``silu``.
        dropout: dropout on the hidden activation.
        positions: branches followed by an adapter: ``("attn", "mlp")`` (Houlsby) or one of them.
    """

    bottleneck: int = 64
    act: str = "gelu"
    dropout: float = 0.0
    positions: tuple[str, ...] = POSITIONS

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("bottleneck", self.bottleneck, "Adapter")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"Adapter: act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Adapter: dropout must be in [0, 1), got {self.dropout!r}.")
        self.positions = check_positions(self.positions, "Adapter")


class Adapter(InplaceMethod):
    """Houlsby adapters after the attention and MLP branches of every block.

    Args:
        backbone: a ViT or Swin backbone (all parameters frozen on arrival).
        config: width, activation, positions.
        task: ``classification`` or a dense task (see :class:`~sidetune.inplace.base.InplaceMethod`).

    Attributes:
        adapters: position (``attn`` / ``mlp``) -> one :class:`Bottleneck` per block.
    """

    def __init__(self, backbone: TimmBackbone, config: AdapterConfig, task: str = "classification") -> None:
        super().__init__(backbone, config, task)
        layout = backbone.layout
        dims = [layout.stage_dims[s] for s in layout.block_stage]
        self.adapters = nn.ModuleDict(
            {
                pos: nn.ModuleList(Bottleneck(c, config.bottleneck, config.act, config.dropout) for c in dims)
                for pos in config.positions
            }
        )
        for i, ref in enumerate(backbone.blocks):
            for pos in config.positions:
                branch_end = ref.attn if pos == "attn" else ref.mlp
                # A bound method, not a closure: deepcopy and pickle remap it to the copy's adapter.
                branch_end.register_forward_pre_hook(self.adapters[pos][i].adapt_input)


def _build(backbone: TimmBackbone, config: AdapterConfig, task: str) -> Adapter:
    return Adapter(backbone, config, task)


SPECS = [
    MethodSpec(
        name="adapter",
        description="Adapter (Houlsby): sequential bottlenecks after each attention and MLP branch",
        kind="inplace",
        config_cls=AdapterConfig,
        build=_build,
        families=("vit", "swin"),
        why_not={
            "cnn": "it inserts bottlenecks after the attention and MLP branches of transformer blocks, which timm "
            "CNN blocks do not have (use lora, bitfit, norm or partial-k on CNNs)"
        },
    )
]
