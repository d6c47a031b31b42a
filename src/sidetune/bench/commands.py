"""``sidetune bench`` and ``sidetune plan``: the efficiency profiler on the command line.

Registered by ``register(subparsers)`` from :data:`sidetune.cli.SUBCOMMAND_MODULES`; this module prints,
the library modules beside it only log.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_OUT = "runs/bench"
_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _positive_bytes(text: str) -> int:
    """``--mmap-threshold``: a whole number of bytes, at least 1 (0 would read as glibc's dynamic policy)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {value} (leave it out for glibc's policy)")
    return value


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces ``args``: ``sidetune COMMAND`` and every option that differs from its
    default (rebuilt from the parsed arguments, so it is exact however ``main`` was called)."""
    parser = _PARSERS[args.command]
    words = ["sidetune", args.command]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                words += [flag, str(v)]
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _parse_option(text: str) -> tuple[str, str, Any]:
    from .profile import parse_option_value

    method, dot, rest = text.partition(".")
    key, eq, raw = rest.partition("=")
    if not dot or not eq or not method or not key:
        raise ConfigError(f"--option expects METHOD.KEY=VALUE (e.g. losa.channel_rank=32), got {text!r}.")
    return method, key, parse_option_value(raw)


def _config_from_args(args: argparse.Namespace, **overrides: Any):
    from .profile import BenchConfig

    options: dict[str, dict[str, Any]] = {}
    for text in args.option or []:
        method, key, value = _parse_option(text)
        options.setdefault(method, {})[key] = value
    try:
        backbone_kwargs = json.loads(args.backbone_kwargs) if args.backbone_kwargs else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"--backbone-kwargs must be a JSON object: {err}") from None
    if not isinstance(backbone_kwargs, dict):
        raise ConfigError("--backbone-kwargs must be a JSON object, e.g. '{\"depth\": 4}'.")
    from .plan import parse_size
    from .profile import split_methods

    methods = tuple(split_methods(args.methods)) if args.methods else None

    fields = dict(
        backbone=args.backbone,
        methods=methods,
        weights=args.weights,
        img_size=args.img_size,
        batch_size=args.batch_size,
        num_classes=args.num_classes,
        backbone_kwargs=backbone_kwargs,
        method_options=options,
        precision=args.precision,
        frozen_low_precision=args.frozen_weights_low_precision,
        compile=args.compile,
        channels_last=args.channels_last,
        frozen_precision=args.frozen_precision,
        cache=args.cache,
        grad_checkpointing=args.grad_checkpointing,
        device=args.device,
        threads=args.threads,
        max_rss_bytes=parse_size(args.max_rss) if args.max_rss else None,
        probe_timeout=args.probe_timeout,
        seed=args.seed,
    )
    fields.update(overrides)
    return BenchConfig(**fields)


def _add_common(p: argparse.ArgumentParser) -> None:
    from .profile import DEFAULT_BACKBONE

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"timm model name (default: {DEFAULT_BACKBONE})")
    g.add_argument("--weights", default=None, help="backbone weights: a file, or 'hub' (default: random weights)")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    g.add_argument("--batch-size", type=int, default=8, help="images per training step (default: 8)")
    g.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: every one in `sidetune methods`). METHOD[KEY=VALUE,...] adds a row "
        "of METHOD with those options, named as written, beside the plain one: "
        "'losa,losa[recompute=false],e3va,e3va[recompute=false]' (quote the list: [ ] are shell glob characters)",
    )
    g.add_argument("--num-classes", type=int, default=10, help="classifier size (default: 10)")
    g.add_argument(
        "--option",
        action="append",
        metavar="METHOD.KEY=VALUE",
        help="a method option (JSON value) for every row of METHOD, repeatable (one extra row: METHOD[KEY=VALUE])",
    )
    g.add_argument("--backbone-kwargs", default=None, metavar="JSON", help="extra timm.create_model arguments")
    g = p.add_argument_group("precision and levers of every row (a fair comparison: baselines get them too)")
    g.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="training precision of every row: bf16/fp16 run each row's forward and loss under autocast",
    )
    g.add_argument(
        "--frozen-weights-low-precision",
        action="store_true",
        help="store every row's frozen linear weights in the --precision dtype (same numbers, no cast per step)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile every row's backbone (and side network)")
    g.add_argument("--channels-last", action="store_true", help="channels-last weights and images (CNN backbones)")
    g = p.add_argument_group("side-only levers (each adds a separate, labelled row per side method)")
    g.add_argument(
        "--frozen-precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="+bf16-frozen rows: the frozen forward alone in this precision, the side network in float32",
    )
    g.add_argument("--cache", action="store_true", help="+cache rows: the side network's step on taps held in memory")
    g.add_argument(
        "--grad-checkpointing", action="store_true", help="add a +gc row per in-place method (the memory baseline)"
    )
    g = p.add_argument_group("machine")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument(
        "--max-rss",
        default=None,
        metavar="SIZE",
        help="CPU: stop a memory probe whose resident set passes SIZE, e.g. 8GB (default: 80%% of available memory)",
    )
    g.add_argument("--probe-timeout", type=float, default=600.0, help="seconds per memory probe (default: 600)")
    g.add_argument("--seed", type=int, default=0)


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fit-batches", default="4,16", metavar="B1,B2", help="batch sizes measured for the fit (default: 4,16)"
    )
    p.add_argument("--no-check", action="store_true", help="predict only, do not run the predicted batch")
    p.add_argument("--max-check-batch", type=int, default=512, help="CPU: largest batch a check may run (default: 512)")
    p.add_argument(
        "--mmap-threshold",
        type=_positive_bytes,
        default=None,
        metavar="BYTES",
        help="CPU: glibc MALLOC_MMAP_THRESHOLD_ of the measured processes (default: glibc's dynamic policy, which "
        "keeps freed activations in the heap); e.g. 131072 returns every large tensor to the system when freed",
    )


def _batches(text: str) -> tuple[int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise ConfigError(f"--fit-batches expects two batch sizes, e.g. 4,16; got {text!r}.")
    return values  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` and ``plan`` to the ``sidetune`` command line."""
    p = subparsers.add_parser(
        "bench",
        help="measure memory and time of each method (table, CSV, JSON, plots)",
        description=(
            "Profile the training cost of each method on one backbone and batch: trainable parameters, adapter "
            "checkpoint bytes, bytes saved for backward, static and peak memory, step time and throughput, the "
            "floor (frozen inference forward + side network), inference FLOPs; ratios to full fine-tuning."
        ),
    )
    _PARSERS["bench"] = p
    _add_common(p)
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, default=1, help="untimed steps per closure (default: 1)")
    g.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds (default: 5)")
    g.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: wall-clock time (default); cpu: CPU time of the process, robust to other load (use --threads 1)",
    )
    g.add_argument("--no-peak", action="store_true", help="skip the peak-memory measurement")
    g.add_argument("--reference", default="full", help="row the ratios divide by (default: full)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    g.add_argument("--name", default="bench", help="file name stem (default: bench)")
    g.add_argument(
        "--results",
        nargs="+",
        metavar="PATH",
        help="training results (JSON list of {method, accuracy}, summary.json files or run folders): Pareto plot",
    )
    g.add_argument("--no-plots", action="store_true", help="write no PNG")
    g = p.add_argument_group("fit (instead of profiling)")
    g.add_argument("--fit", metavar="SIZE", default=None, help="largest batch per method within SIZE, e.g. 11GB")
    _add_plan_args(g)
    p.set_defaults(func=_cmd_bench)

    p = subparsers.add_parser(
        "plan",
        help="largest batch per method that fits a memory budget (fitted, then checked)",
        description="Measure peak memory at two batch sizes, fit a line, predict the largest batch within the "
        "budget and check it by a real run where the machine allows.",
    )
    _PARSERS["plan"] = p
    p.add_argument("--budget", required=True, metavar="SIZE", help="memory budget, e.g. 11GB or 11GiB")
    _add_common(p)
    _add_plan_args(p)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--name", default="plan", help="file name stem (default: plan)")
    p.set_defaults(func=_cmd_plan)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.fit:
        args.budget = args.fit
        return _cmd_plan(args)
    from .profile import profile
    from .report import read_accuracies, terminal_table, write_report

    accuracies = None
    if args.results:
        try:
            accuracies = read_accuracies(args.results)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--results: {err}") from None
    config = _config_from_args(
        args,
        warmup=args.warmup,
        rounds=args.rounds,
        clock=args.clock,
        peak_memory=not args.no_peak,
        reference=args.reference,
    )
    report = profile(config, log=_progress, command=command_line(args))
    print(terminal_table(report))
    for note in report.notes:
        print(f"note: {note}")
    written = write_report(report, args.out, args.name, accuracies=accuracies, plots=not args.no_plots)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0 if any(r.status == "ok" for r in report.rows) else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan import parse_size, plan

    budget = parse_size(args.budget)
    config = _config_from_args(args)
    report = plan(
        config,
        budget,
        batches=_batches(args.fit_batches),
        check=not args.no_check,
        max_check_batch=args.max_check_batch,
        log=_progress,
        command=command_line(args),
        mmap_threshold=args.mmap_threshold,
    )
    text = report.markdown()
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name if args.name != "bench" else "plan"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    print(f"wrote {out / (name + '.md')}, {out / (name + '.json')}")
    return 0 if any(r.status == "ok" for r in report.rows) else 1
