"""The ``sidetune`` command line. Only this module prints and sets up logging.

Start-up is fast: ``sidetune --help`` and ``sidetune --version`` import neither torch nor timm. Each command's
module is imported, and its full parser built, only when that command runs (or its ``--help`` is asked for).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import list_methods

    rows = list_methods()
    width = max(len(r["name"]) for r in rows)
    print(f"{'method'.ljust(width)}  kind     backprop into backbone  families        description")
    for r in rows:
        bp = "yes" if r["backprop_through_backbone"] else "no"
        fams = ",".join(r["families"])
        print(f"{r['name'].ljust(width)}  {r['kind']:<7}  {bp:<22}  {fams:<14}  {r['description']}")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from .backbones import list_backbones

    if args.pattern:
        names = list_backbones(args.pattern)
        print("\n".join(names) if names else f"no supported timm model matches {args.pattern!r}")
        return 0 if names else 1
    for fam in list_backbones():
        taps = "block, attention and MLP taps" if fam["branch_taps"] else "stage outputs"
        print(f"{fam['family']:<5} {fam['description']}")
        print(f"      names: {', '.join(fam['patterns'])}; taps: {taps}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, bench=not args.no_bench)
    return 0


# Commands that live beside the code they drive: command -> (module, one-line help). Each module has
# ``register(subparsers)``, which adds its commands' parsers with ``set_defaults(func=...)``. Add a line here to
# add a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "sidetune.train.commands",
        "train a model (classification, segmentation, detection, instance): a frozen backbone adapted by a method",
    ),
    "eval": ("sidetune.train.commands", "evaluate a saved adapter on a labelled split; prints and writes the metrics"),
    "predict": (
        "sidetune.train.commands",
        "predict a folder of images: CSV (classification), PNG masks (segmentation), COCO JSON (detection)",
    ),
    "data": ("sidetune.data.commands", "check a dataset as training reads it: splits, classes, balance, skipped files"),
    "cache": ("sidetune.cache.commands", "build or inspect a tap cache: the backbone's taps on disk, for training"),
    "sweep": ("sidetune.cache.commands", "train a grid of settings in one pass over a tap cache; choose on val"),
    "serve": ("sidetune.serve.commands", "serve adapters over HTTP: one backbone pass per batch for every task"),
    "bench": ("sidetune.bench.commands", "measure what each method costs: parameters, memory, step time"),
    "plan": ("sidetune.bench.commands", "the largest batch per method within a memory budget, checked by a real run"),
}


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The ``sidetune`` parser with every command's full parser (``"*"``), or only ``command``'s (its module
    registers its parsers; the other commands are one-line stubs, which is all ``sidetune --help`` needs)."""
    parser = argparse.ArgumentParser(
        prog="sidetune",
        description="Adapt frozen vision backbones with side networks (E3VA, LoSA) and compare with baselines.",
    )
    parser.add_argument("--version", action="version", version=f"sidetune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("methods", help="list the adaptation methods with their kind")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("backbones", help="list supported backbone families, or timm models matching a pattern")
    p.add_argument("pattern", nargs="?", help="timm name pattern, e.g. 'vit_small*' (lists matching models)")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("demo", help="offline demo: LoSA and E3VA on a ViT and a Swin, trained on sklearn digits")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per method (default: 200)")
    p.add_argument("--no-bench", action="store_true", help="skip the short sidetune bench the demo ends with")
    p.set_defaults(func=_cmd_demo)
    modules = list(dict.fromkeys(m for m, _ in COMMANDS.values()))
    full = modules if command == "*" else [COMMANDS[command][0]] if command in COMMANDS else []
    for module in full:
        importlib.import_module(module).register(sub)
    for name, (module, text) in COMMANDS.items():
        if module not in full:
            sub.add_parser(name, help=text, add_help=False)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command word of ``argv`` (the first argument that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def _refuse_extra(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str], extra: list[str]):
    """argparse's "unrecognized arguments", in the usage of the command that was given them, and where a leftover
    word looks like an optional positional argument split from the others (argparse reads positional arguments
    from one run of words: ``train test_vit --data D losa`` leaves ``losa`` over), how to give it."""
    command = parser
    if not any(argv.index(word) < argv.index(args.command) for word in extra if word in argv):
        command = _leaf_parser(parser, args)
    message = f"unrecognized arguments: {' '.join(extra)}"
    unfilled = [a for a in command._actions if not a.option_strings and a.nargs == "?" and a.dest not in args]
    values = {extra[i + 1] for i in range(len(extra) - 1) if extra[i].startswith("-")}  # of unknown options
    words = [w for w in extra if not w.startswith("-") and w not in values]
    if words and unfilled:
        positionals = " ".join((a.metavar or a.dest).upper() for a in command._actions if a.nargs == "?")
        message += (
            f"; {', '.join(repr(w) for w in words)} was not read as {' or '.join(a.dest.upper() for a in unfilled)}: "
            f"give the positional arguments together, before the options: {command.prog} {positionals} [options]"
        )
    command.error(message)


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` were parsed for: ``sidetune cache build``'s, not ``sidetune``'s."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if name not in getattr(sub, "choices", {}):
            return parser
        parser = sub.choices[name]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_extra(parser, args, argv, extra)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .errors import SidetuneError

    try:
        return args.func(args)
    except SidetuneError as err:
        print(f"sidetune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sidetune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
