"""``sidetune train``, ``sidetune eval`` and ``sidetune predict``: the command-line face of :mod:`sidetune.train`.

Registered by :data:`sidetune.cli.SUBCOMMAND_MODULES`. Only this module prints and draws progress bars.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..data import AUGMENTATIONS
from .config import MIXED_PRECISION, TrainConfig, parse_options

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
_NONE = ("none", "null", "")


def _d(name: str) -> str:
    return f" (default: {_DEFAULTS[name]})"


def _optional_str(text: str) -> str | None:
    return None if text.strip().lower() in _NONE else text


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in _NONE else float(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval`` and ``predict`` to the ``sidetune`` parser."""
    s = argparse.SUPPRESS
    p = subparsers.add_parser(
        "train",
        help="train a classifier (or, with --task, a segmentation/detection model): a frozen backbone adapted by "
        "one method",
        description=(
            "Train a classifier on a frozen timm backbone adapted by METHOD, with AdamW, warm-up + cosine "
            "schedule, gradient accumulation, evaluation, best/last adapter checkpoints and resumable state. "
            "Settings come from --config run.yaml, overridden by the flags given on the command line. Runs the "
            "same under `torchrun --nproc_per_node N -m sidetune.cli train ...` or `accelerate launch`. Writes "
            "OUTPUT/{log.jsonl,summary.json,curves.png,train_config.yaml,best/,last/,checkpoints/}.\n\n"
            "--task segmentation|detection|instance trains a dense model instead (docs/dense.md), with the same "
            "recipe, --grad-accum and --resume; it writes OUTPUT/{log.jsonl,summary.json,train_config.json,best/,"
            "last/,checkpoints/}."
        ),
        epilog=(
            "example: sidetune train vit_small_patch14_dinov2 losa --weights vit_s.safetensors --img-size 224 "
            "--data ../shared/assets/data/cifar10-1k --val-fraction 0.2 --epochs 10 --output runs/losa"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("backbone", nargs="?", default=s, help="timm model name (see `sidetune backbones`)")
    p.add_argument("method", nargs="?", default=s, help="adaptation method (see `sidetune methods`)")
    p.add_argument("--config", metavar="YAML", help="run settings as YAML (TrainConfig fields); flags override it")
    g = p.add_argument_group("model")
    g.add_argument(
        "--weights",
        type=_optional_str,
        default=s,
        help="backbone weights: a .safetensors/.pth file, "
        "'hub' (timm's pretrained, downloads) or 'none' for a random backbone (default: none)",
    )
    g.add_argument("--img-size", type=int, default=s, help="input size in pixels (default: the backbone's)")
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
    g.add_argument("--head-dropout", type=float, default=s, help="dropout before the classifier" + _d("head_dropout"))
    g.add_argument(
        "--num-classes",
        type=int,
        default=s,
        help="expected class count; the data must agree (default: the training data's)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=s,
        help="ImageFolder tree (with train/ test/ ... folders or class folders), "
        "VTAB-1k folder, CSV (path,label) or list file",
    )
    g.add_argument(
        "--layout", choices=("auto", "imagefolder", "vtab", "csv"), default=s, help="data layout" + _d("layout")
    )
    g.add_argument(
        "--train-split",
        type=_optional_str,
        default=s,
        help="training split; 'auto': 'train' when the data has one, else all of it" + _d("train_split"),
    )
    g.add_argument("--val-split", type=_optional_str, default=s, help="validation split (default: none)")
    g.add_argument(
        "--test-split",
        type=_optional_str,
        default=s,
        help="split evaluated once after training "
        "with the best checkpoint; 'auto': 'test' when present; 'none' to skip" + _d("test_split"),
    )
    g.add_argument(
        "--val-fraction",
        type=_optional_float,
        default=s,
        help="carve this fraction of each training class off as validation, seeded by --seed (instead of --val-split)",
    )
    g.add_argument(
        "--augmentation",
        choices=AUGMENTATIONS,
        default=s,
        help="transform recipe: vtab (resize only), "
        "none (resize + center crop), standard (random resized crop, flip, colour jitter)" + _d("augmentation"),
    )
    g.add_argument("--workers", type=int, default=s, help="data-loading processes per training process" + _d("workers"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=s, help="passes over the training data" + _d("epochs"))
    g.add_argument("--batch-size", type=int, default=s, help="images per process per micro-batch" + _d("batch_size"))
    g.add_argument(
        "--eval-batch-size", type=int, default=s, help="images per evaluation batch (default: 2x batch size)"
    )
    g.add_argument("--lr", type=float, default=s, help="peak learning rate of AdamW" + _d("lr"))
    g.add_argument("--min-lr", type=float, default=s, help="learning rate at the end of the cosine" + _d("min_lr"))
    g.add_argument(
        "--weight-decay",
        type=float,
        default=s,
        help="AdamW weight decay on weight matrices (never on biases, norms, embeddings, tokens)" + _d("weight_decay"),
    )
    g.add_argument(
        "--warmup-epochs",
        type=float,
        default=s,
        help="linear warm-up in epochs, then cosine decay" + _d("warmup_epochs"),
    )
    g.add_argument(
        "--label-smoothing", type=float, default=s, help="cross-entropy label smoothing" + _d("label_smoothing")
    )
    g.add_argument("--grad-accum", type=int, default=s, help="micro-batches per optimizer step" + _d("grad_accum"))
    g.add_argument("--clip-grad", type=_optional_float, default=s, help="max gradient norm (default: no clipping)")
    g.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        default=s,
        help="auto: bf16 (or fp16) on CUDA, no on CPU; bf16 also on a CPU with native bfloat16 "
        "(AVX512-BF16/AMX); fp16 needs CUDA" + _d("mixed_precision"),
    )
    g.add_argument(
        "--seed", type=int, default=s, help="seed of initialisation, data order, augmentation, dropout" + _d("seed")
    )
    g.add_argument("--cpu", action="store_true", default=s, help="train on the CPU even when CUDA is available")
    g = p.add_argument_group("run")
    g.add_argument("--output", default=s, help="run directory" + _d("output"))
    g.add_argument(
        "--eval-every", type=int, default=s, help="validate every N epochs (and after the last)" + _d("eval_every")
    )
    g.add_argument(
        "--save-every-steps",
        type=int,
        default=s,
        help="also save the resumable state every N optimizer steps (default: 0, at epoch ends only)",
    )
    g.add_argument(
        "--resume", default=s, help="continue a run: its directory (newest checkpoint) or a checkpoint folder"
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)"
    )
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval",
        help="evaluate a saved adapter on a labelled split; prints and writes the metrics as JSON",
        description="Evaluate an adapter folder (a run's best/ or last/) on labelled data: top-1, top-5, mean class "
        "accuracy, per-class accuracy and loss. Prints the JSON and writes it to --output.",
    )
    p.add_argument("adapter", help="adapter folder written by training (RUN/best or RUN/last) or save_adapter()")
    p.add_argument("--data", required=True, help="data folder, CSV or list file (as for training)")
    p.add_argument(
        "--split",
        type=_optional_str,
        default="auto",
        help="split to evaluate; 'auto': 'test' when present, else all of the data (default: auto)",
    )
    _inference_args(p)
    p.add_argument("--output", help="metrics JSON to write (default: ADAPTER/eval_<split>.json)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "predict",
        help="predict the class of every image in a folder; writes CSV path,label,score + top-k",
        description="Classify every image under IMAGES (recursively) with a saved adapter. CSV columns: path, label, "
        "score (softmax), then label_2, score_2, ... up to --top-k.",
    )
    p.add_argument("adapter", help="adapter folder written by training (RUN/best or RUN/last) or save_adapter()")
    p.add_argument("images", help="folder of images (searched recursively) or one image file")
    p.add_argument("--top-k", type=int, default=5, help="predictions per image in the CSV (default: 5)")
    _inference_args(p)
    p.add_argument("--output", default="-", help="CSV file to write, '-' for stdout (default: -)")
    p.set_defaults(func=cmd_predict)

    from .dense import extend_parsers  # train --task segmentation|detection|instance; eval/predict by saved task

    extend_parsers(subparsers.choices)


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=("auto", "imagefolder", "vtab", "csv"), default="auto", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    p.add_argument("--weights", default="saved", help="backbone weights (default: the path the adapter recorded)")
    p.add_argument("--augmentation", choices=AUGMENTATIONS, help="eval transform (default: the one of training)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of ``sidetune train``: defaults < ``--config`` YAML < flags given on the command line."""
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in _DEFAULTS or k in ("backbone", "method")}
    if "opt" in vars(args):
        given["method_options"] = parse_options(args.opt, "--opt")
    if "backbone_opt" in vars(args):
        given["backbone_kwargs"] = parse_options(args.backbone_opt, "--backbone-opt")
    if args.config:
        return TrainConfig.from_yaml(args.config, **given)
    return TrainConfig.from_dict(given, source="the command line")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .loop import fit

    config = config_from_args(args)
    main = _is_main_process()
    show_bar = main and not args.no_progress and sys.stderr.isatty()
    bar: list[Any] = []

    def callback(event: str, record: dict[str, Any]) -> None:
        if not main:
            return
        if event == "start":
            print(f"training {config.backbone} / {config.method} -> {config.output} ({record['total_steps']} steps)")
            if show_bar:
                bar.append(tqdm(total=record["total_steps"], initial=record["step"], unit="step", dynamic_ncols=True))
        elif event == "step" and bar:
            bar[0].update(1)
            bar[0].set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        elif event == "epoch":
            line = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
            line += f", train top-1 {record['train_top1']:.1%}"
            if record.get("val_top1") is not None:
                line += f", val top-1 {record['val_top1']:.1%}"
            (bar[0].write if bar else print)(line)
        elif event == "end" and bar:
            bar[0].close()

    result = fit(config, callback=callback)
    if main:
        m, t = result.summary["metrics"], result.summary["timing"]
        if m["best_val_top1"] is not None:
            print(f"best val top-1 {m['best_val_top1']:.2%} (epoch {m['best_epoch']})")
        if m["test"] is not None:
            print(
                f"test top-1 {m['test']['top1']:.2%} on {m['test']['count']} images ({m['test_checkpoint']} checkpoint)"
            )
        step = t["median_step_time_s"]
        print(
            f"{result.summary['model']['trainable_parameters']:,} trainable parameters, "
            f"{t['steps']} steps, {step * 1000:.1f} ms/step (median), wall {t['wall_time_s']:.1f} s"
            if step is not None
            else f"{t['steps']} steps"
        )
        print(f"wrote {result.output}/{{summary.json,log.jsonl,curves.png,best,last,checkpoints}}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .inference import evaluate_adapter

    metrics = evaluate_adapter(
        args.adapter,
        args.data,
        args.split,
        layout=args.layout,
        batch_size=args.batch_size,
        workers=args.workers,
        weights=_weights(args.weights),
        augmentation=args.augmentation,
        device=args.device,
    )
    text = json.dumps(metrics, indent=2)
    print(text)
    out = Path(args.output) if args.output else Path(args.adapter) / f"eval_{metrics['split'] or 'all'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _weights(text: str) -> Any:
    return None if text.lower() in _NONE else text


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import predict_images

    rows = predict_images(
        args.adapter,
        args.images,
        top_k=args.top_k,
        batch_size=args.batch_size,
        workers=args.workers,
        weights=_weights(args.weights),
        augmentation=args.augmentation,
        device=args.device,
    )
    k = max((len(r["top_k"]) for r in rows), default=1)
    header = ["path", "label", "score"] + [f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "score")]
    to_stdout = args.output == "-"
    f = sys.stdout if to_stdout else open(args.output, "w", newline="")  # noqa: SIM115
    try:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            extra = [v for label, score in r["top_k"][1:] for v in (label, f"{score:.6f}")]
            writer.writerow([r["path"], r["label"], f"{r['score']:.6f}", *extra])
    finally:
        if not to_stdout:
            f.close()
    if not to_stdout:
        print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    return 0
