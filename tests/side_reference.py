"""The side networks as they were computed before their memory and time work (git aa05442), kept as references.

Issue 17 changed how LoSA and E3VA compute (batched token mixing, partial recompute, one product per E3VA block,
one patch-merging product per stage boundary) but not what they compute. These functions are the former code,
op for op, reading the same modules' parameters, so that tests can check that outputs and gradients of the new
defaults equal the former ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidetune.backbones import Taps
from sidetune.side.base import to_final_format


def old_carry(delta: torch.Tensor, base: torch.Tensor, downsample, grid: tuple[int, int]) -> torch.Tensor:
    """``D(base + delta) - D(base)``, the backbone's downsampling run twice."""
    b, _, c = base.shape
    h, w = grid
    with torch.no_grad():
        frozen_next = downsample(base.reshape(b, h, w, c))
    adapted_next = downsample((base + delta).reshape(b, h, w, c))
    return (adapted_next - frozen_next).flatten(1, 2)


def _old_rows(mlp, x: torch.Tensor) -> torch.Tensor:
    h = torch.matmul(mlp.down.weight, x)
    h = mlp.drop(mlp.act(h + mlp.down.bias.to(h.dtype)[:, None]))
    y = torch.matmul(mlp.up.weight, h)
    return y + mlp.up.bias.to(y.dtype)[:, None]


def old_losa_mixer(mixer, x: torch.Tensor) -> torch.Tensor:
    """``g(x)``: token mixing (``torch.matmul`` with the weight on the left), then channel mixing."""
    tm = mixer.token_mixing
    b, n, c = x.shape
    grid = x.reshape(b, *tm.token_shape, c)
    delta = None
    axes = len(tm.token_shape)
    for k, (mlp, norm) in enumerate(zip(tm.mlps, tm.norms, strict=True)):
        axis = axes - k
        mixed = _old_rows(mlp, norm(grid).movedim(axis, -2)).movedim(-2, axis)
        grid = grid + mixed
        delta = mixed.to(x.dtype) if delta is None else delta + mixed
    y = grid.reshape(b, n, c)
    return delta.reshape(b, n, c) + mixer.channel_mixing(mixer.channel_norm(y))


def old_losa_pooled(losa, taps: Taps) -> torch.Tensor:
    """LoSA's pooled classification features as computed before (no recompute)."""
    layout = losa.layout
    a = None
    stage = 0
    for i in losa.blocks:
        s = layout.block_stage[i]
        while stage < s:
            end = max(layout.stage_blocks(stage))
            if a is not None:
                a = old_carry(a, taps.out[end], layout.stage_downsample[stage + 1], layout.stage_grids[stage])
            stage += 1
        b = taps.out[i]
        x = b if a is None else b + a
        refinement = old_losa_mixer(losa.mixers[str(i)], x)
        a = refinement if a is None else a + refinement
    tokens = losa.out_norm(taps.out[losa.last_block] + a)
    return losa.backbone.pool(to_final_format(tokens, layout))


def _old_dual(layer, x: torch.Tensor) -> torch.Tensor:
    k, m, a = layer.s.shape
    t = layer.t.reshape(k * a, -1)
    s = layer.s.permute(1, 0, 2).reshape(m, k * a)
    return F.linear(F.linear(x, t), s, layer.bias)


def old_e3va_adapter(adapter, x: torch.Tensor) -> torch.Tensor:
    return _old_dual(adapter.up, adapter.drop(adapter.act(_old_dual(adapter.down, x))))


def old_e3va_stage_features(e3va, taps: Taps) -> dict[int, torch.Tensor]:
    """E3VA's adapted stage outputs as computed before: each adapter applied and summed on its own."""
    layout = e3va.layout
    if e3va.prefix_only:
        k = e3va.prefix_only
        taps = Taps(
            attn={i: t[:, :k].clone() for i, t in taps.attn.items()},
            mlp={i: t[:, :k].clone() for i, t in taps.mlp.items()},
            out={i: t[:, :k].clone() for i, t in taps.out.items()},
            final=taps.final,
            layout=layout,
        )
    delta = None
    outputs = {}
    for stage in range(e3va.last_stage + 1):
        if stage > 0 and delta is not None:
            prev_end = max(layout.stage_blocks(stage - 1))
            downsample = layout.stage_downsample[stage]
            delta = old_carry(delta, taps.out[prev_end], downsample, layout.stage_grids[stage - 1])
        for i in layout.stage_blocks(stage):
            update = old_e3va_adapter(e3va.attn_adapters[i], taps.attn[i]) + old_e3va_adapter(
                e3va.mlp_adapters[i], taps.mlp[i]
            )
            delta = update if delta is None else delta + update
        if stage in e3va.out_stages:
            base = taps.out[max(layout.stage_blocks(stage))]
            outputs[stage] = e3va.norms[str(stage)](base + delta)
    return outputs


def old_e3va_pooled(e3va, taps: Taps) -> torch.Tensor:
    """E3VA's pooled classification features as computed before."""
    layout = e3va.layout
    last = old_e3va_stage_features(e3va, taps)[e3va.last_stage]
    return e3va.backbone.pool(to_final_format(last, layout))
