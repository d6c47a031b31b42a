"""Options that depart from the papers' text (issue 14): how LoSA's mixers read the backbone, E3VA's input norm.

Each is off by default; each is checked against a literal computation of what docs/methods.md says it does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sidetune
from sidetune.backbones import TapRequest
from sidetune.bench import saved_tensor_bytes
from sidetune.side.losa import LoSAConfig
from test_probe import _reference as _probe_reference
from test_side_methods import _perturb

from conftest import images, tiny


def _losa_reference(model, x: torch.Tensor, read) -> torch.Tensor:
    """a[l] = a[l-1] + g_l(read_l(b[l]) + a[l-1]); the head's tokens out_norm(b[L] + a[L]) (Swin: carried through
    the backbone's patch merging as D(b + a) - D(b))."""
    losa, layout = model.method, model.backbone.layout
    n = layout.num_blocks
    with torch.no_grad():
        taps = model.backbone(x, TapRequest.of(out=range(n)))
    a = torch.zeros_like(taps.out[0])
    for i in range(n):
        if i > 0 and layout.block_stage[i] != layout.block_stage[i - 1]:
            h, w = layout.stage_grids[layout.block_stage[i - 1]]
            down = layout.stage_downsample[layout.block_stage[i]]
            b = taps.out[i - 1].reshape(x.shape[0], h, w, -1)
            a = (down(b + a.reshape(b.shape)) - down(b)).flatten(1, 2)
        a = a + losa.mixers[str(i)](read(i, taps.out[i]) + a)
    return losa.out_norm(taps.out[n - 1] + a)


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_losa_read_norm_mixes_the_normalised_block_output_plus_the_state(key: str) -> None:
    model = tiny(key, "losa", read="norm")
    _perturb(model.method)
    x = images(key, 2)

    def read(i: int, b: torch.Tensor) -> torch.Tensor:
        return (b - b.mean(-1, keepdim=True)) / torch.sqrt(b.var(-1, unbiased=False, keepdim=True) + 1e-5)

    with torch.no_grad():
        torch.testing.assert_close(model.method(x).tokens, _losa_reference(model, x, read), rtol=1e-5, atol=1e-5)
    assert not any("gains" in n for n, _ in model.named_trainable_parameters())  # a norm without parameters


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_losa_read_gain_scales_each_block_output_by_its_own_learnable_gain(key: str) -> None:
    plain, gain = tiny(key, "losa", seed=3), tiny(key, "losa", seed=3, read="gain")
    _perturb(plain.method)
    gain.load_state_dict(plain.state_dict(), strict=False)
    blocks = gain.method.blocks
    assert sorted(gain.method.gains) == sorted(str(i) for i in blocks)
    assert gain.num_parameters() == plain.num_parameters() + len(blocks)
    x = images(key, 2)
    with torch.no_grad():  # every gain starts at 1: the default reading
        torch.testing.assert_close(gain.method(x).tokens, plain.method(x).tokens)
        for i, g in enumerate(gain.method.gains.values()):
            g.fill_(0.5 + 0.1 * i)
        gains = {int(k): v for k, v in gain.method.gains.items()}
        expected = _losa_reference(gain, x, lambda i, b: gains[i] * b)
        torch.testing.assert_close(gain.method(x).tokens, expected, rtol=1e-5, atol=1e-5)
    F.cross_entropy(gain(x), torch.tensor([0, 1])).backward()
    assert all(g.grad is not None and g.grad.abs() > 0 for g in gain.method.gains.values())
    # the gains' gradient reads each block's output: it is kept for backward besides the mixer's input
    kept = {m: saved_tensor_bytes(lambda m=m: m(x).sum(), module=m).activation_bytes for m in (plain, gain)}
    assert kept[gain] > kept[plain]


def test_losa_read_names_the_choices() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"unknown LoSA read 'normed'.*Did you mean 'norm'"):
        LoSAConfig(read="normed")
    assert LoSAConfig().read == "sum"


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_e3va_input_norm_normalises_each_adapters_input(key: str) -> None:
    plain, normed = tiny(key, "e3va", seed=2), tiny(key, "e3va", seed=2, input_norm=True)
    adapters = [*normed.method.attn_adapters, *normed.method.mlp_adapters]
    assert all(isinstance(a.norm, torch.nn.LayerNorm) for a in adapters)
    assert normed.num_parameters() - plain.num_parameters() == sum(2 * a.norm.normalized_shape[0] for a in adapters)
    x = images(key, 2)
    with torch.no_grad():  # up-projections at zero: both start as the frozen model
        torch.testing.assert_close(normed.features(x).pooled, plain.features(x).pooled)
    _perturb(normed.method)
    adapter = normed.method.attn_adapters[0]
    t = torch.randn(2, 7, adapter.norm.normalized_shape[0])
    normalised = F.layer_norm(t, t.shape[-1:], adapter.norm.weight, adapter.norm.bias)
    literal = adapter.up(adapter.act(adapter.down(normalised)))
    torch.testing.assert_close(adapter(t), literal)
    # the highway's fused computation reads the normalised taps too, with and without recompute
    keep_all = tiny(key, "e3va", seed=2, input_norm=True, recompute=False)
    keep_all.load_state_dict(normed.state_dict())
    for model in (normed, keep_all):
        model(x).logsumexp(-1).sum().backward()
    pairs = zip(normed.named_trainable_parameters(), keep_all.named_trainable_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert adapter.norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["e3va", "losa", "lst"])
@pytest.mark.parametrize("key", ["vit", "swin"])
def test_probe_blocks_feeds_the_head_the_methods_own_feature_then_the_probes(key: str, method: str) -> None:
    plain, read = tiny(key, method, seed=2), tiny(key, method, seed=2, probe_blocks=2)
    assert read.num_parameters() - plain.num_parameters() == read.method.readout.width * 5  # the head's new columns
    _perturb(plain.method)
    _perturb(read.method)  # the same draws: the two side networks stay equal
    x = images(key, 2)
    n = read.backbone.layout.num_blocks
    with torch.no_grad():
        own, both = plain.features(x).pooled, read.features(x).pooled
    frozen = _probe_reference(read, x, (n - 2, n - 1), class_token=key == "vit")  # Swin has no class token
    width = own.shape[-1]
    assert read.method.pooled_width == width + frozen.shape[-1] == read.head.fc.in_features
    torch.testing.assert_close(both[:, :width], own)
    torch.testing.assert_close(both[:, width:], frozen, rtol=1e-5, atol=1e-5)
    assert read.method.tap_request.out == plain.method.tap_request.out | {n - 2, n - 1}
    grad_modes = []
    read.backbone.blocks[0].module.register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    read(x).logsumexp(-1).sum().backward()
    assert grad_modes == [False] and read.head.fc.weight.grad[:, width:].abs().sum() > 0


def test_probe_blocks_round_trips_and_refuses_what_it_cannot_do(tmp_path) -> None:
    model = tiny("vit", "e3va", probe_blocks=3).eval()
    _perturb(model)
    x = images("vit", 2)
    expected = model(x)
    directory = model.save_adapter(tmp_path / "e3va")
    torch.manual_seed(0)  # the random backbone is rebuilt from the seed it was created with
    loaded = sidetune.load(directory).eval()
    assert loaded.method.readout.blocks == (3, 4, 5)
    torch.testing.assert_close(loaded(x), expected)
    with pytest.raises(sidetune.ConfigError, match=r"probe_blocks=2 feeds the classification head.*segmentation"):
        tiny("swin", "losa", task="segmentation", probe_blocks=2)
    with pytest.raises(sidetune.ConfigError, match=r"probe_blocks must be in 1\.\.6 .* got 7"):
        tiny("vit", "lst", probe_blocks=7)
    with pytest.raises(sidetune.ConfigError, match=r"probe_blocks must be an integer >= 0"):
        tiny("vit", "e3va", probe_blocks=-1)


@pytest.mark.parametrize(("method", "options"), [("e3va", {"out_stages": (2,)}), ("losa", {"blocks": (0, 1, 2)})])
@pytest.mark.parametrize("probe_blocks", [0, 2])
def test_a_side_network_that_stops_early_gets_a_head_as_wide_as_its_pooled_feature(method, options, probe_blocks):
    model = tiny("swin", method, probe_blocks=probe_blocks, **options)  # stops in stage 2 of 4 (64 channels)
    readout = 0 if not probe_blocks else model.method.readout.width
    assert model.method.pooled_width == 64 + readout == model.head.fc.in_features
    assert model(images("swin", 2)).shape == (2, 5)


def test_the_cache_of_a_video_model_asks_for_what_its_frame_model_reads() -> None:
    """A video model's method is built for its frames (classification): its cache keeps the class token only of
    E3VA's taps, every token of the readout's blocks, and probe_blocks is not refused as for a dense head."""
    from sidetune.cache.build import tap_spec

    video = sidetune.create("test_vit", "e3va", task="video", num_frames=2, num_classes=3, img_size=32)
    need = tap_spec(video, ["e3va"], {"e3va": {"probe_blocks": 2}})
    assert need["out.4"] is None and need["out.5"] is None
    assert {v for k, v in need.items() if k not in ("out.4", "out.5")} == {1}
