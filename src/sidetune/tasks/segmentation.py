"""Semantic segmentation metrics: mean IoU, per-class IoU and pixel accuracy from a confusion matrix.

IoU of class ``c`` is ``TP / (TP + FP + FN)`` accumulated over the whole evaluation set (not averaged per
image), the convention of mmsegmentation and of the papers' ADE20K / CamVid numbers. Pixels labelled
``ignore_index`` are not counted. A class that occurs neither in the labels nor in the predictions has no IoU
(``nan``) and is left out of the mean; a class that is predicted but never occurs has IoU 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError, require_positive_int
from ..heads.segmentation import IGNORE_INDEX

__all__ = ["SegmentationMetrics", "confusion_matrix", "iou_from_confusion", "mean_iou"]


def confusion_matrix(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class.

    Args:
        preds: (B, H, W) predicted labels, or (B, K, H, W) logits (argmax over K is taken).
        target: (B, H, W) labels in ``[0, K)`` or ``ignore_index``.
        num_classes: K.
        ignore_index: the label that is not counted.
    """
    if preds.ndim == target.ndim + 1:
        preds = preds.argmax(1)
    if preds.shape != target.shape:
        raise ConfigError(f"predictions {tuple(preds.shape)} and labels {tuple(target.shape)} differ in shape.")
    keep = target != ignore_index
    t, p = target[keep].long(), preds[keep].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ConfigError(f"labels outside [0, {num_classes}) other than ignore_index={ignore_index} were given.")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ConfigError(f"predicted labels outside [0, {num_classes}) were given.")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """(K,) float IoU per class from a (K, K) confusion matrix; nan for a class in neither labels nor predictions."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).float()


def mean_iou(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[float, torch.Tensor]:
    """Mean IoU (over classes with an IoU) and the (K,) per-class IoU of one batch of predictions."""
    iou = iou_from_confusion(confusion_matrix(preds, target, num_classes, ignore_index))
    return float(iou.nanmean()), iou


class SegmentationMetrics:
    """Accumulates a confusion matrix over batches; :meth:`compute` gives mIoU, per-class IoU and accuracies.

    Args:
        num_classes: K.
        ignore_index: the label that is not counted.
        class_names: names for the per-class results (default ``"0"``, ``"1"``, ...).

    Example:
        >>> metrics = SegmentationMetrics(11)
        >>> for images, masks in loader:
        ...     metrics.update(model(images), masks)
        >>> metrics.compute()["mIoU"]
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None
    ) -> None:
        require_positive_int("num_classes", num_classes, "SegmentationMetrics")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"SegmentationMetrics: {len(class_names)} class names for {num_classes} classes.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = (
            [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self.confusion = torch.zeros((num_classes, num_classes), dtype=torch.long)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds`` (B, H, W) labels or (B, K, H, W) logits, ``target`` (B, H, W) labels."""
        self.confusion += confusion_matrix(preds.detach(), target, self.num_classes, self.ignore_index).cpu()

    def compute(self) -> dict[str, float | dict[str, float]]:
        """``mIoU``, ``mAcc`` (mean per-class recall), ``aAcc`` (pixel accuracy), ``IoU`` (name -> IoU; nan: absent)."""
        cm = self.confusion.double()
        iou = iou_from_confusion(self.confusion)
        support = cm.sum(1)
        recall = torch.where(support > 0, cm.diagonal() / support.clamp(min=1), torch.full_like(support, float("nan")))
        total = cm.sum()
        return {
            "mIoU": float(iou.nanmean()) if total > 0 else float("nan"),
            "mAcc": float(recall.nanmean()) if total > 0 else float("nan"),
            "aAcc": float(cm.diagonal().sum() / total) if total > 0 else float("nan"),
            "IoU": {name: float(v) for name, v in zip(self.class_names, iou, strict=True)},
        }
