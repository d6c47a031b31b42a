"""``sidetune cache build|info`` and ``sidetune sweep``: the command-line face of :mod:`sidetune.cache`.

Torch-free at import (the CLI starts fast); registered through :data:`sidetune.cli.COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from ..errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cache`` (with ``build`` and ``info``) and ``sweep``."""
    from ..train.commands import DATA_DOCS, TASK_FLAGS, _float_in, _int_at_least, _layout_lines, _optional_str

    s = argparse.SUPPRESS
    p = subparsers.add_parser(
        "cache",
        description="The tap cache: one pass of the frozen backbone writes the taps that side methods read, so that "
        "training (sidetune train --cache DIR) and sweeps (sidetune sweep) never run the backbone again.",
    )
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="{build,info}")
    b = sub.add_parser(
        "build",
        help="write the taps of a dataset's splits for some side methods",
        description=(
            "One pass of the frozen backbone over the splits of --data, as a training run with the same settings "
            "reads them (the task's datasets and transforms), writes the taps the --methods read (their union) as "
            "memory-mapped safetensors shards plus each sample's target, and a manifest (backbone, weights "
            "fingerprint, taps, transforms, the files with their sizes and times, dtype, version). It prints the "
            "size before writing and refuses when the disk lacks room; an interrupted build resumes at its first "
            "missing shard. Under torchrun every process writes its own shards.\n\nData layouts (--layout; "
            f"{DATA_DOCS}):\n" + _layout_lines()
        ),
        epilog="example: sidetune cache build vit_small_patch14_dinov2 --methods losa,e3va --weights "
        "vit_s.safetensors --img-size 224 --data ../shared/assets/data/cifar10-1k --val-fraction 0.2 "
        "--output caches/cifar",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("backbone", help="timm model name")
    b.add_argument("--methods", required=True, help="comma-separated side methods whose taps to store (the union)")
    b.add_argument("--output", required=True, help="the cache folder")
    b.add_argument("--task", default=s, help="classification (default), segmentation, detection, instance, video")
    b.add_argument("--weights", type=_optional_str, default=s, help="backbone weights (a file, 'hub')")
    b.add_argument("--img-size", type=_int_at_least(1), default=s, help="input size (default: the backbone's)")
    b.add_argument("--backbone-opt", metavar="KEY=VALUE", action="append", default=s, help="timm argument")
    b.add_argument("--head-opt", metavar="KEY=VALUE", action="append", default=s, help="dense head option")
    b.add_argument("--opt", metavar="METHOD.KEY=VALUE", action="append", default=[],
                   help="a method option that changes what it reads (losa.blocks=8,9)")  # fmt: skip
    b.add_argument("--data", required=True, help="the dataset")
    b.add_argument("--layout", default=s, help="data layout (default: auto)")
    for name in ("train-split", "val-split", "test-split"):
        b.add_argument(f"--{name}", type=_optional_str, default=s, help="as for sidetune train (default: auto)")
    b.add_argument("--val-fraction", type=_float_in(0, 1, low_open=True, high_open=True, none=True), default=s,
                   help="carve this fraction of train off as validation, as the runs will")  # fmt: skip
    b.add_argument("--train-limit", type=_int_at_least(1), default=s, help="the first N training images only")
    b.add_argument("--val-limit", type=_int_at_least(1), default=s, help="the first N validation images only")
    b.add_argument("--augmentation", default=s, help="the task's transform recipe, as the runs will use")
    b.add_argument("--eval-mode", default=s, help="segmentation: whole (slide cannot be cached)")
    # video: how frames are sampled decides the cached clips (recorded, checked against the runs)
    b.add_argument("--num-frames", type=_int_at_least(1), default=s, help=TASK_FLAGS["--num-frames"][1])
    b.add_argument("--frame-sampling", default=s,
                   help=TASK_FLAGS["--frame-sampling"][1] + "; random: cache --views K, one per epoch")  # fmt: skip
    b.add_argument("--frame-stride", type=_int_at_least(1), default=s, help=TASK_FLAGS["--frame-stride"][1])
    b.add_argument("--clip-policy", default=s, help=TASK_FLAGS["--clip-policy"][1])
    b.add_argument("--task-opt", metavar="KEY=VALUE", action="append", default=s,
                   help="any task option by name, as the runs will give it (e.g. verify=true for video)")  # fmt: skip
    b.add_argument("--seed", type=_int_at_least(0), default=s, help="the runs' seed (splits, augmentation views)")
    b.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default=s,
                   help="precision of the backbone's forward, as the runs will use (default: auto)")  # fmt: skip
    b.add_argument("--cpu", action="store_true", default=s, help="on the CPU even when CUDA is available")
    b.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage of the taps (default: float16)")  # fmt: skip
    b.add_argument("--views", type=_int_at_least(1), default=1,
                   help="augmented views per training image (view v = epoch v's; default 1)")  # fmt: skip
    b.add_argument("--splits", default="train,val,test", help="the splits to cache, of those the data has")
    b.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="images per forward (video: clips, all their frames at once; default 32)")  # fmt: skip
    b.add_argument("--shard-size", type=_int_at_least(1), default=256, help="samples per shard file (default 256)")
    b.add_argument("--workers", type=_int_at_least(0), default=s, help="data-loading processes")
    b.add_argument("--threads", type=_int_at_least(1), default=s, help="torch CPU threads")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)
    i = sub.add_parser(
        "info",
        help="what a cache holds, its size and whether it is complete",
        description="What a cache holds, its size, and whether it is complete: every shard the manifest lists is "
        "there with the size the build wrote (caches of older versions: a whole safetensors header). A damaged "
        "shard is listed under 'damaged', 'complete' is false, and the command exits 1; run the same "
        "`sidetune cache build` into the folder again to rewrite it.",
    )
    i.add_argument("cache", help="the cache folder")
    i.set_defaults(func=cmd_info)

    p = subparsers.add_parser(
        "sweep",
        description=(
            "Train every combination of a grid on a tap cache in one pass per epoch: each batch of taps is read once "
            "and feeds every configuration's side network and head. Each configuration trains as its own "
            "`sidetune train --cache` run would (same initialisation, batches, schedule, random stream). The best "
            "configuration on validation is scored once on test. Writes OUTPUT/{sweep.md,sweep.csv,sweep.json,"
            "sweep.png,best/,configs/}. Grid values are comma-separated (use '|' between values that hold commas).\n\n"
            "--halving ETA searches the grid by successive halving instead (Jamieson & Talwalkar 2016, on the rung "
            "schedule of Hyperband): every configuration trains a short share of the budget, the best 1/ETA on "
            "validation go on and the rest stop, until the last ones train all the epochs (9 configurations, ETA 3: "
            "cuts after 1/9 and 1/3 of the steps, 2.33 runs' side-network steps instead of 9). A small learning "
            "rate can look worse early than it ends: with few epochs prefer the exhaustive grid."
        ),
        epilog="example: sidetune sweep --cache caches/cifar losa --lr 1e-3,3e-3,1e-2 --opt channel_rank=8,16,32 "
        "--epochs 20 --output runs/sweep-losa",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("method", help="the side method")
    p.add_argument("--cache", required=True, help="a complete tap cache holding the method's taps")
    p.add_argument("--output", required=True, help="the sweep's folder")
    p.add_argument("--lr", default="1e-3", help="learning rates (grid)")
    p.add_argument("--head-lr-mult", help="the task head's rate as a multiple of --lr (grid; default 1)")
    p.add_argument("--weight-decay", help="weight decays (grid; default: the task's)")
    p.add_argument("--warmup-epochs", default=None, help="warm-up lengths in epochs (grid; default 1)")
    p.add_argument("--opt", metavar="KEY=V1,V2", action="append", default=[], help="a method option's values (grid)")
    p.add_argument("--task-opt", metavar="KEY=V1,V2", action="append", default=[], help="a task option's values (grid)")
    p.add_argument("--epochs", type=_int_at_least(1), default=10, help="epochs of every configuration (default 10)")
    p.add_argument("--batch-size", type=_int_at_least(1), help="images per step (default: the task's)")
    p.add_argument("--eval-every", type=_int_at_least(1), default=1, help="validate every N epochs (default 1)")
    p.add_argument("--clip-grad", type=_float_in(0, low_open=True, none=True), help="max gradient norm")
    p.add_argument("--workers", type=_int_at_least(0), default=0, help="data-loading processes (default 0)")
    p.add_argument("--threads", type=_int_at_least(1), help="torch CPU threads")
    p.add_argument("--cpu", action="store_true", help="on the CPU even when CUDA is available")
    p.add_argument("--halving", type=int, metavar="ETA",
                   help="successive halving: keep the best 1/ETA on validation at each cut (ETA >= 2, usually 3; "
                   "needs a validation split; default: the exhaustive grid)")  # fmt: skip
    p.set_defaults(func=cmd_sweep)


def _options(items: list[str], flag: str) -> dict[str, Any]:
    from ..train.config import parse_options

    return parse_options(items, flag)


def cmd_build(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..train.commands import config_from_args
    from .build import build

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods names no method.")
    per_method: dict[str, dict[str, Any]] = {}
    for item in args.opt:
        name, dot, rest = item.partition(".")
        if not dot or name not in methods:
            raise ConfigError(f"--opt {item!r}: write METHOD.KEY=VALUE with METHOD one of --methods ({args.methods}).")
        per_method.setdefault(name, {}).update(_options([rest], "--opt"))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    args.method, args.config = methods[0], None
    args.output_cache = args.output
    del args.output, args.opt  # the cache's folder is not a run's; --opt here is per method (above)
    if "eval_mode" in vars(args):
        args.task_opt = [*getattr(args, "task_opt", []), f"eval_mode={args.eval_mode}"]
        del args.eval_mode
    config = config_from_args(args)
    bar: list[Any] = []

    def progress(done: int, total: int) -> None:
        if args.no_progress or not sys.stderr.isatty():
            return
        if not bar:
            bar.append(tqdm(total=total, unit="img", dynamic_ncols=True, desc="cache"))
        bar[0].update(done - bar[0].n)

    started = time.perf_counter()
    manifest = build(
        config, methods, args.output_cache, dtype=args.dtype, views=args.views,
        splits=[s.strip() for s in args.splits.split(",") if s.strip()], batch_size=args.batch_size,
        shard_size=args.shard_size, method_options=per_method, progress=progress,
    )  # fmt: skip
    if bar:
        bar[0].close()
    seconds = time.perf_counter() - started
    samples = sum(s["samples"] * s["views"] for s in manifest.splits.values())
    print(
        f"cached {samples} samples of {', '.join(manifest.splits)} for {', '.join(manifest.methods)}: "
        f"{manifest.bytes / 2**20:.1f} MiB ({manifest.bytes / max(1, samples) / 1024:.1f} KiB per sample, "
        f"{manifest.dtype}), {len(manifest.taps)} taps, {seconds:.1f} s -> {args.output_cache}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .store import Manifest, damaged_shards

    m = Manifest.load(args.cache)
    damaged = damaged_shards(m, Path(args.cache).expanduser()) if m.complete else []
    samples = {k: v["samples"] * v["views"] for k, v in m.splits.items()}
    info = {
        "complete": m.complete and not damaged,
        "backbone": m.backbone,
        "weights": m.weights,
        "img_size": m.img_size,
        "task": m.task,
        "methods": m.methods,
        "taps": len(m.taps),
        "dtype": m.dtype,
        "transform": m.transform,
        "data": m.data,
        "samples": samples,
        "bytes": m.bytes,
        "bytes_per_sample": m.bytes / max(1, sum(samples.values())),
        "sidetune_version": m.sidetune_version,
    }
    if damaged:
        info["damaged"] = damaged
    print(json.dumps(info, indent=2))
    if damaged:
        print(
            f"sidetune cache info: {len(damaged)} truncated or corrupt shard(s) in {args.cache} (listed under "
            "'damaged'): run the same `sidetune cache build` into it again, which rewrites them and keeps the whole "
            "ones.",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import halving_budget, parse_grid, sweep

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    grid: dict[str, list[Any]] = {"lr": parse_grid(args.lr)}
    if args.head_lr_mult:
        grid["head_lr_mult"] = parse_grid(args.head_lr_mult)
    if args.weight_decay:
        grid["weight_decay"] = parse_grid(args.weight_decay)
    if args.warmup_epochs:
        grid["warmup_epochs"] = parse_grid(args.warmup_epochs)
    for flag, items, prefix in (("--opt", args.opt, ""), ("--task-opt", args.task_opt, "task.")):
        for item in items:
            key, sep, values = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{flag} takes KEY=V1,V2,..., got {item!r}.")
            grid[prefix + key.strip().replace("-", "_")] = parse_grid(values)
    for key, zero_ok in (("lr", False), ("head_lr_mult", False), ("weight_decay", True)):
        for value in grid.get(key, []):
            if not (isinstance(value, int | float) and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
                least = ">= 0" if zero_ok else "> 0"
                raise ConfigError(f"--{key.replace('_', '-')}: {value!r} is not a finite number {least}.")
    settings: dict[str, Any] = {"epochs": args.epochs, "eval_every": args.eval_every, "workers": args.workers}
    for key in ("batch_size", "clip_grad"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.cpu:
        settings["cpu"] = True

    def callback(event: str, record: dict[str, Any]) -> None:
        if event == "start":
            print(f"sweep: {record['configs']} configurations x {record['epochs']} epochs ({record['steps']} steps "
                  "each), one pass over the cache per epoch", flush=True)  # fmt: skip
            if record["halving"] is not None:
                planned = halving_budget(record["configs"], record["halving"], record["cuts"], record["steps"])
                where = ", ".join(map(str, record["cuts"])) or "none (too few configurations or steps)"
                print(f"successive halving, eta {record['halving']}: cuts after steps {where}; about {planned} "
                      f"side-network steps against {record['configs'] * record['steps']} for the whole grid",
                      flush=True)  # fmt: skip
        elif event == "cut":
            print(f"cut {record['cut']} at step {record['step']}: kept {len(record['kept'])} of {record['active']}: "
                  f"configs {', '.join(map(str, record['kept']))}", flush=True)  # fmt: skip
        elif event == "epoch":
            val = {k[4:]: v for k, v in record.items() if k.startswith("val_") and isinstance(v, int | float)}
            point = ", ".join(f"{k}={v}" for k, v in record["point"].items())
            loss = record.get("train_loss")
            text = f"  [{record['config']}] {point}: epoch {record['epoch']}"
            text += f", train loss {loss:.4f}" if loss is not None else ""
            if val:
                text += ", val " + ", ".join(f"{k} {v:.4f}" for k, v in list(val.items())[:2])
            print(text, flush=True)

    result = sweep(args.cache, args.method, grid, args.output, callback=callback, halving=args.halving, **settings)
    chosen = result.summary["chosen"]
    print(f"chosen: configuration {chosen['config']} ({', '.join(f'{k}={chosen[k]}' for k in grid)})")
    if result.test is not None:
        from ..tasks import make_task

        task = make_task(result.summary["task"])
        print("test: " + task.format_metrics(result.test, result.test.get("classes") or _classes(args.cache)))
    timing = result.summary["timing"]
    if result.summary["halving"] is not None:
        print(f"side-network steps: {timing['side_network_steps']} against {timing['exhaustive_side_network_steps']} "
              "for the exhaustive grid")  # fmt: skip
    print(f"wall {timing['wall_time_s']:.1f} s; wrote {args.output}/{{sweep.md,sweep.csv,"
          "sweep.json,sweep.png,best,configs}")  # fmt: skip
    return 0


def _classes(cache: str) -> list[str]:
    from .store import Manifest

    return list(Manifest.load(cache).classes)
