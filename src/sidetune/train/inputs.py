"""The datasets of a run and a data order that is reproducible, identical on any worker count, and resumable.

Data order: :class:`EpochSampler` draws epoch ``e``'s permutation from ``seed`` and ``e`` alone, so the
order needs no saved generator state: a run resumed mid-epoch recomputes the permutation and skips the
batches it already consumed. Augmentation: :class:`SeededDataset` seeds the random transforms of sample
``i`` in epoch ``e`` from ``(seed, e, i)``, so an image's crop and flip do not depend on which worker loads
it, on how many workers there are, or on whether the run was resumed.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data import (
    VTAB_SPLITS,
    ClassificationSubset,
    DataError,
    build_classification_dataset,
    build_transforms,
    check_num_classes,
    split_train_val,
)
from ..errors import ConfigError
from .config import AUTO, TrainConfig

logger = logging.getLogger(__name__)

_SEED_MIX = 1_000_003  # odd multipliers keep (seed, epoch, index) -> seed one-to-one in practice


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled with a permutation that depends only on ``(seed, epoch)``.

    Args:
        n: dataset length.
        seed: run seed.
        shuffle: False gives ``0..n-1`` in order.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * _SEED_MIX + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class SeededDataset(Dataset):
    """Wrap a dataset so that sample ``i`` of epoch ``e`` is transformed under RNGs seeded from ``(seed, e, i)``.

    The process's own RNG states (torch, numpy, python) are restored afterwards, so loading in the main
    process (``workers=0``) leaves dropout's random stream untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """A batch (the DataLoader's batched fetch): the process's RNG states are saved and restored once."""
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                samples = []
                for index in indices:
                    sample_seed = ((self.seed * _SEED_MIX + self.epoch) * _SEED_MIX + index) % (2**63 - 1)
                    # the CPU generator only: torch.manual_seed also queues lazy CUDA/XPU seeding, ~1 ms a call
                    torch.default_generator.manual_seed(sample_seed)
                    random.seed(sample_seed)
                    np.random.seed(sample_seed % 2**32)
                    samples.append(self.dataset[index])
                return samples
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@dataclass
class RunData:
    """The datasets of a run (``val``/``test`` may be None) and the class names shared by all of them."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]
    source: str

    def sizes(self) -> dict[str, int | None]:
        return {
            k: (len(d) if d is not None else None)
            for k, d in (("train", self.train), ("val", self.val), ("test", self.test))
        }


def _has_split(root: Path, split: str) -> bool:
    if not root.is_dir():
        return False
    if (root / split).is_dir() or (root / f"{split}.txt").is_file() or (root / f"{split}.csv").is_file():
        return True
    has_vtab = any((root / name).is_file() for name in VTAB_SPLITS.values())
    return has_vtab and split in ("train", "trainval", "val")


def resolve_splits(config: TrainConfig) -> tuple[str | None, str | None, str | None]:
    """The (train, val, test) split names ``auto`` stands for in ``config.data``."""
    root = Path(config.data).expanduser()
    train = config.train_split
    if train == AUTO:
        train = "train" if _has_split(root, "train") else None
    test = config.test_split
    if test == AUTO:
        test = "test" if _has_split(root, "test") else None
    return train, config.val_split, test


def build_run_data(config: TrainConfig, data_config: dict[str, Any]) -> RunData:
    """Build the train/val/test datasets of ``config`` with the backbone's transforms.

    Args:
        config: the run.
        data_config: the model's timm data config (:attr:`SidetuneModel.data_config`).

    Raises:
        DataError: missing or empty data, a split that does not exist, ``num_classes`` disagreeing with the data.
    """
    if config.data is None:
        raise ConfigError("no data: set `data` (a folder, CSV or list file) or pass the datasets to fit().")
    train_split, val_split, test_split = resolve_splits(config)
    size = tuple(data_config["input_size"][1:])
    train_tf = build_transforms(data_config, size, config.augmentation, train=True)
    eval_tf = build_transforms(data_config, size, config.augmentation, train=False)
    root = config.data
    train = build_classification_dataset(root, train_split, train_tf, config.layout, num_classes=config.num_classes)
    if len(train) == 0:
        raise DataError(f"the training data at {train.root} holds no images.")
    classes = list(train.classes)
    if config.num_classes is not None:
        check_num_classes(train, config.num_classes)
    val = test = None
    if config.val_fraction is not None:
        # the validation images keep the training set's random transform unless re-wrapped: build a twin
        # of the training set with the eval transform and take the same indices from it
        twin = build_classification_dataset(root, train_split, eval_tf, config.layout, classes=classes)
        train_sub, val_sub = split_train_val(train, val_fraction=config.val_fraction, seed=config.seed)
        train = train_sub
        val = ClassificationSubset(twin, val_sub.indices)
    elif val_split is not None:
        val = build_classification_dataset(root, val_split, eval_tf, config.layout, classes=classes)
    if test_split is not None:
        test = build_classification_dataset(root, test_split, eval_tf, config.layout, classes=classes)
    for name, ds in (("validation", val), ("test", test)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {name} split of {root} holds no images.")
    logger.info(
        "data %s: train %d, val %s, test %s images, %d classes",
        root,
        len(train),
        len(val) if val is not None else None,
        len(test) if test is not None else None,
        len(classes),
    )
    return RunData(train=train, val=val, test=test, classes=classes, source=str(root))


def classes_of(dataset: Dataset, num_classes: int | None) -> list[str]:
    """Class names of a dataset handed to ``fit`` directly (``dataset.classes``, else ``0..num_classes-1``)."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        if num_classes is not None and len(classes) != num_classes:
            raise DataError(f"the training dataset has {len(classes)} classes but num_classes={num_classes}.")
        return [str(c) for c in classes]
    if num_classes is None:
        raise ConfigError("the training dataset has no `classes` attribute: set num_classes in the TrainConfig.")
    return [str(i) for i in range(num_classes)]
