"""Class balance of a split: per-class counts in the unit the loss sees, and class-balanced loss weights.

The unit is what one class "weighs" in the task's loss: **images** for classification (one label each; **clips** for
video),
**pixels** for segmentation (every scored pixel of every mask; pixels at the ignore index, 255, are counted
apart), **boxes** for detection. :func:`count_classes` reads a split once (for segmentation it decodes every
mask, which costs about as much as one pass of a data loader without the images), :func:`class_weights` turns
the counts into loss weights.

When to use class weights (``--class-weights auto``): when a class is much rarer than another in the training
split, an unweighted cross-entropy is minimised well by predicting the frequent class everywhere, and a small
adapter trained for few epochs often does exactly that (a segmentation model that paints every pixel as
background scores the background's share as pixel accuracy and 0 IoU on the rest). Inverse-frequency weights
make every class contribute equally to the loss, trading some accuracy on the frequent classes for recall on
the rare ones: use them when the per-class metric (IoU per class, per-class recall) matters more than overall
accuracy, or when a run's per-class metrics show a class that is never predicted. Leave them off for balanced
data (they are then all close to 1 and change little) and when the headline is overall accuracy. With extreme
imbalance (a ratio of thousands) plain inverse frequency can make the loss noisy; ``power=0.5`` (inverse square
root) is the usual softer choice.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError
from .classification import ClassificationDataset
from .detection import DetectionDataset
from .files import unwrap
from .segmentation import IGNORE_INDEX, SegmentationDataset
from .video import VideoClipDataset

logger = logging.getLogger(__name__)

__all__ = ["ClassCounts", "class_weights", "count_classes", "mask_histogram", "task_of", "unwrap"]

Kind = Literal["auto", "labels", "pixels"]
_UNITS = {
    "classification": "images",
    "segmentation": "pixels",
    "detection": "boxes",
    "instance": "boxes",
    "video": "clips",
}


@dataclass
class ClassCounts:
    """Per-class counts of one split.

    Attributes:
        task: ``classification``, ``segmentation``, ``detection``, ``instance`` or ``video``.
        classes: the K class names.
        unit: what ``counts`` counts: ``images``, ``pixels``, ``boxes`` or ``clips``.
        counts: per class, in ``unit`` (pixels at the ignore index excluded).
        images_with: per class, the images holding at least one of it (equals ``counts`` for classification).
        images: images in the split.
        ignored: pixels at the ignore index (segmentation; 0 otherwise).
        all_void: masks with no scored pixel (every pixel ignored), by path (segmentation).
        without_boxes: images with no box (detection).
    """

    task: str
    classes: list[str]
    unit: str
    counts: list[int]
    images_with: list[int]
    images: int
    ignored: int = 0
    all_void: list[str] = field(default_factory=list)
    without_boxes: int = 0

    @property
    def total(self) -> int:
        """All counted units (scored pixels, labelled images, boxes)."""
        return int(sum(self.counts))

    @property
    def present(self) -> list[int]:
        """Indices of the classes with at least one count."""
        return [k for k, n in enumerate(self.counts) if n > 0]

    def imbalance(self) -> float | None:
        """Largest count over smallest, among the classes present; None with fewer than two classes present."""
        present = [self.counts[k] for k in self.present]
        return max(present) / min(present) if len(present) >= 2 else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_masks(cls, classes: Sequence[str], masks: Sequence[str], histograms: Sequence[np.ndarray]) -> ClassCounts:
        """Counts of a segmentation split from each mask's histogram of label values 0..255 (255: ignored).

        Args:
            classes: the K class names.
            masks: the mask paths, one per histogram (named in ``all_void``).
            histograms: per mask, ``np.bincount(labels, minlength=256)``.
        """
        k = len(classes)
        pixels = np.zeros(IGNORE_INDEX + 1, dtype=np.int64)
        images_with = np.zeros(k, dtype=np.int64)
        all_void = []
        for path, hist in zip(masks, histograms, strict=True):
            pixels += hist
            images_with += hist[:k] > 0
            if not hist[:k].any():
                all_void.append(str(path))
        return cls(
            "segmentation",
            [str(c) for c in classes],
            "pixels",
            pixels[:k].tolist(),
            images_with.tolist(),
            len(masks),
            ignored=int(pixels[IGNORE_INDEX]),
            all_void=all_void,
        )


def task_of(dataset: Any) -> str:
    """The task a dataset from :mod:`sidetune.data` serves (``instance`` for a detection dataset with masks).

    Raises:
        ConfigError: a dataset of an unknown kind (one without ``samples`` of ``(path, int label)``).
    """
    base, _ = unwrap(dataset)
    if isinstance(base, SegmentationDataset):
        return "segmentation"
    if isinstance(base, DetectionDataset):
        return "instance" if base.masks else "detection"
    if isinstance(base, VideoClipDataset):
        return "video"
    if isinstance(base, ClassificationDataset) or hasattr(dataset, "targets"):
        return "classification"
    raise ConfigError(
        f"cannot tell the task of a {type(base).__name__}: pass a dataset built by sidetune.data (classification, "
        "segmentation or detection)."
    )


def mask_histogram(dataset: SegmentationDataset, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Counts of every label value 0..255 in mask ``index`` of a segmentation dataset (255: ignored).

    Args:
        dataset: the dataset (not a Subset).
        index: the sample.
        image_size: the image's (width, height), to check the mask's size against.

    Raises:
        DataError: the mask cannot be read or holds values outside the classes.
    """
    labels = dataset.load_mask(index, image_size).numpy()
    return np.bincount(labels.ravel(), minlength=IGNORE_INDEX + 1)


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def count_classes(dataset: Any, *, workers: int | None = None) -> ClassCounts:
    """Per-class counts of a split, in the unit its loss sees (images, pixels or boxes).

    Args:
        dataset: a dataset from :mod:`sidetune.data` (or a ``Subset`` of one, e.g. a training split carved off).
        workers: threads decoding masks (segmentation); default ``min(8, CPUs)``.

    Returns:
        The counts.

    Raises:
        DataError: a mask cannot be read or holds values outside the classes (the same error training raises).
    """
    task = task_of(dataset)
    base, indices = unwrap(dataset)
    classes = [str(c) for c in base.classes]
    k = len(classes)
    if task == "video":
        labels = [base.clips[i][1] for i in indices]
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)[:k].tolist() if labels else [0] * k
        return ClassCounts(task, classes, "clips", counts, list(counts), len(indices))
    if task == "classification":
        labels = [int(base.samples[i][1]) if hasattr(base, "samples") else int(base.targets[i]) for i in indices]
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)[:k].tolist() if labels else [0] * k
        return ClassCounts(task, classes, "images", counts, list(counts), len(indices))
    if task == "segmentation":
        with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
            histograms = list(pool.map(lambda i: mask_histogram(base, i), indices))
        return ClassCounts.from_masks(classes, [str(base.samples[i][1]) for i in indices], histograms)
    boxes = np.zeros(k, dtype=np.int64)
    images_with = np.zeros(k, dtype=np.int64)
    without = 0
    for i in indices:
        labels = np.asarray(base.records[i].labels, dtype=np.int64) - 1  # detection labels are 1..K
        hist = np.bincount(labels, minlength=k)[:k] if labels.size else np.zeros(k, dtype=np.int64)
        boxes += hist
        images_with += hist > 0
        without += int(labels.size == 0)
    return ClassCounts(
        task, classes, "boxes", boxes.tolist(), images_with.tolist(), len(indices), without_boxes=without
    )


def class_weights(
    dataset: Any, kind: Kind = "auto", *, power: float = 1.0, counts: ClassCounts | None = None
) -> torch.Tensor:
    """Class-balanced loss weights from a training split: inverse frequency, normalised to mean 1.

    ``w_k = n_k ** -power / mean_j(n_j ** -power)`` with ``n_k`` the count of class ``k`` (images for
    classification, scored pixels for segmentation: the ignore index is excluded). A class absent from the split
    gets the largest weight of the present classes (it is at least as rare as the rarest one seen), and a warning
    names it. Pass the result as ``weight=`` of ``torch.nn.functional.cross_entropy`` (with ``ignore_index=255``
    for segmentation). See the module docstring for when to use them.

    Worked example: counts ``[6, 3, 1]`` -> inverse ``[1/6, 1/3, 1]``, mean ``1/2`` -> weights ``[1/3, 2/3, 2]``.

    Args:
        dataset: the training split (a dataset from :mod:`sidetune.data` or a ``Subset`` of one); unused when
            ``counts`` is given.
        kind: what is counted: ``labels`` (classification), ``pixels`` (segmentation) or ``auto`` (the one that
            fits the dataset).
        power: 1 for inverse frequency, 0.5 for inverse square root (softer), 0 for no weighting.
        counts: the split's :func:`count_classes`, when already computed (saves decoding the masks again).

    Returns:
        (K,) float32 weights, mean 1.

    Raises:
        ConfigError: ``kind`` does not fit the dataset (detection has no class-weighted loss here), a negative
            ``power``, or no class has a single count.
    """
    if kind not in ("auto", "labels", "pixels"):
        raise ConfigError(f"unknown class-weight kind {kind!r}; choose from 'auto', 'labels', 'pixels'.")
    if not 0.0 <= power <= 4.0 or not np.isfinite(power):
        raise ConfigError(f"class-weight power must be in [0, 4] (1: inverse frequency), got {power!r}.")
    counts = counts if counts is not None else count_classes(dataset)
    wanted = {"classification": "labels", "video": "labels", "segmentation": "pixels"}.get(counts.task)
    if wanted is None:
        raise ConfigError(
            f"class weights apply to classification (labels) and segmentation (pixels), not {counts.task}: the "
            "torchvision detectors weigh their own losses."
        )
    if kind != "auto" and kind != wanted:
        raise ConfigError(f"class weights of kind {kind!r} do not fit a {counts.task} dataset; use {wanted!r}.")
    n = np.asarray(counts.counts, dtype=np.float64)
    if not (n > 0).any():
        raise ConfigError(f"no class has a single {counts.unit[:-1]} in the split: there is nothing to weigh.")
    raw = np.zeros_like(n)
    raw[n > 0] = n[n > 0] ** -power
    absent = [counts.classes[k] for k in np.flatnonzero(n == 0)]
    if absent:
        raw[n == 0] = raw.max()
        warnings.warn(
            f"class(es) {absent} have no {counts.unit} in the training split; they get the largest class weight.",
            stacklevel=2,
        )
    weights = raw / raw.mean()
    logger.info("class weights (%s, power %g): %s", counts.unit, power, np.round(weights, 4).tolist())
    return torch.tensor(weights, dtype=torch.float32)
