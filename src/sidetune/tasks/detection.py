"""Detection and instance segmentation metrics: COCO box and mask mAP, computed by pycocotools' ``COCOeval``.

Predictions are torchvision's detector outputs: per image a dict with ``boxes`` (N, 4) XYXY in the image's
own pixels, ``scores`` (N,), ``labels`` (N,) in 1..K and, for masks, ``masks`` (N, 1, H, W) probabilities
(binarised at ``mask_threshold``) or (N, H, W) binary masks. The ground truth is a pycocotools ``COCO`` whose
category ids are the labels 1..K: :func:`sidetune.data.to_coco` builds one from a dataset (original image
coordinates, which is where the detectors' predictions are), :func:`coco_ground_truth` from torchvision-format
targets (the coordinates of whatever the targets are in). Pass ``label_to_category`` when the ground truth
keeps other category ids (e.g. a COCO file's own ``COCO`` object with ``CocoDetectionDataset.category_ids``).

Results (``compute``) are the twelve COCO numbers per IoU type, named ``{bbox,segm}_{mAP, mAP_50, mAP_75,
mAP_small, mAP_medium, mAP_large, AR_1, AR_10, AR_100, AR_small, AR_medium, AR_large}``; a number COCOeval
cannot compute (no ground truth of that size) is ``nan``. With no detections at all every number is 0.0
(pycocotools cannot load an empty result list).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data.detection import make_coco
from ..errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["IOU_TYPES", "STAT_NAMES", "CocoEvaluator", "coco_evaluate", "coco_ground_truth", "to_coco_results"]

IOU_TYPES = ("bbox", "segm")
#: COCOeval.stats, in order.
STAT_NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large",
    "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip


def _check_iou_types(iou_types: Sequence[str]) -> tuple[str, ...]:
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise ConfigError(f"unknown IoU type(s) {bad or list(iou_types)}; choose from {IOU_TYPES}.")
    return tuple(iou_types)


def _binary_masks(masks: torch.Tensor, threshold: float) -> np.ndarray:
    """(N, 1, H, W) probabilities or (N, H, W) masks -> (H, W, N) Fortran-ordered uint8, as pycocotools wants."""
    if masks.ndim == 4:
        masks = masks[:, 0]
    binary = (masks > threshold) if masks.is_floating_point() else masks.bool()
    return np.asfortranarray(binary.permute(1, 2, 0).cpu().numpy().astype(np.uint8))


def _rles(masks: torch.Tensor, threshold: float) -> list[dict[str, Any]]:
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(_binary_masks(masks, threshold))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # JSON-safe, and what pycocotools accepts back
    return rles


def to_coco_results(
    outputs: Iterable[Mapping[str, torch.Tensor]],
    image_ids: Iterable[int],
    *,
    iou_types: Sequence[str] = ("bbox",),
    label_to_category: Mapping[int, int] | Sequence[int] | None = None,
    mask_threshold: float = 0.5,
) -> dict[str, list[dict[str, Any]]]:
    """torchvision outputs -> COCO result entries per IoU type (``{"bbox": [...], "segm": [...]}``).

    Args:
        outputs: per image, ``boxes``, ``scores``, ``labels`` (and ``masks`` for ``"segm"``).
        image_ids: the image id of each output.
        iou_types: ``"bbox"`` and/or ``"segm"``.
        label_to_category: label -> category id (a mapping, or a sequence indexed by ``label - 1``); None: identity.
        mask_threshold: probability above which a mask pixel is on.
    """
    iou_types = _check_iou_types(iou_types)
    if label_to_category is None:
        category = int
    elif isinstance(label_to_category, Mapping):
        category = lambda label: int(label_to_category[label])  # noqa: E731
    else:
        category = lambda label: int(label_to_category[label - 1])  # noqa: E731
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in iou_types}
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].detach().float().cpu()
        scores = output["scores"].detach().float().cpu().tolist()
        labels = [category(int(label)) for label in output["labels"].tolist()]
        image_id = int(image_id)
        if "bbox" in results:
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            results["bbox"] += [
                {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                for b, c, s in zip(xywh, labels, scores, strict=True)
            ]
        if "segm" in results:
            if "masks" not in output:
                raise ConfigError("IoU type 'segm' needs 'masks' in every output (a Mask R-CNN).")
            rles = _rles(output["masks"].detach(), mask_threshold)
            results["segm"] += [
                {"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
                for r, c, s in zip(rles, labels, scores, strict=True)
            ]
    return results


def coco_ground_truth(targets: Iterable[Mapping[str, Any]], classes: Sequence[str] | int) -> COCO:
    """A pycocotools ground truth from torchvision-format targets (``boxes``, ``labels``, ``image_id``, optional
    ``masks`` (N, H, W)), in the targets' own coordinates.

    Args:
        targets: one per image; image size is taken from ``masks`` when present, else from ``size``
            ((H, W), optional) or the boxes' extent.
        classes: the K class names, or K.
    """
    names = [str(i + 1) for i in range(classes)] if isinstance(classes, int) else list(classes)
    images, annotations = [], []
    for target in targets:
        image_id = int(target["image_id"])
        boxes = torch.as_tensor(target["boxes"]).detach().float().cpu().reshape(-1, 4)
        masks = target.get("masks")
        if masks is not None:
            height, width = masks.shape[-2:]
        elif "size" in target:
            height, width = target["size"]
        else:
            height = int(boxes[:, 3].max().ceil()) if len(boxes) else 1
            width = int(boxes[:, 2].max().ceil()) if len(boxes) else 1
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        rles = _rles(torch.as_tensor(masks), 0.5) if masks is not None else None
        for j, (box, label) in enumerate(zip(boxes.tolist(), torch.as_tensor(target["labels"]).tolist(), strict=True)):
            ann = {
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            }
            if rles is not None:
                ann["segmentation"] = rles[j]
            annotations.append(ann)
    return make_coco(images, annotations, names)


def coco_evaluate(
    coco_gt: COCO,
    results: Mapping[str, list[dict[str, Any]]],
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """Run ``COCOeval`` per IoU type of ``results`` (from :func:`to_coco_results`); see the module docstring.

    Args:
        coco_gt: the ground truth.
        results: IoU type -> result entries.
        image_ids: evaluate on these images only (default: every image of the ground truth).
    """
    metrics: dict[str, float] = {}
    ids = sorted(set(int(i) for i in image_ids)) if image_ids is not None else sorted(coco_gt.getImgIds())
    for iou_type, entries in results.items():
        _check_iou_types([iou_type])
        if not entries:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in STAT_NAMES})
            continue
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # pycocotools prints progress and the summary table
            detections = coco_gt.loadRes(list(entries))
            evaluator = COCOeval(coco_gt, detections, iouType=iou_type)
            evaluator.params.imgIds = ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        logger.debug("COCOeval %s:\n%s", iou_type, log.getvalue())
        for name, value in zip(STAT_NAMES, evaluator.stats, strict=True):
            metrics[f"{iou_type}_{name}"] = float("nan") if value < 0 else float(value)
    return metrics


class CocoEvaluator:
    """Accumulates detector outputs batch by batch; :meth:`compute` runs COCOeval on the images seen.

    Args:
        coco_gt: the ground truth (:func:`sidetune.data.to_coco`).
        iou_types: ``("bbox",)`` for boxes, ``("bbox", "segm")`` for Mask R-CNN.
        label_to_category: see :func:`to_coco_results`.
        mask_threshold: see :func:`to_coco_results`.

    Example:
        >>> evaluator = CocoEvaluator(to_coco(val_set), iou_types=("bbox",))
        >>> for images, targets in loader:
        ...     evaluator.update(detector(images), targets)
        >>> evaluator.compute()["bbox_mAP"]
    """

    def __init__(
        self,
        coco_gt: COCO,
        iou_types: Sequence[str] = ("bbox",),
        *,
        label_to_category: Mapping[int, int] | Sequence[int] | None = None,
        mask_threshold: float = 0.5,
    ) -> None:
        self.coco_gt = coco_gt
        self.iou_types = _check_iou_types(iou_types)
        self.label_to_category = label_to_category
        self.mask_threshold = mask_threshold
        self.reset()

    def reset(self) -> None:
        self.results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}
        self.image_ids: list[int] = []

    @torch.no_grad()
    def update(
        self, outputs: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, Any]] | Sequence[int]
    ) -> None:
        """Add a batch: the detector's outputs and the targets (or just the image ids) of the same images."""
        ids = [int(t["image_id"]) if isinstance(t, Mapping) else int(t) for t in targets]
        unknown = [i for i in ids if i not in self.coco_gt.imgs]
        if unknown:
            raise ConfigError(f"image ids {unknown[:5]} are not in the ground truth; build it from the same dataset.")
        batch = to_coco_results(
            outputs,
            ids,
            iou_types=self.iou_types,
            label_to_category=self.label_to_category,
            mask_threshold=self.mask_threshold,
        )
        for t in self.iou_types:
            self.results[t] += batch[t]
        self.image_ids += ids

    def compute(self) -> dict[str, float]:
        if not self.image_ids:
            raise ConfigError("CocoEvaluator.compute() before any update().")
        return coco_evaluate(self.coco_gt, self.results, image_ids=self.image_ids)
