"""``sidetune serve``: the HTTP service on the command line; and the multi-adapter ``predict`` it shares.

Registered by ``register(subparsers)`` from :data:`sidetune.cli.SUBCOMMAND_MODULES`; ``python -m sidetune.serve``
runs the same ``serve`` command on its own. torch, FastAPI and uvicorn are imported inside the functions that
need them, so the command line starts fast. This module prints and sets up logging; the library only logs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, SidetuneError

__all__ = [
    "add_serve_arguments",
    "main",
    "parse_adapters",
    "register",
    "run_serve",
]

_MASK_FORMATS = ("png", "rle")  # sidetune.serve.results.MASK_FORMATS, without importing torch here


def _port(text: str) -> int:
    """A TCP port, checked when the arguments are parsed (not after the adapters have loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def parse_adapters(values: Sequence[str]) -> list[str] | dict[str, str]:
    """Adapter arguments ``DIR`` or ``NAME=DIR`` -> a list of folders, or a mapping name -> folder.

    ``NAME=DIR`` names the task; a bare ``DIR`` takes its default name (the folder's, or the run's for a
    ``best/`` or ``last/`` checkpoint). An argument that is an existing path is a folder even if it holds ``=``.
    Mixing both forms names the bare folders by default.

    Raises:
        ConfigError: two adapters get the same task name (one would be dropped).
    """
    from .multitask import default_task_name

    pairs: list[tuple[str | None, str]] = []
    for value in values:
        name, eq, path = value.partition("=")
        if eq and name and not Path(value).exists():
            pairs.append((name, path))
        else:
            pairs.append((None, value))
    if all(name is None for name, _ in pairs):
        return [path for _, path in pairs]
    names = [name if name is not None else default_task_name(path) for name, path in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"two adapters have the task name {', '.join(map(repr, twice))} in {list(values)}: give each its own "
            "NAME=DIR."
        )
    return dict(zip(names, (path for _, path in pairs), strict=True))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``sidetune serve`` (also used by ``python -m sidetune.serve``)."""
    p.add_argument(
        "adapters",
        nargs="+",
        metavar="[NAME=]ADAPTER",
        help="adapter folders (RUN/best, or save_adapter() output), optionally named NAME=DIR "
        "(default name: the folder's, or the run's for best/ and last/)",
    )
    p.add_argument("--weights", default="saved", help="backbone weights (default: the path the adapters recorded)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0: any free port)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=8, help="most requests per backbone forward (default: 8)")
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long the first request of a batch waits for others (default: 10)",
    )
    g.add_argument("--max-queue", type=int, default=256, help="most requests waiting; more get 503 (default: 256)")
    g = p.add_argument_group("requests")
    g.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="largest upload in MiB; larger gets 413 (default: 10)"
    )
    g.add_argument("--top-k", type=int, default=5, help="default classification labels per task (default: 5)")
    g.add_argument(
        "--score-threshold", type=float, default=0.5, help="default lowest detection score returned (default: 0.5)"
    )
    g.add_argument(
        "--mask-format", choices=_MASK_FORMATS, default="png", help="default segmentation mask format (default: png)"
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    g.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        help="autocast of every forward (default: the precision the adapters were trained in, when they agree and "
        "this device runs it)",
    )
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up forward before reporting healthy")
    g.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log level; info logs one line per request (default: info)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``sidetune`` command line."""
    p = subparsers.add_parser(
        "serve",
        help="serve several adapters over HTTP: one backbone forward per batch of requests for all of them",
        description=(
            "Load every adapter onto ONE shared frozen backbone and serve them over HTTP (FastAPI + uvicorn). "
            "Endpoints: GET /health, GET /tasks, POST /predict (an image -> every task's result), GET /metrics. "
            "Requests that arrive together are batched into one backbone forward (--max-batch, --max-wait-ms). "
            "See docs/serving.md."
        ),
        epilog="example: sidetune serve runs/defects/best camvid=runs/camvid-e3va/best --port 8000\n"
        "         curl -F file=@frame.jpg http://127.0.0.1:8000/predict",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)


def _setup_logging(level: str) -> None:
    log = logging.getLogger("sidetune.serve")
    log.setLevel(level.upper())
    if not any(getattr(h, "_sidetune_serve", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._sidetune_serve = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False


def run_serve(args: argparse.Namespace) -> int:
    """Load the adapters, then serve until interrupted (Ctrl-C / SIGTERM shut down cleanly)."""
    _setup_logging(args.log_level)
    try:
        import uvicorn

        from .app import ServeConfig, create_app
    except ImportError as err:
        raise ConfigError(
            f"sidetune serve needs FastAPI and uvicorn ({err.name} is missing): pip install 'sidetune[serve]'."
        ) from None
    import torch

    from .multitask import MultiTask

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_queue=args.max_queue,
        top_k=args.top_k,
        score_threshold=args.score_threshold,
        mask_format=args.mask_format,
        warmup=not args.no_warmup,
    )
    logger = logging.getLogger("sidetune.serve")
    logger.info("loading %d adapter(s) onto one backbone", len(args.adapters))
    multitask = MultiTask(
        parse_adapters(args.adapters), args.weights, device=args.device, mixed_precision=args.mixed_precision
    )
    info = multitask.describe()
    logger.info(
        "backbone %s at %s in %s precision: %.1f MB, shared by %s",
        info["backbone"]["name"],
        "x".join(map(str, info["backbone"]["img_size"])),
        info["mixed_precision"],
        info["backbone"]["bytes"] / 1e6,
        ", ".join(f"{t['name']} ({t['task']}, {t['method']}, {t['bytes'] / 1e6:.1f} MB)" for t in info["tasks"]),
    )
    app = create_app(multitask, config)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    )
    received: list[int] = []

    def note(signum: int, frame: object) -> None:  # uvicorn re-raises the signal it shut down on: end quietly
        received.append(signum)

    # uvicorn handles SIGINT/SIGTERM while it serves (graceful shutdown: running requests finish, the batcher
    # drains) and then re-raises the signal to the handler it found: make that one return, so the process
    # exits with status 0 instead of a KeyboardInterrupt traceback or death by SIGTERM.
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        logger.info("shut down on %s", signal.Signals(received[0]).name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sidetune.serve [NAME=]ADAPTER ... [--port ...]``: ``sidetune serve`` on its own."""
    parser = argparse.ArgumentParser(
        prog="python -m sidetune.serve", description="Serve several sidetune adapters over HTTP (docs/serving.md)."
    )
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run_serve(args)
    except SidetuneError as err:
        print(f"sidetune serve: error: {err}", file=sys.stderr)
        return 2
