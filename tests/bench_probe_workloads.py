"""Stdlib-only workloads for the memory-probe tests (imported by the probe's child process).

Each function is the set-up phase and returns the measured ``run()``; importing this module is cheap, so
the child starts in a fraction of a second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

MIB = 1 << 20


def alloc(mb: int, setup_mb: int = 0) -> Callable[[], None]:
    """Hold ``setup_mb`` MiB from set-up; ``run()`` fills ``mb`` MiB in 1 MiB chunks, then frees them."""
    held = [b"\x01" * MIB for _ in range(setup_mb)]

    def run() -> None:
        chunks = [b"\x02" * MIB for _ in range(mb)]
        del chunks
        _ = len(held)

    return run


def fail(message: str) -> Callable[[], None]:
    """``run()`` raises ``MemoryError(message)``, as an out-of-memory workload would."""

    def run() -> None:
        raise MemoryError(message)

    return run


def fail_in_setup(message: str) -> Callable[[], None]:
    """The set-up phase itself raises ``ValueError(message)``."""
    raise ValueError(message)


def not_callable() -> int:
    """Breaks the protocol: returns no ``run()``."""
    return 42


def exit_process(code: int) -> Callable[[], None]:
    """``run()`` ends the process abruptly, as the kernel's OOM killer would, without a result."""

    def run() -> None:
        os._exit(code)

    return run


def sleep(seconds: float) -> Callable[[], None]:
    """Set-up sleeps (to trip the probe's timeout)."""
    time.sleep(seconds)
    return lambda: None
