"""Efficiency benchmark: memory and time of every method side by side, against the project's targets.

Writes, per backbone and precision, ``docs/benchmarks/efficiency_<backbone>.{md,csv,json}`` (float32) or
``efficiency_<precision>_<backbone>.*`` and ``..._memory.png`` / ``..._time.png`` (the ``sidetune bench``
report, whose header records this exact command), with a targets section appended to the Markdown. Every row of a
run trains in the same precision (``--precision bf16``: every row under bf16 autocast, full fine-tuning and LoRA
included). ``full+gc`` and ``lora+gc`` (gradient checkpointing: the memory baseline a user tries first) are
standing rows. The targets (issue 17), for LoSA and E3VA by default:

* bytes saved for backward at most 0.10x full fine-tuning's and at most LoRA+gc's;
* the training step (uncached) at most 1.10x the plain inference forward of the frozen backbone, and at most
  0.35x full fine-tuning's step;
* peak memory growth at most 0.20x full fine-tuning's.

``--profile`` adds a torch.profiler table of one training step per method (and of the side network alone, by
input shape), to find what is slow where a target is missed. ``--summary`` rewrites ``targets.md`` from every
``efficiency_*.json`` (and ``plan_*.json`` for the fit-planner target) beside it.

    python benchmarks/efficiency.py                                   # ViT-B/16, Swin-T, Swin-B at 224, batch 8
    python benchmarks/efficiency.py --precision bf16                  # every row under bf16 autocast
    python benchmarks/efficiency.py --backbones vit_base_patch16_224 --profile losa,e3va,lora

Random weights are fine: cost does not depend on the values of the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sidetune.bench.levers import apply_levers, autocast
from sidetune.bench.profile import OK, BenchConfig, BenchReport, build_row_model, plan_rows, profile, split_methods
from sidetune.bench.report import fmt_ratio, write_report
from sidetune.bench.workload import make_batch, make_step

BACKBONES = ("vit_base_patch16_224", "swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224")
# the defaults, and the former defaults as variant rows (recompute=false: every activation kept)
METHODS = ("full", "lora", "linear", "losa", "losa[recompute=false]", "e3va", "e3va[recompute=false]", "lst")
OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
TARGET_METHODS = ("losa", "e3va")  # every row of these methods: the defaults, variants, side-only levers


def _over(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _row(rows: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    row = rows.get(name)
    return row if row is not None and row.get("status") == OK else None


def _lora_gc_saved(r: dict[str, Any], rows: dict[str, dict[str, Any]]) -> float | None:
    gc = _row(rows, "lora+gc")
    return _over(r["saved_activation_bytes"], gc["saved_activation_bytes"] if gc else None)


# (what, how to read it from a row given all rows by name, bound), as JSON rows (dicts) so that the summary reads
# them from the files
TARGETS: tuple[tuple[str, Callable[[dict[str, Any], dict[str, dict[str, Any]]], float | None], float], ...] = (
    ("saved for backward / full", lambda r, rows: r["saved_vs_ref"], 0.10),
    ("saved for backward / LoRA+gc", _lora_gc_saved, 1.00),
    ("step / inference forward", lambda r, rows: r["time_vs_inference"], 1.10),
    ("step / full", lambda r, rows: r["time_vs_ref"], 0.35),
    ("peak memory growth / full", lambda r, rows: r["peak_vs_ref"], 0.20),
)
# for reading, not targets: the same time ratios from the fastest steps (load from other processes only adds time,
# so on a busy machine the fastest of the round-robin steps is the cost with the least noise), and the side methods
# against the baselines a user would try first
CONTEXT: tuple[tuple[str, Callable[[dict[str, Any], dict[str, dict[str, Any]]], float | None]], ...] = (
    ("fastest: step / inference", lambda r, rows: _over(r["step_time_min_s"], r.get("inference_min_s"))),
    (
        "fastest: step / full",
        lambda r, rows: _over(r["step_time_min_s"], (_row(rows, "full") or {}).get("step_time_min_s")),
    ),
    ("step / LoRA", lambda r, rows: _over(r["step_time_s"], (_row(rows, "lora") or {}).get("step_time_s"))),
    ("step / LoRA+gc", lambda r, rows: _over(r["step_time_s"], (_row(rows, "lora+gc") or {}).get("step_time_s"))),
    ("step / floor", lambda r, rows: r["time_vs_floor"]),
)


def _target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["method"] in TARGET_METHODS and not r["name"].endswith("+gc")]


def targets_markdown(report: BenchReport) -> tuple[str, list[str]]:
    """The targets table of one report (every LoSA and E3VA row) and the list of the defaults' misses."""
    data = json.loads(json.dumps(report.as_dict(), default=str))
    rows = {r["name"]: r for r in data["rows"]}
    lines = ["## Targets", ""]
    lines += [f"Precision of every row: {report.config.precision}. Rows named `losa` and `e3va` are the defaults.", ""]
    lines += ["| row | " + " | ".join(f"{what} (<= {bound:.2f}x)" for what, _, bound in TARGETS) + " | "]
    lines[-1] += " | ".join(what for what, _ in CONTEXT) + " |"
    lines += ["|---|" + "---:|" * (len(TARGETS) + len(CONTEXT))]
    misses = []
    for r in _target_rows(data["rows"]) or []:
        cells = []
        for what, read, bound in TARGETS:
            value = read(r, rows) if r["status"] == OK else None
            cells.append(_cell(value, bound))
            if value is not None and value > bound and r["name"] in TARGET_METHODS:
                misses.append(f"{r['name']}: {what} {value:.2f}x > {bound:.2f}x")
        cells += [fmt_ratio(read(r, rows) if r["status"] == OK else None) for _, read in CONTEXT]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: above the target; `-`: not measured (or the row it divides by is missing)."]
    return "\n".join(lines) + "\n", misses


def _cell(value: float | None, bound: float) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value <= bound else f"**{value:.2f}x**"


def _plan_lines(out: Path) -> list[str]:
    """The fit-planner target (LoSA's and E3VA's largest batch at least 2x LoRA's) from ``plan_*.json``."""
    lines = []
    for path in sorted(out.glob("plan_*.json")):
        data = json.loads(path.read_text())
        batches = {r["name"]: r.get("max_batch") for r in data["rows"] if r.get("status") == OK}
        lora = batches.get("lora")
        if not lora:
            continue
        cells = []
        for name in TARGET_METHODS:
            b = batches.get(name)
            ratio = None if b is None else b / lora
            cells.append("-" if ratio is None else (f"{b} ({ratio:.1f}x)" if ratio >= 2 else f"**{b} ({ratio:.1f}x)**"))
        head = f"| {path.stem} | {_memory_measure(data)} | {lora} | "
        lines.append(head + " | ".join(cells) + f" | `{data['command']}` |")
    if not lines:
        return []
    head = ["## Fit planner: largest batch within the budget, at least 2x LoRA's", ""]
    head += [
        "On CPU the measure is a process's peak resident set, which depends on the C allocator as much as on the",
        "tensors: glibc's default policy raises its mmap threshold after large frees, so freed activations stay in",
        "the heap; a fixed threshold (`--mmap-threshold 131072`, i.e. `MALLOC_MMAP_THRESHOLD_=131072`) returns them.",
        "Both are rows; every method of a row ran under the same policy.",
        "",
    ]
    head += ["| plan | memory measured | LoRA | LoSA | E3VA | command |", "|---|---|---:|---:|---:|---|"]
    return [*head, *lines, ""]


def _memory_measure(plan: dict[str, Any]) -> str:
    """What a plan measured: CUDA reserved memory, or the peak RSS under glibc's default or a fixed threshold."""
    measure = plan.get("measure", "")
    if "CUDA" in measure:
        return "CUDA reserved"
    threshold = re.search(r"mmap threshold fixed at (\d+) bytes", measure)
    return f"RSS, glibc mmap threshold {threshold.group(1)} B" if threshold else "RSS, glibc default policy"


def write_summary(out: Path) -> Path:
    """``targets.md``: every target of every ``efficiency_*.json`` under ``out``, one table, with the commands."""
    lines = ["# Efficiency targets, all measured backbones", ""]
    lines += ["Generated by `python benchmarks/efficiency.py --summary` from the JSON files beside it.", ""]
    lines += ["| file | precision | row | " + " | ".join(f"{what} (<= {bound:.2f}x)" for what, _, bound in TARGETS)]
    lines[-1] += " | " + " | ".join(what for what, _ in CONTEXT) + " |"
    lines += ["|---|---|---|" + "---:|" * (len(TARGETS) + len(CONTEXT))]
    commands = []
    for path in sorted(out.glob("efficiency_*.json")):
        data = json.loads(path.read_text())
        rows = {r["name"]: r for r in data["rows"]}
        commit = data["environment"]["git_commit"]
        precision = data["settings"].get("precision", "fp32")
        commands.append(f"- `{path.stem}`: `{data['command']}` ({data['created']}, git {str(commit)[:12]})")
        for r in _target_rows(data["rows"]):
            if r["status"] != OK:
                continue
            cells = [_cell(_safe(read, r, rows), bound) for _, read, bound in TARGETS]
            cells += [fmt_ratio(_safe(read, r, rows)) for _, read in CONTEXT]
            lines.append(f"| {path.stem} | {precision} | {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: above the target; `-`: not in that file. Rows `losa` and `e3va` are the defaults.", ""]
    lines += _plan_lines(out)
    lines += ["Commands:", "", *commands, ""]
    target = out / "targets.md"
    target.write_text("\n".join(lines))
    return target


def _safe(read: Callable, r: dict[str, Any], rows: dict[str, dict[str, Any]]) -> float | None:
    try:  # files written before a column existed lack it
        return read(r, rows)
    except KeyError:
        return None


def profile_steps(config: BenchConfig, methods: list[str], rows: int = 18) -> str:
    """torch.profiler tables (self CPU time) of one training step per method, after one warm-up step, in the run's
    precision and levers; for side methods also of the side network alone (forward_taps, head, loss, backward on
    precomputed taps), grouped by input shape, which shows which of its operations cost the most."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    device = config.torch_device
    plans = {p.name: p for p in plan_rows(dataclasses.replace(config, methods=tuple(methods)))}
    for method in methods:
        plan = plans[method]  # a variant, losa[recompute=false], is profiled with its options
        model = build_row_model(config, plan, device)
        apply_levers(model, plan.levers, plan.kind, device)
        images, labels = make_batch(config.batch_size, model.backbone.layout.img_size, config.num_classes, 0, device)
        step = make_step(model, images, labels, torch.optim.AdamW(model.trainable_parameters(), lr=1e-4), plan.levers)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
        out += [f"### {method}", "", "```", table.strip(), "```", ""]
        if hasattr(model.method, "forward_taps"):
            with torch.no_grad(), autocast(plan.levers, device):
                taps = model.backbone(images, model.method.tap_request)
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                with autocast(plan.levers, device):
                    logits = model.head(model.method.forward_taps(taps))
                    loss = torch.nn.functional.cross_entropy(logits, labels)
                loss.backward()
            table = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=30, max_shapes_column_width=70
            )
            out += [f"#### {method}: the side network alone, by input shape", "", "```", table.strip(), "```", ""]
        del model, step
    return "\n".join(out)


def run_backbone(backbone: str, args: argparse.Namespace, command: str) -> list[str]:
    methods = tuple(split_methods(args.methods))
    config = BenchConfig(
        backbone=backbone,
        methods=methods,
        img_size=args.img_size,
        batch_size=args.batch_size,
        warmup=args.warmup,
        rounds=args.rounds,
        precision=args.precision,
        frozen_low_precision=args.frozen_weights_low_precision,
        compile=args.compile,
        frozen_precision=args.frozen_precision,
        cache=args.cache,
        grad_checkpointing=not args.no_grad_checkpointing,
        threads=args.threads,
        clock=args.clock,
        peak_memory=not args.no_peak,
    )
    print(f"== {backbone}", file=sys.stderr, flush=True)
    report = profile(config, log=lambda s: print(s, file=sys.stderr, flush=True), command=command)
    tag = "" if args.precision == "fp32" else f"{args.precision}_"
    tag += "compile_" if args.compile else ""
    written = write_report(report, args.out, f"efficiency_{tag}{backbone}")
    targets, misses = targets_markdown(report)
    extra = ["", targets]
    if args.profile:
        extra += ["## Where the time goes (torch.profiler, one step, self CPU time)", ""]
        extra.append(profile_steps(config, split_methods(args.profile)))
    with written["md"].open("a") as fh:
        fh.write("\n".join(extra))
    print(written["md"].read_text())
    return [f"{backbone} ({args.precision}): {m}" for m in misses]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--methods", default=",".join(METHODS), help="as sidetune bench --methods, variants included")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, see --clock)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="cpu",
        help="cpu (default): CPU seconds of a one-thread process, robust to other load on a shared machine",
    )
    parser.add_argument("--no-grad-checkpointing", action="store_true", help="leave out the full+gc and lora+gc rows")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="of every row")
    parser.add_argument(
        "--frozen-weights-low-precision", action="store_true", help="every row's frozen weights in --precision"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every row's backbone and side network")
    parser.add_argument("--frozen-precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="side-only rows")
    parser.add_argument("--cache", action="store_true", help="side-only +cache rows (taps held in memory)")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory probes (one process per row)")
    parser.add_argument("--profile", default="", help="comma-separated methods to profile one step of")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--summary", action="store_true", help="only (re)write targets.md from the JSON files")
    args = parser.parse_args(argv)
    if args.summary:
        print(write_summary(args.out).read_text())
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)  # also for --profile
    command = shlex.join(["python", "benchmarks/efficiency.py", *(sys.argv[1:] if argv is None else argv)])
    misses = []
    for backbone in (b.strip() for b in args.backbones.split(",") if b.strip()):
        misses += run_backbone(backbone, args, command)
    write_summary(args.out)
    if misses:
        print("targets missed:\n  " + "\n  ".join(misses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
