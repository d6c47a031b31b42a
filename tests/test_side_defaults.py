"""The memory- and time-saving defaults of LoSA and E3VA (issue 17) compute what the former code computed.

``side_reference`` holds the former code, op for op. Each side method, on a ViT and on a Swin, must give the same
features and the same gradient for every trainable parameter as before, in float32 (to rounding) and under
bfloat16 autocast (where the former and the new code are each compared with a float64 run of the same model: the
new code must be no less accurate than the former, within bf16 rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.swin_transformer import PatchMerging

from side_reference import old_carry, old_e3va_pooled, old_losa_pooled
from sidetune.bench import saved_tensor_bytes
from sidetune.side.base import carry_across_stage, merge_2x2
from sidetune.side.losa import LowRankMLP
from test_side_methods import _perturb

from conftest import images, tiny

REFERENCE = {"losa": old_losa_pooled, "e3va": old_e3va_pooled}


def _features_and_grads(model, fn, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and the gradients of every trainable side parameter (concatenated) for one loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        taps = model.backbone(x, model.method.tap_request)
        pooled = fn(model.method, taps)
    pooled.float().pow(2).sum().backward()
    grads = [p.grad.flatten() for _, p in model.method.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    return pooled.detach().double(), torch.cat(grads).double()


def _new(method, taps) -> torch.Tensor:
    return method.forward_taps(taps).pooled


@pytest.mark.parametrize("key", ["vit", "swin"])
@pytest.mark.parametrize("method", ["losa", "e3va"])
@pytest.mark.parametrize("recompute", [True, False])
def test_defaults_equal_the_former_computation_in_float32(method: str, key: str, recompute: bool) -> None:
    model = tiny(key, method, recompute=recompute)
    _perturb(model.method)
    x = images(key, 3)
    old_out, old_grad = _features_and_grads(model, REFERENCE[method], x, autocast=False)
    new_out, new_grad = _features_and_grads(model, _new, x, autocast=False)
    torch.testing.assert_close(new_out, old_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_grad, old_grad, rtol=1e-4, atol=1e-5 * old_grad.abs().max().item())


@pytest.mark.parametrize("key", ["vit", "swin"])
@pytest.mark.parametrize("method", ["losa", "e3va"])
def test_defaults_under_bf16_autocast_are_as_accurate_as_the_former_computation(method: str, key: str) -> None:
    model = tiny(key, method)
    _perturb(model.method)
    x = images(key, 3)
    exact_model = copy.deepcopy(model).double()
    exact_out, exact_grad = _features_and_grads(exact_model, _new, x.double(), autocast=False)
    old_out, old_grad = _features_and_grads(model, REFERENCE[method], x, autocast=True)
    new_out, new_grad = _features_and_grads(model, _new, x, autocast=True)

    def error(value: torch.Tensor, exact: torch.Tensor) -> float:
        return ((value - exact).abs().max() / exact.abs().max()).item()

    # the same computation in bf16: both within bf16 rounding of the exact result, the new one no worse
    for name, old, new, exact in (("features", old_out, new_out, exact_out), ("grads", old_grad, new_grad, exact_grad)):
        assert error(old, exact) < 0.05 and error(new, exact) < 0.05, name
        assert error(new, exact) <= 1.5 * error(old, exact) + 2e-3, name


@pytest.mark.parametrize("size", [(4, 6), (5, 7)])
def test_merge_2x2_then_norm_and_reduction_is_timms_patch_merging(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    merging = PatchMerging(dim=8)
    x = torch.randn(2, *size, 8)
    torch.testing.assert_close(merging.reduction(merging.norm(merge_2x2(x))), merging(x), rtol=0, atol=0)


def test_carry_takes_one_product_for_timms_patch_merging_and_equals_the_definition() -> None:
    torch.manual_seed(0)
    merging = PatchMerging(dim=8).requires_grad_(False)
    base = torch.randn(2, 16, 8)
    delta = (0.1 * torch.randn(2, 16, 8)).requires_grad_(True)
    products = []
    merging.reduction.register_forward_hook(lambda m, a, o: products.append(a[0].shape))
    fused = carry_across_stage(delta, base, merging, (4, 4))
    assert len(products) == 1
    (grad_fused,) = torch.autograd.grad(fused.pow(2).sum(), delta)
    reference = old_carry(delta, base, merging, (4, 4))
    (grad_reference,) = torch.autograd.grad(reference.pow(2).sum(), delta)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_fused, grad_reference, rtol=1e-5, atol=1e-6)
    zero = carry_across_stage(torch.zeros_like(delta), base, merging, (4, 4))
    assert torch.count_nonzero(zero) == 0  # exactly zero when delta is


def test_carry_runs_any_other_downsampling_module_twice() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 2, stride=2).requires_grad_(False)

    def downsample(x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H/2, W/2, 2C)
        return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    module = torch.nn.Module()
    module.forward = downsample
    base, delta = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    torch.testing.assert_close(carry_across_stage(delta, base, module, (4, 4)), old_carry(delta, base, module, (4, 4)))


def test_token_mixing_rows_equal_the_mlp_on_transposed_tokens() -> None:
    torch.manual_seed(0)
    mlp = LowRankMLP(6, 3)
    _perturb(mlp)
    x = torch.randn(2, 6, 5)
    torch.testing.assert_close(mlp.forward_rows(x), mlp(x.transpose(1, 2)).transpose(1, 2))
    y = torch.randn(2, 4, 6, 5)  # leading axes (video frames) are batched too
    torch.testing.assert_close(mlp.forward_rows(y), mlp(y.transpose(-1, -2)).transpose(-1, -2))


def test_e3va_keeps_float32_taps_in_the_autocast_dtype_for_backward() -> None:
    """dinov2_reg has layer-scale, so under bf16 autocast its branch taps are float32; the adapters' first product
    reads them in bfloat16, and that is all E3VA keeps of them."""
    model = tiny("dinov2_reg", "e3va", task="segmentation")  # every token adapted
    x = images("dinov2_reg", 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        taps = model.backbone(x, model.method.tap_request)
    assert taps.attn[0].dtype == torch.float32

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.method.stage_features(taps)[0].float().pow(2).sum()

    kept = saved_tensor_bytes(loss, module=model).activation_bytes_by_dtype
    tap_bytes = sum(t.numel() for t in [*taps.attn.values(), *taps.mlp.values()]) * 2  # as bfloat16
    assert kept.get("bfloat16", 0) >= tap_bytes
    # float32: the stage norm's input and the loss's own, not the taps (which would be 2 * tap_bytes)
    assert kept.get("float32", 0) < tap_bytes


@pytest.mark.parametrize("method", ["losa", "e3va"])
def test_recompute_is_the_default(method: str) -> None:
    """Keeping only what backward cannot do without (LoSA: each mixer's input; E3VA: its taps) is the default; the
    memory it saves and the gradients' equality are tested in test_side_methods.py."""
    assert tiny("swin", method).method.config.recompute is True
    assert tiny("swin", method, recompute=False).method.config.recompute is False
