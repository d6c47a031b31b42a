"""Task metrics: semantic segmentation (mIoU) and detection / instance segmentation (COCO mAP)."""

from .detection import CocoEvaluator, coco_evaluate, coco_ground_truth, to_coco_results
from .segmentation import SegmentationMetrics, confusion_matrix, iou_from_confusion, mean_iou

__all__ = [
    "CocoEvaluator",
    "SegmentationMetrics",
    "coco_evaluate",
    "coco_ground_truth",
    "confusion_matrix",
    "iou_from_confusion",
    "mean_iou",
    "to_coco_results",
]
