"""Task heads on ``Features``: classification, semantic segmentation, detection and instance segmentation."""

from .classification import ClassificationHead
from .detection import (
    DETECTORS,
    FixedSizeTransform,
    PyramidBackbone,
    build_detector,
    default_anchor_sizes,
    run_detector,
)
from .pyramid import PyramidNeck, PyramidSpec, SimpleFeaturePyramid, StageNorms
from .segmentation import (
    IGNORE_INDEX,
    UPerNetHead,
    predict_segmentation,
    segmentation_loss,
    slide_inference,
    whole_inference,
)

__all__ = [
    "DETECTORS",
    "IGNORE_INDEX",
    "ClassificationHead",
    "FixedSizeTransform",
    "PyramidBackbone",
    "PyramidNeck",
    "PyramidSpec",
    "SimpleFeaturePyramid",
    "StageNorms",
    "UPerNetHead",
    "build_detector",
    "default_anchor_sizes",
    "predict_segmentation",
    "run_detector",
    "segmentation_loss",
    "slide_inference",
    "whole_inference",
]
