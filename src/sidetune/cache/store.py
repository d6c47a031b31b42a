"""The on-disk format of a tap cache: a manifest and safetensors shards, read memory-mapped.

```
CACHE/
  manifest.json            what was cached, from what, how (checked before any use); "complete" only at the end
  train-v0-00000.safetensors   shards of up to ``shard_size`` samples: one (n, N, C) tensor per tap, the targets
  train-v0-00001.safetensors
  val-v0-00000.safetensors
  ...
```

Why safetensors: the project already depends on it, a shard is a flat header plus raw tensors that ``safe_open``
maps into memory (a sample is a slice, read on demand, shared by every data worker through the page cache), it
cannot execute code on load (unlike pickles), and every tensor's dtype and shape is checked on read. Targets whose
shape varies per sample (a mask at an image's own size, a variable number of boxes) are stored ragged: the values
of all samples concatenated, with each sample's shape and offset.

A shard is written to a hidden temporary name and renamed into place when complete, so an interrupted build leaves
whole shards only and resumes at the first one that is missing. A shard damaged afterwards (truncated by a full disk
or a copy cut short, overwritten) is caught by :func:`shard_damage`: its size differs from the one the manifest
records (caches written before sizes were recorded: its safetensors header does not cover the file). Runs check
every shard they read that way before training, ``sidetune cache info`` reports it, and a build into the folder
rewrites it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..errors import SidetuneError
from .batch import CachedTaps

MANIFEST = "manifest.json"
FORMAT = 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheError(SidetuneError):
    """A tap cache is missing, incomplete, corrupt, stale, or lacks what a run needs."""


@dataclass
class Manifest:
    """What a cache holds and where it came from (``manifest.json``).

    Attributes:
        complete: True only once every shard of every split is written.
        backbone, weights, fingerprint, img_size, backbone_kwargs: the frozen backbone (the fingerprint is the
            SHA-256 of its weights, checked against the model that reads the cache).
        task: the task the samples and targets are for.
        methods: the methods the cache was built for.
        taps: tap name -> tokens kept (None: all) — the union of what the methods read.
        dtype: storage dtype of the taps.
        transform: the transforms' description (recipe, size, normalisation, views), checked on use.
        data: the data settings that decide the samples (source, layout, splits, val_fraction, seed, limits).
        classes: the class names.
        files: split -> [[path, size, mtime_ns], ...] of every file the samples were read from.
        splits: split -> {"samples": n, "views": k, "shards": [{"file", "start", "count", "view", "bytes"}...]}
            ("bytes": the shard's size as written, checked before use; absent in caches of older versions).
        shard_size: samples per shard.
        bytes: total bytes of the shards.
        sidetune_version: the version that wrote it.
    """

    backbone: str
    weights: str | None
    fingerprint: str
    img_size: list[int]
    backbone_kwargs: dict[str, Any]
    task: str
    methods: list[str]
    taps: dict[str, int | None]
    dtype: str
    transform: dict[str, Any]
    data: dict[str, Any]
    classes: list[str]
    files: dict[str, list[list[Any]]] = field(default_factory=dict)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    shard_size: int = 256
    bytes: int = 0
    complete: bool = False
    format: int = FORMAT
    sidetune_version: str = ""

    def save(self, root: Path) -> None:
        write_atomic(root / MANIFEST, (json.dumps(asdict(self), indent=1) + "\n").encode())

    @classmethod
    def load(cls, root: str | os.PathLike) -> Manifest:
        """The manifest of a cache folder.

        Raises:
            CacheError: no cache there, or the manifest does not parse.
        """
        path = Path(root).expanduser() / MANIFEST
        if not path.is_file():
            raise CacheError(
                f"no tap cache at {str(path.parent)!r} ({MANIFEST} is missing); build one with `sidetune cache build`."
            )
        try:
            values = json.loads(path.read_text())
            manifest = cls(**values)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise CacheError(
                f"{str(path)!r} is not a sidetune cache manifest ({err}); rebuild it with `sidetune cache build`."
            ) from None
        if manifest.format != FORMAT:
            raise CacheError(
                f"{str(path)!r} has cache format {manifest.format}; this sidetune reads {FORMAT}: rebuild."
            )
        return manifest


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_name(split: str, view: int, index: int) -> str:
    return f"{split}-v{view}-{index:05d}.safetensors"


def shard_damage(path: Path, size: int | None = None, count: int | None = None) -> str | None:
    """What is wrong with the shard file at ``path`` (``'missing'``, ``'100 bytes where the build wrote 5432'``),
    or None when it looks whole.

    With ``size`` (what the manifest records) the check is one ``stat``; without it (a cache written before sizes
    were recorded, or a shard an interrupted build left) safetensors reads the header, which fails when its tensors
    do not exactly fill the file (a truncated shard), and the header's sample count is compared with ``count``. Neither
    reads a tensor: a shard of the right size whose bytes were overwritten is only caught when it is read.
    """
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"cannot be read ({err})"
    if size is not None:
        return None if actual == size else f"{actual} bytes where the build wrote {size}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            written = (handle.metadata() or {}).get("count")
    except (SafetensorError, OSError) as err:
        return f"{actual} bytes, not a whole safetensors file: {err}"
    if count is not None and written != str(count):
        return f"holds {written} samples where the manifest lists {count}"
    return None


def damaged_shards(manifest: Manifest, root: Path, splits: list[str] | None = None) -> list[str]:
    """``'test-v0-00000.safetensors: 100 bytes where the build wrote 5432'`` for each damaged shard of ``splits``
    (default: every split) of a complete cache; see :func:`shard_damage`."""
    found = []
    for split in manifest.splits if splits is None else splits:
        for shard in manifest.splits[split]["shards"]:
            problem = shard_damage(Path(root) / shard["file"], shard.get("bytes"), int(shard["count"]))
            if problem:
                found.append(f"{shard['file']}: {problem}")
    return found


def check_shards(manifest: Manifest, root: Path, splits: list[str] | None = None) -> None:
    """Raise :class:`CacheError` naming the damaged shards of ``splits`` (before a run reads them, not in its test
    step)."""
    damaged = damaged_shards(manifest, root, splits)
    if damaged:
        shown = "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise CacheError(
            f"the cache at {str(root)!r} has {len(damaged)} truncated or corrupt shard(s) ({shown}): run the same "
            "`sidetune cache build` into it again, which rewrites them and keeps the whole ones."
        )


# -- ragged targets -------------------------------------------------------------------------------------------------
def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().as_subclass(torch.Tensor)
    return torch.as_tensor(value)


def pack_targets(targets: list[Any], meta: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-sample targets (a tensor, a number, or a dict of them) and metadata as flat tensors of a shard.

    Each field ``f`` becomes ``<prefix>.f.data`` (every sample's values, flattened and concatenated),
    ``<prefix>.f.shape`` (n, ndim) and ``<prefix>.f.offset`` (n + 1): shapes may differ from sample to sample.
    """
    out: dict[str, torch.Tensor] = {}

    def add(prefix: str, values: list[torch.Tensor]) -> None:
        ndim = values[0].ndim
        if any(v.ndim != ndim for v in values):
            raise CacheError(f"cache: field {prefix!r} changes its number of dimensions between samples.")
        shapes = torch.tensor([list(v.shape) for v in values], dtype=torch.int64).reshape(len(values), ndim)
        sizes = torch.tensor([v.numel() for v in values], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        out[f"{prefix}.data"] = torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0)
        out[f"{prefix}.shape"] = shapes
        out[f"{prefix}.offset"] = offsets

    first = targets[0]
    if isinstance(first, dict):
        for key in first:
            add(f"target.{key}", [_as_tensor(t[key]) for t in targets])
    else:
        add("target", [_as_tensor(t) for t in targets])
    for key in meta[0] if meta else {}:
        add(f"meta.{key}", [_as_tensor(m[key]) for m in meta])
    return out


def _unpack(handle, prefix: str, index: int) -> torch.Tensor:
    offsets = handle.get_slice(f"{prefix}.offset")[index : index + 2].tolist()
    shape = handle.get_slice(f"{prefix}.shape")[index : index + 1][0].tolist()
    return handle.get_slice(f"{prefix}.data")[offsets[0] : offsets[1]].reshape(shape)


# -- writing ----------------------------------------------------------------------------------------------------------
def write_shard(path: Path, taps: dict[str, torch.Tensor], targets: list[Any], meta: list[dict[str, Any]]) -> int:
    """Write one shard atomically (a temporary file renamed into place); returns its size in bytes."""
    tensors = {f"tap.{k}": v.contiguous() for k, v in taps.items()}
    tensors.update(pack_targets(targets, meta))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"count": str(len(targets))})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


# -- reading ----------------------------------------------------------------------------------------------------------
class CachedSplit(Dataset):
    """One split of a tap cache: sample ``i`` is ``(CachedTaps (without batch dim), target)``, read memory-mapped.

    With several views per sample (random augmentation cached ``views`` times), epoch ``e`` reads view
    ``e % views``. View ``v`` was built with the augmentation an uncached run draws in epoch ``v`` (sample ``i`` of
    epoch ``v`` is transformed under RNGs seeded from ``(seed, v, i)``), so the first ``views`` epochs from the
    cache see exactly the images of an uncached run with the same seed.

    Args:
        root: the cache folder.
        split: ``train``, ``val`` or ``test``.
        info: the manifest's entry for the split.
        keys: the taps to read (the model's; the cache may hold more).
        classes: the class names (``dataset.classes``).
        seed: the run's seed (recorded; views are chosen by epoch).
    """

    def __init__(
        self,
        root: Path,
        split: str,
        info: dict[str, Any],
        keys: list[str],
        classes: list[str],
        seed: int = 0,
    ) -> None:
        self.root, self.split, self.keys, self.classes = Path(root), split, list(keys), list(classes)
        self.num_samples, self.views, self.seed, self.epoch = int(info["samples"]), int(info["views"]), seed, 0
        # (view, sample) -> (shard file, row)
        self._where: dict[tuple[int, int], tuple[str, int]] = {}
        for shard in info["shards"]:
            for row in range(int(shard["count"])):
                self._where[(int(shard["view"]), int(shard["start"]) + row)] = (shard["file"], row)
        missing = [(v, i) for v in range(self.views) for i in range(self.num_samples) if (v, i) not in self._where]
        if missing:
            raise CacheError(
                f"cache {root}: split {split!r} lacks {len(missing)} samples (first: view/index {missing[0]})."
            )
        self._handles: dict[str, Any] = {}
        self.source = None  # the dataset of files the split was cached from (set by open_cache)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_of(self, index: int) -> int:
        return self.epoch % self.views

    def _handle(self, name: str):
        if name not in self._handles:  # opened lazily, in the process (data worker) that reads
            path = self.root / name
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CacheError(
                    f"cache shard {str(path)!r} cannot be read ({err}); it is truncated or corrupt: run the same "
                    "`sidetune cache build` into the cache again, which rewrites damaged and missing shards."
                ) from None
        return self._handles[name]

    def __getitem__(self, index: int) -> tuple[CachedTaps, Any]:
        name, row = self._where[(self.view_of(index), index)]
        handle = self._handle(name)
        try:
            tensors = {k: handle.get_slice(f"tap.{k}")[row : row + 1][0] for k in self.keys}
            present = set(handle.keys())
            meta_keys = sorted({k.split(".")[1] for k in present if k.startswith("meta.")})
            meta = {k: _unpack(handle, f"meta.{k}", row) for k in meta_keys}
            target_keys = sorted({k.split(".")[1] for k in present if k.startswith("target.") and k.count(".") == 2})
            if target_keys:
                target: Any = {k: _unpack(handle, f"target.{k}", row) for k in target_keys}
            else:
                target = _unpack(handle, "target", row)
        except (SafetensorError, KeyError) as err:
            raise CacheError(
                f"cache shard {str(self.root / name)!r} is corrupt ({err}); delete it and run the same `sidetune "
                "cache build` into the cache again, which rewrites it."
            ) from None
        return CachedTaps(tensors, meta), target

    def __getstate__(self) -> dict[str, Any]:  # data workers open their own handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def cached_collate(task_collate):
    """A collate for cached samples: the taps stack into one :class:`CachedTaps`, the targets go through the task's
    own collate (as if the taps were images)."""

    def collate(batch):
        taps = CachedTaps.stack([b[0] for b in batch])
        placeholder = torch.zeros(())
        _, targets = task_collate([(placeholder, b[1]) for b in batch])
        return taps, targets

    return collate
