"""What every backprop-free side method shares: read taps from a ``FrozenBackbone``, return ``Features``."""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import FrozenBackbone, TapLayout, TapRequest, Taps, TimmBackbone
from ..errors import ConfigError
from ..features import Features
from ..heads.pyramid import PyramidSpec, stage_pyramid_spec


class SideMethod(nn.Module):
    """Base of side methods. Subclasses set ``tap_request`` and implement :meth:`forward_taps`.

    The backbone runs once under ``torch.no_grad()``; all trainable parameters live in the subclass, so
    ``loss.backward()`` never enters the backbone.

    Dense heads are built from the declared pyramid, never from a forward: ``pyramid_stages`` are the
    backbone stages whose (adapted) outputs make ``Features.pyramid``, and ``pyramid_normalized`` says
    whether the method already normalises them (E3VA's trainable stage norms) or the head should add norms.
    """

    tap_request: TapRequest = TapRequest()
    pyramid_normalized: bool = False
    #: width of ``Features.pooled`` when it is not the backbone's own (``num_features``): the multi-layer probe
    #: concatenates several blocks. The classification head is built this wide.
    pooled_width: int | None = None
    #: frozen block features the classification head reads: the multi-layer probe's whole feature, and for E3VA,
    #: LoSA and LST their ``probe_blocks`` option, after their own pooled feature (None: off, the papers' head)
    readout: BlockReadout | None = None

    def __init__(self, backbone: FrozenBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.pyramid_stages: tuple[int, ...] = (backbone.layout.num_stages - 1,)

    def declare_pooled(self, last_blocks: int, task: str, method: str, pooled_stage: int | None = None) -> None:
        """Declare the width of ``Features.pooled``, with the multi-layer probe's features of the last ``last_blocks``
        blocks read besides the method's own pooled feature (0: none). Call at the end of ``__init__``, once
        ``tap_request`` is set; the method's ``forward_taps`` passes its pooled feature through :meth:`read_out`.

        Args:
            last_blocks: the ``probe_blocks`` option.
            task: the method's task (only classification heads read the pooled feature).
            method: the method's name, for messages.
            pooled_stage: the stage whose tokens the method averages into its own pooled feature, when it does not
                pool the backbone's way (a side network that stops before the last block); None: the backbone's.
        """
        own = (
            self.layout.stage_dims[pooled_stage] if pooled_stage is not None else _backbone_pooled_width(self.backbone)
        )
        self.pooled_width = own
        if not last_blocks:
            return
        if task != "classification":
            raise ConfigError(
                f"{method}: probe_blocks={last_blocks} feeds the classification head; a {task} head reads the "
                "pyramid, not the pooled feature. Leave probe_blocks at 0 for dense tasks."
            )
        n = self.layout.num_blocks
        if not 0 < last_blocks <= n:
            raise ConfigError(f"{method}: probe_blocks must be in 1..{n} (this backbone's blocks), got {last_blocks}.")
        self.readout = BlockReadout.of(self.backbone, tuple(range(n - last_blocks, n)))
        self.tap_request = TapRequest.of(
            attn=self.tap_request.attn, mlp=self.tap_request.mlp, out=self.tap_request.out | set(self.readout.blocks)
        )
        self.pooled_width = own + self.readout.width

    def read_out(self, taps: Taps, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled``, with the readout's frozen block features concatenated after it when there is one."""
        return pooled if self.readout is None else torch.cat([pooled, self.readout(taps).to(pooled.dtype)], -1)

    @property
    def layout(self) -> TapLayout:
        return self.backbone.layout

    def pyramid_spec(self) -> PyramidSpec:
        """Channels and strides of ``Features.pyramid``, fine to coarse."""
        return stage_pyramid_spec(self.layout, self.pyramid_stages)

    #: whether :meth:`forward_taps` reads ``taps.final`` (the backbone's ``forward_features`` output)
    reads_final: bool = False

    def tap_tokens(self) -> int | None:
        """How many leading tokens of each tap the method reads (None: all); a tap cache stores only those."""
        return None

    def tap_tokens_of(self, kind: str, block: int) -> int | None:
        """How many leading tokens of one tap (``kind`` ``attn``, ``mlp`` or ``out`` of ``block``) the method reads
        (None: all): :meth:`tap_tokens`, except the readout's blocks, whose patch tokens it averages."""
        if self.readout is not None and kind == "out" and block in self.readout.blocks:
            return None
        return self.tap_tokens()

    def forward(self, images: torch.Tensor | Taps) -> Features:
        """(B, 3, H, W) images, or the :class:`Taps` of such images (from a tap cache) -> Features."""
        taps = images if isinstance(images, Taps) else self.backbone(images, self.tap_request)
        return self.forward_taps(taps)

    def forward_taps(self, taps: Taps) -> Features:
        raise NotImplementedError


class BlockReadout:
    """The multi-layer probe's features: for each block, its class token and mean patch token, standardised per token.

    Each block's output tokens go through a LayerNorm without parameters (blocks differ in scale by orders of
    magnitude; a linear head absorbs any per-channel scale and shift) and are reduced to the class token, where the
    backbone has one, and the mean of the patch tokens (prefix tokens, class and registers, left out). The result
    is their concatenation over the blocks, ``(B, width)``. No parameters: it reads frozen taps.

    Attributes:
        blocks: the blocks read.
        read_class: read each block's class token.
        mean_tokens: read each block's mean patch token.
        width: the concatenation's width.
    """

    def __init__(self, layout: TapLayout, blocks: tuple[int, ...], read_class: bool, mean_tokens: bool) -> None:
        self.layout, self.blocks, self.read_class, self.mean_tokens = layout, blocks, read_class, mean_tokens
        parts = int(read_class) + int(mean_tokens)
        self.width = parts * sum(layout.stage_dims[layout.block_stage[i]] for i in blocks)

    @classmethod
    def of(cls, backbone: FrozenBackbone, blocks: tuple[int, ...], class_token: bool = True, mean_tokens: bool = True):
        """A readout of ``blocks``: the class token read only where the backbone has one (timm puts it first, then
        registers; a ViT with registers only has none)."""
        layout = backbone.layout
        has_class = getattr(backbone.model, "cls_token", None) is not None and layout.num_prefix_tokens > 0
        read_class = class_token and has_class
        if not (read_class or mean_tokens):
            raise ConfigError(
                f"{backbone.name} has no class token and mean_tokens is off: nothing to read; set mean_tokens=True."
            )
        return cls(layout, blocks, read_class, mean_tokens)

    def __call__(self, taps: Taps) -> torch.Tensor:
        layout, parts = self.layout, []
        for i in self.blocks:
            tokens = nn.functional.layer_norm(taps.out[i], taps.out[i].shape[-1:])  # (B, N, C)
            prefix = layout.num_prefix_tokens if layout.block_stage[i] == 0 else 0
            if self.read_class:
                parts.append(tokens[:, 0])
            if self.mean_tokens:
                parts.append(tokens[:, prefix:].mean(1))
        return torch.cat(parts, -1)


def _backbone_pooled_width(backbone: FrozenBackbone) -> int:
    """The width of the backbone's own pooling (``forward_head(pre_logits=True)``)."""
    model = backbone.model
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def carry_across_stage(
    delta: torch.Tensor, base: torch.Tensor, downsample: nn.Module, grid: tuple[int, int]
) -> torch.Tensor:
    """Carry a side correction ``delta`` of a stage's output across the backbone's own downsampling layer.

    The adapted feature of the stage is ``base + delta``; the next stage starts from ``D(base + delta)``,
    where ``D`` is the backbone's frozen downsampling module (Swin patch merging: 2x2 merge, LayerNorm,
    bias-free Linear). The backbone itself continues from ``D(base)``, so the correction the side
    network carries into the next stage is ``D(base + delta) - D(base)``: exactly zero when ``delta`` is,
    and ``D``'s parameters receive no gradient (they are frozen), while the gradient flows through ``D``.

    For timm's ``PatchMerging`` (norm, then a bias-free linear ``W``) the difference is taken before the linear
    map, ``W (LN(M(base + delta)) - LN(M(base)))`` with ``M`` the 2x2 merge: the same function with one matrix
    product instead of two (the product is the cost of a patch merging), and without the cancellation of two
    large products. Any other downsampling module is run twice, as the definition reads.

    Args:
        delta: (B, N, C) correction, with autograd.
        base: (B, N, C) frozen stage output (no grad).
        downsample: the backbone's own module taking (B, H, W, C) (the same object, not a copy).
        grid: (H, W) of the stage.

    Returns:
        (B, N', C') correction for the next stage.
    """
    b, _, c = base.shape
    h, w = grid
    if _is_linear_patch_merging(downsample):
        norm, reduction = downsample.norm, downsample.reduction
        with torch.no_grad():
            frozen = norm(merge_2x2(base.reshape(b, h, w, c)))
        adapted = norm(merge_2x2((base + delta).reshape(b, h, w, c)))
        return reduction(adapted - frozen).flatten(1, 2)
    with torch.no_grad():
        frozen_next = downsample(base.reshape(b, h, w, c))
    adapted_next = downsample((base + delta).reshape(b, h, w, c))
    return (adapted_next - frozen_next).flatten(1, 2)


def _is_linear_patch_merging(module: nn.Module) -> bool:
    """timm's (Swin v1) ``PatchMerging``: 2x2 merge, then ``norm``, then the bias-free linear ``reduction``."""
    from timm.models.swin_transformer import PatchMerging

    reduction = getattr(module, "reduction", None)
    return type(module) is PatchMerging and isinstance(reduction, nn.Linear) and reduction.bias is None


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """timm ``PatchMerging``'s merge: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C), zero-padding odd sizes.

    The channel order is timm's (``x0, x1, x2, x3`` = top-left, bottom-left, top-right, bottom-right), so that
    ``reduction(norm(merge_2x2(x)))`` is exactly ``PatchMerging.forward(x)`` (tested).
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        x = nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        _, h, w, _ = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)


def to_final_format(tokens: torch.Tensor, layout: TapLayout) -> torch.Tensor:
    """(B, N, C) tokens of the last stage -> the layout of the backbone's ``forward_features`` output."""
    if layout.final_format == "nlc":
        return tokens
    h, w = layout.stage_grids[-1]
    x = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])
    return x if layout.final_format == "nhwc" else x.permute(0, 3, 1, 2)


def to_map(tokens: torch.Tensor, layout: TapLayout, stage: int) -> torch.Tensor:
    """(B, N, C) tokens of a stage (prefix tokens dropped) -> (B, C, H, W) map for dense heads."""
    h, w = layout.stage_grids[stage]
    patches = tokens[:, layout.num_prefix_tokens :] if stage == 0 else tokens
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)


def dense_stage_ends(layout: TapLayout, task: str) -> tuple[int, ...]:
    """The last block of every stage for a dense task (their outputs make the pyramid), none otherwise."""
    if task == "classification":
        return ()
    return tuple(max(layout.stage_blocks(s)) for s in range(layout.num_stages))


def stage_pyramid(taps: Taps, stage_ends: tuple[int, ...]) -> list[torch.Tensor]:
    """The raw stage outputs ``taps.out[end]`` as (B, C, H, W) maps, fine to coarse."""
    return [to_map(taps.out[end], taps.layout, s) for s, end in enumerate(stage_ends)]


def features_from_final(backbone: TimmBackbone, final: torch.Tensor) -> Features:
    """Features of a backbone's own ``forward_features`` output: the linear probe's and every in-place method's.

    Pooling is the backbone's own (class token, average or attention pool, with its pre-logits norm). The last
    stage's tokens become the single pyramid level when they cover the whole grid (ViT, Swin, CNN maps).

    Args:
        backbone: the backbone that produced ``final`` (frozen or not: autograd is as the caller has it).
        final: ``forward_features`` output in the layout ``backbone.layout.final_format``.
    """
    layout = backbone.layout
    if layout.final_format == "nlc":
        tokens = final
    elif layout.final_format == "nhwc":
        tokens = final.flatten(1, 2)
    else:
        tokens = final.flatten(2).transpose(1, 2)
    last = layout.num_stages - 1
    pyramid = [to_map(tokens, layout, last)] if tokens.shape[1] == layout.num_tokens(last) else None
    return Features(
        pooled=backbone.pool(final),
        tokens=tokens,
        pyramid=pyramid,
        strides=[layout.stage_strides[last]] if pyramid else None,
    )
