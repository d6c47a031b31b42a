"""``Features``: what every method hands to a head, whichever way it was computed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Features:
    """Adapted features of a batch of images.

    Attributes:
        pooled: (B, C) image-level vector, what a classification head reads.
        tokens: (B, N, C) final token sequence (prefix tokens first), or None for CNNs.
        pyramid: list of (B, C_i, H_i, W_i) maps from fine to coarse, or None when the task does not
            need one (dense heads read it).
        strides: the input-pixel stride of each pyramid level, or None.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    pyramid: list[torch.Tensor] | None = None
    strides: list[int] | None = None
