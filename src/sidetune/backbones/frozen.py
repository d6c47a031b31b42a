"""``FrozenBackbone``: a timm model that is frozen for real, and the ``Taps`` it yields.

Frozen means three things, each checked by the tests: the model is in eval mode (``train()`` cannot undo
it), no parameter requires grad, and the forward runs under ``torch.no_grad()`` so autograd records
nothing and keeps none of the backbone's activations. What remains in memory for training is only what
the side network reads: the taps. So tap only what the method asks for.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from timm.data import resolve_data_config
from torch import nn

from ..errors import ConfigError
from .families import BlockRef, Family


@dataclass(frozen=True)
class TapRequest:
    """Which activations a method reads. Block indices count over all blocks of the backbone.

    Attributes:
        attn: blocks whose attention-branch output is kept (after layer-scale, before the residual add).
        mlp: blocks whose MLP-branch output is kept.
        out: blocks whose output is kept.
    """

    attn: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()
    out: frozenset[int] = frozenset()

    @classmethod
    def of(cls, attn=(), mlp=(), out=()) -> TapRequest:
        return cls(frozenset(attn), frozenset(mlp), frozenset(out))


@dataclass
class TapLayout:
    """Static facts about a backbone's activations, known once the backbone is built.

    Attributes:
        family: family name (``vit``, ``swin``, ``cnn``).
        img_size: (H, W) input size the backbone was built for.
        num_blocks: number of tap points (blocks; stages for CNNs).
        block_stage: stage index of each block.
        num_prefix_tokens: class / distillation / register tokens before the patch tokens (ViT).
        stage_dims: channels of each stage.
        stage_grids: (H, W) token grid of each stage.
        stage_strides: input-pixel stride of each stage's grid.
        stage_downsample: per stage, the backbone's own module that downsamples at the stage start, or None.
            These are the frozen backbone modules themselves (not copies); they are kept in a plain list so
            that a side network that reuses them does not register them as its own submodules.
        final_format: layout of ``forward_features`` output (``nlc``, ``nhwc`` or ``nchw``).
    """

    family: str
    img_size: tuple[int, int]
    num_blocks: int
    block_stage: tuple[int, ...]
    num_prefix_tokens: int
    stage_dims: tuple[int, ...]
    stage_grids: tuple[tuple[int, int], ...]
    stage_strides: tuple[int, ...]
    stage_downsample: list[nn.Module | None] = field(repr=False)
    final_format: str = "nlc"

    @property
    def num_stages(self) -> int:
        return len(self.stage_dims)

    def stage_blocks(self, stage: int) -> list[int]:
        """Indices of the blocks of one stage, in order."""
        return [i for i, s in enumerate(self.block_stage) if s == stage]

    def num_tokens(self, stage: int) -> int:
        """Tokens per image in a stage: prefix tokens (ViT) plus the grid."""
        h, w = self.stage_grids[stage]
        return h * w + (self.num_prefix_tokens if stage == 0 else 0)


@dataclass
class Taps:
    """Activations of one no-grad forward, all as (B, N, C) token tensors (CNN maps are flattened).

    Attributes:
        attn, mlp, out: block index -> tensor, only for the requested blocks.
        final: ``forward_features`` output in the model's native layout (``layout.final_format``).
        layout: the static layout of the backbone.
    """

    attn: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    out: dict[int, torch.Tensor]
    final: torch.Tensor
    layout: TapLayout


# The taps of the forward in progress: (backbone, request, store). A context variable rather than backbone
# state, so that two threads (or two copies of a model sharing modules) never write into each other's taps.
_ACTIVE_TAPS: ContextVar[tuple[object, TapRequest, dict[str, dict[int, torch.Tensor]]] | None] = ContextVar(
    "sidetune_active_taps", default=None
)


def _to_tokens(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Any block output layout -> (B, N, C)."""
    if fmt == "nlc" or x.ndim == 3:
        return x
    if fmt == "nhwc":
        return x.flatten(1, 2)
    return x.flatten(2).transpose(1, 2)  # nchw


class TimmBackbone(nn.Module):
    """A timm model with taps: hooks on the blocks, the layout, and the model's own pooling.

    This base class does not freeze anything and runs with autograd as the caller has it: in-place
    methods (full fine-tuning, LoRA, ...) use it and unfreeze what they train. Side methods use
    :class:`FrozenBackbone`.

    Args:
        model: a timm model without classifier (``num_classes=0``).
        family: its tap specification.
        img_size: the input size it was built for.
        name: the timm model name (for messages).
    """

    def __init__(self, model: nn.Module, family: Family, img_size: tuple[int, int], name: str = "") -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.name = name or type(model).__name__
        self.model.requires_grad_(False)  # methods unfreeze what they train
        self._blocks: list[BlockRef] = family.blocks(model)
        if not self._blocks:
            raise ConfigError(f"{self.name} has no blocks to tap (depth 0?): build it with at least one block.")
        # Hooks are partials of a bound method (not closures), so deepcopy and pickle remap them to the copy.
        for i, ref in enumerate(self._blocks):
            ref.module.register_forward_hook(functools.partial(self._record, "out", i))
            if ref.attn is not None:
                ref.attn.register_forward_hook(functools.partial(self._record, "attn", i))
            if ref.mlp is not None:
                ref.mlp.register_forward_hook(functools.partial(self._record, "mlp", i))
        self.layout = self._infer_layout(img_size)

    @property
    def blocks(self) -> list[BlockRef]:
        """The tap points (blocks; stages for CNNs) in forward order."""
        return list(self._blocks)

    @property
    def data_config(self) -> dict:
        """timm's preprocessing config (mean, std, interpolation, crop) at the built input size."""
        cfg = resolve_data_config(model=self.model)
        cfg["input_size"] = (3, *self.layout.img_size)
        return cfg

    # -- taps -------------------------------------------------------------------------------------------
    def _record(self, kind: str, index: int, module: nn.Module, args, output: torch.Tensor) -> None:
        active = _ACTIVE_TAPS.get()
        if active is not None and active[0] is self and index in getattr(active[1], kind):
            active[2][kind][index] = _to_tokens(output, self.family.token_format)

    def check_input(self, images: torch.Tensor) -> None:
        """Fail with a clear message for inputs the backbone (or a side network built on it) cannot take.

        The layout (token grids, hence LoSA's token mixers and the dense pyramids) is fixed when the model is
        built, so every family takes the size it was built for.
        """
        if not isinstance(images, torch.Tensor):
            raise ConfigError(f"{self.name}: expected a (B, 3, H, W) tensor of images, got {type(images).__name__}.")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"{self.name}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}.")
        param = next(self.model.parameters())
        if images.dtype != param.dtype:
            raise ConfigError(
                f"{self.name}: images are {images.dtype} but the backbone is {param.dtype}; convert them with "
                f"images.to({param.dtype}) (after normalising; uint8 images need the model's transforms)."
            )
        if images.device != param.device:
            raise ConfigError(f"{self.name}: images are on {images.device} but the model is on {param.device}.")
        size = tuple(images.shape[-2:])
        if size != self.layout.img_size:
            h, w = self.layout.img_size
            fix = f"img_size={size[0]}" if size[0] == size[1] else f"img_size={size}"
            raise ConfigError(
                f"{self.name} was built for {h}x{w} images but got {size[0]}x{size[1]}. Resize the input, or "
                f"build the model with {fix}."
            )

    def forward(self, images: torch.Tensor, request: TapRequest | None = None) -> Taps:
        """Run the backbone once, keeping the requested taps (with autograd as the caller has it).

        Args:
            images: (B, 3, H, W) at the built size.
            request: which taps to keep (default: none, only ``final``).
        """
        self.check_input(images)
        return self._run(images, request)

    def _run(self, images: torch.Tensor, request: TapRequest | None) -> Taps:
        store: dict[str, dict[int, torch.Tensor]] = {"attn": {}, "mlp": {}, "out": {}}
        token = _ACTIVE_TAPS.set((self, request or TapRequest(), store))
        try:
            final = self.model.forward_features(images)
        finally:
            _ACTIVE_TAPS.reset(token)
        return Taps(attn=store["attn"], mlp=store["mlp"], out=store["out"], final=final, layout=self.layout)

    def pool(self, final: torch.Tensor) -> torch.Tensor:
        """The backbone's own pooling (and pre-logits norm) applied to ``forward_features``-style input.

        Runs with autograd as the caller has it: side networks pass adapted features through it, and the
        gradient flows through these frozen modules to the side network without touching their weights.
        """
        return self.model.forward_head(final, pre_logits=True)

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm ``forward_features`` applies after the last block (what side methods copy), or None."""
        norm = getattr(self.model, "norm", None)
        return None if norm is None or isinstance(norm, nn.Identity) else norm

    def _infer_layout(self, img_size: tuple[int, int]) -> TapLayout:
        """Read the layout from one batch-1 forward: shapes are what the model really produces."""
        fmt = self.family.token_format
        num_prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        shapes: dict[int, tuple[int, ...]] = {}
        handles = [
            ref.module.register_forward_hook(lambda m, a, o, i=i: shapes.__setitem__(i, tuple(o.shape)))
            for i, ref in enumerate(self._blocks)
        ]
        was_training = self.model.training
        self.model.eval()  # a train-mode probe would update BatchNorm running statistics of pretrained weights
        try:
            with torch.no_grad():
                p = next(self.model.parameters())
                final = self.model.forward_features(torch.zeros(1, 3, *img_size, dtype=p.dtype, device=p.device))
        except (AssertionError, RuntimeError) as err:  # timm asserts the patch grid; convolutions refuse tiny inputs
            patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
            hint = f" (a multiple of its patch size, {'x'.join(map(str, patch))})" if patch is not None else ""
            raise ConfigError(
                f"{self.name} cannot take {img_size[0]}x{img_size[1]} images: {str(err).rstrip('.')}. "
                f"Choose another --img-size{hint}."
            ) from err
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        block_stage = tuple(ref.stage for ref in self._blocks)
        num_stages = max(block_stage) + 1
        dims, grids, strides = [], [], []
        for s in range(num_stages):
            shape = shapes[max(i for i, st in enumerate(block_stage) if st == s)]
            if fmt == "nlc":
                n, c = shape[1] - num_prefix, shape[2]
                grid = tuple(self.model.patch_embed.grid_size)
                assert grid[0] * grid[1] == n, "patch grid does not match the token count"
            elif fmt == "nhwc":
                grid, c = (shape[1], shape[2]), shape[3]
            else:
                grid, c = (shape[2], shape[3]), shape[1]
            dims.append(c)
            grids.append(grid)
            strides.append(img_size[0] // grid[0])
        final_format = "nlc" if final.ndim == 3 else fmt
        return TapLayout(
            family=self.family.name,
            img_size=tuple(img_size),
            num_blocks=len(self._blocks),
            block_stage=block_stage,
            num_prefix_tokens=num_prefix,
            stage_dims=tuple(dims),
            stage_grids=tuple(grids),
            stage_strides=tuple(strides),
            stage_downsample=self.family.stage_downsample(self.model),
            final_format=final_format,
        )


class FrozenBackbone(TimmBackbone):
    """A timm model frozen for real, returning the activations a side network reads.

    Frozen means: eval mode that ``train()`` cannot undo (dropout, drop-path and BN statistics stay off),
    no parameter requires grad, and the forward runs under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, family: Family, img_size: tuple[int, int], name: str = "") -> None:
        super().__init__(model, family, img_size, name)
        self.model.eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Keep the backbone in eval mode whatever the caller asks."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, images: torch.Tensor, request: TapRequest | None = None) -> Taps:
        """Run the frozen backbone once, without autograd. See :meth:`TimmBackbone.forward`."""
        self.check_input(images)
        with torch.no_grad():
            return self._run(images, request)
