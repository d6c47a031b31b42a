"""The multi-layer linear probe (``probe``): frozen class and mean patch tokens of several blocks, one linear head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sidetune
from sidetune.backbones import TapRequest
from sidetune.side.probe import ProbeConfig

from conftest import images, tiny


def _reference(model, x: torch.Tensor, blocks: tuple[int, ...], class_token: bool) -> torch.Tensor:
    """Each block's output standardised per token; its class token (position 0) and the mean of its patch tokens."""
    layout = model.backbone.layout
    with torch.no_grad():
        taps = model.backbone(x, TapRequest.of(out=blocks))
    parts = []
    for i in blocks:
        t = taps.out[i]
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
        prefix = layout.num_prefix_tokens if layout.block_stage[i] == 0 else 0
        parts += [t[:, 0]] if class_token else []
        parts.append(t[:, prefix:].mean(1))
    return torch.cat(parts, -1)


@pytest.mark.parametrize(
    ("key", "blocks", "class_token", "width"),
    [
        ("vit", (2, 3, 4, 5), True, 4 * 2 * 64),  # test_vit: depth 6, width 64, a class token
        ("vit_reg", (4, 5, 6, 7), False, 4 * 64),  # depth 8, a register, no class token: mean patch tokens
        ("swin", (1, 2, 3, 4), False, 32 + 64 + 64 + 128),  # stages 16/32/64/128 wide, depths 1/1/2/1
    ],
)
def test_probe_reads_class_and_mean_patch_tokens_of_the_last_four_blocks(key, blocks, class_token, width) -> None:
    model = tiny(key, "probe")
    probe = model.method
    assert probe.blocks == blocks and probe.pooled_width == width
    assert probe.tap_request == TapRequest.of(out=blocks)
    x = images(key, 3)
    pooled = model.features(x).pooled
    assert pooled.shape == (3, width)
    torch.testing.assert_close(pooled, _reference(model, x, blocks, class_token), rtol=1e-5, atol=1e-5)
    assert model(x).shape == (3, 5)


@pytest.mark.parametrize("key", ["vit", "swin", "efficientnet"])
def test_only_the_head_trains_and_no_gradient_enters_the_backbone(key: str) -> None:
    model = tiny(key, "probe").train()
    grad_modes = []
    model.backbone.blocks[0].module.register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    F.cross_entropy(model(images(key, 3)), torch.tensor([0, 1, 2])).backward()
    assert grad_modes == [False]
    names = [n for n, _ in model.named_trainable_parameters()]
    assert names == ["head.fc.weight", "head.fc.bias"]
    assert model.num_parameters() == model.method.pooled_width * 5 + 5  # the linear head, nothing else
    assert all(p.grad is None for p in model.backbone.parameters())


def test_probe_options_choose_blocks_and_parts() -> None:
    model = tiny("vit", "probe", blocks=(0, 5), class_token=False)
    assert model.method.blocks == (0, 5) and model.method.pooled_width == 2 * 64
    assert tiny("vit", "probe", last_blocks=1).method.blocks == (5,)
    assert tiny("vit", "probe", last_blocks=10).method.blocks == tuple(range(6))  # at most every block
    with pytest.raises(sidetune.ConfigError, match=r"blocks \[6\] out of range .* 6 blocks"):
        tiny("vit", "probe", blocks=(6,))
    with pytest.raises(sidetune.ConfigError, match="class token, the mean patch token or both"):
        ProbeConfig(class_token=False, mean_tokens=False)
    with pytest.raises(sidetune.ConfigError, match="has no class token and mean_tokens is off"):
        tiny("vit_reg", "probe", mean_tokens=False)


def test_probe_save_load_round_trip(tmp_path) -> None:
    model = tiny("swin", "probe", blocks=(3, 4))
    with torch.no_grad():
        model.head.fc.weight.normal_()
    x = images("swin", 2)
    model.eval()
    expected = model(x)
    directory = model.save_adapter(tmp_path / "probe")
    torch.manual_seed(0)  # the random backbone is rebuilt from the seed it was created with
    loaded = sidetune.load(directory).eval()
    assert loaded.method.blocks == (3, 4) and loaded.config.method == "probe"
    torch.testing.assert_close(loaded(x), expected)
    from safetensors.torch import load_file

    assert sorted(load_file(str(directory / "adapter_model.safetensors"))) == ["head.fc.bias", "head.fc.weight"]


def test_probe_on_dense_tasks_is_the_stage_pyramid() -> None:
    model = tiny("swin", "probe", task="segmentation")
    feats = model.method(images("swin", 2))
    assert [tuple(p.shape[1:]) for p in feats.pyramid] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
    assert feats.strides == [4, 8, 16, 32]
    assert model(images("swin", 2)).shape == (2, 5, 64, 64)
