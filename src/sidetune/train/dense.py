"""Training, evaluation and prediction for the dense tasks: segmentation, detection and instance segmentation.

:func:`fit_dense` is the dense counterpart of :func:`sidetune.train.fit` and writes the same kind of run
directory (``log.jsonl``, ``summary.json``, ``best/`` and ``last/`` adapters with ``inference.json``,
``train_config.json``), reusing the classification loop's schedule (:class:`~sidetune.train.WarmupCosine`),
AdamW groups, precision rules, JSONL log and summary facts.

* segmentation: pixel cross-entropy (:func:`~sidetune.heads.segmentation_loss`) on scale-jittered crops of the
  model's size; validation predicts at each image's own resolution (whole-image resize or sliding window) and
  reports mIoU, mAcc, aAcc and per-class IoU (:class:`~sidetune.tasks.SegmentationMetrics`); the best
  checkpoint is the highest mIoU.
* detection / instance: the torchvision detector's summed losses on large-scale-jittered crops; validation runs
  COCOeval (:class:`~sidetune.tasks.CocoEvaluator`, boxes and, for ``instance``, masks); the best checkpoint is
  the highest box mAP@[.5:.95].

Resumable and reproducible as the classification loop is, through the same functions: the data order of epoch ``e``
depends on ``(seed, e)`` alone (:class:`~sidetune.train.inputs.EpochSampler`), each sample's augmentation on
``(seed, e, i)`` (:class:`~sidetune.train.inputs.SeededDataset`), and ``checkpoints/`` holds the atomic resumable
state (:mod:`sidetune.train.checkpoint`: trainable tensors, AdamW, schedule, position, RNG states) written at each
epoch end and every ``save_every_steps`` optimizer steps; ``resume=`` continues a run, mid-epoch included, with
the losses of a run that never stopped (on the CPU). ``grad_accum`` micro-batches make one optimizer step
(``Accelerator.accumulate``). Not supported here, unlike the classification loop: validation spread over several
processes (under DDP the main process validates alone while the others wait).

Command line: ``sidetune train --task segmentation|detection|instance`` (see :func:`main` for the standalone
parser, ``python -m sidetune.train.dense train|eval|predict ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from .. import create
from ..data import (
    CocoDetectionDataset,
    DataError,
    MaskFolderDataset,
    VOCDetectionDataset,
    build_detection_transforms,
    build_segmentation_dataset,
    build_segmentation_transforms,
    detection_collate,
    load_rgb,
    to_coco,
)
from ..data.classification import IMG_EXTENSIONS
from ..errors import ConfigError
from ..heads import predict_segmentation, segmentation_loss
from ..model import SidetuneModel
from ..tasks import CocoEvaluator, SegmentationMetrics
from .checkpoint import check_compatible, read_trainer_state, save_checkpoint
from .config import _check_int
from .inference import INFERENCE, load_for_inference
from .inputs import SeededDataset
from .loop import (
    LOG,
    SUMMARY,
    Callback,
    _seed_everything,
    epoch_loader,
    make_accelerator,
    make_schedule,
    make_train_loader,
    open_run,
    param_groups,
    resolve_mixed_precision,
    start_or_resume,
)
from .loop import TrainResult as TrainResult
from .metrics import JsonlLog, _finite, device_name, git_commit, peak_memory, read_log, versions

logger = logging.getLogger(__name__)

DENSE_TASKS = ("segmentation", "detection", "instance")
SEG_LAYOUTS = ("auto", "camvid", "segnet", "ade20k", "voc", "masks")
DET_LAYOUTS = ("auto", "voc", "coco")
CONFIG = "train_config.json"  # classification writes YAML (its configs may come from YAML files)


@dataclass
class DenseConfig:
    """One dense training run (the fields mirror :class:`~sidetune.train.TrainConfig` where they overlap).

    Attributes:
        task: ``segmentation``, ``detection`` or ``instance``.
        data: dataset root (SegNet/CamVid, ADE20K, VOC or mask folder; VOC XML or COCO for detection).
        layout: see :data:`SEG_LAYOUTS` / :data:`DET_LAYOUTS`; ``auto`` guesses from the folder.
        head_options: ``create(head_options=...)`` (``channels`` for UPerNet; ``detector``, ``fpn_channels``...).
        eval_mode: segmentation inference at full resolution: ``whole`` (resize) or ``slide`` (windows).
        train_limit / val_limit: use only the first N images of a split (quick runs); None: all.
        grad_accum: micro-batches (of ``batch_size`` images per process) per optimizer step.
        save_every_steps: also save the resumable state every this many optimizer steps (0: at epoch ends only).
        resume: a run directory (its newest checkpoint) or a checkpoint folder to continue from, or None.
    """

    backbone: str = ""
    method: str = ""
    task: str = "segmentation"
    data: str | None = None
    layout: str = "auto"
    weights: str | None = None
    img_size: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head_options: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str | None = None
    train_limit: int | None = None
    val_limit: int | None = None
    epochs: int = 10
    batch_size: int = 8
    eval_batch_size: int | None = None
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_accum: int = 1
    clip_grad: float | None = None
    mixed_precision: str = "auto"
    eval_every: int = 1
    eval_mode: str = "whole"
    save_every_steps: int = 0
    seed: int = 0
    workers: int = 0
    cpu: bool = False
    output: str = "runs/dense"
    resume: str | None = None

    def __post_init__(self) -> None:
        if self.task not in DENSE_TASKS:
            raise ConfigError(f"unknown dense task {self.task!r}; choose from {DENSE_TASKS}.")
        if self.eval_mode not in ("whole", "slide"):
            raise ConfigError(f"eval_mode must be 'whole' or 'slide', got {self.eval_mode!r}.")
        for name in ("epochs", "batch_size", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        _check_int("grad_accum", self.grad_accum, minimum=1)
        _check_int("save_every_steps", self.save_every_steps, minimum=0)
        for name in ("output", "resume"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))


# -- data ------------------------------------------------------------------------------------------------------


def build_dense_dataset(
    task: str,
    root: str | os.PathLike,
    split: str,
    *,
    layout: str = "auto",
    train: bool = False,
    img_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    limit: int | None = None,
) -> Dataset:
    """The split of a dense dataset with the training or evaluation transform of :mod:`sidetune.data`.

    Segmentation layouts: ``camvid``/``segnet`` (``split/`` + ``splitannot/``), ``ade20k``, ``voc``, ``masks``
    (``images/<split>/`` + ``masks/<split>/`` single-channel PNGs, class names one a line in ``classes.txt``,
    255 ignored). Detection layouts: ``voc`` (``JPEGImages``, ``Annotations``, ``ImageSets/Main/<split>.txt``)
    and ``coco`` (``<split>/`` images + ``annotations/instances_<split>.json``).

    Segmentation evaluation keeps each image's size (scored at full resolution); detection images stay in
    ``[0, 1]`` (the detector normalises).
    """
    root = Path(root).expanduser()
    if task == "segmentation":
        if img_size is None or mean is None or std is None:
            raise ConfigError("segmentation datasets need img_size, mean and std for their transform.")
        transform = build_segmentation_transforms(img_size, train=train, mean=mean, std=std, resize_eval=False)
        if layout == "masks":
            classes_file = root / "classes.txt"
            if not classes_file.is_file():
                raise DataError(f"layout 'masks' needs {classes_file} (one class name a line).")
            classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
            dataset: Dataset = MaskFolderDataset(root / "images" / split, root / "masks" / split, classes, transform)
        else:
            if layout not in SEG_LAYOUTS:
                raise ConfigError(f"unknown segmentation layout {layout!r}; choose from {SEG_LAYOUTS}.")
            name = "segnet" if layout == "camvid" else layout
            dataset = build_segmentation_dataset(root, split, transform, layout=name)  # type: ignore[arg-type]
    elif task in ("detection", "instance"):
        transform = build_detection_transforms(train=train, img_size=img_size if train else None)
        if layout == "auto":
            layout = "voc" if (root / "Annotations").is_dir() else "coco"
        if layout == "voc":
            if task == "instance":
                raise ConfigError("instance segmentation needs masks: use a COCO layout (--layout coco).")
            dataset = VOCDetectionDataset(root, split, transform)
        elif layout == "coco":
            ann = root / "annotations" / f"instances_{split}.json"
            dataset = CocoDetectionDataset(root / split, ann, transform, masks=task == "instance")
        else:
            raise ConfigError(f"unknown detection layout {layout!r}; choose from {DET_LAYOUTS}.")
    else:
        raise ConfigError(f"unknown dense task {task!r}; choose from {DENSE_TASKS}.")
    if limit is not None and limit < len(dataset):
        dataset = _limited(dataset, limit)
    return dataset


def _limited(dataset: Dataset, limit: int) -> Subset:
    subset = Subset(dataset, range(limit))
    subset.classes = dataset.classes  # type: ignore[attr-defined]
    return subset


def _classes(dataset: Dataset) -> list[str]:
    classes = getattr(dataset, "classes", None)
    if classes is None and isinstance(dataset, Subset):
        classes = getattr(dataset.dataset, "classes", None)
    if classes is None:
        raise ConfigError("dense datasets passed to fit_dense need a `classes` attribute (the K class names).")
    return list(classes)


def _list_collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def _stack_collate(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


# -- evaluation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_dense(
    model: SidetuneModel,
    dataset: Dataset,
    *,
    batch_size: int = 4,
    workers: int = 0,
    device: torch.device | str | None = None,
    mode: str = "whole",
) -> dict[str, Any]:
    """Metrics of ``model`` on a dense ``dataset`` (built by :func:`build_dense_dataset` with ``train=False``).

    Segmentation: ``mIoU``, ``mAcc``, ``aAcc`` and ``IoU`` (class name -> IoU) at the masks' own resolution
    (``mode`` ``whole`` or ``slide``, :func:`~sidetune.heads.predict_segmentation`). Detection: COCO
    ``bbox_mAP``, ``bbox_mAP_50``, ... (and ``segm_*`` for instance segmentation). Plus ``count``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    classes = _classes(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_list_collate)
    try:
        if model.config.task == "segmentation":
            metrics = SegmentationMetrics(len(classes), class_names=classes)
            size = tuple(model.config.img_size)
            for images, masks in loader:
                for group in _same_size_groups(images):
                    x = torch.stack([images[i] for i in group]).to(device)
                    logits = predict_segmentation(model, x, size, mode=mode)
                    metrics.update(logits.argmax(1).cpu(), torch.stack([masks[i] for i in group]))
            result: dict[str, Any] = metrics.compute()
        else:
            iou_types = ("bbox", "segm") if model.config.task == "instance" else ("bbox",)
            evaluator = CocoEvaluator(to_coco(dataset), iou_types=iou_types)
            for images, targets in loader:
                outputs = model([im.as_subclass(torch.Tensor).to(device) for im in images])
                evaluator.update([{k: v.cpu() for k, v in o.items()} for o in outputs], targets)
            result = evaluator.compute()
    finally:
        model.train(was_training)
    result["count"] = len(dataset)
    return result


def _same_size_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return list(groups.values())


def headline(task: str, metrics: dict[str, Any] | None) -> float | None:
    """The number a run is judged by: mIoU (segmentation) or box mAP@[.5:.95] (detection, instance)."""
    if not metrics:
        return None
    value = metrics.get("mIoU") if task == "segmentation" else metrics.get("bbox_mAP")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _flat(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}_{k}": v for k, v in metrics.items() if not isinstance(v, dict)}


# -- training --------------------------------------------------------------------------------------------------


def _save_adapter(model: SidetuneModel, directory: Path, classes: list[str], config: DenseConfig) -> None:
    model.save_adapter(directory)
    info = {
        "task": config.task,
        "classes": classes,
        "img_size": list(model.config.img_size),
        "seed": config.seed,  # a random backbone (weights=None) is rebuilt from the seed it was created with
        "layout": config.layout,
        "eval_mode": config.eval_mode,
    }
    tmp = directory / f".{INFERENCE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, directory / INFERENCE)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(_finite(data), indent=2, default=str) + "\n")  # NaN (an absent class) -> null
    os.replace(tmp, path)


def fit_dense(
    config: DenseConfig,
    *,
    train_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    test_dataset: Dataset | None = None,
    callback: Callback | None = None,
) -> TrainResult:
    """Train a segmentation, detection or instance model as ``config`` says, and write the run directory.

    Args:
        config: the run.
        train_dataset: optional training dataset used instead of ``config.data`` (with its transform already set;
            needs ``classes``).
        val_dataset: optional validation dataset (evaluation transform).
        test_dataset: optional test dataset, evaluated once with the best checkpoint.
        callback: ``callback(event, record)`` with events ``start``, ``step``, ``epoch``, ``end``.

    Returns:
        A :class:`~sidetune.train.TrainResult` (the model holds the best checkpoint when there was validation).
    """
    wall_start = time.perf_counter()
    callback = callback or (lambda event, record: None)
    out = Path(config.output).expanduser()
    on_cpu = config.cpu or not torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(config.mixed_precision, on_cpu)
    checkpoint = open_run(out, config.resume)
    PartialState(cpu=on_cpu)
    task = config.task

    # -- model and data ----------------------------------------------------------------------------------------
    if train_dataset is None:
        if config.data is None:
            raise ConfigError("no data: set `data` (the dataset root) or pass the datasets to fit_dense().")
        probe = build_dense_dataset(
            task, config.data, config.train_split, layout=config.layout, img_size=config.img_size or 224,
            mean=(0, 0, 0), std=(1, 1, 1),
        )  # fmt: skip
        classes = _classes(probe)
    else:
        classes = _classes(train_dataset)
    _seed_everything(config.seed)
    model = create(
        config.backbone,
        config.method,
        task=task,
        num_classes=len(classes),
        weights=config.weights,
        img_size=config.img_size,
        backbone_kwargs=config.backbone_kwargs or None,
        head_options=dict(config.head_options) or None,
        **config.method_options,
    )
    if checkpoint is not None:  # before anything is written: a wrong checkpoint must not touch the output
        check_compatible(read_trainer_state(checkpoint).model, model, checkpoint)
    size = tuple(model.config.img_size)
    dc = model.data_config
    if train_dataset is None:
        kw = dict(layout=config.layout, img_size=size, mean=dc["mean"], std=dc["std"])
        train_dataset = build_dense_dataset(
            task, config.data, config.train_split, train=True, limit=config.train_limit, **kw
        )
        if config.val_split:
            val_dataset = build_dense_dataset(task, config.data, config.val_split, limit=config.val_limit, **kw)
        if config.test_split:
            test_dataset = build_dense_dataset(task, config.data, config.test_split, **kw)
    train_set = SeededDataset(train_dataset, config.seed)  # sample i of epoch e: augmented from (seed, e, i)

    accelerator = make_accelerator(
        mixed_precision, cpu=on_cpu, gradient_accumulation_steps=config.grad_accum, rng_types=[]
    )
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / LOG, enabled=main)
    collate = _stack_collate if task == "segmentation" else detection_collate
    train_loader, sampler = make_train_loader(
        train_set, config.batch_size, config.seed, accelerator.num_processes, num_workers=config.workers,
        collate_fn=collate,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    unwrapped: SidetuneModel = accelerator.unwrap_model(model)
    batches_per_epoch = len(train_loader)
    scheduler, run_facts = make_schedule(config, optimizer, batches_per_epoch, len(train_dataset), accelerator)
    run_facts["task"] = task
    steps_per_epoch, total_steps = run_facts["steps_per_epoch"], run_facts["total_steps"]

    # -- resume or start ---------------------------------------------------------------------------------------
    tstate = start_or_resume(checkpoint, accelerator, unwrapped, optimizer, scheduler, run_facts, log, config.seed)
    if main:  # after the resume checks: a refused resume leaves the run's config as it was
        _write_json(out / CONFIG, asdict(config))
    logger.info(
        "training %s %s/%s: %d trainable parameters, %d steps (%d per epoch, %d micro-batches each), %s%s",
        task, config.backbone, config.method, unwrapped.num_parameters(), total_steps, steps_per_epoch,
        config.grad_accum, accelerator.device, f", resumed at step {tstate.step}" if checkpoint is not None else "",
    )  # fmt: skip
    callback("start", {"step": tstate.step, "total_steps": total_steps, "epoch": tstate.epoch})
    trainable = unwrapped.trainable_parameters()
    eval_bs = config.eval_batch_size or config.batch_size
    step = tstate.step
    epochs_logged: list[dict[str, Any]] = []
    last_val: dict[str, Any] | None = None
    # the losses of the interrupted epoch's first steps, from the log, so its train_loss covers the whole epoch
    resumed_losses = _epoch_losses(out / LOG, tstate.epoch) if checkpoint is not None and main else []
    segment_start = time.perf_counter()
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
        losses: list[float] = list(resumed_losses) if skip else []
        batch_in_epoch = skip
        # per optimizer step: the micro-batches' loss and loss parts (summed on the device), compute and data time
        window: dict[str, torch.Tensor] = {}
        window_n, step_time, data_time = 0, 0.0, 0.0
        t_data = time.perf_counter()
        for images, targets in loader:
            t_compute = time.perf_counter()
            data_time += t_compute - t_data
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    if task == "segmentation":
                        loss_parts = {"loss_seg": segmentation_loss(model(images), targets)}
                    else:
                        loss_parts = model(list(images), list(targets))
                    loss = sum(loss_parts.values())
                accelerator.backward(loss)  # divided by grad_accum
                if config.clip_grad is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.clip_grad)
                optimizer.step()  # a no-op until the last micro-batch of the step
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            for name, value in (("loss", loss), *loss_parts.items()):
                detached = value.detach().float()
                window[name] = window[name] + detached if name in window else detached
            window_n += 1
            if not accelerator.sync_gradients:
                step_time += time.perf_counter() - t_compute
                t_data = time.perf_counter()
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            means = accelerator.reduce(torch.stack(list(window.values())) / window_n, "mean").tolist()
            parts = dict(zip(window, means, strict=True))
            value = parts.pop("loss")
            losses.append(value)
            record = {
                "step": step,
                "epoch": epoch + 1,
                "loss": value,
                **parts,
                "lr": lr,
                "step_time_s": step_time + time.perf_counter() - t_compute,
                "data_time_s": data_time,
            }
            log.write(record)
            callback("step", record)
            window, window_n, step_time, data_time = {}, 0, 0.0, 0.0
            if config.save_every_steps and step % config.save_every_steps == 0 and batch_in_epoch < batches_per_epoch:
                save_state(epoch, batch_in_epoch)
            t_data = time.perf_counter()

        # -- end of epoch: validation, adapters, resumable state ---------------------------------------------------
        record = {"epoch": epoch + 1, "step": step, "train_loss": statistics.fmean(losses) if losses else None}
        do_eval = val_dataset is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs)
        if do_eval and main:
            val = evaluate_dense(unwrapped, val_dataset, batch_size=eval_bs, mode=config.eval_mode)
            last_val = val
            record.update(_flat(val, "val"))
            if task == "segmentation":
                record["val_IoU"] = val["IoU"]
            score = headline(task, val)
            record["val_headline"] = score
            if score is not None and (tstate.best_metric is None or score > tstate.best_metric):
                tstate.best_metric, tstate.best_epoch = score, epoch + 1
                _save_adapter(unwrapped, out / "best", classes, config)
        if main:
            _save_adapter(unwrapped, out / "last", classes, config)
        accelerator.wait_for_everyone()
        record["elapsed_s"] = _elapsed()
        log.write(record)
        epochs_logged.append(record)
        callback("epoch", record)
        save_state(epoch + 1, 0)

    train_time = _elapsed()
    best_epoch = tstate.best_epoch
    if main and best_epoch is None:  # no validation (or nothing measurable): best is last
        _save_adapter(unwrapped, out / "best", classes, config)
    accelerator.wait_for_everyone()
    if best_epoch is not None and best_epoch != config.epochs:
        _load_adapter_weights(unwrapped, out / "best")
    test = None
    if test_dataset is not None and main:
        test = evaluate_dense(unwrapped, test_dataset, batch_size=eval_bs, mode=config.eval_mode)
    # timings and the last epoch from the log: a resumed run's log holds the steps of every segment
    records = read_log(out / LOG) if main else []
    step_times = [r["step_time_s"] for r in records if "loss" in r and (r["step"] > 1 or total_steps == 1)]
    logged_epochs = [r for r in records if "train_loss" in r] or epochs_logged
    if last_val is None and logged_epochs and "val_headline" in logged_epochs[-1]:  # resumed after the last eval
        last_val = {k[4:]: v for k, v in logged_epochs[-1].items() if k.startswith("val_") and k != "val_headline"}
    summary = {
        "task": task,
        "config": asdict(config),
        "model": {
            "backbone": config.backbone,
            "method": config.method,
            "img_size": list(size),
            "num_classes": len(classes),
            "trainable_parameters": unwrapped.num_parameters(),
            "total_parameters": unwrapped.num_parameters(trainable=False),
        },
        "data": {
            "source": str(config.data) if config.data else "datasets passed to fit_dense()",
            "train": len(train_dataset),
            "val": len(val_dataset) if val_dataset is not None else None,
            "test": len(test_dataset) if test_dataset is not None else None,
            "classes": classes,
        },
        "metrics": {
            "headline": "mIoU" if task == "segmentation" else "bbox_mAP",
            "best_val": tstate.best_metric,
            "best_epoch": best_epoch,
            "final_train_loss": logged_epochs[-1]["train_loss"] if logged_epochs else None,
            "final_val": last_val,
            "test": test,
        },
        "timing": {
            "wall_time_s": time.perf_counter() - wall_start,
            "train_time_s": train_time,
            "steps": step,
            "median_step_time_s": statistics.median(step_times) if step_times else None,
            "images_per_step": run_facts["images_per_step"],
            "steps_per_epoch": steps_per_epoch,
            "grad_accum": config.grad_accum,
        },
        "memory": peak_memory(accelerator.device),
        "device": device_name(accelerator.device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": mixed_precision,
        "versions": versions(),
        "git_commit": git_commit(),
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
    }
    if main:
        _write_json(out / SUMMARY, summary)
    callback("end", summary)
    accelerator.wait_for_everyone()
    return TrainResult(output=out, summary=summary, model=unwrapped)


def _epoch_losses(log_path: Path, epoch: int) -> list[float]:
    """The step losses a log holds for ``epoch`` (0-based): the part of an epoch done before a resume."""
    if not log_path.is_file():
        return []
    return [r["loss"] for r in read_log(log_path) if "loss" in r and r.get("epoch") == epoch + 1]


def _load_adapter_weights(model: SidetuneModel, directory: Path) -> None:
    from safetensors.torch import load_file

    from ..model import ADAPTER_WEIGHTS

    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    params = dict(model.named_trainable_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device))


# -- saved adapters: evaluate and predict ----------------------------------------------------------------------


def evaluate_dense_adapter(
    adapter_dir: str | os.PathLike,
    data: str | os.PathLike,
    split: str = "val",
    *,
    layout: str | None = None,
    batch_size: int = 4,
    workers: int = 0,
    weights: Any = "saved",
    device: str | None = None,
    mode: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Load a dense adapter folder (``RUN/best``) and evaluate it on ``split`` of ``data``."""
    model, info = load_for_inference(adapter_dir, weights=weights, device=device)
    dc = model.data_config
    dataset = build_dense_dataset(
        model.config.task, data, split, layout=layout or info.get("layout", "auto"),
        img_size=tuple(model.config.img_size), mean=dc["mean"], std=dc["std"], limit=limit,
    )  # fmt: skip
    metrics = evaluate_dense(
        model, dataset, batch_size=batch_size, workers=workers, mode=mode or info.get("eval_mode", "whole")
    )
    return {"adapter": str(adapter_dir), "task": model.config.task, "split": split, **metrics}


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: a fixed, well-spread palette (the Pascal VOC bit pattern)."""
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for k in range(len(colours)):
        c, r, g, b = k + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[k] = (r, g, b)
    return colours


def _image_files(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(images, str | os.PathLike):
        root = Path(images).expanduser()
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise DataError(f"{root} is neither an image file nor a folder.")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    else:
        files = [Path(p) for p in images]
    if not files:
        raise DataError(f"no images found in {images}.")
    return files


@torch.no_grad()
def predict_dense(
    model: SidetuneModel,
    image_paths: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    mode: str = "whole",
    score_threshold: float = 0.5,
    alpha: float = 0.5,
) -> dict[str, Any]:
    """Predict every image and write the results under ``out_dir``.

    Segmentation: ``<stem>.png`` (palette PNG, pixel value = class index) and ``<stem>_overlay.png`` (the image
    blended with the coloured mask) per image. Detection / instance: ``predictions.json`` (COCO-style results:
    ``image_id``, ``file_name``, ``category_id`` (1..K), ``category_name``, ``bbox`` [x, y, w, h], ``score``) and
    ``<stem>_overlay.png`` with the boxes scoring at least ``score_threshold`` drawn (and masks for instance).

    Returns:
        ``{"images": N, "files": [...written paths...]}`` (plus ``"detections"`` for detection).
    """
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    task = model.config.task
    classes = list(classes) if classes is not None else [str(i) for i in range(model.config.num_classes)]
    colours = palette(len(classes))
    was_training = model.training
    model.eval()
    written: list[str] = []
    detections: list[dict[str, Any]] = []
    try:
        for image_id, path in enumerate(_image_files(image_paths)):
            img = load_rgb(path)
            rgb = np.asarray(img)
            x = pil_to_tensor(img).float().div(255)
            if task == "segmentation":
                mean = torch.tensor(model.data_config["mean"]).view(3, 1, 1)
                std = torch.tensor(model.data_config["std"]).view(3, 1, 1)
                logits = predict_segmentation(
                    model, ((x - mean) / std)[None].to(device), tuple(model.config.img_size), mode=mode
                )
                labels = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
                mask = Image.fromarray(labels, mode="P")
                flat = colours.reshape(-1).tolist()
                mask.putpalette(flat + [0] * (768 - len(flat)))
                mask_path = out / f"{path.stem}.png"
                mask.save(mask_path)
                blend = (1 - alpha) * rgb.astype(np.float32) + alpha * colours[labels].astype(np.float32)
                overlay_path = out / f"{path.stem}_overlay.png"
                Image.fromarray(blend.clip(0, 255).astype(np.uint8)).save(overlay_path)
                written += [str(mask_path), str(overlay_path)]
                continue
            (pred,) = model([x.to(device)])
            pred = {k: v.cpu() for k, v in pred.items()}
            for box, label, score in zip(
                pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist(), strict=True
            ):
                x1, y1, x2, y2 = box
                detections.append(
                    {
                        "image_id": image_id,
                        "file_name": str(path),
                        "category_id": int(label),
                        "category_name": classes[label - 1] if 0 < label <= len(classes) else str(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score),
                    }
                )
            keep = pred["scores"] >= score_threshold
            canvas = pil_to_tensor(img)
            if "masks" in pred and keep.any():
                canvas = draw_segmentation_masks(canvas, pred["masks"][keep, 0] > 0.5, alpha=0.4)
            if keep.any():
                names = [
                    f"{classes[lbl - 1] if 0 < lbl <= len(classes) else lbl} {s:.2f}"
                    for lbl, s in zip(pred["labels"][keep].tolist(), pred["scores"][keep].tolist(), strict=True)
                ]
                box_colours = [tuple(int(c) for c in colours[(lbl - 1) % len(colours)]) for lbl in pred["labels"][keep]]
                canvas = draw_bounding_boxes(canvas, pred["boxes"][keep], labels=names, colors=box_colours, width=2)
            overlay_path = out / f"{path.stem}_overlay.png"
            Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(overlay_path)
            written.append(str(overlay_path))
    finally:
        model.train(was_training)
    result: dict[str, Any] = {"images": len(_image_files(image_paths)), "files": written}
    if task != "segmentation":
        json_path = out / "predictions.json"
        _write_json(json_path, detections)
        result["files"].append(str(json_path))
        result["detections"] = len(detections)
    return result


def predict_dense_adapter(
    adapter_dir: str | os.PathLike,
    images: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: Any = "saved",
    device: str | None = None,
    mode: str | None = None,
    score_threshold: float = 0.5,
) -> dict[str, Any]:
    """Load a dense adapter folder and :func:`predict_dense` every image under ``images``."""
    model, info = load_for_inference(adapter_dir, weights=weights, device=device)
    return predict_dense(
        model,
        images,
        out_dir,
        classes=info.get("classes"),
        mode=mode or info.get("eval_mode", "whole"),
        score_threshold=score_threshold,
    )


def saved_task(adapter_dir: str | os.PathLike) -> str:
    """The task recorded in an adapter folder's ``adapter_config.json`` (``classification`` when absent)."""
    from ..model import ADAPTER_CONFIG

    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text()).get("task", "classification")
    except (OSError, json.JSONDecodeError):
        return "classification"


# -- command line ----------------------------------------------------------------------------------------------

# flags of `sidetune train` that only classification reads: refused with a dense --task
_UNSUPPORTED = ("config", "val_fraction", "label_smoothing", "augmentation", "head_dropout", "num_classes")


def _parse_kv(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    from .config import parse_options

    return parse_options(list(items or []), flag)


def add_dense_train_args(p: argparse.ArgumentParser, description: str | None = None) -> None:
    """Flags of a dense ``train`` that the classification parser lacks (all optional)."""
    g = p.add_argument_group("dense tasks (--task segmentation|detection|instance)", description)
    g.add_argument("--detector", choices=("faster_rcnn", "retinanet", "mask_rcnn"), help="detection head")
    g.add_argument(
        "--head-opt", metavar="KEY=VALUE", action="append", help="dense head option, repeatable (e.g. channels=128)"
    )
    g.add_argument("--train-limit", type=int, help="use the first N training images only")
    g.add_argument("--val-limit", type=int, help="use the first N validation images only")
    g.add_argument("--eval-mode", choices=("whole", "slide"), help="segmentation inference (default: whole)")


def _dense_defaults_note() -> str:
    """Where a dense run's defaults differ from the classification defaults shown beside the flags."""
    from .config import TrainConfig

    dense = {f.name: f.default for f in dataclasses.fields(DenseConfig) if f.default is not dataclasses.MISSING}
    classification = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    differ = [
        f"--{name.replace('_', '-')} {'none' if value is None else value}"
        for name, value in dense.items()
        if name in classification and classification[name] != value and name not in ("backbone", "method")
    ]
    return (
        "With a dense --task, --grad-accum, --resume and --save-every-steps work as for classification, the "
        "evaluation batch defaults to --batch-size, and these defaults differ: " + ", ".join(differ) + ". "
        f"Classification only: {', '.join('--' + n.replace('_', '-') for n in _UNSUPPORTED)}."
    )


def config_from_dense_args(args: argparse.Namespace) -> DenseConfig:
    """A :class:`DenseConfig` from ``sidetune train --task ...`` arguments (absent flags keep the defaults)."""
    a = vars(args)
    head = _parse_kv(a.get("head_opt"), "--head-opt")
    if a.get("detector"):
        head["detector"] = a["detector"]
    values: dict[str, Any] = {
        "head_options": head,
        "method_options": _parse_kv(a.get("opt"), "--opt"),
        "backbone_kwargs": _parse_kv(a.get("backbone_opt"), "--backbone-opt"),
    }
    names = {f for f in DenseConfig.__dataclass_fields__} - set(values)
    for name in names:
        if a.get(name) is not None:
            values[name] = a[name]
    if values.get("layout") in ("imagefolder", "vtab", "csv"):
        raise ConfigError(f"--layout {values['layout']} is a classification layout; see --help for dense layouts.")
    for name in ("val_split", "test_split"):  # `--val-split none` (None, or the word) turns validation off
        if name in a and (a[name] is None or str(a[name]).strip().lower() in ("none", "null", "")):
            values[name] = None
    if values.get("val_split") in ("auto",):
        values["val_split"] = "val"
    if values.get("train_split") in ("auto", None):
        values["train_split"] = "train"
    if values.get("test_split") == "auto":
        values["test_split"] = None
    return DenseConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    """``sidetune train --task <dense>``: fit, then print the headline metrics."""
    config = config_from_dense_args(args)

    def callback(event: str, record: dict[str, Any]) -> None:
        if event == "start":
            print(f"training {config.task} {config.backbone} / {config.method} -> {config.output} "
                  f"({record['total_steps']} steps"
                  + (f", resuming after step {record['step']})" if record["step"] else ")"))  # fmt: skip
        elif event == "epoch":
            line = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
            if record.get("val_headline") is not None:
                line += f", val {'mIoU' if config.task == 'segmentation' else 'box mAP'} {record['val_headline']:.4f}"
            print(line, flush=True)

    result = fit_dense(config, callback=callback)
    t = result.summary["timing"]
    step = t["median_step_time_s"]
    print(
        f"{result.summary['model']['trainable_parameters']:,} trainable parameters, {t['steps']} steps"
        + (f", {step * 1000:.1f} ms/step (median)" if step else "")
        + f", wall {t['wall_time_s']:.1f} s"
    )
    print(f"wrote {result.output}/{{summary.json,log.jsonl,best,last,checkpoints}}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``sidetune eval ADAPTER --data ROOT`` for a dense adapter."""
    split = args.split if args.split not in (None, "auto") else "val"
    weights = None if str(args.weights).lower() in ("none", "null", "") else args.weights
    layout = None if getattr(args, "layout", "auto") in (None, "auto") else args.layout
    metrics = evaluate_dense_adapter(
        args.adapter, args.data, split, layout=layout, batch_size=min(args.batch_size, 8), workers=0,
        weights=weights, device=args.device,
    )  # fmt: skip
    text = json.dumps(_finite(metrics), indent=2)
    print(text)
    out = Path(args.output) if args.output else Path(args.adapter) / f"eval_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``sidetune predict ADAPTER IMAGES --output DIR`` for a dense adapter (``--output -`` -> ``predictions/``)."""
    weights = None if str(args.weights).lower() in ("none", "null", "") else args.weights
    out_dir = "predictions" if args.output in (None, "-") else args.output
    result = predict_dense_adapter(args.adapter, args.images, out_dir, weights=weights, device=args.device)
    print(f"wrote {len(result['files'])} files for {result['images']} images to {out_dir}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone CLI: ``python -m sidetune.train.dense {train,eval,predict} ...``."""
    parser = argparse.ArgumentParser(prog="python -m sidetune.train.dense", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a dense model")
    p.add_argument("backbone")
    p.add_argument("method")
    p.add_argument("--task", choices=DENSE_TASKS, default="segmentation")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--layout", choices=sorted(set(SEG_LAYOUTS + DET_LAYOUTS)), default="auto")
    p.add_argument("--weights")
    p.add_argument("--img-size", type=int)
    p.add_argument("--opt", action="append")
    p.add_argument("--backbone-opt", action="append")
    for name, kind in (("epochs", int), ("batch-size", int), ("eval-batch-size", int), ("lr", float),
                       ("min-lr", float), ("weight-decay", float), ("warmup-epochs", float), ("clip-grad", float),
                       ("eval-every", int), ("seed", int), ("workers", int)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--grad-accum", type=int, help="micro-batches of --batch-size per optimizer step (default: 1)")
    p.add_argument(
        "--save-every-steps",
        type=int,
        help="also save the resumable state every N optimizer steps (default: 0, at epoch ends only)",
    )
    p.add_argument("--resume", help="continue a run: its directory (newest checkpoint) or a checkpoint folder")
    p.add_argument("--train-split")
    p.add_argument("--val-split", default=argparse.SUPPRESS, help="validation split, 'none' for none (default: val)")
    p.add_argument("--test-split", default=argparse.SUPPRESS, help="test split (default: none)")
    p.add_argument("--mixed-precision")
    p.add_argument("--cpu", action="store_true", default=None)
    p.add_argument("--output")
    add_dense_train_args(p)
    p.set_defaults(func=run_train)
    p = sub.add_parser("eval", help="evaluate a dense adapter")
    p.add_argument("adapter")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--layout", default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--weights", default="saved")
    p.add_argument("--device")
    p.add_argument("--output")
    p.set_defaults(func=run_eval)
    p = sub.add_parser("predict", help="predict with a dense adapter")
    p.add_argument("adapter")
    p.add_argument("images")
    p.add_argument("--weights", default="saved")
    p.add_argument("--device")
    p.add_argument("--output", default="predictions")
    p.set_defaults(func=run_predict)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())


def extend_parsers(parsers: dict[str, argparse.ArgumentParser]) -> None:
    """Teach ``sidetune train/eval/predict`` (the classification parsers of :mod:`sidetune.train.commands`) the
    dense tasks: ``train --task segmentation|detection|instance`` plus the dense flags, dense ``--layout``
    values, and eval/predict routed by the task an adapter folder records. Called once by
    :func:`sidetune.train.commands.register` with ``subparsers.choices``.
    """
    train = parsers.get("train")
    if train is not None:
        train.add_argument(
            "--task",
            choices=("classification", *DENSE_TASKS),
            default="classification",
            help="what to train (default: classification); dense tasks read --data as the dataset root and "
            "--layout as camvid/ade20k/voc/masks (segmentation) or voc/coco (detection)",
        )
        add_dense_train_args(train, _dense_defaults_note())
        _allow_layouts(train)
        _route(train, lambda args: getattr(args, "task", "classification") != "classification", _dense_train)
    for name in ("eval", "predict"):
        if name in parsers:
            _allow_layouts(parsers[name])
            _route(parsers[name], lambda args: saved_task(args.adapter) in DENSE_TASKS, globals()[f"run_{name}"])


def _allow_layouts(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.dest == "layout" and action.choices is not None:
            action.choices = tuple(dict.fromkeys((*action.choices, *SEG_LAYOUTS, *DET_LAYOUTS)))


def _route(parser: argparse.ArgumentParser, is_dense: Callable[[argparse.Namespace], bool], dense_func) -> None:
    original = parser.get_default("func")

    def func(args: argparse.Namespace) -> int:
        return dense_func(args) if is_dense(args) else original(args)

    parser.set_defaults(func=func)


def _dense_train(args: argparse.Namespace) -> int:
    given = [f"--{n.replace('_', '-')}" for n in _UNSUPPORTED if vars(args).get(n) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)} are classification settings, not supported with --task {args.task}.")
    return run_train(args)
