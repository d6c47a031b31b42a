"""Backbone loading (hub name, local file, random), families, and the errors a user's mistakes get."""

from __future__ import annotations

import typing

import pytest
import torch
from safetensors.torch import load_file, save_file

import sidetune
from sidetune.backbones import FAMILIES, fingerprint, list_backbones
from sidetune.method_spec import MethodSpec
from sidetune.methods import get_method, list_methods

from conftest import DINOV2_WEIGHTS, EFFICIENTNET_WEIGHTS, images, require_asset, tiny


def test_list_backbones_names_the_three_families() -> None:
    families = {f["family"]: f for f in list_backbones()}
    assert set(families) == {"vit", "swin", "cnn"}
    assert families["swin"]["branch_taps"] and not families["cnn"]["branch_taps"]
    names = list_backbones("vit_small_patch14*")
    assert "vit_small_patch14_dinov2" in names and "vit_small_patch14_reg4_dinov2" in names
    assert all(FAMILIES["swin"].matches(n) for n in list_backbones("swin_*"))
    assert list_backbones("resnet18") == []  # a timm model, but not of a supported family


def test_unknown_backbone_lists_close_valid_names() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"unknown backbone 'vit_smal_patch16_224'.*vit_small_patch16_224"):
        sidetune.create("vit_smal_patch16_224", "losa", num_classes=3)


def test_timm_model_of_an_unsupported_family_says_which_are_supported() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"'resnet18' is a timm model.*Supported families: vit"):
        sidetune.create("resnet18", "linear", num_classes=3)


def test_unknown_method_lists_the_methods() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"unknown method 'lossa'.*'losa'.*Valid choices:.*e3va"):
        sidetune.create("test_vit", "lossa", num_classes=3)


@pytest.mark.parametrize(
    ("method", "options", "pattern"),
    [
        ("losa", {"channel_rank": 0}, "channel_rank must be a positive integer, got 0"),
        ("losa", {"token_rank": -2}, "token_rank must be a positive integer, got -2"),
        ("e3va", {"alpha": 0}, "alpha must be a positive integer, got 0"),
        ("e3va", {"bottleneck": -1}, "bottleneck must be a positive integer"),
        ("losa", {"rank": 4}, r"no option\(s\) rank. Its options: blocks, channel_rank"),
        ("losa", {"blocks": (7,)}, r"blocks \[7\] out of range for a backbone with 6 blocks"),
        # a string is truthy: "maybe" or "no" would switch the option on
        ("losa", {"norm": "maybe"}, r"method 'losa': option norm must be true or false, got 'maybe'"),
        ("losa", {"recompute": "nope"}, r"option recompute must be true or false, got 'nope'"),
        ("e3va", {"input_norm": "maybe"}, r"option input_norm must be true or false, got 'maybe'"),
        ("e3va", {"copy_final_norm": 1}, r"option copy_final_norm must be true or false, got 1"),
        ("probe", {"class_token": "no"}, r"option class_token must be true or false, got 'no'"),
        ("vpt", {"deep": "false"}, r"option deep must be true or false, got 'false'"),
        ("losa", {"dropout": "0.1"}, r"option dropout must be a number, got '0.1'"),
        ("e3va", {"bottleneck": "8"}, r"option bottleneck must be an integer or none, got '8'"),
        ("lst", {"reduction": 2.0}, r"option reduction must be an integer, got 2.0"),
        ("losa", {"read": 1}, r"option read must be a string, got 1"),
        ("losa", {"blocks": "x"}, r"option blocks must be integers \(one, or a comma-separated list\), got 'x'"),
        ("e3va", {"out_stages": (0, 1.5)}, r"option out_stages must be integers .*got \(0, 1.5\)"),
    ],
)
def test_bad_method_options_fail_at_construction(method: str, options: dict, pattern: str) -> None:
    with pytest.raises(sidetune.ConfigError, match=pattern):
        tiny("vit", method, **options)


#: One valid single value of every tuple-typed method option, and the one-item tuple it stands for.
SINGLE_VALUES = {
    ("probe", "blocks"): (1, (1,)),
    ("losa", "blocks"): (1, (1,)),
    ("e3va", "out_stages"): (0, (0,)),
    ("adapter", "positions"): ("mlp", ("mlp",)),
    ("adaptformer", "positions"): ("attn", ("attn",)),
    ("lora", "target_modules"): (["qkv"], ("qkv",)),  # a lone string stays a string: a regular expression
}


def test_every_tuple_option_takes_a_single_value_as_a_one_item_tuple() -> None:
    """``--opt blocks=1`` parses to ``1`` (``blocks=1,2`` to a tuple): each tuple-typed option takes it as ``(1,)``."""
    specs: dict[type, MethodSpec] = {}  # one method per config class (e3va, not its presets e3va+ and e3va++)
    for record in list_methods():
        specs.setdefault(get_method(record["name"]).config_cls, get_method(record["name"]))
    tuple_options = {
        (spec.name, name)
        for cls, spec in specs.items()
        for name, hint in typing.get_type_hints(cls).items()
        if "tuple[" in str(hint)
    }
    assert tuple_options == set(SINGLE_VALUES)  # a new tuple-typed option gets a case here
    for (method, name), (value, expected) in SINGLE_VALUES.items():
        assert getattr(get_method(method).make_config(**{name: value}), name) == expected
    model = tiny("vit", "losa", blocks=1)
    assert model.method.blocks == (1,)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_non_positive_class_count_fails(num_classes) -> None:
    with pytest.raises(sidetune.ConfigError, match="num_classes must be a positive integer"):
        sidetune.create("test_vit", "linear", num_classes=num_classes, img_size=64)


@pytest.mark.parametrize("size", [17, 8])
def test_an_image_size_off_the_patch_grid_names_the_patch_size(size: int) -> None:
    with pytest.raises(
        sidetune.ConfigError, match=rf"cannot take {size}x{size} images: .*multiple of its patch size, 16x16"
    ):
        sidetune.create("test_vit", "losa", num_classes=3, img_size=size)


def test_a_backbone_without_blocks_is_refused() -> None:
    with pytest.raises(sidetune.ConfigError, match="has no blocks to tap"):
        sidetune.create("test_vit", "linear", num_classes=3, img_size=32, backbone_kwargs={"depth": 0})


def test_side_methods_refuse_cnns_with_the_reason() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"'e3va' cannot adapt 'test_convnext'.*attention- and MLP-branch"):
        tiny("convnext", "e3va")


def test_missing_weights_file_names_the_path_and_the_choices(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(sidetune.WeightsError, match=r"nope.safetensors' does not exist.*weights='hub'"):
        sidetune.create("test_vit", "linear", num_classes=3, weights=missing)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_that_do_not_fit_name_missing_and_unexpected_keys(tmp_path, suffix: str) -> None:
    donor = tiny("vit", "linear").backbone.model.state_dict()  # test_vit: class token, no layer-scale
    path = tmp_path / f"test_vit{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in donor.items()}, str(path))
    else:
        torch.save(donor, path)
    with pytest.raises(sidetune.WeightsError, match=r"does not fit the model. Missing keys: .*ls1.gamma.*Unexpected"):
        sidetune.create("test_vit2", "linear", num_classes=3, img_size=64, weights=path)


def test_local_weights_round_trip_through_timm_loading(tmp_path) -> None:
    source = tiny("vit", "linear", seed=3).backbone.model
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = tiny("vit", "losa", seed=4, weights=path)
    assert fingerprint(model.backbone.model) == fingerprint(source)
    assert model.config.weights == str(path.resolve())
    assert tiny("vit", "losa", seed=4).config.backbone_fingerprint != model.config.backbone_fingerprint


def test_local_weights_are_resampled_to_another_image_size(tmp_path) -> None:
    source = tiny("vit", "linear", seed=3).backbone.model  # built at 64 px: 4x4 grid
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = sidetune.create("test_vit", "e3va", num_classes=3, img_size=96, weights=path)
    assert model.backbone.model.pos_embed.shape == (1, 1 + 6 * 6, 64)
    torch.testing.assert_close(model.backbone.model.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_fp16_weights_resample_under_a_callers_bf16_autocast(tmp_path) -> None:
    # the shared DINOv2 file is fp16; loading it inside `with torch.autocast(...)` made timm's resampling fail
    source = tiny("vit", "linear", seed=3).backbone.model
    path = tmp_path / "w16.safetensors"
    save_file({k: v.half().contiguous() for k, v in source.state_dict().items()}, str(path))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = sidetune.create("test_vit", "linear", num_classes=3, img_size=96, weights=path)
    assert model.backbone.model.pos_embed.shape == (1, 1 + 6 * 6, 64)
    torch.testing.assert_close(
        model.backbone.model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight.half().float()
    )


@pytest.mark.e2e
def test_shared_dinov2_weights_load_at_224_px() -> None:
    path = require_asset(DINOV2_WEIGHTS)
    model = sidetune.create("vit_small_patch14_dinov2", "e3va", num_classes=10, img_size=224, weights=path)
    timm_model = model.backbone.model
    file = load_file(str(path))
    assert file["pos_embed"].shape[1] == 1 + 37 * 37  # stored for 518 px
    assert timm_model.pos_embed.shape == (1, 1 + 16 * 16, 384)  # resampled by timm for 224 px
    torch.testing.assert_close(timm_model.blocks[5].attn.qkv.weight, file["blocks.5.attn.qkv.weight"].float())
    assert model.backbone.layout.stage_grids == ((16, 16),)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


@pytest.mark.e2e
def test_shared_efficientnet_weights_drop_the_imagenet_classifier() -> None:
    path = require_asset(EFFICIENTNET_WEIGHTS)
    model = sidetune.create("efficientnet_lite0", "linear", num_classes=4, img_size=96, weights=path)
    file = load_file(str(path))
    assert "classifier.weight" in file
    timm_model = model.backbone.model
    torch.testing.assert_close(timm_model.conv_stem.weight, file["conv_stem.weight"])
    assert model.backbone.layout.stage_dims == (16, 24, 40, 112, 320)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 4)


def test_fingerprint_changes_with_any_weight() -> None:
    model = tiny("vit", "linear").backbone.model
    before = fingerprint(model)
    assert before == fingerprint(model) and before.startswith("sha256:")
    with torch.no_grad():
        model.blocks[3].norm1.weight[7] += 1e-3
    assert fingerprint(model) != before


def test_images_of_the_wrong_shape_get_a_clear_error() -> None:
    model = tiny("swin", "e3va")
    with pytest.raises(sidetune.ConfigError, match=r"expected images of shape \(B, 3, H, W\), got \(3, 64, 64\)"):
        model(images("swin", 1)[0])


def test_corrupt_weights_file_is_reported_not_a_torch_traceback(tmp_path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(sidetune.WeightsError, match=r"could not read weights file .*broken.safetensors"):
        sidetune.create("test_vit", "linear", num_classes=3, img_size=64, weights=path)


@pytest.mark.parametrize("weights", ["hub", "pretrained", True])
def test_hub_weights_go_through_timms_pretrained_loading(monkeypatch, weights) -> None:
    """Downloads are impossible offline; check that 'hub' asks timm for its pretrained weights."""
    import timm

    seen = {}
    real_create = timm.create_model

    def fake_create(name, pretrained=False, **kwargs):
        seen.update(pretrained=pretrained, **kwargs)
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake_create)
    model = sidetune.create("test_vit", "linear", num_classes=3, img_size=64, weights=weights)
    assert seen["pretrained"] is True and seen["num_classes"] == 0 and "pretrained_cfg_overlay" not in seen
    assert model.config.weights == "hub"


@pytest.mark.e2e
def test_building_a_model_leaves_pretrained_batchnorm_statistics_untouched() -> None:
    """timm builds models in train mode; the layout probe must not update BN running statistics."""
    path = require_asset(EFFICIENTNET_WEIGHTS)
    file = load_file(str(path))
    for method in ("linear", "lora"):
        model = sidetune.create("efficientnet_lite0", method, num_classes=3, img_size=96, weights=path)
        stats = {k: v for k, v in model.backbone.model.state_dict().items() if "running_" in k}
        assert len(stats) == 98
        assert all(torch.equal(v, file[k].to(v.dtype)) for k, v in stats.items())


@pytest.mark.parametrize(("key", "size"), [("vit", (64, 96)), ("swin", (64, 128))])
def test_non_square_image_sizes(key: str, size: tuple[int, int]) -> None:
    from conftest import TINY_BACKBONES

    name, kwargs, _ = TINY_BACKBONES[key]
    model = sidetune.create(name, "losa", num_classes=3, img_size=size, backbone_kwargs=kwargs)
    assert model.backbone.layout.img_size == size
    assert model(torch.randn(2, 3, *size)).shape == (2, 3)
    with pytest.raises(sidetune.ConfigError, match=r"built for 64x\d+ images but got 96x64.*img_size=\(96, 64\)"):
        model(torch.randn(1, 3, 96, 64))


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ([torch.zeros(3, 64, 64)], r"expected a \(B, 3, H, W\) tensor of images, got list"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"images are torch.uint8 but the backbone is torch.float32"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.float64), r"images are torch.float64"),
    ],
)
def test_wrong_image_type_or_dtype_gets_a_clear_error(bad, pattern: str) -> None:
    with pytest.raises(sidetune.ConfigError, match=pattern):
        tiny("vit", "e3va")(bad)


def test_cnn_dense_models_also_refuse_other_sizes() -> None:
    model = tiny("convnext", "linear", task="segmentation", head_options={"channels": 16})
    with pytest.raises(sidetune.ConfigError, match=r"built for 64x64 images but got 96x96"):
        model(torch.randn(1, 3, 96, 96))
