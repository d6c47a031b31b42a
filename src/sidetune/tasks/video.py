"""Video classification: clips of T frames through a frozen image backbone, cross-entropy, top-1, CSV predictions.

``(clip, label)`` batches with clips (B, T, 3, H, W); the model (``sidetune.create(task="video", num_frames=T)``)
maps them to (B, K) logits: LoSA mixes across the frames of each clip, every other method classifies the mean over
time of its frame features (docs/video.md). Data: video files (decoded with PyAV) or frame folders, in a folder
tree, a UCF101/mmaction list or a CSV (path/label or Kinetics), see :mod:`sidetune.data.video`. Training samples T
frames at a random offset (``frame_sampling``), evaluation and prediction uniformly. Clips the readers refuse (too
short under ``clip_policy=refuse``, unreadable, frame folders with gaps, Kinetics videos not found) are counted and
listed: ``summary.json`` (``data.skipped_files``), a data warning, and ``refused`` in every evaluation.

The loss, metrics, headline (top-1) and collapse warnings are classification's: a video task is a classification
task whose samples are clips.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import ClassificationSubset, DataError, check_training_data, count_classes, split_train_val
from ..data.catalog import LAYOUTS
from ..data.video import (
    CLIP_POLICIES,
    SAMPLINGS,
    VIDEO_AUGMENTATIONS,
    VideoClipDataset,
    build_video_dataset,
    build_video_transforms,
    check_clip_options,
    find_clips,
    probe_clip,
    read_clip,
    sample_indices,
    video_classes,
    video_split_available,
)
from ..errors import ConfigError
from .base import Evaluator
from .classification import ClassificationEvaluator, ClassificationOptions, ClassificationTask, _null

#: How many refused clips an evaluation result lists by name (all are counted).
_LISTED = 20


@dataclass
class VideoOptions(ClassificationOptions):
    """``task_options`` of a video run (and classification's ``label_smoothing``, ``head_dropout``, ``class_weights``).

    Attributes:
        num_frames: T, frames sampled per clip (the model is built for it).
        frame_sampling: training sampling, ``random`` (a random offset per clip, every epoch) or ``uniform``;
            evaluation and prediction always sample uniformly.
        frame_stride: frames between two sampled frames (a window of ``(T - 1) * stride + 1``), or None to spread
            the T frames over the whole clip.
        clip_policy: clips with too few frames: ``refuse`` (counted and listed, not used), ``loop`` (play again from
            the start) or ``pad`` (hold the last frame).
        verify: decode every clip when the data is built and refuse those that do not decode completely (truncated
            or damaged files), instead of failing when a batch reaches them.
        frame_chunk: frames per backbone forward (None: the whole batch of B*T frames at once).
    """

    num_frames: int = 8
    frame_sampling: str = "random"
    frame_stride: int | None = None
    clip_policy: str = "refuse"
    verify: bool = False
    frame_chunk: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_clip_options(self.num_frames, self.frame_sampling, self.frame_stride, self.clip_policy)
        if not isinstance(self.verify, bool):
            raise ConfigError(f"verify must be true or false, got {self.verify!r}.")
        if self.frame_chunk is not None and (
            isinstance(self.frame_chunk, bool) or not isinstance(self.frame_chunk, int) or self.frame_chunk < 1
        ):
            raise ConfigError(f"frame_chunk must be an integer >= 1 or None, got {self.frame_chunk!r}.")


class VideoEvaluator(ClassificationEvaluator):
    """Classification metrics of clips, plus ``refused``: the clips of the split its reader refused (counted, and
    the first ones listed with the reason), so that a score is never read without what it left out."""

    def __init__(self, num_classes: int, dataset: Dataset) -> None:
        super().__init__(num_classes)
        # a split served by a tap cache lists the refused clips of the files' dataset it was cached from
        source = getattr(dataset, "source", None) if not hasattr(dataset, "skipped") else dataset
        self.refused = list(getattr(source, "skipped", []))

    def compute(self, states) -> dict[str, Any]:
        metrics = super().compute(states)
        metrics["refused"] = len(self.refused)
        metrics["refused_clips"] = [{"path": p, "reason": r} for p, r in self.refused[:_LISTED]]
        return metrics


class VideoTask(ClassificationTask):
    name = "video"
    description = "one label per clip of T frames: LoSA mixes across frames, other methods average them; top-1"
    options_cls = VideoOptions
    layouts: ClassVar[dict[str, str]] = {
        "auto": "guess from the folder: <split>.csv, <split>.txt, or <split>/<class>/<clip>",
        **LAYOUTS["video"],
    }
    augmentations = VIDEO_AUGMENTATIONS
    headline = "top1"
    defaults: ClassVar[dict[str, Any]] = {"batch_size": 8, "weight_decay": 1e-4, "workers": 2}
    eval_batch_factor = 2
    predict_options = ("top_k", "augmentation", "batch_size", "workers")

    def model_kwargs(self, config) -> dict[str, Any]:
        o = self.options
        return {
            "task": "video",
            "num_frames": o.num_frames,
            "head_dropout": o.head_dropout,
            "frame_chunk": o.frame_chunk,
        }

    # -- data ----------------------------------------------------------------------------------------------------
    def split_available(self, root: Path, split: str) -> bool:
        return video_split_available(root, split)

    def scan_classes(self, config) -> list[str]:
        train_split, _, _ = self.resolve_splits(config)
        classes = video_classes(config.data, train_split, config.layout)
        if config.num_classes is not None and config.num_classes != len(classes):
            raise DataError(f"the training clips have {len(classes)} classes but num_classes={config.num_classes}.")
        return classes

    def _dataset(self, root, split, layout, transform, sampling: str, classes=None) -> VideoClipDataset:
        o = self.options
        return build_video_dataset(
            root, split, transform, layout, num_frames=o.num_frames, sampling=sampling, frame_stride=o.frame_stride,
            short_clips=o.clip_policy, verify=o.verify, classes=classes,
        )  # fmt: skip

    def build_data(self, config, model):
        from .base import TaskData

        train_split, val_split, test_split = self.resolve_splits(config)
        size = tuple(model.config.img_size)
        train_tf = build_video_transforms(model.data_config, size, config.augmentation, train=True)
        eval_tf = build_video_transforms(model.data_config, size, config.augmentation, train=False)
        root = config.data
        train = self._dataset(root, train_split, config.layout, train_tf, self.options.frame_sampling)
        if len(train) == 0:
            raise DataError(f"the training data at {train.root} holds no usable clip ({len(train.skipped)} refused: "
                            f"{train.skipped[:1]}).")  # fmt: skip
        classes = list(train.classes)
        if config.num_classes is not None and config.num_classes != len(classes):
            raise DataError(f"the training clips have {len(classes)} classes but num_classes={config.num_classes}.")
        refused = [(p, f"train: {r}") for p, r in train.skipped]
        val = test = None
        if config.val_fraction is not None:
            # validation clips get the evaluation transform and uniform sampling: a twin of the training set
            twin = self._dataset(root, train_split, config.layout, eval_tf, "uniform", classes)
            train_sub, val_sub = split_train_val(train, val_fraction=config.val_fraction, seed=config.split_seed)
            train, val = train_sub, ClassificationSubset(twin, val_sub.indices)
        elif val_split is not None:
            val = self._dataset(root, val_split, config.layout, eval_tf, "uniform", classes)
            refused += [(p, f"{val_split}: {r}") for p, r in val.skipped]
        if test_split is not None:
            test = self._dataset(root, test_split, config.layout, eval_tf, "uniform", classes)
            refused += [(p, f"{test_split}: {r}") for p, r in test.skipped]
        for name, ds in (("validation", val), ("test", test)):
            if ds is not None and len(ds) == 0:
                raise DataError(f"the {name} split of {root} holds no usable clip.")
        splits = {
            "train": train_split,
            "val": f"{config.val_fraction} of train" if config.val_fraction is not None else val_split,
            "test": test_split,
        }
        data = TaskData(train, val, test, classes, source=str(root), splits=splits, skipped=refused)
        # as the image tasks (inspect_data): refuse a training split of one class, warn about absent classes and
        # imbalance; clip counts for --class-weights auto. Refused clips are reported below, for every split.
        data.counts = count_classes(train)
        data.warnings = [
            w.to_dict()
            for w in check_training_data(train, counts=data.counts, split=train_split)
            if w.code != "skipped_files"
        ]
        if refused:
            path, reason = refused[0]
            message = (
                f"{len(refused)} clip(s) refused and not used (listed in summary.json data.skipped_files), "
                f"e.g. {path}: {reason}"
            )
            data.warnings.append({"code": "skipped_files", "split": None, "message": message})
        self.prepare(data)
        return data

    def eval_dataset(self, model, info, data, split, layout) -> Dataset:
        if split == "auto":
            split = "test" if self.split_available(Path(data), "test") else None
        tf = build_video_transforms(model.data_config, tuple(model.config.img_size), info["augmentation"], train=False)
        self._check_frames(model)
        dataset = self._dataset(data, split, layout, tf, "uniform", info["classes"])
        if len(dataset) == 0:
            raise DataError(f"no usable clip to evaluate at {data} (split {split!r}; {len(dataset.skipped)} refused).")
        dataset.split = split  # type: ignore[attr-defined]
        return dataset

    def _check_frames(self, model) -> None:
        """A saved model decides the clip length at inference (its num_frames); the run's frame_chunk applies."""
        if model.config.task != "video" or not model.config.num_frames:
            raise ConfigError(f"the video task needs a video model (task='video'), got task {model.config.task!r}.")
        self.options.num_frames = model.config.num_frames
        model.frame_chunk = self.options.frame_chunk

    # -- the tap cache ----------------------------------------------------------------------------------------------
    def cache_inputs(self, model, batch):
        """Clips (B, T, 3, H, W) as they are: the build runs the backbone on their B*T frames, as an uncached video
        model does, and stores each clip's T frames' taps together."""
        clips, labels = batch
        if clips.ndim != 5 or clips.shape[1] != model.config.num_frames:
            raise ConfigError(
                f"a video cache stores clips of {model.config.num_frames} frames, got a batch of shape "
                f"{tuple(clips.shape)}."
            )
        return clips, [torch.as_tensor(y) for y in labels], [{} for _ in labels]

    def cache_settings(self, config) -> dict[str, Any]:
        o = self.options
        return {
            "frames": {
                "num_frames": o.num_frames,
                "frame_sampling": o.frame_sampling,
                "frame_stride": o.frame_stride,
                "clip_policy": o.clip_policy,
                "verify": o.verify,
            }
        }

    def cache_draws_at_random(self, config) -> bool:
        # random offsets are drawn from the sample's seeded RNG (seed, epoch, clip), as random augmentation is:
        # view v of a cache holds the frames an uncached run reads in epoch v
        return self.options.frame_sampling == "random"

    # -- evaluation and prediction -------------------------------------------------------------------------------
    def evaluator(self, model, dataset, classes) -> Evaluator:
        return VideoEvaluator(len(classes), dataset)

    def summary_line(self, metrics) -> str:
        line = super().summary_line(metrics)
        return line + (f" ({metrics['refused']} clip(s) refused)" if metrics.get("refused") else "")

    def list_inputs(self, path) -> list[Path]:
        """The clips under ``path`` (video files and frame folders)."""
        return find_clips(path)

    def predict_rows(
        self, model, info, images, *, top_k: int = 5, batch_size: int = 8, workers: int = 0, augmentation=None,
        autocast=None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """One record per readable clip, as classification's (``path``, ``label``, ``score``, ``top_k``); the clips
        that cannot be read are not predicted, and are named in one warning."""
        classes = info["classes"]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}.")
        self._check_frames(model)
        tf = build_video_transforms(
            model.data_config, tuple(model.config.img_size), augmentation or info["augmentation"], train=False
        )
        clips = _ClipList(images, tf, self.options)
        if clips.refused:
            listed = "; ".join(f"{p}: {r}" for p, r in clips.refused[:5])
            warnings.warn(f"{len(clips.refused)} clip(s) refused and not predicted: {listed}", stacklevel=2)
        loader = DataLoader(clips, batch_size=batch_size, shuffle=False, num_workers=workers)
        device = next(model.parameters()).device
        k = min(top_k, len(classes))
        rows: list[dict[str, Any]] = []
        with torch.inference_mode():
            for batch, indices in loader:
                with autocast if autocast is not None else _null():
                    logits = model(batch.to(device))
                scores, labels = logits.float().softmax(-1).topk(k, -1)
                for i, s, y in zip(indices.tolist(), scores.tolist(), labels.tolist(), strict=True):
                    rows.append({"path": str(clips.sources[i].path), "label": classes[y[0]], "score": s[0],
                                 "top_k": [(classes[c], p) for c, p in zip(y, s, strict=True)]})  # fmt: skip
        return rows

    def predict(self, model, info, images, output, **options) -> dict[str, Any]:
        """Write ``output`` (a CSV file, ``-`` for stdout): ``path, label, score, label_2, score_2, ...`` per clip."""
        result = super().predict(model, info, images, output, **options)
        return {**result, "clips": result["images"]}


class _ClipList(Dataset):
    """Unlabelled clips for prediction, sampled uniformly; unreadable or (under ``refuse``) short clips refused."""

    def __init__(self, paths: list[Path], transform, options: VideoOptions) -> None:
        self.transform, self.options = transform, options
        self.sources, self.refused = [], []
        for path in paths:
            try:
                source = probe_clip(path, decode=options.verify)
                sample_indices(source.num_frames, options.num_frames, "uniform", options.frame_stride,
                               options.clip_policy)  # fmt: skip
            except DataError as err:
                self.refused.append((str(path), str(err)))
                continue
            self.sources.append(source)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        o, source = self.options, self.sources[index]
        idx = sample_indices(source.num_frames, o.num_frames, "uniform", o.frame_stride, o.clip_policy)
        return self.transform(read_clip(source, idx)), index


__all__ = ["CLIP_POLICIES", "SAMPLINGS", "VideoEvaluator", "VideoOptions", "VideoTask"]
