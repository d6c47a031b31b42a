"""Object detection datasets: Pascal VOC XML and COCO JSON, in torchvision's target format, with joint transforms.

Every dataset here returns ``(image, target)``: ``image`` the transform's output (a float ``(3, H, W)`` tensor in
``[0, 1]`` when no transform is given; **not normalised**: torchvision's detectors normalise inside, see
:mod:`sidetune.heads.detection`), and ``target`` a dict with

* ``boxes``: ``tv_tensors.BoundingBoxes`` (N, 4), XYXY, in pixels of the image as returned,
* ``labels``: (N,) ``torch.long`` in ``1..K`` (0 is torchvision's background; ``classes[label - 1]`` names it),
* ``image_id``: ``int``, the id :func:`to_coco` gives the image,
* ``masks``: ``tv_tensors.Mask`` (N, H, W) ``uint8``, only for COCO with ``masks=True``.

Datasets expose ``classes`` (K names), ``num_classes`` (K + 1, what the detectors take) and ``records`` (the
parsed annotations, one :class:`DetectionRecord` per image, in original image coordinates).

Layouts:

* **Pascal VOC** (:class:`VOCDetectionDataset`): ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml``, ids from
  ``ImageSets/Main/<split>.txt`` (every XML when ``split=None``). VOC's corners are 1-based inclusive pixel
  indices: ``(xmin, ymin, xmax, ymax)`` becomes ``(xmin - 1, ymin - 1, xmax, ymax)`` (Detectron2's reading), so a
  box spanning the whole image is ``(0, 0, W, H)``. BCCD (``../shared/assets/data/bccd``, classes
  :data:`BCCD_CLASSES`) is in this layout.
* **COCO** (:class:`CocoDetectionDataset`): an image folder and an instances JSON, read with pycocotools.
  Category ids (any integers) are mapped to labels ``1..K`` in ascending id order (``category_ids[label - 1]`` is
  the original id). Crowd annotations are left out of the training targets (as torchvision's reference
  recipes do) but kept in the ground truth :func:`to_coco` builds, where COCOeval uses them as ignore regions.

Bad data (policies):

* **Boxes with swapped corners** (``xmax < xmin`` or ``ymax < ymin``; a COCO box of negative width or height)
  **are put back in order**: some annotation tools write the corners in the order they were dragged, and the box
  is right once ordered.
* **Boxes that extend outside their image are clipped** to it: annotators routinely draw a pixel or two past the
  border, and the box is still right. **Boxes of zero area** (after clipping, or degenerate in the file: BCCD has
  two) **are dropped**. All three are counted at construction, reported in one ``warnings.warn`` per dataset,
  and kept in ``dataset.box_fixes`` (``{"boxes", "swapped", "clipped", "dropped"}``).
* A COCO file that references missing images, a VOC id without its image or XML, and an unreadable XML raise
  :class:`~sidetune.data.DataError` naming the file(s), at construction.
* A VOC object with a class name that is not in ``classes`` raises :class:`DataError` naming the XML file, the name
  and the known classes (pass ``classes=`` to fix the list; by default it is every name in ``Annotations/``).
* An image whose size differs from the size its annotation declares raises :class:`DataError` when loaded (the
  boxes would be in the wrong coordinates).

Skipped files: ``dataset.skipped`` lists ``(path, reason)`` of every file a reader saw and left out (with
:func:`build_detection_dataset`: images in a COCO split folder that its JSON does not list; in a VOC folder read
without a split list, images without an XML). :func:`build_detection_dataset` reads either layout by name; every
layout is described with its folder tree and an example in ``docs/data.md``.

:func:`to_coco` builds a pycocotools ``COCO`` ground truth from any of these datasets (for mAP with
:mod:`sidetune.tasks.detection`); :func:`detection_collate` batches samples for torchvision's detectors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..errors import ConfigError
from .files import _DECODE_ERRORS, DataError, load_rgb, read_text

logger = logging.getLogger(__name__)

__all__ = [
    "BCCD_CLASSES",
    "VOC_DETECTION_CLASSES",
    "BoxFixWarning",
    "CocoDetectionDataset",
    "DetectionDataset",
    "DetectionRecord",
    "VOCDetectionDataset",
    "build_detection_dataset",
    "build_detection_transforms",
    "detect_detection_layout",
    "detection_collate",
    "make_coco",
    "to_coco",
]

#: BCCD's classes (blood cells), in the order of the dataset's README.
BCCD_CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")
#: Pascal VOC's 20 object classes.
VOC_DETECTION_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
_MAX_LISTED = 5


@dataclass
class DetectionRecord:
    """One image's annotations, in original image coordinates, after the clip/drop policy.

    Attributes:
        image_path: the image file.
        image_id: the id in targets and in :func:`to_coco`.
        width: image width the annotation declares.
        height: image height.
        boxes: (N, 4) float32 XYXY.
        labels: (N,) int64 in 1..K.
        source: the annotation file (for messages).
        segmentations: per box, the COCO ``segmentation`` (polygons or RLE), or None without masks.
        crowd: COCO crowd annotations (dicts with ``bbox``, ``category_id`` = label, ``segmentation``), for
            the ground truth only.
    """

    image_path: Path
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    source: Path
    segmentations: list[Any] | None = None
    crowd: list[dict[str, Any]] = field(default_factory=list)


class BoxFixWarning(UserWarning):
    """Boxes were reordered, clipped or dropped while a detection dataset was read (counted in ``box_fixes``)."""


class _BoxPolicy:
    """Order swapped corners, clip boxes to their image and drop zero-area ones, counting each for one warning."""

    def __init__(self) -> None:
        self.swapped = 0
        self.clipped = 0
        self.dropped = 0
        self.first: Path | None = None

    def order(self, boxes: np.ndarray, source: Path) -> np.ndarray:
        """(N, 4) XYXY whose corners may be swapped -> the same boxes with ``x1 <= x2`` and ``y1 <= y2``."""
        swapped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if swapped.any():
            self.swapped += int(swapped.sum())
            self.first = self.first or source
            boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        return boxes

    def apply(self, boxes: np.ndarray, width: int, height: int, source: Path) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) XYXY (corners in order) -> (N, 4) clipped boxes and the (N,) mask of boxes to keep."""
        clipped = boxes.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        changed = int(((clipped != boxes).any(axis=1) & keep).sum())
        dropped = int((~keep).sum())
        if (changed or dropped) and self.first is None:
            self.first = source
        self.clipped += changed
        self.dropped += dropped
        return clipped, keep

    def facts(self, total: int) -> dict[str, int]:
        """What the policy did: ``boxes`` read, and how many were ``swapped`` (reordered), ``clipped``, ``dropped``."""
        return {"boxes": total, "swapped": self.swapped, "clipped": self.clipped, "dropped": self.dropped}

    def report(self, where: Path, total: int) -> None:
        if not (self.swapped or self.clipped or self.dropped):
            return
        parts = []
        if self.swapped:
            parts.append(
                f"reordered {self.swapped} of {total} boxes whose corners were swapped (xmax < xmin or ymax < ymin)"
            )
        if self.clipped:
            parts.append(f"clipped {self.clipped} of {total} boxes that extended outside their image")
        if self.dropped:
            parts.append(f"dropped {self.dropped} of {total} boxes of zero area")
        msg = f"{where}: {' and '.join(parts)} (first in {self.first})."
        logger.info(msg)
        warnings.warn(msg, BoxFixWarning, stacklevel=3)


class DetectionDataset(Dataset):
    """Images with boxes (and optional instance masks) from parsed :class:`DetectionRecord`\\ s.

    Args:
        records: one per image.
        classes: K class names; label ``k`` is ``classes[k - 1]``.
        transform: joint transform called as ``transform(image, target)`` on a ``tv_tensors.Image`` (uint8)
            and the target dict (see the module docstring); see :func:`build_detection_transforms`. None
            gives a float image in ``[0, 1]``.
        masks: load instance masks (records must carry segmentations).
        root: where the data came from, for messages.
        skipped: ``(path, reason)`` of the files the reader left out.
        box_fixes: what the box policy did (see the module docstring).

    Attributes:
        skipped: ``(path, reason)`` of every file left out.
        box_fixes: ``{"boxes": read, "swapped": reordered, "clipped": ..., "dropped": zero-area}``.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        classes: Sequence[str],
        *,
        transform: Callable[..., Any] | None = None,
        masks: bool = False,
        root: str | os.PathLike[str] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
        box_fixes: dict[str, int] | None = None,
    ) -> None:
        self.records = list(records)
        self.skipped: list[tuple[str, str]] = [(str(p), str(r)) for p, r in skipped]
        total = sum(len(r.boxes) for r in self.records)
        self.box_fixes = dict(box_fixes or {"boxes": total, "swapped": 0, "clipped": 0, "dropped": 0})
        self.classes = [str(c) for c in classes]
        self.transform = transform
        self.masks = masks
        self.root = Path(root) if root is not None else None
        if masks and any(r.segmentations is None for r in self.records):
            raise DataError(f"{self.root}: masks=True but the annotations carry no segmentations.")

    @property
    def num_classes(self) -> int:
        """K + 1: the classes plus torchvision's background (what the detectors take as ``num_classes``)."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        boxes = sum(len(r.boxes) for r in self.records)
        return f"{type(self).__name__}(root={self.root}, images={len(self)}, boxes={boxes}, classes={self.classes})"

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        record = self.records[index]
        img = load_rgb(record.image_path)
        if img.size != (record.width, record.height):
            raise DataError(
                f"image {record.image_path} is {img.size[0]}x{img.size[1]} but {record.source} declares "
                f"{record.width}x{record.height}; the boxes would be in the wrong coordinates. Fix the annotation."
            )
        image = tv_tensors.Image(TF.pil_to_tensor(img))
        canvas = (record.height, record.width)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(record.boxes), format="XYXY", canvas_size=canvas),
            "labels": torch.tensor(record.labels),  # copies: a transform must never reach the records
            "image_id": record.image_id,
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(_decode_masks(record.segmentations or [], *canvas))
        if self.transform is None:
            return TF.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor), target
        return self.transform(image, target)


def _decode_masks(segmentations: Sequence[Any], height: int, width: int) -> torch.Tensor:
    """COCO polygons / RLEs -> (N, H, W) uint8 masks."""
    out = torch.zeros((len(segmentations), height, width), dtype=torch.uint8)
    for i, segm in enumerate(segmentations):
        if isinstance(segm, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width)) if segm else None
        elif isinstance(segm.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            rle = segm
        if rle is not None:
            with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's copy-keyword deprecation
                warnings.simplefilter("ignore", DeprecationWarning)
                out[i] = torch.from_numpy(mask_utils.decode(rle))
    return out


# -- Pascal VOC --------------------------------------------------------------------------------------------------
def _voc_ids(root: Path, split: str | None) -> list[str]:
    if split is None:
        return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        have = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise DataError(
            f"no split list {list_file}; found {have} (give one of those split names; in Python, split=None "
            "reads every XML file)."
        )
    # A Main/ list is "<id>" or, per class, "<id> <flag>": the id is the first field.
    return [line.split()[0] for line in read_text(list_file).splitlines() if line.strip()]


def _text(node: ET.Element, path: str, xml_file: Path) -> str:
    found = node.find(path)
    if found is None or found.text is None:
        raise DataError(f"{xml_file}: missing <{path}> in an annotation; not a Pascal VOC XML file?")
    return found.text.strip()


def _parse_voc(xml_file: Path) -> tuple[ET.Element, list[tuple[str, list[float], bool]]]:
    try:
        root = ET.parse(xml_file).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"cannot parse annotation {xml_file}: {exc}.") from exc
    objects = []
    for obj in root.iter("object"):
        name = _text(obj, "name", xml_file)
        try:
            box = [float(_text(obj, f"bndbox/{k}", xml_file)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as exc:
            raise DataError(f"{xml_file}: a box of {name!r} has a non-numeric corner: {exc}.") from exc
        difficult = obj.find("difficult")
        objects.append((name, box, difficult is not None and (difficult.text or "0").strip() == "1"))
    return root, objects


class VOCDetectionDataset(DetectionDataset):
    """Pascal VOC detection layout (and BCCD): ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/``.

    Args:
        root: the folder holding ``JPEGImages``, ``Annotations`` and ``ImageSets``.
        split: the list in ``ImageSets/Main`` (``train``, ``val``, ``test``, ``trainval``); None: every XML.
        transform: see :class:`DetectionDataset`.
        classes: K class names (label k = ``classes[k - 1]``); default: the sorted names found in every XML
            under ``Annotations/`` (all splits, so every split gets the same labels).
        skip_difficult: leave out objects marked ``<difficult>1</difficult>`` (default: keep them).

    Raises:
        DataError: missing split list, image or XML; unparsable XML; a class name not in ``classes``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = "train",
        transform: Callable[..., Any] | None = None,
        *,
        classes: Sequence[str] | None = None,
        skip_difficult: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        if not (root / "Annotations").is_dir():
            raise DataError(f"{root} has no Annotations/ folder; expected the Pascal VOC layout.")
        ids = _voc_ids(root, split)
        if classes is None:
            classes = _voc_class_names(root)
        classes = [str(c) for c in classes]
        index = {name: i + 1 for i, name in enumerate(classes)}
        policy = _BoxPolicy()
        records, missing, total = [], [], 0
        for image_id, name in enumerate(ids):
            xml_file = root / "Annotations" / f"{name}.xml"
            if not xml_file.is_file():
                missing.append(str(xml_file))
                continue
            tree, objects = _parse_voc(xml_file)
            image_path = _voc_image(root, name, tree)
            if image_path is None:
                missing.append(str(root / "JPEGImages" / f"{name}.jpg"))
                continue
            width, height = _voc_size(tree, image_path)
            boxes, labels = [], []
            for cls, (x1, y1, x2, y2), difficult in objects:
                if cls not in index:
                    raise DataError(
                        f"{xml_file}: unknown class name {cls!r}; known classes: {classes}. Pass classes= with "
                        "every class name, or fix the annotation."
                    )
                if difficult and skip_difficult:
                    continue
                boxes.append([x1, y1, x2, y2])
                labels.append(index[cls])
            total += len(boxes)
            array = policy.order(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), xml_file)
            # 1-based inclusive corners -> pixel edges; a point or a line in the file stays of zero area (dropped)
            degenerate = (array[:, 2] == array[:, 0]) | (array[:, 3] == array[:, 1])
            array[:, :2] -= np.where(degenerate, 0.0, 1.0)[:, None]
            array[degenerate, 2:] = array[degenerate, :2]
            array, keep = policy.apply(array, width, height, xml_file)
            records.append(
                DetectionRecord(
                    image_path=image_path,
                    image_id=image_id,
                    width=width,
                    height=height,
                    boxes=array[keep],
                    labels=np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
                    source=xml_file,
                )
            )
        if missing:
            raise DataError(
                f"{len(missing)} file(s) for split {split!r} of {root} do not exist: {_listed(missing)}. "
                "Every id needs JPEGImages/<id>.jpg and Annotations/<id>.xml."
            )
        if not records:
            raise DataError(f"split {split!r} of {root} lists no images.")
        policy.report(root, total)
        skipped = []
        if split is None:  # every XML is read: an image without one is left out, and said so
            listed = {r.image_path.name for r in records}
            for path in sorted((root / "JPEGImages").iterdir()) if (root / "JPEGImages").is_dir() else []:
                if path.name not in listed:
                    skipped.append((str(path), f"no annotation (no Annotations/{path.stem}.xml)"))
        super().__init__(
            records, classes, transform=transform, root=root, skipped=skipped, box_fixes=policy.facts(total)
        )


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _voc_class_names(root: Path) -> list[str]:
    names: set[str] = set()
    for xml_file in sorted((root / "Annotations").glob("*.xml")):
        names.update(name for name, _, _ in _parse_voc(xml_file)[1])
    if not names:
        raise DataError(f"no objects in any XML under {root / 'Annotations'}; pass classes= explicitly.")
    logger.info("VOC classes found in %s: %s", root, sorted(names))
    return sorted(names)


def _voc_image(root: Path, name: str, tree: ET.Element) -> Path | None:
    candidates = [root / "JPEGImages" / f"{name}{ext}" for ext in (".jpg", ".jpeg", ".png", ".JPG", ".PNG")]
    filename = tree.findtext("filename")
    if filename:
        candidates.append(root / "JPEGImages" / filename.strip())
    return next((p for p in candidates if p.is_file()), None)


def _voc_size(tree: ET.Element, image_path: Path) -> tuple[int, int]:
    try:
        width, height = int(float(tree.findtext("size/width") or 0)), int(float(tree.findtext("size/height") or 0))
    except ValueError:
        width = height = 0
    if width > 0 and height > 0:
        return width, height
    try:  # no size in the XML: read the image header (cheap, no decode)
        with Image.open(image_path) as img:
            return img.size
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot read image {image_path}: {exc}.") from exc


# -- COCO --------------------------------------------------------------------------------------------------------
def _quiet_coco(dataset: dict[str, Any] | str | os.PathLike[str] | None = None) -> COCO:
    """A pycocotools COCO (which prints while indexing) built without printing."""
    with contextlib.redirect_stdout(io.StringIO()):
        if dataset is None or isinstance(dataset, dict):
            coco = COCO()
            if dataset is not None:
                coco.dataset = dataset
                coco.createIndex()
            return coco
        return COCO(str(dataset))


class CocoDetectionDataset(DetectionDataset):
    """COCO instances JSON + image folder, read with pycocotools.

    Args:
        image_dir: folder the JSON's ``file_name`` entries are relative to.
        ann_file: the instances JSON.
        transform: see :class:`DetectionDataset`.
        masks: also return instance masks (``target["masks"]``) from the ``segmentation`` fields.
        report_unlisted: record the files of ``image_dir`` that the JSON does not list in ``skipped`` (right when
            the folder holds one split, as in :func:`build_detection_dataset`; off for a folder shared by splits).

    Attributes:
        category_ids: the original COCO category id of each label (``category_ids[label - 1]``).
        coco: the pycocotools ``COCO`` of the file.

    Raises:
        DataError: unreadable JSON, or images that it references and that are not on disk.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        *,
        masks: bool = False,
        report_unlisted: bool = False,
    ) -> None:
        image_dir, ann_file = Path(image_dir).expanduser(), Path(ann_file).expanduser()
        if not ann_file.is_file():
            raise DataError(f"COCO annotation file {ann_file} does not exist.")
        try:
            coco = _quiet_coco(ann_file)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise DataError(f"cannot read COCO annotation file {ann_file}: {exc!r}.") from exc
        self.coco = coco
        self.category_ids = sorted(coco.getCatIds())
        label_of = {cat: i + 1 for i, cat in enumerate(self.category_ids)}
        _check_coco_annotations(coco, label_of, ann_file)
        classes = [coco.cats[c]["name"] for c in self.category_ids]
        missing = [str(image_dir / coco.imgs[i]["file_name"]) for i in sorted(coco.imgs)]
        missing = [p for p in missing if not Path(p).is_file()]
        if missing:
            raise DataError(
                f"{ann_file} references {len(missing)} image(s) that do not exist under {image_dir}: "
                f"{_listed(missing)}. Fix image_dir or the file."
            )
        policy = _BoxPolicy()
        records, total = [], 0
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            width, height = int(info["width"]), int(info["height"])
            anns = coco.imgToAnns.get(image_id, [])
            plain = [a for a in anns if not a.get("iscrowd", 0)]
            crowd = [dict(a, category_id=label_of[a["category_id"]]) for a in anns if a.get("iscrowd", 0)]
            xywh = np.asarray([a["bbox"] for a in plain], dtype=np.float32).reshape(-1, 4)
            boxes = policy.order(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), ann_file)
            total += len(boxes)
            boxes, keep = policy.apply(boxes, width, height, ann_file)
            kept = [a for a, k in zip(plain, keep, strict=True) if k]
            records.append(
                DetectionRecord(
                    image_path=image_dir / info["file_name"],
                    image_id=int(image_id),
                    width=width,
                    height=height,
                    boxes=boxes[keep],
                    labels=np.asarray([label_of[a["category_id"]] for a in kept], dtype=np.int64),
                    source=ann_file,
                    segmentations=[a.get("segmentation", []) for a in kept] if masks else None,
                    crowd=crowd,
                )
            )
        policy.report(ann_file, total)
        skipped = []
        if report_unlisted:
            listed = {Path(coco.imgs[i]["file_name"]).as_posix() for i in coco.imgs}
            for path in sorted(p for p in image_dir.rglob("*") if p.is_file()):
                if path.relative_to(image_dir).as_posix() not in listed:
                    skipped.append((str(path), f"not listed in {ann_file.name} (no annotation entry)"))
        super().__init__(
            records,
            classes,
            transform=transform,
            masks=masks,
            root=image_dir,
            skipped=skipped,
            box_fixes=policy.facts(total),
        )


def _check_coco_annotations(coco: COCO, label_of: dict[int, int], ann_file: Path) -> None:
    """Refuse annotations that pycocotools indexes without complaint but that cannot be read as boxes."""
    for ann in coco.anns.values():
        where = f"{ann_file}: annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r})"
        if ann.get("category_id") not in label_of:
            raise DataError(
                f"{where} has category_id {ann.get('category_id')!r}, which is not among the file's categories "
                f"{sorted(label_of)}; add the category or fix the annotation."
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
            raise DataError(f"{where} has bbox {bbox!r}; a COCO bbox is [x, y, width, height] in pixels.")
        if ann.get("image_id") not in coco.imgs:
            raise DataError(f"{where} refers to an image id that the file's images do not list.")


# -- one builder for both layouts -------------------------------------------------------------------------------
#: The layouts :func:`build_detection_dataset` reads.
LAYOUTS: tuple[str, ...] = ("voc", "coco")


def detect_detection_layout(root: str | os.PathLike[str]) -> str:
    """The layout ``layout="auto"`` picks: ``voc`` when ``root/Annotations/`` exists, ``coco`` when
    ``root/annotations/`` does.

    Raises:
        DataError: neither folder exists; the message says what each layout expects and what was found.
    """
    root = Path(root).expanduser()
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    if "Annotations" in names:
        return "voc"
    if "annotations" in names:
        return "coco"
    found = sorted(names) if root.is_dir() else "nothing (no such folder)"
    raise DataError(
        f"no detection layout recognised in {root}: expected Annotations/ + JPEGImages/ + ImageSets/Main/ (Pascal "
        f"VOC XML) or annotations/instances_<split>.json + <split>/ (COCO JSON); found {found}. The layouts are "
        "described in docs/data.md."
    )


def build_detection_dataset(
    root: str | os.PathLike[str],
    split: str | None,
    transform: Callable[..., Any] | None = None,
    layout: str = "auto",
    masks: bool = False,
) -> DetectionDataset:
    """Build a detection (or, with ``masks=True``, instance segmentation) dataset from a VOC or COCO tree.

    * ``voc``: ``root/JPEGImages/<id>.jpg``, ``root/Annotations/<id>.xml``, ids from
      ``root/ImageSets/Main/<split>.txt`` (``split=None``: every XML); classes are the sorted object names of
      every XML (:class:`VOCDetectionDataset`). No masks.
    * ``coco``: ``root/<split>/`` images and ``root/annotations/instances_<split>.json``
      (:class:`CocoDetectionDataset`); images in ``root/<split>/`` that the JSON does not list are recorded in
      ``skipped``.

    Args:
        root: the dataset folder.
        split: the split name (``train``, ``val``, ``test``, ``train2017``, ...).
        transform: the joint transform (:func:`build_detection_transforms`), or None.
        layout: ``auto`` (``voc`` when ``root/Annotations/`` exists, else ``coco``), ``voc`` or ``coco``.
        masks: load instance masks (instance segmentation; COCO only).

    Raises:
        DataError: no known layout, a missing split, or data that does not fit the layout.
        ConfigError: an unknown ``layout``, or ``masks=True`` with the VOC layout.
    """
    root = Path(root).expanduser()
    if layout == "auto":
        layout = detect_detection_layout(root)
    if layout == "voc":
        if masks:
            raise ConfigError(
                "instance segmentation needs masks, which Pascal VOC XML does not hold: use a COCO layout "
                "(--layout coco, polygons or RLE in the JSON's segmentation fields)."
            )
        return VOCDetectionDataset(root, split, transform)
    if layout == "coco":
        if split is None:
            raise DataError("the COCO layout needs a split: root/<split>/ and root/annotations/instances_<split>.json.")
        ann_file = root / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            have = sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
            raise DataError(
                f"no {ann_file} for split {split!r}; found {have or 'no instances_<split>.json'} in "
                f"{root / 'annotations'}."
            )
        image_dir = root / split
        if not image_dir.is_dir():
            raise DataError(f"image folder {image_dir} of split {split!r} does not exist (expected beside {ann_file}).")
        return CocoDetectionDataset(image_dir, ann_file, transform, masks=masks, report_unlisted=True)
    raise ConfigError(f"unknown detection layout {layout!r}; choose from 'auto', {', '.join(map(repr, LAYOUTS))}.")


# -- ground truth, collate, transforms ---------------------------------------------------------------------------
def make_coco(images: Sequence[dict[str, Any]], annotations: Sequence[dict[str, Any]], classes: Sequence[str]) -> COCO:
    """A pycocotools ``COCO`` from image entries, annotation entries and K class names (category id = label 1..K).

    Annotation ids are assigned here (1, 2, ...); ``area`` defaults to the mask area when a ``segmentation`` is
    given, else to the box area; ``iscrowd`` defaults to 0.
    """
    anns = []
    for i, ann in enumerate(annotations, start=1):
        ann = dict(ann, id=i)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            segm = ann.get("segmentation")
            if isinstance(segm, dict) and not isinstance(segm.get("counts"), list):
                ann["area"] = float(mask_utils.area(segm))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        anns.append(ann)
    dataset = {
        "info": {"description": "built by sidetune"},
        "images": [dict(img) for img in images],
        "annotations": anns,
        "categories": [{"id": i + 1, "name": str(name)} for i, name in enumerate(classes)],
    }
    return _quiet_coco(dataset)


def to_coco(dataset: DetectionDataset | Subset) -> COCO:
    """The pycocotools ground truth of a detection dataset (or a ``Subset`` of one), from its records.

    Boxes are in original image coordinates, category ids are the labels 1..K (so torchvision predictions
    need no mapping), crowd annotations (COCO) are included with ``iscrowd=1``. Instance masks are included
    as ``segmentation`` when the dataset loads masks. Reads no image. A split of a tap cache is scored against
    the files it was cached from (its ``source``, sample for sample), so a cached run's mAP is an uncached one's.
    """
    if getattr(dataset, "source", None) is not None:  # a cache's split (CachedSplit): its files' dataset
        dataset = dataset.source
    indices: Sequence[int] = range(len(dataset))
    base = dataset
    while isinstance(base, Subset):
        indices = [base.indices[i] for i in indices]
        base = base.dataset
    if not isinstance(base, DetectionDataset):
        raise DataError(f"to_coco needs a sidetune DetectionDataset (or a Subset of one), got {type(base).__name__}.")
    images, annotations = [], []
    for i in indices:
        r = base.records[i]
        images.append({"id": r.image_id, "width": r.width, "height": r.height, "file_name": str(r.image_path)})
        for j, (box, label) in enumerate(zip(r.boxes.tolist(), r.labels.tolist(), strict=True)):
            x1, y1, x2, y2 = box
            ann = {"image_id": r.image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if base.masks and r.segmentations is not None:
                ann["segmentation"] = _to_rle(r.segmentations[j], r.height, r.width)
            annotations.append(ann)
        for crowd in r.crowd:
            ann = {k: crowd[k] for k in ("category_id", "bbox", "segmentation", "area") if k in crowd}
            annotations.append(dict(ann, image_id=r.image_id, iscrowd=1))
    return make_coco(images, annotations, base.classes)


def _to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _plain(value: Any) -> Any:
    return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value


def detection_collate(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Batch ``(image, target)`` samples as torchvision's detectors take them: a list of images, a list of targets.

    Images may differ in size (the detector letterboxes them); tv_tensors become plain tensors.
    """
    images = [_plain(image) for image, _ in batch]
    targets = [{k: _plain(v) for k, v in target.items()} for _, target in batch]
    return images, targets


def build_detection_transforms(
    *,
    train: bool,
    img_size: int | Sequence[int] | None = None,
    scale_range: tuple[float, float] = (0.5, 1.5),
    hflip: float = 0.5,
) -> v2.Compose:
    """Joint image + boxes (+ masks) transforms; the output image is a float tensor in ``[0, 1]`` (not normalised).

    Train: with ``img_size``, large-scale jitter as ViTDet trains a fixed-size backbone (resize so the image fits
    ``img_size * r``, ``r`` uniform in ``scale_range``, keeping the aspect ratio; random crop of ``img_size``,
    padded with 0 where smaller); horizontal flip; boxes that leave the crop are removed
    (``SanitizeBoundingBoxes``, with their labels and masks). Eval: nothing but the conversion to float: the
    detector letterboxes to its fixed size and maps predictions back to the original image.

    Args:
        train: training (augmenting) or evaluation transform.
        img_size: the backbone's input size, for scale jitter + crop (train); None: flip only.
        scale_range: scale jitter range.
        hflip: horizontal flip probability.
    """
    steps: list[Any] = []
    if train:
        if img_size is not None:
            size = [img_size, img_size] if isinstance(img_size, int) else [int(s) for s in img_size]
            steps += [
                v2.ScaleJitter(tuple(size), scale_range=scale_range, antialias=True),
                v2.RandomCrop(size, pad_if_needed=True, fill=0),
            ]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        steps.append(v2.SanitizeBoundingBoxes())
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return v2.Compose(steps)
