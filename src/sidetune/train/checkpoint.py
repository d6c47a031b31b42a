"""Resumable training state, written atomically.

A run directory holds ``checkpoints/step-<N>/`` folders and a ``checkpoints/LATEST`` file naming the newest.
A checkpoint is written into a hidden temporary folder, renamed into place when complete, and only then
named by ``LATEST`` (itself replaced with ``os.replace``); older checkpoints are deleted after that. A run
killed at any point (an exception, Ctrl-C, a crash during the save) therefore leaves ``LATEST`` naming a
complete checkpoint.

A checkpoint holds only what training changes: the trainable tensors (never the frozen backbone), the
optimizer, the learning-rate schedule, the step/epoch/batch position, and the RNG states of every process
(torch, CUDA, numpy, python). The data order is a function of the seed and the epoch
(:class:`~sidetune.train.inputs.EpochSampler`), so the position is all it needs to resume mid-epoch.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import SidetuneError
from ..model import SidetuneModel

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
# fields of ModelConfig that must agree between a checkpoint and the model it is loaded into
_IDENTITY = (
    "backbone",
    "method",
    "task",
    "method_config",
    "num_classes",
    "img_size",
    "backbone_kwargs",
    "head_options",
    "num_frames",
)
# what a field of an older checkpoint that lacks it stands for
_ABSENT = {"task": "classification", "head_options": {}}


class CheckpointError(SidetuneError):
    """A checkpoint is missing, incomplete, or belongs to a different model."""


@dataclass
class TrainerState:
    """Where a run stands: saved as ``trainer_state.json`` in every checkpoint.

    Attributes:
        step: optimizer steps done.
        epoch: the epoch in progress (0-based); equal to the epoch count when training finished.
        batch_in_epoch: micro-batches of ``epoch`` already consumed (per process).
        best_metric: best validation score so far (top-1; dense tasks: mIoU or box mAP), or None.
        best_epoch: the epoch (1-based) that reached it.
        elapsed_s: training wall time before this checkpoint (summed over resumed segments).
        epoch_sums: the running sums of the epoch in progress (loss, samples, task statistics) over every
            process, so that the epoch record after a mid-epoch resume covers the whole epoch.
        nonfinite_steps: optimizer steps skipped so far because their loss was not finite.
        model: the model's :class:`~sidetune.model.ModelConfig` as a dict (checked on resume).
        run: facts of the run that shape the schedule (steps per epoch, processes, batch size).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    elapsed_s: float = 0.0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    nonfinite_steps: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """The RNG states of this process, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    run_dir: Path,
    accelerator,
    model: SidetuneModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
) -> Path:
    """Write ``run_dir/checkpoints/step-<N>`` atomically; call on every process (each saves its RNG state).

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{state.step:08d}"
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    final = root / name
    try:
        torch.save(capture_rng(), tmp / _rng_file(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_file(model.adapter_state_dict(), str(tmp / TRAINABLE))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            if getattr(accelerator, "scaler", None) is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / SCALER)
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")  # last: marks completeness
            trash = None
            if final.exists():  # the same step saved twice (a resumed run re-reaching it)
                trash = root / f".trash-{name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
            os.replace(tmp, final)
            _atomic_text(root / LATEST, name + "\n")
            for old in root.iterdir():
                if old.name != name and (old.name.startswith("step-") or old.name.startswith(".trash-")):
                    shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
    except BaseException as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError | RuntimeError) and disk_full(err):
            needed = _checkpoint_bytes(model, optimizer)
            free = shutil.disk_usage(root).free
            raise CheckpointError(
                f"the disk holding {str(root)!r} is full: saving the checkpoint of step {state.step} needs about "
                f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free. The previous checkpoint is intact: free "
                f"some space and resume with --resume {run_dir}."
            ) from None
        raise
    accelerator.wait_for_everyone()
    return final


def disk_full(err: BaseException) -> bool:
    """Whether a failed write ran out of space (ENOSPC, or torch's "unexpected pos" from a short write)."""
    import errno

    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text


def _checkpoint_bytes(model: SidetuneModel, optimizer) -> int:
    """Roughly what a checkpoint takes: the trainable tensors and the optimizer's state tensors."""
    total = sum(p.numel() * p.element_size() for p in model.trainable_parameters())
    for state in optimizer.state_dict().get("state", {}).values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` stands for: itself, or the newest one of a run directory.

    Raises:
        CheckpointError: nothing resumable there.
    """
    path = Path(path).expanduser()
    if (path / TRAINER_STATE).is_file():
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    latest = root / LATEST
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
        logger.warning("%s names %s, which is incomplete; looking for another checkpoint", latest, candidate)
    found = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()) if root.is_dir() else []
    if found:
        return found[-1]
    raise CheckpointError(
        f"nothing to resume at {str(path)!r}: expected a run directory with {CHECKPOINTS}/{LATEST} or a checkpoint "
        f"folder with {TRAINER_STATE}."
    )


def read_trainer_state(checkpoint: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((checkpoint / TRAINER_STATE).read_text()))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(checkpoint / TRAINER_STATE)!r} is not a sidetune trainer state: {err}") from None


def check_compatible(saved: dict[str, Any], model: SidetuneModel, checkpoint: Path) -> None:
    """Refuse a checkpoint of another model, naming the checkpoint and both values.

    Raises:
        CheckpointError: method, backbone, task or another identity field (head options...) differs.
    """
    current = asdict(model.config)
    saved_task = saved.get("task", _ABSENT["task"])
    if (saved.get("method"), saved.get("backbone"), saved_task) != (
        current["method"],
        current["backbone"],
        current["task"],
    ):
        # the task is named when it differs or is a dense one; classification messages stay as they were
        named = saved_task != current["task"] or current["task"] != "classification"

        def trained(config: dict[str, Any], task: str) -> str:
            text = f"method {config.get('method')!r} on backbone {config.get('backbone')!r}"
            return text + (f" for task {task!r}" if named else "")

        raise CheckpointError(
            f"cannot resume from {str(checkpoint)!r}: it was trained with {trained(saved, saved_task)}, but this run "
            f"trains {trained(current, current['task'])}. Resume with the same "
            f"{'method, backbone and task' if named else 'method and backbone'}, or start a new run (another --output)."
        )
    for key in _IDENTITY:
        a, b = _normal(saved.get(key, _ABSENT.get(key))), _normal(current[key])
        if a != b:
            raise CheckpointError(
                f"cannot resume from {str(checkpoint)!r}: its {key} is {a!r} but this run's is {b!r}. Use the same "
                "model settings, or start a new run."
            )
    if saved.get("backbone_fingerprint") != current["backbone_fingerprint"]:
        raise CheckpointError(
            f"cannot resume from {str(checkpoint)!r}: it was trained on {current['backbone']} weights "
            f"{saved.get('weights')!r}, which differ from this run's {current['weights']!r} (fingerprints "
            f"{str(saved.get('backbone_fingerprint'))[:16]}... vs {current['backbone_fingerprint'][:16]}...)."
        )


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, so a config read from JSON compares equal


def _load(path: Path) -> Any:
    """``torch.load`` of a checkpoint file: tensors and plain containers only (``weights_only=True``, explicitly).

    Raises:
        CheckpointError: the file is not a tensor state (tampered, truncated, or pickled objects).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, UnpicklingError for disallowed globals, truncated files
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint state ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "resume from another checkpoint or start a new run."
        ) from None
    if not isinstance(state, dict | list | tuple):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a checkpoint state.")
    return state


def load_checkpoint(
    checkpoint: Path,
    accelerator,
    model: SidetuneModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore a checkpoint written by :func:`save_checkpoint` into an identically built run.

    Raises:
        CheckpointError: another model's checkpoint, or files missing.
    """
    state = read_trainer_state(checkpoint)
    check_compatible(state.model, model, checkpoint)
    for name in (TRAINABLE, OPTIMIZER, SCHEDULER):
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} is incomplete: {name} is missing.")
    tensors = load_file(str(checkpoint / TRAINABLE))
    params = dict(model.named_trainable_parameters())
    if set(tensors) != set(params):
        raise CheckpointError(
            f"{str(checkpoint / TRAINABLE)!r} does not match the model's trainable tensors: missing "
            f"{sorted(set(params) - set(tensors))[:5]}, unexpected {sorted(set(tensors) - set(params))[:5]}."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(_load(checkpoint / OPTIMIZER))
    scheduler.load_state_dict(_load(checkpoint / SCHEDULER))
    if (checkpoint / SCALER).is_file() and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(_load(checkpoint / SCALER))
    rng = checkpoint / _rng_file(accelerator.process_index)
    if rng.is_file():
        restore_rng(_load(rng))
    else:
        logger.warning(
            "%s has no RNG state for process %d; dropout will not replay exactly", checkpoint, accelerator.process_index
        )
    saved_procs = state.run.get("num_processes")
    if saved_procs is not None and saved_procs != accelerator.num_processes:
        logger.warning(
            "checkpoint %s was written by %s processes, this run has %d: the data order after resuming differs",
            checkpoint,
            saved_procs,
            accelerator.num_processes,
        )
    logger.info(
        "resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.step, state.epoch, state.batch_in_epoch
    )
    return state
