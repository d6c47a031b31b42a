"""Video clip datasets: video files decoded with PyAV, or folders of frames; T frames sampled per clip.

Every dataset here returns ``(clip, label)`` with ``clip`` the transform's output for a ``(T, 3, H, W)`` uint8 tensor
of the sampled frames in time order (a float ``(T, 3, H, W)`` tensor in ``[0, 1]`` without a transform) and ``label`` a
Python ``int``; it exposes ``classes``, ``clips``, ``targets`` and ``skipped`` (the clips it refused, with the reason).

A clip is either a **video file** (``.mp4``, ``.avi``, ``.mkv``, ``.webm``, ``.mov``, ``.m4v``, ``.mpg``, ``.mpeg``;
decoded with PyAV, whose wheels ship FFmpeg) or a **folder of frames** whose file names end in the frame number
(``000001.jpg``, ``img_00001.jpg``, ``frame_1.png``; numbered from any start, consecutively).

Layouts (``layout``):

* ``folder``: ``root/<split>/<class>/<clip>``, a clip being a video file or a frame folder (both may be mixed). Files
  of other types are not clips and are ignored.
* ``list`` (UCF101 / mmaction style): ``root/<split>.txt`` with one clip per line: ``path label``, ``path
  num_frames label`` (mmaction's raw-frame lists; the count is re-read from the clip) or ``path`` alone (UCF101's
  test lists: the class is the path's first folder). Labels are class names or integer indices; with a
  ``classInd.txt`` beside the list (UCF101's ``1 ApplyEyeMakeup`` lines) integer labels are its 1-based indices
  and its names are the classes. Paths are relative to the list's folder unless absolute.
* ``csv``: ``root/<split>.csv`` with ``path`` and ``label`` columns, or a Kinetics annotation file (columns
  ``youtube_id``, ``time_start``, ``time_end``, ``label``): its clips are the files
  ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` under ``root/<split>/<label>/`` or ``root/<split>/`` (the layouts of
  the common Kinetics downloaders). Kinetics lists name videos that no longer exist online: each missing one is
  refused and counted, never dropped silently.

Sampling T frames from a clip of F frames (``sampling``, ``frame_stride``):

* ``uniform`` (evaluation): with ``frame_stride`` None, T frames evenly spaced from the first to the last
  (``round(linspace(0, F - 1, T))``); with a stride s, the T frames ``start, start + s, ...`` of a window centred
  in the clip.
* ``random`` (training): the same grid at a random offset: with no stride, ``floor((k + u) F / T)`` for one
  ``u ~ U[0, 1)`` per clip (every frame of the clip can be drawn, the spacing stays even, so motion keeps its
  speed); with a stride, a window at a uniformly random start. Draws use torch's global generator, which the
  training loop seeds per sample.

Clips with fewer frames than T (or than the stride's window, ``(T - 1) s + 1``): ``short_clips``

* ``refuse`` (default): the clip is not used; it is listed in ``skipped`` with its frame count, and training
  reports the count (``summary.json``). Nothing about its content is invented.
* ``loop``: the clip plays again from its first frame (mmaction's ``out_of_bound_opt='loop'``).
* ``pad``: the last frame is held (mmaction's ``repeat_last``).

Bad clips are refused with the reason and counted in ``skipped`` when the dataset is built: a video that cannot
be opened or has no video stream or no frame, a frame folder with a gap (``000003.jpg`` missing between
``000002.jpg`` and ``000004.jpg``), duplicate frame numbers or no frame. Building reads each video's header (its
frame count; containers that record none are demuxed, without decoding, to count the packets). A file that opens
but is truncated or damaged further in is found when its frames are decoded: ``__getitem__`` raises
:class:`DataError` naming the clip. ``verify=True`` decodes every clip once at build time and refuses such files
instead (as long as an epoch of decoding).
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sidetune.data.classification import DataError, load_rgb
from sidetune.data.files import read_text, text_of
from sidetune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_POLICIES",
    "FRAME_EXTENSIONS",
    "SAMPLINGS",
    "VIDEO_AUGMENTATIONS",
    "VIDEO_EXTENSIONS",
    "VIDEO_LAYOUTS",
    "ClipSource",
    "VideoClipDataset",
    "build_video_dataset",
    "build_video_transforms",
    "find_clips",
    "probe_clip",
    "read_clip",
    "sample_indices",
    "video_classes",
    "video_split_available",
    "write_video",
]

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SAMPLINGS: tuple[str, ...] = ("uniform", "random")
CLIP_POLICIES: tuple[str, ...] = ("refuse", "loop", "pad")
VIDEO_LAYOUTS: tuple[str, ...] = ("auto", "folder", "list", "csv")
VIDEO_AUGMENTATIONS: tuple[str, ...] = ("vtab", "none", "standard")
_KINETICS_COLUMNS = ("youtube_id", "time_start", "time_end", "label")
_FRAME_NUMBER = re.compile(r"^(.*?)(\d+)$")


# -- clips on disk -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipSource:
    """One clip on disk.

    Attributes:
        path: the video file or the frame folder.
        num_frames: frames in the clip (a video's header count, or the decoded count after ``verify``).
        frames: the frame files in time order (frame folders), or None (video files).
    """

    path: Path
    num_frames: int
    frames: tuple[Path, ...] | None = None


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")


def _frame_files(folder: Path) -> tuple[Path, ...]:
    """The frames of a frame folder in time order; a gap, a duplicate number or no frame is an error."""
    numbered: dict[int, Path] = {}
    for p in folder.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in FRAME_EXTENSIONS or not p.is_file():
            continue
        match = _FRAME_NUMBER.match(p.stem)
        if match is None:
            raise DataError(
                f"frame folder {folder}: {p.name!r} has no frame number at the end of its name; name frames "
                "000001.jpg, 000002.jpg, ..."
            )
        n = int(match.group(2))
        if n in numbered:
            raise DataError(f"frame folder {folder}: {numbered[n].name!r} and {p.name!r} are both frame {n}.")
        numbered[n] = p
    if not numbered:
        raise DataError(f"frame folder {folder} holds no frames ({', '.join(FRAME_EXTENSIONS)}).")
    order = sorted(numbered)
    for a, b in itertools.pairwise(order):
        if b != a + 1:
            missing = f"frame {a + 1}" if b == a + 2 else f"frames {a + 1}-{b - 1}"
            raise DataError(
                f"frame folder {folder} has a gap: {missing} missing between {numbered[a].name!r} and "
                f"{numbered[b].name!r}; a gap would silently change the clip's timing. Restore the frames or "
                "renumber them."
            )
    return tuple(numbered[n] for n in order)


def _open(path: Path):
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"cannot open video {path}: {err}. The file is not a readable video (damaged or truncated?)."
        ) from None
    if not container.streams.video:
        container.close()
        raise DataError(f"video {path} has no video stream.")
    return container


def probe_clip(path: str | os.PathLike, *, decode: bool = False) -> ClipSource:
    """A clip's frame count (and frame files), without decoding unless ``decode``.

    Video files: the container's frame count (``nb_frames``); containers that record none (Matroska, WebM) are
    demuxed to count the packets. ``decode=True`` decodes every frame and counts those that decode.

    Raises:
        DataError: naming the clip: unreadable video, no video stream, no frame, a frame folder with a gap.
    """
    path = Path(path)
    if path.is_dir():
        frames = _frame_files(path)
        if decode:
            for f in frames:
                load_rgb(f)
        return ClipSource(path, len(frames), frames)
    if not path.is_file():
        raise DataError(f"clip {path} does not exist.")
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        if decode:
            count = sum(1 for _ in container.decode(stream))
            if 0 < count < stream.frames:
                raise DataError(
                    f"video {path} is truncated or damaged: {count} of the {stream.frames} frames its header "
                    "announces decode."
                )
        elif stream.frames > 0:
            count = int(stream.frames)
        else:
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.FFmpegError as err:
        raise DataError(f"video {path} is damaged: {err}. Re-encode or remove it.") from None
    finally:
        container.close()
    if count == 0:
        raise DataError(f"video {path} holds no frame.")
    return ClipSource(path, count)


def sample_indices(
    num_available: int,
    num_frames: int,
    sampling: str = "uniform",
    frame_stride: int | None = None,
    short_clips: str = "refuse",
) -> list[int]:
    """The T frame indices to read from a clip of ``num_available`` frames (see the module docstring).

    Raises:
        DataError: the clip is too short and ``short_clips`` is ``refuse``.
        ConfigError: an unknown sampling or policy.
    """
    if sampling not in SAMPLINGS:
        raise ConfigError(f"frame sampling must be one of {SAMPLINGS}, got {sampling!r}.")
    if short_clips not in CLIP_POLICIES:
        raise ConfigError(f"short_clips must be one of {CLIP_POLICIES}, got {short_clips!r}.")
    f, t, s = num_available, num_frames, frame_stride
    needed = t if s is None else (t - 1) * s + 1
    if f < needed:
        if short_clips == "refuse":
            at = f" at stride {s}" if s else ""
            raise DataError(
                f"{f} frame(s), fewer than the {needed} that {t} frames{at} need (clip_policy refuse; 'loop' or "
                "'pad' would use the clip)"
            )
        virtual = [k * (s or 1) for k in range(t)]
        return [v % f for v in virtual] if short_clips == "loop" else [min(v, f - 1) for v in virtual]
    if s is None:
        if sampling == "uniform":
            return [math.floor(x + 0.5) for x in np.linspace(0, f - 1, t).tolist()]
        u = float(torch.rand(()))
        return [min(f - 1, math.floor((k + u) * f / t)) for k in range(t)]
    slack = f - needed
    start = slack // 2 if sampling == "uniform" else int(torch.randint(slack + 1, ()))
    return [start + k * s for k in range(t)]


def read_clip(source: ClipSource, indices: Sequence[int]) -> torch.Tensor:
    """The frames ``indices`` (any order, repeats allowed) of a clip as a ``(T, 3, H, W)`` uint8 tensor.

    Raises:
        DataError: naming the clip: a frame that does not decode, frames of different sizes, or a video that ends
            before the frames its header announces (truncated or damaged).
    """
    wanted = sorted(set(indices))
    if source.frames is not None:
        decoded = {i: np.asarray(load_rgb(source.frames[i])) for i in wanted}
    else:
        decoded = _decode_frames(source, wanted)
    shapes = {a.shape for a in decoded.values()}
    if len(shapes) > 1:
        raise DataError(f"clip {source.path}: its frames have different sizes {sorted(shapes)}.")
    array = np.stack([decoded[i] for i in indices])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _decode_frames(source: ClipSource, wanted: list[int]) -> dict[int, np.ndarray]:
    """Decode a video from its start up to the last wanted frame (sequential decoding: exact frame indices)."""
    import av

    container = _open(source.path)
    out: dict[int, np.ndarray] = {}
    last = wanted[-1]
    targets = set(wanted)
    count = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            count = i + 1
            if i in targets:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    except av.FFmpegError as err:
        raise DataError(
            f"video {source.path} is damaged: decoding failed after {count} frame(s) ({err}). Re-encode or remove it, "
            "or build the data with verify=True (--task-opt verify=true) to refuse such files before training."
        ) from None
    finally:
        container.close()
    if len(out) < len(targets):
        raise DataError(
            f"video {source.path} is truncated or damaged: {count} frame(s) decode, but it was probed with "
            f"{source.num_frames} and frame {last} was needed. Re-encode or remove it, or build the data with "
            "verify=True (--task-opt verify=true) to refuse such files before training."
        )
    return out


def find_clips(path: str | os.PathLike) -> list[Path]:
    """The clips under ``path`` for prediction: video files and frame folders, recursively, sorted.

    A folder counts as a clip when it directly holds frame images; ``path`` itself may be one video file or one
    frame folder. Hidden files and folders are skipped.

    Raises:
        DataError: nothing there, or no clip under it.
    """
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root} does not exist; pass a video file, a frame folder or a folder of clips.")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if any(Path(n).suffix.lower() in FRAME_EXTENSIONS and not n.startswith(".") for n in filenames):
            found.append(here)
        found += [here / n for n in sorted(filenames) if _is_video(here / n)]
    if not found:
        raise DataError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) or frame folders under {root}.")
    return sorted(found)


# -- datasets ----------------------------------------------------------------------------------------------------
class VideoClipDataset(Dataset):
    """Labelled clips with T frames sampled per item.

    Args:
        entries: ``(clip path, label)`` pairs.
        classes: class names; ``classes[label]`` names a label.
        num_frames: T, frames per clip.
        transform: applied to the ``(T, 3, H, W)`` uint8 frames (one random draw per clip); None gives floats in
            ``[0, 1]``.
        sampling: ``uniform`` or ``random``.
        frame_stride: frames between two sampled frames, or None to spread T frames over the whole clip.
        short_clips: ``refuse``, ``loop`` or ``pad`` (see the module docstring).
        verify: decode every clip at build time and refuse those that do not decode completely.
        root: where the data came from (messages).
        refused: clips already refused by the layout reader, as ``(path, reason)`` pairs (listed in ``skipped``).

    Raises:
        ConfigError: bad ``num_frames``, ``sampling``, ``frame_stride`` or ``short_clips``.
    """

    def __init__(
        self,
        entries: Sequence[tuple[str | os.PathLike, int]],
        classes: Sequence[str],
        num_frames: int,
        transform: Callable[[torch.Tensor], Any] | None = None,
        *,
        sampling: str = "uniform",
        frame_stride: int | None = None,
        short_clips: str = "refuse",
        verify: bool = False,
        root: str | os.PathLike | None = None,
        refused: Sequence[tuple[str, str]] = (),
    ) -> None:
        check_clip_options(num_frames, sampling, frame_stride, short_clips)
        self.classes = [str(c) for c in classes]
        self.num_frames, self.sampling, self.frame_stride = num_frames, sampling, frame_stride
        self.short_clips, self.transform = short_clips, transform
        self.root = Path(root) if root is not None else None
        self.skipped: list[tuple[str, str]] = list(refused)
        self.clips: list[tuple[ClipSource, int]] = []
        for path, label in entries:
            if not 0 <= int(label) < len(self.classes):
                raise DataError(
                    f"label {label} of clip {path} is outside the {len(self.classes)} classes of {self.root}."
                )
            try:
                source = probe_clip(path, decode=verify)
                sample_indices(source.num_frames, num_frames, "uniform", frame_stride, short_clips)
            except DataError as err:
                self.skipped.append((str(path), str(err)))
                continue
            self.clips.append((source, int(label)))
        if self.skipped:
            logger.warning("%s: refused %d clip(s), e.g. %s: %s", self.root, len(self.skipped), *self.skipped[0])

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """``(clip path, label)`` of every clip, in order (as the image datasets' ``samples``)."""
        return [(source.path, label) for source, label in self.clips]

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.clips]

    def files_of(self, index: int) -> list[Path]:
        """The files clip ``index`` is read from: its video file, or every frame file of its frame folder (what a
        tap cache records to notice a clip edited since it was built)."""
        source, _ = self.clips[index]
        return list(source.frames) if source.frames is not None else [source.path]

    def __len__(self) -> int:
        return len(self.clips)

    def indices(self, index: int) -> list[int]:
        """The frame indices item ``index`` reads (random ones are drawn anew on each call)."""
        source, _ = self.clips[index]
        return sample_indices(source.num_frames, self.num_frames, self.sampling, self.frame_stride, self.short_clips)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        source, label = self.clips[index]
        frames = read_clip(source, self.indices(index))
        clip = self.transform(frames) if self.transform is not None else frames.float() / 255.0
        return clip, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root}, clips={len(self)}, classes={len(self.classes)}, "
            f"num_frames={self.num_frames}, refused={len(self.skipped)})"
        )


def check_clip_options(num_frames: int, sampling: str, frame_stride: int | None, short_clips: str) -> None:
    """Validate the clip options, naming the bad one and the choices."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ConfigError(f"num_frames must be an integer >= 1, got {num_frames!r}.")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"frame_sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}.")
    if frame_stride is not None and (isinstance(frame_stride, bool) or not isinstance(frame_stride, int)
                                     or frame_stride < 1):  # fmt: skip
        raise ConfigError(f"frame_stride must be an integer >= 1 or None, got {frame_stride!r}.")
    if short_clips not in CLIP_POLICIES:
        raise ConfigError(f"clip_policy must be one of {', '.join(CLIP_POLICIES)}, got {short_clips!r}.")


def _resolve(root: Path, split: str | None, layout: str) -> tuple[str, Path]:
    """``(layout, source)``: the layout to read and its file or folder."""
    if layout not in VIDEO_LAYOUTS:
        raise ConfigError(f"video layout must be one of {', '.join(VIDEO_LAYOUTS)}, got {layout!r}.")
    if root.is_file():
        kind = {".csv": "csv", ".txt": "list"}.get(root.suffix.lower())
        if kind is None or layout not in ("auto", kind):
            raise DataError(f"{root}: a video list must be a .txt (layout list) or .csv (layout csv) file.")
        return kind, root
    if not root.is_dir():
        raise DataError(f"video data {root} does not exist; check the path.")
    candidates = {"csv": root / f"{split}.csv", "list": root / f"{split}.txt", "folder": root / split} if split else {}
    if layout == "auto":
        for kind, path in candidates.items():
            if path.exists():
                return kind, path
        if split is None:
            return "folder", root
        raise DataError(
            f"no split {split!r} in {root}: expected {split}.csv, {split}.txt or a folder {split}/ (docs/video.md)."
        )
    if split is None:
        if layout != "folder":
            raise DataError(f"layout {layout}: name the split (the {layout} file's stem) or pass the file itself.")
        return layout, root
    if not candidates[layout].exists():
        raise DataError(f"layout {layout}: {candidates[layout]} does not exist.")
    return layout, candidates[layout]


def _folder_entries(folder: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DataError(f"{folder} has no class folders; expected <class>/<clip> (a video file or a frame folder).")
    entries = []
    for name in names:
        for clip in sorted((folder / name).iterdir()):
            if clip.name.startswith("."):
                continue
            if clip.is_dir() or _is_video(clip):
                entries.append((clip, name))
    return entries, names


def _list_entries(list_file: Path) -> tuple[list[tuple[Path, str]], list[str] | None]:
    """``(path, label text)`` of a UCF101/mmaction list; the classInd.txt names when beside it."""
    class_ind = list_file.parent / "classInd.txt"
    names = None
    if class_ind.is_file():
        pairs = [line.split() for line in read_text(class_ind).splitlines() if line.strip()]
        if any(len(p) != 2 or not p[0].isdigit() for p in pairs):
            raise DataError(f"{class_ind}: expected '<index> <class name>' lines (UCF101's classInd.txt).")
        names = [name for _, name in sorted((int(i), name) for i, name in pairs)]
    entries = []
    for n, line in enumerate(read_text(list_file).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 3:
            raise DataError(f"{list_file}, line {n}: expected 'path [num_frames] label', got {line!r}.")
        path = Path(parts[0]) if Path(parts[0]).is_absolute() else list_file.parent / parts[0]
        if len(parts) == 1:
            first = Path(parts[0]).parts
            if len(first) < 2:
                raise DataError(f"{list_file}, line {n}: no label and no class folder in {parts[0]!r}.")
            label = first[0]
        else:
            label = parts[-1]
            if names is not None:
                if not label.isdigit() or not 1 <= int(label) <= len(names):
                    raise DataError(
                        f"{list_file}, line {n}: label {label!r} is not one of classInd.txt's 1..{len(names)}."
                    )
                label = names[int(label) - 1]
        entries.append((path, label))
    if not entries:
        raise DataError(f"list file {list_file} lists no clip.")
    return entries, names


def _csv_entries(csv_file: Path, split: str | None) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """``(path, label)`` of a path/label CSV or a Kinetics annotation file, and the Kinetics clips not found."""
    with text_of(csv_file), csv_file.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        rows = [(reader.line_num, row) for row in reader]
    entries, missing = [], []
    if "path" in columns and "label" in columns:
        for n, row in rows:
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not path or not label:
                raise DataError(f"{csv_file}, line {n}: empty path or label.")
            entries.append((Path(path) if Path(path).is_absolute() else csv_file.parent / path, label))
    elif all(c in columns for c in _KINETICS_COLUMNS):
        folder = csv_file.parent / (split or csv_file.stem)
        for n, row in rows:
            try:
                stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
            except (TypeError, ValueError):
                raise DataError(f"{csv_file}, line {n}: time_start/time_end must be numbers, got {row}.") from None
            label = row["label"].strip()
            found = next(
                (d / (stem + ext) for d in (folder / label, folder) for ext in VIDEO_EXTENSIONS
                 if (d / (stem + ext)).is_file()),
                None,
            )  # fmt: skip
            if found is None:
                missing.append((str(folder / label / f"{stem}.mp4"), f"{csv_file}, line {n}: video not found"))
            else:
                entries.append((found, label))
    else:
        raise DataError(
            f"{csv_file}: expected columns 'path,label' or Kinetics' 'youtube_id,time_start,time_end,label', got "
            f"{columns}."
        )
    if not entries and not missing:
        raise DataError(f"{csv_file} lists no clip.")
    return entries, missing


def _read_layout(
    root: str | os.PathLike, split: str | None, layout: str, classes: Sequence[str] | None
) -> tuple[Path, list[tuple[Path, int]], list[str], list[tuple[str, str]]]:
    """``(source, (path, label) entries, classes, refused)`` of a split, without opening any clip."""
    root = Path(root).expanduser()
    kind, source = _resolve(root, split, layout)
    refused: list[tuple[str, str]] = []
    declared: list[str] | None = None
    if kind == "folder":
        entries, declared = _folder_entries(source)
    elif kind == "list":
        entries, declared = _list_entries(source)
    else:
        entries, refused = _csv_entries(source, split)
    labels = [label for _, label in entries]
    if classes is None:
        if declared is not None:
            classes = declared
        elif labels and all(label.isdigit() for label in labels):
            classes = [str(i) for i in range(max(int(label) for label in labels) + 1)]
        else:
            classes = sorted(set(labels))
    classes = [str(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise DataError(
            f"{source}: class(es) {unknown[:8]} are not among the {len(classes)} classes of the model "
            f"({classes[:8]}{'...' if len(classes) > 8 else ''})."
        )
    return source, [(path, index[label]) for path, label in entries], classes, refused


def video_classes(root: str | os.PathLike, split: str | None, layout: str = "auto") -> list[str]:
    """The class names of a video split, read from folder names or list files alone (no clip is opened).

    Raises:
        DataError: the split is missing or lists no clip.
    """
    source, entries, classes, refused = _read_layout(root, split, layout, None)
    if not entries:
        raise DataError(f"{source} holds no clip ({len(refused)} listed clip(s) not found).")
    return classes


def build_video_dataset(
    root: str | os.PathLike,
    split: str | None,
    transform: Callable[[torch.Tensor], Any] | None,
    layout: str = "auto",
    *,
    num_frames: int = 8,
    sampling: str = "uniform",
    frame_stride: int | None = None,
    short_clips: str = "refuse",
    verify: bool = False,
    classes: Sequence[str] | None = None,
) -> VideoClipDataset:
    """A labelled video split in any layout of the module docstring.

    Args:
        root: the data folder (or one list / CSV file, with ``split`` None).
        split: the split name (``train``, ``val``, ``trainlist01``...), or None for ``root`` itself.
        transform: see :class:`VideoClipDataset`.
        layout: ``auto``, ``folder``, ``list`` or ``csv``.
        num_frames, sampling, frame_stride, short_clips, verify: see :class:`VideoClipDataset`.
        classes: fix the class names and order (the training split's, for evaluation splits); a clip of another
            class is an error.

    Raises:
        DataError: the data is missing or malformed (file and line named), or a label is not among ``classes``.
    """
    check_clip_options(num_frames, sampling, frame_stride, short_clips)
    source, entries, classes, refused = _read_layout(root, split, layout, classes)
    dataset = VideoClipDataset(
        entries,
        classes,
        num_frames,
        transform,
        sampling=sampling,
        frame_stride=frame_stride,
        short_clips=short_clips,
        verify=verify,
        root=source,
        refused=refused,
    )
    logger.info("video %s: %d clips, %d classes, %d refused", source, len(dataset), len(classes), len(dataset.skipped))
    return dataset


def video_split_available(root: str | os.PathLike, split: str) -> bool:
    """Whether ``root`` has a split ``split`` in some video layout."""
    root = Path(root).expanduser()
    return root.is_dir() and any(p.exists() for p in (root / f"{split}.csv", root / f"{split}.txt", root / split))


# -- transforms --------------------------------------------------------------------------------------------------
def build_video_transforms(
    data_config: Mapping[str, Any], size: tuple[int, int], augmentation: str = "vtab", train: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(T, 3, H, W)`` uint8 frames -> normalised ``(T, 3, h, w)`` float32, one random draw for the whole clip.

    Recipes (the image recipes of :func:`sidetune.data.build_transforms`, applied to all frames alike):

    * ``vtab``: resize straight to ``size`` (train and eval).
    * ``none``: resize the shorter side to ``size / crop_pct``, centre crop ``size`` (train and eval).
    * ``standard``: training: random resized crop (scale 0.25-1) and horizontal flip, the same for every frame of
      a clip; evaluation: as ``none``. A flip mirrors motion: do not use it when left/right motion is the label.

    Args:
        data_config: the backbone's timm data config (``mean``, ``std``, ``interpolation``, ``crop_pct``).
        size: (h, w) output size.
        augmentation: the recipe.
        train: the training variant.
    """
    from torchvision.transforms import InterpolationMode, v2

    if augmentation not in VIDEO_AUGMENTATIONS:
        raise ConfigError(f"video augmentation must be one of {', '.join(VIDEO_AUGMENTATIONS)}, got {augmentation!r}.")
    interp = {"bicubic": InterpolationMode.BICUBIC, "nearest": InterpolationMode.NEAREST}.get(
        str(data_config.get("interpolation", "bilinear")), InterpolationMode.BILINEAR
    )
    size = (int(size[0]), int(size[1]))
    if augmentation == "vtab":
        steps = [v2.Resize(size, interpolation=interp, antialias=True)]
    elif augmentation == "standard" and train:
        steps = [
            v2.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        crop_pct = float(data_config.get("crop_pct", 0.875))
        steps = [
            v2.Resize(math.floor(min(size) / crop_pct), interpolation=interp, antialias=True),
            v2.CenterCrop(size),
        ]
    return v2.Compose(
        [
            *steps,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"])),
        ]
    )


# -- writing videos (tests, benchmarks, examples) ---------------------------------------------------------------
def write_video(
    path: str | os.PathLike, frames: np.ndarray | Sequence[np.ndarray], fps: int = 8, codec: str | None = None,
    options: Mapping[str, str] | None = None, intra_only: bool = False,
) -> Path:  # fmt: skip
    """Encode ``(T, H, W, 3)`` uint8 RGB frames as a video file with PyAV.

    Args:
        path: the file; its suffix picks the container (``.mp4``, ``.avi``, ``.mkv``...).
        frames: the frames (H and W even for the 4:2:0 codecs).
        fps: frame rate.
        codec: FFmpeg encoder (default: ``libx264`` for .mp4/.mkv/.mov, ``mjpeg`` for .avi, ``libvpx-vp9`` for .webm).
        options: encoder options (``{"qp": "18"}``; MJPEG defaults to a fine quantiser, ``qmin`` 1, ``qmax`` 3).
        intra_only: every frame a key frame: frame ``k`` then decodes to the same pixels whatever the other frames
            are (with a constant quantiser, ``options={"qp": ...}``), which the temporal benchmark relies on.

    Returns:
        ``path`` (its folder is created when missing).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or {".avi": "mjpeg", ".webm": "libvpx-vp9"}.get(path.suffix.lower(), "libx264")
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if options is None and codec == "mjpeg":
            options = {"qmin": "1", "qmax": "3"}  # FFmpeg's default MJPEG quantiser blurs small frames visibly
        if options:
            stream.options = dict(options)
        if intra_only:
            stream.codec_context.gop_size = 1
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
