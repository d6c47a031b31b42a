"""Tests of the profiler's measurement primitives (sidetune.bench)."""

from __future__ import annotations

import gc
import re
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from sidetune.bench import (
    ProbeResult,
    SavedTensorReport,
    TimingReport,
    environment_info,
    inference_flops,
    measure_cuda_peak,
    measure_peak_rss,
    rss_method,
    saved_tensor_bytes,
    static_memory_bytes,
    time_step,
)

MIB = 1 << 20
F32 = 4
TESTS_DIR = Path(__file__).resolve().parent
WORKLOADS = "bench_probe_workloads"  # tests/bench_probe_workloads.py, imported by the child from TESTS_DIR


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------
# saved_tensor_bytes
# --------------------------------------------------------------------------------------------------


def test_linear_trainable_weight_saves_only_its_input() -> None:
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)  # no grad: mm saves the input for grad(weight), not the weight
    report = saved_tensor_bytes(lambda: lin(x).sum(), module=lin)
    assert report.activation_bytes == 4 * 16 * F32
    assert report.parameter_bytes == 0
    assert (report.num_saved, report.num_unique) == (1, 1)
    assert report.activation_bytes_by_dtype == {"float32": 256}


def test_linear_input_requiring_grad_also_saves_weight_as_parameter() -> None:
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    report = saved_tensor_bytes(lambda: lin(x).sum(), module=lin)
    assert report.activation_bytes == 4 * 16 * F32
    assert report.parameter_bytes == 8 * 16 * F32  # weight.t() is a view of the parameter's storage
    assert report.num_parameter_tensors == 1
    assert report.total_bytes == 256 + 512


def test_without_module_a_weight_view_counts_as_activation() -> None:
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    report = saved_tensor_bytes(lambda: lin(x).sum())
    assert report.activation_bytes == 256 + 512
    assert report.parameter_bytes == 0


def test_frozen_weight_saves_weight_but_no_activation() -> None:
    lin = nn.Linear(16, 8, bias=False).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    report = saved_tensor_bytes(lambda: lin(x).sum(), module=lin)
    assert report.activation_bytes == 0
    assert report.parameter_bytes == 512


def test_frozen_module_and_plain_input_save_nothing() -> None:
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).requires_grad_(False)
    x = torch.randn(4, 16)
    report = saved_tensor_bytes(lambda: mlp(x).sum(), module=mlp)
    assert report == SavedTensorReport(0, 0, 0, 0, 0, 0, {})


def test_mlp_exact_bytes() -> None:
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    report = saved_tensor_bytes(lambda: mlp(x).sum(), module=mlp)
    # Linear1 saves x (weight needs grad); GELU saves its input; Linear2 saves its input (the GELU output)
    # and weight2.t(), because its input requires grad. Biases need nothing saved.
    assert report.activation_bytes == (4 * 16 + 4 * 32 + 4 * 32) * F32
    assert report.parameter_bytes == 32 * 8 * F32
    assert (report.num_saved, report.num_activation_tensors, report.num_parameter_tensors) == (4, 3, 1)


def test_same_tensor_saved_twice_counts_once() -> None:
    x = torch.randn(4, 16, requires_grad=True)
    report = saved_tensor_bytes(lambda: (x * x).sum())
    assert report.num_saved == 2
    assert report.num_unique == 1
    assert report.activation_bytes == 256


def test_views_count_once_at_full_storage_size() -> None:
    x = torch.randn(4, 16, requires_grad=True)
    report = saved_tensor_bytes(lambda: (x[:1] * x[1:2]).sum())  # two 64-byte views of one storage
    assert report.num_saved == 2
    assert report.activation_bytes == 256


def test_per_dtype_breakdown() -> None:
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    report = saved_tensor_bytes(lambda: lin((x * x).float()).sum(), module=lin)
    assert report.activation_bytes_by_dtype == {"float32": 4 * 16 * 4, "float64": 4 * 16 * 8}
    assert report.activation_bytes == 768
    assert report.parameter_bytes == 512

    lb = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    xb = torch.randn(4, 16, dtype=torch.bfloat16)
    assert saved_tensor_bytes(lambda: lb(xb).float().sum(), module=lb).activation_bytes_by_dtype == {"bfloat16": 128}


def test_deterministic_and_backward_still_works() -> None:
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    expected = torch.autograd.grad(mlp(x).pow(2).mean(), list(mlp.parameters()))
    losses: list[torch.Tensor] = []

    def fn() -> torch.Tensor:
        losses.append(mlp(x).pow(2).mean())
        return losses[-1]

    first = saved_tensor_bytes(fn, module=mlp)
    second = saved_tensor_bytes(fn, module=mlp)
    assert first == second
    got = torch.autograd.grad(losses[-1], list(mlp.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_report_keeps_no_tensor_alive() -> None:
    x = torch.randn(64, 64, requires_grad=True)
    refs: list[weakref.ref] = []

    def fn() -> torch.Tensor:
        a = x * 2
        refs.append(weakref.ref(a))
        return (a * a).sum()  # mul saves `a`

    report = saved_tensor_bytes(fn)
    gc.collect()
    assert report.activation_bytes == 64 * 64 * F32
    assert refs[0]() is None


# --------------------------------------------------------------------------------------------------
# static_memory_bytes
# --------------------------------------------------------------------------------------------------


def test_static_memory_known_counts() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Linear(20, 5))
    model[0].requires_grad_(False)
    n_all = (10 * 20 + 20) + 2 * 20 + (20 * 5 + 5)  # 365
    n_train = 2 * 20 + (20 * 5 + 5)  # 145
    buffers = 2 * 20 * F32 + 8  # running mean/var + int64 num_batches_tracked

    adamw = static_memory_bytes(model)
    assert adamw.num_parameters == n_all
    assert adamw.num_trainable == n_train
    assert adamw.parameter_bytes == n_all * F32
    assert adamw.trainable_bytes == adamw.gradient_bytes == n_train * F32
    assert adamw.optimizer_state_bytes == 2 * n_train * F32
    assert adamw.buffer_bytes == buffers
    assert adamw.total_bytes == n_all * F32 + buffers + n_train * F32 + 2 * n_train * F32

    assert static_memory_bytes(model, "SGD_momentum").optimizer_state_bytes == n_train * F32
    assert static_memory_bytes(model, "sgd").optimizer_state_bytes == 0
    with pytest.raises(ValueError, match="unknown optimizer"):
        static_memory_bytes(model, "lion")


def test_static_memory_shared_and_low_precision_parameters() -> None:
    lin = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    tied = nn.Sequential(lin, lin)  # one parameter, used twice
    mem = static_memory_bytes(tied, "adamw")
    assert mem.parameter_bytes == mem.gradient_bytes == 16 * 2
    assert mem.optimizer_state_bytes == 2 * 16 * F32  # optimizer state is kept in fp32


# --------------------------------------------------------------------------------------------------
# time_step / inference_flops / environment_info
# --------------------------------------------------------------------------------------------------


def test_time_step_counts_and_statistics() -> None:
    calls = []

    def step() -> None:
        calls.append(1)
        time.sleep(0.001)

    report = time_step(step, warmup=2, iters=5, device="cpu")
    assert len(calls) == 7
    assert report.iters == 5
    assert report.warmup == 2
    assert all(t >= 0.001 for t in report.times_s)
    assert report.min_s <= report.median_s <= report.p90_s <= max(report.times_s)
    assert report.mean_s > 0
    assert report.throughput(32) == pytest.approx(32 / report.median_s)
    assert report.as_dict(batch_size=32)["iters"] == 5
    with pytest.raises(ValueError):
        time_step(step, warmup=0, iters=0)


def test_timing_statistics_by_hand() -> None:
    report = TimingReport(times_s=tuple(float(t) for t in range(10, 0, -1)), warmup=0, device="cpu")
    assert report.median_s == 5.5
    assert report.mean_s == 5.5
    assert report.min_s == 1.0
    assert report.p90_s == pytest.approx(9.1)
    assert report.throughput(11) == 2.0


def test_inference_flops_exact_and_restores_mode() -> None:
    assert inference_flops(nn.Linear(16, 8), torch.randn(4, 16)) == 2 * 4 * 16 * 8
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 8)).train()
    assert inference_flops(mlp, (torch.randn(4, 16),)) == 2 * 4 * 16 * 32 + 2 * 4 * 32 * 8
    assert all(m.training for m in mlp.modules())


def test_environment_info() -> None:
    info = environment_info()
    assert info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_count"] >= 1
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert {"timm", "python", "platform", "device", "device_name"} <= set(info)


# --------------------------------------------------------------------------------------------------
# Peak-memory probes
# --------------------------------------------------------------------------------------------------


def _probe(function: str, timeout: float = 60, **kwargs) -> ProbeResult:
    method = kwargs.pop("method", "auto")
    return measure_peak_rss(f"{WORKLOADS}:{function}", kwargs, timeout=timeout, pythonpath=[TESTS_DIR], method=method)


def test_probe_growth_tracks_allocation_size() -> None:
    big = _probe("alloc", mb=200)
    small = _probe("alloc", mb=10)
    assert big.ok and small.ok, (big.error, small.error)
    assert big.method == small.method == rss_method()
    assert big.growth_bytes >= 190 * MIB
    assert small.growth_bytes < 60 * MIB
    assert big.growth_bytes > small.growth_bytes + 150 * MIB
    assert big.peak_bytes - big.baseline_bytes == big.growth_bytes
    assert big.returncode == 0


def test_probe_excludes_setup_memory_with_a_packaged_target() -> None:
    # Also checks that the child can import targets inside sidetune itself.
    result = measure_peak_rss("sidetune.bench.memory_probe:_demo_alloc", {"mb": 10, "setup_mb": 200}, timeout=60)
    assert result.ok, result.error
    assert result.import_bytes is not None
    assert result.baseline_bytes - result.import_bytes >= 190 * MIB
    assert result.growth_bytes < 60 * MIB


@pytest.mark.parametrize("method", ["proc_sampling", "ru_maxrss"])
def test_probe_fallback_methods(method: str) -> None:
    result = _probe("alloc", mb=200, method=method)
    assert result.ok, result.error
    assert result.method == method
    assert result.growth_bytes >= 150 * MIB


def test_probe_failing_workloads_return_errors() -> None:
    oom = _probe("fail", message="no room")
    assert isinstance(oom, ProbeResult)
    assert (oom.ok, oom.error) == (False, "MemoryError: no room")
    setup = _probe("fail_in_setup", message="bad config")
    assert (setup.ok, setup.error) == (False, "ValueError: bad config")
    protocol = _probe("not_callable")
    assert not protocol.ok
    assert "must return a zero-argument callable" in (protocol.error or "")
    missing = measure_peak_rss("no_such_module_xyz:f", {}, timeout=60)
    assert not missing.ok
    assert "ModuleNotFoundError" in (missing.error or "")


def test_probe_child_death_and_timeout() -> None:
    died = _probe("exit_process", code=3)
    assert not died.ok
    assert died.returncode == 3
    assert "status 3" in (died.error or "")
    slow = _probe("sleep", timeout=1, seconds=30)
    assert not slow.ok
    assert "timed out" in (slow.error or "")


def test_probe_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        measure_peak_rss(f"{WORKLOADS}:alloc", {"mb": 1}, method="magic")
    with pytest.raises(TypeError):
        measure_peak_rss(f"{WORKLOADS}:alloc", {"mb": object()})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_peak_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        measure_cuda_peak(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_measures_allocation() -> None:
    def run() -> None:
        buf = torch.ones(64 * MIB // 4, device="cuda")
        del buf

    result = measure_cuda_peak(run)
    assert result.ok
    assert result.growth_bytes >= 64 * MIB

    def fail() -> None:
        raise torch.cuda.OutOfMemoryError("fake oom")

    failed = measure_cuda_peak(fail)
    assert not failed.ok
    assert "fake oom" in (failed.error or "")
