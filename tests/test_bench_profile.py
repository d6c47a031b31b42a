"""The efficiency profiler: saved-activation bounds, report schema, failures, the memory fit and the CLI.

Everything runs on the tiny backbones of conftest (test_vit at 64 px) with a batch of 2-4 images.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sidetune
from sidetune.bench import measure_peak_rss
from sidetune.bench.accounting import saved_tensor_bytes
from sidetune.bench.commands import _parse_option
from sidetune.bench.levers import Levers, apply_levers, autocast, side_variants
from sidetune.bench.plan import MemoryFit, fit_memory, parse_size, plan
from sidetune.bench.profile import (
    DOES_NOT_FIT,
    ERROR,
    OK,
    BenchConfig,
    failure_status,
    plan_rows,
    profile,
    split_methods,
)
from sidetune.bench.report import csv_text, markdown, read_accuracies, write_report
from sidetune.errors import ConfigError
from sidetune.methods import _REGISTRY, MethodSpec
from sidetune.side.base import SideMethod

from conftest import TINY_BACKBONES, images, tiny

SIDE_METHODS = [m["name"] for m in sidetune.list_methods() if m["kind"] == "side"]
BATCH = 4


def _key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _DerivedBytes(TorchDispatchMode):
    """Bytes of every tensor computed (at the aten level) from ``sources``, each storage once."""

    def __init__(self, sources: list[torch.Tensor]) -> None:
        super().__init__()
        self.derived = {_key(t) for t in sources}
        self.sizes: dict[tuple[int, int], int] = {}
        self.keep: list[torch.Tensor] = []  # no storage is freed (and its address reused) while counting

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(t.requires_grad or _key(t) in self.derived for t in inputs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.keep.append(t)
                    self.derived.add(_key(t))
                    self.sizes.setdefault(_key(t), t.untyped_storage().nbytes())
        return out


def _side_bound(model, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(tap bytes, bytes the side network computes from the taps): the most a side method can save.

    The taps come from one no-grad backbone pass (their shapes are the method's tap request); the side part
    runs ``forward_taps`` + head + loss on them alone, so no backbone activation can enter the bound.
    """
    with torch.no_grad():
        taps = model.backbone(x, model.method.tap_request)
    tap_tensors = [*taps.attn.values(), *taps.mlp.values(), *taps.out.values(), taps.final]
    tap_bytes = sum({_key(t): t.untyped_storage().nbytes() for t in tap_tensors}.values())
    mode = _DerivedBytes([*tap_tensors, *model.trainable_parameters(), y])
    with mode:
        F.cross_entropy(model.head(model.method.forward_taps(taps)), y)
    side_bytes = sum(n for k, n in mode.sizes.items() if k not in {_key(t) for t in tap_tensors})
    return tap_bytes, side_bytes


def _full_fine_tune_saved(x: torch.Tensor, y: torch.Tensor) -> int:
    """Activation bytes full fine-tuning saves: the ``full`` method, or the same timm model trained by hand."""
    if "full" in {m["name"] for m in sidetune.list_methods()}:
        model = tiny("vit", "full").train()
        return saved_tensor_bytes(lambda: F.cross_entropy(model(x), y), module=model).activation_bytes
    name, kwargs, _ = TINY_BACKBONES["vit"]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).train()
    return saved_tensor_bytes(lambda: F.cross_entropy(model(x), y), module=model).activation_bytes


@pytest.fixture(scope="module")
def full_saved() -> int:
    x = images("vit", BATCH)
    y = torch.arange(BATCH) % 5
    return _full_fine_tune_saved(x, y)


@pytest.mark.parametrize("method", SIDE_METHODS)
def test_side_methods_save_only_taps_and_side_activations(method: str, full_saved: int) -> None:
    model = tiny("vit", method).train()
    assert isinstance(model.method, SideMethod)
    x, y = images("vit", BATCH), torch.arange(BATCH) % 5
    report = saved_tensor_bytes(lambda: F.cross_entropy(model(x), y), module=model)
    tap_bytes, side_bytes = _side_bound(model, x, y)
    assert report.activation_bytes <= tap_bytes + side_bytes, (report, tap_bytes, side_bytes)
    # Nothing of the backbone's own activations: a toy width-64 ViT makes rank-32 adapters (e3va++) as
    # wide as the backbone, so the toy ratio is far above ViT-B's (docs/benchmarks: <= 0.10).
    assert report.activation_bytes < 0.75 * full_saved, (report.activation_bytes, full_saved)
    if method in ("linear", "losa", "e3va", "lst"):
        assert report.activation_bytes < 0.5 * full_saved


# ------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------

# One thread: on a busy machine every multi-threaded op waits for a core at its OpenMP barrier.
_TINY = dict(backbone="test_vit", img_size=64, batch_size=2, warmup=1, rounds=2, threads=1)


@pytest.fixture(scope="module")
def report():
    config = BenchConfig(methods=("full", "linear", "losa", "losa[recompute=false]"), peak_memory=False, **_TINY)
    return profile(config, command="pytest")


_ROW_TYPES = {
    "name": str,
    "method": str,
    "kind": str,
    "backprop_through_backbone": bool,
    "levers": str,
    "options": dict,
    "status": str,
    "trainable_params": int,
    "total_params": int,
    "checkpoint_bytes": int,
    "saved_activation_bytes": int,
    "saved_parameter_bytes": int,
    "param_bytes": int,
    "grad_bytes": int,
    "optimizer_state_bytes": int,
    "static_bytes": int,
    "step_time_s": float,
    "cache_bytes_per_image": (int, type(None)),
    "step_time_min_s": float,
    "step_wall_s": float,
    "step_cpu_s": float,
    "step_time_p90_s": float,
    "timed_steps": int,
    "throughput": float,
    "floor_s": float,
    "floor_frozen_s": float,
    "floor_kind": str,
    "inference_s": float,
    "inference_min_s": float,
    "inference_gflops": float,
    "time_vs_ref": float,
    "time_vs_floor": float,
    "time_vs_inference": float,
    "saved_activation_dtypes": dict,
    "saved_vs_ref": float,
    "static_vs_ref": float,
    "params_vs_ref": float,
}
_ROW_KEYS = {
    *_ROW_TYPES,
    "error",
    "peak_bytes",
    "peak_growth_bytes",
    "peak_method",
    "floor_side_s",
    "compile_s",
    "peak_vs_ref",
}


def test_json_schema_is_stable(report) -> None:
    data = json.loads(json.dumps(report.as_dict()))
    assert set(data) == {
        "schema",
        "schema_version",
        "command",
        "created",
        "environment",
        "settings",
        "reference",
        "reference_found",
        "notes",
        "rows",
    }
    assert (data["schema"], data["schema_version"], data["command"]) == ("sidetune.bench", 1, "pytest")
    assert {"torch", "timm", "device", "torch_threads", "git_commit"} <= set(data["environment"])
    assert data["settings"]["backbone"] == "test_vit" and data["settings"]["img_size"] == [64, 64]
    assert data["reference"] == "full" and data["reference_found"] is True
    # A variant row (a method with options of its own) has the same fields as every row: its name as written,
    # the method, and its options.
    assert [r["name"] for r in data["rows"]] == ["full", "linear", "losa", "losa[recompute=false]"]
    assert data["settings"]["methods"] == ["full", "linear", "losa", "losa[recompute=false]"]
    for row in data["rows"]:
        assert set(row) == _ROW_KEYS
        assert row["status"] == OK, row
        for key, typ in _ROW_TYPES.items():
            assert isinstance(row[key], typ), (row["name"], key, row[key])
    full, linear, losa, keep_all = data["rows"]
    assert (keep_all["method"], keep_all["options"], losa["options"]) == ("losa", {"recompute": False}, {})
    assert keep_all["trainable_params"] == losa["trainable_params"]
    assert 0 < losa["saved_activation_bytes"] < keep_all["saved_activation_bytes"]  # recompute is LoSA's default
    assert full["time_vs_ref"] == full["saved_vs_ref"] == 1.0
    assert (full["floor_kind"], linear["floor_kind"], losa["floor_kind"]) == ("inference_forward", "side", "side")
    assert losa["floor_s"] == pytest.approx(losa["floor_frozen_s"] + losa["floor_side_s"])
    # x inference: the step over one plain inference forward, the same forward for every row (in-place rows' floor)
    assert len({r["inference_s"] for r in data["rows"]}) == 1 and full["inference_s"] == full["floor_s"]
    for row in data["rows"]:
        assert row["time_vs_inference"] == pytest.approx(row["step_time_s"] / row["inference_s"])
        assert set(row["saved_activation_dtypes"]) <= {"float32", "int64"} and row["levers"] == "none"
    assert losa["trainable_params"] == tiny("vit", "losa", num_classes=10).num_parameters()
    assert full["backprop_through_backbone"] and not losa["backprop_through_backbone"]
    assert losa["saved_activation_bytes"] < full["saved_activation_bytes"]
    assert linear["optimizer_state_bytes"] == 2 * 4 * linear["trainable_params"]
    assert losa["checkpoint_bytes"] > 4 * losa["trainable_params"]  # safetensors + config json


def test_saved_bytes_are_deterministic(report) -> None:
    again = profile(BenchConfig(methods=("losa",), peak_memory=False, **{**_TINY, "rounds": 1}), command="x")
    assert again.rows[0].saved_activation_bytes == report.row("losa").saved_activation_bytes
    assert "reference method 'full' was not measured" in again.notes[0]
    assert again.rows[0].time_vs_ref is None and again.rows[0].time_vs_floor is not None


def test_a_reference_that_names_no_row_is_refused_before_anything_is_measured() -> None:
    with pytest.raises(ConfigError, match=r"unknown --reference row 'fulll'. Did you mean 'full'"):
        profile(BenchConfig(methods=("full", "losa"), reference="fulll", peak_memory=False, **_TINY), command="x")


def test_markdown_and_csv(report) -> None:
    text = markdown(report)
    assert "Command: `pytest`" in text and "| losa | side |" in text and "x full time" in text
    assert "| losa[recompute=false] | side |" in text
    assert "| x floor | x inference | x full time |" in text
    assert "Precision, the same for every row: float32 (no autocast)." in text
    rows = list(csv.DictReader(line for line in csv_text(report).splitlines() if not line.startswith("#")))
    assert [r["name"] for r in rows] == ["full", "linear", "losa", "losa[recompute=false]"]
    assert json.loads(rows[3]["options"]) == {"recompute": False}
    assert float(rows[2]["time_vs_inference"]) > 0
    assert set(rows[0]) == _ROW_KEYS


def _oom_spec(name: str) -> MethodSpec:
    class OutOfMemory(SideMethod):
        def forward_taps(self, taps):
            raise MemoryError("forced: no room for this batch")

    @dataclasses.dataclass
    class Config:
        pass

    return MethodSpec(name, "test-only", "side", Config, lambda b, c, t: OutOfMemory(b), ("vit", "swin", "cnn"))


def test_a_row_that_does_not_fit_leaves_the_others(monkeypatch) -> None:
    monkeypatch.setitem(_REGISTRY, "oom-test", _oom_spec("oom-test"))
    config = BenchConfig(methods=("linear", "oom-test"), peak_memory=False, **_TINY)
    result = profile(config, command="x")
    statuses = {r.name: r.status for r in result.rows}
    assert statuses == {"linear": OK, "oom-test": DOES_NOT_FIT}
    bad = result.row("oom-test")
    assert "no room" in bad.error and bad.step_time_s is None and bad.trainable_params is not None
    assert "does not fit: MemoryError" in markdown(result)
    assert result.row("linear").step_time_s > 0


def test_rss_cap_reads_as_does_not_fit() -> None:
    probe = measure_peak_rss(
        "sidetune.bench.memory_probe:_demo_alloc", {"mb": 400}, timeout=60, max_rss_bytes=150 * 2**20
    )
    assert not probe.ok and "max_rss cap" in probe.error
    assert failure_status(probe.error) == DOES_NOT_FIT
    assert failure_status("probe process was killed by signal 9 (SIGKILL: out of memory?)") == DOES_NOT_FIT
    assert failure_status("ConfigError: bad size") == ERROR


def test_backbone_that_cannot_run_at_the_size_is_an_error_row() -> None:
    config = BenchConfig(**{**_TINY, "img_size": 50, "rounds": 1}, methods=("linear", "losa"), peak_memory=False)
    result = profile(config, command="x")
    assert [r.status for r in result.rows] == [ERROR, ERROR]
    assert all("divisible by patch size" in r.error for r in result.rows)
    assert "| linear | side |" in markdown(result)


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'lossa'.*Did you mean 'losa'"):
        BenchConfig(methods=("lossa",))


def test_fp16_training_rows_are_refused_on_the_cpu_as_train_refuses_them() -> None:
    with pytest.raises(ConfigError, match=r"bench: fp16 training runs on CUDA only .* use --precision fp32"):
        BenchConfig(methods=("e3va",), precision="fp16", device="cpu")


def test_rows_plan_levers_and_gc() -> None:
    """Run-wide levers are in every row and in no row name; side-only levers add labelled side rows."""
    config = BenchConfig(
        methods=("losa", "full", "lora"),
        precision="bf16",
        frozen_low_precision=True,
        compile=True,
        cache=True,
        grad_checkpointing=True,
    )
    rows = plan_rows(config)
    assert [r.name for r in rows] == ["losa", "losa+cache", "full", "full+gc", "lora", "lora+gc"]
    assert all(r.levers.precision == "bf16" and r.levers.frozen_low_precision and r.levers.compile for r in rows)
    assert [r.name for r in rows if r.levers.side_only] == ["losa+cache"]
    assert rows[1].levers.description == "bf16,frozen-weights-bf16,compile,cache"
    fp32 = {r.name: r.levers for r in plan_rows(BenchConfig(methods=("e3va", "full"), frozen_precision="bf16"))}
    assert list(fp32) == ["e3va", "e3va+bf16-frozen", "full"]
    assert fp32["e3va+bf16-frozen"].label == "+bf16-frozen" and not fp32["full"].active
    assert [v.label for v in side_variants(Levers(), "bf16", True)] == ["", "+bf16-frozen", "+cache"]
    assert _parse_option("losa.channel_rank=32") == ("losa", "channel_rank", 32)
    assert _parse_option("losa.blocks=[0,1]") == ("losa", "blocks", (0, 1))
    assert _parse_option("losa.recompute=True") == ("losa", "recompute", True)
    with pytest.raises(ConfigError, match="frozen weights in low precision need a 16-bit precision"):
        BenchConfig(methods=("lora",), frozen_low_precision=True)


def test_variant_rows_carry_their_options_beside_the_plain_method() -> None:
    text = "full,losa,losa[recompute=false],losa[recompute=false,channel_rank=8],e3va[ recompute = false ]"
    assert split_methods(text) == [
        "full",
        "losa",
        "losa[recompute=false]",
        "losa[recompute=false,channel_rank=8]",
        "e3va[ recompute = false ]",
    ]
    config = BenchConfig(
        methods=(*split_methods(text), "losa"),  # a repeated entry is measured once
        method_options={"losa": {"token_rank": 4}},  # --option: every losa row, a variant's own options win
        cache=True,
        grad_checkpointing=True,
    )
    rows = {r.name: r for r in plan_rows(config)}
    assert list(rows) == [
        "full",
        "full+gc",
        "losa",
        "losa+cache",
        "losa[recompute=false]",
        "losa[recompute=false]+cache",
        "losa[recompute=false,channel_rank=8]",
        "losa[recompute=false,channel_rank=8]+cache",
        "e3va[recompute=false]",
        "e3va[recompute=false]+cache",
    ]
    assert rows["losa"].options == {"token_rank": 4}
    assert rows["losa[recompute=false,channel_rank=8]"].options == {
        "token_rank": 4,
        "recompute": False,
        "channel_rank": 8,
    }
    assert rows["e3va[recompute=false]+cache"].method == "e3va" and rows["e3va[recompute=false]"].options == {
        "recompute": False
    }
    lora = {r.name: r.options for r in plan_rows(BenchConfig(methods=("lora[r=4]",), grad_checkpointing=True))}
    assert lora == {"lora[r=4]": {"r": 4}, "lora[r=4]+gc": {"r": 4, "grad_checkpointing": True}}


@pytest.mark.parametrize(
    ("methods", "options", "message"),
    [
        (
            ("losa[recompuet=true]",),
            {},
            r"method 'losa' has no option 'recompuet' .*Valid options of 'losa': .*recompute",
        ),
        (("linear[rank=4]",), {}, r"method 'linear' has no option 'rank'.*Valid options of 'linear': none"),
        (("losa",), {"losa": {"bogus": 1}}, r"method 'losa' has no option 'bogus'.*Valid options of 'losa'"),
        (("losa[recompute]",), {}, r"KEY=VALUE separated by commas"),
        (("losa[recompute=true",), {}, r"unclosed '\['"),
        (("losa[]",), {}, r"names no option"),
        (("lossa[recompute=true]",), {}, r"unknown method 'lossa'.*Did you mean 'losa'"),
    ],
)
def test_bad_variants_fail_before_measuring(methods, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        BenchConfig(methods=tuple(split_methods(",".join(methods))), method_options=options)


def test_cli_variant_rows_parse_and_unknown_options_are_one_line(capsys) -> None:
    from sidetune.bench.commands import _config_from_args
    from sidetune.cli import build_parser, main

    args = build_parser().parse_args(["bench", "--methods", "full,losa,losa[recompute=true],e3va[recompute=true]"])
    assert _config_from_args(args).methods == ("full", "losa", "losa[recompute=true]", "e3va[recompute=true]")
    assert main(["bench", "--methods", "losa[rank=4]", "--backbone", "test_vit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sidetune bench: error: bench: method 'losa' has no option 'rank'") and "\n" not in err
    assert "channel_rank" in err and "recompute" in err


def test_levers_keep_numerics() -> None:
    """compile and frozen weights in the autocast dtype change no number; the side-only frozen precision keeps the
    side network in float32; levers that cannot apply say why."""
    x = images("vit", 2)
    plain = tiny("vit", "e3va").eval()
    with torch.no_grad():
        reference = plain(x)
    model = tiny("vit", "e3va").eval()
    apply_levers(model, Levers(compile=True, compile_backend="eager"), "side", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)
    cpu = torch.device("cpu")
    for key, method in (("vit", "lora"), ("vit", "losa"), ("swin", "lora"), ("swin", "e3va")):
        x = images(key, 2)
        a, b = tiny(key, method).train(), tiny(key, method).train()
        b.load_state_dict(a.state_dict())
        levers = Levers(precision="bf16", frozen_low_precision=True)
        apply_levers(b, levers, get_kind(method), cpu)
        frozen = [p for p in b.parameters() if not p.requires_grad and p.dtype == torch.bfloat16]
        assert frozen and all(p.dtype == torch.float32 for p in b.trainable_parameters())
        assert next(b.backbone.model.parameters()).dtype == torch.float32  # what the backbone checks images against
        outs = []
        for m in (a, b):
            with autocast(levers, cpu):
                out = m(x)
            out.float().sum().backward()
            outs.append((out, [p.grad for p in m.trainable_parameters()]))
        assert torch.equal(outs[0][0], outs[1][0])  # autocast casts a float32 weight to these very values
        assert all(torch.equal(g, h) for g, h in zip(outs[0][1], outs[1][1], strict=True))
    x = images("vit", 2)
    low = tiny("vit", "e3va").train()
    apply_levers(low, Levers(frozen_precision="bf16"), "side", cpu)
    taps = low.backbone(x, low.method.tap_request)
    assert all(t.dtype == torch.float32 for t in [*taps.attn.values(), taps.final])
    F.cross_entropy(low(x), torch.tensor([0, 1])).backward()
    assert all(p.grad.dtype == torch.float32 for p in low.trainable_parameters())
    with pytest.raises(ConfigError, match="only side methods"):
        apply_levers(tiny("vit", "linear"), Levers(cache=True), "inplace", cpu)
    with pytest.raises(ConfigError, match="CNN backbones only"):
        apply_levers(tiny("vit", "linear"), Levers(channels_last=True), "side", cpu)


def get_kind(method: str) -> str:
    return next(m["kind"] for m in sidetune.list_methods() if m["name"] == method)


def test_every_row_trains_in_the_run_precision_and_reads_x_inference() -> None:
    """A bf16 run: full fine-tuning and LoRA train under the same autocast as the side methods (their saved
    activations are bf16 too), LoRA's base weights and the side backbone are stored in bf16, the cache row is
    labelled, and every row has its step over the plain inference forward."""
    config = BenchConfig(
        methods=("full", "lora", "e3va"),
        precision="bf16",
        frozen_low_precision=True,
        cache=True,
        peak_memory=False,
        **{**_TINY, "rounds": 1},
    )
    result = profile(config, command="x")
    assert [r.name for r in result.rows] == ["full", "lora", "e3va", "e3va+cache"]
    for row in result.rows:
        assert row.status == OK, row.error
        assert row.saved_activation_dtypes.get("bfloat16", 0) > 0, row.name
        assert row.levers.startswith("bf16,frozen-weights-bf16")
        assert row.time_vs_inference == pytest.approx(row.step_time_s / row.inference_s)
    full, lora, e3va, cached = result.rows
    assert full.param_bytes > lora.param_bytes  # LoRA's frozen base weights in bf16; full's all train in float32
    assert cached.floor_kind == "cache" and cached.floor_s is None and e3va.floor_kind == "side"
    text = markdown(result)
    assert "bf16 autocast over every row's forward and loss" in text and "`+cache`" in text
    assert "| e3va+cache | side |" in text and "(cached, " in text and "/img)" in text


# ------------------------------------------------------------------------------------------------------
# The memory fit
# ------------------------------------------------------------------------------------------------------


def test_fit_predictor_on_synthetic_points() -> None:
    fit = fit_memory([(4, 1_000 + 4 * 50), (16, 1_000 + 16 * 50)])
    assert fit.fixed_bytes == pytest.approx(1_000) and fit.per_sample_bytes == pytest.approx(50)
    assert fit.max_batch(1_000 + 50 * 37 + 49) == 37
    assert fit.max_batch(900) == 0
    noisy = fit_memory([(2, 210), (4, 390), (8, 810), (16, 1590)])  # least squares through noise
    assert noisy.per_sample_bytes == pytest.approx(11400 / 115)
    assert MemoryFit(1_000, 0, ()).max_batch(10**9) is None
    with pytest.raises(ValueError, match="two distinct batch sizes"):
        fit_memory([(4, 100), (4, 120)])
    assert parse_size("11GB") == 11 * 10**9 and parse_size("11GiB") == 11 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20 and parse_size("2.5G") == 2_500_000_000
    with pytest.raises(ConfigError):
        parse_size("eleven gigs")


def test_plan_predicts_checks_and_refits(monkeypatch) -> None:
    """A machine where memory is 1 GB + 10 MB per image below batch 50 and 1 GB + 12 MB above it."""

    thresholds = set()

    def fake_measure(config, row, batch, device, max_rss, mmap_threshold=None):
        thresholds.add(mmap_threshold)
        per = 10 * 10**6 if batch < 50 else 12 * 10**6
        return True, 10**9 + per * batch, None

    monkeypatch.setattr("sidetune.bench.plan._measure", fake_measure)
    config = BenchConfig(backbone="test_vit", methods=("losa",), img_size=64)
    result = plan(config, budget_bytes=10**9 + 10**9, batches=(4, 16), max_check_batch=1000)
    row = result.rows[0]
    assert row.points[:2] == [(4, 10**9 + 4 * 10**7), (16, 10**9 + 16 * 10**7)]
    # first prediction 100 (1 GB / 10 MB) measures 2.2 GB: refit on three points, check again
    assert row.verdict == "fits" and row.checked_batch == row.max_batch < 100
    assert row.checked_bytes <= 2 * 10**9
    assert "| losa |" in result.markdown()
    assert thresholds == {None} and "glibc's default allocator policy" in result.measure
    unchecked = plan(config, budget_bytes=2 * 10**9, batches=(4, 16), check=False, mmap_threshold=131072)
    assert (unchecked.rows[0].max_batch, unchecked.rows[0].verdict) == (100, "predicted")
    assert thresholds == {None, 131072} and "mmap threshold fixed at 131072 bytes" in unchecked.measure
    # the recorded settings are what the probes ran with, not BenchConfig's default
    assert result.as_dict()["settings"]["probe_mmap_threshold"] is None
    assert unchecked.as_dict()["settings"]["probe_mmap_threshold"] == 131072


# ------------------------------------------------------------------------------------------------------
# Training results and the CLI
# ------------------------------------------------------------------------------------------------------


def test_read_accuracies_is_tolerant(tmp_path) -> None:
    (tmp_path / "list.json").write_text(json.dumps([{"method": "losa", "accuracy": 81.5}, {"note": "skip me"}]))
    run = tmp_path / "runs" / "e3va"
    run.mkdir(parents=True)
    summary = {"model": {"method": "e3va"}, "metrics": {"test": {"top1": 0.7}, "best_val_top1": 0.9}}
    (run / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "val.json").write_text(json.dumps({"results": [{"config": {"method": "full"}, "val_acc": 0.6}]}))
    acc = read_accuracies([tmp_path / "list.json", tmp_path / "runs", tmp_path / "val.json"])
    assert acc == {"losa": pytest.approx(0.815), "e3va": 0.7, "full": 0.6}
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no record"):
        read_accuracies([tmp_path / "empty.json"])


def test_cli_bench_end_to_end(tmp_path) -> None:
    from sidetune.cli import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"method": "linear", "accuracy": 0.5}, {"method": "losa", "accuracy": 0.6}]))
    out = tmp_path / "bench"
    argv = ["bench", "--methods", "linear,losa", "--backbone", "test_vit", "--img-size", "64", "--batch-size", "2"]
    argv += ["--rounds", "2", "--threads", "1", "--out", str(out), "--results", str(results)]
    assert main(argv) == 0
    for suffix in (".md", ".csv", ".json", "_memory.png", "_time.png", "_pareto.png"):
        path = out / f"bench{suffix}"
        assert path.is_file() and path.stat().st_size > 0, path
    data = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["linear", "losa"]
    for row in data["rows"]:
        assert row["status"] == OK, row
        assert row["peak_growth_bytes"] > 0 and row["peak_method"]
        assert row["peak_bytes"] > row["peak_growth_bytes"]
    assert "reference method 'full' was not measured" in data["notes"][0]
    assert "--methods linear,losa" in (out / "bench.md").read_text()
    assert main(["bench", "--methods", "nope", "--backbone", "test_vit"]) == 2


def test_write_report_without_plots(report, tmp_path) -> None:
    written = write_report(report, tmp_path, "r", plots=False)
    assert sorted(written) == ["csv", "json", "md"]
    assert json.loads(written["json"].read_text())["rows"] == [r.as_dict() for r in report.rows]


def test_efficiency_benchmark_targets_judge_the_defaults_against_lora_gc(report, tmp_path) -> None:
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("efficiency", REPO / "benchmarks" / "efficiency.py")
    efficiency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(efficiency)
    assert {"losa", "e3va", "losa[recompute=false]", "e3va[recompute=false]"} <= set(efficiency.METHODS)
    BenchConfig(methods=efficiency.METHODS)  # every default entry parses
    table, _ = efficiency.targets_markdown(report)
    assert "saved for backward / LoRA+gc (<= 1.00x)" in table and "step / inference forward (<= 1.10x)" in table
    assert "| losa |" in table and "| losa[recompute=false] |" in table and "| full |" not in table
    write_report(report, tmp_path, "efficiency_test_vit", plots=False)
    summary = efficiency.write_summary(tmp_path).read_text()
    assert "| efficiency_test_vit | fp32 | losa |" in summary
    assert "| efficiency_test_vit | fp32 | losa[recompute=false] |" in summary
    assert "| efficiency_test_vit | fp32 | full |" not in summary
    measure = "peak resident set (...; glibc's mmap threshold fixed at 131072 bytes (MALLOC_MMAP_THRESHOLD_))"
    batches = (("lora", 10), ("losa", 30), ("e3va", 15))
    rows = [{"name": n, "status": "ok", "max_batch": b} for n, b in batches]
    plan_json = {"command": "sidetune plan", "measure": measure, "rows": rows}
    (tmp_path / "plan_x.json").write_text(json.dumps(plan_json))
    summary = efficiency.write_summary(tmp_path).read_text()
    assert "| plan_x | RSS, glibc mmap threshold 131072 B | 10 | 30 (3.0x) | **15 (1.5x)** |" in summary
    rows = {r["name"]: r for r in json.loads((tmp_path / "efficiency_test_vit.json").read_text())["rows"]}
    lora_gc = dict(rows["losa"], name="lora+gc", saved_activation_bytes=2 * rows["losa"]["saved_activation_bytes"])
    assert efficiency._lora_gc_saved(rows["losa"], {**rows, "lora+gc": lora_gc}) == 0.5
    assert efficiency._lora_gc_saved(rows["losa"], rows) is None  # no lora+gc row: no ratio


def test_cache_rows_report_what_a_cache_stores_per_image(tmp_path) -> None:
    """`+cache` rows give the bytes `sidetune cache build` writes per image for the method, equal to a real cache's."""
    import math

    from safetensors import safe_open

    from sidetune.cache import build
    from train_data import make_image_folder, task_config

    report = profile(BenchConfig(methods=("losa", "e3va"), cache=True, peak_memory=False, **{**_TINY, "rounds": 1}),
                     command="x")  # fmt: skip
    rows = {r.name: r for r in report.rows}
    losa, e3va = rows["losa+cache"].cache_bytes_per_image, rows["e3va+cache"].cache_bytes_per_image
    assert losa > e3va > 0 and rows["losa"].cache_bytes_per_image is None
    assert "/img)" in markdown(report)
    data = make_image_folder(tmp_path / "images")
    for method, per_image in (("losa", losa), ("e3va", e3va)):
        config = task_config("classification", data, tmp_path / "x", method=method, img_size=_TINY["img_size"],
                             test_split="none")  # fmt: skip
        manifest = build(config, [method], tmp_path / method, splits=("train",))
        shard = tmp_path / method / manifest.splits["train"]["shards"][0]["file"]
        with safe_open(str(shard), "pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if k.startswith("tap.")]  # noqa: SIM118
        assert sum(math.prod(shape[1:]) * 2 for shape in shapes) == per_image, method


def test_a_step_below_its_own_floor_is_flagged_as_noise(report) -> None:
    """A step cannot cost less than a part of itself: such a row is marked, with the spread of its steps."""
    import copy

    from sidetune.bench.profile import add_ratios, noise_notes

    noisy = copy.deepcopy(report)
    for r in noisy.rows:  # every row honest (the fixture's own timings may be noisy on a loaded machine)
        if r.floor_s is not None:
            r.step_time_s = 1.2 * r.floor_s
    row = next(r for r in noisy.rows if r.floor_s is not None)
    row.step_time_s, row.step_time_min_s, row.step_time_p90_s = 0.8 * row.floor_s, 0.7 * row.floor_s, row.floor_s
    add_ratios(noisy)
    notes = noise_notes(noisy)
    assert len(notes) == 1 and notes[0].startswith(f"{row.name}: its median step") and "measurement noise" in notes[0]
    assert "fastest" in notes[0] and "90th percentile" in notes[0]
    line = next(line for line in markdown(noisy).splitlines() if line.startswith(f"| {row.name} |"))
    assert "0.80x (noise)" in line
