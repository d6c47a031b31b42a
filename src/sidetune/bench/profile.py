"""``sidetune bench``: measure what each method costs to train, side by side, on one backbone and batch.

Per row (a method, possibly with a lever or gradient checkpointing), on the same batch of random images:

* **trainable parameters** and the **adapter checkpoint bytes** (``save_adapter`` to a temporary
  directory, file sizes summed);
* **saved for backward**: bytes autograd keeps for the backward pass of one training forward, each
  storage counted once (:func:`~sidetune.bench.accounting.saved_tensor_bytes`): deterministic, the
  same on any machine;
* **static memory**: parameters + gradients + AdamW state (:func:`~sidetune.bench.accounting.static_memory_bytes`);
* **peak memory**: CUDA: ``max_memory_allocated`` growth over two training steps, in process; CPU: the
  growth of the resident set over two training steps in a fresh subprocess
  (:func:`~sidetune.bench.memory_probe.measure_peak_rss`), whose set-up builds the model, the optimizer
  and the batch and runs one no-grad forward; the growth therefore includes gradients, optimizer state,
  activations and workspace, not the weights. The probe runs *before* the row is built in this process,
  under the ``max_rss`` cap: a row that does not fit never runs here;
* **step time**: median wall time of a training step (forward, cross-entropy, backward, AdamW step)
  after warm-up, with device synchronisation; steps of all rows are timed round-robin (one step per
  row per round, the start rotating) so that load from other processes spreads over every row, and
  ratios between rows taken in one run are stable;
* **throughput** (images/s at the median) and **inference FLOPs** per image (``FlopCounterMode``, one
  image, before any lever);
* **the floor**, the least a step of this row could cost without a tap cache:

  - side methods: ``floor = T_frozen + T_side``, where ``T_frozen`` is the median time of
    ``model.backbone(images, method.tap_request)`` under ``torch.inference_mode()`` (the frozen forward
    with the method's taps, its levers included) and ``T_side`` is the median time of the side network's
    own step on taps computed once beforehand under ``torch.no_grad()``: ``method.forward_taps(taps)``,
    the head, the loss, backward and the optimizer step. Taps from ``no_grad`` are ordinary tensors that
    autograd may save, unlike inference-mode tensors, and computing them once keeps their production out
    of ``T_side``. The two parts are timed apart, so nothing (no clone of the taps) is charged to the floor
    that a training step need not do.
  - in-place methods cannot separate a side network: their floor is ``T_frozen`` of the unmodified
    backbone without taps (``floor_kind = "inference_forward"``).

Ratios: to the ``reference`` row (``full`` by default; absent when the reference is missing or failed)
and to the row's floor. A row that runs out of memory reads ``does not fit``; one that fails otherwise
reads ``error``; both keep their message and every other row is still measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import TapRequest, Taps
from ..errors import ConfigError, unknown_choice
from ..methods import get_method, list_methods
from .accounting import (
    TimingReport,
    environment_info,
    inference_flops,
    saved_tensor_bytes,
    static_memory_bytes,
)
from .levers import Levers, apply_levers, autocast, lever_problem, side_variants
from .memory_probe import ProbeResult, available_memory_bytes, measure_cuda_peak, measure_peak_rss
from .workload import WORKLOAD, build_model, make_batch, make_side_step, make_step, optimizer_for

logger = logging.getLogger(__name__)

#: Small enough to profile every method in a couple of minutes on a laptop CPU, from a fresh clone (random weights).
DEFAULT_BACKBONE = "vit_tiny_patch16_224"
SCHEMA_VERSION = 1

OK, DOES_NOT_FIT, ERROR = "ok", "does not fit", "error"
_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "memoryerror", "max_rss", "sigkill")


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        backbone: timm model name.
        methods: method names (None: every method in :func:`sidetune.list_methods`). An entry may carry
            options of its own, ``METHOD[KEY=VALUE,...]`` (``losa[recompute=true]``): an extra row of that
            method, named as written, measured beside the plain one (see :func:`parse_method`).
        weights: backbone weights as in :func:`sidetune.create` (None: random).
        img_size: input size (None: the model's default).
        batch_size: images per training step.
        num_classes: classifier size.
        backbone_kwargs: extra ``timm.create_model`` arguments.
        method_options: per method name, options for :func:`sidetune.create`, applied to every row of that
            method (a variant's own options override them).
        precision: training precision of every row (``fp32``; ``bf16`` / ``fp16``: each row's forward and loss
            under autocast, side and in-place alike; see :mod:`sidetune.bench.levers`).
        frozen_low_precision: every row's frozen linear weights stored in the autocast dtype (the same
            numbers, no cast per step): LoRA's base weights as a side method's backbone. Needs bf16/fp16.
        compile: ``torch.compile`` of every row's backbone forward (and of side networks).
        channels_last: channels-last weights and images for every row (CNN backbones).
        frozen_precision: adds, per side method, a ``+bf16-frozen`` (``+fp16-frozen``) row: the frozen forward
            alone in that precision, the side network in float32. A lever no in-place method can use.
        cache: adds, per side method, a ``+cache`` row: the step on taps held in memory, without the frozen
            forward (what a tap cache gives). A lever no in-place method can use.
        compile_backend: ``torch.compile`` backend.
        grad_checkpointing: add a ``+gc`` row for each in-place method that has the option.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        threads: torch CPU threads (None: torch's default).
        warmup: untimed steps per timer before timing.
        rounds: timed rounds; each round times one step of every row.
        clock: ``wall`` (``time.perf_counter``, with device sync) or ``cpu`` (``time.process_time``: CPU seconds
            of this process, all threads). On a CPU shared with other processes, ``cpu`` with ``threads=1``
            measures the work of a step unaffected by waiting for a core; with more threads it also counts
            the time OpenMP threads spin at barriers, so use it with one thread.
        peak_memory: measure peak memory (CPU: one subprocess per row).
        max_rss_bytes: CPU cap on a probe's resident set (None: 80% of the memory available at start).
        probe_timeout: seconds before a probe is abandoned.
        probe_steps: training steps in the peak-memory probe.
        probe_mmap_threshold: glibc ``MALLOC_MMAP_THRESHOLD_`` of the probe process (None: glibc's dynamic
            default). glibc raises its mmap threshold after large frees, and freed activations then stay in
            the heap: the resident set measures the allocator's retention, which varies by +-20% between
            identical runs and for LoSA on ViT-B doubles the growth. Fixed at glibc's initial 128 KiB, large
            tensors are mapped and unmapped, and the growth matches the peak of live tensor bytes (LoSA,
            ViT-B/16, batch 8: 312 MiB resident vs 307 MiB from the profiler's allocation events).
        reference: row whose cost the ratios divide by.
        seed: seed of weights and data.
    """

    backbone: str = DEFAULT_BACKBONE
    methods: tuple[str, ...] | None = None
    weights: str | None = None
    img_size: int | None = None
    batch_size: int = 8
    num_classes: int = 10
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    precision: str = "fp32"
    frozen_low_precision: bool = False
    compile: bool = False
    channels_last: bool = False
    frozen_precision: str = "fp32"
    cache: bool = False
    compile_backend: str = "inductor"
    grad_checkpointing: bool = False
    device: str = "auto"
    threads: int | None = None
    warmup: int = 1
    rounds: int = 5
    clock: str = "wall"
    peak_memory: bool = True
    max_rss_bytes: int | None = None
    probe_timeout: float = 600.0
    probe_steps: int = 2
    probe_mmap_threshold: int | None = 128 * 1024
    reference: str = "full"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_classes", "rounds", "probe_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"bench: {name} must be a positive integer, got {value!r}.")
        if self.warmup < 0:
            raise ConfigError(f"bench: warmup must be >= 0, got {self.warmup!r}.")
        if self.clock not in ("wall", "cpu"):
            raise unknown_choice("clock", self.clock, ("wall", "cpu"))
        if self.device not in ("auto", "cpu", "cuda"):
            raise unknown_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("bench: device 'cuda' asked for, but CUDA is not available here.")
        run = self.run_levers  # validates the names
        # a run-wide lever applies to every row: one that cannot apply here leaves nothing to measure (channels-last
        # depends on the backbone's family and is checked per row)
        problem = lever_problem(dataclasses.replace(run, channels_last=False), "any", self.torch_device, "inplace")
        if problem:
            raise ConfigError(f"bench: {problem}.")
        Levers(frozen_precision=self.frozen_precision)
        if self.methods is not None:
            self.methods = tuple(self.methods)
        for request in resolve_methods(self.methods):  # names, then every row's options, before measuring
            options = {**self.method_options.get(request.method, {}), **request.options}
            check_options(request.method, options, where=request.name)

    @property
    def run_levers(self) -> Levers:
        """The levers every row of the run has (precision, frozen weights, compile, channels-last)."""
        return Levers(
            precision=self.precision,
            frozen_low_precision=self.frozen_low_precision,
            compile=self.compile,
            channels_last=self.channels_last,
            compile_backend=self.compile_backend,
        )

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def cache_bytes_per_image(model: torch.nn.Module, taps: Taps) -> int:
    """What ``sidetune cache build --methods <this method>`` stores per image: the taps the method reads, the
    leading tokens it keeps, in float16 (the cache's default)."""
    from ..cache import tap_spec

    spec = tap_spec(model, [model.config.method], {model.config.method: dict(model.config.method_config)})
    total = 0
    for key, tokens in spec.items():
        value = taps.final if key == "final" else getattr(taps, key.split(".")[0])[int(key.split(".")[1])]
        per_image = value[0]
        if tokens is not None and per_image.ndim == 2:
            per_image = per_image[:tokens]
        total += per_image.numel() * 2
    return total


@dataclass(frozen=True)
class RowPlan:
    """One row to measure: a method with its options and levers."""

    name: str
    method: str
    kind: str
    options: dict[str, Any]
    levers: Levers


@dataclass
class BenchRow:
    """The measurements of one row (all sizes in bytes, times in seconds; None where not measured).

    ``status`` is ``ok``, ``does not fit`` or ``error`` (then ``error`` holds the message and the
    measurements taken before the failure remain). Ratios are None where either side is missing. Step
    times: the median (the figure the ratios use), the fastest step (what the step costs without load
    from other processes: noise on a shared machine only adds time) and the 90th percentile.
    ``inference_s`` (``inference_min_s``: the fastest) is the run's plain inference forward (the unmodified frozen
    backbone, no taps, under ``inference_mode`` and the run's precision and levers), the same for every row;
    ``time_vs_inference`` is the step divided by it.
    """

    name: str
    method: str
    kind: str
    backprop_through_backbone: bool
    levers: str
    options: dict[str, Any]
    status: str = OK
    error: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    checkpoint_bytes: int | None = None
    saved_activation_bytes: int | None = None
    saved_activation_dtypes: dict[str, int] = field(default_factory=dict)
    saved_parameter_bytes: int | None = None
    param_bytes: int | None = None
    grad_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    static_bytes: int | None = None
    peak_bytes: int | None = None
    peak_growth_bytes: int | None = None
    peak_method: str | None = None
    step_time_s: float | None = None
    step_time_min_s: float | None = None
    step_time_p90_s: float | None = None
    step_wall_s: float | None = None
    step_cpu_s: float | None = None
    timed_steps: int = 0
    throughput: float | None = None
    floor_s: float | None = None
    floor_frozen_s: float | None = None
    floor_side_s: float | None = None
    floor_kind: str | None = None
    inference_s: float | None = None
    inference_min_s: float | None = None
    cache_bytes_per_image: int | None = None
    compile_s: float | None = None
    inference_gflops: float | None = None
    time_vs_ref: float | None = None
    time_vs_floor: float | None = None
    time_vs_inference: float | None = None
    saved_vs_ref: float | None = None
    peak_vs_ref: float | None = None
    static_vs_ref: float | None = None
    params_vs_ref: float | None = None

    def fail(self, status: str, message: str) -> None:
        if self.status == OK:
            self.status, self.error = status, message

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchReport:
    """Rows plus everything that makes them meaningful (settings, environment, command)."""

    config: BenchConfig
    rows: list[BenchRow]
    environment: dict[str, Any]
    command: str
    created: str
    img_size: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def reference_row(self) -> BenchRow | None:
        return next((r for r in self.rows if r.name == self.config.reference and r.status == OK), None)

    def row(self, name: str) -> BenchRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        cfg["methods"] = list(cfg["methods"]) if cfg["methods"] is not None else None
        cfg["img_size"] = list(self.img_size) if self.img_size else cfg["img_size"]
        cfg["device"] = str(self.config.torch_device)
        return {
            "schema": "sidetune.bench",
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "created": self.created,
            "environment": self.environment,
            "settings": cfg,
            "reference": self.config.reference,
            "reference_found": self.reference_row is not None,
            "notes": list(self.notes),
            "rows": [r.as_dict() for r in self.rows],
        }


# ------------------------------------------------------------------------------------------------------
# Which rows
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodRequest:
    """One entry of :attr:`BenchConfig.methods`: a method, and options of its own for a variant row.

    ``losa`` is ``MethodRequest("losa", "losa", {})``; ``losa[recompute=true]`` is
    ``MethodRequest("losa[recompute=true]", "losa", {"recompute": True})``.
    """

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_option_value(raw: str) -> Any:
    """An option value as written on a command line: JSON (``32``, ``true``, ``[0,1]`` as a tuple), Python's
    ``True``/``False``/``None``, else the text itself."""
    raw = raw.strip()
    if raw in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[raw]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return tuple(value) if isinstance(value, list) else value


def split_methods(text: str) -> list[str]:
    """Split a comma-separated method list, keeping the commas inside ``[...]`` (a variant's options).

    ``"full,losa[recompute=true,channel_rank=32],e3va"`` -> ``["full", "losa[recompute=true,channel_rank=32]",
    "e3va"]``. Blank entries are dropped.
    """
    parts, depth, current = [], 0, []
    for char in text:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise ConfigError(f"unbalanced ']' in the method list {text!r}.")
        current.append(char)
    if depth:
        raise ConfigError(f"unclosed '[' in the method list {text!r}.")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_VARIANT = re.compile(r"([^\[\]\s]+)\[(.*)\]")


def parse_method(text: str) -> MethodRequest:
    """``METHOD`` or ``METHOD[KEY=VALUE,...]`` (values as :func:`parse_option_value` reads them).

    The row is named as written, without spaces. Raises ConfigError for an unknown method (with the choices)
    or an option the method does not have (with its options).
    """
    text = "".join(text.split())
    match = _VARIANT.fullmatch(text)
    if not match and ("[" in text or "]" in text):
        raise ConfigError(f"bench: {text!r} is neither METHOD nor METHOD[KEY=VALUE,...], e.g. losa[recompute=true].")
    method = match.group(1) if match else text
    known = [m["name"] for m in list_methods()]
    if method not in known:
        raise unknown_choice("method", method, known, hint="See `sidetune methods`.")
    if not match:
        return MethodRequest(text, text, {})
    options: dict[str, Any] = {}
    for item in split_methods(match.group(2)):
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(
                f"bench: {text!r}: options are KEY=VALUE separated by commas, e.g. {method}[recompute=true]; "
                f"got {item!r}."
            )
        options[key] = parse_option_value(raw)
    if not options:
        raise ConfigError(f"bench: {text!r} names no option; write {method} for the plain row.")
    check_options(method, options, where=text)
    return MethodRequest(text, method, options)


def check_options(method: str, options: dict[str, Any], where: str | None = None) -> None:
    """Fail unless ``method`` has every option in ``options`` (the message names the method, the entry
    ``where`` it was asked for and the method's options) and accepts their values."""
    spec = get_method(method)
    known = sorted(f.name for f in dataclasses.fields(spec.config_cls))
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(known) if known else "none"
        context = f" (in {where!r})" if where and where != method else ""
        raise ConfigError(
            f"bench: method {method!r} has no option {', '.join(map(repr, unknown))}{context}. "
            f"Valid options of {method!r}: {valid}."
        )
    try:
        spec.make_config(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bench: options {options} of {where or method!r}: {err}") from None


def resolve_methods(methods: tuple[str, ...] | list[str] | None) -> list[MethodRequest]:
    """Parse and validate the method entries (see :func:`parse_method`); None gives every method plain.

    An unknown method fails listing the choices; an unknown option of a variant names the method and its
    options. Duplicate entries are measured once.
    """
    if methods is None:
        return [MethodRequest(m["name"], m["name"], {}) for m in list_methods()]
    if not methods:
        raise ConfigError("bench: no method to measure.")
    requests = {}
    for text in methods:
        request = parse_method(text)
        requests.setdefault(request.name, request)
    return list(requests.values())


def plan_rows(config: BenchConfig) -> list[RowPlan]:
    """The rows of a run: each method entry (plain or a variant with its options), with the run-wide levers; then
    its side-only lever rows (side methods: ``+bf16-frozen``, ``+cache``) or its ``+gc`` row (in-place)."""
    run = config.run_levers
    rows = []
    for request in resolve_methods(config.methods):
        name = request.name
        spec = get_method(request.method)
        options = {**config.method_options.get(request.method, {}), **request.options}
        rows.append(RowPlan(name, request.method, spec.kind, options, run))
        has_gc = "grad_checkpointing" in {f.name for f in dataclasses.fields(spec.config_cls)}
        if spec.kind == "side":
            variants = side_variants(run, config.frozen_precision, config.cache)[1:]
            rows += [RowPlan(name + v.label, request.method, spec.kind, options, v) for v in variants]
        elif config.grad_checkpointing and has_gc and "grad_checkpointing" not in request.options:
            gc_options = {**options, "grad_checkpointing": True}
            rows.append(RowPlan(name + "+gc", request.method, spec.kind, gc_options, run))
    return rows


def build_row_model(config: BenchConfig, row: RowPlan, device: torch.device) -> torch.nn.Module:
    """The model of one bench row (its method and options) on ``config``'s backbone, size and seed."""
    return build_model(
        config.backbone,
        row.method,
        num_classes=config.num_classes,
        img_size=config.img_size,
        weights=config.weights,
        backbone_kwargs=config.backbone_kwargs,
        options=row.options,
        seed=config.seed,
        device=device,
    )


def _probe_kwargs(config: BenchConfig, row: RowPlan, batch_size: int) -> dict[str, Any]:
    return {
        "backbone": config.backbone,
        "method": row.method,
        "batch_size": batch_size,
        "num_classes": config.num_classes,
        "img_size": config.img_size,
        "weights": config.weights,
        "backbone_kwargs": config.backbone_kwargs,
        "options": row.options,
        "levers": row.levers.as_dict(),
        "seed": config.seed,
        "steps": config.probe_steps,
        "threads": config.threads or torch.get_num_threads(),
    }


def probe_peak_rss(config: BenchConfig, row: RowPlan, batch_size: int, max_rss_bytes: int | None) -> ProbeResult:
    """Peak RSS of ``config.probe_steps`` training steps of ``row`` in a fresh process."""
    threshold = config.probe_mmap_threshold
    return measure_peak_rss(
        WORKLOAD,
        _probe_kwargs(config, row, batch_size),
        timeout=config.probe_timeout,
        max_rss_bytes=max_rss_bytes,
        env={"MALLOC_MMAP_THRESHOLD_": str(threshold)} if threshold else None,
    )


def failure_status(message: str) -> str:
    """``does not fit`` for out-of-memory failures (allocator errors, the RSS cap, the OOM killer), else ``error``."""
    text = message.lower()
    return DOES_NOT_FIT if any(m in text for m in _OOM_MARKERS) else ERROR


def _format_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or failure_status(str(exc)) == DOES_NOT_FIT


def _row_failure(exc: BaseException) -> tuple[str, str]:
    message = _format_error(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (DOES_NOT_FIT if _is_oom(exc) else ERROR), message


# ------------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------------


@dataclass
class _Timer:
    """A closure timed round-robin with the others; ``rows`` are the rows its failure fails."""

    key: str
    fn: Callable[[], None]
    rows: list[BenchRow]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    failed: bool = False


@dataclass
class _Live:
    """A row's model and closures, kept alive until the timing rounds are over."""

    row: BenchRow
    plan: RowPlan
    model: Any
    step: str
    frozen: str | None = None
    side: str | None = None
    inference: str | None = None
    floor_kind: str | None = None


def _share_frozen_weights(model, source) -> None:
    """Point ``model``'s frozen backbone tensors at ``source``'s (identical: same seed or weights file).

    Keeps one copy of the frozen weights in memory however many side rows there are. Both models were
    built from the same recipe, so their module trees match name for name.
    """
    theirs = dict(source.backbone.model.named_modules())
    for name, module in model.backbone.model.named_modules():
        other = theirs[name]
        for key, param in list(module._parameters.items()):
            ref = other._parameters.get(key)
            if param is not None and ref is not None and not param.requires_grad and ref.shape == param.shape:
                module._parameters[key] = ref
        for key, buf in list(module._buffers.items()):
            ref = other._buffers.get(key)
            if buf is not None and ref is not None and ref.shape == buf.shape:
                module._buffers[key] = ref


def _checkpoint_bytes(model) -> int:
    with tempfile.TemporaryDirectory(prefix="sidetune-bench-") as tmp:
        directory = model.save_adapter(tmp)
        return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Profiler:
    """Carries one run: builds rows one at a time, then times every live closure round-robin."""

    def __init__(self, config: BenchConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.device = config.torch_device
        self.timers: dict[str, _Timer] = {}
        self.live: list[_Live] = []
        self.shared_source = None  # the first plain side model: its frozen weights are shared
        self.img_size: tuple[int, int] | None = None
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.notes: list[str] = []
        self.max_rss = config.max_rss_bytes
        if self.max_rss is None and config.peak_memory and self.device.type == "cpu":
            available = available_memory_bytes()
            self.max_rss = int(0.8 * available) if available else None

    # -- stage 1: everything but timing, row by row -----------------------------------------------------
    def measure(self, plan: RowPlan) -> BenchRow:
        spec = get_method(plan.method)
        row = BenchRow(
            name=plan.name,
            method=plan.method,
            kind=plan.kind,
            backprop_through_backbone=spec.backprop_through_backbone,
            levers=plan.levers.description,
            options=dict(plan.options),
        )
        if self.config.peak_memory and self.device.type == "cpu":
            probe = probe_peak_rss(self.config, plan, self.config.batch_size, self.max_rss)
            row.peak_method = probe.method
            if not probe.ok:
                error = probe.error or "probe failed"
                row.fail(failure_status(error), _probe_message(error))
                return row  # never run in this process what did not fit (or failed) in the probe
            row.peak_bytes, row.peak_growth_bytes = probe.peak_bytes, probe.growth_bytes
        try:
            self._measure_in_process(plan, row)
        except Exception as exc:
            row.fail(*_row_failure(exc))
            logger.debug("row %s failed", plan.name, exc_info=True)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def _measure_in_process(self, plan: RowPlan, row: BenchRow) -> None:
        cfg, dev, levers = self.config, self.device, plan.levers
        model = build_row_model(cfg, plan, dev)
        side = plan.kind == "side"
        if self.batch is None:
            self.img_size = tuple(model.backbone.layout.img_size)
            self.batch = make_batch(cfg.batch_size, self.img_size, cfg.num_classes, cfg.seed, dev)
        images, labels = self.batch
        row.trainable_params = sum(p.numel() for p in model.trainable_parameters())
        row.total_params = sum(p.numel() for p in model.parameters())
        row.checkpoint_bytes = _checkpoint_bytes(model)
        row.inference_gflops = inference_flops(model, images[:1]) / 1e9  # before any lever: the model's own FLOPs
        apply_levers(model, levers, plan.kind, dev)
        # One copy of the frozen weights however many side rows (channels-last rows convert theirs in place).
        # The source, whose backbone also runs the plain inference forward, is a row with the run's levers only.
        if side and not levers.channels_last:
            if self.shared_source is None and not levers.side_only:
                self.shared_source = model
            elif self.shared_source is not None:
                _share_frozen_weights(model, self.shared_source)
        static = static_memory_bytes(model, "adamw")  # after the levers: frozen weights may be 16-bit
        row.param_bytes = static.parameter_bytes + static.buffer_bytes
        row.grad_bytes = static.gradient_bytes
        row.optimizer_state_bytes = static.optimizer_state_bytes
        row.static_bytes = static.total_bytes
        model.train()

        optimizer = optimizer_for(model)
        step = make_step(model, images, labels, optimizer, levers)
        if levers.compile:  # the first step compiles (forward, and backward for autograd)
            start = time.perf_counter()
            step()
            _sync(dev)
            row.compile_s = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)

        cached: Taps | None = None
        if levers.cache:  # what the cache replays, computed without autograd as a cache stores it
            with torch.no_grad(), autocast(levers, dev):
                cached = model.backbone(images, model.method.tap_request)
            row.cache_bytes_per_image = cache_bytes_per_image(model, cached)

        def forward_loss() -> torch.Tensor:
            with autocast(levers, dev):
                if cached is not None:
                    return F.cross_entropy(model.head(model.method.forward_taps(cached)), labels)
                return F.cross_entropy(model(images), labels)

        saved = saved_tensor_bytes(forward_loss, module=model)
        row.saved_activation_bytes, row.saved_parameter_bytes = saved.activation_bytes, saved.parameter_bytes
        row.saved_activation_dtypes = dict(saved.activation_bytes_by_dtype)

        if dev.type == "cuda" and cfg.peak_memory:

            def run() -> None:
                for _ in range(cfg.probe_steps):
                    step()

            probe = measure_cuda_peak(run, dev)
            optimizer.zero_grad(set_to_none=True)
            row.peak_method = probe.method
            if not probe.ok:
                error = probe.error or "CUDA probe failed"
                row.fail(failure_status(error), error.splitlines()[0])
                return
            row.peak_growth_bytes = probe.growth_bytes
            row.peak_bytes = probe.growth_bytes + row.param_bytes  # this model alone: weights plus growth

        live = _Live(row=row, plan=plan, model=model, step=f"step:{plan.name}")
        self.timers[live.step] = _Timer(live.step, step, [row])
        live.inference = self._inference_timer(row)
        if levers.cache:  # the step is the side network's own: no frozen forward, no floor to compare with
            live.floor_kind = "cache"
        elif side and hasattr(model.method, "forward_taps"):
            request = model.method.tap_request
            live.frozen = self._frozen_timer(model, levers, request, row)
            with torch.no_grad(), autocast(levers, dev):
                taps = model.backbone(images, request)
            live.side = f"side:{plan.name}"
            self.timers[live.side] = _Timer(live.side, make_side_step(model, taps, labels, optimizer, levers), [row])
        else:
            live.frozen = live.inference
        self.live.append(live)

    def _frozen_timer(self, model, levers: Levers, request: TapRequest, row: BenchRow) -> str:
        """The inference-mode frozen forward with ``request`` under the row's precision, one timer per (levers,
        request)."""
        key = f"frozen:{levers.description}:{sorted(request.attn)}:{sorted(request.mlp)}:{sorted(request.out)}"
        if key in self.timers:
            self.timers[key].rows.append(row)
            return key
        backbone, images, dev = model.backbone, self.batch[0], self.device

        def frozen() -> None:
            with torch.inference_mode(), autocast(levers, dev):
                backbone(images, request)

        self.timers[key] = _Timer(key, frozen, [row])
        return key

    def _inference_timer(self, row: BenchRow) -> str:
        """The unmodified backbone's inference forward without taps, under the run's levers: the plain inference
        forward of ``x inference`` and the floor of in-place rows."""
        source = self.shared_source
        if source is None:  # no plain side row yet: build a linear probe to run the frozen forward
            cfg = self.config
            source = build_model(
                cfg.backbone,
                "linear",
                num_classes=cfg.num_classes,
                img_size=cfg.img_size,
                weights=cfg.weights,
                backbone_kwargs=cfg.backbone_kwargs,
                options={},
                seed=cfg.seed,
                device=self.device,
            )
            apply_levers(source, cfg.run_levers, "side", self.device)
            self.shared_source = source
        return self._frozen_timer(source, self.config.run_levers, TapRequest(), row)

    # -- stage 2: timing --------------------------------------------------------------------------------
    def time_all(self) -> None:
        cfg = self.config
        timers = list(self.timers.values())
        if not timers:
            return
        self.log(f"timing {len(timers)} closures: {cfg.warmup} warm-up + {cfg.rounds} rounds, round-robin")
        for timer in timers:
            for _ in range(cfg.warmup):
                self._run(timer, record=False)
        for r in range(cfg.rounds):
            shift = r % len(timers)
            for timer in timers[shift:] + timers[:shift]:
                self._run(timer, record=True)

    def _run(self, timer: _Timer, record: bool) -> None:
        if timer.failed or all(row.status != OK for row in timer.rows):
            return
        try:
            _sync(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            timer.fn()
            _sync(self.device)
            if record:
                timer.times.append(time.perf_counter() - start)
                timer.cpu_times.append(time.process_time() - cpu_start)
        except Exception as exc:
            timer.failed = True
            for row in timer.rows:
                row.fail(*_row_failure(exc))
            gc.collect()

    def report(self, timer_key: str | None, clock: str | None = None) -> TimingReport | None:
        timer = self.timers.get(timer_key) if timer_key else None
        if timer is None or timer.failed or not timer.times:
            return None
        times = timer.cpu_times if (clock or self.config.clock) == "cpu" else timer.times
        return TimingReport(times_s=tuple(times), warmup=self.config.warmup, device=str(self.device))

    # -- stage 3: results -------------------------------------------------------------------------------
    def finish(self) -> None:
        for live in self.live:
            row = live.row
            if row.status != OK:
                continue
            step = self.report(live.step)
            if step is not None:
                row.step_time_s, row.step_time_min_s, row.step_time_p90_s = step.median_s, step.min_s, step.p90_s
                row.timed_steps = step.iters
                row.step_wall_s = self.report(live.step, "wall").median_s
                row.step_cpu_s = self.report(live.step, "cpu").median_s
                row.throughput = step.throughput(self.config.batch_size)
            inference = self.report(live.inference)
            if inference is not None:
                row.inference_s, row.inference_min_s = inference.median_s, inference.min_s
            if live.floor_kind == "cache":
                row.floor_kind = "cache"
                continue
            frozen, side = self.report(live.frozen), self.report(live.side)
            if frozen is not None:
                row.floor_frozen_s = frozen.median_s
                if live.side is None:
                    row.floor_kind, row.floor_s = "inference_forward", frozen.median_s
                elif side is not None:
                    row.floor_kind, row.floor_side_s = "side", side.median_s
                    row.floor_s = frozen.median_s + side.median_s
        self.live.clear()
        self.timers.clear()
        self.shared_source = None
        self.batch = None
        gc.collect()


def _probe_message(error: str) -> str:
    """The informative line of a probe error (the exception line, not the traceback)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    exc_lines = [ln for ln in lines if ": " in ln and ln.split(":")[0].replace(".", "").isidentifier()]
    return (exc_lines[-1] if exc_lines else lines[0]) if lines else error


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return float(a) / float(b)


def add_ratios(report: BenchReport) -> None:
    """Fill the ``*_vs_ref`` and ``time_vs_floor`` columns."""
    ref = report.reference_row
    for row in report.rows:
        row.time_vs_floor = _ratio(row.step_time_s, row.floor_s)
        row.time_vs_inference = _ratio(row.step_time_s, row.inference_s)
        if ref is None:
            continue
        row.time_vs_ref = _ratio(row.step_time_s, ref.step_time_s)
        row.saved_vs_ref = _ratio(row.saved_activation_bytes, ref.saved_activation_bytes)
        row.peak_vs_ref = _ratio(row.peak_growth_bytes, ref.peak_growth_bytes)
        row.static_vs_ref = _ratio(row.static_bytes, ref.static_bytes)
        row.params_vs_ref = _ratio(row.trainable_params, ref.trainable_params)


def _command_line() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    return shlex.join(argv)


def profile(
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
) -> BenchReport:
    """Measure every row of ``config`` (see the module docstring for what and how).

    Args:
        config: what to measure.
        log: progress messages (the CLI prints them; default: the module logger).
        command: the command line to record (default: this process's).

    Returns:
        The report; rows that did not fit or failed carry their status and message.

    Raises:
        ConfigError: an unknown method or an invalid setting (before anything is measured).
    """
    log = log or logger.info
    plans = plan_rows(config)
    names = [p.name for p in plans]
    known = names + [m["name"] for m in list_methods()]  # a method left out of --methods: its ratios are noted absent
    if config.reference not in known:  # a typo: no row could match it
        raise unknown_choice("--reference row", config.reference, names, "It names a row of this bench.")
    prev_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        profiler = _Profiler(config, log)
        rows = []
        for plan in plans:
            if plan.levers.active:
                family = _family(config.backbone)
                problem = lever_problem(plan.levers, family, profiler.device, plan.kind)
                if problem:
                    rows.append(_skipped(plan, problem))
                    log(f"  {plan.name:<22} skipped: {problem}")
                    continue
            start = time.perf_counter()
            row = profiler.measure(plan)
            rows.append(row)
            state = row.status if row.status == OK else f"{row.status}: {row.error}"
            log(f"  {plan.name:<22} measured in {time.perf_counter() - start:.1f} s ({state})")
        profiler.time_all()
        profiler.finish()
        report = BenchReport(
            config=config,
            rows=rows,
            environment=environment_info(profiler.device),
            command=command if command is not None else _command_line(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            img_size=profiler.img_size,
            notes=profiler.notes,
        )
    finally:
        torch.set_num_threads(prev_threads)
    if report.reference_row is None:
        missing = config.reference not in [p.name for p in plans]
        why = "was not measured" if missing else "did not run"
        report.notes.append(f"reference method {config.reference!r} {why}: no ratios to it in this report.")
    add_ratios(report)
    report.notes += noise_notes(report)
    return report


#: A step this far below its own floor is measurement noise, not a result (the floor is part of the step).
NOISE_RATIO = 0.98


def below_floor(row: BenchRow) -> bool:
    """Whether the row's median step is below its own floor: a step cannot cost less than a part of itself."""
    return row.time_vs_floor is not None and row.time_vs_floor < NOISE_RATIO


def noise_notes(report: BenchReport) -> list[str]:
    """One note per row whose step came out below its own floor, with the spread of its timed steps."""
    notes = []
    for row in report.rows:
        if below_floor(row):
            notes.append(
                f"{row.name}: its median step ({1000 * row.step_time_s:.1f} ms; fastest "
                f"{1000 * (row.step_time_min_s or 0):.1f}, 90th percentile {1000 * (row.step_time_p90_s or 0):.1f} ms "
                f"over {row.timed_steps} steps) is below its own floor ({1000 * row.floor_s:.1f} ms): measurement "
                "noise from other load on the machine, not a result. Rerun on a quiet machine, with more --rounds, or "
                "with --clock cpu."
            )
    return notes


def _family(backbone: str) -> str:
    from ..backbones import family_of

    try:
        return family_of(backbone).name
    except Exception:
        return "unknown"


def _skipped(plan: RowPlan, reason: str) -> BenchRow:
    spec = get_method(plan.method)
    return BenchRow(
        name=plan.name,
        method=plan.method,
        kind=plan.kind,
        backprop_through_backbone=spec.backprop_through_backbone,
        levers=plan.levers.description,
        options=dict(plan.options),
        status=ERROR,
        error=f"not applicable: {reason}",
    )
