"""Datasets and transforms: image classification from ImageFolder trees, VTAB-1k lists and CSV files."""

from sidetune.data.classification import (
    VTAB_SPLITS,
    ClassificationDataset,
    ClassificationSubset,
    CSVDataset,
    DataError,
    ImageFolderDataset,
    VTABDataset,
    build_classification_dataset,
    check_num_classes,
    load_rgb,
    split_train_val,
    verify_images,
)
from sidetune.data.transforms import AUGMENTATIONS, ToRGB, build_transforms, resolve_backbone_data_config

__all__ = [
    "AUGMENTATIONS",
    "VTAB_SPLITS",
    "CSVDataset",
    "ClassificationDataset",
    "ClassificationSubset",
    "DataError",
    "ImageFolderDataset",
    "ToRGB",
    "VTABDataset",
    "build_classification_dataset",
    "build_transforms",
    "check_num_classes",
    "load_rgb",
    "resolve_backbone_data_config",
    "split_train_val",
    "verify_images",
]
