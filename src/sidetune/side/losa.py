"""LoSA: Low-Rank Side Adaptation (Mercea et al., "Time-, Memory- and Parameter-Efficient Visual
Adaptation", arXiv 2402.02887, fig. 3).

A parallel side network iteratively refines the frozen backbone's features; gradients never enter the
backbone. With ``b[l]`` the output of tapped block ``l`` (no grad) and side state ``a[0] = 0``::

    a[l] = a[l-1] + g_l(b[l] + a[l-1])        # fig. 3, top
    head input = b[L] + a[L]

``g_l`` is a low-rank mixer (fig. 3, bottom): a low-rank token-mixing MLP across the token axis
(N -> r_t -> N, on transposed tokens) and a low-rank channel-mixing MLP (C -> r -> C), each behind a
LayerNorm and with its own residual, MLP-Mixer style. ``g`` returns the mixer's refinement (its output
minus its input); the recursion's own residual is ``a[l-1]``.

For video the token axis factorises into space and time: :class:`LowRankTokenMixer` takes a token
*shape* and mixes along each axis in turn, so ``token_shape=(T, S)`` mixes over the S spatial tokens of
each frame, then over the T frames at each spatial position; images use ``token_shape=(N,)``.

The paper's text available to us (abstract and figure captions) leaves these choices open; each is a
config field:

* ``channel_rank`` (default 16) and ``token_rank`` (default 8).
* ``blocks``: which blocks are tapped (default: every block).
* Norms: LayerNorm before each mixing MLP (``norm=True``). For classification the head reads
  ``b[L] + a[L]`` through a trainable copy of the backbone's final norm when the side network ends at the
  last block and the backbone has one (otherwise a fresh LayerNorm; ViTs that pool through ``fc_norm``
  keep that frozen norm after it). Dense heads read the raw ``b + a`` of each stage instead.
* Activation: GELU inside each low-rank MLP.
* Initialisation: down-projections random (PyTorch's default linear init), up-projections zero, so
  ``g = 0`` and the side network starts as the frozen model (the head first sees ``b[L]``).
* Token mixing includes prefix tokens (class, registers) and therefore fixes the token count: an input
  of another size fails with a message naming both sizes.
* Hierarchical backbones (Swin): the side state crosses a stage boundary through the backbone's own
  patch merging, as ``D(b + a) - D(b)`` (see ``carry_across_stage``).
* Training memory: each mixer is recomputed in backward from its input (``recompute``, default True), so one
  (B, N, C) tensor per tapped block is kept, as LoRA with gradient checkpointing keeps.

Not the paper's, off by default: ``read="norm"`` / ``read="gain"`` change what a mixer reads of the backbone
(``LN(b) + a``, ``gamma b + a``); docs/methods.md gives the reason and the evidence.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backbones import FrozenBackbone, TapRequest, Taps
from ..errors import ConfigError, require_non_negative_int, require_positive_int, unknown_choice
from ..features import Features
from ..method_spec import MethodSpec
from .base import SideMethod, carry_across_stage, to_final_format, to_map

#: How a mixer reads the backbone: b + a (the paper's figure, as DESIGN.md reads it), LN(b) + a, gamma b + a.
READS = ("sum", "norm", "gain")


@dataclass
class LoSAConfig:
    """LoSA options.

    Attributes:
        channel_rank: hidden width of the channel-mixing MLP (C -> r -> C).
        token_rank: hidden width of each token-mixing MLP (N -> r_t -> N).
        blocks: indices of the tapped blocks (None = all); the side network ends at the last one.
        norm: LayerNorm before each mixing MLP.
        dropout: dropout on the hidden activations.
        recompute: keep only each mixer's input ``b + a`` for backward and recompute the mixer's activations
            from it (``torch.utils.checkpoint`` per block), instead of keeping about four (B, N, C) tensors per
            block (the inputs of its two LayerNorms, the token-mixing norm's output, the channel-mixing
            norm's output). The default: one tensor per block is what LoRA with gradient checkpointing keeps
            (ViT-B/16, batch 8: 238 -> 65 MiB, the same as LoRA+gc's 65 MiB) for one more forward of the small
            mixers. Results are identical either way.
        read: how each mixer reads the backbone (``b[l]``: the tapped block's output, ``a[l-1]``: the side state).
            ``"sum"`` (default): ``g_l(b[l] + a[l-1])``, figure 3 as DESIGN.md reads it. ``"norm"``:
            ``g_l(LN(b[l]) + a[l-1])``, with a LayerNorm without parameters over the channels of each token.
            ``"gain"``: ``g_l(gamma_l b[l] + a[l-1])``, with ``gamma_l`` a learnable scalar per block starting at 1
            (so it starts as ``"sum"``); its gradient reads ``b[l]``, so each tapped block's output is kept for
            backward besides the mixer's input (twice the default's saved bytes). The head reads ``b[L] + a[L]``
            in every case. ``"norm"`` and ``"gain"`` depart from the paper's figure: see docs/methods.md.
        probe_blocks: the classification head also reads the multi-layer probe's features of the last
            ``probe_blocks`` blocks (each block's class and mean patch token, standardised per token; see
            ``probe``), concatenated after the method's own pooled feature. 0 (default): the paper's head.
            Not the paper's; docs/methods.md gives the reason and the evidence.
    """

    channel_rank: int = 16
    token_rank: int = 8
    blocks: tuple[int, ...] | None = None
    norm: bool = True
    dropout: float = 0.0
    recompute: bool = True
    read: str = "sum"
    probe_blocks: int = 0

    def __post_init__(self) -> None:
        require_positive_int("channel_rank", self.channel_rank, "LoSA")
        require_non_negative_int("probe_blocks", self.probe_blocks, "LoSA")
        require_positive_int("token_rank", self.token_rank, "LoSA")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoSA: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.read not in READS:
            raise unknown_choice("LoSA read", self.read, READS)
        if self.blocks is not None:
            self.blocks = tuple(sorted({int(b) for b in self.blocks}))
            if not self.blocks:
                raise ConfigError("LoSA: blocks must name at least one block (or be None for all).")


class LowRankMLP(nn.Module):
    """``up(GELU(down(x)))`` along the last axis, dim -> rank -> dim, with the up-projection at zero."""

    def __init__(self, dim: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``drop(GELU(down(x)))``: (..., dim) -> (..., rank)."""
        return self.drop(self.act(self.down(x)))

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The same MLP along the second-to-last axis: ``(..., dim, C) -> (..., dim, C)``.

        Equal to ``forward(x.transpose(-1, -2)).transpose(-1, -2)``, computed as ``W x + b`` with the weight on
        the left, one batched product per image (``baddbmm``, the bias added inside the product). The (large)
        token tensor is read and written in its own layout: ``torch.matmul(W, x)`` would fold the batch into a
        ``(B C, dim)`` transposed copy of ``x`` and copy its result back, forward and backward (measured on
        ViT-B shapes, (8, 197, 768) with rank 8: 15 ms -> 1.9 ms for a forward and backward on one CPU thread).
        """
        return self.up_rows(self.hidden_rows(x)).reshape(x.shape)

    def hidden_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``drop(GELU(W_down x + b_down))`` along the second-to-last axis: (..., dim, C) -> (B', rank, C),
        the leading axes flattened into B'."""
        rows = x.reshape(-1, *x.shape[-2:])  # a view for contiguous x
        h = torch.baddbmm(self.down.bias[:, None], self.down.weight.expand(rows.shape[0], -1, -1), rows)
        return self.drop(self.act(h))

    def up_rows(self, h: torch.Tensor) -> torch.Tensor:
        """``W_up h + b_up``: (B', rank, C) -> (B', dim, C)."""
        return torch.baddbmm(self.up.bias[:, None], self.up.weight.expand(h.shape[0], -1, -1), h)


class LowRankTokenMixer(nn.Module):
    """Low-rank token mixing along each axis of a token grid, in turn, each with a norm and a residual.

    Args:
        channels: C.
        token_shape: the token axes: ``(N,)`` for an image, ``(T, S)`` for video (space then time is
            ``(T, S)`` mixed from the last axis to the first).
        rank: hidden width of each axis' MLP.
        norm: LayerNorm (over channels) before each mixing step.
        dropout: hidden dropout.
        size_hint: text naming the input size the mixer was built for (used in the error message).

    Shapes: (B, prod(token_shape), C) -> same.
    """

    def __init__(
        self,
        channels: int,
        token_shape: tuple[int, ...],
        rank: int,
        norm: bool = True,
        dropout: float = 0.0,
        size_hint: str = "",
    ) -> None:
        super().__init__()
        self.token_shape = tuple(token_shape)
        self.size_hint = size_hint
        # One MLP per axis, applied from the innermost axis (space) to the outermost (time).
        self.mlps = nn.ModuleList(LowRankMLP(n, rank, dropout) for n in reversed(self.token_shape))
        self.norms = nn.ModuleList(nn.LayerNorm(channels) if norm else nn.Identity() for _ in self.token_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.refine(x)[0]

    def refine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mixed, delta)``: the forward output and its refinement ``mixed - x``, summed exactly (no subtraction)."""
        b, n, c = x.shape
        if n != math.prod(self.token_shape):
            raise ConfigError(
                f"LoSA's token mixer was built for {math.prod(self.token_shape)} tokens {self.size_hint} but got "
                f"{n}. Token mixing fixes the number of tokens: feed images of the size the model was built for, "
                f"or build the model with img_size set to the new size."
            )
        grid = x.reshape(b, *self.token_shape, c)
        delta: torch.Tensor | None = None
        axes = len(self.token_shape)
        for k, (mlp, norm) in enumerate(zip(self.mlps, self.norms, strict=True)):
            axis = axes - k  # token axes are 1..axes of (B, *token_shape, C); innermost first
            # Mix along the token axis where it lies next to the channels (always, for an image's (N,)).
            mixed = mlp.forward_rows(norm(grid).movedim(axis, -2)).movedim(-2, axis)
            grid = grid + mixed
            # summed in x's precision: under autocast the refinement (LoSA's side state) stays float32, as before
            delta = mixed.to(x.dtype) if delta is None else delta + mixed
        assert delta is not None
        return grid.reshape(b, n, c), delta.reshape(b, n, c)


class LowRankMixer(nn.Module):
    """``g``: low-rank token mixing then low-rank channel mixing; returns the refinement only.

    Shapes: (B, N, C) -> (B, N, C).
    """

    def __init__(
        self,
        channels: int,
        token_shape: tuple[int, ...],
        config: LoSAConfig,
        size_hint: str = "",
    ) -> None:
        super().__init__()
        self.token_mixing = LowRankTokenMixer(
            channels, token_shape, config.token_rank, config.norm, config.dropout, size_hint
        )
        self.channel_norm = nn.LayerNorm(channels) if config.norm else nn.Identity()
        self.channel_mixing = LowRankMLP(channels, config.channel_rank, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (y + channel(y)) - x with y = x + token deltas, summed from the deltas: no subtraction of x
        y, token_delta = self.token_mixing.refine(x)
        return token_delta + self.channel_mixing(self.channel_norm(y))


class LoSA(SideMethod):
    """The LoSA side network on a frozen ViT or Swin.

    For classification the pyramid is the head input's map. For dense tasks it is the refined output
    ``b + a`` at the end of every stage up to the last tapped block (raw, for the head's stage norms).

    Args:
        backbone: the frozen backbone.
        config: ranks, tapped blocks, norms.
        task: ``classification`` or a dense task.
    """

    def __init__(self, backbone: FrozenBackbone, config: LoSAConfig, task: str = "classification") -> None:
        super().__init__(backbone)
        self.config = config
        layout = self.layout
        blocks = config.blocks if config.blocks is not None else tuple(range(layout.num_blocks))
        bad = [i for i in blocks if not 0 <= i < layout.num_blocks]
        if bad:
            raise ConfigError(f"LoSA: blocks {bad} out of range for a backbone with {layout.num_blocks} blocks.")
        self.blocks = tuple(blocks)
        self.last_block = self.blocks[-1]
        self.last_stage = layout.block_stage[self.last_block]
        stage_ends = [max(layout.stage_blocks(s)) for s in range(self.last_stage)]
        self.tap_request = TapRequest.of(out=set(self.blocks) | set(stage_ends))
        self.dense = task != "classification"
        self.pyramid_stages = tuple(range(self.last_stage + 1)) if self.dense else (self.last_stage,)
        h, w = layout.img_size
        self.mixers = nn.ModuleDict()
        for i in self.blocks:
            s = layout.block_stage[i]
            hint = f"({h}x{w} images: {layout.stage_grids[s][0]}x{layout.stage_grids[s][1]} grid"
            hint += f" + {layout.num_prefix_tokens} prefix tokens)" if s == 0 and layout.num_prefix_tokens else ")"
            self.mixers[str(i)] = LowRankMixer(layout.stage_dims[s], (layout.num_tokens(s),), config, hint)
        # read="gain": one learnable scalar per tapped block, at 1 (the default reading at initialisation)
        gains = {str(i): nn.Parameter(torch.ones(())) for i in self.blocks} if config.read == "gain" else {}
        self.gains = nn.ParameterDict(gains)
        final_norm = backbone.final_norm
        reads_final = self.last_block == layout.num_blocks - 1
        self.out_norm = (
            copy.deepcopy(final_norm).requires_grad_(True)
            if reads_final and final_norm is not None
            else nn.LayerNorm(layout.stage_dims[self.last_stage])
        )
        if self.dense:  # dense heads read the raw pyramid, not the pooled head input: nothing to train here
            self.out_norm.requires_grad_(False)
        # the head reads the backbone's pooling of the refined tokens, or (stopping early) the last stage's mean
        self.declare_pooled(config.probe_blocks, task, "LoSA", None if reads_final else self.last_stage)

    def _read(self, block: int, b: torch.Tensor) -> torch.Tensor:
        """What mixer ``block`` reads of the backbone's (B, N, C) output ``b`` (``config.read``)."""
        read = self.config.read
        if read == "norm":
            return F.layer_norm(b, b.shape[-1:])
        if read == "gain":
            return self.gains[str(block)] * b
        return b

    def forward_taps(self, taps: Taps) -> Features:
        layout = self.layout
        a: torch.Tensor | None = None  # side state, a[0] = 0
        stage = 0
        stage_outputs: list[torch.Tensor] = []  # refined b + a at each finished stage's end (dense tasks)
        for i in self.blocks:
            s = layout.block_stage[i]
            while stage < s:  # cross stage boundaries through the backbone's own downsampling
                end = max(layout.stage_blocks(stage))
                stage_outputs.append(taps.out[end] if a is None else taps.out[end] + a)
                if a is not None:
                    a = carry_across_stage(
                        a, taps.out[end], layout.stage_downsample[stage + 1], layout.stage_grids[stage]
                    )
                stage += 1
            b = self._read(i, taps.out[i])
            x = b if a is None else b + a
            mixer = self.mixers[str(i)]
            if self.config.recompute and torch.is_grad_enabled():
                refinement = checkpoint(mixer, x, use_reentrant=False)
            else:
                refinement = mixer(x)
            a = refinement if a is None else a + refinement
        tokens = self.out_norm(taps.out[self.last_block] + a)
        if self.last_block == layout.num_blocks - 1:
            pooled = self.backbone.pool(to_final_format(tokens, layout))
        else:
            pooled = tokens[:, layout.num_prefix_tokens if self.last_stage == 0 else 0 :].mean(1)
        pooled = self.read_out(taps, pooled)
        if self.dense:
            stage_outputs.append(taps.out[self.last_block] + a)
            pyramid = [to_map(x, layout, st) for st, x in enumerate(stage_outputs)]
        else:
            pyramid = [to_map(tokens, layout, self.last_stage)]
        return Features(
            pooled=pooled,
            tokens=tokens,
            pyramid=pyramid,
            strides=[layout.stage_strides[st] for st in self.pyramid_stages],
        )


# -- video: factorised space-time token mixing -------------------------------------------------------------------
# The paper's video LoSA factorises the token axis into space and time (abstract; DESIGN.md). A video model feeds
# the frames of B clips through the image backbone as one batch of B*T images, so the taps stay ordinary
# (B*T, N, C) Taps (clip-major: the frames of a clip are consecutive), as a tap cache would serve them. Only the
# mixers change: each views its input as (B, T*N, C) and mixes with ``token_shape=(T, N)``. Everything else of
# LoSA (the refinement recursion, stage crossing, the output norm, the per-frame pooling) is the image model's.


class ClipMixer(LowRankMixer):
    """``g`` on the frames of clips: token mixing over the N tokens of each frame, then over the T frames at each
    token position (``LowRankTokenMixer(token_shape=(T, N))``), then channel mixing per token.

    The spatial step never mixes two frames (it acts along the N axis of each (clip, frame)); only the temporal
    step does, and only within a clip.

    Args:
        channels: C.
        num_frames: T.
        tokens: N, tokens per frame (prefix tokens included, as for images).
        config: the LoSA config (ranks, norm, dropout).
        size_hint: what the mixer was built for (error messages).

    Shapes: (B*T, N, C) -> (B*T, N, C), the frames of a clip consecutive.
    """

    def __init__(self, channels: int, num_frames: int, tokens: int, config: LoSAConfig, size_hint: str = "") -> None:
        super().__init__(channels, (num_frames, tokens), config, size_hint)
        self.num_frames = num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, n, c = x.shape
        t = self.num_frames
        if frames % t:
            raise ConfigError(
                f"video LoSA mixes clips of {t} frames, but its input holds {frames} frames, not a whole number of "
                f"clips; feed (B, {t}, 3, H, W) clips (the taps of B*{t} frames, clip by clip)."
            )
        return super().forward(x.reshape(frames // t, t * n, c)).reshape(frames, n, c)


def mix_over_time(losa: LoSA, num_frames: int) -> LoSA:
    """Make an image LoSA the video LoSA for clips of ``num_frames`` frames: every mixer becomes a :class:`ClipMixer`.

    With T = 1 there is no time axis to mix: the model is left as it is, the image LoSA parameter for parameter.
    The new mixers start as LoSA does (up-projections at zero: the frozen model).

    Args:
        losa: an image LoSA (classification), changed in place.
        num_frames: T.

    Returns:
        ``losa``.
    """
    require_positive_int("num_frames", num_frames, "video LoSA")
    losa.num_frames = num_frames
    if num_frames == 1:
        return losa
    for key, mixer in list(losa.mixers.items()):
        (tokens,) = mixer.token_mixing.token_shape
        channels = mixer.channel_mixing.down.in_features
        losa.mixers[key] = ClipMixer(channels, num_frames, tokens, losa.config, mixer.token_mixing.size_hint)
    return losa


def _build(backbone: FrozenBackbone, config: LoSAConfig, task: str) -> LoSA:
    return LoSA(backbone, config, task)


SPECS = [
    MethodSpec(
        name="losa",
        description="LoSA: low-rank side network of token- and channel-mixing MLPs refining frozen block outputs",
        kind="side",
        config_cls=LoSAConfig,
        build=_build,
        families=("vit", "swin"),
        why_not={
            "cnn": "LoSA refines per-block token features and crosses stages through a downsampling module; "
            "timm CNNs expose stage outputs only and downsample inside their blocks"
        },
    )
]
