"""``CachedTaps``: a batch of taps read from a cache, which a model takes in place of images.

A side method never changes the backbone, so the activations it reads for an image never change: a cache stores
them once and training replays them. ``SidetuneModel.forward`` accepts a ``CachedTaps`` wherever it accepts
images and runs the side network and head on it; the backbone's forward is never called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..backbones import TapLayout, Taps


def tap_key(kind: str, block: int | None = None) -> str:
    """The name of a tap in a cache: ``out.11``, ``attn.3``, ``mlp.3`` or ``final``."""
    return kind if block is None else f"{kind}.{block}"


@dataclass
class CachedTaps:
    """Taps of a batch (or of one sample, without the batch dimension) and per-sample facts the head needs.

    Attributes:
        tensors: tap name (:func:`tap_key`) -> (B, N, C) tokens in the cache's dtype (float16 by default). A tap
            may hold only the first tokens (a method that reads the class token only).
        meta: per-sample facts as (B, ...) tensors: detection's ``image_size`` (the letterboxed image inside the
            padded input) and ``original_size`` (where predictions are mapped back to).
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, *args, **kwargs) -> CachedTaps:
        """Move (or cast) the taps as ``Tensor.to`` does; the metadata only moves to the taps' device."""
        tensors = {k: v.to(*args, **kwargs) for k, v in self.tensors.items()}
        device = next(iter(tensors.values())).device
        return CachedTaps(tensors, {k: v.to(device) for k, v in self.meta.items()})

    @staticmethod
    def stack(samples: Sequence[CachedTaps]) -> CachedTaps:
        """A batch from per-sample taps (each without the batch dimension)."""
        first = samples[0]
        return CachedTaps(
            {k: torch.stack([s.tensors[k] for s in samples]) for k in first.tensors},
            {k: torch.stack([s.meta[k] for s in samples]) for k in first.meta},
        )

    def taps(self, layout: TapLayout, dtype: torch.dtype) -> Taps:
        """The :class:`~sidetune.backbones.Taps` a side method reads, in ``dtype`` (the model's compute dtype)."""
        groups: dict[str, dict[int, torch.Tensor]] = {"attn": {}, "mlp": {}, "out": {}}
        final = None
        for key, value in self.tensors.items():
            value = value.to(dtype)
            if key == "final":
                final = value
            else:
                kind, block = key.split(".")
                groups[kind][int(block)] = value
        return Taps(attn=groups["attn"], mlp=groups["mlp"], out=groups["out"], final=final, layout=layout)

    def image_size(self, layout: TapLayout) -> tuple[int, int]:
        """The (H, W) of the images these taps were computed from: the model's input size."""
        return tuple(layout.img_size)
