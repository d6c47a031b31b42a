"""Object detection: VOC / COCO data, torchvision detectors on the method's pyramid, COCO box mAP, JSON predictions.

The task (:class:`DetectionTask`; instance segmentation is :class:`~sidetune.tasks.instance.InstanceTask`):
``(image, target)`` batches as torchvision's detectors take them (lists; images in [0, 1], the detector
normalises and letterboxes them to the model's fixed size). Training sums the detector's losses on
large-scale-jittered crops (``augmentation: standard``) or whole images (``none``); validation runs COCOeval.
The best checkpoint is the highest box mAP@[.5:.95]. Predictions are a COCO-style ``predictions.json`` and an
overlay per image.

Metrics: COCO box and mask mAP, computed by pycocotools' ``COCOeval``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset

from ..cache.batch import CachedTaps
from ..data import (
    CocoDetectionDataset,
    VOCDetectionDataset,
    build_detection_transforms,
    detection_collate,
    load_rgb,
    to_coco,
)
from ..data.detection import make_coco
from ..errors import ConfigError
from .base import DenseTask, Evaluator, StepOutput

logger = logging.getLogger(__name__)

__all__ = [
    "IOU_TYPES",
    "STAT_NAMES",
    "CocoEvaluator",
    "DetectionOptions",
    "DetectionTask",
    "coco_evaluate",
    "coco_ground_truth",
    "to_coco_results",
]

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
    metrics: dict[str, Any] = {}
    ids = sorted(set(int(i) for i in image_ids)) if image_ids is not None else sorted(coco_gt.getImgIds())
    names = {c: coco_gt.cats[c]["name"] for c in sorted(coco_gt.getCatIds())}
    instances = {names[c]: len(coco_gt.getAnnIds(imgIds=ids, catIds=[c], iscrowd=False)) for c in names}
    metrics["instances"] = instances
    for iou_type, entries in results.items():
        _check_iou_types([iou_type])
        if not entries:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in STAT_NAMES})
            metrics[f"{iou_type}_AP_per_class"] = {n: (0.0 if instances[n] else float("nan")) for n in names.values()}
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
        # AP@[.5:.95] of each class: precision is (IoU thresholds, recall points, classes, areas, max dets);
        # area "all", 100 detections; -1 marks a class with no ground truth
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cat in enumerate(evaluator.params.catIds):
            values = precision[:, :, k]
            values = values[values > -1]
            per_class[names[cat]] = float(values.mean()) if values.size else float("nan")
        metrics[f"{iou_type}_AP_per_class"] = per_class
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


# -- the task ---------------------------------------------------------------------------------------------------


@dataclass
class DetectionOptions:
    """``task_options`` of a detection run.

    Attributes:
        detector: ``faster_rcnn`` or ``retinanet`` (instance segmentation: ``mask_rcnn``); None: the first.
    """

    detector: str | None = None


class DetectionEvaluator(Evaluator):
    """COCOeval over the detections of every process: each process keeps its own results, merged at the end."""

    def __init__(self, dataset, iou_types: tuple[str, ...]) -> None:
        self.evaluator = CocoEvaluator(to_coco(dataset), iou_types=iou_types)

    def update(self, model, batch) -> None:
        images, targets = batch
        device = next(model.parameters()).device
        if isinstance(images, CachedTaps):
            outputs = model(images)
        else:
            outputs = model([im.as_subclass(torch.Tensor).to(device) for im in images])
        self.evaluator.update([{k: v.cpu() for k, v in o.items()} for o in outputs], targets)

    def state(self) -> tuple[dict[str, list], list[int]]:
        return self.evaluator.results, self.evaluator.image_ids

    def compute(self, states) -> dict[str, Any]:
        self.evaluator.reset()
        for results, image_ids in states:
            for kind, items in results.items():
                self.evaluator.results[kind] += items
            self.evaluator.image_ids += image_ids
        if not self.evaluator.image_ids:
            raise ConfigError("no image was evaluated: the evaluation split is empty.")
        return self.evaluator.compute()


class DetectionTask(DenseTask):
    name = "detection"
    description = "boxes: torchvision Faster R-CNN or RetinaNet on the method's pyramid, COCO box mAP"
    options_cls = DetectionOptions
    layouts: ClassVar[dict[str, str]] = {
        "auto": "voc when the folder has Annotations/, else coco",
        "voc": "Pascal VOC: JPEGImages/, Annotations/<id>.xml, ImageSets/Main/<split>.txt",
        "coco": "COCO: <split>/ images + annotations/instances_<split>.json",
    }
    augmentations = ("standard", "none")
    headline = "bbox_mAP"
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 8, "weight_decay": 0.05, "workers": 0}
    predict_options = ("score_threshold",)
    detectors: tuple[str, ...] = ("faster_rcnn", "retinanet")
    masks = False

    def __init__(self, options: DetectionOptions) -> None:
        if options.detector is not None and options.detector not in self.detectors:
            raise ConfigError(
                f"detector {options.detector!r} is not a {self.name} detector; choose from {', '.join(self.detectors)}."
            )
        super().__init__(options)

    def model_kwargs(self, config) -> dict[str, Any]:
        head = dict(config.head_options)
        if self.options.detector is not None:
            head["detector"] = self.options.detector
        return {"task": self.name, "head_options": head or None}

    # -- data ----------------------------------------------------------------------------------------------------
    def split_available(self, root: Path, split: str) -> bool:
        return (root / "ImageSets" / "Main" / f"{split}.txt").is_file() or (
            root / "annotations" / f"instances_{split}.json"
        ).is_file()

    def dataset(self, root, split: str, layout: str, transform) -> Dataset:
        """One split of a VOC or COCO detection dataset with ``transform`` (joint image + boxes)."""
        root = Path(root).expanduser()
        if layout == "auto":
            layout = "voc" if (root / "Annotations").is_dir() else "coco"
        if layout == "voc":
            if self.masks:
                raise ConfigError("instance segmentation needs masks: use a COCO layout (--layout coco).")
            return VOCDetectionDataset(root, split, transform)
        if layout == "coco":
            ann = root / "annotations" / f"instances_{split}.json"
            return CocoDetectionDataset(root / split, ann, transform, masks=self.masks)
        raise ConfigError(f"unknown {self.name} layout {layout!r}; choose from {', '.join(self.layouts)}.")

    def transforms(self, model, augmentation: str, train: bool):
        jitter = train and augmentation == "standard"
        return build_detection_transforms(train=jitter, img_size=tuple(model.config.img_size) if jitter else None)

    def collate(self, batch):
        return detection_collate(batch)

    # -- training and evaluation ---------------------------------------------------------------------------------
    def step(self, model, batch) -> StepOutput:
        images, targets = batch
        parts = model(images if isinstance(images, CachedTaps) else list(images), list(targets))
        loss = sum(parts.values())
        return StepOutput(loss=loss, count=len(images), parts=parts)

    def evaluator(self, model, dataset, classes) -> Evaluator:
        return DetectionEvaluator(dataset, ("bbox", "segm") if self.masks else ("bbox",))

    def summary_line(self, metrics) -> str:
        line = f"box mAP {metrics['bbox_mAP']:.4f}, mAP@50 {metrics['bbox_mAP_50']:.4f}"
        if "segm_mAP" in metrics:
            line += f", mask mAP {metrics['segm_mAP']:.4f}"
        return line

    per_class_name = "box AP"

    def per_class(self, metrics, classes) -> dict[str, float | None]:
        return dict(metrics.get("bbox_AP_per_class") or {})

    def collapse_warnings(self, metrics, classes) -> list[str]:
        instances = metrics.get("instances") or {}
        per = metrics.get("bbox_AP_per_class") or {}
        zero = [c for c, n in instances.items() if n > 0 and per.get(c) == 0.0]
        warnings = []
        if zero and len(zero) == len([c for c, n in instances.items() if n > 0]):
            warnings.append("box AP is 0 for every class: the detector finds nothing; train longer or raise --lr")
        elif zero:
            warnings.append(f"{len(zero)} class(es) with box AP 0: {', '.join(zero[:8])}")
        return warnings

    # -- the tap cache ----------------------------------------------------------------------------------------------
    def cache_inputs(self, model, batch):
        """The detector's own transform (normalise, letterbox to the model's size, pad) on the images and their
        targets; the letterboxed and original sizes go with the taps (predictions map back to the original)."""
        images, targets = batch
        transform = model.head.transform
        copies = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        plain = [im.as_subclass(torch.Tensor) for im in images]
        with torch.no_grad():
            image_list, resized = transform(plain, copies)
        meta = [
            {"image_size": torch.tensor(size), "original_size": torch.tensor(tuple(im.shape[-2:]))}
            for size, im in zip(image_list.image_sizes, plain, strict=True)
        ]
        return image_list.tensors, resized, meta

    # -- saved adapters ------------------------------------------------------------------------------------------
    def inference_info(self, config) -> dict[str, Any]:
        return {"layout": config.layout}

    @torch.no_grad()
    def predict(self, model, info, images, output, *, score_threshold: float = 0.5, autocast=None):
        """Write ``predictions.json`` (COCO-style: ``image_id``, ``file_name``, ``category_id`` (1..K),
        ``category_name``, ``bbox`` [x, y, w, h], ``score``) and ``<stem>_overlay.png`` with the boxes scoring at
        least ``score_threshold`` drawn (and masks for instance segmentation)."""
        import json

        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        from .segmentation import _unique_stem, palette

        if not 0.0 <= score_threshold <= 1.0:
            raise ConfigError(f"score_threshold must be in [0, 1], got {score_threshold!r}.")
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        device = next(model.parameters()).device
        classes = info["classes"]
        colours = palette(len(classes))
        written: list[str] = []
        detections: list[dict[str, Any]] = []
        for image_id, path in enumerate(images):
            img = load_rgb(path)
            x = pil_to_tensor(img).float().div(255)
            with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
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
            overlay_path = out / f"{_unique_stem(path, images)}_overlay.png"
            Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(overlay_path)
            written.append(str(overlay_path))
        json_path = out / "predictions.json"
        tmp = out / ".predictions.json.tmp"
        tmp.write_text(json.dumps(detections, indent=2) + "\n")
        tmp.replace(json_path)
        written.append(str(json_path))
        return {"images": len(images), "files": written, "detections": len(detections)}
