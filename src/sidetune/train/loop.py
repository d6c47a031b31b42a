"""The training loop, one for every task, on Hugging Face Accelerate.

:func:`fit` reads as the data flow: images -> the task's datasets -> model -> the task's loss -> AdamW step. What
differs between classification, segmentation and detection is the task object's (:mod:`sidetune.tasks`);
everything else is written once here: Accelerate set-up and precision, AdamW groups, warm-up + cosine schedule,
gradient accumulation, DDP (validation spread over processes too), the seeded data order and augmentation,
atomic checkpoints and exact mid-epoch resume, the JSONL log, best/last adapters, the summary and curves.

It runs on one CPU, one GPU, or several processes started by ``torchrun`` or ``accelerate launch`` (DDP; gloo
on CPUs). On the CPU a run is reproducible bit for bit: the same seed gives the same per-step losses, and a run
stopped mid-epoch and resumed gives the log (step and epoch records) of one that never stopped.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import DistributedDataParallelKwargs, PartialState
from accelerate.utils import gather_object, send_to_device
from safetensors.torch import load_file
from torch.utils.data import Dataset

from .. import create
from ..errors import ConfigError
from ..model import ADAPTER_WEIGHTS, SidetuneModel
from ..tasks import Task, TaskData, make_task
from ..tasks.base import inspect_data
from .checkpoint import (
    CheckpointError,
    TrainerState,
    check_compatible,
    disk_full,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from .config import TrainConfig
from .inputs import SeededDataset, classes_of, epoch_loader, make_eval_loader, make_train_loader
from .metrics import JsonlLog, device_name, git_commit, peak_memory, read_log, versions
from .plots import plot_curves
from .rundir import (
    CONFIG,
    CURVES,
    LOG,
    SUMMARY,
    RunLock,
    TrainingError,
    branch_run,
    check_finite,
    has_checkpoint,
    open_run,
    resumed_elsewhere,
    run_folder,
    save_adapter,
    write_json,
)
from .setup import (
    check_schedule,
    compile_side_network,
    make_accelerator,
    make_optimizer,
    make_schedule,
    resolve_mixed_precision,
    unused_parameters,
)

logger = logging.getLogger(__name__)

#: ``callback(event, record)``: events ``"start"`` (record has ``step``, ``total_steps``, ``epoch``, ``classes``),
#: ``"step"`` (a step record of the log), ``"epoch"`` (an epoch record) and ``"end"`` (the summary). Called on every
#: process.
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


def fit(
    config: TrainConfig,
    *,
    train_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    test_dataset: Dataset | None = None,
    callback: Callback | None = None,
) -> TrainResult:
    """Train a model as ``config`` says (any task), and write the run directory (:mod:`sidetune.train.rundir`).

    Args:
        config: the run.
        train_dataset: optional training dataset used instead of ``config.data``, already transformed, with a
            ``classes`` attribute (classification: or ``config.num_classes``); samples as the task's datasets give
            them (classification ``(image, label)``, segmentation ``(image, mask)``, detection ``(image, target)``).
        val_dataset: optional validation dataset (with ``train_dataset``).
        test_dataset: optional test dataset (with ``train_dataset``), scored once with the best checkpoint.
        callback: progress hook, see :data:`Callback`.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: invalid settings (no data, mixed precision the device lacks, an occupied or locked output
            directory).
        DataError: missing, empty or inconsistent data.
        CheckpointError: ``resume`` points at nothing resumable, at another model's or schedule's checkpoint, or
            the disk is full.
        TrainingError: the loss became non-finite (nothing non-finite is saved).
    """
    out = Path(config.output).expanduser()
    on_cpu = config.cpu or not torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(config.mixed_precision, on_cpu)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    state = PartialState(cpu=on_cpu)
    lock = RunLock(out).acquire() if state.is_main_process else None
    try:
        checkpoint = open_run(out, config.resume) if state.is_main_process else _resume_point(config)
        return _fit(config, out, mixed_precision, on_cpu, checkpoint, train_dataset, val_dataset, test_dataset,
                    callback or (lambda event, record: None))  # fmt: skip
    except OSError as err:  # the log, an adapter or the summary (a checkpoint says so itself, see save_checkpoint)
        if not _run_disk_full(err, out):
            raise
        kept = (
            f"the last checkpoint is intact: free some space and resume with --resume {out}"
            if has_checkpoint(out)
            else f"no checkpoint was saved yet: free some space and start again with --resume {out}"
        )
        raise CheckpointError(
            f"the disk holding {str(out)!r} is full ({err.filename or 'writing a run file failed'}); {kept}."
        ) from None
    finally:
        if lock is not None:
            lock.release()


def _run_disk_full(err: OSError, out: Path) -> bool:
    """Whether ``err`` is the run folder's disk running out of space (not, say, a data worker's ``/dev/shm``)."""
    if not disk_full(err):
        return False
    if err.filename is not None:
        return Path(str(err.filename)).resolve().is_relative_to(out.resolve())
    return shutil.disk_usage(out).free < 64 * 2**20  # no file named: trust it only when the run's disk is nearly full


def _resume_point(config: TrainConfig) -> Path | None:
    """The checkpoint a non-main process resumes from (the main process decided whether there is one)."""
    from .checkpoint import CheckpointError, find_checkpoint

    if config.resume is None:
        return None
    try:
        return find_checkpoint(config.resume)
    except CheckpointError:
        return None


def _fit(
    config: TrainConfig,
    out: Path,
    mixed_precision: str,
    on_cpu: bool,
    checkpoint: Path | None,
    train_dataset: Dataset | None,
    val_dataset: Dataset | None,
    test_dataset: Dataset | None,
    callback: Callback,
) -> TrainResult:
    wall_start = time.perf_counter()
    task = make_task(config.task, config.task_options)

    # -- model and data: the task sizes the head, builds its datasets and transforms ---------------------------
    given = train_dataset is not None
    classes = classes_of(train_dataset, config.num_classes) if given else task.scan_classes(config)
    _seed_everything(config.seed)
    model = create(
        config.backbone,
        config.method,
        num_classes=len(classes),
        weights=config.weights,
        img_size=config.img_size,
        backbone_kwargs=config.backbone_kwargs or None,
        **task.model_kwargs(config),
        **config.method_options,
    )
    if checkpoint is not None:  # before anything is written: a wrong checkpoint must not touch the output
        check_compatible(read_trainer_state(checkpoint).model, model, checkpoint)
    if config.compile:
        compile_side_network(model)
    if given:
        if config.cache is not None:
            raise ConfigError("give a tap cache (cache=) or datasets to fit(), not both.")
        data = TaskData(train_dataset, val_dataset, test_dataset, classes, source="datasets passed to fit()")
        inspect_data(data)  # datasets of sidetune.data are counted and checked; others are taken as they are
        task.prepare(data)
    elif config.cache is not None:  # the taps of every image come from disk: the backbone never runs
        from ..cache.reader import open_cache

        data = open_cache(config, model, task, mixed_precision)
    else:
        data = task.build_data(config, model)
    data_warnings = [w["message"] for w in data.warnings]
    for warning in data_warnings:
        logger.warning("data: %s", warning)
    if data.skipped:
        logger.warning("data: %d file(s) skipped while reading (listed in summary.json)", len(data.skipped))
    train_set = SeededDataset(data.train, config.seed)  # sample i of epoch e: augmented from (seed, e, i)

    # -- Accelerate, loaders, optimizer, schedule --------------------------------------------------------------
    ddp_kwargs = []
    if PartialState().num_processes > 1:
        unused = unused_parameters(model, task, train_set)
        if unused:
            logger.info("DDP: %d trainable tensors get no gradient (%s...): find_unused", len(unused), unused[:3])
        ddp_kwargs.append(DistributedDataParallelKwargs(find_unused_parameters=bool(unused)))
    accelerator = make_accelerator(
        mixed_precision,
        cpu=on_cpu,
        gradient_accumulation_steps=config.grad_accum,
        kwargs_handlers=ddp_kwargs,
        rng_types=[],  # the data order is a function of (seed, epoch): nothing to synchronise
    )
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / LOG, enabled=main)
    train_loader, sampler = make_train_loader(
        train_set, config.batch_size, config.seed, accelerator.num_processes, num_workers=config.workers,
        collate_fn=data.collate or task.collate, pin_memory=not on_cpu,
    )  # fmt: skip
    optimizer = make_optimizer(model, config)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    unwrapped: SidetuneModel = accelerator.unwrap_model(model)
    batches_per_epoch = len(train_loader)
    scheduler, run_facts = make_schedule(config, optimizer, batches_per_epoch, len(train_set), accelerator)
    steps_per_epoch, total_steps = run_facts["steps_per_epoch"], run_facts["total_steps"]

    def evaluate(dataset: Dataset) -> dict[str, Any]:
        return evaluate_split(task, unwrapped, dataset, data.classes, accelerator, eval_batch, config.workers,
                              collate=data.eval_collate)  # fmt: skip

    eval_batch = config.eval_batch_size or task.eval_batch_factor * config.batch_size

    # -- resume or start ----------------------------------------------------------------------------------------
    if checkpoint is None:
        _seed_everything(config.seed + 1009 * accelerator.process_index)  # dropout differs across processes
        tstate = TrainerState(model=asdict(unwrapped.config), run=run_facts)
    else:
        check_schedule(read_trainer_state(checkpoint).run, run_facts, checkpoint)
        tstate = load_checkpoint(checkpoint, accelerator, unwrapped, optimizer, scheduler)
        tstate.model, tstate.run = asdict(unwrapped.config), run_facts
        if resumed_elsewhere(checkpoint, out):  # another run's checkpoint: continue it here, leave it as it is
            if run_folder(checkpoint) is None:  # a loose checkpoint folder: no best/ to go with its best score
                tstate.best_metric = tstate.best_epoch = None
            save_checkpoint(out, accelerator, unwrapped, optimizer, scheduler, tstate)  # this folder resumes alone
            if main:
                branch_run(checkpoint, out, tstate.step)
        log.truncate_after(tstate.step)  # records of the segment that died after this checkpoint
    if main:  # after the resume checks: a refused resume leaves the run's config as it was
        config.save(out / CONFIG)
    logger.info(
        "training %s %s/%s on %s: %d trainable parameters, %d steps (%d per epoch), %d process(es), %s, %s",
        task.name, config.backbone, config.method, data.source, unwrapped.num_parameters(), total_steps,
        steps_per_epoch, accelerator.num_processes, accelerator.device, mixed_precision,
    )  # fmt: skip
    callback("start", {"step": tstate.step, "total_steps": total_steps, "epoch": tstate.epoch,
                       "classes": list(data.classes)})  # fmt: skip
    trainable = unwrapped.trainable_parameters()
    info = _inference_info(task, config, data.classes, unwrapped, mixed_precision)
    step, segment_start, base_elapsed = tstate.step, time.perf_counter(), tstate.elapsed_s

    def elapsed() -> float:
        return base_elapsed + time.perf_counter() - segment_start

    def save_state(epoch: int, batch_in_epoch: int, totals: EpochTotals | None) -> None:
        tstate.step, tstate.epoch, tstate.batch_in_epoch, tstate.elapsed_s = step, epoch, batch_in_epoch, elapsed()
        tstate.epoch_sums = totals.reduced(accelerator) if totals is not None else {}
        check_finite(unwrapped, f"the checkpoint of step {step}")
        save_checkpoint(out, accelerator, unwrapped, optimizer, scheduler, tstate)

    # -- the epochs -----------------------------------------------------------------------------------------------
    for epoch in range(tstate.epoch, config.epochs):
        skip = tstate.batch_in_epoch if epoch == tstate.epoch else 0
        loader = epoch_loader(train_loader, sampler, train_set, epoch, skip)
        model.train()
        # the epoch's running sums (on the device, no host sync per batch); a mid-epoch resume starts from the
        # sums the checkpoint saved, so the epoch record covers the whole epoch
        totals = EpochTotals(accelerator.device, tstate.epoch_sums if skip and main else None)
        window, step_time, data_time, bad_window = EpochTotals(accelerator.device), 0.0, 0.0, False
        batch_in_epoch = skip
        t_data = time.perf_counter()
        for batch in loader:
            t_compute = time.perf_counter()
            data_time += t_compute - t_data
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    output = task.step(model, batch)
                finite = _all_finite(output.loss, accelerator)
                if finite:
                    accelerator.backward(output.loss)  # scaled by 1 / grad_accum
                bad_window |= not finite
                if accelerator.sync_gradients and not bad_window:
                    if config.clip_grad is not None:
                        accelerator.clip_grad_norm_(trainable, config.clip_grad)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # a no-op until the last micro-batch of the step
            batch_in_epoch += 1
            if finite:
                totals.add(output)
            window.add(output)
            if not accelerator.sync_gradients:
                step_time += time.perf_counter() - t_compute
                t_data = time.perf_counter()
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            means = window.means(accelerator)
            record = {"type": "step", "step": step, "epoch": epoch + 1, **means, "lr": lr,
                      "step_time_s": step_time + time.perf_counter() - t_compute, "data_time_s": data_time}  # fmt: skip
            if bad_window:
                tstate.nonfinite_steps += 1
                record["skipped"] = "non-finite loss"
                if tstate.nonfinite_steps > config.nonfinite_patience:
                    log.write(record)
                    raise TrainingError(
                        f"the loss became non-finite ({means.get('loss')}) at step {step} (epoch {epoch + 1}); "
                        f"{tstate.nonfinite_steps} step(s) skipped, --nonfinite-patience is "
                        f"{config.nonfinite_patience}. Nothing of this step was saved. Lower --lr or set --clip-grad, "
                        "then start again (or --resume from the last good checkpoint)."
                    )
                logger.warning("step %d: non-finite loss, optimizer step skipped", step)
            log.write(record)
            callback("step", record)
            window, step_time, data_time, bad_window = EpochTotals(accelerator.device), 0.0, 0.0, False
            if config.save_every_steps and step % config.save_every_steps == 0 and batch_in_epoch < batches_per_epoch:
                save_state(epoch, batch_in_epoch, totals)
            t_data = time.perf_counter()

        # -- end of epoch: train metrics, validation, adapters, resumable state ----------------------------------
        record = {
            "type": "epoch",
            "epoch": epoch + 1,
            "step": step,
            **epoch_record(task, totals.reduced(accelerator)),
            "lr": scheduler.get_last_lr()[0],
        }
        if data.val is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            val = evaluate(data.val)
            record.update({f"val_{k}": v for k, v in val.items()})
            score = task.score(val)
            if score is not None and (tstate.best_metric is None or score > tstate.best_metric):
                tstate.best_metric, tstate.best_epoch = score, epoch + 1
                if main:
                    save_adapter(unwrapped, out / "best", info)
        if main:
            save_adapter(unwrapped, out / "last", info)
        record["elapsed_s"] = elapsed()
        log.write(record)
        callback("epoch", record)
        save_state(epoch + 1, 0, None)
    accelerator.wait_for_everyone()

    # -- after training: the processes agree, the best adapter is scored on test once ----------------------------
    checksum = _checksum(unwrapped)
    checksums = gather_object([checksum]) if accelerator.num_processes > 1 else [checksum]
    if len(set(checksums)) > 1:
        logger.error("the processes disagree on the trained weights: %s", checksums)
    if main and tstate.best_epoch is None:  # no validation (or nothing measurable): best is last
        save_adapter(unwrapped, out / "best", info)
    if main and not (out / "last").is_dir():  # a finished loose checkpoint continued here: nothing was trained
        save_adapter(unwrapped, out / "last", info)
    accelerator.wait_for_everyone()
    chosen = "best" if tstate.best_epoch is not None else "last"
    if tstate.best_epoch is not None and tstate.best_epoch != config.epochs:
        _load_trainable(unwrapped, out / "best")
    test = evaluate(data.test) if data.test is not None else None

    records = read_log(out / LOG) if main else []
    summary = _summary(config, task, unwrapped, data, data_warnings, records, tstate, test, chosen, run_facts)
    summary.update(
        timing=dict(summary["timing"], wall_time_s=time.perf_counter() - wall_start, train_time_s=elapsed()),
        memory=peak_memory(accelerator.device),
        device=device_name(accelerator.device),
        num_processes=accelerator.num_processes,
        mixed_precision=mixed_precision,
        rank_checksums=checksums,
        ranks_in_sync=len(set(checksums)) == 1,
        resumed_from=str(checkpoint) if checkpoint is not None else None,
    )
    judged = test if test is not None else summary["metrics"]["final_val"]
    collapse = task.collapse_warnings(judged, data.classes) if judged else []
    for warning in collapse:  # recorded in the summary (and printed by the CLI)
        logger.info("%s: %s", "test" if test is not None else "validation", warning)
    summary["metrics"]["collapsed"] = bool(collapse)
    summary["warnings"] = [*data_warnings, *collapse]
    if main:
        write_json(out / SUMMARY, summary)
        try:
            plot_curves(records, out / CURVES, title=f"{config.backbone} / {config.method}", metric=task.headline)
        except Exception as err:  # a plot must never cost a finished run
            logger.warning("could not draw %s: %s", out / CURVES, err)
    callback("end", summary)
    accelerator.wait_for_everyone()
    return TrainResult(output=out, summary=summary, model=unwrapped)


class EpochTotals:
    """Sample-weighted sums of a task's step outputs over an epoch (or a window): loss, loss parts, statistics.

    Kept on the device as 0-d tensors (no host sync per batch). Keys: ``count`` (samples), ``loss`` and the
    loss parts (each summed times the micro-batch's sample count), and ``stat_<name>`` for the task's
    :attr:`~sidetune.tasks.StepOutput.sums`. :meth:`reduced` sums them over processes, as floats.
    """

    def __init__(self, device: torch.device, start: dict[str, float] | None = None) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {
            k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in (start or {}).items()
        }

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(self.device, torch.float64)
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def add(self, output) -> None:
        n = torch.tensor(float(output.count), dtype=torch.float64, device=self.device)
        self._add("count", n)
        for name, value in {"loss": output.loss, **output.parts}.items():
            self._add(name, value.detach() * n)
        for name, value in output.sums.items():
            self._add(f"stat_{name}", value)

    @property
    def parts(self) -> list[str]:
        """``loss`` first, then the loss parts."""
        return sorted(
            (k for k in self.sums if k != "count" and not k.startswith("stat_")), key=lambda k: (k != "loss", k)
        )

    def means(self, accelerator) -> dict[str, float]:
        """The window's sample-weighted mean loss and loss parts, averaged over processes (a step record)."""
        names = self.parts
        if not names:
            return {}
        values = torch.stack([self.sums[k] / self.sums["count"] for k in names]).float()
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, "mean")
        return dict(zip(names, values.tolist(), strict=True))

    def reduced(self, accelerator) -> dict[str, float]:
        """Every sum over all processes, as floats (what a checkpoint saves, and what an epoch record reads)."""
        names = sorted(self.sums)
        if not names:
            return {}
        values = torch.stack([self.sums[k] for k in names])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, "sum")
        return dict(zip(names, values.tolist(), strict=True))


def epoch_record(task: Task, sums: dict[str, float]) -> dict[str, Any]:
    """The training part of an epoch record from :meth:`EpochTotals.reduced`: ``train_loss``, ``train_<part>``,
    and the task's training metrics (``train_top1``)."""
    count = sums.get("count", 0.0)
    parts = {f"train_{k}": v / count for k, v in sums.items() if k != "count" and not k.startswith("stat_") and count}
    stats = {k[5:]: v for k, v in sums.items() if k.startswith("stat_")}
    return {"train_loss": None, **parts, **{f"train_{k}": v for k, v in task.train_metrics(stats, count).items()}}


@torch.no_grad()
def evaluate_split(
    task: Task,
    model: SidetuneModel,
    dataset: Dataset,
    classes: list[str],
    accelerator,
    batch_size: int,
    workers: int = 0,
    collate=None,
) -> dict[str, Any]:
    """The task's metrics of ``model`` on ``dataset``, each process scoring its own shard, merged exactly.

    Runs under the run's autocast, on the unwrapped model (processes may run different numbers of batches).
    """
    was_training = model.training
    model.eval()
    evaluator = task.evaluator(model, dataset, classes)
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = make_eval_loader(dataset, batch_size, rank, world, collate or task.eval_collate, workers)
    try:
        for batch in loader:
            with accelerator.autocast():
                evaluator.update(model, send_to_device(batch, accelerator.device))
    finally:
        model.train(was_training)
    states = gather_object([evaluator.state()]) if world > 1 else [evaluator.state()]
    metrics = evaluator.compute(states)
    metrics["count"] = len(dataset)
    return metrics


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (they must agree to skip a step together)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return not bool(bad.item())


def _inference_info(task: Task, config: TrainConfig, classes: list[str], model: SidetuneModel, precision: str):
    """``inference.json``: what eval and predict need to reproduce the run's numbers."""
    return {
        "task": task.name,
        "classes": classes,
        "img_size": list(model.config.img_size),
        "seed": config.seed,  # a random backbone (weights=None) is rebuilt from the seed it was created with
        "mixed_precision": precision,
        "task_options": dict(config.task_options),
        **task.inference_info(config),
    }


def _summary(config, task, model, data, data_warnings, records, tstate, test, chosen, run_facts) -> dict[str, Any]:
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    times = [r["step_time_s"] for r in steps]
    timed = times[3:] if len(times) > 10 else times  # the first steps warm up caches
    final_val = next((r for r in reversed(epochs) if f"val_{task.headline}" in r), None)
    last = epochs[-1] if epochs else {}
    return {
        "task": task.name,
        "config": config.to_dict(),
        "model": {
            "backbone": model.config.backbone,
            "method": model.config.method,
            "method_config": model.config.method_config,
            "img_size": list(model.config.img_size),
            "num_classes": len(data.classes),
            "trainable_parameters": model.num_parameters(),
            "total_parameters": model.num_parameters(trainable=False),
        },
        "data": {
            "source": data.source,
            **data.sizes(),
            "classes": data.classes,
            "splits": data.splits,
            "skipped": len(data.skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in data.skipped],
            "warnings": data_warnings,
            "warning_codes": sorted({w["code"] for w in data.warnings}),
            "class_counts": data.counts.to_dict() if data.counts is not None else None,
        },
        "metrics": {
            "headline": task.headline,
            "best_val": tstate.best_metric,
            "best_epoch": tstate.best_epoch,
            "final_train_loss": last.get("train_loss"),
            "final_train": {k[6:]: v for k, v in last.items() if k.startswith("train_")} or None,
            "final_val": {k[4:]: v for k, v in final_val.items() if k.startswith("val_")} if final_val else None,
            "test_checkpoint": chosen if test is not None else None,
            "test": test,
            "nonfinite_steps": tstate.nonfinite_steps,
        },
        "timing": {
            "steps": tstate.step,
            "median_step_time_s": statistics.median(timed) if timed else None,
            "images_per_step": run_facts["images_per_step"],
            "steps_per_epoch": run_facts["steps_per_epoch"],
            "grad_accum": config.grad_accum,
        },
        "versions": versions(),
        "git_commit": git_commit(),
    }


def _load_trainable(model: SidetuneModel, directory: Path) -> None:
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    params = dict(model.named_trainable_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device))


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
