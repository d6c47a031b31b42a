"""``TrainConfig``: every setting of a classification run, validated on construction, loadable from YAML.

A run is described by one dataclass. The CLI builds it from ``--config run.yaml`` plus the flags given on
the command line (an explicit flag beats the YAML, the YAML beats the defaults); the resolved config is
written beside the run's results as ``train_config.yaml``, so ``sidetune train --config
runs/x/train_config.yaml`` repeats a run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import AUGMENTATIONS
from ..errors import ConfigError

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
AUTO = "auto"


@dataclass
class TrainConfig:
    """A classification training run.

    Attributes:
        backbone: timm model name (``sidetune backbones``).
        method: adaptation method (``sidetune methods``).
        data: data folder (ImageFolder tree, VTAB-1k folder), CSV file or list file. May be None only
            when the datasets are handed to :func:`sidetune.train.fit` directly.
        weights: backbone weights: None (random), ``"hub"`` or a ``.safetensors``/``.pth`` path.
        img_size: input size (default: the backbone's).
        method_options: fields of the method's config (``{"channel_rank": 8}``).
        backbone_kwargs: extra ``timm.create_model`` arguments.
        head_dropout: dropout before the classifier.
        num_classes: expected class count; the data must agree (default: the training data's).
        layout: data layout: ``auto``, ``imagefolder``, ``vtab`` or ``csv``.
        train_split: training split; ``auto`` uses ``train`` when the data has one, else the whole data.
        val_split: validation split, or None.
        test_split: test split evaluated once at the end; ``auto`` uses ``test`` when the data has one;
            ``none`` for no test.
        val_fraction: carve this fraction of each training class off as the validation split (seeded by
            ``seed``); exclusive with ``val_split``.
        epochs: passes over the training data.
        batch_size: images per process per micro-batch.
        eval_batch_size: images per batch at evaluation (default: ``2 * batch_size``).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay, applied to matrices only (not biases, norms, 1-D tensors,
            position embeddings or class tokens).
        warmup_epochs: linear warm-up length in epochs (fractions allowed), then cosine decay to ``min_lr``.
        min_lr: learning rate at the end of the cosine.
        label_smoothing: cross-entropy label smoothing.
        grad_accum: micro-batches per optimizer step.
        clip_grad: max gradient norm, or None for no clipping.
        mixed_precision: ``auto`` (bf16 on CUDA when supported, else fp16; ``no`` on CPU), ``no``,
            ``bf16`` (CUDA, or a CPU with native bfloat16) or ``fp16`` (CUDA only).
        augmentation: image transform recipe: ``vtab``, ``none`` or ``standard``
            (:func:`sidetune.data.build_transforms`).
        eval_every: evaluate on the validation split every this many epochs (and after the last one).
        save_every_steps: also save the resumable state every this many optimizer steps (0: at epoch ends
            only).
        seed: seed of the model's initialisation, the data order, augmentation and dropout.
        workers: data-loading worker processes per training process.
        cpu: train on the CPU even when CUDA is available.
        output: run directory (logs, summary, checkpoints).
        resume: run directory or checkpoint directory to continue from, or None.
    """

    backbone: str = ""
    method: str = ""
    data: str | None = None
    weights: str | None = None
    img_size: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head_dropout: float = 0.0
    num_classes: int | None = None
    layout: str = "auto"
    train_split: str | None = AUTO
    val_split: str | None = None
    test_split: str | None = AUTO
    val_fraction: float | None = None
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    grad_accum: int = 1
    clip_grad: float | None = None
    mixed_precision: str = AUTO
    augmentation: str = "vtab"
    eval_every: int = 1
    save_every_steps: int = 0
    seed: int = 0
    workers: int = 2
    cpu: bool = False
    output: str = "runs/run"
    resume: str | None = None

    def __post_init__(self) -> None:
        if not self.backbone or not self.method:
            raise ConfigError("a run needs a backbone and a method (e.g. `sidetune train test_vit losa --data DIR`).")
        for name in ("data", "weights", "output", "resume"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        for name in ("epochs", "batch_size", "grad_accum", "eval_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("save_every_steps", "workers", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("img_size", "num_classes", "eval_batch_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}.")
        for name in ("weight_decay", "warmup_epochs", "min_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}.")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} is above lr={self.lr}.")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} is longer than epochs={self.epochs}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"head_dropout must be in [0, 1), got {self.head_dropout!r}.")
        if self.clip_grad is not None and not (isinstance(self.clip_grad, int | float) and self.clip_grad > 0):
            raise ConfigError(f"clip_grad must be a positive number or None, got {self.clip_grad!r}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}.")
        if self.val_fraction is not None:
            if not 0.0 < self.val_fraction < 1.0:
                raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}.")
            if self.val_split is not None:
                raise ConfigError(
                    f"give val_split ({self.val_split!r}) or val_fraction ({self.val_fraction}), not both."
                )
        for name in ("method_options", "backbone_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping, got {getattr(self, name)!r}.")
        if isinstance(self.test_split, str) and self.test_split.lower() == "none":
            self.test_split = None

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (tuples as lists), as written to ``train_config.yaml`` and the run summary."""
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the config") -> TrainConfig:
        """Build from a mapping, naming unknown keys (with close matches) and their source."""
        known = cls.field_names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            import difflib

            hints = [
                f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                for k in unknown
            ]
            raise ConfigError(f"{source} has unknown setting(s) {', '.join(hints)}. Settings: {', '.join(known)}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Load ``path`` and apply ``overrides`` on top (``method_options`` and ``backbone_kwargs`` merge per key).

        Raises:
            ConfigError: the file is missing, is not a YAML mapping, or names unknown settings.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{str(path)!r} must hold a mapping of settings, got {type(values).__name__}.")
        for key in ("method_options", "backbone_kwargs"):
            if key in overrides and isinstance(values.get(key), dict):
                overrides[key] = {**values[key], **overrides[key]}
        return cls.from_dict({**values, **overrides}, source=repr(str(path)))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def parse_value(text: str) -> Any:
    """Parse a ``--opt key=value`` value: int, float, bool, None, a comma-separated tuple, else the string.

    >>> parse_value("8"), parse_value("0.5"), parse_value("true"), parse_value("2,4"), parse_value("gelu")
    (8, 0.5, True, (2, 4), 'gelu')
    """
    text = text.strip()
    if "," in text:
        inner = text.strip("()[] ")
        return tuple(parse_value(part) for part in inner.split(",") if part.strip())
    lowered = text.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: list[str] | None, flag: str = "--opt") -> dict[str, Any]:
    """``["rank=8", "alpha=16"]`` -> ``{"rank": 8, "alpha": 16}``; a pair without ``=`` is an error."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} takes key=value, got {pair!r}.")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options
