"""``sidetune plan`` (``sidetune bench --fit``): the largest batch per method that fits a memory budget.

The E3VA paper's question, "can Swin-L train on an 11 GB card?", answered for the user's own backbone,
method and image size. Training memory is, to a very good approximation, linear in the batch size:
weights, gradients, optimizer state and the runtime are fixed, activations grow with every image. So:

1. measure the peak memory of two training steps at two batch sizes ``b1 < b2`` (CPU: the peak resident
   set of a fresh process, interpreter and weights included, with glibc's default allocator policy, as a
   training process started without tuning has it; CUDA: the caching allocator's peak
   reservation, which is what runs out first; the CUDA context itself, typically 0.3-1 GiB, is not in it);
2. fit ``peak(b) = fixed + per_sample * b`` by least squares;
3. predict ``b* = floor((budget - fixed) / per_sample)``;
4. check by a real run at ``b*`` where the machine allows (CPU: only below the ``max_rss`` cap and
   ``max_check_batch``; CUDA: always, an out-of-memory error is caught). A check that exceeds the budget
   adds its point to the fit and the prediction is checked once more.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..methods import get_method
from .accounting import environment_info
from .levers import apply_levers, autocast, lever_problem
from .memory_probe import available_memory_bytes, measure_cuda_peak
from .profile import (
    DOES_NOT_FIT,
    ERROR,
    OK,
    BenchConfig,
    RowPlan,
    _command_line,
    _family,
    build_row_model,
    failure_status,
    plan_rows,
    probe_peak_rss,
)
from .report import fmt_bytes
from .workload import make_batch, make_step, optimizer_for

logger = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"11GB"`` -> 11e9 bytes, ``"11GiB"`` -> 11 * 2**30, ``"512MiB"``, ``"2.5G"``, ``1000``.

    Decimal units (KB, MB, GB, TB; K, M, G, T) are powers of 1000, binary ones (KiB...) powers of 1024.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read {text!r} as a size; write e.g. 11GB, 11GiB, 512MiB or 2.5G.")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"a memory size must be positive, got {text!r}.")
    return size


@dataclass(frozen=True)
class MemoryFit:
    """``peak(batch) = fixed_bytes + per_sample_bytes * batch``, fitted to measured ``points``."""

    fixed_bytes: float
    per_sample_bytes: float
    points: tuple[tuple[int, int], ...]

    def predict(self, batch: int) -> float:
        return self.fixed_bytes + self.per_sample_bytes * batch

    def max_batch(self, budget_bytes: int) -> int | None:
        """The largest batch whose predicted peak is within the budget (0: not even one image fits);
        None when the memory does not grow with the batch (no bound from this fit)."""
        if self.per_sample_bytes <= 0:
            return None
        return max(0, math.floor((budget_bytes - self.fixed_bytes) / self.per_sample_bytes))


def fit_memory(points: Sequence[tuple[int, int | float]]) -> MemoryFit:
    """Least-squares line through ``(batch, peak bytes)`` points (at least two distinct batch sizes).

    Raises:
        ValueError: fewer than two distinct batch sizes.
    """
    pts = [(int(b), float(m)) for b, m in points]
    if len({b for b, _ in pts}) < 2:
        raise ValueError(f"fitting memory needs two distinct batch sizes, got {[b for b, _ in pts]}")
    n = len(pts)
    mean_b = sum(b for b, _ in pts) / n
    mean_m = sum(m for _, m in pts) / n
    slope = sum((b - mean_b) * (m - mean_m) for b, m in pts) / sum((b - mean_b) ** 2 for b, _ in pts)
    return MemoryFit(
        fixed_bytes=mean_m - slope * mean_b,
        per_sample_bytes=slope,
        points=tuple((b, int(m)) for b, m in sorted(pts)),
    )


@dataclass
class PlanRow:
    """The fit of one row.

    Attributes:
        verdict: ``fits`` (checked), ``exceeds`` (checked, over the budget even after a refit),
            ``predicted`` (not checked: ``note`` says why), ``no batch fits``, ``unbounded`` or the failure.
    """

    name: str
    method: str
    kind: str
    status: str = OK
    error: str | None = None
    points: list[tuple[int, int]] = field(default_factory=list)
    fixed_bytes: float | None = None
    per_sample_bytes: float | None = None
    max_batch: int | None = None
    predicted_bytes: float | None = None
    checked_batch: int | None = None
    checked_bytes: int | None = None
    verdict: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PlanReport:
    config: BenchConfig
    budget_bytes: int
    batches: tuple[int, int]
    rows: list[PlanRow]
    environment: dict[str, Any]
    command: str
    created: str
    measure: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        cfg["methods"] = list(cfg["methods"]) if cfg["methods"] is not None else None
        return {
            "schema": "sidetune.plan",
            "schema_version": 1,
            "command": self.command,
            "created": self.created,
            "environment": self.environment,
            "settings": cfg,
            "budget_bytes": self.budget_bytes,
            "batches": list(self.batches),
            "measure": self.measure,
            "notes": list(self.notes),
            "rows": [r.as_dict() for r in self.rows],
        }

    def markdown(self) -> str:
        cfg = self.config
        size = f"{cfg.img_size}px" if cfg.img_size else "default size"
        lines = [
            f"# sidetune plan: {cfg.backbone} ({cfg.weights or 'random weights'}), {size}, "
            f"budget {fmt_bytes(self.budget_bytes)} ({self.budget_bytes:,} bytes)",
            "",
            f"Command: `{self.command}`",
            "",
            f"Measured: {self.measure}, at batch {self.batches[0]} and {self.batches[1]}; line fitted, "
            "largest batch predicted, checked by a real run where the machine allows.",
            "",
            "| method | fixed | per image | max batch | predicted peak | checked at | measured peak | verdict |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            verdict = r.verdict if r.status == OK else f"{r.status}: {r.error}"
            if r.note:
                verdict += f" ({r.note})"
            lines.append(
                "| "
                + " | ".join(
                    [
                        r.name,
                        fmt_bytes(r.fixed_bytes),
                        fmt_bytes(r.per_sample_bytes),
                        "-" if r.max_batch is None else str(r.max_batch),
                        fmt_bytes(r.predicted_bytes),
                        "-" if r.checked_batch is None else str(r.checked_batch),
                        fmt_bytes(r.checked_bytes),
                        verdict.replace("|", "/"),
                    ]
                )
                + " |"
            )
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"


def _peak_cuda(config: BenchConfig, row: RowPlan, batch: int, device: torch.device) -> tuple[bool, int, str | None]:
    model = None
    try:
        model = build_row_model(config, row, device)
        apply_levers(model, row.levers, row.kind, device)
        images, labels = make_batch(batch, model.backbone.layout.img_size, config.num_classes, config.seed, device)
        with torch.no_grad(), autocast(row.levers, device):
            model(images)
        step = make_step(model, images, labels, optimizer_for(model), row.levers)

        def run() -> None:
            for _ in range(config.probe_steps):
                step()

        result = measure_cuda_peak(run, device)
        return result.ok, int(result.reserved_peak_bytes or result.peak_bytes), result.error
    except Exception as exc:
        return False, 0, f"{type(exc).__name__}: {exc}"
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def _measure(
    config: BenchConfig,
    row: RowPlan,
    batch: int,
    device: torch.device,
    max_rss: int | None,
    mmap_threshold: int | None = None,
) -> tuple[bool, int, str | None]:
    """Peak bytes of ``row`` at ``batch``: ``(ok, bytes, error)``."""
    if device.type == "cuda":
        return _peak_cuda(config, row, batch, device)
    # None: glibc's default allocator policy, what a training process started without tuning holds
    result = probe_peak_rss(dataclasses.replace(config, probe_mmap_threshold=mmap_threshold), row, batch, max_rss)
    return result.ok, result.peak_bytes, result.error


def plan(
    config: BenchConfig,
    budget_bytes: int,
    batches: tuple[int, int] = (4, 16),
    check: bool = True,
    max_check_batch: int = 512,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    mmap_threshold: int | None = None,
) -> PlanReport:
    """Predict, and check, the largest batch of each row of ``config`` within ``budget_bytes``.

    Args:
        config: backbone, methods, levers, image size (``batch_size`` is not used).
        budget_bytes: the memory budget.
        batches: the two batch sizes measured for the fit.
        check: run the predicted batch to check it.
        max_check_batch: CPU: do not check batches above this (a check runs two real training steps).
        log: progress messages.
        command: command line to record.
        mmap_threshold: CPU: glibc's ``MALLOC_MMAP_THRESHOLD_`` for the measured processes (None: glibc's dynamic
            default, which keeps freed activations in the heap; a fixed threshold returns every large tensor to the
            system when freed: what a process started with ``MALLOC_MMAP_THRESHOLD_=...`` holds).
    """
    log = log or logger.info
    b1, b2 = sorted(int(b) for b in batches)
    if b1 < 1 or b1 == b2:
        raise ConfigError(f"plan: need two distinct positive batch sizes, got {batches!r}.")
    device = config.torch_device
    max_rss = config.max_rss_bytes
    if max_rss is None and device.type == "cpu":
        available = available_memory_bytes()
        max_rss = int(0.8 * available) if available else None
    rows: list[PlanRow] = []
    for rp in plan_rows(config):
        row = PlanRow(name=rp.name, method=rp.method, kind=get_method(rp.method).kind)
        rows.append(row)
        problem = lever_problem(rp.levers, _family(config.backbone), device, rp.kind) if rp.levers.active else None
        if problem:
            row.status, row.error = ERROR, f"not applicable: {problem}"
            continue
        for b in (b1, b2):
            ok, peak, error = _measure(config, rp, b, device, max_rss, mmap_threshold)
            if not ok:
                status = failure_status(error or "")
                row.status, row.error = status, f"at batch {b}: " + (error or "failed").splitlines()[0]
                break
            row.points.append((b, peak))
        if row.status != OK:
            log(f"  {rp.name:<22} {row.status}: {row.error}")
            continue
        _predict_and_check(config, rp, row, budget_bytes, device, max_rss, check, max_check_batch, mmap_threshold)
        log(f"  {rp.name:<22} max batch {row.max_batch}: {row.verdict} {row.note}".rstrip())
    allocator = (
        "glibc's default allocator policy"
        if mmap_threshold is None
        else f"glibc's mmap threshold fixed at {mmap_threshold} bytes (MALLOC_MMAP_THRESHOLD_)"
    )
    measure = (
        "CUDA peak reserved memory (torch.cuda.max_memory_reserved) of two training steps"
        if device.type == "cuda"
        else "peak resident set of a fresh process over two training steps (interpreter and weights included; "
        f"{allocator})"
    )
    notes = []
    if device.type == "cuda":
        notes.append("The CUDA context (typically 0.3-1 GiB) is not counted: leave room for it in the budget.")
    return PlanReport(
        config=dataclasses.replace(config, probe_mmap_threshold=mmap_threshold),  # what the probes ran with
        budget_bytes=budget_bytes,
        batches=(b1, b2),
        rows=rows,
        environment=environment_info(device),
        command=command if command is not None else _command_line(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        measure=measure,
        notes=notes,
    )


def _predict_and_check(
    config: BenchConfig,
    rp: RowPlan,
    row: PlanRow,
    budget: int,
    device: torch.device,
    max_rss: int | None,
    check: bool,
    max_check_batch: int,
    mmap_threshold: int | None = None,
) -> None:
    fit = fit_memory(row.points)
    row.fixed_bytes, row.per_sample_bytes = fit.fixed_bytes, fit.per_sample_bytes
    row.max_batch = fit.max_batch(budget)
    if row.max_batch is None:
        row.verdict, row.note = "unbounded", "the measured peak does not grow with the batch"
        return
    if row.max_batch < 1:
        row.verdict, row.note = "no batch fits", f"fixed memory {fmt_bytes(fit.fixed_bytes)} alone is over the budget"
        return
    row.predicted_bytes = fit.predict(row.max_batch)
    if not check:
        row.verdict, row.note = "predicted", "not checked"
        return
    candidate = row.max_batch
    for attempt in range(2):
        if device.type == "cpu" and candidate > max_check_batch:
            row.verdict, row.note = "predicted", f"not checked: batch above max_check_batch={max_check_batch}"
            return
        if device.type == "cpu" and max_rss is not None and fit.predict(candidate) > max_rss:
            row.verdict, row.note = "predicted", f"not checked: above the max_rss cap of {fmt_bytes(max_rss)}"
            return
        measured = dict(row.points)
        if candidate in measured:
            ok, peak, error = True, measured[candidate], None
        else:
            ok, peak, error = _measure(config, rp, candidate, device, max_rss, mmap_threshold)
        row.checked_batch, row.checked_bytes = candidate, (peak if ok else None)
        if ok and peak <= budget:
            row.verdict = "fits"
            if attempt:
                row.max_batch, row.predicted_bytes = candidate, fit.predict(candidate)
                row.note = "after a refit on the first check"
            return
        if not ok and failure_status(error or "") != DOES_NOT_FIT:
            row.verdict, row.note = "predicted", f"check failed: {(error or '').splitlines()[0]}"
            return
        if ok:  # over the budget: refit with the new point and try the new prediction
            row.points.append((candidate, peak))
            fit = fit_memory(row.points)
            row.fixed_bytes, row.per_sample_bytes = fit.fixed_bytes, fit.per_sample_bytes
            smaller = fit.max_batch(budget) or 0
        else:  # out of memory: no peak to refit with; step down by a tenth
            smaller = candidate - max(1, candidate // 10)
        candidate = min(smaller, candidate - 1)
        if candidate < 1:
            break
    row.verdict = "exceeds"
    row.note = f"batch {row.checked_batch} measured over the budget: use a smaller batch"
