"""Instance segmentation: COCO data with masks, Mask R-CNN on the method's pyramid, COCO box and mask mAP.

Everything but the detector, the masks and the metrics is detection's
(:class:`~sidetune.tasks.detection.DetectionTask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .detection import DetectionTask


@dataclass
class InstanceOptions:
    """``task_options`` of an instance segmentation run.

    Attributes:
        detector: ``mask_rcnn`` (the only one; None means it).
    """

    detector: str | None = None


class InstanceTask(DetectionTask):
    name = "instance"
    description = "instance masks: torchvision Mask R-CNN on the method's pyramid, COCO box and mask mAP"
    options_cls = InstanceOptions
    layouts: ClassVar[dict[str, str]] = {
        "auto": "coco",
        "coco": "COCO with polygon or RLE masks: <split>/ images + annotations/instances_<split>.json",
    }
    detectors = ("mask_rcnn",)
    masks = True
