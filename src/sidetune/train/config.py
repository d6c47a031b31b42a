"""``TrainConfig``: every setting of a training run of any task, validated on construction, loadable from YAML.

A run is described by one dataclass. The CLI builds it from ``--config run.yaml`` plus the flags given on
the command line (an explicit flag beats the YAML, the YAML beats the defaults); the resolved config is
written beside the run's results as ``train_config.yaml``, so ``sidetune train --config
runs/x/train_config.yaml`` repeats a run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
AUTO = "auto"


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as the number it looks like, as YAML 1.2 does: PyYAML follows YAML
    1.1, whose floats need a dot and a signed exponent, and reads ``lr: 1e-3`` as the string ``'1e-3'``."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


@dataclass
class TrainConfig:
    """A training run of any task: the same fields, and the same YAML file, whatever the task.

    What differs between tasks lives in ``task_options`` (validated by the task's options dataclass, e.g.
    ``label_smoothing`` for classification, ``eval_mode`` for segmentation, ``detector`` for detection; see
    ``sidetune train --help``). Fields left at None take the task's default (``batch_size``, ``weight_decay``,
    ``workers``); the resolved value is what ``train_config.yaml`` records.

    Attributes:
        backbone: timm model name (``sidetune backbones``).
        method: adaptation method (``sidetune methods``).
        task: ``classification``, ``segmentation``, ``detection`` or ``instance`` (``sidetune.tasks``).
        data: the dataset (a folder, CSV or list file; docs/data.md lists every layout). May be None only
            when the datasets are handed to :func:`sidetune.train.fit` directly.
        layout: data layout (``auto`` guesses it; each task's choices: ``sidetune train --help``).
        weights: backbone weights: None (random), ``"hub"`` or a ``.safetensors``/``.pth`` path.
        img_size: input size (default: the backbone's).
        method_options: fields of the method's config (``{"channel_rank": 8}``).
        backbone_kwargs: extra ``timm.create_model`` arguments.
        head_options: options of a dense task's head (``channels`` for UPerNet; ``fpn_channels``... for
            detectors); classification takes none.
        task_options: the task's own options (see above).
        num_classes: expected class count; the data must agree (default: the training data's).
        augmentation: training transform recipe of the task (``auto``: the task's default; classification
            ``vtab``/``none``/``standard``, dense tasks ``standard`` (scale jitter + crop) or ``none``).
        train_split: training split; ``auto`` uses ``train`` when the data has one (classification: else the
            whole data).
        val_split: validation split; ``auto`` uses ``val`` when the data has one; None for none.
        test_split: split scored once at the end with the best checkpoint; ``auto`` uses ``test`` when the
            data has one; None for none.
        val_fraction: carve this fraction of the training split off as validation (seeded by ``split_seed``;
            classification: per class); replaces ``val_split``.
        split_seed: the seed of that split (default: ``seed``); fix it to keep one validation split across runs
            of several seeds.
        train_limit / val_limit: use only the first N images of the training / validation split (quick runs).
        epochs: passes over the training data.
        batch_size: images per process per micro-batch (default: the task's, 32 or 8).
        eval_batch_size: images per batch at evaluation (default: the task's multiple of ``batch_size``).
        lr: peak learning rate (AdamW).
        head_lr_mult: the task head's learning rate is ``lr`` times this (1: one rate for every trainable tensor).
            The head is every trainable tensor under ``model.head`` (the classifier, UPerNet with its neck, the
            whole detector); the rest is the method's (LoRA's matrices, a side network, a fully fine-tuned
            backbone). It follows the same warm-up and cosine, so its floor is ``min_lr`` times it too. A new
            head beside a pretrained backbone often wants a higher rate than the backbone's fine-tuning rate
            (mmsegmentation's SegFormer recipes give the decode head ``lr_mult=10``: the same lever). The log's
            ``lr`` is the method's rate.
        weight_decay: AdamW weight decay on matrices only (not biases, norms, 1-D tensors, position
            embeddings or class tokens); default: the task's.
        warmup_epochs: linear warm-up length in epochs (fractions allowed), then cosine decay to ``min_lr``.
        min_lr: learning rate at the end of the cosine.
        grad_accum: micro-batches per optimizer step.
        clip_grad: max gradient norm, or None for no clipping.
        mixed_precision: ``auto`` (bf16 on CUDA when supported, else fp16; ``no`` on CPU), ``no``,
            ``bf16`` (CUDA, or a CPU with native bfloat16) or ``fp16`` (CUDA only).
        eval_every: evaluate on the validation split every this many epochs (and after the last one).
        save_every_steps: also save the resumable state every this many optimizer steps (0: at epoch ends
            only).
        nonfinite_patience: optimizer steps whose loss is NaN or inf that are skipped before the run stops with an
            error (0: stop at the first). A skipped step changes no weight; non-finite weights are never saved.
        seed: seed of the model's initialisation, the data order, augmentation and dropout.
        workers: data-loading worker processes per training process (default: the task's).
        threads: torch CPU threads of each process (None: torch's default).
        cpu: train on the CPU even when CUDA is available.
        output: run directory (logs, summary, checkpoints).
        resume: run directory or checkpoint directory to continue from, or None.
        cache: a tap cache folder (``sidetune cache build``) to train from instead of running the backbone: the
            splits, transforms and backbone must be those the cache was built with (checked).
        compile: ``torch.compile`` the side network (the side method's ``forward_taps``; side methods only). The
            same computation, fused: on this project's CPU it cut the side step by 17-45% (Swin-T, ViT-B; see
            docs/benchmarks/side_profile_compile.md), for a one-off compilation of seconds to a minute.
    """

    backbone: str = ""
    method: str = ""
    task: str = "classification"
    data: str | None = None
    layout: str = "auto"
    weights: str | None = None
    img_size: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    augmentation: str = AUTO
    train_split: str | None = AUTO
    val_split: str | None = AUTO
    test_split: str | None = AUTO
    val_fraction: float | None = None
    split_seed: int | None = None
    train_limit: int | None = None
    val_limit: int | None = None
    epochs: int = 10
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float = 1e-3
    head_lr_mult: float = 1.0
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    grad_accum: int = 1
    clip_grad: float | None = None
    mixed_precision: str = AUTO
    eval_every: int = 1
    save_every_steps: int = 0
    nonfinite_patience: int = 0
    seed: int = 0
    workers: int | None = None
    threads: int | None = None
    cpu: bool = False
    output: str = "runs/run"
    resume: str | None = None
    cache: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        from ..tasks import get_task

        if not self.backbone or not self.method:
            raise ConfigError("a run needs a backbone and a method (e.g. `sidetune train test_vit losa --data DIR`).")
        for name in ("data", "weights", "output", "resume", "cache"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `mixed_precision: no` as false
            self.mixed_precision = "no"
        _check_types(self)
        task = get_task(self.task)
        for name, value in task.defaults.items():  # the task's defaults for the fields left at None
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("epochs", "batch_size", "grad_accum", "eval_every"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.split_seed is None:
            self.split_seed = self.seed
        for name in ("save_every_steps", "nonfinite_patience", "workers", "seed", "split_seed"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("img_size", "num_classes", "eval_batch_size", "train_limit", "val_limit", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_positive("lr", self.lr)
        _check_positive("head_lr_mult", self.head_lr_mult)
        for name in ("weight_decay", "warmup_epochs", "min_lr"):
            _check_number(name, getattr(self, name), minimum=0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is above --lr {self.lr}.")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs} is longer than --epochs {self.epochs}.")
        if self.clip_grad is not None:
            _check_positive("clip_grad", self.clip_grad)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}."
            )
        if self.augmentation == AUTO:
            self.augmentation = task.augmentations[0]
        if self.augmentation not in task.augmentations:
            recipes = ", ".join(task.augmentations)
            raise ConfigError(f"--augmentation {self.augmentation} is not one of the {self.task} recipes: {recipes}.")
        if self.layout not in task.layouts:
            raise ConfigError(
                f"layout {self.layout!r} is not a {self.task} layout; choose from {', '.join(task.layouts)} "
                "(docs/data.md shows each)."
            )
        for name in ("train_split", "val_split", "test_split"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
                setattr(self, name, None)
            elif value is not None:
                check_split_name(name, value)
        if self.val_fraction is not None:
            if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, int | float):
                raise ConfigError(f"--val-fraction must be a number in (0, 1), got {self.val_fraction!r}.")
            if not 0.0 < self.val_fraction < 1.0:
                raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}.")
            if self.val_split not in (None, AUTO):
                raise ConfigError(
                    f"give --val-split ({self.val_split}) or --val-fraction ({self.val_fraction}), not both."
                )
            self.val_split = None
        for name in ("method_options", "backbone_kwargs", "head_options", "task_options"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping, got {getattr(self, name)!r}.")
        task.make_options(self.task_options)  # unknown or invalid task options fail here, not after the model

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

            from ..tasks import task_of_option

            def hint(key: str) -> str:
                owner = task_of_option(key)
                if owner is not None:
                    return f"{key!r} (a {owner} option: put it under task_options)"
                match = difflib.get_close_matches(key, known, 1)
                return f"{key!r} (did you mean {match[0]!r}?)" if match else repr(key)

            hints = [hint(k) for k in unknown]
            raise ConfigError(f"{source} has unknown setting(s) {', '.join(hints)}. Settings: {', '.join(known)}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Load ``path`` and apply ``overrides`` on top (the option mappings merge per key).

        A number with an exponent and no dot (``lr: 1e-3``) is read as the number, not as the text PyYAML alone
        makes of it.

        Raises:
            ConfigError: the file is missing, is not a YAML mapping, or names unknown settings.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            values = yaml.load(path.read_text(), Loader=_YAMLLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{str(path)!r} must hold a mapping of settings, got {type(values).__name__}.")
        for key in ("method_options", "backbone_kwargs", "head_options", "task_options"):
            if key in overrides and isinstance(values.get(key), dict):
                overrides[key] = {**values[key], **overrides[key]}
        return cls.from_dict({**values, **overrides}, source=repr(str(path)))


def _flag(name: str) -> str:
    """A setting as the command line spells it (``min_lr`` -> ``--min-lr``); messages use it for CLI and API alike."""
    return "--" + name.replace("_", "-")


def _check_types(config: TrainConfig) -> None:
    """The checks by type: a bool setting is True or False (the string ``"no"`` is truthy: ``cpu: "no"`` would
    force the CPU), a string setting a string (``data: [1, 2]`` is no path). Numbers are checked with their
    ranges."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "bool" and not isinstance(value, bool):
            hint = f" (in YAML, unquoted: `{f.name}: true` or `{f.name}: false`)" if isinstance(value, str) else ""
            raise ConfigError(f"{_flag(f.name)} must be true or false, got {value!r}{hint}.")
        if f.type in ("str", "str | None") and not isinstance(value, str) and (value is not None or f.type == "str"):
            raise ConfigError(f"{_flag(f.name)} must be a string, got {value!r}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_flag(name)} must be an integer >= {minimum}, got {value!r}.")


def _check_number(name: str, value: Any, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{_flag(name)} must be a finite number >= {minimum:g}, got {value!r}.")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{_flag(name)} must be a finite number > 0, got {value!r}.")


def check_split_name(what: str, split: Any) -> None:
    """A split is a plain name (``train``, ``val200``): never a path, so no output can land outside its folder.

    Raises:
        ConfigError: ``split`` is not a string, or holds a path separator, ``..`` or a leading dot.
    """
    if not isinstance(split, str) or not split or "/" in split or "\\" in split or split.startswith("."):
        raise ConfigError(
            f"{what} must be a plain split name such as 'train' or 'test' (no '/', '\\' or leading '.'), got {split!r}."
        )


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
