"""Tables, files and figures of a :class:`~sidetune.bench.profile.BenchReport`.

``write_report`` writes, under one directory and name::

    NAME.md    the Markdown table with the settings, environment and exact command
    NAME.csv   one line per row, every measured field
    NAME.json  settings, environment, command and rows (``schema_version`` 1)
    NAME_memory.png, NAME_time.png        bars per row
    NAME_pareto.png                       accuracy against parameters, memory and time (with --results)

Accuracy results from training are read by :func:`read_accuracies`, which is tolerant of their shape.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .profile import OK, BenchReport, BenchRow, below_floor

logger = logging.getLogger(__name__)

MIB = 1 << 20

# Where an accuracy may sit in a results record, best first: test before validation.
_ACCURACY_PATHS: tuple[tuple[str, ...], ...] = (
    ("accuracy",),
    ("test_accuracy",),
    ("test_acc",),
    ("test_top1",),
    ("top1",),
    ("metrics", "test", "top1"),
    ("metrics", "test", "accuracy"),
    ("metrics", "test_top1"),
    ("metrics", "accuracy"),
    ("test", "top1"),
    ("test", "accuracy"),
    ("metrics", "final_val", "top1"),
    ("metrics", "best_val_top1"),
    ("val_accuracy",),
    ("val_acc",),
    ("val_top1",),
    ("best_val_top1",),
)
_METHOD_PATHS: tuple[tuple[str, ...], ...] = (("method",), ("model", "method"), ("config", "method"))


# ------------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------------


def fmt_bytes(n: float | int | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``-``."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{1000 * s:.1f}"


_COLUMNS = (
    "method",
    "kind",
    "trainable",
    "ckpt",
    "saved for bwd",
    "params+grads+opt",
    "peak growth",
    "step ms (min)",
    "img/s",
    "floor ms",
    "x floor",
    "x inference",
    "x {ref} time",
    "x {ref} saved",
    "x {ref} peak",
    "GFLOPs/img",
    "status",
)


def _cells(row: BenchRow) -> list[str]:
    status = row.status if row.status == OK else f"{row.status}: {row.error}"
    floor = fmt_ms(row.floor_s) + (" (fwd)" if row.floor_kind == "inference_forward" else "")
    if row.floor_kind == "cache":
        floor = "(cached" + (f", {fmt_bytes(row.cache_bytes_per_image)}/img)" if row.cache_bytes_per_image else ")")
    return [
        row.name,
        row.kind,
        fmt_count(row.trainable_params),
        fmt_bytes(row.checkpoint_bytes),
        fmt_bytes(row.saved_activation_bytes),
        fmt_bytes(row.static_bytes),
        fmt_bytes(row.peak_growth_bytes),
        fmt_ms(row.step_time_s) + ("" if row.step_time_min_s is None else f" ({fmt_ms(row.step_time_min_s)})"),
        "-" if row.throughput is None else f"{row.throughput:.1f}",
        floor,
        fmt_ratio(row.time_vs_floor) + (" (noise)" if below_floor(row) else ""),
        fmt_ratio(row.time_vs_inference),
        fmt_ratio(row.time_vs_ref),
        fmt_ratio(row.saved_vs_ref),
        fmt_ratio(row.peak_vs_ref),
        "-" if row.inference_gflops is None else f"{row.inference_gflops:.2f}",
        status.replace("|", "/"),
    ]


def _title(report: BenchReport) -> str:
    cfg = report.config
    size = report.img_size or (cfg.img_size, cfg.img_size)
    size_text = f"{size[0]}x{size[1]}" if size[0] else "default size"
    weights = cfg.weights or "random weights"
    return f"{cfg.backbone} ({weights}), {size_text}, batch {cfg.batch_size}, {report.environment.get('device')}"


def _inference_s(report: BenchReport) -> float | None:
    return next((r.inference_s for r in report.rows if r.inference_s is not None), None)


def _levers_line(report: BenchReport) -> str:
    """What every row of the run has in common (precision, run-wide levers), and which rows are side-only."""
    cfg = report.config
    run = cfg.run_levers
    precision = (
        "float32 (no autocast)"
        if run.precision == "fp32"
        else f"{run.precision} autocast over every row's forward and loss (mixed precision: parameters, gradients "
        "and AdamW state in float32)"
    )
    shared = [
        f"frozen linear weights stored in {run.precision} (every row with frozen weights)"
        if run.frozen_low_precision
        else "",
        "torch.compile of every row's backbone forward (and side networks)" if run.compile else "",
        "channels-last" if run.channels_last else "",
    ]
    text = f"Precision, the same for every row: {precision}."
    if any(shared):
        text += " Levers of every row: " + "; ".join(p for p in shared if p) + "."
    side_only = []
    if cfg.frozen_precision != "fp32":
        side_only.append(
            f"`+{cfg.frozen_precision}-frozen`: the frozen forward alone under {cfg.frozen_precision} autocast, "
            "the side network in float32"
        )
    if cfg.cache:
        side_only.append(
            "`+cache`: the side network's step on taps held in memory, no frozen forward (its floor cell gives what "
            "`sidetune cache build` stores per image for the method, in float16)"
        )
    if side_only:
        text += " Side-only rows (levers no in-place method can use, not a like-for-like comparison): "
        text += "; ".join(side_only) + "."
    return text


def markdown(report: BenchReport) -> str:
    """The report as Markdown: title, command, environment, the table and notes."""
    cfg, env = report.config, report.environment
    ref = cfg.reference
    header = [c.format(ref=ref) for c in _COLUMNS]
    lines = [
        f"# sidetune bench: {_title(report)}",
        "",
        f"Command: `{report.command}`",
        "",
        (
            f"Environment: torch {env.get('torch')}, timm {env.get('timm')}, python {env.get('python')}, "
            f"{env.get('device')} ({env.get('device_name')}), torch threads: {env.get('torch_threads')}, "
            f"git {str(env.get('git_commit') or 'unknown')[:12]}, {report.created}."
        ),
        "",
        (
            f"Step time: median (fastest) of {cfg.rounds} steps after {cfg.warmup} warm-up, "
            + (
                "wall clock"
                if cfg.clock == "wall"
                else "CPU time of the process (time.process_time; images/s are per CPU-second)"
            )
            + ", all rows timed round-robin in one run; ratios use medians. Floor (side methods): inference-mode "
            "frozen forward with the method's taps + the side network's own forward, backward and AdamW step on "
            "precomputed taps; in-place rows `(fwd)`: the plain inference forward. Saved for bwd: activation bytes "
            "autograd keeps for backward (deterministic). Peak growth: "
            + (
                "CUDA max_memory_allocated growth over the training steps."
                if env.get("device", "").startswith("cuda")
                else "resident-set growth of a fresh process over the training steps (gradients, AdamW state, "
                "activations; not the weights"
                + (
                    f"; glibc mmap threshold fixed at {cfg.probe_mmap_threshold} bytes so that freed tensors leave "
                    "the resident set)."
                    if cfg.probe_mmap_threshold
                    else ")."
                )
            )
            + f" Ratios `x {ref}` divide by the {ref} row; `x inference` divides the step by the plain inference "
            "forward of the frozen backbone (no taps, inference mode, the run's precision and levers)"
            + (f": {fmt_ms(_inference_s(report))} ms." if _inference_s(report) else ".")
        ),
        "",
        _levers_line(report),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i in (0, 1, len(header) - 1) else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report.rows]
    if report.notes:
        lines += ["", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def terminal_table(report: BenchReport) -> str:
    """The Markdown table only (what the CLI prints)."""
    ref = report.config.reference
    header = [c.format(ref=ref) for c in _COLUMNS]
    rows = [header, *[_cells(r) for r in report.rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for k, r in enumerate(rows):
        left = (0, 1, len(header) - 1)
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("| " + " | ".join(cells) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------
# CSV / JSON
# ------------------------------------------------------------------------------------------------------


def csv_text(report: BenchReport) -> str:
    """One line per row with every field of :class:`BenchRow` (``options`` as JSON)."""
    rows = [r.as_dict() for r in report.rows]
    fields = list(rows[0]) if rows else list(BenchRow.__dataclass_fields__)
    buf = io.StringIO()
    buf.write(f"# {report.command}\n")
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in r.items()})
    return buf.getvalue()


def json_text(report: BenchReport) -> str:
    return json.dumps(report.as_dict(), indent=2, default=str) + "\n"


# ------------------------------------------------------------------------------------------------------
# Results from training
# ------------------------------------------------------------------------------------------------------


def _get(record: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _records(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in ("results", "rows", "runs"):
            if isinstance(data.get(key), list):
                return _records(data[key])
        return [data]
    return []


def _expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("summary.json")) or sorted(p.glob("*/summary.json"))
            if not found:
                raise FileNotFoundError(f"{str(p)!r} holds no summary.json (nor */summary.json)")
            files += found
        else:
            files.append(p)
    return files


def read_accuracies(paths: Sequence[str | os.PathLike]) -> dict[str, float]:
    """Read method -> accuracy (a fraction in [0, 1]) from training results, whatever their shape.

    Each path is a JSON file, or a directory holding ``summary.json`` (or ``*/summary.json``: a folder of
    runs). A file holds a list of records, an object with such a list under ``results``/``rows``/``runs``,
    or one record (``sidetune train``'s ``summary.json``). In a record:

    * the method is ``method``, ``model.method`` or ``config.method``;
    * the accuracy is the first present of: ``accuracy``, ``test_accuracy``, ``test_acc``, ``test_top1``,
      ``top1``, ``metrics.test.top1``, ``metrics.test.accuracy``, ``metrics.test_top1``,
      ``metrics.accuracy``, ``test.top1``, ``test.accuracy`` (test), then ``metrics.final_val.top1``,
      ``metrics.best_val_top1``, ``val_accuracy``, ``val_acc``, ``val_top1``, ``best_val_top1``
      (validation);
    * a value above 1 is read as a percentage.

    Records without a method or an accuracy are skipped with a warning; when a method appears more than
    once, its best accuracy is kept.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file is not JSON, or no record had both a method and an accuracy.
    """
    out: dict[str, float] = {}
    for path in _expand(paths):
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} is not JSON: {err}") from None
        for i, record in enumerate(_records(data)):
            method = next((m for m in (_get(record, p) for p in _METHOD_PATHS) if isinstance(m, str)), None)
            acc = next(
                (
                    float(a)
                    for a in (_get(record, p) for p in _ACCURACY_PATHS)
                    if isinstance(a, int | float) and not isinstance(a, bool)
                ),
                None,
            )
            if method is None or acc is None or not math.isfinite(acc):
                logger.warning("%s: record %d has no method or accuracy; skipped", path, i)
                continue
            acc = acc / 100.0 if acc > 1.0 else acc
            out[method] = max(acc, out.get(method, -math.inf))
    if not out:
        raise ValueError(f"no record with a method and an accuracy in {[str(p) for p in paths]}; see read_accuracies")
    return out


# ------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(report: BenchReport, path: str | os.PathLike) -> Path:
    """Horizontal bars per row: saved for backward, params+grads+optimizer, peak growth (log MiB axis)."""
    plt = _pyplot()
    rows = [r for r in report.rows if r.status == OK]
    series = [
        ("saved for backward", "saved_activation_bytes", "tab:blue"),
        ("params + grads + AdamW", "static_bytes", "tab:gray"),
        ("peak growth", "peak_growth_bytes", "tab:red"),
    ]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.55 * max(1, len(rows))))
    h = 0.8 / len(series)
    for k, (label, key, color) in enumerate(series):
        values = [max((getattr(r, key) or 0) / MIB, 1e-3) for r in rows]
        ax.barh([i + (k - 1) * h for i in range(len(rows))], values, height=h, label=label, color=color)
    ax.set_yticks(range(len(rows)), [r.name for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("MiB (log scale)")
    ax.set_title(f"Training memory: {_title(report)}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_time(report: BenchReport, path: str | os.PathLike) -> Path:
    """Horizontal bars of the median step time per row, the floor marked, images/s written beside."""
    plt = _pyplot()
    rows = [r for r in report.rows if r.status == OK and r.step_time_s is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(1, len(rows))))
    ys = range(len(rows))
    colors = ["tab:green" if r.kind == "side" else "tab:orange" for r in rows]
    ax.barh(ys, [1000 * r.step_time_s for r in rows], color=colors, height=0.6)
    floors = [(i, 1000 * r.floor_s) for i, r in enumerate(rows) if r.floor_s is not None]
    if floors:
        ax.scatter([f for _, f in floors], [i for i, _ in floors], marker="|", s=300, color="black", label="floor")
        ax.legend(fontsize=8, loc="lower right")
    for i, r in enumerate(rows):
        ax.text(1000 * r.step_time_s, i, f" {r.throughput:.1f} img/s", va="center", fontsize=7)
    ax.set_yticks(list(ys), [r.name for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("median training step (ms); green: side methods, orange: in-place")
    ax.set_title(f"Step time: {_title(report)}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with lower-or-equal cost and higher-or-equal accuracy, by cost."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(report: BenchReport, accuracies: dict[str, float], path: str | os.PathLike) -> Path | None:
    """Accuracy against trainable parameters, peak memory growth and step time, with the Pareto front.

    A row is matched to an accuracy by its name (``losa``, or a variant such as ``losa[channel_rank=32]`` when
    the results name it so); rows with levers, ``+gc`` or a variant's options are left out unless the results
    name them, which keeps one point per trained model. Returns None when nothing matches.
    """
    plt = _pyplot()
    rows = [r for r in report.rows if r.status == OK and r.name in accuracies]
    if not rows:
        logger.warning("no measured row matches the results' methods %s", sorted(accuracies))
        return None
    axes_spec = [
        ("trainable_params", "trainable parameters", True, 1.0),
        ("peak_growth_bytes", "peak memory growth (MiB)", True, 1.0 / MIB),
        ("step_time_s", "training step (ms)", False, 1000.0),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (key, label, log, scale) in zip(axes, axes_spec, strict=True):
        pts = [(getattr(r, key) * scale, 100 * accuracies[r.name], r) for r in rows if getattr(r, key) is not None]
        for x, y, r in pts:
            ax.scatter(x, y, color="tab:green" if r.kind == "side" else "tab:orange", zorder=3)
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = _pareto_front([(x, y) for x, y, _ in pts])
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="black", alpha=0.5, lw=1)
        if log and all(x > 0 for x, _, _ in pts):
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(f"Accuracy vs cost (green: side, orange: in-place): {_title(report)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------------------
# Everything at once
# ------------------------------------------------------------------------------------------------------


def write_report(
    report: BenchReport,
    directory: str | os.PathLike,
    name: str = "bench",
    accuracies: dict[str, float] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write NAME.md/.csv/.json and the figures under ``directory``; return what was written, by kind."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "md": out / f"{name}.md",
        "csv": out / f"{name}.csv",
        "json": out / f"{name}.json",
    }
    written["md"].write_text(markdown(report))
    written["csv"].write_text(csv_text(report))
    written["json"].write_text(json_text(report))
    if plots:
        if any(r.status == OK for r in report.rows):
            written["memory_png"] = plot_memory(report, out / f"{name}_memory.png")
            written["time_png"] = plot_time(report, out / f"{name}_time.png")
        if accuracies:
            pareto = plot_pareto(report, accuracies, out / f"{name}_pareto.png")
            if pareto is not None:
                written["pareto_png"] = pareto
    return written
