"""Efficiency benchmark: memory and time of every method side by side, against the project's targets.

Writes, per backbone, ``docs/benchmarks/efficiency_<backbone>.{md,csv,json}`` and ``..._memory.png`` /
``..._time.png`` (the ``sidetune bench`` report, whose header records this exact command), with a targets
section appended to the Markdown: LoSA and E3VA training steps at most 0.35x full fine-tuning and 0.40x
LoRA, at most 1.10x the floor, bytes saved for backward at most 0.10x full, peak memory growth at most
0.20x full. ``--profile`` adds a torch.profiler table of one training step per method, to find what is
slow where a target is missed.

    python benchmarks/efficiency.py                                   # ViT-B/16, Swin-T, Swin-B at 224, batch 8
    python benchmarks/efficiency.py --backbones vit_base_patch16_224 --profile losa,e3va,lora
    python benchmarks/efficiency.py --backbones vit_base_patch16_224 --methods full,lora,losa,e3va --precision bf16

Random weights are fine: cost does not depend on the values of the weights.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from sidetune.bench.profile import OK, BenchConfig, BenchReport, profile
from sidetune.bench.report import fmt_ratio, write_report
from sidetune.bench.workload import build_model, make_batch, make_step

BACKBONES = ("vit_base_patch16_224", "swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224")
METHODS = ("full", "lora", "linear", "losa", "e3va", "lst")
OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"

# (what, how to read it from a row given the report, bound)
TARGETS: tuple[tuple[str, Callable, float], ...] = (
    ("step time / full", lambda r, rep: r.time_vs_ref, 0.35),
    ("step time / LoRA", lambda r, rep: _over(r.step_time_s, _step(rep, "lora")), 0.40),
    ("step time / floor", lambda r, rep: r.time_vs_floor, 1.10),
    ("saved for backward / full", lambda r, rep: r.saved_vs_ref, 0.10),
    ("peak memory growth / full", lambda r, rep: r.peak_vs_ref, 0.20),
)
TARGET_METHODS = ("losa", "e3va")


def _over(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _step(report: BenchReport, name: str) -> float | None:
    row = next((r for r in report.rows if r.name == name and r.status == OK), None)
    return row.step_time_s if row else None


def targets_markdown(report: BenchReport) -> tuple[str, list[str]]:
    """The targets table of one report and the list of misses."""
    lines = ["## Targets", "", "| method | measure | target | measured | |", "|---|---|---:|---:|---|"]
    misses = []
    for name in TARGET_METHODS:
        row = next((r for r in report.rows if r.name == name), None)
        for what, read, bound in TARGETS:
            value = read(row, report) if row is not None and row.status == OK else None
            verdict = "n/a" if value is None else ("met" if value <= bound else "**MISSED**")
            if verdict == "**MISSED**":
                misses.append(f"{name}: {what} {value:.2f}x > {bound:.2f}x")
            lines.append(f"| {name} | {what} | <= {bound:.2f}x | {fmt_ratio(value)} | {verdict} |")
    return "\n".join(lines) + "\n", misses


def profile_steps(config: BenchConfig, methods: list[str], rows: int = 18) -> str:
    """torch.profiler tables (self CPU time) of one training step per method, after one warm-up step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    device = config.torch_device
    for method in methods:
        model = build_model(
            config.backbone,
            method,
            num_classes=config.num_classes,
            img_size=config.img_size,
            weights=config.weights,
            backbone_kwargs=config.backbone_kwargs,
            options={},
            seed=config.seed,
            device=device,
        )
        images, labels = make_batch(config.batch_size, model.backbone.layout.img_size, config.num_classes, 0, device)
        step = make_step(model, images, labels, torch.optim.AdamW(model.trainable_parameters(), lr=1e-4))
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
        out += [f"### {method}", "", "```", table.strip(), "```", ""]
        del model, step
    return "\n".join(out)


def run_backbone(backbone: str, args: argparse.Namespace, command: str) -> list[str]:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    config = BenchConfig(
        backbone=backbone,
        methods=methods,
        img_size=args.img_size,
        batch_size=args.batch_size,
        warmup=args.warmup,
        rounds=args.rounds,
        precision=args.precision,
        compile=args.compile,
        grad_checkpointing=args.grad_checkpointing,
        threads=args.threads,
        clock=args.clock,
    )
    print(f"== {backbone}", file=sys.stderr, flush=True)
    report = profile(config, log=lambda s: print(s, file=sys.stderr, flush=True), command=command)
    levers = args.precision != "fp32" or args.compile
    stem = f"efficiency{'_levers' if levers else ''}_{backbone}"
    written = write_report(report, args.out, stem)
    targets, misses = targets_markdown(report)
    extra = ["", targets]
    if args.profile:
        extra += ["## Where the time goes (torch.profiler, one step, self CPU time)", ""]
        extra.append(profile_steps(config, [m.strip() for m in args.profile.split(",")]))
    with written["md"].open("a") as fh:
        fh.write("\n".join(extra))
    print(written["md"].read_text())
    return [f"{backbone}: {m}" for m in misses]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--methods", default=",".join(METHODS))
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
    parser.add_argument("--grad-checkpointing", action="store_true", help="add full+gc and lora+gc rows")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="lever rows")
    parser.add_argument("--compile", action="store_true", help="torch.compile lever rows (side methods)")
    parser.add_argument("--profile", default="", help="comma-separated methods to profile one step of")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # also for --profile
    command = shlex.join(["python", "benchmarks/efficiency.py", *(sys.argv[1:] if argv is None else argv)])
    misses = []
    for backbone in (b.strip() for b in args.backbones.split(",") if b.strip()):
        misses += run_backbone(backbone, args, command)
    if misses:
        print("targets missed:\n  " + "\n  ".join(misses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
