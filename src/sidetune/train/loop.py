"""The classification training loop, on Hugging Face Accelerate.

One entry point, :func:`fit`, runs on one CPU, one GPU, or several processes started by ``torchrun`` or
``accelerate launch`` (DDP; gloo on CPUs). A run directory gets:

* ``train_config.yaml``: the resolved :class:`TrainConfig`;
* ``log.jsonl``: one record per optimizer step (loss, lr, step and data time) and per epoch (train and
  validation metrics);
* ``best/`` and ``last/``: adapter-only checkpoints (:meth:`SidetuneModel.save_adapter`, plus
  ``inference.json`` with the class names and the eval transform) for :func:`sidetune.load`;
* ``checkpoints/``: the resumable state (:mod:`sidetune.train.checkpoint`);
* ``summary.json`` and ``curves.png``.

Recipe: AdamW on the trainable parameters only (no weight decay on biases, norms and other 1-D tensors,
position embeddings and class/register tokens), linear warm-up then cosine decay, stepped per optimizer
step; cross-entropy with optional label smoothing; gradient accumulation through
``Accelerator(gradient_accumulation_steps=...)``. On the CPU a run is reproducible bit for bit: the same
seed gives the same per-step losses, and a run stopped mid-epoch and resumed gives the losses of one that
never stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState, skip_first_batches
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from .. import create
from ..bench.levers import native_low_precision
from ..data import DataError, build_classification_dataset
from ..errors import ConfigError
from ..model import ADAPTER_WEIGHTS, SidetuneModel
from .checkpoint import (
    CheckpointError,
    TrainerState,
    check_compatible,
    find_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from .config import TrainConfig
from .inference import INFERENCE
from .inputs import EpochSampler, RunData, SeededDataset, build_run_data, classes_of, resolve_splits
from .metrics import ClassificationMeter, JsonlLog, device_name, git_commit, peak_memory, read_log, versions
from .plots import plot_curves

logger = logging.getLogger(__name__)

LOG = "log.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"
CONFIG = "train_config.yaml"

#: ``callback(event, record)``: events ``"start"`` (record has ``step``, ``total_steps``), ``"step"`` (a step
#: record of the log), ``"epoch"`` (an epoch record) and ``"end"`` (the summary). Called on every process.
Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        output: the run directory.
        summary: the contents of ``summary.json``.
        model: the trained model (unwrapped, holding the best checkpoint's weights when there was a
            validation split, else the last).
    """

    output: Path
    summary: dict[str, Any]
    model: SidetuneModel


class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up from ``1/warmup`` to 1, then cosine to ``floor``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict()`` saves it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, floor: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.floor = warmup_steps, max(1, total_steps), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_mixed_precision(requested: str, on_cpu: bool) -> str:
    """``auto`` -> ``bf16``/``fp16`` on CUDA, ``no`` on CPU; a 16-bit mode the device lacks is an error.

    On the CPU, ``bf16`` is accepted where the processor computes it natively (AVX512-BF16 or AMX, as
    oneDNN reports): there autocast runs the matrix products in bfloat16, about 2.5x faster for a ViT, with
    parameters, gradients and optimizer state in float32. Elsewhere autocast would emulate it, slower than
    float32, so it is refused. ``auto`` stays ``no`` on the CPU: bf16 changes the numbers, so it is asked for.
    """
    if on_cpu:
        if requested in ("auto", "no"):
            return "no"
        if requested == "bf16" and native_low_precision(torch.bfloat16, torch.device("cpu")):
            return "bf16"
        reason = (
            "fp16 training needs a CUDA device"
            if requested == "fp16"
            else "this CPU has no native bfloat16 (AVX512-BF16 or AMX), so autocast would be slower than float32"
        )
        raise ConfigError(f"mixed_precision={requested!r} on the CPU: {reason}; use 'no' (or 'auto').")
    bf16 = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if bf16 else "fp16"
    if requested == "bf16" and not bf16:
        raise ConfigError(f"mixed_precision='bf16' is not supported by {torch.cuda.get_device_name()}; use 'fp16'.")
    return requested


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Accelerator:
    """``Accelerator(mixed_precision=..., **kwargs)`` that a second run in the same process may also build.

    Accelerate keeps its state in a process-wide singleton and refuses a second ``Accelerator`` with another
    precision ("restart your runtime"). A notebook or script that trains twice (fp32, then bf16) is normal
    use, so the precision part of that state is dropped first; the process group (``PartialState``) stays.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


def param_groups(model: SidetuneModel, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and convolutions; not biases, norms, 1-D tensors, embeddings and tokens."""
    skip_names = ("pos_embed", "cls_token", "reg_token", "dist_token", "relative_position_bias_table")
    decay, no_decay = [], []
    for name, p in model.named_trainable_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip_names) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def unused_parameters(model: SidetuneModel, dataset: Dataset) -> list[str]:
    """Trainable parameters that get no gradient from a training forward (DDP must then look for them).

    Runs one forward/backward on two training images with the RNG state preserved and the gradients cleared.
    """
    batch = [dataset[i] for i in range(min(2, len(dataset)))]
    images = torch.stack([b[0] for b in batch])
    with torch.random.fork_rng(devices=[]):
        was_training = model.training
        model.train()
        model(images).float().sum().backward()
        model.train(was_training)
    names = [n for n, p in model.named_trainable_parameters() if p.grad is None]
    model.zero_grad(set_to_none=True)
    return names


def open_run(out: Path, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from (None: a new run); refuses to start a new run over an existing one.

    Raises:
        ConfigError: ``out`` holds a run's log and ``resume`` is None.
        CheckpointError: ``resume`` points at nothing resumable.
    """
    if resume is None and (out / LOG).exists():
        raise ConfigError(
            f"output directory {str(out)!r} already holds a run ({LOG}); pass --resume {out} to continue it or "
            "choose another --output."
        )
    return find_checkpoint(resume) if resume is not None else None


def make_train_loader(
    dataset: SeededDataset,
    batch_size: int,
    seed: int,
    num_processes: int,
    **loader_kwargs: Any,
) -> tuple[DataLoader, EpochSampler]:
    """The training loader (not yet prepared) and its sampler: the order of epoch ``e`` depends on (seed, e) alone.

    The last incomplete batch is dropped unless the data is smaller than one global batch; the loader's own
    generator (which seeds its workers) is seeded too, so iterating it never draws on the global RNG.
    """
    sampler = EpochSampler(len(dataset), seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(dataset) >= batch_size * num_processes,
        generator=torch.Generator().manual_seed(seed),
        **loader_kwargs,
    )
    return loader, sampler


def epoch_loader(train_loader, sampler: EpochSampler, dataset: SeededDataset, epoch: int, skip: int = 0):
    """The prepared ``train_loader`` positioned at ``epoch``, its first ``skip`` batches skipped (a resume)."""
    dataset.set_epoch(epoch)
    loader = skip_first_batches(train_loader, skip) if skip else train_loader
    loader.set_epoch(epoch)  # accelerate's own epoch counter, which it hands to the sampler on iteration
    sampler.set_epoch(epoch)  # the permutation of this epoch, whichever wrappers sit between
    return loader


def make_schedule(
    config, optimizer, batches_per_epoch: int, num_images: int, accelerator: Accelerator
) -> tuple[torch.optim.lr_scheduler.LambdaLR, dict[str, Any]]:
    """The warm-up + cosine scheduler of a run and its schedule facts (saved with checkpoints, checked on resume).

    ``config`` is a ``TrainConfig`` or ``DenseConfig`` (batch_size, grad_accum, epochs, warmup_epochs, lr,
    min_lr); ``optimizer`` the prepared one; one optimizer step per ``grad_accum`` batches.

    Raises:
        DataError: the training data gives no batch.
    """
    if batches_per_epoch == 0:
        raise DataError(f"the training data ({num_images} images) gives no batch of {config.batch_size}.")
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer, WarmupCosine(warmup_steps, total_steps, config.min_lr / config.lr)
    )
    facts = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_processes": accelerator.num_processes,
        "images_per_step": config.batch_size * accelerator.num_processes * config.grad_accum,
    }
    return scheduler, facts


_SCHEDULE_FACTS = {
    "steps_per_epoch": "--batch-size, --grad-accum or the training data",
    "images_per_step": "--batch-size, --grad-accum or the number of processes",
    "total_steps": "--epochs",
}


def check_schedule(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume a checkpoint into another schedule.

    The position in the epoch (batches to skip) and the learning-rate schedule (whose warm-up and length the
    scheduler's state carries) are only meaningful for the same steps per epoch, images per step and total
    steps; resuming with, say, more epochs would silently follow the old cosine.

    Raises:
        CheckpointError: naming each fact that differs, both values and the setting behind it.
    """
    diffs = [
        f"{key} {saved[key]} -> {current[key]} ({why})"
        for key, why in _SCHEDULE_FACTS.items()
        if key in saved and key in current and saved[key] != current[key]
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {str(checkpoint)!r}: this run's schedule differs from the checkpoint's: "
            f"{'; '.join(diffs)}. Resume with the settings the run started with, or start a new run "
            "(another --output) initialised from its adapter."
        )


def start_or_resume(
    checkpoint: Path | None,
    accelerator: Accelerator,
    model: SidetuneModel,
    optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    run_facts: dict[str, Any],
    log: JsonlLog,
    seed: int,
) -> TrainerState:
    """Restore ``checkpoint`` (and drop the log records written after it), or seed a new run's dropout stream.

    ``model`` is the unwrapped model; ``run_facts`` describe this run's schedule and replace the saved ones.
    """
    if checkpoint is None:
        _seed_everything(seed + 1009 * accelerator.process_index)  # dropout differs across processes
        return TrainerState(model=asdict(model.config), run=run_facts)
    check_schedule(read_trainer_state(checkpoint).run, run_facts, checkpoint)
    tstate = load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler)
    tstate.model, tstate.run = asdict(model.config), run_facts
    log.truncate_after(tstate.step)
    return tstate


def _checksum(model: SidetuneModel) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.adapter_state_dict().items()):
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes())
    return h.hexdigest()


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator: Accelerator, num_classes: int) -> dict[str, Any]:
    """Loss, top-1, top-5, mean class accuracy and per-class accuracy of ``model`` on ``loader``.

    Under several processes the logits are gathered (``gather_for_metrics`` drops the padding samples), so
    every process returns the metrics of the whole split.
    """
    was_training = model.training
    model.eval()
    meter = ClassificationMeter(num_classes)
    for images, labels in loader:
        logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        meter.update(logits, labels)
    model.train(was_training)
    return meter.compute()


def _save_adapter(model: SidetuneModel, directory: Path, classes: list[str], config: TrainConfig) -> None:
    model.save_adapter(directory)
    info = {
        "classes": classes,
        "augmentation": config.augmentation,
        "img_size": list(model.config.img_size),
        "seed": config.seed,  # a random backbone (weights=None) is rebuilt from the seed it was created with
    }
    tmp = directory / f".{INFERENCE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, directory / INFERENCE)


def _prefix(metrics: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    return {f"{prefix}_{k}": v for k, v in (metrics or {}).items() if k != "per_class"}


def fit(
    config: TrainConfig,
    *,
    train_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    test_dataset: Dataset | None = None,
    callback: Callback | None = None,
) -> TrainResult:
    """Train a classifier as ``config`` says, and write the run directory.

    Args:
        config: the run.
        train_dataset: optional datasets of ``(image tensor, label)`` used instead of ``config.data``
            (already transformed; ``classes`` attribute or ``config.num_classes`` required).
        val_dataset: optional validation dataset (with ``train_dataset``).
        test_dataset: optional test dataset (with ``train_dataset``).
        callback: progress hook, see :data:`Callback`.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: invalid settings (mixed precision the device lacks, an occupied output directory).
        DataError: missing, empty or inconsistent data.
        CheckpointError: ``resume`` points at nothing resumable, or at another model's checkpoint.
    """
    wall_start = time.perf_counter()
    callback = callback or (lambda event, record: None)
    out = Path(config.output).expanduser()
    on_cpu = config.cpu or not torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(config.mixed_precision, on_cpu)
    checkpoint = open_run(out, config.resume)
    state = PartialState(cpu=on_cpu)

    # -- model and data ---------------------------------------------------------------------------------------
    given = train_dataset is not None
    classes = classes_of(train_dataset, config.num_classes) if given else _scan_classes(config)
    _seed_everything(config.seed)
    model = create(
        config.backbone,
        config.method,
        num_classes=len(classes),
        weights=config.weights,
        img_size=config.img_size,
        backbone_kwargs=config.backbone_kwargs or None,
        head_dropout=config.head_dropout,
        **config.method_options,
    )
    if checkpoint is not None:  # before anything is written: a wrong checkpoint must not touch the output
        check_compatible(read_trainer_state(checkpoint).model, model, checkpoint)
    if train_dataset is not None:
        data = RunData(train_dataset, val_dataset, test_dataset, classes, source="datasets passed to fit()")
    else:
        data = build_run_data(config, model.data_config)
    train_set = SeededDataset(data.train, config.seed)

    ddp_kwargs = []
    if state.num_processes > 1:
        unused = unused_parameters(model, train_set)
        if unused:
            logger.info(
                "DDP: %d trainable tensors get no gradient (%s...): find_unused_parameters=True",
                len(unused),
                unused[:3],
            )
        ddp_kwargs.append(DistributedDataParallelKwargs(find_unused_parameters=bool(unused)))
    accelerator = make_accelerator(
        cpu=on_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        kwargs_handlers=ddp_kwargs,
        rng_types=[],  # the data order is a function of (seed, epoch): nothing to synchronise
    )
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / LOG, enabled=main)

    loader_kwargs = dict(num_workers=config.workers, pin_memory=not on_cpu, persistent_workers=False)
    train_loader, sampler = make_train_loader(
        train_set, config.batch_size, config.seed, accelerator.num_processes, **loader_kwargs
    )
    eval_bs = config.eval_batch_size or 2 * config.batch_size
    eval_loaders = {
        name: DataLoader(ds, batch_size=eval_bs, shuffle=False, **loader_kwargs)
        for name, ds in (("val", data.val), ("test", data.test))
        if ds is not None
    }
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}
    unwrapped: SidetuneModel = accelerator.unwrap_model(model)

    batches_per_epoch = len(train_loader)
    scheduler, run_facts = make_schedule(config, optimizer, batches_per_epoch, len(train_set), accelerator)
    steps_per_epoch, total_steps = run_facts["steps_per_epoch"], run_facts["total_steps"]

    # -- resume or start ------------------------------------------------------------------------------------
    tstate = start_or_resume(checkpoint, accelerator, unwrapped, optimizer, scheduler, run_facts, log, config.seed)
    if main:  # after the resume checks: a refused resume leaves the run's config as it was
        config.save(out / CONFIG)
    logger.info(
        "training %s/%s on %s: %d trainable parameters, %d steps (%d per epoch), %d process(es), %s, precision %s",
        config.backbone,
        config.method,
        data.source,
        unwrapped.num_parameters(),
        total_steps,
        steps_per_epoch,
        accelerator.num_processes,
        accelerator.device,
        mixed_precision,
    )
    callback("start", {"step": tstate.step, "total_steps": total_steps, "epoch": tstate.epoch})
    num_classes = len(classes)
    trainable = unwrapped.trainable_parameters()
    segment_start = time.perf_counter()
    step = tstate.step

    base_elapsed = tstate.elapsed_s

    def _elapsed() -> float:
        return base_elapsed + time.perf_counter() - segment_start

    def save_state(epoch: int, batch_in_epoch: int) -> None:
        tstate.step, tstate.epoch, tstate.batch_in_epoch, tstate.elapsed_s = step, epoch, batch_in_epoch, _elapsed()
        save_checkpoint(out, accelerator, unwrapped, optimizer, scheduler, tstate)

    for epoch in range(tstate.epoch, config.epochs):
        skip = tstate.batch_in_epoch if epoch == tstate.epoch else 0
        loader = epoch_loader(train_loader, sampler, train_set, epoch, skip)
        model.train()
        batch_in_epoch = skip
        # loss sum, correct, seen: accumulated on the device (no host sync per batch), reduced at the epoch end
        epoch_totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        window_loss, window_n, step_time, data_time = 0.0, 0, 0.0, 0.0
        t_data = time.perf_counter()
        for images, labels in loader:
            t_compute = time.perf_counter()
            data_time += t_compute - t_data
            if bool(((labels < 0) | (labels >= num_classes)).any()):
                raise DataError(
                    f"a training label ({labels.min().item()}..{labels.max().item()}) is outside the model's "
                    f"{num_classes} classes; check the labels or num_classes."
                )
            with accelerator.accumulate(model):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                accelerator.backward(loss)
                if config.clip_grad is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            detached = loss.detach()
            window_loss += detached
            window_n += 1
            epoch_totals[0] += detached.double() * len(labels)
            epoch_totals[1] += (logits.detach().argmax(-1) == labels).sum()
            epoch_totals[2] += len(labels)
            if accelerator.sync_gradients:
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                mean_loss = accelerator.reduce(
                    torch.as_tensor(window_loss / window_n, device=accelerator.device), "mean"
                )
                record = {
                    "type": "step",
                    "step": step,
                    "epoch": epoch,
                    "loss": float(mean_loss.item()),
                    "lr": lr,
                    "step_time": step_time + time.perf_counter() - t_compute,
                    "data_time": data_time,
                }
                log.write(record)
                callback("step", record)
                window_loss, window_n, step_time, data_time = 0.0, 0, 0.0, 0.0
                if (
                    config.save_every_steps
                    and step % config.save_every_steps == 0
                    and batch_in_epoch < batches_per_epoch
                ):
                    save_state(epoch, batch_in_epoch)
            else:
                step_time += time.perf_counter() - t_compute
            t_data = time.perf_counter()

        # -- end of epoch: train metrics, validation, adapters, resumable state --------------------------------
        loss_sum, correct, seen = accelerator.reduce(epoch_totals, "sum").tolist()
        record: dict[str, Any] = {
            "type": "epoch",
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / seen if seen else None,
            "train_top1": correct / seen if seen else None,
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": _elapsed(),
        }
        last_epoch = epoch + 1 == config.epochs
        if "val" in eval_loaders and ((epoch + 1) % config.eval_every == 0 or last_epoch):
            val = evaluate(model, eval_loaders["val"], accelerator, num_classes)
            record.update(_prefix(val, "val"), val_per_class=val["per_class"])
            if tstate.best_metric is None or val["top1"] > tstate.best_metric:
                tstate.best_metric, tstate.best_epoch = val["top1"], epoch + 1
                if main:
                    _save_adapter(unwrapped, out / "best", classes, config)
        if main:
            _save_adapter(unwrapped, out / "last", classes, config)
        log.write(record)
        callback("epoch", record)
        logger.info(
            "epoch %d/%d: train loss %.4f, train top-1 %.3f%s",
            epoch + 1,
            config.epochs,
            record["train_loss"] or float("nan"),
            record["train_top1"] or 0.0,
            f", val top-1 {record['val_top1']:.3f}" if record.get("val_top1") is not None else "",
        )
        save_state(epoch + 1, 0)
    accelerator.wait_for_everyone()

    # -- after training: agreement of processes, test, summary ------------------------------------------------
    checksum = _checksum(unwrapped)
    checksums = gather_object([checksum]) if accelerator.num_processes > 1 else [checksum]
    if len(set(checksums)) > 1:
        logger.error("the processes disagree on the trained weights: %s", checksums)
    chosen = "last"
    if tstate.best_epoch is not None and (out / "best" / ADAPTER_WEIGHTS).is_file():
        chosen = "best"
        accelerator.wait_for_everyone()
        tensors = load_file(str(out / "best" / ADAPTER_WEIGHTS))
        params = dict(unwrapped.named_trainable_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
    test = evaluate(model, eval_loaders["test"], accelerator, num_classes) if "test" in eval_loaders else None
    records = read_log(out / LOG) if main else []
    step_times = [r["step_time"] for r in records if r.get("type") == "step"]
    timed = step_times[3:] if len(step_times) > 10 else step_times  # the first steps warm up caches
    epochs_logged = [r for r in records if r.get("type") == "epoch"]
    final_val = next((r for r in reversed(epochs_logged) if r.get("val_top1") is not None), None)
    summary = {
        "config": config.to_dict(),
        "model": {
            "backbone": unwrapped.config.backbone,
            "method": unwrapped.config.method,
            "method_config": unwrapped.config.method_config,
            "img_size": list(unwrapped.config.img_size),
            "num_classes": num_classes,
            "trainable_parameters": unwrapped.num_parameters(),
            "total_parameters": unwrapped.num_parameters(trainable=False),
        },
        "data": {
            "source": data.source,
            **data.sizes(),
            "classes": classes,
            "splits": _split_names(config, train_dataset),
        },
        "metrics": {
            "final_train_loss": epochs_logged[-1]["train_loss"] if epochs_logged else None,
            "final_train_top1": epochs_logged[-1]["train_top1"] if epochs_logged else None,
            "best_val_top1": tstate.best_metric,
            "best_epoch": tstate.best_epoch,
            "final_val": {k[4:]: v for k, v in final_val.items() if k.startswith("val_")} if final_val else None,
            "test_checkpoint": chosen if test is not None else None,
            "test": test,
        },
        "timing": {
            "wall_time_s": time.perf_counter() - wall_start,
            "train_time_s": _elapsed(),
            "steps": step,
            "median_step_time_s": statistics.median(timed) if timed else None,
            "images_per_step": run_facts["images_per_step"],
            "steps_per_epoch": steps_per_epoch,
        },
        "memory": peak_memory(accelerator.device),
        "device": device_name(accelerator.device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": mixed_precision,
        "rank_checksums": checksums,
        "ranks_in_sync": len(set(checksums)) == 1,
        "versions": versions(),
        "git_commit": git_commit(),
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
    }
    if main:
        tmp = out / f".{SUMMARY}.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, out / SUMMARY)
        try:
            plot_curves(records, out / CURVES, title=f"{config.backbone} / {config.method}")
        except Exception as err:  # a plot must never cost a finished run
            logger.warning("could not draw %s: %s", out / CURVES, err)
    callback("end", summary)
    accelerator.wait_for_everyone()
    return TrainResult(output=out, summary=summary, model=unwrapped)


def _scan_classes(config: TrainConfig) -> list[str]:
    """Class names of the training split (a quick scan, no image decoded), to size the classifier."""
    if config.data is None:
        raise ConfigError("no data: set `data` (a folder, CSV or list file) or pass the datasets to fit().")
    train_split, _, _ = resolve_splits(config)
    dataset = build_classification_dataset(
        config.data, train_split, None, config.layout, num_classes=config.num_classes
    )
    if len(dataset) == 0:
        raise DataError(f"the training data at {dataset.root} holds no images.")
    return list(dataset.classes)


def _split_names(config: TrainConfig, given: Dataset | None) -> dict[str, Any] | None:
    if given is not None or config.data is None:
        return None
    train, val, test = resolve_splits(config)
    return {
        "train": train,
        "val": val if config.val_fraction is None else f"{config.val_fraction} of train",
        "test": test,
    }
