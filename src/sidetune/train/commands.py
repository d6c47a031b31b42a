"""``sidetune train``, ``sidetune eval`` and ``sidetune predict``: the command-line face of :mod:`sidetune.train`.

One parser per command, whatever the task: ``--task`` is a normal option, and an option the chosen task does not
use is refused naming the task's own. Registered through :data:`sidetune.cli.COMMANDS` (which holds each command's
one-line help); only this module prints and draws progress bars.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_NONE = ("none", "null", "")
DATA_DOCS = "docs/data.md"

# task option flags: flag -> (task_options key, help). A task that lacks the key refuses the flag.
TASK_FLAGS: dict[str, tuple[str, str]] = {
    "--label-smoothing": ("label_smoothing", "cross-entropy label smoothing (classification; default: 0)"),
    "--head-dropout": ("head_dropout", "dropout before the classifier (classification; default: 0)"),
    "--class-weights": (
        "class_weights",
        "weigh the loss by class: 'auto' (inverse frequency of the training split; pixels for segmentation), "
        "'sqrt' (its square root: softer) or w1,w2,... one per class (classification, segmentation; default: "
        "none). Use it when a class is rare.",
    ),
    "--eval-mode": ("eval_mode", "segmentation inference at full resolution: whole or slide (default: whole)"),
    "--detector": ("detector", "detector head: faster_rcnn, retinanet (detection) or mask_rcnn (instance)"),
    "--num-frames": ("num_frames", "video: frames sampled per clip, T (default: 8)"),
    "--frame-sampling": ("frame_sampling", "video: training sampling, random (offset per clip) or uniform"),
    "--frame-stride": ("frame_stride", "video: frames between sampled frames (default: spread over the clip)"),
    "--clip-policy": ("clip_policy", "video: clips shorter than T: refuse (default; counted), loop or pad"),
}


# -- argument types: bad values fail at parse time with the flag named -----------------------------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _float_in(
    low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False, none: bool = False
):
    def parse(text: str) -> float | None:
        if none and text.strip().lower() in _NONE:
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or not math.isfinite(high) else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text!r}")
        return value

    return parse


def _optional_str(text: str) -> str | None:
    return None if text.strip().lower() in _NONE else text


def _class_weights(text: str) -> Any:
    from .config import parse_value

    value = parse_value(text)
    return value if isinstance(value, str | tuple) else (value,)


def _layout_lines() -> str:
    from ..tasks import list_tasks

    lines = []
    for task in list_tasks():
        lines.append(f"  {task['name']}:")
        lines += [f"    {name:<12} {text}" for name, text in task["layouts"].items()]
    return "\n".join(lines)


def _common_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="saved", help="backbone weights (default: the path the adapter recorded)")
    p.add_argument("--device", help="torch device: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        help="autocast of the forward (default: the precision the run trained in, when this device runs it)",
    )
    p.add_argument("--threads", type=_int_at_least(1), help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=_int_at_least(0), default=0, help="data-loading processes (default: 0)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval`` and ``predict`` to the ``sidetune`` parser."""
    s = argparse.SUPPRESS
    from ..tasks import list_tasks

    tasks = [t["name"] for t in list_tasks()]
    layouts = sorted({name for t in list_tasks() for name in t["layouts"]})
    p = subparsers.add_parser(
        "train",
        description=(
            "Train a model of any task on a frozen timm backbone adapted by METHOD, with AdamW, warm-up + cosine "
            "schedule, gradient accumulation, evaluation, best/last adapter checkpoints and resumable state. "
            "Settings come from --config run.yaml (TrainConfig fields), overridden by the flags given on the "
            "command line. Runs the same under `torchrun --nproc_per_node N -m sidetune.cli train ...` or "
            "`accelerate launch`. Writes OUTPUT/{log.jsonl,summary.json,curves.png,train_config.yaml,best/,last/,"
            "checkpoints/} for every task.\n\nData layouts (--layout; every folder tree with an example: "
            f"{DATA_DOCS}; check a dataset first with `sidetune data check DIR --task T`):\n" + _layout_lines()
        ),
        epilog=(
            "examples:\n  sidetune train vit_small_patch14_dinov2 losa --weights vit_s.safetensors --img-size 224 "
            "--data ../shared/assets/data/cifar10-1k --val-fraction 0.2 --epochs 10 --output runs/losa\n"
            "  sidetune train vit_small_patch14_dinov2 e3va --task segmentation --data "
            "../shared/assets/data/camvid-240x180 --img-size 224 --epochs 4 --output runs/camvid"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("backbone", nargs="?", default=s, help="timm model name (see `sidetune backbones`)")
    p.add_argument("method", nargs="?", default=s, help="adaptation method (see `sidetune methods`)")
    p.add_argument("--config", metavar="YAML", help="run settings as YAML (TrainConfig fields); flags override it")
    p.add_argument("--task", choices=tasks, default=s, help="what to train (default: classification)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--weights",
        type=_optional_str,
        default=s,
        help="backbone weights: a .safetensors/.pth file, 'hub' (timm's pretrained, downloads) or 'none' for a "
        "random backbone (default: none)",
    )
    g.add_argument(
        "--img-size", type=_int_at_least(1), default=s, help="input size in pixels (default: the backbone's)"
    )
    g.add_argument(
        "--opt",
        metavar="KEY=VALUE",
        action="append",
        default=s,
        help="method option, repeatable; values parse as int/float/bool/none or a comma tuple "
        "(e.g. --opt channel_rank=8 --opt taps=2,5)",
    )
    g.add_argument(
        "--backbone-opt",
        metavar="KEY=VALUE",
        action="append",
        default=s,
        help="extra timm.create_model argument, repeatable (e.g. --backbone-opt depth=4)",
    )
    g.add_argument(
        "--head-opt",
        metavar="KEY=VALUE",
        action="append",
        default=s,
        help="dense head option, repeatable (e.g. channels=128 for UPerNet, fpn_channels=128 for detectors)",
    )
    g.add_argument(
        "--num-classes",
        type=_int_at_least(1),
        default=s,
        help="expected class count; the data must agree (default: the training data's)",
    )
    g = p.add_argument_group("task options (each belongs to the tasks named; others refuse it)")
    for flag, (_, text) in TASK_FLAGS.items():
        kind = {
            "--label-smoothing": _float_in(0, 1, high_open=True),
            "--head-dropout": _float_in(0, 1, high_open=True),
            "--class-weights": _class_weights,
            "--num-frames": _int_at_least(1),
            "--frame-stride": _int_at_least(1),
        }
        g.add_argument(flag, type=kind.get(flag, str), default=s, help=text)
    g.add_argument(
        "--task-opt", metavar="KEY=VALUE", action="append", default=s, help="any task option by name, repeatable"
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", default=s, help=f"the dataset: a folder, CSV or list file ({DATA_DOCS})")
    g.add_argument("--layout", choices=layouts, default=s, help="data layout of the task (default: auto; see above)")
    g.add_argument(
        "--train-split",
        type=_optional_str,
        default=s,
        help="training split; 'auto': 'train' when the data has one (classification: else all of it)",
    )
    g.add_argument(
        "--val-split", type=_optional_str, default=s, help="validation split; 'auto': 'val' when present; 'none'"
    )
    g.add_argument(
        "--test-split",
        type=_optional_str,
        default=s,
        help="split scored once after training with the best checkpoint; 'auto': 'test' when present; 'none'",
    )
    g.add_argument(
        "--val-fraction",
        type=_float_in(0, 1, low_open=True, high_open=True, none=True),
        default=s,
        help="carve this fraction of the training split off as validation, seeded by --seed "
        "(classification: per class), instead of --val-split",
    )
    g.add_argument("--train-limit", type=_int_at_least(1), default=s, help="use the first N training images only")
    g.add_argument("--val-limit", type=_int_at_least(1), default=s, help="use the first N validation images only")
    g.add_argument(
        "--augmentation",
        default=s,
        help="training transform: classification vtab (resize only, default), none (resize + center crop), "
        "standard (random resized crop, flip, colour jitter); dense tasks standard (scale jitter + crop + flip, "
        "default) or none (whole images resized)",
    )
    g.add_argument("--workers", type=_int_at_least(0), default=s, help="data-loading processes per training process")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_int_at_least(1), default=s, help="passes over the training data (default: 10)")
    g.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=s,
        help="images per process per micro-batch (default: 32 classification, 8 dense tasks)",
    )
    g.add_argument(
        "--eval-batch-size",
        type=_int_at_least(1),
        default=s,
        help="images per evaluation batch (default: 2x batch size, dense: 1x)",
    )
    g.add_argument(
        "--lr", type=_float_in(0, low_open=True), default=s, help="peak learning rate of AdamW (default: 1e-3)"
    )
    g.add_argument(
        "--head-lr-mult",
        type=_float_in(0, low_open=True),
        default=s,
        help="the task head's learning rate is --lr times this (default: 1; fully fine-tuning a "
        "pretrained backbone under a new head often wants 10 or more)",
    )
    g.add_argument("--min-lr", type=_float_in(0), default=s, help="learning rate at the end of the cosine (default: 0)")
    g.add_argument(
        "--weight-decay",
        type=_float_in(0),
        default=s,
        help="AdamW weight decay on weight matrices, never on biases, norms, embeddings, tokens "
        "(default: 1e-4 classification, 0.05 dense tasks)",
    )
    g.add_argument(
        "--warmup-epochs", type=_float_in(0), default=s, help="linear warm-up in epochs, then cosine decay (default: 1)"
    )
    g.add_argument(
        "--grad-accum", type=_int_at_least(1), default=s, help="micro-batches per optimizer step (default: 1)"
    )
    g.add_argument(
        "--clip-grad",
        type=_float_in(0, low_open=True, none=True),
        default=s,
        help="max gradient norm (default: no clipping)",
    )
    g.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16", "fp16"),
        default=s,
        help="auto: bf16 (or fp16) on CUDA, no on CPU; bf16 also on a CPU with native bfloat16 "
        "(AVX512-BF16/AMX); fp16 needs CUDA (default: auto)",
    )
    g.add_argument(
        "--nonfinite-patience",
        type=_int_at_least(0),
        default=s,
        help="optimizer steps with a NaN/inf loss to skip before stopping with an error (default: 0)",
    )
    g.add_argument(
        "--seed", type=_int_at_least(0), default=s, help="seed of initialisation, data order, augmentation, dropout"
    )
    g.add_argument("--threads", type=_int_at_least(1), default=s, help="torch CPU threads per process")
    g.add_argument("--cpu", action="store_true", default=s, help="train on the CPU even when CUDA is available")
    g = p.add_argument_group("run")
    g.add_argument("--output", default=s, help="run directory (default: runs/run)")
    g.add_argument(
        "--eval-every",
        type=_int_at_least(1),
        default=s,
        help="validate every N epochs (and after the last; default: 1)",
    )
    g.add_argument(
        "--save-every-steps",
        type=_int_at_least(0),
        default=s,
        help="also save the resumable state every N optimizer steps (default: 0, at epoch ends only)",
    )
    g.add_argument(
        "--resume", default=s, help="continue a run: its directory (newest checkpoint) or a checkpoint folder"
    )
    g.add_argument(
        "--cache",
        default=s,
        help="train from a tap cache (sidetune cache build) instead of running the backbone; the data settings, "
        "transforms and backbone must be those of the cache (checked)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        default=s,
        help="torch.compile the side network (side methods): the same computation, fused; the first step compiles",
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)"
    )
    g.add_argument(
        "--log-every",
        type=_float_in(0, low_open=True),
        default=30.0,
        help="when stdout is not a terminal, print a progress line every this many seconds (default: 30)",
    )
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval",
        description="Evaluate an adapter folder (a run's best/ or last/) on labelled data with its task's metrics: "
        "classification top-1, top-5, mean class accuracy, per-class accuracy and loss; segmentation mIoU, mAcc, "
        "aAcc and IoU per class; detection COCO box (and mask) mAP. Prints the JSON and writes it to --output. By "
        "default it runs in the precision the adapter was trained in, so it reproduces the run's numbers.",
    )
    p.add_argument("adapter", help="adapter folder written by training (RUN/best or RUN/last) or save_adapter()")
    p.add_argument("--data", required=True, help=f"the dataset, in a layout of the adapter's task ({DATA_DOCS})")
    p.add_argument(
        "--split",
        default="auto",
        help="split to evaluate; 'auto': classification 'test' when the data has one, else all of it; "
        "dense tasks 'val' (default: auto)",
    )
    p.add_argument("--layout", choices=layouts, default="auto", help="data layout (default: the run's)")
    p.add_argument("--batch-size", type=_int_at_least(1), help="images per batch (default: 64, dense tasks 4)")
    p.add_argument("--augmentation", help="classification: eval transform (default: the one of training)")
    p.add_argument("--eval-mode", choices=("whole", "slide"), help="segmentation: inference (default: the run's)")
    _common_inference_args(p)
    p.add_argument("--output", help="metrics JSON to write (default: ADAPTER/eval_<split>.json)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "predict",
        description="Predict every image under IMAGES (recursively; hidden files skipped) with a saved adapter; the "
        "adapter's task decides what is written. Classification: a CSV with columns path, label, score (softmax), "
        "then label_2, score_2, ... up to --top-k (--output a file, '-' for stdout, the default). Segmentation: "
        "<stem>.png palette masks (pixel value = class index) and <stem>_overlay.png (--output a folder, default "
        "predictions/). Detection and instance segmentation: predictions.json (COCO results: image_id, file_name, "
        "category_id, category_name, bbox [x, y, w, h], score) and <stem>_overlay.png with the boxes scoring at "
        "least --score-threshold (--output a folder, default predictions/). Video: the classification CSV, one row "
        "per clip (a video file or a folder of frames; clips that cannot be read are named in a warning).",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="[ADAPTER] IMAGES",
        help="the adapter folder (RUN/best, RUN/last or save_adapter() output), then a folder of images (searched "
        "recursively) or one image file (video: video files and frame folders); with --adapter, the images only",
    )
    p.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        metavar="[NAME=]ADAPTER",
        help="several adapters of side methods on one backbone, repeatable: one backbone forward per batch feeds "
        "every task, and each task's files go to OUTPUT/<name>/ as the task writes them alone (docs/serving.md)",
    )
    p.add_argument("--tasks", help="with --adapter: comma-separated task names to run (default: all)")
    p.add_argument("--top-k", type=_int_at_least(1), help="classification: predictions per image (default: 5)")
    p.add_argument("--augmentation", help="classification: eval transform (default: the one of training)")
    p.add_argument("--batch-size", type=_int_at_least(1), help="classification: images per batch (default: 64)")
    p.add_argument("--eval-mode", choices=("whole", "slide"), help="segmentation: inference (default: the run's)")
    p.add_argument(
        "--score-threshold",
        type=_float_in(0, 1),
        help="detection: boxes drawn on the overlays score at least this (default: 0.5; the JSON keeps all)",
    )
    _common_inference_args(p)
    p.add_argument("--output", help="CSV file or '-' (classification, default -), or a folder (default predictions/)")
    p.set_defaults(func=cmd_predict)


# -- train ----------------------------------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace):
    """The TrainConfig of ``sidetune train``: defaults < ``--config`` YAML < flags given on the command line.

    Raises:
        ConfigError: an option the task does not take (named with its flag and the task's own options).
    """
    from ..tasks import get_task
    from .config import TrainConfig, parse_options

    a = vars(args)
    fields = set(TrainConfig.field_names())
    given: dict[str, Any] = {k: v for k, v in a.items() if k in fields and k not in ("task_options",)}
    if "opt" in a:
        given["method_options"] = parse_options(args.opt, "--opt")
    if "backbone_opt" in a:
        given["backbone_kwargs"] = parse_options(args.backbone_opt, "--backbone-opt")
    if "head_opt" in a:
        given["head_options"] = parse_options(args.head_opt, "--head-opt")
    task_options = parse_options(a.get("task_opt"), "--task-opt") if "task_opt" in a else {}
    flags_given = {}
    for flag, (key, _) in TASK_FLAGS.items():
        dest = flag[2:].replace("-", "_")
        if dest in a:
            task_options[key] = a[dest]
            flags_given[key] = flag
    if task_options:
        given["task_options"] = task_options
    # the task: the flag, else the YAML's, else classification; its options are checked with CLI names
    task_name = given.get("task")
    if task_name is None and args.config:
        import yaml

        try:
            values = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError):
            values = None
        task_name = values.get("task") if isinstance(values, dict) else None  # from_yaml reports the file's problem
    task = get_task(task_name or "classification")
    foreign = sorted(set(task_options) - set(task.option_names()))
    if foreign:
        names = [flags_given.get(k, f"--task-opt {k}") for k in foreign]
        own = [next((f for f, (k, _) in TASK_FLAGS.items() if k == o), f"--task-opt {o}") for o in task.option_names()]
        raise ConfigError(
            f"{', '.join(names)}: not an option of --task {task.name} (it takes: {', '.join(own) or 'none'})."
        )
    if given.get("head_options") and task.name == "classification":
        raise ConfigError("--head-opt is for the dense tasks' heads; classification takes --head-dropout.")
    if args.config:
        return TrainConfig.from_yaml(args.config, **given)
    return TrainConfig.from_dict(given, source="the command line")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..tasks import make_task
    from .loop import fit

    config = config_from_args(args)
    task = make_task(config.task, config.task_options)
    main = _is_main_process()
    show_bar = main and not args.no_progress and sys.stderr.isatty()
    heartbeat = main and not sys.stdout.isatty()
    bar: list[Any] = []
    clock: dict[str, float] = {}
    classes: list[str] = []

    def callback(event: str, record: dict[str, Any]) -> None:
        if not main:
            return
        if event == "start":
            clock.update(
                start=time.monotonic(), last=time.monotonic(), first=record["step"], total=record["total_steps"]
            )
            classes.extend(record["classes"])
            resumed = f", resuming after step {record['step']}" if record["step"] else ""
            print(f"training {config.task} {config.backbone} / {config.method} -> {config.output} "
                  f"({record['total_steps']} steps{resumed})", flush=True)  # fmt: skip
            if show_bar:
                bar.append(tqdm(total=record["total_steps"], initial=record["step"], unit="step", dynamic_ncols=True))
        elif event == "step":
            clock["step"] = record["step"]
            if bar:
                bar[0].update(1)
                bar[0].set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            elif heartbeat and time.monotonic() - clock["last"] >= args.log_every:
                clock["last"] = time.monotonic()
                print(_progress_line(record, clock, config), flush=True)
        elif event == "epoch":
            (bar[0].write if bar else lambda s: print(s, flush=True))(_epoch_line(record, task, classes))
        elif event == "end" and bar:
            bar[0].close()

    try:
        result = fit(config, callback=callback)
    except KeyboardInterrupt:
        if bar:
            bar[0].close()
        if main:
            at = f" at step {int(clock['step'])}" if "step" in clock else " before the first step"
            from .rundir import has_checkpoint

            kept = (
                "the last checkpoint is kept"
                if has_checkpoint(Path(config.output).expanduser())
                else "no checkpoint was saved yet, so resuming starts the run again from scratch"
            )
            print(
                f"sidetune train: interrupted{at}; {kept}. Resume with: {_resume_command(args, config)}",
                file=sys.stderr,
            )
        return 130
    if main:
        _print_result(result, task)
    return 0


def _resume_command(args: argparse.Namespace, config) -> str:
    """The command line that continues this run (the one given, plus ``--resume OUTPUT``)."""
    import shlex

    given = sys.argv[1:] if "train" in sys.argv[1:] else ["train", "..."]
    words, skip = [], False
    for word in given:
        if skip or word.startswith("--resume"):
            skip = word == "--resume"  # its value follows
            continue
        words.append(word)
    return shlex.join(["sidetune", *words, "--resume", config.output])


def _progress_line(record: dict[str, Any], clock: dict[str, float], config) -> str:
    done = record["step"] - clock["first"]
    spent = time.monotonic() - clock["start"]
    rate = done / spent if spent > 0 else 0.0
    left = (clock["total"] - record["step"]) / rate if rate > 0 else float("nan")
    images = rate * config.batch_size * config.grad_accum
    end = time.strftime("%H:%M:%S", time.localtime(time.time() + left)) if math.isfinite(left) else "?"
    loss = record.get("loss")
    return (
        f"step {record['step']}/{clock['total']} (epoch {record['epoch']}): loss "
        f"{loss if loss is None else f'{loss:.4f}'}, {images:.1f} images/s per process, expected end {end}"
    )


def _epoch_line(record: dict[str, Any], task, classes: list[str], worst: int = 3) -> str:
    """``epoch 3: train loss 0.4121, val top-1 81.0% ...; worst: cat 0.52, dog 0.61, bird 0.70`` and, on lines of
    their own, the collapse warnings of this validation (a class never predicted, no better than the majority)."""
    loss = record.get("train_loss")
    line = f"epoch {record['epoch']}: train loss {loss:.4f}" if loss is not None else f"epoch {record['epoch']}"
    if record.get("train_top1") is not None:
        line += f", train top-1 {record['train_top1']:.1%}"
    val = {k[4:]: v for k, v in record.items() if k.startswith("val_")}
    if task.score(val) is None:
        return line
    line += f", val {task.summary_line(val)}"
    ranked = task.worst_first(val, classes) if classes else []
    if len(ranked) > 1:
        line += f"; worst {task.per_class_name}: " + ", ".join(f"{name} {value:.2f}" for name, value in ranked[:worst])
    warnings = task.collapse_warnings(val, classes) if classes else []
    return "\n".join([line] + [f"  warning: {w}" for w in warnings])


def _print_result(result, task) -> None:
    s = result.summary
    m, t = s["metrics"], s["timing"]
    if s["data"]["skipped"]:
        print(f"skipped {s['data']['skipped']} file(s) while reading the data (listed in summary.json)")
    if m["best_val"] is not None:
        print(f"best val {task.headline} {m['best_val']:.4f} (epoch {m['best_epoch']})")
    if m["test"] is not None:
        print(f"test ({m['test_checkpoint']} checkpoint, {m['test']['count']} images): "
              + task.format_metrics(m["test"], s["data"]["classes"]))  # fmt: skip
    elif m["final_val"] is not None:
        print("validation (last evaluated): " + task.format_metrics(m["final_val"], s["data"]["classes"]))
    for warning in s["data"]["warnings"]:
        print(f"warning: {warning}")
    step = t["median_step_time_s"]
    print(
        f"{s['model']['trainable_parameters']:,} trainable parameters, {t['steps']} steps"
        + (f", {step * 1000:.1f} ms/step (median)" if step else "")
        + f", wall {t['wall_time_s']:.1f} s"
    )
    out = result.output
    files = [
        n for n in ("summary.json", "log.jsonl", "curves.png", "best", "last", "checkpoints") if (out / n).exists()
    ]
    print(f"wrote {out}/{{{','.join(files)}}}")


# -- eval and predict -----------------------------------------------------------------------------------------------
def _weights(text: str) -> Any:
    return None if text.lower() in _NONE else text


def _threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..tasks import make_task
    from .config import check_split_name
    from .inference import evaluate_adapter

    if args.split not in (None, "auto"):
        check_split_name("--split", args.split)
    out = Path(args.output) if args.output else None
    if out is not None and out.is_dir():
        raise ConfigError(f"--output {str(out)!r} is a folder; give the JSON file to write.")
    if out is not None and not out.parent.is_dir():
        raise ConfigError(f"--output {str(out)!r}: the folder {str(out.parent)!r} does not exist; create it first.")
    _threads(args)
    metrics = evaluate_adapter(
        args.adapter, args.data, args.split, layout=args.layout, batch_size=args.batch_size, workers=args.workers,
        weights=_weights(args.weights), augmentation=args.augmentation, device=args.device,
        mixed_precision=args.mixed_precision, eval_mode=args.eval_mode,
    )  # fmt: skip
    from .metrics import _finite

    text = json.dumps(_finite(metrics), indent=2)
    print(text)
    task = make_task(metrics["task"])
    print(task.format_metrics(metrics, metrics["classes"]), file=sys.stderr)
    out = out or Path(args.adapter) / f"eval_{metrics['split'] or 'all'}.json"
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..model import ADAPTER_CONFIG
    from .inference import predict

    _threads(args)
    if args.adapters:
        return _predict_multi(args)
    if len(args.paths) != 2:
        raise ConfigError("predict takes ADAPTER IMAGES (or --adapter A --adapter B ... IMAGES).")
    if args.tasks:
        raise ConfigError("--tasks chooses among several --adapter folders; one ADAPTER runs alone: drop --tasks.")
    args.adapter, args.images = args.paths
    options = {
        k: v
        for k, v in (
            ("top_k", args.top_k),
            ("augmentation", args.augmentation),
            ("batch_size", args.batch_size),
            ("eval_mode", args.eval_mode),
            ("score_threshold", args.score_threshold),
        )
        if v is not None
    }
    task = _adapter_task(Path(args.adapter) / ADAPTER_CONFIG)
    csv_task = task in ("classification", "video")  # one CSV row per image / clip
    if csv_task:
        options.setdefault("workers", args.workers)
    output = args.output or ("-" if csv_task else "predictions")
    result = predict(
        args.adapter, args.images, output, weights=_weights(args.weights), device=args.device,
        mixed_precision=args.mixed_precision, **options,
    )  # fmt: skip
    if output != "-" or not csv_task:
        print(f"wrote {len(result['files'])} file(s) for {result['images']} image(s) to {output}", file=sys.stderr)
    return 0


def _predict_multi(args: argparse.Namespace) -> int:
    from ..serve.commands import parse_adapters
    from .inference import predict_multi

    if len(args.paths) != 1:
        raise ConfigError("with --adapter, give the images only: predict --adapter A --adapter B IMAGES --output DIR.")
    if args.output in (None, "-"):
        raise ConfigError("several adapters write a folder per task: give --output DIR.")
    for flag, value in (("--augmentation", args.augmentation), ("--eval-mode", args.eval_mode)):
        if value is not None:
            raise ConfigError(f"{flag} is not taken with --adapter: each task uses the recipe its run recorded.")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    result = predict_multi(
        parse_adapters(args.adapters), args.paths[0], args.output, weights=_weights(args.weights),
        device=args.device, batch_size=args.batch_size or 8, tasks=tasks, top_k=args.top_k,
        score_threshold=args.score_threshold, mixed_precision=args.mixed_precision,
    )  # fmt: skip
    for name, written in result["tasks"].items():
        print(f"{name}: wrote {len(written['files'])} file(s) to {Path(args.output) / name}", file=sys.stderr)
    return 0


def _adapter_task(config_path: Path) -> str:
    """The task an adapter folder records (for the CLI's defaults; loading checks the folder properly)."""
    try:
        return json.loads(config_path.read_text()).get("task", "classification")
    except (OSError, ValueError, AttributeError):
        return "classification"
