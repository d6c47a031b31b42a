"""Exact, in-process accounting of training memory, step time and FLOPs.

These are the measurement primitives behind the profiler. They work on any ``nn.Module`` plus a closure
and never depend on a particular backbone or adapter:

* :func:`saved_tensor_bytes` records what autograd keeps alive for the backward pass (the activation
  memory that side networks are designed to avoid), separating parameters (static memory) from
  activations.
* :func:`static_memory_bytes` counts parameters, gradients and optimizer state.
* :func:`time_step` times a training step with warm-up and CUDA synchronisation.
* :func:`inference_flops` counts the FLOPs of one forward pass.
* :func:`environment_info` describes the machine a measurement was taken on.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZER_STATE_MULTIPLIERS",
    "SavedTensorReport",
    "StaticMemory",
    "TimingReport",
    "environment_info",
    "inference_flops",
    "saved_tensor_bytes",
    "static_memory_bytes",
    "time_step",
]

#: Number of fp32 state tensors per trainable parameter element kept by each supported optimizer.
OPTIMIZER_STATE_MULTIPLIERS: dict[str, int] = {
    "adamw": 2,
    "adam": 2,
    "sgd_momentum": 1,
    "sgd": 0,
}

_FP32_BYTES = 4

# A storage is identified by its device and the address of its first byte plus its size; while the
# storage is alive (it is, during the recorded forward) no other live storage can share that key.
_StorageKey = tuple[str, int, int]


# --------------------------------------------------------------------------------------------------
# Saved tensors (activation memory)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedTensorReport:
    """What autograd saved for the backward pass of one forward.

    Every storage is counted once, however many saved tensors (views, repeated saves) refer to it, and
    at its full size, because the whole storage stays alive while any view of it is saved.

    Attributes:
        activation_bytes: Bytes of the distinct storages saved for backward that are not module
            parameters or buffers. This is the activation memory a training step must hold.
        parameter_bytes: Bytes of the distinct storages saved for backward that belong to the module's
            parameters or buffers (static memory that exists anyway, reported apart).
        num_saved: Number of times the pack hook was called (saved tensors, duplicates included).
        num_unique: Number of distinct storages behind the saved tensors (activations and parameters).
        num_activation_tensors: Number of distinct activation storages.
        num_parameter_tensors: Number of distinct parameter/buffer storages.
        activation_bytes_by_dtype: Activation bytes per dtype name (``"float32"``...), sorted by name.
    """

    activation_bytes: int
    parameter_bytes: int
    num_saved: int
    num_unique: int
    num_activation_tensors: int
    num_parameter_tensors: int
    activation_bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Activation plus parameter bytes saved for backward."""
        return self.activation_bytes + self.parameter_bytes


def _storage_key(tensor: torch.Tensor) -> tuple[_StorageKey, int]:
    """Return the storage identity of ``tensor`` and the storage's size in bytes.

    Falls back to the tensor's own extent for tensors without an accessible storage (sparse, some
    subclasses); these are then keyed by object identity and never deduplicated.
    """
    try:
        storage = tensor.untyped_storage()
        nbytes = int(storage.nbytes())
        return (str(tensor.device), int(storage.data_ptr()), nbytes), nbytes
    except (RuntimeError, NotImplementedError, TypeError):
        nbytes = int(tensor.numel()) * tensor.element_size()
        return ("object", id(tensor), nbytes), nbytes


def _module_storage_keys(module: nn.Module | None) -> set[_StorageKey]:
    if module is None:
        return set()
    keys: set[_StorageKey] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        keys.add(_storage_key(tensor)[0])
    return keys


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], module: nn.Module | None = None) -> SavedTensorReport:
    """Record every tensor autograd saves for backward while ``fn`` runs.

    ``fn`` is a training forward that returns the loss. It runs once under
    :class:`torch.autograd.graph.saved_tensors_hooks`; the pack hook returns the tensor unchanged, so a
    loss that ``fn`` stashes elsewhere can still be back-propagated afterwards.

    Saved storages that belong to ``module``'s parameters or buffers (``weight.t()`` saved by a linear
    layer, for example) are reported as ``parameter_bytes``; without ``module`` only tensors that are
    themselves ``nn.Parameter`` objects are recognised as parameters.

    The saved tensors are referenced only while ``fn`` runs (so that a storage freed mid-forward cannot
    have its address reused and be mistaken for a duplicate); the returned report holds plain numbers
    and keeps no tensor alive. Returning the loss keeps the graph alive only as long as the caller
    keeps the loss.

    Args:
        fn: Zero-argument closure running the forward and returning the loss.
        module: The module whose parameters and buffers count as static memory.

    Returns:
        The deduplicated byte counts; identical on every run of the same deterministic ``fn``.
    """
    param_keys = _module_storage_keys(module)
    keep_alive: list[torch.Tensor] = []
    sizes: dict[_StorageKey, int] = {}
    dtypes: dict[_StorageKey, str] = {}
    is_param: dict[_StorageKey, bool] = {}
    num_saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal num_saved
        num_saved += 1
        key, nbytes = _storage_key(tensor)
        if key not in sizes:
            keep_alive.append(tensor)
            sizes[key] = nbytes
            dtypes[key] = _dtype_name(tensor.dtype)
            is_param[key] = key in param_keys or isinstance(tensor, nn.Parameter)
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            fn()
    finally:
        keep_alive.clear()

    activation_bytes = 0
    parameter_bytes = 0
    by_dtype: dict[str, int] = {}
    for key, nbytes in sizes.items():
        if is_param[key]:
            parameter_bytes += nbytes
        else:
            activation_bytes += nbytes
            by_dtype[dtypes[key]] = by_dtype.get(dtypes[key], 0) + nbytes
    num_param = sum(is_param.values())
    report = SavedTensorReport(
        activation_bytes=activation_bytes,
        parameter_bytes=parameter_bytes,
        num_saved=num_saved,
        num_unique=len(sizes),
        num_activation_tensors=len(sizes) - num_param,
        num_parameter_tensors=num_param,
        activation_bytes_by_dtype=dict(sorted(by_dtype.items())),
    )
    logger.debug("saved tensors: %s", report)
    return report


# --------------------------------------------------------------------------------------------------
# Static memory (parameters, gradients, optimizer state)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticMemory:
    """Memory that a training step holds regardless of the batch.

    Attributes:
        parameter_bytes: Bytes of all parameters (frozen and trainable), each shared parameter once.
        trainable_bytes: Bytes of the parameters with ``requires_grad``.
        gradient_bytes: Bytes of their gradients (equal to ``trainable_bytes``).
        optimizer_state_bytes: Bytes of optimizer state, kept in fp32: AdamW/Adam 2 tensors per trainable
            element, SGD with momentum 1, plain SGD 0 (step counters are ignored).
        buffer_bytes: Bytes of the module's buffers (normalisation statistics and the like).
        num_parameters: Number of parameter elements.
        num_trainable: Number of trainable parameter elements.
        optimizer_name: The optimizer the state was computed for.
    """

    parameter_bytes: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    buffer_bytes: int
    num_parameters: int
    num_trainable: int
    optimizer_name: str

    @property
    def total_bytes(self) -> int:
        """Parameters + buffers + gradients + optimizer state."""
        return self.parameter_bytes + self.buffer_bytes + self.gradient_bytes + self.optimizer_state_bytes


def static_memory_bytes(module: nn.Module, optimizer_name: str = "adamw") -> StaticMemory:
    """Count the static training memory of ``module`` under an optimizer.

    Args:
        module: Any module; parameters shared between submodules are counted once.
        optimizer_name: One of ``"adamw"``, ``"adam"``, ``"sgd_momentum"``, ``"sgd"`` (case-insensitive).

    Returns:
        The byte counts.

    Raises:
        ValueError: If ``optimizer_name`` is not supported.
    """
    name = optimizer_name.lower()
    if name not in OPTIMIZER_STATE_MULTIPLIERS:
        raise ValueError(f"unknown optimizer {optimizer_name!r}; expected one of {sorted(OPTIMIZER_STATE_MULTIPLIERS)}")
    params = list(module.parameters())
    parameter_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    num_trainable = sum(p.numel() for p in trainable)
    buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    return StaticMemory(
        parameter_bytes=parameter_bytes,
        trainable_bytes=trainable_bytes,
        gradient_bytes=trainable_bytes,
        optimizer_state_bytes=OPTIMIZER_STATE_MULTIPLIERS[name] * num_trainable * _FP32_BYTES,
        buffer_bytes=buffer_bytes,
        num_parameters=sum(p.numel() for p in params),
        num_trainable=num_trainable,
        optimizer_name=name,
    )


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingReport:
    """Wall-clock statistics of repeated steps.

    Attributes:
        times_s: Duration of every timed step, in seconds, in the order they ran.
        warmup: Number of untimed warm-up steps that ran first.
        device: The device that was synchronised (``"cpu"`` when none was).
    """

    times_s: tuple[float, ...]
    warmup: int
    device: str

    @property
    def iters(self) -> int:
        """Number of timed steps."""
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        """Median step time in seconds."""
        return statistics.median(self.times_s)

    @property
    def mean_s(self) -> float:
        """Mean step time in seconds."""
        return statistics.fmean(self.times_s)

    @property
    def min_s(self) -> float:
        """Fastest step time in seconds."""
        return min(self.times_s)

    @property
    def p90_s(self) -> float:
        """90th percentile step time in seconds (linear interpolation between order statistics)."""
        ordered = sorted(self.times_s)
        position = 0.9 * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    def throughput(self, batch_size: int) -> float:
        """Samples per second at the median step time.

        Args:
            batch_size: Samples processed by one step.

        Returns:
            ``batch_size / median_s`` (``inf`` if the median is zero).
        """
        median = self.median_s
        return math.inf if median <= 0 else batch_size / median

    def as_dict(self, batch_size: int | None = None) -> dict[str, float | int | str]:
        """Summary statistics as a JSON-friendly dict, with throughput when ``batch_size`` is given."""
        out: dict[str, float | int | str] = {
            "device": self.device,
            "warmup": self.warmup,
            "iters": self.iters,
            "median_s": self.median_s,
            "mean_s": self.mean_s,
            "min_s": self.min_s,
            "p90_s": self.p90_s,
        }
        if batch_size is not None:
            out["throughput"] = self.throughput(batch_size)
        return out


def time_step(
    step: Callable[[], None],
    warmup: int,
    iters: int,
    device: torch.device | str = "cpu",
) -> TimingReport:
    """Time ``step`` with :func:`time.perf_counter`.

    ``step`` runs ``warmup`` times untimed, then ``iters`` times, each timed on its own. On a CUDA device
    the device is synchronised before the clock starts and before it stops, so that queued kernels are
    charged to the step that launched them.

    Args:
        step: Zero-argument closure running one step (forward, backward, optimizer update).
        warmup: Untimed steps to run first (>= 0).
        iters: Timed steps (>= 1).
        device: Device the step runs on.

    Returns:
        The per-step times and their statistics.

    Raises:
        ValueError: If ``warmup`` < 0 or ``iters`` < 1.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    dev = torch.device(device)
    is_cuda = dev.type == "cuda"

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    report = TimingReport(times_s=tuple(times), warmup=warmup, device=str(dev))
    logger.debug("timed %d steps on %s: median %.6f s", iters, dev, report.median_s)
    return report


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def inference_flops(module: nn.Module, example_input: Any) -> int:
    """Count the FLOPs of one forward pass of ``module`` in eval mode without gradients.

    Uses :class:`torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as two FLOPs
    (``nn.Linear(16, 8)`` on a ``(4, 16)`` input: ``2 * 4 * 16 * 8``). The module's train/eval flags are
    restored afterwards.

    Args:
        module: The module to run.
        example_input: A tensor, a tuple/list of positional arguments, or a mapping of keyword arguments.

    Returns:
        The total FLOP count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    modes = {m: m.training for m in module.modules()}
    module.eval()

    def count(grad: bool) -> int:
        counter = FlopCounterMode(display=False)
        with torch.set_grad_enabled(grad), counter:
            if isinstance(example_input, Mapping):
                module(**example_input)
            elif isinstance(example_input, (tuple, list)):
                module(*example_input)
            else:
                module(example_input)
        return int(counter.get_total_flops())

    try:
        try:
            return count(grad=False)
        except AssertionError:
            # FlopCounterMode's module tracker asserts when a module is called on a parameter that requires
            # grad under no_grad (VPT's prompt dropout): count with autograd on; the forward's FLOPs are equal.
            return count(grad=True)
    finally:
        for m, training in modes.items():
            m.training = training


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(directory: Path, timeout: float = 5.0) -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("git rev-parse failed: %s", exc)
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def _cpu_count() -> int | None:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Describe the software and hardware a measurement was taken on.

    Args:
        device: The device of interest; defaults to ``cuda`` when available, else ``cpu``.

    Returns:
        A JSON-serialisable dict: ``torch``, ``timm``, ``python``, ``platform``, ``device``,
        ``device_name``, ``cuda_available``, ``torch_threads``, ``cpu_count`` and ``git_commit`` (the
        commit of the repository holding this source tree, or ``None``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    return {
        "torch": torch.__version__,
        "timm": _package_version("timm"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": device_name,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": _cpu_count(),
        "git_commit": _git_commit(Path(__file__).resolve().parent),
    }
