"""The baselines: in-place methods (full, BitFit, Norm, Partial-k, LoRA, Adapter, AdaptFormer, VPT) and LST.

What trains (exact counts, derived by hand for test_vit), where gradients go (through the backbone for the
in-place methods, never for LST), faithfulness to each paper's equations (reference computations written
from the equations, calling the timm modules' ``forward`` directly so that no hook runs), save/load round
trips, gradient checkpointing, and the errors for what cannot work.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sidetune
from sidetune.backbones import TapRequest, TimmBackbone, family_of
from sidetune.bench import saved_tensor_bytes
from sidetune.model import ADAPTER_WEIGHTS

from conftest import TINY_BACKBONES, images, tiny

INPLACE = ("full", "bitfit", "norm", "partial-1", "lora", "adapter", "adaptformer", "vpt")
CNN_OK = ("full", "bitfit", "norm", "partial-1", "lora")

# Trainable parameters with the 5-class head (325 of them on a 64-wide backbone) on tests/conftest.py's backbones.
# test_vit: C = 64, depth 6, MLP hidden 192, 4x4 patches + class token, qkv/proj/fc biases, final norm.
#   bitfit    6 x (norm1 64 + qkv 192 + proj 64 + norm2 64 + fc1 192 + fc2 64) + patch 64 + final norm 64 = 3968
#   norm      6 x 2 x (64 + 64) + final norm 128 = 1664
#   partial-1 one block 41,728 (norms 256, qkv 12,480, proj 4,160, fc1 12,480, fc2 12,352) + final norm 128
#   lora      6 x r (64 + 192) = 6 x 8 x 256 = 12,288 (r = 8 on qkv: A is 8 x 64, B is 192 x 8)
#   adapter   6 x 2 x (64 x 64 + 64 + 64 x 64 + 64) = 99,840 (bottleneck 64 after attention and MLP)
#   adaptformer  half of that: one bottleneck per block = 49,920
#   vpt       6 blocks x 10 prompts x 64 = 3840 (deep)
#   lst       side width 8: 6 down-projections (64 x 8 + 8) = 3120, 6 side blocks of 872 (norms 32, qkv 216,
#             proj 72, fc1 288, fc2 264) = 5232, 5 gates, side norm 16, up-projection 8 x 64 + 64 = 576: 8949
EXPECTED = {
    "vit": {
        "full": 301189,
        "bitfit": 4293,
        "norm": 1989,
        "partial-1": 42181,
        "partial-3": 125637,
        "lora": 12613,
        "adapter": 100165,
        "adaptformer": 50245,
        "vpt": 4165,
        "lst": 9274,
    },
    "vit_reg": {
        "full": 385669,
        "bitfit": 5573,
        "norm": 2501,
        "partial-1": 42309,
        "partial-3": 126021,
        "lora": 16709,
        "adapter": 133445,
        "adaptformer": 66885,
        "vpt": 5445,
        "lst": 12060,
    },
    "dinov2_reg": {
        "full": 114965,
        "bitfit": 1925,
        "norm": 917,
        "partial-1": 28709,
        "partial-3": 85445,
        "lora": 4853,
        "adapter": 37781,
        "adaptformer": 19013,
        "vpt": 1685,
        "lst": 3007,
    },
    "swin": {
        "full": 360157,
        "bitfit": 4909,
        "norm": 3045,
        "partial-1": 199191,
        "partial-3": 332635,
        "lora": 10373,
        "adapter": 79717,
        "adaptformer": 40181,
        "lst": 12565,
    },
    "efficientnet": {
        "full": 100481,
        "bitfit": 2889,
        "norm": 3813,
        "partial-1": 47121,
        "partial-3": 85369,
        "lora": 9669,
    },
    "convnext": {"full": 207453, "bitfit": 3541, "norm": 1525, "partial-1": 36933, "partial-3": 107077, "lora": 32965},
}
CASES = [(key, method) for key, row in EXPECTED.items() for method in row]


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable parameter randomly, so zero-initialised paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _loss(model: sidetune.SidetuneModel, key: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return F.cross_entropy(model(images(key, batch, seed)), torch.arange(batch) % 5)


# --- what trains ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "method"), CASES)
def test_exact_trainable_counts_and_only_they_get_gradients(key: str, method: str) -> None:
    model = tiny(key, method)
    assert model.num_parameters() == EXPECTED[key][method]
    assert model.num_parameters() == sum(t.numel() for t in model.adapter_state_dict().values())
    _perturb(model.method)  # zero-initialised up-projections would hide a missing gradient path
    _loss(model, key).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable), "a trainable tensor got a zero grad"


def test_counts_derived_by_hand_for_test_vit() -> None:
    c, depth, hidden, head = 64, 6, 192, 64 * 5 + 5
    block = 4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * hidden + hidden) + (hidden * c + c)
    assert EXPECTED["vit"]["bitfit"] == depth * (2 * c + 3 * c + c + hidden + c) + c + c + head
    assert EXPECTED["vit"]["norm"] == depth * 4 * c + 2 * c + head
    assert EXPECTED["vit"]["partial-1"] == block + 2 * c + head
    assert EXPECTED["vit"]["partial-3"] == 3 * block + 2 * c + head
    assert EXPECTED["vit"]["lora"] == depth * 8 * (c + 3 * c) + head
    bottleneck = (c * 64 + 64) + (64 * c + c)
    assert EXPECTED["vit"]["adapter"] == depth * 2 * bottleneck + head
    assert EXPECTED["vit"]["adaptformer"] == depth * bottleneck + head
    assert EXPECTED["vit"]["vpt"] == depth * 10 * c + head
    d = c // 8
    side_block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    lst = depth * (c * d + d) + depth * side_block + (depth - 1) + 2 * d + (d * c + c)
    assert EXPECTED["vit"]["lst"] == lst + head


def test_vpt_shallow_has_one_set_of_prompts() -> None:
    assert tiny("vit", "vpt", deep=False).num_parameters() == 10 * 64 + 325
    assert tiny("vit", "vpt", num_prompts=3).num_parameters() == 6 * 3 * 64 + 325


def test_bitfit_position_bias_tables_are_optional() -> None:
    with_tables = tiny("swin", "bitfit").method.trained_names
    without = tiny("swin", "bitfit", position_bias=False).method.trained_names
    tables = sorted(set(with_tables) - set(without))
    assert tables and all(n.endswith("attn.relative_position_bias_table") for n in tables)
    assert len(tables) == 5  # one per Swin block (depths 1, 1, 2, 1)
    assert all(n.rsplit(".", 1)[-1] == "bias" for n in without)


def test_norm_tuning_finds_batchnorm_layernorm2d_and_layernorm() -> None:
    effnet = tiny("efficientnet", "norm").method.trained_names  # BatchNormAct2d
    assert effnet and all(".bn" in n or n.startswith("bn") for n in effnet)
    convnext = tiny("convnext", "norm").method.trained_names  # LayerNorm2d (stem, downsample), LayerNorm (blocks)
    assert "stem.1.weight" in convnext and "stages.1.downsample.0.weight" in convnext
    assert "stages.0.blocks.0.norm.weight" in convnext and "head.norm.weight" in convnext


def _owner(name: str) -> str:
    """The block (``layers.2.blocks.1``, ``blocks.4.0``), stage downsample or top-level module owning a parameter."""
    parts = name.split(".")
    if parts[0] == "layers":
        return ".".join(parts[:4] if parts[2] == "blocks" else parts[:3])
    return ".".join(parts[:3]) if parts[0] == "blocks" else parts[0]


def test_partial_k_is_the_last_k_blocks_and_what_runs_after_them() -> None:
    spec = sidetune.get_method("partial-3")
    assert spec.name == "partial-3" and spec.defaults == {"k": 3} and spec.kind == "inplace"
    vit = tiny("vit", "partial-3").method.trained_names
    assert {n.split(".")[1] for n in vit if n.startswith("blocks.")} == {"3", "4", "5"}
    assert [n for n in vit if not n.startswith("blocks.")] == ["norm.weight", "norm.bias"]
    # Swin depths (1, 1, 2, 1): the last 2 blocks span a stage boundary, so stage 3's patch merging trains.
    swin = tiny("swin", "partial-2").method.trained_names
    assert {_owner(n) for n in swin} == {"layers.2.blocks.1", "layers.3.downsample", "layers.3.blocks.0", "norm"}
    effnet = tiny("efficientnet", "partial-1").method.trained_names
    assert {_owner(n) for n in effnet} == {"blocks.4.0", "conv_head", "bn2"}
    assert tiny("vit", "partial-1", k=3).num_parameters() == EXPECTED["vit"]["partial-3"]  # k= overrides the name


def test_full_trains_every_backbone_parameter() -> None:
    model = tiny("convnext", "full")
    assert all(p.requires_grad for p in model.backbone.parameters())


# --- where gradients go -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "method"),
    [(key, method) for key in ("vit", "swin") for method in INPLACE if (key, method) != ("swin", "vpt")],
)
def test_inplace_methods_backpropagate_through_the_backbone(key: str, method: str) -> None:
    model = tiny(key, method)
    grad_modes, inputs = [], {}
    blocks = [ref.module for ref in model.backbone.blocks]
    blocks[0].register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    for i in (1, len(blocks) - 1):
        blocks[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
    _loss(model, key).backward()
    assert grad_modes == [True]
    # The gradient reaches a trained tensor in block 0 through every later block; partial-1 trains the last
    # block only, so the backward pass stops at its input.
    assert inputs[1].requires_grad == (method != "partial-1")
    assert inputs[len(blocks) - 1].requires_grad == (method != "partial-1")
    frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_listed_kinds() -> None:
    records = {r["name"]: r for r in sidetune.list_methods()}
    for name in INPLACE:
        spec = sidetune.get_method(name)
        assert records[spec.name]["kind"] == "inplace" and records[spec.name]["backprop_through_backbone"] is True
    assert records["lst"]["kind"] == "side" and records["lst"]["backprop_through_backbone"] is False
    assert records["vpt"]["families"] == ["vit"] and records["adapter"]["families"] == ["vit", "swin"]


@pytest.mark.parametrize("key", ["vit", "swin", "dinov2_reg"])
def test_saved_activation_bytes_inplace_against_side(key: str) -> None:
    """Bytes autograd keeps for backward (deterministic): in-place methods keep the backbone's activations."""

    def saved(method: str, **options) -> int:
        model = tiny(key, method, **options)
        return saved_tensor_bytes(lambda: _loss(model, key), module=model).activation_bytes

    side = {m: saved(m) for m in ("linear", "losa", "e3va", "lst")}
    # Methods that train something in the first block back-propagate through every block.
    through_all = {m: saved(m) for m in ("full", "bitfit", "norm", "lora", "adapter", "adaptformer")}
    if key != "swin":
        through_all["vpt"] = saved("vpt")
    assert min(through_all.values()) > max(side.values())
    assert through_all["lora"] > 1.5 * side["losa"]
    assert through_all["lora"] > 2.5 * side["lst"]
    # LST keeps the ladders' inputs (the block outputs) and a side network at 1/8 width: under a quarter of
    # what full fine-tuning keeps.
    assert side["lst"] < 0.25 * through_all["full"]
    # Partial-1 back-propagates through one block only, gradient checkpointing keeps block inputs only.
    assert saved("partial-1") < 0.5 * through_all["full"]
    assert saved("lora", grad_checkpointing=True) < 0.3 * through_all["lora"]


# --- LST: gradient isolation and the ladder equations -----------------------------------------------------


@pytest.mark.parametrize("key", ["vit", "vit_reg", "dinov2_reg", "swin"])
def test_lst_no_gradient_enters_the_backbone(key: str) -> None:
    model = tiny(key, "lst")
    backbone_params = list(model.backbone.parameters())
    assert backbone_params and not any(p.requires_grad for p in backbone_params)
    grad_modes = []
    model.backbone.blocks[0].module.register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    _loss(model, key, 3).backward()
    assert grad_modes == [False]
    assert all(p.grad is None for p in backbone_params)
    assert all(p.grad is not None for p in model.trainable_parameters())


@pytest.mark.parametrize("key", ["vit_reg", "swin"])
def test_lst_backbone_weights_bit_identical_after_optimizer_steps(key: str) -> None:
    model = tiny(key, "lst")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    side_before = {n: p.detach().clone() for n, p in model.named_trainable_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        opt.zero_grad()
        _loss(model, key, 4, seed=step).backward()
        opt.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.equal(p, side_before[n]) for n, p in model.named_trainable_parameters())


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_lst_follows_the_ladder_equations(key: str) -> None:
    """h = side_0(down_0(b_0)); h = side_i(mu_i h + (1 - mu_i) down_i(b_i)), mu_i = sigmoid(w_i / T); up(LN(h))."""
    model = tiny(key, "lst", gate_temperature=0.5)
    _perturb(model.method)
    lst, layout = model.method, model.backbone.layout
    x = images(key, 2)
    n = layout.num_blocks
    with torch.no_grad():
        taps = model.backbone(x, TapRequest.of(out=range(n)))

        def ladder(i: int) -> torch.Tensor:
            d = lst.downs[i](taps.out[i])
            if key == "swin":
                hh, ww = layout.stage_grids[layout.block_stage[i]]
                d = d.reshape(2, hh, ww, -1)
            return d

        h = lst.side_blocks[0](ladder(0))
        for i in range(1, n):
            if layout.block_stage[i] != layout.block_stage[i - 1]:
                h = lst.merges[layout.block_stage[i] - 1](h)
            mu = 1 / (1 + torch.exp(-lst.gates[i - 1] / 0.5))
            h = lst.side_blocks[i](mu * h + (1 - mu) * ladder(i))
        expected = lst.up(lst.side_norm(h)).reshape(2, -1, layout.stage_dims[-1])
        torch.testing.assert_close(lst(x).tokens, expected)
    if key == "swin":
        assert [m.reduction.in_features for m in lst.merges] == [4 * 2, 4 * 4, 4 * 8]  # side widths 2, 4, 8, 16
        assert all(type(b).__name__ == "SwinTransformerBlock" for b in lst.side_blocks)


# --- faithfulness: starting points and reference computations ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "method"),
    [(k, m) for k in TINY_BACKBONES for m in ("lora", "adapter", "adaptformer") if m == "lora" or k in ("vit", "swin")],
)
def test_zero_initialised_methods_start_as_the_frozen_model(key: str, method: str) -> None:
    model, frozen = tiny(key, method).eval(), tiny(key, "linear").eval()
    assert model.config.backbone_fingerprint == frozen.config.backbone_fingerprint  # the same random backbone
    x = images(key, 2)
    with torch.no_grad():
        assert torch.equal(model.features(x).pooled, frozen.features(x).pooled)


def test_lora_is_a_peft_layer_whose_update_is_scaled_b_a() -> None:
    model = tiny("vit", "lora", r=4, alpha=12.0)
    _perturb(model.method)
    qkv = model.backbone.model.blocks[2].attn.qkv
    assert type(qkv).__module__.startswith("peft.") and not qkv.base_layer.weight.requires_grad
    a, b = qkv.lora_A["default"].weight, qkv.lora_B["default"].weight
    x = torch.randn(3, 64)
    expected = F.linear(x, qkv.base_layer.weight + (12.0 / 4) * b @ a, qkv.base_layer.bias)
    torch.testing.assert_close(qkv(x), expected)


def test_lora_on_efficientnet_adapts_pointwise_convolutions() -> None:
    model = tiny("efficientnet", "lora")
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_trainable_parameters() if ".lora_" in n}
    assert adapted and all(n.endswith(("conv_pw", "conv_pwl")) for n in adapted)
    assert all(model.get_submodule(n).base_layer.kernel_size == (1, 1) for n in adapted)


def test_adapter_is_houlsby_after_each_branch() -> None:
    """x' = x + a + A_attn(a), a = ls1(attn(norm1(x))); y = x' + m + A_mlp(m), m = ls2(mlp(norm2(x')))."""
    model = tiny("vit_reg", "adapter")  # layer-scale: the adapter reads the branch after it
    _perturb(model.method)
    vit, adapters = model.backbone.model, model.method.adapters
    x = images("vit_reg", 2)
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for i, blk in enumerate(vit.blocks):
            a = blk.ls1(blk.attn(blk.norm1(t)))
            t = t + a + adapters["attn"][i](a)
            m = blk.ls2(blk.mlp(blk.norm2(t)))
            t = t + m + adapters["mlp"][i](m)
        torch.testing.assert_close(model.features(x).tokens, vit.norm(t))


@pytest.mark.parametrize("source", ["residual", "normed"])
def test_adaptformer_is_a_scaled_parallel_bottleneck(source: str) -> None:
    """y = x' + ls2(MLP(LN(x'))) + s * up(ReLU(down(u))), u = x' (official code) or LN(x') (paper eq. 1)."""
    model = tiny("vit_reg", "adaptformer", scale=0.3, input=source)
    _perturb(model.method)
    vit, adapters = model.backbone.model, model.method.adapters["mlp"]
    x = images("vit_reg", 2)
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for i, blk in enumerate(vit.blocks):
            t = t + blk.ls1(blk.attn(blk.norm1.forward(t)))
            normed = blk.norm2.forward(t)  # .forward: no hook runs
            u = t if source == "residual" else normed
            t = t + blk.ls2(blk.mlp(normed)) + 0.3 * adapters[i](u)
        torch.testing.assert_close(model.features(x).tokens, vit.norm(t))
    assert not model.method._pending, "every adapter output computed in a forward is consumed by it"


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_inserts_prompts_after_the_prefix_tokens(deep: bool) -> None:
    """Deep: block i reads [prefix, P_i, patches]; shallow: P_0 enters once. Prompts are dropped at the end."""
    model = tiny("dinov2_reg", "vpt", num_prompts=3, deep=deep)  # class token + 4 registers
    _perturb(model.method)
    vit, prompts = model.backbone.model, model.method.prompts
    x = images("dinov2_reg", 2)
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for i, blk in enumerate(vit.blocks):
            if i == 0 or deep:
                rest = t[:, 5:] if i == 0 else t[:, 5 + 3 :]
                t = torch.cat([t[:, :5], prompts[i].expand(2, -1, -1), rest], dim=1)
            t = blk.forward(t)  # .forward: the hooks under test do not run
        t = vit.norm(torch.cat([t[:, :5], t[:, 5 + 3 :]], dim=1))
        feats = model.features(x)
        torch.testing.assert_close(feats.tokens, t)
        torch.testing.assert_close(feats.pooled, vit.forward_head(t, pre_logits=True))
    assert feats.tokens.shape == tiny("dinov2_reg", "linear").features(x).tokens.shape


# --- train / eval, BatchNorm, gradient checkpointing ------------------------------------------------------


def test_inplace_backbone_follows_train_and_eval() -> None:
    model = tiny("vit", "lora")
    model.train()
    assert model.backbone.model.training and all(m.training for m in model.backbone.model.blocks)
    model.eval()
    assert not any(m.training for m in model.backbone.model.modules())


def test_batchnorm_statistics_stay_frozen_unless_asked() -> None:
    model = tiny("efficientnet", "bitfit").train()
    bn = model.backbone.model.bn1
    stats = bn.running_mean.clone()
    _loss(model, "efficientnet").backward()
    assert not bn.training and torch.equal(bn.running_mean, stats)
    assert bn.bias.grad is not None
    with pytest.warns(UserWarning, match="running statistics"):
        moving = tiny("efficientnet", "bitfit", freeze_bn_stats=False).train()
    _loss(moving, "efficientnet").backward()
    assert not torch.equal(moving.backbone.model.bn1.running_mean, stats)


@pytest.mark.parametrize(
    ("key", "method"),
    [("vit", m) for m in ("full", "lora", "adapter", "adaptformer", "vpt")]
    + [("swin", m) for m in ("bitfit", "adaptformer", "partial-2")]
    + [("efficientnet", "lora"), ("convnext", "norm")],
)
def test_grad_checkpointing_changes_nothing_but_memory(key: str, method: str) -> None:
    plain, ckpt = tiny(key, method), tiny(key, method, grad_checkpointing=True)
    _perturb(plain.method)
    _perturb(ckpt.method)
    x, y = images(key, 2), torch.tensor([0, 1])
    # Same RNG for both: timm's Swin has drop-path 0.1 by default, active in train mode (checkpointing
    # replays the RNG state when it recomputes).
    torch.manual_seed(0)
    logits_plain = plain(x)
    torch.manual_seed(0)
    logits_ckpt = ckpt(x)
    assert torch.equal(logits_plain, logits_ckpt)
    F.cross_entropy(logits_plain, y).backward()
    F.cross_entropy(logits_ckpt, y).backward()
    grads = dict(ckpt.named_trainable_parameters())
    for name, p in plain.named_trainable_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=0, atol=0)
    bytes_plain = saved_tensor_bytes(lambda: F.cross_entropy(plain(x), y), module=plain).activation_bytes
    bytes_ckpt = saved_tensor_bytes(lambda: F.cross_entropy(ckpt(x), y), module=ckpt).activation_bytes
    assert bytes_ckpt < bytes_plain


# --- save / load ------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    ("vit_reg", "full", {}),
    ("efficientnet", "full", {}),
    ("swin", "bitfit", {}),
    ("efficientnet", "bitfit", {}),
    ("convnext", "norm", {}),
    ("dinov2_reg", "norm", {}),
    ("swin", "partial-2", {}),
    ("convnext", "partial-1", {}),
    ("vit", "lora", {"r": 4, "target_modules": ("qkv", "fc2")}),
    ("swin", "lora", {}),
    ("efficientnet", "lora", {}),
    ("convnext", "lora", {"target_modules": r".*stages\.3\..*\.fc1"}),
    ("vit_reg", "adapter", {}),
    ("swin", "adapter", {"positions": ("mlp",)}),
    ("vit", "adaptformer", {"input": "normed"}),
    ("swin", "adaptformer", {"positions": ("attn", "mlp")}),
    ("dinov2_reg", "vpt", {}),
    ("vit", "vpt", {"deep": False, "num_prompts": 2}),
    ("vit_reg", "lst", {}),
    ("swin", "lst", {"reduction": 4}),
]


@pytest.mark.parametrize(("key", "method", "options"), ROUND_TRIPS)
def test_save_load_round_trip_reproduces_logits(tmp_path, key: str, method: str, options: dict) -> None:
    model = tiny(key, method, seed=7, **options)
    _perturb(model)
    model.eval()
    x = images(key, 2)
    with torch.no_grad():
        expected = model(x)
    model.save_adapter(tmp_path)
    torch.manual_seed(7)  # tiny() seeds before create: load() rebuilds the same random backbone
    loaded = sidetune.load(tmp_path).eval()
    assert loaded.config.method == model.config.method
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_full_checkpoint_holds_every_tensor_and_lora_only_its_own(tmp_path) -> None:
    full = tiny("vit", "full")
    full.save_adapter(tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / ADAPTER_WEIGHTS))
    backbone = {f"method.backbone.model.{n}" for n, _ in full.backbone.model.named_parameters()}
    assert set(saved) == backbone | {"head.fc.weight", "head.fc.bias"}
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in full.parameters())

    lora = tiny("vit", "lora")
    lora.save_adapter(tmp_path / "lora")
    saved = load_file(str(tmp_path / "lora" / ADAPTER_WEIGHTS))
    assert len(saved) == 2 * 6 + 2
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("head.") for n in saved)
    assert sum(t.numel() for t in saved.values()) == EXPECTED["vit"]["lora"]


# --- what cannot work fails at construction, with the reason ----------------------------------------------


def test_lora_target_matching_nothing_names_the_pattern_and_what_exists() -> None:
    with pytest.raises(sidetune.ConfigError) as err:
        tiny("vit", "lora", target_modules=("to_qkv",))
    message = str(err.value)
    assert "target_modules=('to_qkv',)" in message and "not found" in message
    assert "blocks.0.attn.qkv" in message and "blocks.0.mlp.fc1" in message
    with pytest.raises(sidetune.ConfigError) as err:
        tiny("swin", "lora", target_modules=r"layers\.9\..*qkv")
    message = str(err.value)
    assert r"layers\.9\..*qkv" in message and "not found" in message
    assert "layers.0.blocks.0.attn.qkv" in message and "layers.1.downsample.reduction" in message


def test_lora_target_of_an_unsupported_layer_type_says_so() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"norm1.*LayerNorm.*not supported"):
        tiny("vit", "lora", target_modules=("norm1",))


def test_partial_k_beyond_depth_fails_with_the_depth() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"partial-7: test_vit has 6 blocks, so at most partial-6"):
        tiny("vit", "partial-7")
    with pytest.raises(sidetune.ConfigError, match=r"k must be a positive integer"):
        tiny("vit", "partial-0")


def test_vpt_without_prompts_fails() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"VPT: num_prompts must be a positive integer, got 0"):
        tiny("vit", "vpt", num_prompts=0)


@pytest.mark.parametrize(
    ("key", "method", "reason"),
    [
        ("swin", "vpt", r"swin family\): Swin attends within windows"),
        ("convnext", "vpt", r"cnn family\): prompt tokens need a token sequence"),
        ("efficientnet", "adapter", r"cnn family\): it inserts bottlenecks after the attention and MLP"),
        ("convnext", "adaptformer", r"cnn family\): it puts a bottleneck beside the MLP"),
        ("efficientnet", "lst", r"cnn family\): LST's side network is the backbone's transformer blocks"),
    ],
)
def test_unsupported_family_fails_with_the_reason(key: str, method: str, reason: str) -> None:
    with pytest.raises(sidetune.ConfigError, match=reason):
        tiny(key, method)


def test_bad_options_fail_early() -> None:
    with pytest.raises(sidetune.ConfigError, match="LoRA: r must be a positive integer"):
        tiny("vit", "lora", r=0)
    with pytest.raises(sidetune.ConfigError, match="positions must be distinct names"):
        tiny("vit", "adapter", positions=("ffn",))
    with pytest.raises(sidetune.ConfigError, match="input must be one of"):
        tiny("vit", "adaptformer", input="both")
    with pytest.raises(sidetune.ConfigError, match="not divisible by 2 attention heads"):
        tiny("vit", "lst", reduction=64)
    with pytest.raises(sidetune.ConfigError, match="option grad_checkpointing must be true or false, got 'yes'"):
        tiny("vit", "full", grad_checkpointing="yes")


@pytest.mark.parametrize(
    ("key", "method"), [("swin", "lora"), ("swin", "partial-1"), ("vit_reg", "vpt"), ("convnext", "full")]
)
def test_dense_tasks_get_every_stage_output(key: str, method: str) -> None:
    """For dense heads an in-place method returns each stage's raw output (with autograd), at its stride."""
    name, kwargs, size = TINY_BACKBONES[key]
    family = family_of(name)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, **({"img_size": size} if family.accepts_img_size else {}), **kwargs)
    spec = sidetune.get_method(method)
    dense = spec.build(TimmBackbone(model, family, (size, size), name), spec.make_config(), "segmentation")
    feats = dense(images(key, 2))
    layout = dense.backbone.layout
    assert feats.strides == list(layout.stage_strides)
    assert [tuple(p.shape[1:]) for p in feats.pyramid] == [
        (c, *grid) for c, grid in zip(layout.stage_dims, layout.stage_grids, strict=True)
    ]
    assert feats.pyramid[-1].requires_grad
