"""Task outputs as JSON-able results, and multi-task prediction over a folder of images.

One result per task and image (:func:`task_result`):

* classification: ``{"task", "label", "score", "top_k": [{"label", "score"}, ...]}`` (softmax scores, best
  first, at most the class count);
* segmentation: ``{"task", "size": [H, W], "classes": {name: pixel fraction}, "mask": ...}`` with the label map
  at the image's own size either as ``{"format": "png", "data": base64}`` (a single-channel PNG, pixel value =
  class index) or as ``{"format": "rle", "segments": [{"label", "class_id", "rle": {"size", "counts"}}]}``, one
  COCO run-length encoding (pycocotools) per class present;
* detection / instance: ``{"task", "detections": [{"label", "class_id", "score", "box": [x1, y1, x2, y2]}]}``
  with boxes in the image's own pixels, scores at least ``score_threshold``; instance detections also carry
  ``"mask"``, the COCO RLE of the mask binarised at 0.5.
"""

from __future__ import annotations

import base64
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

__all__ = [
    "MASK_FORMATS",
    "check_result_options",
    "decode_mask",
    "list_image_files",
    "predict_folder",
    "task_result",
]

MASK_FORMATS = ("png", "rle")


def check_result_options(top_k: int, score_threshold: float, mask_format: str) -> None:
    """Raise a :class:`ConfigError` naming the bad option."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}.")
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, int | float):
        raise ConfigError(f"score_threshold must be a number in [0, 1], got {score_threshold!r}.")
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ConfigError(f"score_threshold must be in [0, 1], got {score_threshold!r}.")
    if mask_format not in MASK_FORMATS:
        raise ConfigError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}.")


def task_result(
    task: str,
    output: Any,
    classes: Sequence[str],
    *,
    top_k: int = 5,
    score_threshold: float = 0.5,
    mask_format: str = "png",
) -> dict[str, Any]:
    """One image's output of one task as a JSON-able dict (see the module docstring).

    Args:
        task: ``classification``, ``segmentation``, ``detection`` or ``instance``.
        output: the task's output for one image: (K,) logits, (K, H, W) logits, or a torchvision detection dict.
        classes: the task's class names (detection: label ``k`` is ``classes[k - 1]``).
        top_k: classification: how many labels to return.
        score_threshold: detection: the lowest score returned.
        mask_format: segmentation: ``"png"`` or ``"rle"``.
    """
    if task == "classification":
        return _classification(output, classes, top_k)
    if task == "segmentation":
        return _segmentation(output, classes, mask_format)
    if task in ("detection", "instance"):
        return _detection(task, output, classes, score_threshold)
    raise ConfigError(f"unknown task kind {task!r}.")


def _classification(logits: torch.Tensor, classes: Sequence[str], top_k: int) -> dict[str, Any]:
    k = min(top_k, logits.shape[-1])
    scores, labels = logits.float().softmax(-1).topk(k)
    top = [{"label": classes[y], "score": float(s)} for s, y in zip(scores.tolist(), labels.tolist(), strict=True)]
    return {"task": "classification", "label": top[0]["label"], "score": top[0]["score"], "top_k": top}


def _segmentation(logits: torch.Tensor, classes: Sequence[str], mask_format: str) -> dict[str, Any]:
    labels = logits.argmax(0).cpu().numpy().astype(np.uint8 if len(classes) <= 256 else np.uint16)
    h, w = labels.shape
    counts = np.bincount(labels.reshape(-1), minlength=len(classes))
    present = [k for k in range(len(classes)) if counts[k]]
    result: dict[str, Any] = {
        "task": "segmentation",
        "size": [h, w],
        "classes": {classes[k]: float(counts[k] / labels.size) for k in present},
    }
    if mask_format == "png":  # 8-bit grayscale, 16-bit past 256 classes
        buffer = io.BytesIO()
        Image.fromarray(labels).save(buffer, format="PNG")
        result["mask"] = {"format": "png", "data": base64.b64encode(buffer.getvalue()).decode("ascii")}
    else:
        result["mask"] = {
            "format": "rle",
            "segments": [{"label": classes[k], "class_id": k, "rle": _rle(labels == k)} for k in present],
        }
    return result


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding of a (H, W) boolean mask, with ``counts`` as a string (JSON-able)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _detection(task: str, pred: dict[str, torch.Tensor], classes: Sequence[str], threshold: float) -> dict[str, Any]:
    keep = pred["scores"] >= threshold
    boxes = pred["boxes"][keep].float().cpu().tolist()
    scores = pred["scores"][keep].float().cpu().tolist()
    labels = pred["labels"][keep].cpu().tolist()
    masks = pred["masks"][keep, 0].cpu() > 0.5 if "masks" in pred else None
    detections = []
    for j, (box, score, label) in enumerate(zip(boxes, scores, labels, strict=True)):
        item: dict[str, Any] = {
            "label": classes[label - 1] if 0 < label <= len(classes) else str(label),
            "class_id": int(label),
            "score": float(score),
            "box": [float(v) for v in box],
        }
        if masks is not None:
            item["mask"] = _rle(masks[j].numpy())
        detections.append(item)
    return {"task": task, "detections": detections}


def decode_mask(result: dict[str, Any]) -> np.ndarray:
    """The (H, W) class-index map of a segmentation result, from either mask format."""
    mask = result["mask"]
    if mask["format"] == "png":
        with Image.open(io.BytesIO(base64.b64decode(mask["data"]))) as img:
            return np.asarray(img).astype(np.int64)
    from pycocotools import mask as mask_utils

    h, w = result["size"]
    labels = np.zeros((h, w), dtype=np.int64)
    for seg in mask["segments"]:
        rle = {"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode("ascii")}
        with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's copy-keyword deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_utils.decode(rle)
        labels[decoded.astype(bool)] = seg["class_id"]
    return labels


def list_image_files(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files under a folder (recursively, sorted, hidden files skipped), the one file given, or a list.

    Raises:
        DataError: nothing there, or no image file in the folder.
    """
    from ..data import DataError
    from ..data.classification import IMG_EXTENSIONS

    if not isinstance(images, str | os.PathLike):
        files = [Path(p).expanduser() for p in images]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise DataError(f"image file(s) not found: {', '.join(missing[:5])}.")
        if not files:
            raise DataError("no image files given.")
        return files
    root = Path(images).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root} does not exist; pass a folder of images or an image file.")
    found = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not found:
        raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root}.")
    return found


def predict_folder(
    adapters: Any,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    weights: Any = "saved",
    names: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    batch_size: int = 8,
    top_k: int = 5,
    score_threshold: float = 0.5,
    mask_format: str = "png",
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """Predict every image under ``images`` with several adapters, one backbone forward per batch.

    Args:
        adapters: a :class:`~sidetune.serve.MultiTask`, or adapter folders (or a mapping name -> folder) to
            load into one.
        images: a folder (searched recursively), an image file, or a list of image files.
        weights: backbone weights when loading (see :class:`~sidetune.serve.MultiTask`).
        names: task names when loading.
        tasks: run only these tasks (default: all).
        batch_size: images per backbone forward.
        top_k: classification labels per image.
        score_threshold: lowest detection score returned.
        mask_format: segmentation masks as ``"png"`` (base64) or ``"rle"`` (COCO).
        device: where to run when loading.

    Returns:
        One record per image, in file order: ``{"path", "width", "height", "tasks": {name: result}}`` with each
        result as :func:`task_result` makes it.

    Raises:
        DataError: a missing or unreadable image (the message names the file).
    """
    from ..data import load_rgb
    from .multitask import MultiTask

    check_result_options(top_k, score_threshold, mask_format)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    multitask = (
        adapters if isinstance(adapters, MultiTask) else MultiTask(adapters, weights, names=names, device=device)
    )
    files = list_image_files(images)
    records: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        pil = [load_rgb(p) for p in chunk]
        results = multitask.predict(pil, tasks, top_k=top_k, score_threshold=score_threshold, mask_format=mask_format)
        for path, image, result in zip(chunk, pil, results, strict=True):
            records.append({"path": str(path), "width": image.width, "height": image.height, "tasks": result})
    return records
