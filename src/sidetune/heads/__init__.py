"""Task heads on ``Features``."""

from .classification import ClassificationHead

__all__ = ["ClassificationHead"]
