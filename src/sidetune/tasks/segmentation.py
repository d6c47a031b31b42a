"""Semantic segmentation: mask datasets, pixel cross-entropy, mIoU from a confusion matrix, PNG mask predictions.

The task (:class:`SegmentationTask`): ``(image, mask)`` batches; the model maps (B, 3, H, W) images to
(B, K, H, W) logits (UPerNet on the method's pyramid). Training crops scale-jittered images to the model's
size (``augmentation: standard``) or resizes whole images (``none``); validation predicts each image at its
own resolution (whole-image resize or sliding window, ``eval_mode``) and scores it there. The best checkpoint
is the highest mIoU. Predictions are palette PNG masks (pixel value = class index) and overlays.

Metrics: mean IoU, per-class IoU and pixel accuracy from a confusion matrix.

IoU of class ``c`` is ``TP / (TP + FP + FN)`` accumulated over the whole evaluation set (not averaged per
image), the convention of mmsegmentation and of the papers' ADE20K / CamVid numbers. Pixels labelled
``ignore_index`` are not counted. A class that occurs neither in the labels nor in the predictions has no IoU
(``nan``) and is left out of the mean; a class that is predicted but never occurs has IoU 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..cache.batch import CachedTaps
from ..data import (
    LAYOUTS,
    build_segmentation_dataset,
    build_segmentation_transforms,
    load_rgb,
)
from ..errors import ConfigError, require_positive_int
from ..heads.segmentation import IGNORE_INDEX, predict_segmentation, segmentation_loss
from .base import DenseTask, Evaluator, StepOutput, TaskData
from .classification import check_class_weights, loss_weights

logger = logging.getLogger(__name__)

__all__ = [
    "SegmentationMetrics",
    "SegmentationOptions",
    "SegmentationTask",
    "confusion_matrix",
    "iou_from_confusion",
    "mean_iou",
    "palette",
]


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


# -- the task ---------------------------------------------------------------------------------------------------


@dataclass
class SegmentationOptions:
    """``task_options`` of a segmentation run.

    Attributes:
        eval_mode: inference at full resolution: ``whole`` (resize the image to the model's size and the logits
            back) or ``slide`` (overlapping windows of the model's size).
        class_weights: None, ``"auto"`` (inverse pixel frequency of the training masks, mean 1), ``"sqrt"`` (its
            square root: softer) or one weight per class: for classes that cover few pixels (thin structures), which
            otherwise collapse to the majority.
    """

    eval_mode: str = "whole"
    class_weights: str | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.eval_mode not in ("whole", "slide"):
            raise ConfigError(f"eval_mode must be 'whole' or 'slide', got {self.eval_mode!r}.")
        self.class_weights = check_class_weights(self.class_weights)


class SegmentationEvaluator(Evaluator):
    """Confusion matrix of whole-resolution predictions; processes merge by summing their matrices."""

    def __init__(self, model, classes: list[str], mode: str) -> None:
        self.metrics = SegmentationMetrics(len(classes), class_names=classes)
        self.size = tuple(model.config.img_size)
        self.mode = mode

    def update(self, model, batch) -> None:
        images, masks = batch
        if isinstance(images, CachedTaps):  # taps of the resized images: the rest of whole-image inference
            logits = model(images)
            for i, mask in enumerate(masks):
                up = F.interpolate(logits[i : i + 1], tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)
                self.metrics.update(up.argmax(1).cpu(), mask[None].cpu())
            return
        device = next(model.parameters()).device
        for group in _same_size_groups(images):
            x = torch.stack([images[i] for i in group]).to(device)
            logits = predict_segmentation(model, x, self.size, mode=self.mode)
            self.metrics.update(logits.argmax(1).cpu(), torch.stack([masks[i].cpu() for i in group]))

    def state(self) -> torch.Tensor:
        return self.metrics.confusion

    def compute(self, states) -> dict[str, Any]:
        self.metrics.confusion = sum(states, torch.zeros_like(self.metrics.confusion))
        result: dict[str, Any] = self.metrics.compute()
        result["count"] = None  # filled by the loop (images scored)
        support = self.metrics.confusion.sum(1)
        predicted = self.metrics.confusion.sum(0)
        result["pixels"] = {n: int(v) for n, v in zip(self.metrics.class_names, support.tolist(), strict=True)}
        result["predicted_pixels"] = {
            n: int(v) for n, v in zip(self.metrics.class_names, predicted.tolist(), strict=True)
        }
        total = int(support.sum())
        result["majority_aAcc"] = float(support.max() / total) if total else float("nan")
        return result


def _same_size_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return list(groups.values())


def _stack_collate(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def _list_collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


class SegmentationTask(DenseTask):
    name = "segmentation"
    description = "a class per pixel: UPerNet on the method's pyramid, pixel cross-entropy, mIoU"
    options_cls = SegmentationOptions
    layouts: ClassVar[dict[str, str]] = {
        "auto": "guess from the folder: <split>annot/, images/+annotations/, ImageSets/Segmentation/, masks/",
        **LAYOUTS["segmentation"],
    }
    augmentations = ("standard", "none")
    headline = "mIoU"
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 8, "weight_decay": 0.05, "workers": 0}
    predict_options = ("eval_mode",)

    def __init__(self, options: SegmentationOptions) -> None:
        super().__init__(options)
        self.weight: torch.Tensor | None = None

    # -- data ----------------------------------------------------------------------------------------------------
    def split_available(self, root: Path, split: str) -> bool:
        return any(
            p.exists()
            for p in (
                root / split,
                root / f"{split}annot",
                root / "images" / split,
                root / "ImageSets" / "Segmentation" / f"{split}.txt",
            )
        )

    def dataset(self, root, split: str, layout: str, transform) -> Dataset:
        """One split of a segmentation dataset in ``layout`` with ``transform`` (joint image + mask)."""
        return build_segmentation_dataset(root, split, transform, layout=layout)  # type: ignore[arg-type]

    def transforms(self, model, augmentation: str, train: bool):
        dc = model.data_config
        size = tuple(model.config.img_size)
        if train and augmentation == "standard":
            return build_segmentation_transforms(size, train=True, mean=dc["mean"], std=dc["std"])
        # evaluation keeps each image's size (scored at full resolution); `none` trains on whole resized images
        return build_segmentation_transforms(size, train=False, mean=dc["mean"], std=dc["std"], resize_eval=train)

    def prepare(self, data: TaskData) -> None:
        """``class_weights``: ``auto`` is the inverse pixel frequency of the training masks (ignored pixels out)."""
        self.weight = loss_weights(self.options.class_weights, data)
        if self.weight is not None:
            logger.info("class weights: %s", [round(w, 4) for w in self.weight.tolist()])

    def collate(self, batch):
        return _stack_collate(batch)

    def eval_collate(self, batch):
        return _list_collate(batch)  # evaluation images keep their own sizes

    # -- training and evaluation ---------------------------------------------------------------------------------
    def step(self, model, batch) -> StepOutput:
        images, masks = batch
        weight = self.weight.to(images.device) if self.weight is not None else None
        loss = segmentation_loss(model(images), masks, class_weights=weight)
        return StepOutput(loss=loss, count=len(images))

    def evaluator(self, model, dataset, classes) -> Evaluator:
        return SegmentationEvaluator(model, classes, self.options.eval_mode)

    def summary_line(self, metrics) -> str:
        return f"mIoU {metrics['mIoU']:.4f}, mAcc {metrics['mAcc']:.4f}, aAcc {metrics['aAcc']:.4f}"

    per_class_name = "IoU"

    def per_class(self, metrics, classes) -> dict[str, float | None]:
        return dict(metrics.get("IoU") or {})

    def collapse_warnings(self, metrics, classes) -> list[str]:
        pixels, predicted = metrics.get("pixels") or {}, metrics.get("predicted_pixels") or {}
        present = [c for c, n in pixels.items() if n > 0]
        if len(present) < 2:
            return []
        warnings = []
        never = [c for c in present if predicted.get(c, 0) == 0]
        if never:
            warnings.append(f"{len(never)} class(es) never predicted: {', '.join(never[:8])}")
        predicted_classes = [c for c, n in predicted.items() if n > 0]
        if len(predicted_classes) <= 1 or metrics["aAcc"] <= metrics.get("majority_aAcc", 0.0) + 1e-9:
            majority = max(pixels, key=pixels.get)
            warnings.append(
                f"the model does no better than labelling every pixel {majority!r} (pixel accuracy "
                f"{metrics['aAcc']:.3f}, majority share {metrics.get('majority_aAcc', float('nan')):.3f}): it has "
                "collapsed to the majority class; try --class-weights auto, a higher --lr or more epochs"
            )
        return warnings

    # -- the tap cache ----------------------------------------------------------------------------------------------
    def check_cacheable(self, config) -> None:
        if self.options.eval_mode == "slide":
            raise ConfigError(
                "--eval-mode slide runs the model on several windows of each image, which a tap cache does not hold; "
                "cache with --eval-mode whole."
            )

    def cache_inputs(self, model, batch):
        images, masks = batch
        size = tuple(model.config.img_size)
        if isinstance(images, torch.Tensor):  # training batches: crops or resized images at the model's size
            x = images
        else:  # evaluation: each image resized as whole-image inference resizes it; the mask keeps its size
            x = torch.stack([
                im if tuple(im.shape[-2:]) == size
                else F.interpolate(im[None], size, mode="bilinear", align_corners=False)[0]
                for im in images
            ])  # fmt: skip
        targets = [m.to(torch.uint8) if int(m.max()) <= 255 and int(m.min()) >= 0 else m for m in masks]
        return x, targets, [{} for _ in targets]

    # -- saved adapters ------------------------------------------------------------------------------------------
    def inference_info(self, config) -> dict[str, Any]:
        return {"layout": config.layout, "eval_mode": self.options.eval_mode}

    @torch.no_grad()
    def predict(self, model, info, images, output, *, eval_mode: str | None = None, autocast=None, alpha=0.5):
        """Write ``<stem>.png`` (palette PNG, pixel value = class index) and ``<stem>_overlay.png`` per image."""
        from torchvision.transforms.functional import pil_to_tensor

        device = next(model.parameters()).device
        mode = eval_mode or info.get("eval_mode", "whole")
        mean = torch.tensor(model.data_config["mean"]).view(3, 1, 1)
        std = torch.tensor(model.data_config["std"]).view(3, 1, 1)
        outputs = []
        for path in images:
            x = pil_to_tensor(load_rgb(path)).float().div(255)
            with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
                logits = predict_segmentation(
                    model, ((x - mean) / std)[None].to(device), tuple(model.config.img_size), mode=mode
                )
            outputs.append(logits[0].float().cpu())
        return self.write_outputs(outputs, info, images, output, alpha=alpha)

    def write_outputs(self, outputs, info, images, output, *, alpha: float = 0.5, **_: Any) -> dict[str, Any]:
        """The files of :meth:`predict` from (K, H, W) logits at each image's size, computed elsewhere (a shared
        backbone pass of :class:`sidetune.MultiTask`)."""
        from PIL import Image

        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        colours = palette(len(info["classes"]))
        written: list[str] = []
        for path, logits in zip(images, outputs, strict=True):
            rgb = np.asarray(load_rgb(path))
            labels = logits.argmax(0).numpy().astype(np.uint8)
            mask = Image.fromarray(labels, mode="P")
            flat = colours.reshape(-1).tolist()
            mask.putpalette(flat + [0] * (768 - len(flat)))
            stem = _unique_stem(path, images)
            mask_path = out / f"{stem}.png"
            mask.save(mask_path)
            blend = (1 - alpha) * rgb.astype(np.float32) + alpha * colours[labels].astype(np.float32)
            overlay_path = out / f"{stem}_overlay.png"
            Image.fromarray(blend.clip(0, 255).astype(np.uint8)).save(overlay_path)
            written += [str(mask_path), str(overlay_path)]
        return {"images": len(images), "files": written}


def _unique_stem(path: Path, images: Sequence[Path]) -> str:
    """The output name of an image: its stem, or its path below the common folder when stems collide."""
    stems = [p.stem for p in images]
    if stems.count(path.stem) == 1:
        return path.stem
    common = Path(*Path(images[0]).parent.parts[: _common_depth(images)])
    return "__".join(path.relative_to(common).with_suffix("").parts)


def _common_depth(paths: Sequence[Path]) -> int:
    parts = [Path(p).parent.parts for p in paths]
    depth = 0
    while all(len(p) > depth for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    return depth


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
