"""The ``sidetune`` command line. Only this module prints and sets up logging."""

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


# Subcommand groups that live beside the code they drive: each module has ``register(subparsers)``,
# which adds its parsers with ``set_defaults(func=...)``. Add a module here to add its commands.
SUBCOMMAND_MODULES: tuple[str, ...] = ("sidetune.train.commands", "sidetune.bench.commands")


def build_parser() -> argparse.ArgumentParser:
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
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .errors import SidetuneError

    try:
        return args.func(args)
    except SidetuneError as err:
        print(f"sidetune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
