"""``SidetuneModel``: images -> logits, built by :func:`sidetune.create`; adapter-only save and load."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .backbones import Taps, TimmBackbone
from .errors import ConfigError, WeightsError
from .features import Features
from .heads.detection import run_detector, run_detector_on_taps

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# A copy of the config rides in the weights file's metadata, so an edited adapter_config.json can be named as
# the cause when the model it describes does not fit the weights.
_METADATA_KEY = "sidetune_config"
# The fields that decide the model's shapes and its backbone's weights (what an edit breaks); `weights` (a path
# that may move) and the version are not among them.
_SHAPE_FIELDS = (
    "backbone", "img_size", "backbone_kwargs", "method", "method_config", "task", "num_classes", "head_options",
    "head_dropout", "backbone_fingerprint",
)  # fmt: skip


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model around saved adapter weights (saved as JSON beside them).

    Attributes:
        backbone: timm model name.
        img_size: (H, W) the backbone was built for.
        weights: how the backbone weights were obtained: None (random), ``"hub"`` or a file path.
        backbone_kwargs: extra timm ``create_model`` arguments (tiny test configs).
        backbone_fingerprint: SHA-256 of the backbone weights the adapter was trained on.
        method: registry name of the method.
        method_config: the method's resolved config.
        task: ``classification``, ``segmentation``, ``detection``, ``instance`` or ``video``.
        num_classes: number of classes (detection: object classes, without the background).
        head_dropout: dropout before the classifier.
        head_options: options of the dense task heads.
        sidetune_version: version that wrote the checkpoint.
        num_frames: frames per clip of a video model (None for the image tasks).
    """

    backbone: str
    img_size: tuple[int, int]
    weights: str | None
    backbone_fingerprint: str
    method: str
    method_config: dict[str, Any]
    task: str
    num_classes: int
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head_dropout: float = 0.0
    head_options: dict[str, Any] = field(default_factory=dict)
    sidetune_version: str = ""
    num_frames: int | None = None

    def __post_init__(self) -> None:
        # JSON has no tuples: normalise so that a loaded config equals the one that was saved.
        self.img_size = tuple(self.img_size)
        self.backbone_kwargs = _tuples(dict(self.backbone_kwargs))
        self.method_config = _tuples(dict(self.method_config))
        self.head_options = _tuples(dict(self.head_options))


def _type_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``name`` of :class:`ModelConfig` as read from JSON, or None."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if name in ("backbone", "method", "task"):
        ok = isinstance(value, str) and value != ""
        want = "a non-empty string"
    elif name == "backbone_fingerprint":
        ok = isinstance(value, str) and value.startswith("sha256:") and len(value) == 71
        want = "'sha256:' followed by 64 hex digits"
    elif name == "img_size":
        ok = isinstance(value, list | tuple) and len(value) == 2 and all(is_int(v) and v > 0 for v in value)
        want = "[height, width], two positive integers"
    elif name == "weights":
        ok = value is None or isinstance(value, str)
        want = "null, 'hub' or a file path"
    elif name == "num_classes":
        ok = is_int(value) and value > 0
        want = "a positive integer"
    elif name == "num_frames":
        ok = value is None or (is_int(value) and value > 0)
        want = "null or a positive integer (frames per clip)"
    elif name in ("method_config", "backbone_kwargs", "head_options"):
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        want = "a JSON object"
    elif name == "head_dropout":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and 0.0 <= value < 1.0
        want = "a number in [0, 1)"
    else:  # sidetune_version
        ok = isinstance(value, str)
        want = "a string"
    return None if ok else f"field {name!r} must be {want}, got {json.dumps(value)} ({type(value).__name__})"


def config_from_json(raw: Any, source: str | os.PathLike) -> ModelConfig:
    """Build a :class:`ModelConfig` from the parsed JSON of an ``adapter_config.json``, checking every field.

    Args:
        raw: the parsed JSON.
        source: the file, named in errors.

    Raises:
        WeightsError: not a JSON object, unknown or missing fields, or a field of the wrong type or range; the
            message names each field at fault and what it must be.
    """
    fix = "The file was edited or damaged: restore it (or save the adapter again)."
    if not isinstance(raw, dict):
        raise WeightsError(f"{str(source)!r} holds {type(raw).__name__}, not a JSON object of adapter fields. {fix}")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    unknown = sorted(set(raw) - set(fields))
    missing = [n for n in required if n not in raw]
    problems = [p for n, v in raw.items() if n in fields and (p := _type_problem(n, v)) is not None]
    if unknown:
        problems.insert(0, f"unknown field(s) {unknown} (known: {sorted(fields)})")
    if missing:
        problems.insert(0, f"missing field(s) {missing}")
    if problems:
        raise WeightsError(f"{str(source)!r} is not a valid sidetune adapter config: {'; '.join(problems)}. {fix}")
    return ModelConfig(**raw)


def saved_config(weights_path: str | os.PathLike) -> dict[str, Any] | None:
    """The config copy :meth:`SidetuneModel.save_adapter` stores in the weights file's metadata (None: none)."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            text = (f.metadata() or {}).get(_METADATA_KEY)
    except (SafetensorError, OSError):
        return None
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def edited_fields(config: ModelConfig, weights_path: str | os.PathLike) -> list[str]:
    """The shape-deciding fields in which ``config`` differs from the copy saved with the weights, each as
    ``"name: <config value> (saved with the weights: <value>)"``; empty when they agree or no copy exists."""
    saved = saved_config(weights_path)
    if not isinstance(saved, dict):
        return []
    current = json.loads(json.dumps(asdict(config)))  # tuples -> lists, as the saved JSON has them
    return [
        f"{name}: {json.dumps(current.get(name))} (saved with the weights: {json.dumps(saved.get(name))})"
        for name in _SHAPE_FIELDS
        if name in saved and current.get(name) != saved.get(name)
    ]


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Each floating tensor of ``state`` holding NaN or inf, as ``"name (n of N values)"``."""
    bad = []
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()} values)")
    return bad


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


class SidetuneModel(nn.Module):
    """A frozen backbone adapted by one method, with a task head.

    ``forward(images)`` returns class logits (classification) or per-pixel logits at the image size
    (segmentation). For detection and instance segmentation the head is a torchvision detector that calls
    the method itself: ``forward(images, targets)`` takes a list of (3, H, W) images in [0, 1] and returns
    its loss dict in train mode, its detections in eval mode. ``features(images)`` returns the method's
    :class:`Features` in every case.

    Video (``task="video"``): ``forward(clips)`` takes (B, T, 3, H, W) clips with the model's ``num_frames`` frames
    and returns (B, num_classes) logits. The frames go through the image backbone as a batch of B*T images
    (``frame_chunk`` images per backbone forward when set), so the method sees ordinary (B*T, N, C) taps; a method
    that models time (LoSA: :func:`sidetune.side.losa.mix_over_time`) mixes across the frames of each clip, and
    the clip's pooled feature is the mean over its frames of the per-frame pooled features.

    Args:
        method: the method module (owns the backbone).
        head: the task head, reading Features.
        config: the rebuild recipe (saved with the adapter).
        frame_chunk: video: frames per backbone forward (None: all B*T at once). It bounds the frozen backbone's
            working memory (side methods, and every method at inference) and changes no result; an in-place
            method in training keeps every chunk's activations for backward anyway.
    """

    def __init__(self, method: nn.Module, head: nn.Module, config: ModelConfig, frame_chunk: int | None = None) -> None:
        super().__init__()
        self.method = method
        self.head = head
        self.config = config
        self.frame_chunk = frame_chunk

    @property
    def frame_chunk(self) -> int | None:
        """Video: frames per backbone forward (None: every frame of the batch at once)."""
        return self._frame_chunk

    @frame_chunk.setter
    def frame_chunk(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"frame_chunk must be an integer >= 1 or None, got {value!r}.")
        self._frame_chunk = value

    @property
    def backbone(self) -> TimmBackbone:
        return self.method.backbone

    @property
    def data_config(self) -> dict:
        """timm preprocessing config (mean, std, interpolation) at the model's input size."""
        return self.backbone.data_config

    def features(self, images: torch.Tensor) -> Features:
        """The method's Features of a batch of images (video: of clips, pooled over time)."""
        if self.config.task == "video":
            return self.clip_features(images)
        return self.method(images)

    def clip_features(self, clips: torch.Tensor) -> Features:
        """(B, T, 3, H, W) clips -> Features with ``pooled`` (B, C), the mean over time of each frame's pooled
        feature, and ``tokens`` (B, T*N, C), the frames' final tokens in time order.

        Raises:
            ConfigError: not a (B, T, 3, H, W) tensor, or T differs from the model's ``num_frames``.
        """
        t = self.config.num_frames
        if not isinstance(clips, torch.Tensor) or clips.ndim != 5:
            shape = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
            raise ConfigError(f"a video model takes clips of shape (B, T, 3, H, W), got {shape}.")
        if clips.shape[1] != t:
            raise ConfigError(
                f"this video model was built for clips of {t} frames (num_frames={t}) but got {clips.shape[1]} "
                f"frames per clip (input {tuple(clips.shape)}). Sample {t} frames per clip (the video task's "
                f"num_frames / --num-frames), or build a model with num_frames={clips.shape[1]}."
            )
        return pool_over_time(frame_features(self.method, clips.flatten(0, 1), self.frame_chunk), t)

    @property
    def task(self) -> str:
        return self.config.task

    def forward(self, images, targets=None):
        """Classification: (B, 3, H, W) -> (B, num_classes). Segmentation: -> (B, num_classes, H, W). Video:
        (B, T, 3, H, W) clips -> (B, num_classes).

        Detection / instance: list of (3, H, W) images in [0, 1] (and targets in train mode) -> losses or
        detections, as torchvision's detectors.

        Side methods also take a :class:`~sidetune.cache.CachedTaps` batch (from a tap cache) in place of the
        images: the side network and the head run on it and the backbone does not run at all.
        """
        from .cache.batch import CachedTaps

        if isinstance(images, CachedTaps):
            return self._forward_cached(images, targets)
        if self.config.task in ("detection", "instance"):
            return run_detector(self.head, images, targets)  # autocast, if any, around the features only
        if targets is not None:
            raise TypeError(f"{self.config.task} models take images only; compute the loss from the logits.")
        if self.config.task == "video":
            return self.head(self.clip_features(images))
        if self.config.task == "segmentation":
            return self.head(self.method(images), size=tuple(images.shape[-2:]))
        return self.head(self.method(images))

    def _forward_cached(self, cached, targets=None):
        from .backbones import FrozenBackbone
        from .errors import ConfigError

        if not isinstance(self.backbone, FrozenBackbone):
            raise ConfigError(
                f"method {self.config.method!r} cannot run from a tap cache: it changes the backbone (in-place), so "
                "the activations of an image change at every step; only side methods (sidetune methods: kind side) "
                "train from a cache."
            )
        layout = self.backbone.layout
        if self.config.task == "video":
            if targets is not None:
                raise TypeError("video models take clips only; compute the loss from the logits.")
            return self.head(self._cached_clip_features(cached))
        taps = cached.taps(layout, next(self.backbone.model.parameters()).dtype)
        if self.config.task in ("detection", "instance"):
            return run_detector_on_taps(
                self.head, taps, cached.meta["image_size"], cached.meta["original_size"], targets
            )
        if targets is not None:
            raise TypeError(f"{self.config.task} models take images only; compute the loss from the logits.")
        if self.config.task == "segmentation":
            return self.head(self.method(taps), size=tuple(layout.img_size))
        return self.head(self.method(taps))

    def _cached_clip_features(self, cached) -> Features:
        """Clip Features from cached (B, T, ...) taps: the B*T frames' taps, clip-major as the backbone would have
        returned them for (B, T, 3, H, W) clips, through the method and pooled over time as :meth:`clip_features`."""
        from .cache.batch import CachedTaps

        t = self.config.num_frames
        shapes = {k: tuple(v.shape) for k, v in cached.tensors.items()}
        if any(len(shape) < 3 or shape[1] != t for shape in shapes.values()):
            raise ConfigError(
                f"this video model reads the cached taps of clips of {t} frames, (B, {t}, ...) per tap, but got "
                f"{shapes}; build the cache with the model's num_frames (--num-frames {t})."
            )
        frames = CachedTaps({k: v.flatten(0, 1) for k, v in cached.tensors.items()})
        taps = frames.taps(self.backbone.layout, next(self.backbone.model.parameters()).dtype)
        return pool_over_time(self.method(taps), t)

    # -- parameters ---------------------------------------------------------------------------------------
    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters that train, by name: exactly what :meth:`save_adapter` writes."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to give an optimizer."""
        return [p for _, p in self.named_trainable_parameters()]

    def num_parameters(self, trainable: bool = True) -> int:
        """Count trainable (default) or all parameters."""
        params = self.trainable_parameters() if trainable else list(self.parameters())
        return sum(p.numel() for p in params)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors (no backbone tensor), detached, contiguous, on CPU."""
        return {n: p.detach().to("cpu").contiguous() for n, p in self.named_trainable_parameters()}

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write ``adapter_model.safetensors`` (trained tensors only) and ``adapter_config.json``.

        Each file is written to a temporary name and renamed into place, so an interrupted save never
        leaves a half-written file under the final name.

        Returns:
            The directory.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(f"cannot save the adapter to {str(directory)!r}: it is a file, not a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        metadata = {_METADATA_KEY: json.dumps(config, sort_keys=True)}
        _atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(self.adapter_state_dict(), p, metadata=metadata))
        _atomic_write(
            directory / ADAPTER_CONFIG,
            lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
        )
        return directory


def frame_features(method: nn.Module, frames: torch.Tensor, chunk: int | None = None) -> Features:
    """A method's Features of (N, 3, H, W) frames, the backbone run on ``chunk`` frames at a time.

    A side method's backbone runs chunk by chunk (without autograd) and its taps are joined into one (N, ...) Taps
    before the side network reads them, so a side network that mixes across frames (video LoSA) sees every frame
    of a clip at once. An in-place method runs whole on each chunk.
    """
    if chunk is None or chunk >= frames.shape[0]:
        return method(frames)
    pieces = frames.split(chunk)
    if hasattr(method, "forward_taps"):
        return method.forward_taps(_join_taps([method.backbone(p, method.tap_request) for p in pieces]))
    parts = [method(p) for p in pieces]
    tokens = [f.tokens for f in parts]
    return Features(
        pooled=torch.cat([f.pooled for f in parts]),
        tokens=torch.cat(tokens) if all(t is not None for t in tokens) else None,
    )


def pool_over_time(features: Features, num_frames: int) -> Features:
    """Per-frame Features of B clips (B*T rows, clip-major) -> the clips' Features.

    ``pooled`` (B*T, C) -> (B, C), the mean over each clip's frames; ``tokens`` (B*T, N, C) -> (B, T*N, C). This is
    how a video model finishes whichever way its frame features were computed: from the backbone, or from taps
    served by a cache (``pool_over_time(model.method.forward_taps(taps), T)``, then ``model.head``).
    """
    frames, c = features.pooled.shape
    if frames % num_frames:
        raise ConfigError(f"{frames} frame features are not a whole number of clips of {num_frames} frames.")
    b = frames // num_frames
    tokens = features.tokens
    return Features(
        pooled=features.pooled.reshape(b, num_frames, c).mean(1),
        tokens=tokens.reshape(b, -1, tokens.shape[-1]) if tokens is not None else None,
    )


def _join_taps(parts: list[Taps]) -> Taps:
    """Taps of consecutive chunks of one batch -> the Taps of the whole batch (concatenated along the batch)."""
    first = parts[0]

    def join(kind: str) -> dict[int, torch.Tensor]:
        return {i: torch.cat([getattr(p, kind)[i] for p in parts]) for i in getattr(first, kind)}

    return Taps(
        attn=join("attn"),
        mlp=join("mlp"),
        out=join("out"),
        final=torch.cat([p.final for p in parts]),
        layout=first.layout,
    )


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a saved adapter is an ordinary file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
