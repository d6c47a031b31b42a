"""``SidetuneModel``: images -> logits, built by :func:`sidetune.create`; adapter-only save and load."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .backbones import TimmBackbone
from .features import Features
from .heads.detection import run_detector, run_detector_on_taps

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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
        task: ``classification``, ``segmentation``, ``detection`` or ``instance``.
        num_classes: number of classes (detection: object classes, without the background).
        head_dropout: dropout before the classifier.
        head_options: options of the dense task heads.
        sidetune_version: version that wrote the checkpoint.
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

    def __post_init__(self) -> None:
        # JSON has no tuples: normalise so that a loaded config equals the one that was saved.
        self.img_size = tuple(self.img_size)
        self.backbone_kwargs = _tuples(dict(self.backbone_kwargs))
        self.method_config = _tuples(dict(self.method_config))
        self.head_options = _tuples(dict(self.head_options))


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

    Args:
        method: the method module (owns the backbone).
        head: the task head, reading Features.
        config: the rebuild recipe (saved with the adapter).
    """

    def __init__(self, method: nn.Module, head: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.method = method
        self.head = head
        self.config = config

    @property
    def backbone(self) -> TimmBackbone:
        return self.method.backbone

    @property
    def data_config(self) -> dict:
        """timm preprocessing config (mean, std, interpolation) at the model's input size."""
        return self.backbone.data_config

    def features(self, images: torch.Tensor) -> Features:
        return self.method(images)

    @property
    def task(self) -> str:
        return self.config.task

    def forward(self, images, targets=None):
        """Classification: (B, 3, H, W) -> (B, num_classes). Segmentation: -> (B, num_classes, H, W).

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
        _atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(self.adapter_state_dict(), p))
        _atomic_write(
            directory / ADAPTER_CONFIG,
            lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
        )
        return directory


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
