"""Image classification datasets from three on-disk layouts.

Every dataset here returns ``(image, label)`` with ``image`` a tensor (the transform's output; a float
``(3, H, W)`` tensor in ``[0, 1]`` when no transform is given) and ``label`` a Python ``int``, and exposes
``classes: list[str]``, ``samples: list[tuple[Path, int]]``, ``targets: list[int]`` and ``len()``.

Layouts:

* **ImageFolder** (``root/<class>/<image>``): scanned with torchvision's ``make_dataset``; classes are the
  sorted class-folder names, as in ``torchvision.datasets.ImageFolder``. Files are kept by extension
  (torchvision's ``IMG_EXTENSIONS``, case-insensitive); other files, hidden files and hidden folders
  (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints``) are ignored.
* **VTAB-1k file lists**, as distributed by the visual PETL community (NOAH, VPT, ...): a task folder with
  ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, one ``relative/path label``
  per line, paths relative to the list file's folder (or absolute). ``split`` names the file; the aliases
  ``train`` and ``trainval`` mean ``train800val200`` (the 1,000 training images of the VTAB-1k protocol)
  and ``val`` means ``val200``. The list files carry no class names, so ``classes`` is
  ``["0", "1", ...]`` up to the largest label found in any of the task's list files (so every split of one
  task has the same class count), or ``num_classes`` when given.
* **CSV** with a header containing ``path`` and ``label`` (extra columns are ignored). Paths are relative to
  the CSV's folder or absolute. Labels: if every label is an integer, labels are class indices and
  ``classes`` is ``["0", ..., str(max_label)]`` (or ``num_classes`` strings when given); if no label is an
  integer, labels are class names and **class index = position in the sorted unique names** (the
  ImageFolder rule). A file mixing integer and name labels is rejected as ambiguous. Passing
  ``classes=[...]`` fixes the mapping explicitly (a label is looked up as a name in that list first, then as
  an index); pass the training set's ``classes`` when building its test set so both share one mapping.

Errors: every problem with the data raises :class:`DataError` (a ``ValueError``) whose message names the
folder, file, line or value at fault and says how to fix it.

Corrupt or non-image files (policy): construction does **not** decode every image (on real datasets that
costs as much as an epoch); it only checks that every referenced file exists. An image that fails to decode
in ``__getitem__`` raises :class:`DataError` naming the file. :func:`verify_images` decodes every image once
and returns the unreadable paths; ``build_classification_dataset(..., skip_corrupt=True)`` runs it at
construction, drops the unreadable files, records them in ``skipped`` and emits one ``warnings.warn`` that
counts them. ``sidetune data check`` (:func:`sidetune.data.check_dataset`) lists every unreadable file.

What an ImageFolder scan leaves out is recorded, never dropped silently: ``dataset.skipped`` lists
``(path, reason)`` for files of another format, hidden files and folders, files outside a class folder, and
directory links that loop back to one of their own ancestors (not followed: a link to the data folder would
otherwise read every class again under the link's class). One image file reached twice through links (the
same real path) is read once: under two classes it is refused (one image cannot carry two labels), under one
class the second path is skipped as a duplicate. (Hard links are separate files to the folder scan, which
avoids one system call per image; lists compare inodes.) A file listed twice with two labels in a VTAB list
or a CSV (the same inode: hard links included) is refused the same way.

Colour and depth: every image is converted to 8-bit RGB on load (grayscale, palette, CMYK and RGBA inputs
occur); an alpha channel is dropped, as torchvision's ``pil_loader`` does. Images of more than 8 bits are
scaled by their range, not clipped: 16-bit integer images (``I;16`` PNG/TIFF) by 65535 -> 255; 32-bit integer
images (``I``) whose values lie in 0..255 as they are, in 0..65535 as 16-bit; float images (``F`` TIFF) in
``[0, 1]`` by 255, in ``[0, 255]`` as they are. Anything else (negative or larger values, NaN) is refused with
the mode and the value range named: guessing a scale would train on a wrong image without a word.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import to_tensor

from sidetune.errors import ConfigError

from .files import (
    DataError,
    _check_no_conflicts,
    _scan_class_folders,
    load_rgb,
    text_of,
    to_rgb,
    unreadable_images,
    unwrap,
)

logger = logging.getLogger(__name__)

__all__ = [
    "IMG_EXTENSIONS",
    "VTAB_SPLITS",
    "CSVDataset",
    "ClassificationDataset",
    "ClassificationSubset",
    "DataError",
    "ImageFolderDataset",
    "VTABDataset",
    "build_classification_dataset",
    "check_num_classes",
    "load_rgb",
    "skipped_files",
    "split_train_val",
    "to_rgb",
    "unreadable_images",
    "verify_images",
]

Layout = Literal["auto", "imagefolder", "vtab", "csv"]

#: The VTAB-1k list files (split name -> file name).
VTAB_SPLITS: dict[str, str] = {
    "train800": "train800.txt",
    "val200": "val200.txt",
    "train800val200": "train800val200.txt",
    "test": "test.txt",
}
#: Aliases accepted for the VTAB-1k split names.
VTAB_ALIASES: dict[str, str] = {"train": "train800val200", "trainval": "train800val200", "val": "val200"}
# Folder names that mean "this is a split folder, not a class folder".
_SPLIT_DIR_NAMES = frozenset({"train", "val", "valid", "validation", "test", "trainval"})
_MAX_LISTED = 5
# A label written as a decimal or exponent number ("1.0", "0.5", "2e1"): a float column, not a class name.
_FLOAT_LABEL = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


def _sample_list(paths_labels: Sequence[tuple[Path, int]]) -> list[tuple[Path, int]]:
    # Path() parses its argument again even when given a Path: keep those as they are (large folders)
    return [(p if isinstance(p, Path) else Path(p), int(y)) for p, y in paths_labels]


class ClassificationDataset(Dataset):
    """A list of ``(image path, label)`` pairs with class names; the base of every layout here.

    Args:
        samples: ``(path, label)`` pairs, labels in ``[0, len(classes))``.
        classes: Class names; ``classes[label]`` names a label.
        transform: Applied to the RGB PIL image; ``None`` gives a float ``(3, H, W)`` tensor in ``[0, 1]``.
        root: Where the data came from (folder or list file), used in messages.
        skipped: ``(path, reason)`` of every file the reader saw and left out (see ``skipped`` below).

    Attributes:
        skipped: ``(path, reason)`` of every file left out, in the order met: what a run reports (count) and
            writes into its summary (list). Empty when nothing was left out.

    Raises:
        DataError: A label lies outside ``[0, len(classes))``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | os.PathLike[str], int]],
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        root: str | os.PathLike[str] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.samples: list[tuple[Path, int]] = _sample_list(samples)
        self.classes: list[str] = [str(c) for c in classes]
        self.transform = transform
        self.root = Path(root) if root is not None else None
        self.skipped: list[tuple[str, str]] = [(str(p), str(r)) for p, r in skipped]
        for path, label in self.samples:
            if not 0 <= label < len(self.classes):
                raise DataError(
                    f"label {label} of {path} is outside the {len(self.classes)} classes of {self.root} "
                    f"(valid labels: 0..{len(self.classes) - 1}); fix the label or pass the right classes/num_classes."
                )

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [label for _, label in self.samples]

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Class name -> label."""
        return {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        img = load_rgb(path)
        image = self.transform(img) if self.transform is not None else to_tensor(img)
        return image, label

    def drop(self, paths: Sequence[str | os.PathLike[str]], reason: str = "dropped") -> int:
        """Remove the samples whose path is in ``paths`` (classes are kept) and record them in ``skipped``.

        Args:
            paths: Sample paths to remove.
            reason: Why, recorded beside each removed path.

        Returns:
            How many samples were removed.
        """
        bad = {Path(p) for p in paths}
        kept = [(p, y) for p, y in self.samples if p not in bad]
        self.skipped.extend((str(p), reason) for p, _ in self.samples if p in bad)
        removed = len(self.samples) - len(kept)
        self.samples = kept
        return removed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root}, samples={len(self)}, classes={len(self.classes)})"


class ImageFolderDataset(ClassificationDataset):
    """``root/<class>/<image>``: torchvision's ImageFolder scan, with checks, clear errors and a record of what
    was left out (``skipped``: other formats, hidden entries, looping directory links, duplicates).

    Args:
        root: The folder holding one sub-folder per class.
        transform: See :class:`ClassificationDataset`.
        classes: Fix the class list (and order) instead of taking the sorted folder names, e.g. the training
            set's classes when building a test set. Every class folder must be in it; a class without a
            folder is allowed (it gets no samples).

    Raises:
        DataError: ``root`` is missing or has no class folders, a class folder has no images, a folder is
            not in ``classes``, or one image file is reached under two classes.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist (or is not a folder); check the path.")
        classes, found, samples, skipped = _scan_class_folders(root, classes)
        if not found:
            raise DataError(
                f"data folder {root} has no class folders; expected the ImageFolder layout root/<class>/<image> "
                "(or pass a VTAB list file / CSV instead)."
            )
        class_to_idx = {c: i for i, c in enumerate(classes)}
        counts = Counter(label for _, label in samples)
        empty = [c for c in found if counts[class_to_idx[c]] == 0]
        if empty:
            raise DataError(
                f"class folder(s) {[str(root / c) for c in empty]} contain no images (extensions "
                f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)."
            )
        super().__init__(samples, classes, transform=transform, root=root, skipped=skipped)
        if skipped:
            logger.info("ImageFolder %s: skipped %d file(s), first %s (%s)", root, len(skipped), *skipped[0])
        logger.info("ImageFolder %s: %d images, %d classes", root, len(self), len(self.classes))


def _check_exist(missing: list[tuple[int, Path]], source: Path) -> None:
    if not missing:
        return
    listed = "; ".join(f"line {n}: {p}" for n, p in missing[:_MAX_LISTED])
    more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
    raise DataError(
        f"{len(missing)} image file(s) listed in {source} do not exist: {listed}{more}. Paths are read relative "
        f"to {source.parent} unless absolute; fix the paths or the list."
    )


def _parse_list_file(list_file: Path) -> list[tuple[int, str, int]]:
    """Parse a VTAB list file into ``(line number, relative path, label)``."""
    if not list_file.is_file():
        raise DataError(f"list file {list_file} does not exist.")
    entries = []
    with text_of(list_file), list_file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{list_file}, line {n}: expected 'relative/path label', got {line!r}.")
            rel, label = parts
            try:
                y = int(label)
            except ValueError:
                raise DataError(
                    f"{list_file}, line {n}: label {label!r} is not an integer (expected 'relative/path label')."
                ) from None
            if y < 0:
                raise DataError(f"{list_file}, line {n}: label {y} is negative; labels are class indices 0, 1, ...")
            entries.append((n, rel, y))
    if not entries:
        raise DataError(f"list file {list_file} is empty; expected one 'relative/path label' per line.")
    return entries


def resolve_vtab_split(root: str | os.PathLike[str], split: str) -> Path:
    """The list file for ``split`` in a VTAB-1k task folder (``train`` -> ``train800val200.txt``, ...)."""
    root = Path(root)
    direct = root / f"{split}.txt"
    if direct.is_file():
        return direct
    alias = VTAB_ALIASES.get(split)
    if alias is not None and (root / VTAB_SPLITS[alias]).is_file():
        return root / VTAB_SPLITS[alias]
    have = sorted(p.stem for p in root.glob("*.txt"))
    raise DataError(
        f"no list file for split {split!r} in {root}; found list files {have}. Use one of "
        f"{sorted(VTAB_SPLITS)} (aliases: {VTAB_ALIASES})."
    )


class VTABDataset(ClassificationDataset):
    """A VTAB-1k task folder with ``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``.

    Args:
        root: The task folder, or one list file (then ``split`` must be ``None``).
        split: The list file's stem, or an alias (``train``/``trainval`` -> ``train800val200``,
            ``val`` -> ``val200``).
        transform: See :class:`ClassificationDataset`.
        num_classes: The class count; default: 1 + the largest label in any of the task's list files.
        classes: Class names (their number fixes the class count); default ``["0", "1", ...]``.

    Raises:
        DataError: Missing folder or list file, malformed line (file and line named), missing image,
            label outside the class count.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root).expanduser()
        if root.is_file():
            list_file, folder = root, root.parent
        elif root.is_dir():
            if split is None:
                raise DataError(f"{root} is a VTAB-1k folder: pass split= one of {sorted(VTAB_SPLITS)}.")
            list_file, folder = resolve_vtab_split(root, split), root
        else:
            raise DataError(f"VTAB data folder {root} does not exist; check the path.")
        entries = _parse_list_file(list_file)
        if classes is None:
            if num_classes is None:
                # Every split of a task gets the same class count, even when a split lacks the last class.
                max_label = max(y for _, _, y in entries)
                for name in VTAB_SPLITS.values():
                    other = folder / name
                    if other != list_file and other.is_file():
                        max_label = max(max_label, *(y for _, _, y in _parse_list_file(other)))
                num_classes = max_label + 1
            classes = [str(i) for i in range(num_classes)]
        elif num_classes is not None and num_classes != len(classes):
            raise DataError(f"--num-classes {num_classes} disagrees with the {len(classes)} class names of the data.")
        for n, _, y in entries:
            if y >= len(classes):
                raise DataError(
                    f"{list_file}, line {n}: label {y} is outside the {len(classes)} classes (0..{len(classes) - 1}); "
                    "fix the label or pass the right num_classes."
                )
        samples = [(folder / rel, y) for _, rel, y in entries]
        _check_exist([(n, p) for (n, _, _), (p, _) in zip(entries, samples, strict=True) if not p.is_file()], list_file)
        _check_no_conflicts(samples, classes)
        super().__init__(samples, classes, transform=transform, root=list_file)
        logger.info("VTAB list %s: %d images, %d classes", list_file, len(self), len(self.classes))


class CSVDataset(ClassificationDataset):
    """A CSV file with a ``path,label`` header (see the module docstring for the label mapping).

    Args:
        csv_file: The CSV file; relative paths in it are relative to its folder.
        transform: See :class:`ClassificationDataset`.
        classes: Fix the class names and order (labels may then be names in it or indices).
        num_classes: With integer labels: the class count (default 1 + the largest label).

    Raises:
        DataError: Missing file, bad header, malformed row (file and line named), missing image, label
            outside the class count, unknown class name, mixed integer and name labels.
    """

    def __init__(
        self,
        csv_file: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
    ) -> None:
        csv_file = Path(csv_file).expanduser()
        if not csv_file.is_file():
            raise DataError(f"CSV file {csv_file} does not exist; check the path.")
        rows: list[tuple[int, str, str]] = []
        with text_of(csv_file), csv_file.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            columns = [h.strip().lower() for h in header or []]
            if "path" not in columns or "label" not in columns:
                raise DataError(
                    f"{csv_file}, line 1: expected a header with columns 'path' and 'label', got {header}; "
                    "add the header line 'path,label'."
                )
            ip, il = columns.index("path"), columns.index("label")
            for row in reader:
                n = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(columns):
                    raise DataError(
                        f"{csv_file}, line {n}: expected {len(columns)} fields ({', '.join(columns)}), "
                        f"got {len(row)}: {row}."
                    )
                path, label = row[ip].strip(), row[il].strip()
                if not path or not label:
                    raise DataError(f"{csv_file}, line {n}: empty path or label in {row}.")
                rows.append((n, path, label))
        if not rows:
            raise DataError(f"CSV file {csv_file} has no rows after its header; expected one 'path,label' per line.")

        labels, classes = _map_csv_labels(rows, csv_file, classes, num_classes)
        folder = csv_file.parent
        samples = [(folder / p, y) for (_, p, _), y in zip(rows, labels, strict=True)]
        _check_exist([(n, p) for (n, _, _), (p, _) in zip(rows, samples, strict=True) if not p.is_file()], csv_file)
        _check_no_conflicts(samples, classes)
        super().__init__(samples, classes, transform=transform, root=csv_file)
        logger.info("CSV %s: %d images, %d classes", csv_file, len(self), len(self.classes))


def _as_index(label: str) -> int | None:
    try:
        return int(label)
    except ValueError:
        return None


def _map_csv_labels(
    rows: list[tuple[int, str, str]],
    csv_file: Path,
    classes: Sequence[str] | None,
    num_classes: int | None,
) -> tuple[list[int], list[str]]:
    """Map CSV label strings to indices; returns ``(labels, classes)`` (rules in the module docstring)."""
    if classes is not None:
        classes = [str(c) for c in classes]
        if num_classes is not None and num_classes != len(classes):
            raise DataError(f"--num-classes {num_classes} disagrees with the {len(classes)} class names of the data.")
        lookup = {c: i for i, c in enumerate(classes)}
        labels = []
        for n, _, label in rows:
            y = lookup.get(label, _as_index(label))
            if y is None or not 0 <= y < len(classes):
                raise DataError(
                    f"{csv_file}, line {n}: label {label!r} is neither one of the classes {classes} nor an index "
                    f"in 0..{len(classes) - 1}; fix the label or the classes passed."
                )
            labels.append(y)
        return labels, classes

    floats = [(n, label) for n, _, label in rows if _FLOAT_LABEL.match(label)]
    if floats:
        n, label = floats[0]
        raise DataError(
            f"{csv_file}, line {n}: label {label!r} is a decimal number ({len(floats)} such label(s) in the file); "
            "labels must be integer class indices (0, 1, ...) or class names. Write the indices without a decimal "
            "point (a pandas column holding a missing value turns into floats: fill it, then .astype(int))."
        )
    indices = [_as_index(label) for _, _, label in rows]
    if all(y is not None for y in indices):
        for (n, _, _), y in zip(rows, indices, strict=True):
            if y < 0 or (num_classes is not None and y >= num_classes):
                bound = f"0..{num_classes - 1}" if num_classes is not None else "0, 1, ..."
                raise DataError(f"{csv_file}, line {n}: label {y} is outside the class indices {bound}.")
        count = num_classes if num_classes is not None else max(indices) + 1
        return [int(y) for y in indices], [str(i) for i in range(count)]
    if any(y is not None for y in indices):
        n_int = next(n for (n, _, _), y in zip(rows, indices, strict=True) if y is not None)
        n_name = next(n for (n, _, _), y in zip(rows, indices, strict=True) if y is None)
        raise DataError(
            f"{csv_file} mixes integer labels (line {n_int}) and class-name labels (line {n_name}); use one kind, "
            "or pass classes=[...] to fix the mapping."
        )
    names = sorted({label for _, _, label in rows})
    if num_classes is not None and num_classes != len(names):
        raise DataError(
            f"{csv_file} has {len(names)} class names {names[:20]} but --num-classes is {num_classes}; pass "
            f"--num-classes {len(names)}, or (in Python) classes=[...] naming all {num_classes}."
        )
    lookup = {c: i for i, c in enumerate(names)}
    return [lookup[label] for _, _, label in rows], names


def verify_images(dataset: ClassificationDataset | ClassificationSubset, num_workers: int = 8) -> list[Path]:
    """Decode every image of a dataset once and return the paths that cannot be read.

    Args:
        dataset: A dataset with ``samples``.
        num_workers: Decoding threads (PIL releases the GIL while decoding).

    Returns:
        The unreadable image paths, in sample order.
    """

    return [p for p, _ in unreadable_images(dataset, num_workers)]


def check_num_classes(dataset: Any, num_classes: int) -> None:
    """Raise if ``num_classes`` (e.g. a model head's size) disagrees with the data.

    Args:
        dataset: A dataset with ``classes`` (and ``samples`` or ``targets``).
        num_classes: The class count the caller expects.

    Raises:
        DataError: The dataset's class count differs from ``num_classes``, or a label is ``>= num_classes``.
    """
    classes = list(dataset.classes)
    where = getattr(dataset, "root", None) or type(dataset).__name__
    if len(classes) != num_classes:
        shown = classes if len(classes) <= 20 else [*classes[:20], "..."]
        raise DataError(
            f"--num-classes {num_classes} but the data at {where} has {len(classes)} classes {shown}; "
            f"pass --num-classes {len(classes)} or fix the data."
        )
    labels = _labels_of(dataset)
    if labels and max(labels) >= num_classes:
        raise DataError(
            f"the data at {where} has label {max(labels)} but --num-classes is {num_classes} "
            f"(labels are 0..{num_classes - 1})."
        )


class ClassificationSubset(Subset):
    """A :class:`torch.utils.data.Subset` that keeps ``classes``, ``samples`` and ``targets``."""

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.classes)

    @property
    def samples(self) -> list[tuple[Path, int]]:
        base = self.dataset.samples
        return [base[i] for i in self.indices]

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def root(self) -> Path | None:
        return getattr(self.dataset, "root", None)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """What the reader of the whole dataset left out (a subset skips nothing more)."""
        return list(self.dataset.skipped)

    def __repr__(self) -> str:
        return f"ClassificationSubset({self.dataset!r}, samples={len(self)})"


def skipped_files(dataset: Any) -> list[tuple[str, str]]:
    """``(path, reason)`` of every file a dataset's reader left out, looking through wrappers (``Subset``, the
    training loop's seeding wrapper: anything with a ``dataset`` attribute).

    Every reader in :mod:`sidetune.data` records them in ``dataset.skipped``; a dataset without the attribute
    (one a user wrote) reports nothing.

    Args:
        dataset: A dataset from :mod:`sidetune.data`, or a (nested) wrapper of one.
    """
    base, _ = unwrap(dataset)
    return list(getattr(base, "skipped", []))


def _labels_of(dataset: Any) -> list[int]:
    if hasattr(dataset, "targets"):
        return [int(y) for y in dataset.targets]
    if hasattr(dataset, "samples"):
        return [int(y) for _, y in dataset.samples]
    raise TypeError(f"{type(dataset).__name__} has neither .targets nor .samples; cannot read its labels.")


def split_train_val(
    dataset: Any,
    val_fraction: float | None = None,
    val_per_class: int | None = None,
    seed: int = 0,
) -> tuple[ClassificationSubset, ClassificationSubset]:
    """Carve a seeded, stratified validation split out of a training set (e.g. to pick a learning rate).

    Each class is shuffled with ``torch.Generator().manual_seed(seed)`` (the same split on every machine) and
    its first ``val_per_class`` images, or ``floor(val_fraction * n_class + 0.5)`` of them (at most
    ``n_class - 1``, so every class keeps a training image), go to validation. Give exactly one of
    ``val_fraction`` and ``val_per_class``.

    Args:
        dataset: A dataset with ``targets`` or ``samples`` (and ``classes``), e.g. from
            :func:`build_classification_dataset`.
        val_fraction: Fraction of each class for validation, in ``(0, 1)``.
        val_per_class: Number of images of each class for validation.
        seed: Seed of the shuffle.

    Returns:
        ``(train, val)`` subsets of ``dataset``, disjoint, each in the dataset's order.

    Raises:
        ConfigError: Neither or both of ``val_fraction``/``val_per_class`` given, or out of range.
        DataError: A class has too few images for ``val_per_class``, or the split leaves validation empty.
    """
    if (val_fraction is None) == (val_per_class is None):
        raise ConfigError("give exactly one of val_fraction and val_per_class.")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if val_per_class is not None and val_per_class < 1:
        raise ConfigError(f"val_per_class must be >= 1, got {val_per_class}.")

    labels = _labels_of(dataset)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = getattr(dataset, "classes", None)
    gen = torch.Generator().manual_seed(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        if val_per_class is not None:
            if len(idx) <= val_per_class:
                name = classes[y] if classes is not None else y
                raise DataError(
                    f"class {name!r} has {len(idx)} images; val_per_class={val_per_class} needs at least "
                    f"{val_per_class + 1} so that one stays for training. Lower val_per_class or use val_fraction."
                )
            n_val = val_per_class
        else:
            n_val = min(math.floor(val_fraction * len(idx) + 0.5), len(idx) - 1)
        order = torch.randperm(len(idx), generator=gen).tolist()
        val_idx.extend(idx[j] for j in order[:n_val])
        train_idx.extend(idx[j] for j in order[n_val:])
    if not val_idx:
        raise DataError(f"--val-fraction {val_fraction} leaves the validation split empty; raise it.")
    logger.info("split_train_val: %d train, %d val (seed %d)", len(train_idx), len(val_idx), seed)
    return ClassificationSubset(dataset, sorted(train_idx)), ClassificationSubset(dataset, sorted(val_idx))


def _detect_layout(root: Path, split: str | None) -> tuple[str, Path]:
    """Decide the layout of ``root`` (a folder or a file); returns ``(layout, path to build from)``."""
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv", root
        if root.suffix.lower() == ".txt":
            return "vtab", root
        raise DataError(f"{root} is neither a .csv file nor a VTAB .txt list; pass a data folder or one of those.")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; check the path.")
    has_vtab = any((root / name).is_file() for name in VTAB_SPLITS.values())
    if split is not None:
        if (root / f"{split}.txt").is_file() or (has_vtab and split in VTAB_ALIASES):
            return "vtab", root
        if (root / f"{split}.csv").is_file():
            return "csv", root / f"{split}.csv"
        if (root / split).is_dir():
            return "imagefolder", root / split
        entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        raise DataError(
            f"no split {split!r} in {root}: expected {root / split}/ (ImageFolder), {split}.txt (VTAB-1k list) or "
            f"{split}.csv; found {entries[:20]}."
        )
    if has_vtab:
        raise DataError(f"{root} is a VTAB-1k folder: pass split= one of {sorted(VTAB_SPLITS)}.")
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    split_dirs = sorted(subdirs & _SPLIT_DIR_NAMES)
    if split_dirs:
        raise DataError(
            f"{root} holds split folders {split_dirs}, not class folders: pass split={split_dirs[0]!r} "
            "(or layout='imagefolder' if those really are class names)."
        )
    return "imagefolder", root


def build_classification_dataset(
    root_or_file: str | os.PathLike[str],
    split: str | None = None,
    transform: Callable[[Image.Image], Any] | None = None,
    layout: Layout = "auto",
    *,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    skip_corrupt: bool = False,
) -> ClassificationDataset:
    """Build a classification dataset from an ImageFolder tree, a VTAB-1k folder or a CSV file.

    Layout detection (``layout="auto"``): a ``.csv`` file -> CSV; a ``.txt`` file -> one VTAB list; a folder
    with ``split`` given -> ``<split>.txt`` or a VTAB alias (VTAB), else ``<split>.csv`` (CSV), else
    ``<split>/`` (ImageFolder on that folder); a folder without ``split`` -> ImageFolder on the folder itself
    (refused when the folder holds VTAB lists or split folders such as ``train/``, ``test/``, which would
    otherwise silently become two classes).

    Args:
        root_or_file: Data folder, VTAB list file or CSV file.
        split: Split name (``"train"``, ``"test"``, ``"train800"``, ...); see above.
        transform: Applied to each RGB PIL image, e.g. from :func:`sidetune.data.build_transforms`.
        layout: ``"auto"``, or force ``"imagefolder"``, ``"vtab"`` or ``"csv"``.
        classes: Fix the class names and order (e.g. the training set's, when building its test set).
        num_classes: The class count the caller expects; the data must agree (:func:`check_num_classes`).
            For VTAB lists and integer CSV labels it also sets the class count.
        skip_corrupt: Decode every image once (:func:`verify_images`), drop unreadable ones and warn once.

    Returns:
        The dataset.

    Raises:
        DataError: The data is missing, malformed or disagrees with ``classes``/``num_classes``.
    """
    root = Path(root_or_file).expanduser()
    if layout == "auto":
        layout, path = _detect_layout(root, split)
    elif layout == "imagefolder":
        path = root / split if split is not None else root
        if split is not None and not path.is_dir():
            raise DataError(f"split folder {path} does not exist; check split= or the data folder.")
    elif layout == "vtab":
        path = root
    elif layout == "csv":
        path = root
        if root.is_dir():
            if split is None:
                raise DataError(f"{root} is a folder: pass split= to read {root}/<split>.csv, or the CSV file itself.")
            path = root / f"{split}.csv"
    else:
        raise ConfigError(f"unknown layout {layout!r}; choose from 'auto', 'imagefolder', 'vtab', 'csv'.")

    if layout == "imagefolder":
        dataset: ClassificationDataset = ImageFolderDataset(path, transform=transform, classes=classes)
    elif layout == "vtab":
        vtab_split = None if path.is_file() else split
        dataset = VTABDataset(path, split=vtab_split, transform=transform, num_classes=num_classes, classes=classes)
    else:
        dataset = CSVDataset(path, transform=transform, classes=classes, num_classes=num_classes)

    if num_classes is not None:
        check_num_classes(dataset, num_classes)
    if skip_corrupt:
        problems = unreadable_images(dataset)
        bad = [p for p, _ in problems]
        if bad:
            if len(bad) == len(dataset):
                raise DataError(f"none of the {len(bad)} images under {dataset.root} can be decoded.")
            reasons = dict(problems)
            dataset.samples = [(p, y) for p, y in dataset.samples if p not in reasons]
            dataset.skipped.extend((str(p), r) for p, r in problems)
            warnings.warn(
                f"skipped {len(bad)} of {len(bad) + len(dataset)} images under {dataset.root} that could not be "
                f"decoded (first: {bad[0]}).",
                stacklevel=2,
            )
    return dataset
