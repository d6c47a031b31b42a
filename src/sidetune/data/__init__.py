"""Datasets and transforms: classification (ImageFolder, VTAB-1k lists, CSV), semantic segmentation (SegNet/CamVid,
ADE20K, VOC, mask folders) and detection / instance segmentation (Pascal VOC XML, COCO JSON), plus the dataset
check (``sidetune data check``) and class-balanced loss weights.

Every layout, with its folder tree, file formats, split names, ignored values and an example, is described in
``docs/data.md``; :data:`LAYOUTS` names each one in a line (task -> {layout: description}). One builder per task
reads them all: :func:`build_classification_dataset`, :func:`build_segmentation_dataset`,
:func:`build_detection_dataset`.

Skipped files (every reader): ``dataset.skipped`` is a ``list[tuple[str, str]]`` of ``(path, reason)`` for every
file the reader saw and left out: files of another format ("unsupported format (.txt; ...)"), hidden files and
folders, files outside a class folder, directory links that loop back to an ancestor, the second path of one file
reached twice, masks without an image, images a COCO JSON does not list, images decoding showed unreadable (with
``skip_corrupt=True``). :func:`skipped_files` reads it through ``Subset`` wrappers. A training run prints the count
and writes the list into its summary: nothing is left out silently.

Before training: :func:`check_training_data` refuses a training split on which training cannot mean anything
(one class, no scored pixel, no box) and returns :class:`DataWarning`\\ s (stable ``code`` flags for the summary)
for the rest; :func:`class_weights` computes inverse-frequency loss weights from :func:`count_classes`.

Names are loaded on first use (PEP 562), so ``import sidetune.data.catalog`` or ``sidetune.data.commands`` (what the
command line needs to build its parser) imports neither torch nor PIL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers and editors; at run time __getattr__ loads them
    from .balance import ClassCounts, class_weights, count_classes
    from .catalog import AUGMENTATIONS, DATA_DOCS, LAYOUTS, TASKS, layouts_help
    from .check import WARNING_CODES, DataReport, DataWarning, SplitReport, check_dataset, check_training_data
    from .classification import (
        VTAB_SPLITS,
        ClassificationDataset,
        ClassificationSubset,
        CSVDataset,
        ImageFolderDataset,
        VTABDataset,
        build_classification_dataset,
        check_num_classes,
        skipped_files,
        split_train_val,
        verify_images,
    )
    from .detection import (
        BCCD_CLASSES,
        VOC_DETECTION_CLASSES,
        BoxFixWarning,
        CocoDetectionDataset,
        DetectionDataset,
        DetectionRecord,
        VOCDetectionDataset,
        build_detection_dataset,
        build_detection_transforms,
        detect_detection_layout,
        detection_collate,
        make_coco,
        to_coco,
    )
    from .files import CHECK_HINT, DataError, load_rgb, to_rgb, unreadable_images
    from .segmentation import (
        ADE20K_CLASSES,
        CAMVID_CLASSES,
        IGNORE_INDEX,
        VOC_CLASSES,
        ADE20KDataset,
        CamVidDataset,
        MaskFolderDataset,
        SegmentationDataset,
        SegNetDataset,
        VOCSegmentationDataset,
        build_segmentation_dataset,
        build_segmentation_transforms,
        detect_segmentation_layout,
        label_table,
        read_class_names,
    )
    from .transforms import ToRGB, build_transforms, resolve_backbone_data_config

# name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # catalog (torch-free)
    "AUGMENTATIONS": "catalog",
    "DATA_DOCS": "catalog",
    "LAYOUTS": "catalog",
    "TASKS": "catalog",
    "layouts_help": "catalog",
    # files
    "CHECK_HINT": "files",
    "DataError": "files",
    "load_rgb": "files",
    "to_rgb": "files",
    "unreadable_images": "files",
    # classification
    "VTAB_SPLITS": "classification",
    "ClassificationDataset": "classification",
    "ClassificationSubset": "classification",
    "CSVDataset": "classification",
    "ImageFolderDataset": "classification",
    "VTABDataset": "classification",
    "build_classification_dataset": "classification",
    "check_num_classes": "classification",
    "skipped_files": "classification",
    "split_train_val": "classification",
    "verify_images": "classification",
    # detection
    "BCCD_CLASSES": "detection",
    "BoxFixWarning": "detection",
    "VOC_DETECTION_CLASSES": "detection",
    "CocoDetectionDataset": "detection",
    "DetectionDataset": "detection",
    "DetectionRecord": "detection",
    "VOCDetectionDataset": "detection",
    "build_detection_dataset": "detection",
    "build_detection_transforms": "detection",
    "detect_detection_layout": "detection",
    "detection_collate": "detection",
    "make_coco": "detection",
    "to_coco": "detection",
    # segmentation
    "ADE20K_CLASSES": "segmentation",
    "CAMVID_CLASSES": "segmentation",
    "IGNORE_INDEX": "segmentation",
    "VOC_CLASSES": "segmentation",
    "ADE20KDataset": "segmentation",
    "CamVidDataset": "segmentation",
    "MaskFolderDataset": "segmentation",
    "SegmentationDataset": "segmentation",
    "SegNetDataset": "segmentation",
    "VOCSegmentationDataset": "segmentation",
    "build_segmentation_dataset": "segmentation",
    "build_segmentation_transforms": "segmentation",
    "detect_segmentation_layout": "segmentation",
    "label_table": "segmentation",
    "read_class_names": "segmentation",
    # transforms
    "ToRGB": "transforms",
    "build_transforms": "transforms",
    "resolve_backbone_data_config": "transforms",
    # balance and check
    "ClassCounts": "balance",
    "class_weights": "balance",
    "count_classes": "balance",
    "DataReport": "check",
    "DataWarning": "check",
    "SplitReport": "check",
    "WARNING_CODES": "check",
    "check_dataset": "check",
    "check_training_data": "check",
    "VideoClipDataset": "video",
    "build_video_dataset": "video",
    "build_video_transforms": "video",
    "find_clips": "video",
}

__all__ = [
    "ADE20K_CLASSES",
    "AUGMENTATIONS",
    "BCCD_CLASSES",
    "CAMVID_CLASSES",
    "CHECK_HINT",
    "DATA_DOCS",
    "IGNORE_INDEX",
    "LAYOUTS",
    "TASKS",
    "VOC_CLASSES",
    "VOC_DETECTION_CLASSES",
    "VTAB_SPLITS",
    "WARNING_CODES",
    "ADE20KDataset",
    "BoxFixWarning",
    "CSVDataset",
    "CamVidDataset",
    "ClassCounts",
    "ClassificationDataset",
    "ClassificationSubset",
    "CocoDetectionDataset",
    "DataError",
    "DataReport",
    "DataWarning",
    "DetectionDataset",
    "DetectionRecord",
    "ImageFolderDataset",
    "MaskFolderDataset",
    "SegNetDataset",
    "SegmentationDataset",
    "SplitReport",
    "ToRGB",
    "VOCDetectionDataset",
    "VOCSegmentationDataset",
    "VTABDataset",
    "VideoClipDataset",
    "build_classification_dataset",
    "build_detection_dataset",
    "build_detection_transforms",
    "build_segmentation_dataset",
    "build_segmentation_transforms",
    "build_transforms",
    "build_video_dataset",
    "build_video_transforms",
    "check_dataset",
    "check_num_classes",
    "check_training_data",
    "class_weights",
    "count_classes",
    "detect_detection_layout",
    "detect_segmentation_layout",
    "detection_collate",
    "find_clips",
    "label_table",
    "layouts_help",
    "load_rgb",
    "make_coco",
    "read_class_names",
    "resolve_backbone_data_config",
    "skipped_files",
    "split_train_val",
    "to_coco",
    "to_rgb",
    "unreadable_images",
    "verify_images",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
