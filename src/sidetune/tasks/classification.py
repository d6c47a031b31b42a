"""Image classification: ImageFolder / VTAB-1k / CSV data, cross-entropy, top-1 and per-class accuracy, CSV predictions.

``(image, label)`` batches; the model maps (B, 3, H, W) images to (B, K) logits. The best checkpoint is the
highest validation top-1. Predictions are a CSV of ``path, label, score`` and the next ``top_k - 1`` labels.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data import (
    LAYOUTS,
    VTAB_SPLITS,
    ClassificationSubset,
    DataError,
    build_classification_dataset,
    build_transforms,
    check_num_classes,
    load_rgb,
    split_train_val,
)
from ..errors import ConfigError
from .base import Evaluator, StepOutput, Task, TaskData, check_distinct_splits, data_root, inspect_data

logger = logging.getLogger(__name__)


@dataclass
class ClassificationOptions:
    """``task_options`` of a classification run.

    Attributes:
        label_smoothing: cross-entropy label smoothing, in [0, 1).
        head_dropout: dropout before the classifier, in [0, 1).
        class_weights: None, ``"auto"`` (inverse class frequency of the training split, mean 1), ``"sqrt"``
            (its square root: softer) or one weight per class: weighs the loss for imbalanced data.
    """

    label_smoothing: float = 0.0
    head_dropout: float = 0.0
    class_weights: str | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("label_smoothing", "head_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}.")
        self.class_weights = check_class_weights(self.class_weights)


#: ``class_weights`` names and the power of the inverse frequency each stands for.
POWERS = {"auto": 1.0, "sqrt": 0.5}


def check_class_weights(value: Any) -> str | tuple[float, ...] | None:
    """``None``, ``"auto"``, ``"sqrt"`` or a sequence of positive finite weights (returned as a tuple)."""
    if value is None or value in POWERS:
        return value
    if isinstance(value, str):
        raise ConfigError(f"--class-weights must be 'auto', 'sqrt' or one number per class (w1,w2,...), got {value!r}.")
    try:
        weights = tuple(float(w) for w in value)
    except (TypeError, ValueError):
        raise ConfigError(f"--class-weights must be 'auto', 'sqrt' or one number per class, got {value!r}.") from None
    if not weights or any(not (w > 0 and w < float("inf")) for w in weights):
        raise ConfigError(f"class weights must be positive finite numbers, got {value!r}.")
    return weights


def loss_weights(option: Any, data: TaskData) -> torch.Tensor | None:
    """The (K,) loss weights of the ``class_weights`` option: ``auto``/``sqrt`` from the training split's counts
    (:func:`sidetune.data.class_weights`: inverse frequency or its square root, mean 1), or the given weights, one
    per class."""
    if option is None:
        return None
    if option in POWERS:
        if data.counts is None:
            raise ConfigError(
                f"class_weights {option!r} counts the training split's classes, which needs a dataset read by "
                "sidetune (not one handed to fit()): give one weight per class instead."
            )
        from ..data import class_weights

        return class_weights(data.train, "auto", power=POWERS[option], counts=data.counts)
    if len(option) != len(data.classes):
        raise ConfigError(
            f"class_weights has {len(option)} values for {len(data.classes)} classes ({list(data.classes)})."
        )
    return torch.tensor(option, dtype=torch.float32)


class ClassificationMeter:
    """Accumulate loss, top-1/top-5 and per-class accuracy over batches of logits.

    Per-class accuracy is the recall of each class (``MulticlassAccuracy(average=None)`` in torchmetrics);
    a class absent from the data gets None. ``mean_class_acc`` averages the classes present. Meters of
    several processes merge by summing their :meth:`state`.

    Args:
        num_classes: classifier size.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.correct = torch.zeros(num_classes, dtype=torch.long)
        self.total = torch.zeros(num_classes, dtype=torch.long)
        self.predicted = torch.zeros(num_classes, dtype=torch.long)
        self.top5_correct = 0
        self.loss_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits (B, K), labels (B,)."""
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu().long()
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        pred = logits.argmax(-1)
        self.total += torch.bincount(labels, minlength=self.num_classes)
        self.predicted += torch.bincount(pred, minlength=self.num_classes)
        self.correct += torch.bincount(labels[pred == labels], minlength=self.num_classes)
        k = min(5, self.num_classes)
        self.top5_correct += (logits.topk(k, -1).indices == labels[:, None]).any(-1).sum().item()

    @property
    def count(self) -> int:
        return int(self.total.sum())

    def state(self) -> dict[str, Any]:
        return {
            "correct": self.correct,
            "total": self.total,
            "predicted": self.predicted,
            "top5_correct": self.top5_correct,
            "loss_sum": self.loss_sum,
        }

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        """Replace this meter's counts with the sum of ``states`` (its own included, when it is in them)."""
        self.correct = sum((s["correct"] for s in states), torch.zeros_like(self.correct))
        self.total = sum((s["total"] for s in states), torch.zeros_like(self.total))
        self.predicted = sum((s["predicted"] for s in states), torch.zeros_like(self.predicted))
        self.top5_correct = sum(s["top5_correct"] for s in states)
        self.loss_sum = sum(s["loss_sum"] for s in states)

    def compute(self) -> dict[str, Any]:
        """``{"loss", "top1", "top5", "mean_class_acc", "per_class", "support", "predicted", "count"}``.

        Accuracies are in [0, 1]; ``support`` counts the images of each class, ``predicted`` how often each class was
        predicted (a class never predicted is a sign of collapse).
        """
        n = self.count
        if n == 0:
            return {
                "loss": None,
                "top1": None,
                "top5": None,
                "mean_class_acc": None,
                "per_class": [],
                "support": [],
                "predicted": [],
                "count": 0,
            }
        per_class = [(c / t if t else None) for c, t in zip(self.correct.tolist(), self.total.tolist(), strict=True)]
        present = [a for a in per_class if a is not None]
        return {
            "loss": self.loss_sum / n,
            "top1": int(self.correct.sum()) / n,
            "top5": self.top5_correct / n,
            "mean_class_acc": sum(present) / len(present),
            "per_class": per_class,
            "support": self.total.tolist(),
            "predicted": self.predicted.tolist(),
            "count": n,
        }


class ClassificationEvaluator(Evaluator):
    def __init__(self, num_classes: int) -> None:
        self.meter = ClassificationMeter(num_classes)

    def update(self, model, batch) -> None:
        images, labels = batch
        self.meter.update(model(images), labels)

    def state(self) -> dict[str, Any]:
        return self.meter.state()

    def compute(self, states) -> dict[str, Any]:
        self.meter.merge(states)
        return self.meter.compute()


class ClassificationTask(Task):
    name = "classification"
    description = "one label per image: linear head on the pooled features, cross-entropy, top-1"
    options_cls = ClassificationOptions
    layouts: ClassVar[dict[str, str]] = {
        "auto": "guess from the folder: VTAB-1k lists, <split>.csv, or <split>/<class>/<image>",
        **LAYOUTS["classification"],
    }
    augmentations = ("vtab", "none", "standard")
    headline = "top1"
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 32, "weight_decay": 1e-4, "workers": 2}
    eval_batch_factor = 2
    predict_options = ("top_k", "augmentation")

    def __init__(self, options: ClassificationOptions) -> None:
        super().__init__(options)
        self.weight: torch.Tensor | None = None

    def model_kwargs(self, config) -> dict[str, Any]:
        return {"task": self.name, "head_dropout": self.options.head_dropout}

    # -- data ----------------------------------------------------------------------------------------------------
    def split_available(self, root: Path, split: str) -> bool:
        if not root.is_dir():
            return False
        if (root / split).is_dir() or (root / f"{split}.txt").is_file() or (root / f"{split}.csv").is_file():
            return True
        has_vtab = any((root / name).is_file() for name in VTAB_SPLITS.values())
        return has_vtab and split in ("train", "trainval", "val")

    def resolve_splits(self, config) -> tuple[str | None, str | None, str | None]:
        """``auto`` splits: ``train`` (else the whole data), ``val`` and ``test`` when the data has them."""
        root = data_root(config)

        def auto(value: str | None, name: str) -> str | None:
            return (name if self.split_available(root, name) else None) if value == "auto" else value

        return check_distinct_splits(
            auto(config.train_split, "train"), auto(config.val_split, "val"), auto(config.test_split, "test")
        )

    def scan_classes(self, config) -> list[str]:
        train_split, _, _ = self.resolve_splits(config)
        dataset = build_classification_dataset(
            config.data, train_split, None, config.layout, num_classes=config.num_classes
        )
        if len(dataset) == 0:
            raise DataError(f"the training data at {dataset.root} holds no images.")
        return list(dataset.classes)

    def build_data(self, config, model) -> TaskData:
        train_split, val_split, test_split = self.resolve_splits(config)
        data_config = model.data_config
        size = tuple(data_config["input_size"][1:])
        train_tf = build_transforms(data_config, size, config.augmentation, train=True)
        eval_tf = build_transforms(data_config, size, config.augmentation, train=False)
        root = config.data
        train = build_classification_dataset(root, train_split, train_tf, config.layout, num_classes=config.num_classes)
        if len(train) == 0:
            raise DataError(f"the training data at {train.root} holds no images.")
        classes = list(train.classes)
        if config.num_classes is not None:
            check_num_classes(train, config.num_classes)
        val = test = None
        if config.val_fraction is not None:
            # the validation images must not get the training set's random transform: build a twin of the
            # training set with the eval transform and take the same indices from it
            twin = build_classification_dataset(root, train_split, eval_tf, config.layout, classes=classes)
            train_sub, val_sub = split_train_val(train, val_fraction=config.val_fraction, seed=config.split_seed)
            train, val = train_sub, ClassificationSubset(twin, val_sub.indices)
        elif val_split is not None:
            val = build_classification_dataset(root, val_split, eval_tf, config.layout, classes=classes)
        if test_split is not None:
            test = build_classification_dataset(root, test_split, eval_tf, config.layout, classes=classes)
        for name, ds in (("validation", val), ("test", test)):
            if ds is not None and len(ds) == 0:
                raise DataError(f"the {name} split of {root} holds no images.")
        train, val = _first(train, config.train_limit), _first(val, config.val_limit)
        splits = {
            "train": train_split,
            "val": f"{config.val_fraction} of train" if config.val_fraction is not None else val_split,
            "test": test_split,
        }
        data = TaskData(train, val, test, classes, source=str(root), splits=splits)
        inspect_data(data)
        self.prepare(data)
        return data

    def prepare(self, data: TaskData) -> None:
        """Compute what the loss needs from the training split (``class_weights: auto``)."""
        self.weight = loss_weights(self.options.class_weights, data)
        if self.weight is not None:
            logger.info("class weights: %s", [round(w, 4) for w in self.weight.tolist()])

    def eval_dataset(self, model, info, data, split, layout) -> Dataset:
        if split == "auto":
            split = "test" if self.split_available(Path(data), "test") else None
        tf = build_transforms(model.data_config, tuple(model.config.img_size), info["augmentation"], train=False)
        dataset = build_classification_dataset(data, split, tf, layout, classes=info["classes"])
        if len(dataset) == 0:
            raise DataError(f"no images to evaluate at {data} (split {split!r}).")
        check_num_classes(dataset, model.config.num_classes)
        dataset.split = split  # type: ignore[attr-defined]
        return dataset

    # -- training and evaluation ---------------------------------------------------------------------------------
    def step(self, model, batch) -> StepOutput:
        images, labels = batch
        logits = model(images)
        num_classes = logits.shape[-1]
        if bool(((labels < 0) | (labels >= num_classes)).any()):
            raise DataError(
                f"a training label ({labels.min().item()}..{labels.max().item()}) is outside the model's "
                f"{num_classes} classes; check the labels or num_classes."
            )
        weight = self.weight.to(logits.device) if self.weight is not None else None
        loss = F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=self.options.label_smoothing)
        correct = (logits.detach().argmax(-1) == labels).sum()
        return StepOutput(loss=loss, count=len(labels), sums={"correct": correct})

    def train_metrics(self, sums, count) -> dict[str, float]:
        return {"top1": sums["correct"] / count} if count else {}

    def evaluator(self, model, dataset, classes) -> Evaluator:
        return ClassificationEvaluator(len(classes))

    def summary_line(self, metrics) -> str:
        return f"top-1 {metrics['top1']:.1%}, mean class acc {metrics['mean_class_acc']:.1%}"

    per_class_name = "recall"

    def per_class(self, metrics, classes) -> dict[str, float | None]:
        return dict(zip(classes, metrics.get("per_class") or [], strict=False))

    def collapse_warnings(self, metrics, classes) -> list[str]:
        support, predicted = metrics.get("support") or [], metrics.get("predicted") or []
        if not support or not metrics.get("count"):
            return []
        warnings = []
        never = [c for c, s, p in zip(classes, support, predicted, strict=True) if s > 0 and p == 0]
        if never:
            warnings.append(f"{len(never)} class(es) never predicted: {', '.join(never[:8])}")
        majority = max(support) / sum(support)
        if len([s for s in support if s > 0]) > 1 and metrics["top1"] <= majority + 1e-9:
            top = classes[support.index(max(support))]
            warnings.append(
                f"top-1 {metrics['top1']:.1%} is no better than always predicting the majority class {top!r} "
                f"({majority:.1%}): the model has not learnt to tell the classes apart"
            )
        return warnings

    # -- the tap cache ----------------------------------------------------------------------------------------------
    def cache_inputs(self, model, batch):
        images, labels = batch
        return images, [torch.as_tensor(y) for y in labels], [{} for _ in labels]

    # -- saved adapters ------------------------------------------------------------------------------------------
    def inference_info(self, config) -> dict[str, Any]:
        return {"augmentation": config.augmentation}

    def predict_rows(
        self,
        model,
        info: dict[str, Any],
        images: list[Path],
        *,
        top_k: int = 5,
        batch_size: int = 64,
        workers: int = 0,
        augmentation: str | None = None,
        autocast=None,
    ) -> list[dict[str, Any]]:
        """One record per image: ``{"path", "label", "score", "top_k": [(label, score), ...]}`` (softmax scores)."""
        classes = info["classes"]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}.")
        tf = build_transforms(
            model.data_config, tuple(model.config.img_size), augmentation or info["augmentation"], train=False
        )
        loader = DataLoader(_ImageList(images, tf), batch_size=batch_size, shuffle=False, num_workers=workers)
        device = next(model.parameters()).device
        outputs: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
        with torch.inference_mode():
            for batch, indices in loader:
                with autocast if autocast is not None else _null():
                    logits = model(batch.to(device))
                for i, row in zip(indices.tolist(), logits.float().cpu(), strict=True):
                    outputs[i] = row
        return rows_from_logits(outputs, images, classes, top_k)

    def predict(self, model, info, images, output, **options) -> dict[str, Any]:
        """Write ``output`` (a CSV file, ``-`` for stdout): ``path, label, score, label_2, score_2, ...``."""
        rows = self.predict_rows(model, info, images, **options)
        write_predictions_csv(rows, output)
        return {"images": len(rows), "files": [] if str(output) == "-" else [str(output)], "rows": rows}

    def write_outputs(self, outputs, info, images, output, *, top_k: int = 5, **_: Any) -> dict[str, Any]:
        """The files of :meth:`predict` from outputs computed elsewhere (one (K,) logit row per image; a shared
        backbone pass of :class:`sidetune.MultiTask`); ``output`` a folder: ``predictions.csv`` in it."""
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        rows = rows_from_logits(list(outputs), images, info["classes"], top_k)
        write_predictions_csv(rows, out / "predictions.csv")
        return {"images": len(rows), "files": [str(out / "predictions.csv")], "rows": rows}


def rows_from_logits(logits: Sequence[torch.Tensor], images: Sequence[Path], classes: Sequence[str], top_k: int):
    """One record per image: ``{"path", "label", "score", "top_k": [(label, score), ...]}`` (softmax scores)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}.")
    k = min(top_k, len(classes))
    rows = []
    for path, row in zip(images, logits, strict=True):
        scores, labels = row.float().softmax(-1).topk(k)
        s, y = scores.tolist(), labels.tolist()
        rows.append(
            {
                "path": str(path),
                "label": classes[y[0]],
                "score": s[0],
                "top_k": [(classes[c], p) for c, p in zip(y, s, strict=True)],
            }
        )
    return rows


def write_predictions_csv(rows: list[dict[str, Any]], output: str | os.PathLike) -> None:
    """The CSV of :meth:`ClassificationTask.predict`; text cells that a spreadsheet would run as a formula are
    neutralised with a leading ``'``."""
    k = max((len(r["top_k"]) for r in rows), default=1)
    header = ["path", "label", "score"] + [f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "score")]
    to_stdout = str(output) == "-"
    f = sys.stdout if to_stdout else open(output, "w", newline="")  # noqa: SIM115
    try:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            extra = [v for label, score in r["top_k"][1:] for v in (safe_cell(label), f"{score:.6f}")]
            writer.writerow([safe_cell(r["path"]), safe_cell(r["label"]), f"{r['score']:.6f}", *extra])
    finally:
        if not to_stdout:
            f.close()


def safe_cell(text: str) -> str:
    """A CSV cell that spreadsheets show as text: a leading ``= + - @`` (or tab/CR) is prefixed with ``'``."""
    text = str(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _ImageList(Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index])), index


def _first(dataset: Dataset | None, n: int | None) -> Dataset | None:
    """The first ``n`` images of a split in a seeded order that mixes the classes (the folder order would keep
    the first classes only)."""
    if dataset is None or n is None or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].sort().values.tolist()
    base = dataset.dataset if isinstance(dataset, ClassificationSubset) else dataset
    indices = [dataset.indices[i] for i in order] if isinstance(dataset, ClassificationSubset) else order
    return ClassificationSubset(base, indices)
