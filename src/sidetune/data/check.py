"""Check a dataset before training on it: what ``sidetune data check DIR --task T`` prints.

:func:`check_dataset` reads every split of a dataset with the builders training uses (no model, no
transform), decodes every image (and every mask) once, and returns a :class:`DataReport`: the splits found,
images per split, per-class counts in the unit the loss sees (images, pixels or boxes; :mod:`.balance`), image
sizes, every file the readers skipped with its reason, every file training would stop at, and warnings. Video data
(``task="video"``) is read the same way with the clip readers and clip policy of training
(:func:`~sidetune.data.video.build_video_dataset`): clips per class, frames per clip, frame sizes, and every clip
refused (unreadable, too short for T, a gap in a frame folder, not found) or that training would stop at
(truncated).

:func:`check_training_data` is the part a training run needs at its start: it refuses a training split on which
training cannot mean anything (one class, no scored pixel, no box), and returns :class:`DataWarning`\\ s for the
rest (a class absent, extreme imbalance, masks that are all void, skipped files). Each warning has a stable
``code`` (:data:`WARNING_CODES`) for a run summary's flags.
"""

from __future__ import annotations

import os
import statistics
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Subset

from ..errors import ConfigError, unknown_choice
from .balance import ClassCounts, count_classes, mask_histogram, unwrap
from .catalog import LAYOUTS, TASKS
from .classification import VTAB_SPLITS, build_classification_dataset, skipped_files
from .detection import BoxFixWarning, build_detection_dataset, detect_detection_layout
from .files import _DECODE_ERRORS, DataError, _reason, load_rgb
from .segmentation import IGNORE_INDEX, build_segmentation_dataset, detect_segmentation_layout
from .video import FRAME_EXTENSIONS, VIDEO_EXTENSIONS, ClipSource, build_video_dataset, check_clip_options

__all__ = [
    "IMBALANCE_RATIO",
    "WARNING_CODES",
    "DataReport",
    "DataWarning",
    "SplitReport",
    "check_dataset",
    "check_training_data",
    "find_splits",
]

#: A split whose most frequent class outnumbers its rarest by more than this is flagged ``imbalance``.
IMBALANCE_RATIO = 10.0

#: The ``code`` of every :class:`DataWarning`, with what it means.
WARNING_CODES: dict[str, str] = {
    "single_class": "the split holds examples of one class only",
    "class_absent": "a class has no example in the split",
    "imbalance": "the most frequent class outnumbers the rarest by more than the threshold",
    "all_void": "masks with no scored pixel (every pixel is the ignore value), which teach nothing",
    "no_boxes": "the split holds no box at all",
    "boxes_fixed": "boxes whose corners were reordered, clipped to their image, or dropped for zero area",
    "skipped_files": "files the reader left out (the list gives each reason)",
    "unreadable": "files that cannot be read: training stops at the first one",
    "repeated_files": "files listed more than once in a list or CSV (each copy is read)",
    "reader_warning": "a warning the dataset reader raised while reading the split",
    "cache_views": "a tap cache holds fewer views of its random draws than the run has epochs (later epochs reuse)",
}
_TRAIN_SPLITS = ("train", "training", "train800val200", "train800", "trainval")
_SPLIT_ORDER = ("train", "training", "train800val200", "train800", "trainval", "val", "valid", "validation", "val200")
_CLASSIFICATION_SPLIT_DIRS = ("train", "val", "valid", "validation", "test", "trainval")
_MAX_SHOWN = 20
#: Tasks with one label per sample (an image, a clip): counted in samples, refused with fewer than two classes.
_LABELLED = ("classification", "video")
#: The first words of a video reader's refusal -> the reason's category in a report (grouped in the warning).
_CLIP_REASONS: tuple[tuple[str, str], ...] = (
    ("fewer than the", "too short"),
    ("has a gap", "gap in frame folder"),
    ("are both frame", "duplicate frame number"),
    ("has no frame number", "frame without a number"),
    ("is truncated", "truncated"),
    ("video not found", "not found"),
    ("does not exist", "not found"),
    ("holds no frame", "no frame"),
)


@dataclass(frozen=True)
class DataWarning:
    """Something about a split that a user should know before trusting a run on it.

    Attributes:
        code: a key of :data:`WARNING_CODES` (stable: a run summary records it as a flag).
        message: what was found, with the numbers, and what to do.
        split: the split it concerns (None: the whole dataset, or a dataset without split names).
    """

    code: str
    message: str
    split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "split": self.split, "message": self.message}


def _names(classes: Sequence[str], indices: Sequence[int]) -> str:
    shown = [classes[k] for k in indices[:_MAX_SHOWN]]
    more = f" and {len(indices) - _MAX_SHOWN} more" if len(indices) > _MAX_SHOWN else ""
    return ", ".join(map(repr, shown)) + more


def training_refusal(counts: ClassCounts) -> str | None:
    """Why training on a split with these counts cannot mean anything, or None when it can."""
    present = counts.present
    if counts.task in _LABELLED:
        if len(counts.classes) < 2:
            return (
                f"the data has {len(counts.classes)} class ({_names(counts.classes, range(len(counts.classes)))}): a "
                "classifier over one class always predicts it and its loss is 0 whatever it learns. A classification "
                "dataset needs at least two classes (add the images of the other class(es) as their own folder)."
            )
        if len(present) < 2:
            return (
                f"every training {counts.unit[:-1]} is of class {_names(counts.classes, present)} ({counts.images} "
                f"{counts.unit}, none of the other {len(counts.classes) - len(present)} classes): the loss reaches 0 "
                f"by predicting that class, whatever the {counts.unit} show. Add {counts.unit} of the other classes to "
                "the training split."
            )
    elif counts.task == "segmentation":
        if counts.total == 0:
            return (
                f"every pixel of the {counts.images} training masks is the ignore value {IGNORE_INDEX} (or the "
                "layout's void value): no pixel is scored, so there is nothing to learn. Check that the masks hold "
                "class indices (0, 1, ...) and not 255 everywhere, and the layout's ignore rule (docs/data.md)."
            )
        if len(present) < 2:
            return (
                f"every scored pixel of the training masks is class {_names(counts.classes, present)}: the loss "
                "reaches 0 by predicting it everywhere. A mask must hold class indices 0..K-1 (a binary mask saved "
                "as 0/255 marks the object as ignored: save it as 0/1)."
            )
    elif counts.total == 0:
        return (
            f"the {counts.images} training images hold no box at all: a detector learns nothing from them. Check the "
            "annotations (and the warnings about dropped boxes)."
        )
    return None


def split_warnings(
    counts: ClassCounts, split: str | None, *, imbalance_ratio: float = IMBALANCE_RATIO
) -> list[DataWarning]:
    """The warnings a split's counts call for (single class, absent classes, imbalance, void masks, no boxes)."""
    out: list[DataWarning] = []
    classes, present = counts.classes, counts.present
    unit = counts.unit
    where = f"split {split!r}" if split is not None else "the data"
    if counts.task in ("detection", "instance") and counts.total == 0:
        out.append(DataWarning("no_boxes", f"{where} holds no box in its {counts.images} images.", split))
    elif counts.task in (*_LABELLED, "segmentation") and len(present) == 1 and len(classes) > 1:
        out.append(
            DataWarning(
                "single_class",
                f"{where} holds one class only ({_names(classes, present)}, {counts.total} {unit}): a model that "
                "always predicts it scores perfectly there.",
                split,
            )
        )
    absent = [k for k in range(len(classes)) if k not in present]
    if absent and present:
        out.append(
            DataWarning(
                "class_absent",
                f"{where} has no {unit} of {len(absent)} of {len(classes)} classes: {_names(classes, absent)}.",
                split,
            )
        )
    ratio = counts.imbalance()
    if ratio is not None and ratio > imbalance_ratio:
        most = max(present, key=lambda k: counts.counts[k])
        least = min(present, key=lambda k: counts.counts[k])
        remedy = (
            "; class-balanced loss weights (--class-weights auto) counter it"
            if counts.task in (*_LABELLED, "segmentation")
            else ""
        )
        out.append(
            DataWarning(
                "imbalance",
                f"{where}: class {classes[most]!r} has {ratio:.1f}x the {unit} of class {classes[least]!r} "
                f"({counts.counts[most]} vs {counts.counts[least]}); a model may learn to predict the frequent "
                f"classes only: watch the per-class metrics{remedy}.",
                split,
            )
        )
    if counts.all_void:
        out.append(
            DataWarning(
                "all_void",
                f"{where}: {len(counts.all_void)} of {counts.images} masks have no scored pixel (all "
                f"{IGNORE_INDEX}/void, first {counts.all_void[0]}); their images teach nothing.",
                split,
            )
        )
    return out


def check_training_data(
    dataset: Any,
    *,
    counts: ClassCounts | None = None,
    split: str | None = "train",
    imbalance_ratio: float = IMBALANCE_RATIO,
) -> list[DataWarning]:
    """Refuse a training split on which training cannot mean anything; return the warnings about the rest.

    Refused: classification with fewer than two classes, or with every image of one class; segmentation with no
    scored pixel (every mask all void) or with every scored pixel of one class; detection with no box. Those
    train to a loss of 0 (or learn nothing) without a word otherwise.

    Warned (:data:`WARNING_CODES`): a class absent from the split, imbalance above ``imbalance_ratio``, masks
    that are all void, files the reader skipped. A run prints the warnings and records ``[w.to_dict() for w in
    warnings]`` in its summary.

    Args:
        dataset: the training split, as built for training (any transform; a ``Subset`` is fine).
        counts: its :func:`~sidetune.data.count_classes`, when already computed (segmentation decodes every mask
            to count; compute once and share with :func:`~sidetune.data.class_weights`).
        split: the split's name, for the messages.
        imbalance_ratio: see :data:`IMBALANCE_RATIO`.

    Returns:
        The warnings, possibly empty.

    Raises:
        DataError: training on this split cannot be meaningful; the message says why and what to fix.
    """
    counts = counts if counts is not None else count_classes(dataset)
    refusal = training_refusal(counts)
    if refusal is not None:
        where = f"training split {split!r}" if split is not None else "the training data"
        raise DataError(f"refusing to train on {where}: {refusal}")
    out = split_warnings(counts, split, imbalance_ratio=imbalance_ratio)
    skipped = skipped_files(dataset)
    if skipped:
        out.append(_skipped_warning(skipped, split))
    return out


def _skipped_warning(skipped: Sequence[tuple[str, str]], split: str | None) -> DataWarning:
    reasons: dict[str, int] = {}
    for _, reason in skipped:
        key = reason.split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    where = f"split {split!r}" if split is not None else "the data"
    return DataWarning("skipped_files", f"{where}: {len(skipped)} file(s) skipped ({summary}).", split)


# -- the whole-dataset report --------------------------------------------------------------------------------------


@dataclass
class SplitReport:
    """What :func:`check_dataset` found in one split.

    Attributes:
        split: its name (None: a dataset without split names).
        counts: per-class counts (:class:`~sidetune.data.ClassCounts`), over the readable samples.
        sizes: ``{"width": {"min", "median", "max"}, "height": {...}}`` in pixels (empty when nothing was read).
        skipped: ``(path, reason)`` of every file the reader left out.
        problems: ``(path, reason)`` of every file training would stop at (unreadable image, bad mask).
        warnings: the split's warnings.
        facts: layout-specific facts (detection: ``box_fixes``; lists: ``repeated_files``; video: ``clips``,
            ``frames_per_clip`` ``{"min", "median", "max"}`` over the readable clips, ``clip_options`` (T, stride,
            clip policy, verify) and ``short_clips_used`` (clips shorter than T that ``loop``/``pad`` use)).
    """

    split: str | None
    counts: ClassCounts
    sizes: dict[str, dict[str, float]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[DataWarning] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "images": self.counts.images,
            "unit": self.counts.unit,
            "classes": {
                name: {"count": n, "images": m}
                for name, n, m in zip(self.counts.classes, self.counts.counts, self.counts.images_with, strict=True)
            },
            "ignored_pixels": self.counts.ignored if self.counts.unit == "pixels" else None,
            "all_void_masks": list(self.counts.all_void),
            "images_without_boxes": self.counts.without_boxes if self.counts.unit == "boxes" else None,
            "sizes": self.sizes,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "problems": [{"path": p, "reason": r} for p, r in self.problems],
            "warnings": [w.to_dict() for w in self.warnings],
            **self.facts,
        }


@dataclass
class DataReport:
    """What :func:`check_dataset` found: print :meth:`format`, save :meth:`to_dict` as JSON.

    Attributes:
        root: the dataset folder (or file).
        task: the task it was read for.
        layout: the layout it was read as (``auto`` resolved).
        splits: one report per split read.
        errors: splits that could not be read at all, and a training split training would refuse (messages).
    """

    root: str
    task: str
    layout: str
    splits: list[SplitReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[DataWarning]:
        """Every split's warnings, in split order."""
        return [w for s in self.splits for w in s.warnings]

    @property
    def ok(self) -> bool:
        """True when every split was read, training would not be refused, and no file would stop training."""
        return not self.errors and not any(s.problems for s in self.splits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "task": self.task,
            "layout": self.layout,
            "ok": self.ok,
            "splits": [s.to_dict() for s in self.splits],
            "warnings": [w.to_dict() for w in self.warnings],
            "errors": list(self.errors),
        }

    def format(self, max_listed: int = _MAX_SHOWN) -> str:
        """The report as text: a table of classes per split, sizes, skipped files and problems, warnings.

        Args:
            max_listed: files listed per split and kind (skipped, problems); the rest are counted. 0: all.
        """
        root = Path(self.root)
        lines = [f"data check: {self.root}", f"task {self.task}, layout {self.layout}"]
        for s in self.splits:
            lines += ["", *_format_split(s, root, max_listed)]
        if self.errors:
            lines += ["", f"errors ({len(self.errors)}):"] + [f"  {e}" for e in self.errors]
        warned = self.warnings
        if warned:
            lines += ["", f"warnings ({len(warned)}):"] + [f"  [{w.code}] {w.message}" for w in warned]
        problems = sum(len(s.problems) for s in self.splits)
        if self.ok:
            verdict = "OK: every split was read" + (f", with {len(warned)} warning(s)" if warned else "")
        else:
            verdict = f"NOT OK: {len(self.errors)} error(s), {problems} file(s) training would stop at"
        lines += ["", verdict + "."]
        return "\n".join(lines)


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root if root.is_dir() else root.parent))
    except ValueError:
        return path


def _format_split(s: SplitReport, root: Path, max_listed: int) -> list[str]:
    c = s.counts
    name = s.split if s.split is not None else "(all)"
    per_sample = c.unit in ("images", "clips")  # one label per sample: the count is the sample count
    head = f"split {name}: {c.images} {'clips' if c.unit == 'clips' else 'images'}"
    if not per_sample:
        head += f", {c.total} {c.unit}"
    if s.sizes:
        w, h = s.sizes["width"], s.sizes["height"]
        head += (
            f"; {'frame sizes' if c.unit == 'clips' else 'sizes'} (W x H) min {w['min']:g}x{h['min']:g}, "
            f"median {w['median']:g}x{h['median']:g}, max {w['max']:g}x{h['max']:g}"
        )
    lines = [head]
    width = max([5, *(len(n) for n in c.classes)])
    lines.append(f"  {'class'.ljust(width)}  {c.unit:>12}  {'share':>6}" + ("" if per_sample else "  images"))
    total = max(c.total, 1)
    for name_k, n, m in zip(c.classes, c.counts, c.images_with, strict=True):
        row = f"  {name_k.ljust(width)}  {n:>12}  {100 * n / total:>5.1f}%"
        lines.append(row + ("" if per_sample else f"  {m:>6}"))
    ratio = c.imbalance()
    if ratio is not None:
        lines.append(f"  imbalance (most / least frequent class present): {ratio:.1f}x")
    frames, options = s.facts.get("frames_per_clip"), s.facts.get("clip_options")
    if options is not None:
        stride = f", stride {options['frame_stride']}" if options["frame_stride"] else ""
        span = f"min {frames['min']:g}, median {frames['median']:g}, max {frames['max']:g}" if frames else "none read"
        lines.append(
            f"  frames per clip: {span} (T = {options['num_frames']}{stride}, clip policy {options['clip_policy']})"
        )
        if s.facts.get("short_clips_used"):
            lines.append(f"  clips shorter than T used ({options['clip_policy']}): {s.facts['short_clips_used']}")
    if c.unit == "pixels":
        lines.append(f"  ignored pixels ({IGNORE_INDEX}/void): {c.ignored}; masks all void: {len(c.all_void)}")
    if c.unit == "boxes":
        lines.append(f"  images without a box: {c.without_boxes}")
        fixes = s.facts.get("box_fixes")
        if fixes and any(fixes[k] for k in ("swapped", "clipped", "dropped")):
            lines.append(
                f"  boxes fixed: {fixes['swapped']} reordered (swapped corners), {fixes['clipped']} clipped, "
                f"{fixes['dropped']} dropped (zero area)"
            )
    for title, items in (("skipped", s.skipped), ("training would stop at", s.problems)):
        if not items:
            continue
        lines.append(f"  {title} {len(items)} file(s):")
        shown = items if max_listed <= 0 else items[:max_listed]
        lines += [f"    {_relative(p, root)}: {r}" for p, r in shown]
        if len(shown) < len(items):
            lines.append(f"    ... and {len(items) - len(shown)} more (--all lists them, --json writes them)")
    return lines


def _order(names: Sequence[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(_SPLIT_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank) + (n != "test")), n))


def find_splits(root: str | os.PathLike[str], task: str, layout: str = "auto") -> tuple[str, list[str | None]]:
    """The layout of a dataset and its split names, as :func:`check_dataset` reads them.

    Training splits first (``train``, ...), then validation, then the rest, ``test`` last. ``None`` stands for a
    dataset without split names (an ImageFolder of class folders, one CSV or list file, a VOC folder without
    split lists, video class folders holding their clips directly).

    Raises:
        DataError: no known layout, or no split found.
        ConfigError: an unknown task or layout.
    """
    root = Path(root).expanduser()
    if task not in TASKS:
        raise unknown_choice("task", task, TASKS)
    if layout != "auto" and layout not in LAYOUTS[task]:
        raise unknown_choice(f"{task} layout", layout, ["auto", *LAYOUTS[task]], hint="See docs/data.md.")
    if not root.exists():
        raise DataError(f"{root} does not exist; check the path.")
    if task == "classification":
        return _classification_splits(root, layout)
    if task == "video":
        return _video_splits(root, layout)
    if task == "segmentation":
        if layout == "auto":
            annot = [p.name[: -len("annot")] for p in root.iterdir() if p.is_dir() and p.name.endswith("annot")]
            layout = "segnet" if annot else detect_segmentation_layout(root, "train")
        if layout in ("segnet", "camvid"):
            names = [p.name[: -len("annot")] for p in root.iterdir() if p.is_dir() and p.name.endswith("annot")]
            names = [n for n in names if (root / n).is_dir()]
        elif layout == "ade20k":
            names = [n for n in ("training", "validation") if (root / "images" / n).is_dir()]
        elif layout == "voc":
            base = root if (root / "ImageSets").is_dir() else root / "VOCdevkit" / "VOC2012"
            names = [p.stem for p in (base / "ImageSets" / "Segmentation").glob("*.txt")]
        else:
            names = [p.name for p in (root / "images").iterdir() if p.is_dir() and (root / "masks" / p.name).is_dir()]
        return _found(root, layout, names)
    if layout == "auto":
        layout = detect_detection_layout(root)
    if layout == "voc":
        names = [p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem]
        return layout, _order(names) if names else [None]
    names = [p.stem[len("instances_") :] for p in (root / "annotations").glob("instances_*.json")]
    return _found(root, layout, names)


def _found(root: Path, layout: str, names: list[str]) -> tuple[str, list[str | None]]:
    if not names:
        raise DataError(f"no split found in {root} for layout {layout!r}; the layouts are described in docs/data.md.")
    return layout, list(_order(names))


def _classification_splits(root: Path, layout: str) -> tuple[str, list[str | None]]:
    if root.is_file():
        if layout == "auto":
            layout = "csv" if root.suffix.lower() == ".csv" else "vtab"
        return layout, [None]
    lists = [n for n, f in VTAB_SPLITS.items() if (root / f).is_file()]
    csvs = sorted(p.stem for p in root.glob("*.csv"))
    dirs = [n for n in _CLASSIFICATION_SPLIT_DIRS if (root / n).is_dir()]
    if layout == "auto":
        layout = "vtab" if lists else "csv" if csvs else "imagefolder"
    if layout == "vtab":
        return layout, _order(lists) if lists else [None]
    if layout == "csv":
        return _found(root, layout, csvs)
    return layout, _order(dirs) if dirs else [None]


def _holds_clips(folder: Path) -> bool:
    """Whether ``folder`` is a class folder (it holds video files or frame folders), not a split folder."""
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
            return True
        if p.is_dir() and any(f.suffix.lower() in FRAME_EXTENSIONS for f in p.iterdir()):
            return True
    return False


def _is_clip_list(path: Path) -> bool:
    """Whether a .txt file is a clip list (its first line names a clip), not classInd.txt or a README."""
    if path.name == "classInd.txt":
        return False
    with path.open(errors="replace") as f:
        first = next((line.split() for line in f if line.strip()), None)
    if not first:
        return False
    clip = first[0]
    return "/" in clip or Path(clip).suffix.lower() in VIDEO_EXTENSIONS or (path.parent / clip).exists()


def _video_splits(root: Path, layout: str) -> tuple[str, list[str | None]]:
    """Video layouts: ``<split>.csv`` files, else ``<split>.txt`` clip lists, else ``<split>/<class>/<clip>``
    folders (or ``<class>/<clip>`` directly, a dataset without split names); the order
    :func:`~sidetune.data.video.build_video_dataset` tries for ``auto``."""
    if root.is_file():
        kind = {".csv": "csv", ".txt": "list"}.get(root.suffix.lower())
        if kind is None or layout not in ("auto", kind):
            raise DataError(f"{root}: a video list must be a .txt (layout list) or .csv (layout csv) file.")
        return kind, [None]
    csvs = sorted(p.stem for p in root.glob("*.csv"))
    lists = sorted(p.stem for p in root.glob("*.txt") if _is_clip_list(p))
    if layout == "auto":
        layout = "csv" if csvs else "list" if lists else "folder"
    if layout == "csv":
        return _found(root, layout, csvs)
    if layout == "list":
        return _found(root, layout, lists)
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if any(_holds_clips(d) for d in dirs):
        return layout, [None]  # root/<class>/<clip>
    return _found(root, layout, [d.name for d in dirs])


def _stats(values: Sequence[float]) -> dict[str, float]:
    """``{"min", "median", "max"}`` of ``values`` (empty when there are none)."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def _size_stats(sizes: Sequence[tuple[int, int]]) -> dict[str, dict[str, float]]:
    if not sizes:
        return {}
    return {"width": _stats([w for w, _ in sizes]), "height": _stats([h for _, h in sizes])}


def _read_image(path: Path, decode: bool) -> tuple[int, int]:
    if decode:
        return load_rgb(path).size
    try:
        with Image.open(path) as img:
            return img.size
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _build(
    root: Path, task: str, layout: str, split: str | None, classes: list[str] | None, clip_options: dict[str, Any]
) -> Any:
    if task == "video":
        # evaluation's sampling (uniform): the clip policy refuses the same clips whatever the sampling
        return build_video_dataset(
            root,
            split,
            None,
            layout,
            num_frames=clip_options["num_frames"],
            sampling="uniform",
            frame_stride=clip_options["frame_stride"],
            short_clips=clip_options["clip_policy"],
            verify=clip_options["verify"],
            classes=classes,
        )
    if task == "classification":
        return build_classification_dataset(root, split, None, layout, classes=classes)  # type: ignore[arg-type]
    if task == "segmentation":
        return build_segmentation_dataset(root, split, None, layout)  # type: ignore[arg-type]
    return build_detection_dataset(root, split, None, layout, masks=task == "instance")


def _read_split(dataset: Any, task: str, decode: bool, workers: int) -> tuple[Any, list, list]:
    """Decode every sample once; returns (counts over the readable samples, sizes, problems)."""
    base, indices = unwrap(dataset)
    problems: list[tuple[str, str]] = []

    if task == "segmentation":

        def read(i: int) -> tuple[tuple[int, int], np.ndarray]:
            size = _read_image(base.samples[i][0], decode)
            return size, mask_histogram(base, i, size)

        paths = [str(base.samples[i][0]) for i in indices]
    elif task == "classification":

        def read(i: int) -> tuple[tuple[int, int], None]:
            return _read_image(base.samples[i][0], decode), None

        paths = [str(base.samples[i][0]) for i in indices]
    else:

        def read(i: int) -> tuple[tuple[int, int], None]:
            record = base.records[i]
            size = _read_image(record.image_path, decode)
            if size != (record.width, record.height):
                raise DataError(
                    f"the image is {size[0]}x{size[1]} but {record.source.name} declares "
                    f"{record.width}x{record.height}; its boxes would be in the wrong coordinates"
                )
            return size, None

        paths = [str(base.records[i].image_path) for i in indices]

    def safe(i: int) -> tuple[Any, str | None]:
        try:
            return read(i), None
        except DataError as exc:
            return None, _reason(exc) if exc.__cause__ is not None else str(exc).rstrip(".")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(safe, indices))
    good = [j for j, (value, _) in enumerate(results) if value is not None]
    problems = [(paths[j], err) for j, (_, err) in enumerate(results) if err is not None]
    sizes = [results[j][0][0] for j in good]
    if task == "segmentation":
        counts = ClassCounts.from_masks(
            base.classes, [str(base.samples[indices[j]][1]) for j in good], [results[j][0][1] for j in good]
        )
    else:
        counts = count_classes(Subset(base, [indices[j] for j in good]))
    return counts, sizes, problems


def _clip_reason(path: str, message: str) -> str:
    """A video reader's refusal as ``category (detail)``: grouped by category in the ``skipped_files`` warning."""
    category = next((name for key, name in _CLIP_REASONS if key in message), "unreadable")
    detail = message.replace(f" {path}", "").rstrip(".")
    return f"{category} ({detail})"


def _clip_facts(source: ClipSource, decode: bool) -> tuple[tuple[int, int], int]:
    """``((width, height), frames)`` of a clip, decoding every frame when ``decode`` (a frame folder's frames, a
    video's frames to its end).

    Raises:
        DataError: ``category (detail)``: a frame that does not decode, frames of different sizes, a video that
            decodes fewer frames than it was probed with (truncated: training stops when it needs a later frame).
    """
    if source.frames is not None:
        sizes = set()
        for f in source.frames:
            try:
                sizes.add(_read_image(f, decode))
            except DataError as exc:
                raise DataError(f"{_reason(exc)} in frame {f.name}") from None
        if len(sizes) > 1:
            raise DataError(f"frames of different sizes ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})")
        return sizes.pop(), len(source.frames)
    import av

    from .video import _open  # the reader's own open: the same errors as training for a file that changed

    try:
        container = _open(source.path)
    except DataError as exc:  # opened once when the data was built: changed since, or opens only sometimes
        raise DataError(_clip_reason(str(source.path), str(exc))) from None
    count = 0
    try:
        stream = container.streams.video[0]
        size = (stream.codec_context.width, stream.codec_context.height)
        if not decode:
            return size, source.num_frames
        for frame in container.decode(stream):
            count += 1
            size = (frame.width, frame.height)
    except av.FFmpegError as err:
        raise DataError(
            f"damaged (decoding failed after {count} of {source.num_frames} frames: {err}; training stops at it, "
            "--verify (verify=true) refuses it when the data is built)"
        ) from None
    finally:
        container.close()
    if count < source.num_frames:
        raise DataError(
            f"truncated ({count} of the {source.num_frames} frames its header announces decode; training stops when "
            "it needs a later frame, --verify (verify=true) refuses it when the data is built)"
        )
    return size, count


def _read_video_split(dataset: Any, decode: bool, workers: int) -> tuple[ClassCounts, list, list, list[int]]:
    """Read every clip once; returns (counts over the readable clips, frame sizes, problems, frames per clip)."""

    def safe(i: int) -> tuple[Any, str | None]:
        try:
            return _clip_facts(dataset.clips[i][0], decode), None
        except DataError as exc:
            return None, str(exc).rstrip(".")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(safe, range(len(dataset.clips))))
    good = [i for i, (value, _) in enumerate(results) if value is not None]
    problems = [(str(dataset.clips[i][0].path), err) for i, (_, err) in enumerate(results) if err is not None]
    counts = count_classes(Subset(dataset, good))
    return counts, [results[i][0][0] for i in good], problems, [results[i][0][1] for i in good]


def _repeated(dataset: Any) -> int:
    samples = getattr(unwrap(dataset)[0], "samples", None)
    if not samples or not isinstance(samples[0][1], int):
        return 0
    paths = [os.path.realpath(p) for p, _ in samples]
    return len(paths) - len(set(paths))


def check_dataset(
    root: str | os.PathLike[str],
    task: str,
    layout: str = "auto",
    *,
    splits: Sequence[str] | None = None,
    decode: bool = True,
    workers: int | None = None,
    imbalance_ratio: float = IMBALANCE_RATIO,
    num_frames: int = 8,
    frame_stride: int | None = None,
    clip_policy: str = "refuse",
    verify: bool = False,
) -> DataReport:
    """Read a dataset as training would and report what was found (``sidetune data check``).

    Every split is built with the builder training uses (:func:`~sidetune.data.build_classification_dataset`,
    :func:`~sidetune.data.build_segmentation_dataset`, :func:`~sidetune.data.build_detection_dataset`,
    :func:`~sidetune.data.video.build_video_dataset`; for classification and video every split takes the training
    split's classes, as evaluation does), then every image is decoded once (and every mask, to count pixels per
    class; every frame of every clip, to find truncated videos). A split that cannot be built is reported as an
    error and the others are still read.

    Video clips are refused as training refuses them, under the same clip options (a clip too short for
    ``num_frames`` at ``frame_stride`` under ``clip_policy`` ``refuse``, a video that cannot be opened or holds no
    frame, a frame folder with a gap or a repeated frame number, a listed clip not found); each refused clip is in
    the split's ``skipped`` as ``category (detail)``. A video that opens but decodes fewer frames than its header
    announces is a file training would stop at (``problems``), or is refused with ``verify=True``, as in training.

    Args:
        root: the dataset folder (classification: or one CSV / VTAB list file; video: or one list / CSV file).
        task: ``classification``, ``segmentation``, ``detection``, ``instance`` or ``video``.
        layout: ``auto`` or one of :data:`~sidetune.data.LAYOUTS` ``[task]``.
        splits: the splits to read (default: every split found, :func:`find_splits`).
        decode: decode every image / frame (finds truncated files); False reads headers only (faster).
        workers: decoding threads; default ``min(8, CPUs)``.
        imbalance_ratio: the ``imbalance`` warning's threshold (:data:`IMBALANCE_RATIO`).
        num_frames: video: T, frames sampled per clip (training's ``--num-frames``).
        frame_stride: video: frames between sampled frames, or None (training's ``--frame-stride``).
        clip_policy: video: clips shorter than T: ``refuse``, ``loop`` or ``pad`` (training's ``--clip-policy``).
        verify: video: decode every clip when the data is built and refuse truncated ones (``verify=true``).

    Returns:
        The report; ``report.ok`` is False when a split cannot be read, training would be refused, or a file
        would stop training.

    Raises:
        DataError: no known layout or no split under ``root``.
        ConfigError: an unknown task or layout.
    """
    root = Path(root).expanduser()
    clip_options = {
        "num_frames": num_frames,
        "frame_stride": frame_stride,
        "clip_policy": clip_policy,
        "verify": verify,
    }
    if task == "video":
        check_clip_options(num_frames, "uniform", frame_stride, clip_policy)
    layout, found = find_splits(root, task, layout)
    if splits is not None:
        missing = [s for s in splits if s not in found]
        if missing:
            raise DataError(f"no split {missing} in {root} (layout {layout}); found {found}.")
        found = list(splits)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    report = DataReport(str(root), task, layout)
    classes: list[str] | None = None
    for split in found:
        # the readers' own warnings become part of the report (box fixes are reported from box_fixes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                dataset = _build(root, task, layout, split, classes, clip_options)
            except (DataError, ConfigError) as exc:
                report.errors.append(f"split {split!r}: {exc}")
                continue
            if task == "video":
                # verify decoded every clip while building (and refused the truncated ones): headers suffice now
                counts, sizes, problems, frames = _read_video_split(dataset, decode and not verify, workers)
                skipped = [(p, _clip_reason(p, r)) for p, r in dataset.skipped]
            else:
                counts, sizes, problems = _read_split(dataset, task, decode, workers)
                skipped = list(dataset.skipped)
        if task in _LABELLED and classes is None:
            classes = list(dataset.classes)  # later splits are read with the training split's classes
        split_report = SplitReport(split, counts, _size_stats(sizes), skipped, problems)
        if task == "video":
            needed = num_frames if frame_stride is None else (num_frames - 1) * frame_stride + 1
            split_report.facts.update(
                clips=counts.images,
                frames_per_clip=_stats(frames),
                clip_options=dict(clip_options),
                short_clips_used=sum(f < needed for f in frames),
            )
        split_report.warnings = split_warnings(counts, split, imbalance_ratio=imbalance_ratio)
        if split_report.skipped:
            split_report.warnings.append(_skipped_warning(split_report.skipped, split))
        if problems:
            split_report.warnings.append(
                DataWarning("unreadable", f"split {split!r}: training stops at {len(problems)} file(s).", split)
            )
        fixes = getattr(dataset, "box_fixes", None)
        if fixes is not None:
            split_report.facts["box_fixes"] = dict(fixes)
            if any(fixes[k] for k in ("swapped", "clipped", "dropped")):
                split_report.warnings.append(
                    DataWarning(
                        "boxes_fixed",
                        f"split {split!r}: of {fixes['boxes']} boxes, {fixes['swapped']} had swapped corners "
                        f"(reordered), {fixes['clipped']} were clipped to their image, {fixes['dropped']} were "
                        "dropped for zero area.",
                        split,
                    )
                )
        for w in caught:
            if not issubclass(w.category, BoxFixWarning):
                split_report.warnings.append(DataWarning("reader_warning", f"split {split!r}: {w.message}", split))
        repeated = _repeated(dataset) if layout in ("csv", "vtab", "list") else 0
        if repeated:
            split_report.facts["repeated_files"] = repeated
            split_report.warnings.append(
                DataWarning("repeated_files", f"split {split!r}: {repeated} file(s) are listed more than once.", split)
            )
        if split is None or split in _TRAIN_SPLITS or split.startswith("trainlist") or len(found) == 1:
            # a training split (UCF101's are trainlist01..03): would training refuse it?
            refusal = training_refusal(counts)
            if refusal is not None:
                report.errors.append(f"training on split {split!r} would be refused: {refusal}")
        report.splits.append(split_report)
    return report
