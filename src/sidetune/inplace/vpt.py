"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022, sec. 3.2, fig. 2).

Learnable prompt tokens join the token sequence of a frozen ViT, after the prefix tokens (class,
registers) and before the patch tokens:

* **VPT-shallow** (eq. 4): ``M`` prompts are inserted once, at the input of the first block; they travel
  through every block like the other tokens.
* **VPT-deep** (eq. 5): every block ``i`` gets its own ``M`` prompts: at the input of block ``i > 0`` the
  prompt positions' tokens (block ``i-1``'s outputs there) are replaced by block ``i``'s prompts.

After the last block the prompt positions are dropped, so ``forward_features`` returns the usual token
sequence and the backbone's own pooling (class token, average, attention pool) runs unchanged. Prompts
are inserted by forward hooks on the timm blocks: nothing is forked.

Choices: ``M = 10`` prompts, deep by default (the E3VA/LoSA comparisons use VPT-deep), initialised
uniformly in ``[-v, v]`` with ``v = sqrt(6 / (3 p^2 + C))`` for patch size ``p`` (the paper's Xavier
initialisation over the patch-embedding fan-in), no prompt dropout (the paper uses 0.1: ``dropout``).

Only ViTs: Swin attends within windows of a (H, W) token grid, where prompt tokens have no place; CNNs
have no tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import TimmBackbone
from ..errors import ConfigError
from ..method_spec import MethodSpec
from .base import InplaceConfig, InplaceMethod


@dataclass
class VPTConfig(InplaceConfig):
    """VPT options.

    Attributes:
        num_prompts: prompt tokens M per layer (deep) or at the input (shallow).
        deep: a fresh set of prompts at every block (VPT-deep) rather than only at the input.
        dropout: dropout on the prompts.
    """

    num_prompts: int = 10
    deep: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int) or self.num_prompts < 1:
            raise ConfigError(f"VPT: num_prompts must be a positive integer, got {self.num_prompts!r}.")
        if not isinstance(self.deep, bool):
            raise ConfigError(f"VPT: deep must be True or False, got {self.deep!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"VPT: dropout must be in [0, 1), got {self.dropout!r}.")


class VPT(InplaceMethod):
    """Prompt tokens in a frozen ViT.

    Args:
        backbone: a ViT backbone (all parameters frozen on arrival).
        config: number of prompts, deep or shallow.
        task: ``classification`` or a dense task (see :class:`~sidetune.inplace.base.InplaceMethod`).

    Attributes:
        prompts: (L, M, C) for VPT-deep (one set per block), (1, M, C) for VPT-shallow.
    """

    def __init__(self, backbone: TimmBackbone, config: VPTConfig, task: str = "classification") -> None:
        super().__init__(backbone, config, task)
        layout = backbone.layout
        blocks = [ref.module for ref in backbone.blocks]
        c, m = layout.stage_dims[0], config.num_prompts
        self.num_prefix = layout.num_prefix_tokens
        self.prompts = nn.Parameter(torch.empty(len(blocks) if config.deep else 1, m, c))
        patch = getattr(backbone.model.patch_embed, "patch_size", (16, 16))
        bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + c))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Bound methods and their partials, not closures: deepcopy and pickle remap them to the copy.
        blocks[0].register_forward_pre_hook(self._insert)
        if config.deep:
            for i, block in enumerate(blocks[1:], start=1):
                block.register_forward_pre_hook(functools.partial(self._replace, i))
        # prepend: the backbone's own tap of the last block's output sees the sequence without prompts
        blocks[-1].register_forward_hook(self._remove, prepend=True)

    def _prompts(self, i: int, batch: int) -> torch.Tensor:
        return self.drop(self.prompts[i]).unsqueeze(0).expand(batch, -1, -1)

    def _insert(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, p = args[0], self.num_prefix  # (B, P + HW, C) -> (B, P + M + HW, C)
        x = torch.cat([x[:, :p], self._prompts(0, x.shape[0]).to(x.dtype), x[:, p:]], dim=1)
        return (x, *args[1:])

    def _replace(self, i: int, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, p, m = args[0], self.num_prefix, self.config.num_prompts
        x = torch.cat([x[:, :p], self._prompts(i, x.shape[0]).to(x.dtype), x[:, p + m :]], dim=1)
        return (x, *args[1:])

    def _remove(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        p, m = self.num_prefix, self.config.num_prompts  # (B, P + M + HW, C) -> (B, P + HW, C)
        return torch.cat([output[:, :p], output[:, p + m :]], dim=1)


def _build(backbone: TimmBackbone, config: VPTConfig, task: str) -> VPT:
    return VPT(backbone, config, task)


SPECS = [
    MethodSpec(
        name="vpt",
        description="VPT: learnable prompt tokens at the input (shallow) or every block (deep, default); ViT only",
        kind="inplace",
        config_cls=VPTConfig,
        build=_build,
        families=("vit",),
        why_not={
            "swin": "Swin attends within windows of a (H, W) token grid, where prompt tokens have no position "
            "(VPT's Swin variant needs per-window prompts, which sidetune does not implement)",
            "cnn": "prompt tokens need a token sequence; CNNs process feature maps",
        },
    )
]
