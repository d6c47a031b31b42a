"""E3VA: Parameter-, Memory- and Time-Efficient Visual Adapter tuning (Yin et al., arXiv 2306.09729).

Implements section 3 of the paper.

* **Gradient highway** (sec. 3.2, fig. 2, eqs. 10-11). The backbone computes ``l[i+1]`` as usual, without
  autograd. Beside it a highway ``e`` sums, per block, an adapter on the attention-branch output and an
  adapter on the MLP-branch output, in parallel (fig. 3): ``e[i+1] = e[i] + A1(attn[i]) + A2(mlp[i])``.
  All trainable parameters sit on the highway; the loss reaches them without entering the backbone.
* **Adapter** (sec. 3.3, eq. 5 and fig. 4): ``A(x) = up(GELU(down(x)))``. Eq. 5's skip connection is what
  makes the paper's highway carry the full adapted feature ``l + delta``; this module carries only the
  correction ``delta`` (DESIGN.md's ``e``), which is the same computation without re-summing the
  backbone's branches: the stage feature is ``l + delta`` either way.
* **Dual low-rank branches** (sec. 3.3, eqs. 6-7): each of ``up`` and ``down`` has weight
  ``W = s1 t1 + s2 t2`` with ``s_k`` (m x alpha) and ``t_k`` (alpha x n): ``2 alpha (m + n)`` weights
  instead of ``m n``.
* **Downsampling** (sec. 3.2, "Downsampling in E3VA"): at a Swin stage boundary the highway passes through
  the backbone's own patch-merging layer, inherited and frozen (the same module object, not a copy).
  Applied to the adapted feature, ``D(l + delta) = D(l) + [D(l + delta) - D(l)]``: the backbone already
  continues from ``D(l)``, so the highway carries ``D(l + delta) - D(l)`` (see ``carry_across_stage``).
* **Trainable norms before the neck** (sec. 3.2, "FPN in E3VA"): each stage output ``l + delta`` goes
  through a trainable LayerNorm; this is the only path by which gradient reaches the adapters.

Choices the paper leaves open, as config fields:

* Bottleneck ``m = C / 2`` and ``alpha`` = 8, 16, 32 for the presets ``e3va``, ``e3va+``, ``e3va++``. The
  paper gives only parameter counts; these sizes reproduce its table 1 (Swin-B: 1.20M, 2.35M, 4.66M) and
  table 2 (Swin-L: 1.79M, 3.53M, 7.00M) to within 0.01M, counting adapters with biases plus the four
  stage norms (see ``tests/test_param_counts.py``).
* Initialisation: the up-projection's ``s`` factors and bias are zero, so ``W_up = 0`` and the highway
  starts as the frozen model (its ``t`` factors are random so ``s`` receives gradient from step one, as
  in LoRA). The down-projection is random with ``Var(W_down) = 1 / C``, the scale of a default linear.
* Output norms: fresh LayerNorms (the paper trains them from scratch) except the last stage's, which
  starts as a trainable copy of the backbone's final norm when one exists (``copy_final_norm``), so that
  at initialisation the pooled features equal the frozen model's pre-logits: E3VA starts as a linear
  probe.
* On a plain ViT (one stage, no downsampling) the same highway runs over all blocks.
* Training memory: each block's adapters are recomputed in backward from its two taps (``recompute``, default
  True), which the down-projections' weight gradients need anyway; nothing else of a block is kept.

Not the paper's, off by default: ``input_norm=True`` puts a LayerNorm on each adapter's input; docs/methods.md
gives the reason and the evidence.
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
from ..errors import ConfigError, require_non_negative_int, require_positive, require_positive_int
from ..features import Features
from ..method_spec import MethodSpec
from .base import SideMethod, carry_across_stage, to_final_format, to_map


@dataclass
class E3VAConfig:
    """E3VA options (defaults: the paper's ``E3VA`` preset).

    Attributes:
        alpha: rank of each low-rank branch (paper: alpha in eqs. 6-7). Presets: 8, 16, 32.
        branches: number of low-rank products summed per weight ("dual" = 2).
        bottleneck_ratio: adapter width ``m`` as a fraction of the stage width ``C``.
        bottleneck: fixed adapter width for every stage, overriding ``bottleneck_ratio``.
        dropout: dropout on the adapter's hidden activation.
        out_stages: stages whose adapted output is produced (and gets a trainable norm). None = the task's
            default: the last stage for classification (the only one a classifier reads), all stages for
            dense tasks (the paper's FPN input).
        copy_final_norm: start the last stage's output norm from the backbone's final norm.
        recompute: keep only each block's two taps for backward and recompute the adapters' activations from
            them (``torch.utils.checkpoint`` per block), instead of keeping the (B, N, m) hidden activations
            (twice per adapter) and the low-rank intermediates. The default: the taps must be kept anyway (the
            down-projections' weight gradients read them), so this halves what E3VA keeps on Swin (Swin-T,
            batch 8: 211 -> 105 MiB) for one more forward of the adapters. Under autocast the taps are kept in
            the autocast dtype, which is the precision the adapters' first product reads them in. Results are
            identical either way. Where E3VA adapts the prefix tokens only (a class-token ViT classifier), there
            is nothing worth recomputing (ViT-B: 2.9 MiB kept in all) and the adapters keep their activations.
        input_norm: a trainable LayerNorm on each adapter's input, ``A(LN(x))`` (LN starting at weight 1, bias 0).
            A departure from the paper, whose adapters read the branch outputs as they are (sec. 3.3, eq. 5); see
            docs/methods.md for why one would, and what it did.
        probe_blocks: the classification head also reads the multi-layer probe's features of the last
            ``probe_blocks`` blocks (each block's class and mean patch token, standardised per token; see
            ``probe``), concatenated after the method's own pooled feature. 0 (default): the paper's head.
            Not the paper's; docs/methods.md gives the reason and the evidence.
    """

    alpha: int = 8
    branches: int = 2
    bottleneck_ratio: float = 0.5
    bottleneck: int | None = None
    dropout: float = 0.0
    out_stages: tuple[int, ...] | None = None
    copy_final_norm: bool = True
    recompute: bool = True
    input_norm: bool = False
    probe_blocks: int = 0

    def __post_init__(self) -> None:
        require_positive_int("alpha", self.alpha, "E3VA")
        require_non_negative_int("probe_blocks", self.probe_blocks, "E3VA")
        require_positive_int("branches", self.branches, "E3VA")
        require_positive("bottleneck_ratio", self.bottleneck_ratio, "E3VA")
        if self.bottleneck is not None:
            require_positive_int("bottleneck", self.bottleneck, "E3VA")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"E3VA: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.out_stages is not None:
            self.out_stages = tuple(int(s) for s in self.out_stages)

    def width(self, channels: int) -> int:
        return self.bottleneck or max(1, round(channels * self.bottleneck_ratio))


class DualLowRankLinear(nn.Module):
    """A linear layer whose weight is a sum of low-rank products: ``W = sum_k s_k t_k`` (eqs. 6-7).

    Args:
        in_features: n.
        out_features: m.
        alpha: rank of each product.
        branches: number of products (2 in the paper).
        zero_init: start with ``W = 0`` (``s_k = 0``) and zero bias: used for the up-projection.

    Shapes: (..., n) -> (..., m). Parameters: ``branches * alpha * (m + n) + m``.
    """

    def __init__(self, in_features: int, out_features: int, alpha: int, branches: int = 2, zero_init: bool = False):
        super().__init__()
        self.s = nn.Parameter(torch.empty(branches, out_features, alpha))
        self.t = nn.Parameter(torch.empty(branches, alpha, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        # Var(W_ij) = branches * alpha * Var(s) * Var(t) = 1 / n: the scale of a default linear layer.
        nn.init.normal_(self.t, std=1.0 / math.sqrt(in_features))
        if zero_init:
            nn.init.zeros_(self.s)
        else:
            nn.init.normal_(self.s, std=1.0 / math.sqrt(branches * alpha))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, T)`` with ``W = S T``: S = [s_1 .. s_K] is (m, K alpha), T = [t_1; ..; t_K] is (K alpha, n)."""
        k, m, a = self.s.shape
        return self.s.permute(1, 0, 2).reshape(m, k * a), self.t.reshape(k * a, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sum_k s_k (t_k x) == [s_1 .. s_K] [t_1; ..; t_K] x: one rank-(K alpha) product, two small matmuls.
        s, t = self.factors()
        return F.linear(F.linear(x, t), s, self.bias)


class E3VAAdapter(nn.Module):
    """``up(GELU(down(x)))`` with dual low-rank projections (fig. 4, right). (B, N, C) -> (B, N, C).

    With ``input_norm`` (not the paper's), ``up(GELU(down(LN(x))))``.

    The highway never asks an adapter for its output: :meth:`inner` returns the up-projection's low-rank input
    ``z = T_up GELU(down(x))``, (B, N, K alpha), and E3VA applies ``S_up`` and the bias of both adapters of a block
    in one product (see :meth:`E3VA.block_update`). ``forward`` is the adapter as the paper writes it.
    """

    def __init__(
        self, channels: int, width: int, alpha: int, branches: int, dropout: float, input_norm: bool = False
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels) if input_norm else nn.Identity()
        self.down = DualLowRankLinear(channels, width, alpha, branches)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = DualLowRankLinear(width, channels, alpha, branches, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(self.norm(x)))))

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """``z = T_up drop(GELU(S_down T_down x + b_down))``: (B, N, C) -> (B, N, K alpha), the adapter without its
        last factor ``S_up`` and bias."""
        s_down, t_down = self.down.factors()
        hidden = self.drop(self.act(F.linear(F.linear(self.norm(x), t_down), s_down, self.down.bias)))  # (B, N, m)
        return F.linear(hidden, self.up.factors()[1])


class E3VA(SideMethod):
    """The E3VA side network on a frozen ViT or Swin.

    Its pyramid is ``norm_s(l_s + delta_s)`` for each of ``out_stages`` (the paper's FPN input, fig. 2),
    already normalised by E3VA's own trainable norms.

    On a ViT whose classifier reads the class token, the adapters (token-wise) and the stage norm can only
    change the pooled feature through the prefix tokens: for classification E3VA then computes the highway
    on the prefix tokens alone, with identical results and a fraction of the memory.

    Args:
        backbone: the frozen backbone.
        config: sizes and options.
        task: ``classification`` or a dense task.
    """

    def __init__(self, backbone: FrozenBackbone, config: E3VAConfig, task: str = "classification") -> None:
        super().__init__(backbone)
        self.config = config
        layout = self.layout
        n = layout.num_blocks
        out_stages = config.out_stages if config.out_stages is not None else tuple(range(layout.num_stages))
        bad = [s for s in out_stages if not 0 <= s < layout.num_stages]
        if bad:
            raise ConfigError(f"E3VA: out_stages {bad} out of range for a backbone with {layout.num_stages} stages.")
        self.out_stages = tuple(sorted(set(out_stages)))
        self.last_stage = max(self.out_stages)
        self.pyramid_stages = self.out_stages
        self.pyramid_normalized = True
        timm_model = backbone.model
        token_pooled = getattr(timm_model, "global_pool", None) == "token" and not getattr(
            timm_model, "attn_pool", None
        )
        single_stage = layout.num_stages == 1 and layout.num_prefix_tokens > 0
        # Number of leading tokens the output depends on (None: all of them).
        self.prefix_only = (
            layout.num_prefix_tokens if task == "classification" and token_pooled and single_stage else None
        )
        # Blocks after the last stage that is read cannot influence the output: leave them out.
        blocks = [i for i in range(n) if layout.block_stage[i] <= self.last_stage]
        stage_ends = [max(layout.stage_blocks(s)) for s in range(self.last_stage + 1)]
        self.tap_request = TapRequest.of(attn=blocks, mlp=blocks, out=stage_ends)

        def adapter(block: int) -> E3VAAdapter:
            c = layout.stage_dims[layout.block_stage[block]]
            return E3VAAdapter(c, config.width(c), config.alpha, config.branches, config.dropout, config.input_norm)

        self.attn_adapters = nn.ModuleList(adapter(i) for i in blocks)
        self.mlp_adapters = nn.ModuleList(adapter(i) for i in blocks)
        self.norms = nn.ModuleDict({str(s): nn.LayerNorm(layout.stage_dims[s]) for s in self.out_stages})
        final_norm = backbone.final_norm
        last = layout.num_stages - 1
        if config.copy_final_norm and final_norm is not None and last in self.out_stages:
            self.norms[str(last)] = copy.deepcopy(final_norm).requires_grad_(True)
        own_pool = self.last_stage == layout.num_stages - 1  # else the last produced stage's tokens, averaged
        self.declare_pooled(config.probe_blocks, task, "E3VA", None if own_pool else self.last_stage)

    def tap_tokens(self) -> int | None:
        return self.prefix_only

    def block_update(self, i: int, attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
        """``A1(attn) + A2(mlp)``: the highway increment of block ``i``, the two parallel adapters summed (eq. 11).

        Both adapters end in a low-rank product plus a bias, ``S_1 z_1 + b_1 + S_2 z_2 + b_2``, computed as the one
        product ``[S_1 S_2 b_1+b_2] [z_1; z_2; 1]``: the (B, N, C) increment is written once, instead of each
        adapter's output being written and then read again by their sum (and again in backward).

        Shapes: attn, mlp (B, N, C) -> (B, N, C).
        """
        a1, a2 = self.attn_adapters[i], self.mlp_adapters[i]
        z1, z2 = a1.inner(attn), a2.inner(mlp)
        z = torch.cat([z1, z2, z1.new_ones(*z1.shape[:-1], 1)], -1)  # (B, N, 2 K alpha + 1)
        s = torch.cat([a1.up.factors()[0], a2.up.factors()[0], (a1.up.bias + a2.up.bias)[:, None]], 1)
        return F.linear(z, s)

    def stage_features(self, taps: Taps) -> dict[int, torch.Tensor]:
        """Adapted stage outputs ``norm_s(l_s + delta_s)``, as (B, N, C), for each of ``out_stages``."""
        layout = self.layout
        if self.prefix_only:  # a copy, so the full taps are not kept alive for backward through a view
            k = self.prefix_only
            taps = Taps(
                attn={i: t[:, :k].clone() for i, t in taps.attn.items()},
                mlp={i: t[:, :k].clone() for i, t in taps.mlp.items()},
                out={i: t[:, :k].clone() for i, t in taps.out.items()},
                final=taps.final,
                layout=layout,
            )
        delta: torch.Tensor | None = None
        outputs: dict[int, torch.Tensor] = {}
        for stage in range(self.last_stage + 1):
            if stage > 0 and delta is not None:
                prev_end = max(layout.stage_blocks(stage - 1))
                downsample = layout.stage_downsample[stage]
                if downsample is None:
                    raise ConfigError("E3VA: a stage boundary without a downsampling module cannot carry the highway.")
                delta = carry_across_stage(delta, taps.out[prev_end], downsample, layout.stage_grids[stage - 1])
            for i in layout.stage_blocks(stage):
                # prefix tokens only (a class-token ViT): a few KiB per block, nothing worth recomputing
                if self.config.recompute and not self.prefix_only and torch.is_grad_enabled():
                    attn, mlp = taps.attn[i], taps.mlp[i]
                    if not self.config.input_norm:  # the first op reading a tap is then the autocast product
                        attn, mlp = _autocast_input(attn), _autocast_input(mlp)
                    update = checkpoint(self.block_update, i, attn, mlp, use_reentrant=False)
                else:
                    update = self.block_update(i, taps.attn[i], taps.mlp[i])
                delta = update if delta is None else delta + update
            if stage in self.out_stages:
                base = taps.out[max(layout.stage_blocks(stage))]
                outputs[stage] = self.norms[str(stage)](base + delta)
        return outputs

    def forward_taps(self, taps: Taps) -> Features:
        layout = self.layout
        outs = self.stage_features(taps)
        last = outs[self.last_stage]
        pooled = self.backbone.pool(to_final_format(last, layout)) if self.last_stage == layout.num_stages - 1 else None
        if pooled is None:  # a truncated highway: average the last produced stage's patch tokens
            pooled = last[:, layout.num_prefix_tokens if self.last_stage == 0 else 0 :].mean(1)
        pooled = self.read_out(taps, pooled)
        if self.prefix_only:  # only the prefix tokens were adapted: no token map to offer
            return Features(pooled=pooled, tokens=last)
        pyramid = [to_map(outs[s], layout, s) for s in self.out_stages]
        return Features(
            pooled=pooled,
            tokens=last,
            pyramid=pyramid,
            strides=[layout.stage_strides[s] for s in self.out_stages],
        )


def _autocast_input(tap: torch.Tensor) -> torch.Tensor:
    """A tap in the dtype that autocast gives the matrix product reading it (unchanged without autocast).

    The checkpoint keeps its inputs for backward: a float32 tap (a ViT's branch output after a float32
    layer-scale, under bfloat16 autocast) would be kept in float32 although the adapter's first product only ever
    reads its bfloat16 cast. Casting first keeps half the bytes and gives the same numbers.
    """
    device = tap.device.type
    if not torch.is_autocast_enabled(device) or not tap.is_floating_point():
        return tap
    return tap.to(torch.get_autocast_dtype(device))


def _build(backbone: FrozenBackbone, config: E3VAConfig, task: str) -> E3VA:
    if config.out_stages is None:
        last = backbone.layout.num_stages - 1
        config.out_stages = (last,) if task == "classification" else tuple(range(last + 1))
    return E3VA(backbone, config, task)


_WHY_NOT = {"cnn": "E3VA adapts the attention- and MLP-branch outputs of transformer blocks, which CNNs do not have"}
SPECS = [
    MethodSpec(
        name=name,
        description=desc,
        kind="side",
        config_cls=E3VAConfig,
        build=_build,
        families=("vit", "swin"),
        defaults={"alpha": alpha},
        why_not=_WHY_NOT,
    )
    for name, alpha, desc in (
        ("e3va", 8, "E3VA: parallel dual low-rank adapters on a gradient highway beside the frozen backbone"),
        ("e3va+", 16, "E3VA+: E3VA with alpha=16 (paper table 1: 2.35M on Swin-B)"),
        ("e3va++", 32, "E3VA++: E3VA with alpha=32 (paper table 1: 4.66M on Swin-B)"),
    )
]
