"""E3VA and LoSA: gradient isolation, initialisation, and faithfulness to the papers' equations.

The reference computations here are written independently of the implementation, from the equations.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sidetune
from sidetune.backbones import TapRequest
from sidetune.side import DualLowRankLinear, LowRankMixer, LowRankTokenMixer
from sidetune.side.losa import LoSAConfig

from conftest import TINY_BACKBONES, TRANSFORMERS, images, tiny

SIDE_METHODS = ("linear", "losa", "e3va", "e3va+", "e3va++", "lst")


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every trainable parameter a random value, so zero-initialised paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# --- gradient isolation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", TRANSFORMERS)
@pytest.mark.parametrize("method", SIDE_METHODS)
def test_no_gradient_enters_the_backbone(key: str, method: str) -> None:
    model = tiny(key, method)
    backbone_params = list(model.backbone.parameters())
    assert backbone_params and not any(p.requires_grad for p in backbone_params)
    grad_modes = []
    first_block = model.backbone.blocks[0].module
    first_block.register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))

    loss = F.cross_entropy(model(images(key, 3)), torch.tensor([0, 1, 2]))
    loss.backward()

    assert grad_modes == [False], "the backbone's forward must run with grad mode off"
    assert all(p.grad is None for p in backbone_params)
    trainable = model.named_trainable_parameters()
    assert trainable and all(p.grad is not None for _, p in trainable)
    assert model.head.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("key", ["vit_reg", "swin"])
@pytest.mark.parametrize("method", ["losa", "e3va"])
def test_backbone_weights_bit_identical_after_optimizer_steps(key: str, method: str) -> None:
    model = tiny(key, method)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    side_before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        loss = F.cross_entropy(model(images(key, 4, seed=step)), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [n for n, p in model.named_trainable_parameters() if not torch.equal(p, side_before[n])]
    assert len(changed) == len(side_before), "every side parameter should have moved"


def test_frozen_backbone_stays_in_eval_mode() -> None:
    model = tiny("vit", "losa")
    model.train()
    assert model.method.training and model.head.training
    assert not any(m.training for m in model.backbone.model.modules())


# --- taps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", TRANSFORMERS)
def test_taps_are_the_branches_of_the_residual_stream(key: str) -> None:
    """out[i] = out[i-1] + attn[i] + mlp[i]: the hooked tensors are the real branch outputs."""
    model = tiny(key, "linear")
    layout = model.backbone.layout
    n = layout.num_blocks
    taps = model.backbone(images(key, 2), TapRequest.of(range(n), range(n), range(n)))
    assert sorted(taps.attn) == sorted(taps.mlp) == sorted(taps.out) == list(range(n))
    for i in range(1, n):
        if layout.block_stage[i] != layout.block_stage[i - 1]:
            continue  # a downsampling layer sits between these two blocks
        torch.testing.assert_close(taps.out[i], taps.out[i - 1] + taps.attn[i] + taps.mlp[i], rtol=1e-5, atol=1e-5)


def test_taps_hold_only_what_is_requested() -> None:
    model = tiny("vit", "linear")
    taps = model.backbone(images("vit", 1), TapRequest.of(attn=[2], out=[5]))
    assert list(taps.attn) == [2] and taps.mlp == {} and list(taps.out) == [5]


@pytest.mark.parametrize("key", list(TINY_BACKBONES))
def test_tap_shapes_and_layout_for_batch_size_one(key: str) -> None:
    model = tiny(key, "linear")
    layout = model.backbone.layout
    _, _, size = TINY_BACKBONES[key]
    n = layout.num_blocks
    request = TapRequest.of(out=range(n)) if layout.family == "cnn" else TapRequest.of(range(n), range(n), range(n))
    taps = model.backbone(images(key, 1), request)
    for i in range(n):
        stage = layout.block_stage[i]
        expected = (1, layout.num_tokens(stage), layout.stage_dims[stage])
        assert tuple(taps.out[i].shape) == expected
        if layout.family != "cnn":
            assert tuple(taps.attn[i].shape) == expected == tuple(taps.mlp[i].shape)
    grid = layout.stage_grids[-1]
    assert size // layout.stage_strides[-1] == grid[0]
    assert model(images(key, 1)).shape == (1, 5)


def test_prefix_tokens_class_and_registers() -> None:
    layouts = {key: tiny(key, "linear").backbone.layout for key in ("vit", "vit_reg", "dinov2_reg", "swin")}
    assert layouts["vit"].num_prefix_tokens == 1  # class token
    assert layouts["vit_reg"].num_prefix_tokens == 1  # one register token, no class token
    assert layouts["dinov2_reg"].num_prefix_tokens == 5  # class + 4 registers
    assert layouts["dinov2_reg"].num_tokens(0) == 5 + 4 * 4
    assert layouts["swin"].num_prefix_tokens == 0
    assert layouts["swin"].stage_dims == (16, 32, 64, 128)


# --- E3VA ---------------------------------------------------------------------------------------------


def test_dual_low_rank_linear_is_the_sum_of_two_low_rank_products() -> None:
    torch.manual_seed(0)
    layer = DualLowRankLinear(12, 6, alpha=3, branches=2)
    with torch.no_grad():
        layer.bias.normal_()
    (s1, s2), (t1, t2) = layer.s, layer.t
    weight = s1 @ t1 + s2 @ t2  # eqs. 6-7
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias))
    assert sum(p.numel() for p in layer.parameters()) == 2 * 3 * (12 + 6) + 6


def test_e3va_up_projection_starts_at_zero_and_down_does_not() -> None:
    model = tiny("swin", "e3va")
    for adapter in [*model.method.attn_adapters, *model.method.mlp_adapters]:
        assert torch.count_nonzero(adapter.up.s) == 0 and torch.count_nonzero(adapter.up.bias) == 0
        assert torch.count_nonzero(adapter.up.t) > 0 and torch.count_nonzero(adapter.down.s) > 0


@pytest.mark.parametrize("key", ["vit", "dinov2_reg", "swin"])
def test_e3va_highway_adds_exactly_zero_at_initialisation(key: str) -> None:
    stages = 4 if key == "swin" else 1
    model = tiny(key, "e3va", out_stages=tuple(range(stages)), copy_final_norm=False)
    e3va = model.method
    layout = model.backbone.layout
    x = images(key, 2)
    taps = model.backbone(x, e3va.tap_request)
    stages = e3va.stage_features(taps)
    assert sorted(stages) == list(range(layout.num_stages))
    for s, feat in stages.items():
        frozen = taps.out[max(layout.stage_blocks(s))][:, : e3va.prefix_only]  # all tokens when None
        assert torch.equal(feat, e3va.norms[str(s)](frozen))


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_e3va_starts_as_the_frozen_models_pooled_features(key: str) -> None:
    model = tiny(key, "e3va")  # last output norm copied from the backbone's final norm
    x = images(key, 2)
    frozen_pooled = model.backbone.pool(model.backbone(x).final)
    assert torch.equal(model.features(x).pooled, frozen_pooled)


def test_swin_highway_uses_the_backbones_own_patch_merging() -> None:
    model = tiny("swin", "e3va")
    swin = model.backbone.model
    downsample = model.backbone.layout.stage_downsample
    assert downsample[0] is None
    for s in (1, 2, 3):
        assert downsample[s] is swin.layers[s].downsample
    trainable = {id(p) for p in model.trainable_parameters()}
    merging = [p for s in (1, 2, 3) for p in swin.layers[s].downsample.parameters()]
    assert merging and not any(p.requires_grad or id(p) in trainable for p in merging)
    calls: dict[str, list[bool]] = {"norm": [], "reduction": []}
    merging = swin.layers[2].downsample
    for name in calls:
        getattr(merging, name).register_forward_hook(lambda m, a, o, n=name: calls[n].append(torch.is_grad_enabled()))
    model(images("swin", 1)).sum().backward()
    # the backbone once (no grad); the highway: LN(M(l)) without grad, LN(M(l + delta)) with grad, and the
    # reduction once, with grad, on their difference: W (LN(M(l + delta)) - LN(M(l))) = D(l + delta) - D(l)
    assert sorted(calls["norm"]) == [False, False, True]
    assert sorted(calls["reduction"]) == [False, True]


def test_e3va_matches_the_papers_highway_with_adapter_skip_connections() -> None:
    """Eq. 11 with eq. 5's skip connections: e[i+1] = e[i] + f_A1(attn[i]) + f_A2(mlp[i]), f_A(x) = A(x) + x,
    starting from the stage input and passing e itself through the inherited patch merging. The adapted
    stage feature is then e; sidetune computes it as l + delta."""
    model = tiny("swin", "e3va", out_stages=(0, 1, 2, 3), copy_final_norm=False)
    _perturb(model.method)
    e3va, layout, swin = model.method, model.backbone.layout, model.backbone.model
    stage_inputs = {}
    for s, stage in enumerate(swin.layers):
        stage.blocks.register_forward_pre_hook(lambda m, a, s=s: stage_inputs.__setitem__(s, a[0].flatten(1, 2)))
    x = images("swin", 2)
    n = layout.num_blocks
    with torch.no_grad():
        taps = model.backbone(x, TapRequest.of(range(n), range(n), range(n)))
        e = stage_inputs[0]
        reference = {}
        for s in range(layout.num_stages):
            if s > 0:
                h, w = layout.stage_grids[s - 1]
                e = swin.layers[s].downsample(e.reshape(e.shape[0], h, w, -1)).flatten(1, 2)
            for i in layout.stage_blocks(s):
                e = e + (e3va.attn_adapters[i](taps.attn[i]) + taps.attn[i])
                e = e + (e3va.mlp_adapters[i](taps.mlp[i]) + taps.mlp[i])
            reference[s] = e3va.norms[str(s)](e)
        ours = e3va.stage_features(taps)
    for s in range(layout.num_stages):
        torch.testing.assert_close(ours[s], reference[s], rtol=1e-4, atol=1e-4)


def test_e3va_presets_differ_only_in_alpha() -> None:
    configs = {m: tiny("vit", m).method.config for m in ("e3va", "e3va+", "e3va++")}
    assert [c.alpha for c in configs.values()] == [8, 16, 32]
    assert len({(c.branches, c.bottleneck_ratio, c.dropout) for c in configs.values()}) == 1


# --- LoSA ---------------------------------------------------------------------------------------------


def _mlp(x: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, mlp.down.weight, mlp.down.bias)), mlp.up.weight, mlp.up.bias)


def test_low_rank_mixer_is_token_then_channel_mixing_with_residuals() -> None:
    torch.manual_seed(0)
    mixer = LowRankMixer(8, (6,), LoSAConfig(channel_rank=3, token_rank=2))
    _perturb(mixer)
    x = torch.randn(2, 6, 8)
    ln_t, ln_c = mixer.token_mixing.norms[0], mixer.channel_norm
    y = x + _mlp(ln_t(x).transpose(1, 2), mixer.token_mixing.mlps[0]).transpose(1, 2)  # N -> r_t -> N
    y = y + _mlp(ln_c(y), mixer.channel_mixing)  # C -> r -> C
    torch.testing.assert_close(mixer(x), y - x)


def test_token_mixer_factorises_space_then_time() -> None:
    torch.manual_seed(0)
    t, s, c = 3, 4, 5
    mixer = LowRankTokenMixer(c, (t, s), rank=2)
    _perturb(mixer)
    x = torch.randn(2, t * s, c)
    space_mlp, time_mlp = mixer.mlps
    ln_s, ln_t = mixer.norms
    v = x.reshape(2, t, s, c)
    frames = [v[:, k] + _mlp(ln_s(v[:, k]).transpose(1, 2), space_mlp).transpose(1, 2) for k in range(t)]
    v = torch.stack(frames, 1)  # mixed over the S tokens of each frame
    cols = [v[:, :, j] + _mlp(ln_t(v[:, :, j]).transpose(1, 2), time_mlp).transpose(1, 2) for j in range(s)]
    v = torch.stack(cols, 2)  # then over the T frames at each position
    torch.testing.assert_close(mixer(x), v.reshape(2, t * s, c))
    assert [m.down.in_features for m in mixer.mlps] == [s, t]


@pytest.mark.parametrize("token_shape", [(6,), (2, 3)])
def test_low_rank_mixer_keeps_the_refinement_in_the_inputs_precision_under_autocast(token_shape) -> None:
    """Under bf16 autocast only the mixing products run in 16 bits: the refinement, and with it LoSA's side
    state ``a`` summed over the blocks, stays float32 as ``(x + deltas) - x`` kept it."""
    torch.manual_seed(0)
    mixer = LowRankMixer(8, token_shape, LoSAConfig(channel_rank=3, token_rank=2))
    _perturb(mixer)
    x = torch.randn(2, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mixer(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_losa_follows_the_refinement_recursion(key: str) -> None:
    """a[0] = 0, a[l] = a[l-1] + g_l(b[l] + a[l-1]); the head reads b[L] + a[L] (crossing stages through
    the backbone's own downsampling as D(b + a) - D(b))."""
    model = tiny(key, "losa")
    _perturb(model.method)
    losa, layout = model.method, model.backbone.layout
    x = images(key, 2)
    n = layout.num_blocks
    with torch.no_grad():
        taps = model.backbone(x, TapRequest.of(out=range(n)))
        a = torch.zeros_like(taps.out[0])
        for i in range(n):
            if i > 0 and layout.block_stage[i] != layout.block_stage[i - 1]:
                h, w = layout.stage_grids[layout.block_stage[i - 1]]
                down = layout.stage_downsample[layout.block_stage[i]]
                b = taps.out[i - 1].reshape(2, h, w, -1)
                a = (down(b + a.reshape(b.shape)) - down(b)).flatten(1, 2)
            a = a + losa.mixers[str(i)](taps.out[i] + a)
        expected = losa.out_norm(taps.out[n - 1] + a)
        torch.testing.assert_close(losa(x).tokens, expected, rtol=1e-5, atol=1e-5)


def test_losa_starts_as_the_frozen_model() -> None:
    model = tiny("vit", "losa")
    x = images("vit", 2)
    assert torch.equal(model.features(x).pooled, model.backbone.pool(model.backbone(x).final))


def test_losa_taps_only_chosen_blocks() -> None:
    model = tiny("vit", "losa", blocks=(1, 3))
    assert sorted(model.method.mixers) == ["1", "3"]
    assert model.method.tap_request.out == frozenset({1, 3}) and not model.method.tap_request.attn
    assert model(images("vit", 1)).shape == (1, 5)


def test_token_mixer_rejects_another_token_count_naming_both() -> None:
    mixer = LowRankTokenMixer(8, (17,), rank=2, size_hint="(64x64 images: 4x4 grid + 1 prefix tokens)")
    with pytest.raises(sidetune.ConfigError, match=r"built for 17 tokens \(64x64.*got 65"):
        mixer(torch.randn(1, 65, 8))


def test_wrong_image_size_names_both_sizes() -> None:
    model = tiny("vit", "losa")
    with pytest.raises(sidetune.ConfigError, match=r"built for 64x64 images but got 32x32.*img_size=32"):
        model(torch.randn(1, 3, 32, 32))


def test_e3va_dense_outputs_all_stages_with_strides() -> None:
    model = tiny("swin", "e3va", out_stages=(0, 1, 2, 3))
    feats = model.features(images("swin", 2))
    assert feats.strides == [4, 8, 16, 32]
    assert [tuple(p.shape) for p in feats.pyramid] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert math.isfinite(feats.pooled.sum().item())


@pytest.mark.parametrize("key", ["vit", "dinov2_reg"])
def test_e3va_on_a_class_token_vit_adapts_only_the_prefix_tokens_with_identical_results(key: str) -> None:
    from sidetune.bench import saved_tensor_bytes
    from sidetune.side import E3VA

    model = tiny(key, "e3va", recompute=False)  # both keep their activations: the slicing alone is compared
    _perturb(model.method)
    e3va = model.method
    assert e3va.prefix_only == model.backbone.layout.num_prefix_tokens
    all_tokens = E3VA(model.backbone, e3va.config, task="segmentation")  # same config, every token adapted
    all_tokens.load_state_dict(e3va.state_dict())
    assert all_tokens.prefix_only is None
    x = images(key, 3)
    torch.testing.assert_close(e3va(x).pooled, all_tokens(x).pooled, rtol=1e-5, atol=1e-6)
    sliced = saved_tensor_bytes(lambda: e3va(x).pooled.sum(), module=e3va).activation_bytes
    full = saved_tensor_bytes(lambda: all_tokens(x).pooled.sum(), module=all_tokens).activation_bytes
    assert sliced * 3 < full


def test_e3va_adapts_every_token_when_the_pool_reads_them() -> None:
    assert tiny("vit_reg", "e3va").method.prefix_only is None  # average pooling reads the patch tokens
    assert tiny("swin", "e3va").method.prefix_only is None


@pytest.mark.parametrize("method", ["losa", "e3va"])
def test_recompute_gives_identical_gradients_and_keeps_fewer_activations(method: str) -> None:
    from sidetune.bench import saved_tensor_bytes

    plain, recomputed = tiny("swin", method, seed=4, recompute=False), tiny("swin", method, seed=4)  # default: True
    _perturb(plain.method)
    recomputed.load_state_dict(plain.state_dict())
    x = images("swin", 2)
    for model in (plain, recomputed):
        model(x).logsumexp(-1).sum().backward()
    pairs = zip(plain.named_trainable_parameters(), recomputed.named_trainable_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    kept = {
        label: saved_tensor_bytes(lambda m=m: m(x).sum(), module=m).activation_bytes
        for label, m in (("plain", plain), ("recompute", recomputed))
    }
    assert kept["recompute"] < 0.75 * kept["plain"]
