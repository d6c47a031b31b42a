"""Reading image files: decoding any image to 8-bit RGB, and walking folders without loops or duplicates.

Shared by every dataset reader of :mod:`sidetune.data`; the rules (colour, bit depth, links, skipped files) are
described in :mod:`sidetune.data.classification` and ``docs/data.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ..errors import SidetuneError

__all__ = [
    "CHECK_HINT",
    "IMG_EXTENSIONS",
    "DataError",
    "load_rgb",
    "read_text",
    "text_of",
    "to_rgb",
    "unreadable_images",
]

# What PIL raises on a missing, truncated, unidentified or oversized image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
#: What a user can run to list every unreadable file (the advice in decode errors).
CHECK_HINT = "sidetune data check DATA_DIR --task TASK"


class DataError(SidetuneError):
    """Data on disk (or the caller's description of it) is missing, malformed or inconsistent (a ``ValueError``)."""


@contextmanager
def text_of(path: Path) -> Iterator[None]:
    """Reading ``path`` as text inside this block: a file that is not UTF-8 (another encoding, an image, a binary
    file) is a :class:`DataError` naming it, not a ``UnicodeDecodeError``."""
    try:
        yield
    except UnicodeDecodeError as err:
        byte = err.object[err.start : err.start + 1].hex()
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{byte} cannot be decoded): a list, CSV or class file must be "
            "UTF-8 (re-save it as UTF-8), and a data path must name one of the layouts of docs/data.md."
        ) from None


def read_text(path: Path) -> str:
    """The whole of a UTF-8 text file (lists, class names); see :func:`text_of`."""
    with text_of(path):
        return path.read_text(encoding="utf-8")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image, converted to 8-bit RGB (see :func:`to_rgb` for deep and float images).

    Args:
        path: Image file.

    Returns:
        The decoded RGB image.

    Raises:
        DataError: The file is missing or cannot be decoded as an image, or its pixel values cannot be mapped to
            8 bits without guessing; the message names the file.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, source=path)
    except _DECODE_ERRORS as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"cannot read image {path}: {exc}. Fix or delete the file; `{CHECK_HINT}` lists every unreadable "
            "file of a dataset (from Python, skip_corrupt=True in build_classification_dataset drops them)."
        ) from exc


def to_rgb(img: Image.Image, source: str | os.PathLike[str] | None = None) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, scaling deep and float images by their range.

    Alpha is dropped (palette transparency goes through RGBA). ``I;16*`` (16-bit) images are scaled by
    255/65535; ``I`` (32-bit integer) images are taken as 8-bit when their values lie in 0..255, as 16-bit when
    in 0..65535; ``F`` (float) images as ``[0, 1]`` when their values lie there, as 0..255 when they lie there.
    PIL's own conversion clips instead (a 16-bit image comes out almost white, a ``[0, 1]`` float one black).

    Args:
        img: The image.
        source: Its file, named in errors.

    Raises:
        DataError: A deep or float image whose values fit none of those ranges (negative, too large, NaN), or a
            mode PIL cannot convert; the message names the mode and the range.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "F" or img.mode.startswith("I"):
        return _deep_to_rgb(img, source)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    try:
        return img.convert("RGB")
    except ValueError as exc:
        where = f"image {source}" if source is not None else "an image"
        raise DataError(
            f"{where} has PIL mode {img.mode!r}, which cannot be converted to RGB ({exc}); save it as 8-bit RGB."
        ) from exc


def _deep_to_rgb(img: Image.Image, source: str | os.PathLike[str] | None) -> Image.Image:
    """``I;16*``, ``I`` and ``F`` images -> 8-bit RGB by their range (rules in :func:`to_rgb`)."""
    where = f"image {source}" if source is not None else "an image"
    array = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = array.astype(np.float64) * (255.0 / 65535.0)
    else:
        finite = np.isfinite(array)
        if not finite.all():
            raise DataError(
                f"{where} is a float (PIL mode {img.mode!r}) image with {int((~finite).sum())} NaN or infinite "
                "pixel(s); fix the file or convert it to 8-bit RGB."
            )
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = array.astype(np.float64) * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = array.astype(np.float64)
        elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            scaled = array.astype(np.float64) * (255.0 / 65535.0)
        else:
            kinds = "[0, 1] or [0, 255]" if img.mode == "F" else "0..255 or 0..65535"
            raise DataError(
                f"{where} has PIL mode {img.mode!r} with values in [{lo:g}, {hi:g}], outside {kinds}: its scale "
                "cannot be known, so it is not guessed. Convert it to 8-bit RGB (or to 16-bit) yourself."
            )
    return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")  # 2-D uint8 -> mode L


def _is_image_file(path: str) -> bool:
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, IMG_EXTENSIONS)


def _unsupported(path: str) -> str:
    suffix = os.path.splitext(path)[1]
    kind = suffix.lower() if suffix else "no extension"
    return f"unsupported format ({kind}; images are {', '.join(IMG_EXTENSIONS)})"


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _loops(entry: os.DirEntry, parent_real: str) -> str | None:
    """The target of a directory link that points at its own folder or one of that folder's ancestors, else None."""
    if not entry.is_symlink():
        return None
    target = os.path.realpath(entry.path)
    return target if _inside(parent_real, target) else None


def _walk_images(folder: Path, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Image files under ``folder``, recursively, in ``torchvision``'s ``make_dataset`` order, each as
    ``(path, real path)`` (links resolved: two paths of one file share their real path).

    Directory links are followed (datasets are often assembled from links) except one that points back at one of
    its own ancestors (it would read the tree again, forever or up to the OS's link limit) and one whose target
    was already walked; both are recorded in ``skipped``, as are hidden entries and files of other formats.
    """
    walked: dict[str, str] = {}
    found: list[tuple[str, list[tuple[str, str]]]] = []
    stack = [str(folder)]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in walked:
            skipped.append((current, f"folder already read as {walked[real]} (reached again through a link)"))
            continue
        walked[real] = current
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((current, f"unreadable folder ({exc.strerror or exc})"))
            continue
        files = []
        for entry in entries:
            if entry.name.startswith("."):
                skipped.append((entry.path, "hidden folder" if entry.is_dir() else "hidden file"))
            elif entry.is_dir():
                target = _loops(entry, real)
                if target is not None:
                    skipped.append((entry.path, f"directory link that loops back to its ancestor {target}"))
                else:
                    stack.append(entry.path)
            elif entry.is_file():
                if has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                    # the real path without a system call, unless the file itself is a link
                    key = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                    files.append((entry.path, key))
                else:
                    skipped.append((entry.path, _unsupported(entry.name)))
            else:
                skipped.append((entry.path, "broken link" if entry.is_symlink() else "not a regular file"))
        found.append((current, files))
    found.sort()  # torchvision walks sorted(os.walk(...)): folders by path, files by name
    return [f for _, files in found for f in files]


def unwrap(dataset: Any) -> tuple[Any, list[int]]:
    """The dataset a reader built, under its wrappers, and the indices into it that the wrapper exposes.

    ``Subset`` wrappers map indices; any other wrapper with a ``dataset`` attribute and the same length (the
    training loop's per-sample seeding, a transform wrapper) is taken to keep them.
    """
    indices: Sequence[int] = range(len(dataset))
    while not hasattr(dataset, "skipped") and hasattr(dataset, "dataset"):
        if isinstance(dataset, Subset):
            indices = [dataset.indices[i] for i in indices]
        elif len(dataset) != len(dataset.dataset):
            break
        dataset = dataset.dataset
    return dataset, list(indices)


def _file_id(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(device, inode): one file has one id, whatever path or link reaches it (hard links included)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def unreadable_images(dataset: Any, num_workers: int = 8) -> list[tuple[Path, str]]:
    """Decode every image of a dataset once; ``(path, reason)`` of each one that cannot be read, in sample order.

    Args:
        dataset: A dataset with ``samples`` of ``(path, label)``.
        num_workers: Decoding threads (PIL releases the GIL while decoding).
    """

    def problem(path: Path) -> str | None:
        try:
            load_rgb(path)
        except DataError as exc:
            return _reason(exc)
        return None

    paths = [p for p, _ in dataset.samples]
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        problems = list(pool.map(problem, paths))
    return [(p, r) for p, r in zip(paths, problems, strict=True) if r is not None]


def _reason(exc: BaseException) -> str:
    """A short reason for a skipped-file list: the cause of a decode error, else its message's first sentence."""
    cause = exc.__cause__
    if cause is not None:
        return f"unreadable ({type(cause).__name__}: {cause})"
    return f"unreadable ({str(exc).split('; ')[0]})"


def _two_labels_error(path: Path, label: int, first: Path, first_label: int, classes: Sequence[str]) -> DataError:
    return DataError(
        f"one image file is read under two classes: {first} (class {classes[first_label]!r}) and {path} (class "
        f"{classes[label]!r}) are the same file (a link, a hard link or a repeated list entry). One image cannot "
        "carry two labels: remove the link or the duplicate entry."
    )


def _scan_class_folders(
    root: Path, classes: Sequence[str] | None
) -> tuple[list[str], list[str], list[tuple[Path, int]], list[tuple[str, str]]]:
    """Scan ``root/<class>/...``; returns ``(classes, class folders found, samples, skipped)``."""
    skipped: list[tuple[str, str]] = []
    root_real = os.path.realpath(root)
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            skipped.append((entry.path, "hidden folder" if entry.is_dir() else "hidden file"))
        elif entry.is_dir():
            target = _loops(entry, root_real)
            if target is not None:
                skipped.append((entry.path, f"directory link that loops back to its ancestor {target}"))
            else:
                found.append(entry.name)
        else:
            skipped.append((entry.path, "not inside a class folder"))
    if classes is None:
        classes = found
    else:
        classes = [str(c) for c in classes]
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"class folders {unknown} in {root} are not among the given classes {classes}; "
                "remove the folders or add them to classes."
            )
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    seen: dict[str, tuple[Path, int]] = {}
    for name in sorted(found):  # torchvision's order: classes by name
        label = class_to_idx[name]
        for file, key in _walk_images(root / name, skipped):
            if key in seen:
                first, first_label = seen[key]
                if first_label != label:
                    raise _two_labels_error(Path(file), label, first, first_label, classes)
                skipped.append((file, f"duplicate of {first} (the same file, reached through a link)"))
                continue
            path = Path(file)
            seen[key] = (path, label)
            samples.append((path, label))
    return list(classes), found, samples, skipped


def _check_no_conflicts(samples: Sequence[tuple[Path, int]], classes: Sequence[str]) -> None:
    """Refuse one image file listed under two labels (the same path, or two links to one file)."""
    seen: dict[tuple[int, int], tuple[Path, int]] = {}
    for path, label in samples:
        key = _file_id(path)
        first = seen.setdefault(key, (path, label))
        if first[1] != label:
            raise _two_labels_error(path, label, first[0], first[1], classes)
