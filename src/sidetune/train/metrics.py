"""The run's JSONL log and the facts a run summary records (memory, versions, commit).

The task metrics live with their tasks (:mod:`sidetune.tasks`); ``ClassificationMeter`` is re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..tasks.classification import ClassificationMeter

__all__ = ["ClassificationMeter", "JsonlLog", "device_name", "git_commit", "peak_memory", "read_log", "versions"]


class JsonlLog:
    """Append-only JSON-lines log of a run (``log.jsonl``): one record per optimizer step and per epoch."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(_finite(record)) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by a run that died after its last checkpoint)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [r for r in _records(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (a last line cut short by a killed process is left out)."""
    return _records(Path(path))


def _records(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines log. Only the last line may be cut short (the process died while writing it): it is
    dropped; any other line that does not parse means the file was damaged, and says where.

    Raises:
        CheckpointError: a line other than the last is not JSON (the run's files are damaged).
    """
    from .checkpoint import CheckpointError

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):
                break  # the write the process died in: the checkpoint it belongs to was never saved either
            raise CheckpointError(
                f"{path}, line {n}: not JSON ({err.msg}); the run's log is damaged: repair or remove that line, or "
                "start the run again in a new --output."
            ) from None
    return records


def _finite(value: Any) -> Any:
    """NaN/inf -> None, so the log stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this process: CUDA ``max_memory_allocated``, or the CPU's peak resident set size.

    The CPU figure is the whole process's high-water mark (Python, libraries, data workers excluded),
    not the training's alone: compare methods by the CUDA figure or by ``sidetune bench``.
    """
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"kind": "cpu_peak_rss", "bytes": int(rss * scale)}


def versions() -> dict[str, str]:
    import accelerate
    import timm

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "sidetune": __version__,
    }


def git_commit() -> str | None:
    """The commit of the sidetune checkout this code runs from, or None (an installed wheel, no git)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
