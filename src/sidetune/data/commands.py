"""``sidetune data check``: read a dataset as training would and say what is in it.

Registered by ``register(subparsers)`` from :data:`sidetune.cli.SUBCOMMAND_MODULES`. Only the standard library and
the torch-free :mod:`sidetune.data.catalog` are imported at the top, so ``sidetune --help`` stays fast; the
readers (torch, PIL) are imported when the command runs. This module prints; the library beside it only logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .catalog import DATA_DOCS, LAYOUTS, TASKS, layouts_help

# sidetune.data.video.CLIP_POLICIES, spelled out here: that module imports torch (tests check they agree)
_CLIP_POLICIES = ("refuse", "loop", "pad")

EXAMPLES = """examples:
  sidetune data check data/flowers --task classification
  sidetune data check data/camvid --task segmentation --layout camvid --split train --split val
  sidetune data check data/cells --task detection --json > report.json
  sidetune data check data/ucf101 --task video --layout list --num-frames 16 --split trainlist01
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` (with its ``check`` subcommand) to the ``sidetune`` command line."""
    data = subparsers.add_parser(
        "data",
        help="inspect a dataset: `sidetune data check DIR --task T` (layouts: " + DATA_DOCS + ")",
        description=f"Dataset tools. The layouts every task reads are described in {DATA_DOCS}.",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "check",
        help="read a dataset as training would; print splits, class balance, sizes, skipped files, warnings",
        description=(
            "Read every split of a dataset with the readers training uses (no model needed), decode every image "
            "and mask once, and print: the splits found, images per split and class, class balance (images per "
            "class; pixels per class for masks; boxes per class for detection), image sizes, every file skipped "
            "with its reason, every file training would stop at, and warnings (a class absent from a split, a "
            "split with one class, extreme imbalance, masks that are all void). Video (--task video): clips per "
            "split and class, frames per clip (min/median/max), frame sizes, and every clip refused with its reason "
            "(unreadable, too short for --num-frames under --clip-policy, a gap in a frame folder, not found) or "
            "that training would stop at (truncated), under the clip options training takes. Exit status 0 when "
            "training can read the data, 1 when it cannot."
        ),
        epilog=EXAMPLES + "\n" + layouts_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DIR", help="the dataset folder (classification: or one CSV / VTAB list file)")
    p.add_argument("--task", required=True, choices=TASKS, help="the task the data is for")
    layouts = sorted({name for per_task in LAYOUTS.values() for name in per_task})
    p.add_argument(
        "--layout",
        default="auto",
        choices=("auto", *layouts),
        help="the data layout (default: auto, guessed from the folder); the layouts of each task are listed below",
    )
    p.add_argument(
        "--split",
        action="append",
        metavar="NAME",
        help="check only this split (repeatable; default: every split found)",
    )
    p.add_argument(
        "--quick", action="store_true", help="read image headers only, not the pixels (misses truncated files)"
    )
    p.add_argument(
        "--imbalance-ratio",
        type=float,
        default=10.0,
        metavar="R",
        help="warn when a class has more than R times the examples of another (default: 10)",
    )
    video = p.add_argument_group("video (--task video): the clip options of the training run to check for")
    video.add_argument(
        "--num-frames", type=int, default=8, metavar="T", help="frames sampled per clip (default: 8, as training)"
    )
    video.add_argument(
        "--frame-stride",
        type=int,
        default=None,
        metavar="S",
        help="frames between sampled frames (default: spread over the clip); a clip needs (T - 1) * S + 1 frames",
    )
    video.add_argument(
        "--clip-policy",
        default="refuse",
        choices=_CLIP_POLICIES,
        help="clips shorter than T: refuse (default: listed, not used), loop or pad (used, and counted)",
    )
    video.add_argument(
        "--verify",
        action="store_true",
        help="refuse truncated videos as training with --task-opt verify=true does (default: list them as files "
        "training would stop at)",
    )
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding threads (default: min(8, CPUs))")
    p.add_argument("--all", action="store_true", help="list every skipped file (default: the first 20 per split)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--output", metavar="FILE", help="also write the report as JSON to FILE")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .check import check_dataset

    if args.layout != "auto" and args.layout not in LAYOUTS[args.task]:
        choices = ", ".join(["auto", *LAYOUTS[args.task]])
        raise ConfigError(f"--layout {args.layout} is not a {args.task} layout; choose from {choices} ({DATA_DOCS}).")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}.")
    video_flags = [
        flag
        for flag, value, default in (
            ("--num-frames", args.num_frames, 8),
            ("--frame-stride", args.frame_stride, None),
            ("--clip-policy", args.clip_policy, "refuse"),
            ("--verify", args.verify, False),
        )
        if value != default
    ]
    if video_flags and args.task != "video":
        raise ConfigError(f"{', '.join(video_flags)}: clip options apply to --task video only.")
    if args.num_frames < 1 or (args.frame_stride is not None and args.frame_stride < 1):
        raise ConfigError("--num-frames and --frame-stride must be at least 1.")
    if not args.imbalance_ratio > 1.0:
        raise ConfigError(f"--imbalance-ratio must be a number above 1, got {args.imbalance_ratio}.")
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.is_dir():
        raise ConfigError(f"--output {output}: the folder {output.parent} does not exist.")
    report = check_dataset(
        args.data,
        args.task,
        args.layout,
        splits=args.split,
        decode=not args.quick,
        workers=args.workers,
        imbalance_ratio=args.imbalance_ratio,
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
        clip_policy=args.clip_policy,
        verify=args.verify,
    )
    data = report.to_dict()
    if output is not None:
        output.write_text(json.dumps(data, indent=2) + "\n")
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        print(report.format(max_listed=0 if args.all else 20))
        if output is not None:
            print(f"wrote {output}")
    return 0 if report.ok else 1
