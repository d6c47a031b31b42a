"""Evaluate and predict with a saved adapter (``best/`` or ``last/`` of a run, or any ``save_adapter`` folder)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .. import load
from ..data import DataError, build_classification_dataset, build_transforms, check_num_classes, load_rgb
from ..data.classification import IMG_EXTENSIONS
from ..model import SidetuneModel
from .metrics import ClassificationMeter

logger = logging.getLogger(__name__)

INFERENCE = "inference.json"


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_for_inference(
    adapter_dir: str | os.PathLike, weights: Any = "saved", device: str | torch.device | None = None
) -> tuple[SidetuneModel, dict[str, Any]]:
    """The model of an adapter folder in eval mode, and its ``inference.json`` (class names, eval transform, seed).

    Folders written by :meth:`SidetuneModel.save_adapter` outside ``fit`` have no ``inference.json``: their
    classes are ``"0".."K-1"``, the transform is the ``vtab`` recipe and the seed 0.
    """
    adapter_dir = Path(adapter_dir)
    info_path = adapter_dir / INFERENCE
    info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.is_file() else {}
    with torch.random.fork_rng(devices=[]):
        # fit() creates the model right after seeding torch with the run's seed: a random backbone
        # (weights=None, the tests' tiny models) is rebuilt bit for bit only from the same RNG state
        torch.manual_seed(info.get("seed", 0))
        model = load(adapter_dir, weights=weights, map_location=_device(device)).eval()
    info.setdefault("classes", [str(i) for i in range(model.config.num_classes)])
    info.setdefault("augmentation", "vtab")
    return model, info


def _transform(model: SidetuneModel, augmentation: str):
    return build_transforms(model.data_config, tuple(model.config.img_size), augmentation, train=False)


def _autocast(mixed_precision: str, device: torch.device):
    """The autocast context of ``mixed_precision`` (``no``, ``bf16``, ``fp16``) on ``device``."""
    dtypes = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in dtypes:
        raise ValueError(f"mixed_precision must be one of {tuple(dtypes)}, got {mixed_precision!r}.")
    return torch.autocast(device.type, dtype=dtypes[mixed_precision], enabled=dtypes[mixed_precision] is not None)


@torch.inference_mode()
def _logits(model: SidetuneModel, dataset: Dataset, batch_size: int, workers: int, mixed_precision: str = "no"):
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    for images, labels in loader:
        with _autocast(mixed_precision, device):
            logits = model(images.to(device))
        yield logits.float().cpu(), labels


def evaluate_adapter(
    adapter_dir: str | os.PathLike,
    data: str | os.PathLike,
    split: str | None = "auto",
    *,
    layout: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    weights: Any = "saved",
    augmentation: str | None = None,
    device: str | torch.device | None = None,
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """Accuracy of a saved adapter on a labelled split.

    Args:
        adapter_dir: folder written by ``save_adapter`` (a run's ``best/`` or ``last/``).
        data: data folder, CSV or list file, as for training.
        split: split name; ``auto`` uses ``test`` when the data has one, else the whole data.
        layout: data layout.
        batch_size: images per batch.
        workers: data-loading workers.
        weights: backbone weights (default: what the adapter recorded).
        augmentation: eval transform recipe (default: the one the run trained with).
        device: default CUDA when available.
        mixed_precision: ``no``, ``bf16`` or ``fp16``: autocast of the forward (e.g. the precision the run
            trained and validated in).

    Returns:
        ``{"top1", "top5", "mean_class_acc", "per_class", "loss", "count", "classes", "adapter", "data",
        "split"}``.

    Raises:
        DataError: the data is missing, or its classes disagree with the adapter's.
    """
    model, info = load_for_inference(adapter_dir, weights, device)
    if split == "auto":
        root = Path(data)
        split = "test" if root.is_dir() and any((root / n).exists() for n in ("test", "test.txt", "test.csv")) else None
    tf = _transform(model, augmentation or info["augmentation"])
    dataset = build_classification_dataset(data, split, tf, layout, classes=info["classes"])
    if len(dataset) == 0:
        raise DataError(f"no images to evaluate at {data} (split {split!r}).")
    check_num_classes(dataset, model.config.num_classes)
    meter = ClassificationMeter(model.config.num_classes)
    for logits, labels in _logits(model, dataset, batch_size, workers, mixed_precision):
        meter.update(logits, labels)
    return {
        **meter.compute(),
        "classes": info["classes"],
        "adapter": str(adapter_dir),
        "data": str(data),
        "split": split,
    }


class _ImageList(Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index])), index


def list_images(path: str | os.PathLike) -> list[Path]:
    """Image files under a folder (recursively, hidden files skipped, sorted), or the one file given.

    Raises:
        DataError: nothing there, or no image in the folder.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path} does not exist; pass a folder of images or an image file.")
    found = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not found:
        raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {path}.")
    return found


def predict_images(
    adapter_dir: str | os.PathLike,
    images: str | os.PathLike,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    workers: int = 2,
    weights: Any = "saved",
    augmentation: str | None = None,
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """Predict the class of every image under ``images``.

    Returns:
        One record per image: ``{"path", "label", "score", "top_k": [(label, score), ...]}`` with softmax
        scores, ``top_k`` sorted by score (at most the class count).
    """
    model, info = load_for_inference(adapter_dir, weights, device)
    classes = info["classes"]
    paths = list_images(images)
    dataset = _ImageList(paths, _transform(model, augmentation or info["augmentation"]))
    k = max(1, min(top_k, len(classes)))
    rows: list[dict[str, Any]] = []
    for logits, indices in _logits(model, dataset, batch_size, workers):
        scores, labels = logits.softmax(-1).topk(k, -1)
        for i, s, y in zip(indices.tolist(), scores.tolist(), labels.tolist(), strict=True):
            rows.append(
                {
                    "path": str(paths[i]),
                    "label": classes[y[0]],
                    "score": s[0],
                    "top_k": [(classes[c], p) for c, p in zip(y, s, strict=True)],
                }
            )
    return rows
