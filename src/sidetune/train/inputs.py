"""The loaders of a run: a data order that is reproducible, identical on any worker count, and resumable.

Data order: :class:`EpochSampler` draws epoch ``e``'s permutation from ``seed`` and ``e`` alone, so the
order needs no saved generator state: a run resumed mid-epoch recomputes the permutation and skips the
batches it already consumed. Augmentation: :class:`SeededDataset` seeds the random transforms of sample
``i`` in epoch ``e`` from ``(seed, e, i)``, so an image's crop and flip do not depend on which worker loads
it, on how many workers there are, or on whether the run was resumed.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from accelerate import skip_first_batches
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import DataError
from ..errors import ConfigError

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
        if hasattr(self.dataset, "set_epoch"):  # a tap cache's split picks the view of the epoch
            self.dataset.set_epoch(epoch)

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


def classes_of(dataset: Dataset, num_classes: int | None) -> list[str]:
    """Class names of a dataset handed to ``fit`` directly (``dataset.classes``, else ``0..num_classes-1``)."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        if num_classes is not None and len(classes) != num_classes:
            raise DataError(f"the training dataset has {len(classes)} classes but config.num_classes is {num_classes}.")
        return [str(c) for c in classes]
    if num_classes is None:
        raise ConfigError("the training dataset has no `classes` attribute: set num_classes in the TrainConfig.")
    return [str(i) for i in range(num_classes)]


def make_train_loader(
    dataset: SeededDataset,
    batch_size: int,
    seed: int,
    num_processes: int,
    **loader_kwargs: Any,
) -> tuple[DataLoader, EpochSampler]:
    """The training loader (not yet prepared) and its sampler: the order of epoch ``e`` depends on (seed, e) alone.

    The last incomplete batch is dropped unless the data is smaller than one global batch; the loader's own
    generator (which seeds its workers) is seeded too, so iterating it never draws on the global RNG.
    """
    sampler = EpochSampler(len(dataset), seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(dataset) >= batch_size * num_processes,
        generator=torch.Generator().manual_seed(seed),
        **loader_kwargs,
    )
    return loader, sampler


def epoch_loader(train_loader, sampler: EpochSampler, dataset: SeededDataset, epoch: int, skip: int = 0):
    """The prepared ``train_loader`` positioned at ``epoch``, its first ``skip`` batches skipped (a resume)."""
    dataset.set_epoch(epoch)
    loader = skip_first_batches(train_loader, skip) if skip else train_loader
    loader.set_epoch(epoch)  # accelerate's own epoch counter, which it hands to the sampler on iteration
    sampler.set_epoch(epoch)  # the permutation of this epoch, whichever wrappers sit between
    return loader


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + n, rank + 2n, ...`` of ``0..size-1``: this process's share of an evaluation split.

    Unlike a padded distributed sampler, no index is repeated: the shards are disjoint and cover the split once,
    so metrics merged over processes count every image exactly once, whatever the task.
    """

    def __init__(self, size: int, rank: int, num_processes: int) -> None:
        self.indices = list(range(rank, size, num_processes))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_eval_loader(
    dataset: Dataset, batch_size: int, rank: int, num_processes: int, collate_fn, workers: int = 0
) -> DataLoader:
    """This process's shard of an evaluation split, in order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, num_processes),
        collate_fn=collate_fn,
        num_workers=workers,
    )
