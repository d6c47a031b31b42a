"""What a task is: everything that differs between classification, segmentation and detection, and nothing else.

The training loop (:func:`sidetune.train.fit`) drives any :class:`Task`. A task owns:

* its options (one typed dataclass, ``TrainConfig.task_options``), its ``--layout`` choices and augmentations;
* building its datasets from ``--data``/``--layout`` with its train and eval transforms, and its collate
  functions;
* the model's task-specific ``create()`` arguments (the head);
* the loss of a batch (:meth:`Task.step`), and the training statistics an epoch record reports;
* an :class:`Evaluator` (metrics, mergeable over processes) and the headline metric that decides "best";
* what ``inference.json`` records, and how predictions are written (CSV, PNG masks, COCO JSON, overlays).

A new task is one file in this package that subclasses :class:`Task` and one :func:`register_task` line in
:mod:`sidetune.tasks`, like a method in :mod:`sidetune.methods`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.utils.data import Dataset

from ..data import DataError
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..model import SidetuneModel


def data_root(config: Any) -> Path:
    """The folder or file ``config.data`` names, for the tasks that read their data from disk."""
    if config.data is None:
        raise ConfigError(
            "no training data: set --data (a folder, CSV or list file; docs/data.md) or `data:` in the --config "
            "YAML. A run from a tap cache (--cache) needs it too: its data settings are checked against the cache's."
        )
    return Path(config.data).expanduser()


def check_distinct_splits(train: str | None, val: str | None, test: str | None) -> tuple[str | None, ...]:
    """The resolved ``(train, val, test)`` splits, refusing a validation split that is the training or the test
    split: checkpoints would be chosen on images the model trains on, or on the split whose score is reported."""
    if val is not None and val == test:
        raise ConfigError(
            f"the validation split {val!r} is also the test split: the best checkpoint would be chosen on the scores "
            "it reports. Carve validation from train (--val-fraction 0.2), name another --val-split, or pass "
            "--test-split none."
        )
    if val is not None and val == train:
        raise ConfigError(
            f"the validation split {val!r} is also the training split: validation would score images the model "
            "trains on. Carve validation from train (--val-fraction 0.2) or name another --val-split."
        )
    return train, val, test


@dataclass
class TaskData:
    """The datasets of a run (``val``/``test`` may be None) and the class names shared by all of them.

    Attributes:
        train, val, test: the splits, with the task's transforms applied.
        classes: the class names (the model's classes, in order).
        source: where the data came from (for logs and the summary).
        splits: the split names used (``{"train": ..., "val": ..., "test": ...}``), or None for given datasets.
        skipped: files the readers skipped, as ``(path, reason)`` pairs, over all splits.
        counts: the training split's per-class counts (:func:`sidetune.data.count_classes`: images, pixels or
            boxes), or None for datasets sidetune did not read.
        warnings: what a user should know about the data before trusting the run (``DataWarning.to_dict()``).
        collate, eval_collate: loader collate functions that replace the task's (a tap cache's), or None.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]
    source: str
    splits: dict[str, Any] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    counts: Any = None
    warnings: list[dict[str, Any]] = field(default_factory=list)
    collate: Any = None
    eval_collate: Any = None

    def sizes(self) -> dict[str, int | None]:
        return {
            k: (len(d) if d is not None else None)
            for k, d in (("train", self.train), ("val", self.val), ("test", self.test))
        }


@dataclass
class StepOutput:
    """What a task's training step computed for one micro-batch.

    Attributes:
        loss: the scalar to back-propagate.
        parts: named components of the loss (detection's box and class losses), logged per step.
        count: samples in the micro-batch (weights the epoch's mean loss).
        sums: task statistics summed over the micro-batch (classification: ``correct``); an epoch record reports
            :meth:`Task.train_metrics` of their totals.
    """

    loss: torch.Tensor
    count: int
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


class Evaluator:
    """Accumulates a task's metrics over batches; the states of several processes merge into one result.

    Each process evaluates its own shard of a split (:meth:`update`), hands :meth:`state` (a picklable object)
    to the others, and :meth:`compute` merges every process's state into the metrics of the whole split, so
    that validation spreads over processes for every task and gives the numbers of one process.
    """

    def update(self, model: SidetuneModel, batch: Any) -> None:
        raise NotImplementedError

    def state(self) -> Any:
        raise NotImplementedError

    def compute(self, states: Sequence[Any]) -> dict[str, Any]:
        raise NotImplementedError


class Task:
    """Base of the tasks. Subclasses set the class attributes and implement the methods that raise.

    Attributes:
        name: the registry name (``--task``).
        options_cls: the dataclass of ``task_options``.
        layouts: ``--layout`` value -> one line for ``--help`` (``auto`` first).
        augmentations: the ``--augmentation`` recipes, the default first.
        headline: the metric that decides the best checkpoint (higher is better).
        defaults: config defaults that differ by task (``batch_size``, ``weight_decay``, ``workers``).
        eval_batch_factor: the evaluation batch is this many training batches when not set.
        predict_options: the keyword options :meth:`predict` takes (the CLI refuses the others).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options_cls: ClassVar[type] = object
    layouts: ClassVar[dict[str, str]] = {}
    augmentations: ClassVar[tuple[str, ...]] = ()
    headline: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    eval_batch_factor: ClassVar[int] = 1
    predict_options: ClassVar[tuple[str, ...]] = ()
    per_class_name: ClassVar[str] = ""

    def __init__(self, options: Any) -> None:
        self.options = options

    # -- options ------------------------------------------------------------------------------------------------
    @classmethod
    def make_options(cls, values: dict[str, Any] | None = None) -> Any:
        """The task's options dataclass from a mapping, naming unknown keys (with close matches) and the valid ones."""
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls.options_cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            hints = [
                f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                for k in unknown
            ]
            takes = ", ".join(known) if known else "none"
            raise ConfigError(
                f"task {cls.name!r} has no option(s) {', '.join(hints)}. Its options (task_options): {takes}."
            )
        return cls.options_cls(**values)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.options_cls)]

    # -- model ---------------------------------------------------------------------------------------------------
    def model_kwargs(self, config: Any) -> dict[str, Any]:
        """The task-specific arguments of :func:`sidetune.create` (``task``, the head's options)."""
        return {"task": self.name, "head_options": dict(config.head_options) or None}

    # -- data ----------------------------------------------------------------------------------------------------
    def scan_classes(self, config: Any) -> list[str]:
        """The class names of the training split, read cheaply (no image decoded), to size the model's head."""
        raise NotImplementedError

    def build_data(self, config: Any, model: SidetuneModel) -> TaskData:
        """The train/val/test datasets of ``config`` with this task's transforms for ``model``."""
        raise NotImplementedError

    def eval_dataset(
        self, model: SidetuneModel, info: dict[str, Any], data: str | os.PathLike, split: str | None, layout: str
    ) -> Dataset:
        """The labelled split ``split`` of ``data`` with the evaluation transform of a saved adapter."""
        raise NotImplementedError

    def split_available(self, root: Path, split: str) -> bool:
        """Whether the data at ``root`` has a split of this name (``auto`` splits resolve with it)."""
        raise NotImplementedError

    def collate(self, batch: list[Any]) -> Any:
        """The training loader's collate function (default: stack)."""
        return torch.utils.data.default_collate(batch)

    def eval_collate(self, batch: list[Any]) -> Any:
        """The evaluation loader's collate function."""
        return self.collate(batch)

    def prepare(self, data: TaskData) -> None:
        """Compute what the loss needs from the training data (class weights); called once per run."""

    # -- training ------------------------------------------------------------------------------------------------
    def step(self, model: torch.nn.Module, batch: Any) -> StepOutput:
        """The loss of one micro-batch (called under the run's autocast, in train mode)."""
        raise NotImplementedError

    def train_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Epoch training metrics from the summed :attr:`StepOutput.sums` (keys get a ``train_`` prefix)."""
        return {}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluator(self, model: SidetuneModel, dataset: Dataset, classes: list[str]) -> Evaluator:
        raise NotImplementedError

    def score(self, metrics: dict[str, Any] | None) -> float | None:
        """The headline value of ``metrics`` (None when absent or not a number)."""
        if not metrics:
            return None
        value = metrics.get(self.headline)
        if value is None or (isinstance(value, float) and value != value):  # nan
            return None
        return float(value)

    def summary_line(self, metrics: dict[str, Any]) -> str:
        """One line for the console: the headline and the other main metrics."""
        return f"{self.headline} {self.score(metrics)}"

    def per_class(self, metrics: dict[str, Any], classes: Sequence[str]) -> dict[str, float | None]:
        """The per-class metric (recall, IoU, AP) by class name; None for a class absent from the split."""
        return {}

    def collapse_warnings(self, metrics: dict[str, Any], classes: Sequence[str]) -> list[str]:
        """Signs that a model learnt nothing useful: a class never predicted, no better than the majority class."""
        return []

    def worst_first(self, metrics: dict[str, Any], classes: Sequence[str]) -> list[tuple[str, float]]:
        """``(class, value)`` of the per-class metric, worst first; classes absent from the split left out."""
        per = {k: v for k, v in self.per_class(metrics, classes).items() if v is not None and v == v}
        return sorted(per.items(), key=lambda kv: kv[1])

    def format_metrics(self, metrics: dict[str, Any], classes: Sequence[str], limit: int = 12) -> str:
        """The headline line, the per-class metric (worst first, compact) and any collapse warning."""
        lines = [self.summary_line(metrics)]
        ranked = self.worst_first(metrics, classes)
        if ranked:
            shown = ", ".join(f"{name} {value:.3f}" for name, value in ranked[:limit])
            more = f" (+{len(ranked) - limit} more)" if len(ranked) > limit else ""
            lines.append(f"  per class, worst first ({self.per_class_name}): {shown}{more}")
        lines += [f"  warning: {w}" for w in self.collapse_warnings(metrics, classes)]
        return "\n".join(lines)

    # -- the tap cache ----------------------------------------------------------------------------------------------
    def check_cacheable(self, config: Any) -> None:
        """Refuse settings whose samples a tap cache cannot hold (raises ConfigError)."""

    def cache_inputs(self, model: SidetuneModel, batch: Any) -> tuple[torch.Tensor, list[Any], list[dict[str, Any]]]:
        """For a tap cache: a collated batch -> (the (B, 3, H, W) backbone input, exactly as the model would compute
        it, or (B, T, 3, H, W) clips whose B*T frames the backbone runs on and whose taps are stored per clip as
        (T, ...); the per-sample targets to store; per-sample facts the model needs besides the taps)."""
        raise ConfigError(f"the {self.name} task cannot be cached.")

    def cache_settings(self, config: Any) -> dict[str, Any]:
        """The task options besides the transform recipe that decide what a cached sample holds (video: how frames
        are sampled). Recorded in the manifest's ``transform`` and checked when a run opens the cache."""
        return {}

    def cache_draws_at_random(self, config: Any) -> bool:
        """Whether training samples draw at random apart from the augmentation recipe (video: random frame offsets).
        A cache of such samples records the seed, and its views are the draws of an uncached run's epochs."""
        return False

    # -- saved adapters ------------------------------------------------------------------------------------------
    def inference_info(self, config: Any) -> dict[str, Any]:
        """What ``inference.json`` records beside an adapter so that eval and predict reproduce the run."""
        return {}

    def list_inputs(self, path: str | os.PathLike) -> list[Path]:
        """What ``sidetune predict`` reads under ``path``: image files (video: clips)."""
        from ..train.inference import list_images

        return list_images(path)

    def predict(
        self,
        model: SidetuneModel,
        info: dict[str, Any],
        images: list[Path],
        output: str | os.PathLike,
        **options: Any,
    ) -> dict[str, Any]:
        """Predict every image and write the task's prediction files; returns what was written."""
        raise NotImplementedError


class LimitedSubset(torch.utils.data.Subset):
    """The first ``n`` samples of a dataset, keeping its ``classes`` (``train_limit`` / ``val_limit``)."""

    def __init__(self, dataset: Dataset, n: int) -> None:
        super().__init__(dataset, range(min(n, len(dataset))))
        self.classes = list(dataset.classes)  # type: ignore[attr-defined]


def limited(dataset: Dataset | None, n: int | None) -> Dataset | None:
    """``dataset`` cut to its first ``n`` samples (None: all)."""
    if dataset is None or n is None or n >= len(dataset):
        return dataset
    return LimitedSubset(dataset, n)


def classes_of(dataset: Dataset) -> list[str]:
    """The ``classes`` of a dataset (or of the dataset a subset wraps)."""
    classes = getattr(dataset, "classes", None)
    if classes is None and isinstance(dataset, torch.utils.data.Subset):
        classes = getattr(dataset.dataset, "classes", None)
    if classes is None:
        raise ConfigError(f"{type(dataset).__name__} has no `classes` attribute (the K class names).")
    return [str(c) for c in classes]


class DenseTask(Task):
    """What segmentation and detection share: datasets of named splits under one root, built by the subclass's
    :meth:`dataset` with its :meth:`transforms`; ``auto`` splits resolve to ``train``/``val``/``test`` when present.
    """

    def dataset(self, root: Any, split: str, layout: str, transform: Any) -> Dataset:
        """One split of the data at ``root`` in ``layout``, with ``transform``."""
        raise NotImplementedError

    def transforms(self, model: SidetuneModel, augmentation: str, train: bool) -> Any:
        """The training (``augmentation``) or evaluation transform for ``model``."""
        raise NotImplementedError

    def resolve_splits(self, config: Any) -> tuple[str, str | None, str | None]:
        root = data_root(config)

        def auto(value: str | None, name: str) -> str | None:
            return (name if self.split_available(root, name) else None) if value == "auto" else value

        train = "train" if config.train_split == "auto" else config.train_split
        if train is None:
            raise ConfigError(f"{self.name} needs a training split (--train-split NAME; 'auto' is 'train').")
        return check_distinct_splits(train, auto(config.val_split, "val"), auto(config.test_split, "test"))

    def scan_classes(self, config: Any) -> list[str]:
        train, _, _ = self.resolve_splits(config)
        return classes_of(self.dataset(config.data, train, config.layout, None))

    def build_data(self, config: Any, model: SidetuneModel) -> TaskData:
        train_split, val_split, test_split = self.resolve_splits(config)
        train_tf = self.transforms(model, config.augmentation, train=True)
        eval_tf = self.transforms(model, config.augmentation, train=False)
        train = self.dataset(config.data, train_split, config.layout, train_tf)
        val = test = None
        if config.val_fraction is not None:
            twin = self.dataset(config.data, train_split, config.layout, eval_tf)
            train, val = split_fraction(train, twin, config.val_fraction, config.split_seed)
        elif val_split is not None:
            val = self.dataset(config.data, val_split, config.layout, eval_tf)
        if test_split is not None:
            test = self.dataset(config.data, test_split, config.layout, eval_tf)
        train, val = limited(train, config.train_limit), limited(val, config.val_limit)
        splits = {
            "train": train_split,
            "val": f"{config.val_fraction} of train" if config.val_fraction is not None else val_split,
            "test": test_split,
        }
        data = TaskData(train, val, test, classes_of(train), source=str(config.data), splits=splits)
        inspect_data(data)
        self.prepare(data)
        return data

    def eval_dataset(self, model, info, data, split, layout) -> Dataset:
        split = "val" if split in (None, "auto") else split
        layout = info.get("layout", "auto") if layout == "auto" else layout
        dataset = self.dataset(data, split, layout, self.transforms(model, "none", train=False))
        if len(dataset) == 0:
            raise DataError(f"no images to evaluate at {data} (split {split!r}).")
        dataset.split = split  # type: ignore[attr-defined]
        return dataset


def split_fraction(train: Dataset, twin: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random ``fraction`` of ``train`` as validation (taken from ``twin``, its eval-transform copy)."""
    n = len(train)
    n_val = min(max(1, math.floor(fraction * n + 0.5)), n - 1)
    if n < 2:
        raise DataError(f"--val-fraction {fraction} needs at least 2 training images, the split has {n}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _Picked(train, sorted(order[n_val:])), _Picked(twin, sorted(order[:n_val]))


class _Picked(torch.utils.data.Subset):
    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        super().__init__(dataset, indices)
        self.classes = classes_of(dataset)


def inspect_data(data: TaskData) -> None:
    """Fill ``data.counts``, ``data.warnings`` and ``data.skipped`` from the readers, refusing a training split on
    which training cannot mean anything (one class, no scored pixel, no box: :func:`sidetune.data.check_training_data`).

    Datasets sidetune did not read (handed to ``fit`` directly) have nothing to inspect and are left as they are.

    Raises:
        DataError: the training split cannot train anything meaningful; the message says why and what to fix.
    """
    from ..data import check_training_data, count_classes, skipped_files

    try:
        counts = count_classes(data.train)
    except (ConfigError, AttributeError, TypeError):
        return  # not a dataset of sidetune.data
    data.counts = counts
    data.warnings = [w.to_dict() for w in check_training_data(data.train, counts=counts, split="train")]
    seen: dict[tuple[str, str], None] = {}
    for split in (data.train, data.val, data.test):
        if split is not None:
            seen.update(dict.fromkeys(skipped_files(split)))
    data.skipped = list(seen)
