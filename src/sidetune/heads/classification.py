"""Classification head: a linear layer on ``Features.pooled``."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import require_positive_int
from ..features import Features


class ClassificationHead(nn.Module):
    """(B, C) pooled features -> (B, num_classes) logits.

    Args:
        in_features: C.
        num_classes: number of classes.
        dropout: dropout before the linear layer.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        require_positive_int("num_classes", num_classes, "classification head")
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Features) -> torch.Tensor:
        return self.fc(self.drop(features.pooled))
