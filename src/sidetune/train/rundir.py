"""The run directory: one set of files for every task, an exclusive lock, and what survives a kill.

``OUTPUT/`` holds:

* ``train_config.yaml``: the resolved :class:`~sidetune.train.TrainConfig` (``sidetune train --config`` repeats it);
* ``log.jsonl``: one record per optimizer step and per epoch (:mod:`sidetune.train.metrics`);
* ``best/`` and ``last/``: adapter-only checkpoints plus ``inference.json`` (class names, transforms, precision);
* ``checkpoints/``: the resumable state (:mod:`sidetune.train.checkpoint`);
* ``summary.json`` and ``curves.png``;
* ``.lock``: held (``fcntl.flock``) by the run writing the folder, with its pid inside.

``--resume RUN`` with another ``--output`` continues ``RUN`` in a copy: the new folder starts with ``RUN``'s log
up to the checkpoint, its ``best/`` and ``last/`` adapters and the checkpoint itself, and ``RUN`` is only read
(:func:`branch_run`). A folder that holds a run (``log.jsonl``) or a sweep (``sweep.json``,
:mod:`sidetune.cache.sweep`) is never the output of another run or sweep.

Failure model: every file is written to a temporary name and renamed into place, so a kill leaves either the
old or the new version; ``checkpoints/LATEST`` always names a complete checkpoint. A second run started into a
folder in use is refused naming the holder's pid; the lock dies with its process, so a crashed run leaves no
stale lock. A run killed before its first checkpoint is started again from scratch by ``--resume``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, SidetuneError
from ..model import SidetuneModel
from .checkpoint import CHECKPOINTS, CheckpointError, find_checkpoint
from .inference import INFERENCE
from .metrics import _finite, read_log

logger = logging.getLogger(__name__)

LOG = "log.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
CONFIG = "train_config.yaml"
LOCK = ".lock"
SWEEP = "sweep.json"  # the marker of a sweep's folder (sidetune.cache.sweep), whose best/ a run would replace


class TrainingError(SidetuneError):
    """Training cannot go on (a non-finite loss or non-finite weights): nothing wrong is saved."""


class RunLock:
    """An exclusive lock on a run directory for the lifetime of a run (``fcntl.flock`` on ``OUTPUT/.lock``).

    The kernel releases a ``flock`` when its process dies, so a lock left by a crashed run is never stale: the
    next run takes it (and logs the dead holder). The file records the holder's pid, host and start time, for
    the message a second run gets.

    Raises:
        ConfigError: another live process holds the lock.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK
        self._file = None
        self._created = False

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock (documented)
            logger.warning("no file locking on this platform: do not start two runs into %s", self.path.parent)
            return self
        directory = self.path.parent
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"--output {str(directory)!r} is a file; give a directory for the run.")
        self._created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the run's lifetime)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(
                f"output directory {str(self.path.parent)!r} is in use by another sidetune run ({holder}); wait for "
                "it to finish or choose another --output."
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            logger.info("%s: the previous holder (%s) is gone; taking the lock", self.path, previous)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Unlock; a folder this lock created and nothing else wrote into (a refused run) is removed again."""
        if self._file is None:
            return
        import fcntl

        directory = self.path.parent
        if self._created and [p.name for p in directory.iterdir()] == [LOCK]:
            self.path.unlink()
            directory.rmdir()
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def open_run(out: Path, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from (None: a new run); refuses to start a new run over an existing one.

    ``--resume`` of a run that died before its first complete checkpoint starts it again from scratch (its log
    is cleared) and says so; without ``--resume`` such a folder is refused with that advice. A resume of another
    run's checkpoint continues it in ``out`` (:func:`branch_run`), which must not hold a run.

    Raises:
        ConfigError: ``out`` is a file, holds a sweep, or holds a run's log and ``resume`` is None or another run.
        CheckpointError: ``resume`` points at nothing resumable: another folder without a checkpoint, or ``out``
            itself holding no run (neither a log nor a config: a mistyped path).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {str(out)!r} is a file; give a directory for the run.")
    if (out / SWEEP).exists():
        raise ConfigError(
            f"output directory {str(out)!r} holds a sweep ({SWEEP}, with the chosen configuration's adapter in best/); "
            "a run there would replace that best/: choose another --output."
        )
    if resume is None:
        if (out / LOG).exists():
            resumable = has_checkpoint(out)
            raise ConfigError(
                f"output directory {str(out)!r} already holds a run ({LOG}); "
                + (
                    f"pass --resume {out} to continue it or choose another --output."
                    if resumable
                    else f"it has no complete checkpoint (it stopped before its first save): pass --resume {out} to "
                    "start it again from scratch, or choose another --output."
                )
            )
        return None
    resume_path = Path(resume).expanduser()
    try:
        checkpoint = find_checkpoint(resume_path)
    except CheckpointError:
        if resume_path.resolve() != out.resolve() or not out.is_dir():
            raise
        if not ((out / LOG).is_file() or (out / CONFIG).is_file()):  # not a run that died early: a mistyped path
            raise CheckpointError(
                f"--resume {str(resume_path)!r}: no run there to resume (neither {LOG} nor {CONFIG}); check the "
                "path, or drop --resume to start a new run."
            ) from None
    else:
        if resumed_elsewhere(checkpoint, out) and (out / LOG).exists():
            source = run_folder(checkpoint)
            fix = f"--output {source} to continue it in its own folder, or " if source is not None else ""
            raise ConfigError(
                f"output directory {str(out)!r} already holds a run ({LOG}), and --resume {str(resume_path)!r} "
                f"continues another one: resuming it there would replace this run's log and adapters. Give {fix}a "
                "new --output to continue it in a copy."
            )
        return checkpoint
    logger.warning("%s has no complete checkpoint (the run stopped before its first save): starting it again", out)
    (out / LOG).unlink(missing_ok=True)
    (out / SUMMARY).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return None


def run_folder(checkpoint: Path) -> Path | None:
    """The run directory ``checkpoint`` belongs to (``RUN/checkpoints/step-N``), or None for a folder outside one."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def resumed_elsewhere(checkpoint: Path | None, out: Path) -> bool:
    """Whether ``checkpoint`` is another run's (or a loose checkpoint folder): the resume continues it in ``out``."""
    if checkpoint is None:
        return False
    source = run_folder(checkpoint)
    return source is None or source.resolve() != out.resolve()


def branch_run(checkpoint: Path, out: Path, step: int) -> None:
    """Start ``out`` as the run of ``checkpoint`` stood at it: its ``best/`` and ``last/`` adapters and its log's
    records up to ``step`` (a checkpoint folder outside a run: an empty log). The source run is only read.

    The log is written last: a branch killed before it leaves ``out`` without one, and the same command redoes it.
    """
    source = run_folder(checkpoint)
    for name in ("best", "last"):
        if source is not None and (source / name).is_dir():
            tmp = out / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source / name, tmp)
            shutil.rmtree(out / name, ignore_errors=True)  # left by a branch killed before its log
            os.replace(tmp, out / name)
    records = read_log(source / LOG) if source is not None and (source / LOG).is_file() else []
    tmp = out / f".{LOG}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))
    os.replace(tmp, out / LOG)
    logger.info("continuing %s (step %d) in %s", source or checkpoint, step, out)


def has_checkpoint(out: Path) -> bool:
    try:
        find_checkpoint(out)
    except CheckpointError:
        return False
    return True


def check_finite(model: SidetuneModel, what: str) -> None:
    """Refuse to save non-finite weights (a diverged run must never leave a NaN adapter behind).

    Raises:
        TrainingError: naming the first tensors that hold NaN or inf.
    """
    bad = [n for n, p in model.named_trainable_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingError(
            f"not saving {what}: {len(bad)} trained tensor(s) hold NaN or inf ({', '.join(bad[:3])}). The run "
            "diverged; lower --lr (or set --clip-grad) and start again from the last good checkpoint."
        )


def save_adapter(model: SidetuneModel, directory: Path, info: dict[str, Any]) -> None:
    """``model.save_adapter(directory)`` plus ``inference.json`` (``info``), refusing non-finite weights."""
    check_finite(model, f"the adapter {directory}")
    model.save_adapter(directory)
    write_json(directory / INFERENCE, info)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON file (NaN/inf as null, so the file stays strict JSON)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(_finite(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)
