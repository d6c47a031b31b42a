"""``build``: one pass of the frozen backbone over a dataset's splits, writing the taps the chosen methods read.

The samples are exactly those a training run with the same settings sees: the cache is built through the task's
own datasets and transforms (:meth:`sidetune.tasks.Task.build_data`) and the task turns each batch into the
backbone's input as the model would (:meth:`~sidetune.tasks.Task.cache_inputs`: classification images as they
are, segmentation's evaluation images resized as whole-image inference does, detection images normalised and
letterboxed with their boxes, video clips of T frames whose B*T frames the backbone runs on as an uncached video
model does, each clip's taps stored together as (T, ...)). Under ``torchrun`` / ``accelerate launch`` every
process writes its own shards and the main process writes the complete manifest after all are done.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..backbones import TapRequest
from ..errors import ConfigError
from .batch import tap_key
from .store import DTYPES, CacheError, Manifest, shard_damage, shard_name, write_shard

logger = logging.getLogger(__name__)

#: The TrainConfig fields that decide which samples a split holds (the cache records them; a run must match).
DATA_FIELDS = ("data", "layout", "train_split", "val_split", "test_split", "val_fraction", "split_seed",
               "train_limit", "val_limit", "num_classes")  # fmt: skip
#: Transform recipes that draw nothing at random: a cache of them serves runs of any seed.
DETERMINISTIC = ("vtab", "none")


def tap_spec(model, methods: Sequence[str], method_options: dict[str, dict[str, Any]] | None = None):
    """The union of what ``methods`` read from ``model``'s backbone: tap name -> leading tokens kept (None: all).

    Raises:
        ConfigError: an in-place method (its taps would change at every step) or an unknown method.
    """
    from ..factory import method_task
    from ..methods import get_method

    spec: dict[str, int | None] = {}
    backbone = model.backbone
    for name in methods:
        method_spec = get_method(name)
        if method_spec.kind != "side":
            raise ConfigError(
                f"method {name!r} changes the backbone (in-place), so its activations change at every step and "
                "cannot be cached; cache side methods only (sidetune methods: kind side)."
            )
        config = method_spec.make_config(**(method_options or {}).get(name, {}))
        module = method_spec.build(backbone, config, method_task(model.config.task))
        request: TapRequest = module.tap_request
        needs = {tap_key(kind, i): module.tap_tokens_of(kind, i) for kind in ("attn", "mlp", "out")
                 for i in sorted(getattr(request, kind))}  # fmt: skip
        if module.reads_final:
            needs["final"] = module.tap_tokens()
        for key, tokens in needs.items():
            have = spec.get(key, 0)
            spec[key] = None if tokens is None or have is None else max(have, tokens)
    return spec


def request_of(spec: dict[str, int | None]) -> TapRequest:
    groups: dict[str, set[int]] = {"attn": set(), "mlp": set(), "out": set()}
    for key in spec:
        if key != "final":
            kind, block = key.split(".")
            groups[kind].add(int(block))
    return TapRequest.of(**groups)


def sample_files(dataset: Dataset | None) -> list[str]:
    """Every file a dataset reads its samples from (images, masks, annotation files), in order, for staleness."""
    if dataset is None:
        return []
    indices: Sequence[int] = range(len(dataset))
    base = dataset
    while isinstance(base, Subset):
        indices = [base.indices[i] for i in indices]
        base = base.dataset
    files: list[str] = []
    if hasattr(base, "files_of"):  # video: a clip's file, or the frames of a frame folder
        for i in indices:
            files += [str(p) for p in base.files_of(i)]
    elif hasattr(base, "records"):  # detection: the image and its annotation file
        for i in indices:
            record = base.records[i]
            files += [str(record.image_path), str(record.source)]
    elif hasattr(base, "samples"):
        for i in indices:
            sample = base.samples[i]
            files += [str(p) for p in (sample if isinstance(sample, tuple | list) else (sample,)) if _is_path(p)]
    else:
        raise CacheError(f"cannot list the files of a {type(base).__name__}; a cache needs datasets read from disk.")
    return list(dict.fromkeys(files))


def _is_path(value: Any) -> bool:
    return isinstance(value, str | os.PathLike) and not isinstance(value, bool)


def file_facts(paths: Sequence[str]) -> list[list[Any]]:
    """``[path, size, mtime_ns, blake2b]`` of each file: what changes when a file is edited or replaced, and its
    content's digest, so that a dataset copied again (new modification times, same bytes) keeps its cache."""
    facts = []
    for path in paths:
        st = os.stat(path)
        facts.append([path, st.st_size, st.st_mtime_ns, file_digest(path)])
    return facts


def file_digest(path: str) -> str:
    """The BLAKE2b-128 digest of a file's bytes (hex)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def file_change(saved: Sequence[Any], path: str, now: Sequence[Any] | None = None) -> str | None:
    """How the file ``path`` differs from its ``saved`` facts (``[path, size, mtime_ns(, digest)]``), or None.

    The same size and modification time: unchanged (no read). Another modification time with the same size is
    settled by the digest when the manifest holds one (a copy or a checkout rewrites the time, not the bytes);
    manifests written before digests were recorded cannot tell, and count it as a change. ``now``: the file's
    facts when already taken (:func:`file_facts`), so that nothing is stat-ed or read twice.
    """
    if now is None:
        st = os.stat(path)
        now = [path, st.st_size, st.st_mtime_ns]
    size, mtime = saved[1], saved[2]
    if now[1] != size:
        return f"{path!r} changed size ({size} -> {now[1]} bytes)"
    if now[2] == mtime:
        return None
    if len(saved) > 3 and (now[3] if len(now) > 3 else file_digest(path)) == saved[3]:
        return None
    return f"{path!r} was modified since the build (another modification time" + (
        " and other content)" if len(saved) > 3 else "; this cache holds no content digests to compare)"
    )


def draws_at_random(config, task=None) -> bool:
    """Whether a run's training samples differ between epochs: random augmentation, or the ``task``'s own draws
    (video: random frame offsets)."""
    return config.augmentation not in DETERMINISTIC or (task is not None and task.cache_draws_at_random(config))


def transform_spec(config, model, precision: str, views: int, task=None) -> dict[str, Any]:
    """How the cached samples were made: the transform recipe, size, normalisation, precision, views, the seed when
    anything is drawn at random, and the ``task``'s own sampling settings (video: frames per clip, sampling)."""
    dc = model.data_config
    random = draws_at_random(config, task)
    spec = {
        "augmentation": config.augmentation,
        "img_size": list(model.config.img_size),
        "mean": list(dc["mean"]),
        "std": list(dc["std"]),
        "interpolation": dc.get("interpolation"),
        "precision": precision,
        "views": views,
        # random augmentation (or random frame offsets): the views are those of this seed's epochs
        "seed": config.seed if random else None,
    }
    if task is not None:
        spec.update(task.cache_settings(config))
    return spec


def build(
    config,
    methods: Sequence[str],
    output: str | os.PathLike,
    *,
    dtype: str = "float16",
    views: int = 1,
    splits: Sequence[str] = ("train", "val", "test"),
    batch_size: int = 32,
    shard_size: int = 256,
    method_options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Build (or finish building) a tap cache of the splits of ``config``'s data.

    Args:
        config: a :class:`~sidetune.train.TrainConfig` naming the backbone, weights, img_size, task, data, layout,
            splits, ``val_fraction``, seed, limits, ``augmentation`` and ``mixed_precision`` of the runs that will
            read the cache (``method`` is ignored: ``methods`` decides the taps).
        methods: side methods whose taps to store (the union).
        output: the cache folder. A cache with the same settings is resumed: shards that are missing or damaged
            (another size than the one recorded, a header that does not cover the file) are written, whole ones kept.
        dtype: ``float16`` (default), ``bfloat16`` or ``float32`` storage.
        views: augmented views per training image (1: the transforms of view 0 only; use more with random
            augmentation or video's random frame offsets). Evaluation splits have one view.
        splits: which of ``train``, ``val``, ``test`` to cache (those the data has).
        batch_size: images per backbone forward (video: clips, their frames in one forward).
        shard_size: samples per shard file.
        method_options: per method, its options (they may change what it reads).
        progress: ``progress(done, total)`` after every batch (samples of this process).

    Returns:
        The manifest (complete). A shard holds one (n, N, C) tensor per tap for n images, (n, T, N, C) for n clips.

    Raises:
        CacheError: no room on the disk, an existing cache built with other settings, an uncacheable setting.
        ConfigError: an in-place method, bad settings.
    """
    from .. import create
    from ..tasks import make_task
    from ..train.inputs import SeededDataset
    from ..train.setup import resolve_mixed_precision

    if dtype not in DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ConfigError(f"views must be an integer >= 1, got {views!r}.")
    if not methods:
        raise ConfigError("name the side methods whose taps to cache (e.g. --methods losa,e3va).")
    on_cpu = config.cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(config.mixed_precision, on_cpu)
    from accelerate import PartialState

    state = PartialState(cpu=on_cpu)
    rank, world = state.process_index, state.num_processes
    out = Path(output).expanduser()
    task = make_task(config.task, config.task_options)
    if views > 1 and not draws_at_random(config, task):
        raise ConfigError(
            f"--views {views} with the deterministic {config.augmentation!r} transform would cache {views} identical "
            "copies of every training image: use --views 1, or a random --augmentation (e.g. standard) for views "
            "that differ."
        )
    options = dict(method_options or {})
    if config.method in methods:
        options.setdefault(config.method, dict(config.method_options))
    if config.data is None:
        raise ConfigError("a cache is built from data on disk: set --data.")
    classes = task.scan_classes(config)
    torch.manual_seed(config.seed)  # a random backbone (tests) is the one fit() builds from the same seed
    model = create(
        config.backbone,
        methods[0],
        num_classes=len(classes),
        weights=config.weights,
        img_size=config.img_size,
        backbone_kwargs=config.backbone_kwargs or None,
        **task.model_kwargs(config),
        **options.get(methods[0], {}),
    ).to(state.device)
    model.eval()
    task.check_cacheable(config)
    spec = tap_spec(model, methods, options)
    data = task.build_data(config, model)
    datasets = {"train": data.train, "val": data.val, "test": data.test}
    chosen = [s for s in splits if datasets.get(s) is not None]
    if not chosen:
        raise CacheError(f"none of the splits {list(splits)} exists in {config.data}.")
    manifest = Manifest(
        backbone=config.backbone,
        weights=model.config.weights,
        fingerprint=model.config.backbone_fingerprint,
        img_size=list(model.config.img_size),
        backbone_kwargs=dict(config.backbone_kwargs),
        task=task.name,
        methods=list(methods),
        taps=spec,
        dtype=dtype,
        transform=transform_spec(config, model, precision, views, task),
        data={f: getattr(config, f) for f in DATA_FIELDS},
        classes=list(data.classes),
        files={s: file_facts(sample_files(datasets[s])) for s in chosen},
        shard_size=shard_size,
        sidetune_version=model.config.sidetune_version,
    )
    recorded: dict[str, int] = {}  # shard -> its size, as the earlier build of a complete cache wrote it
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        recorded = _check_resumable(out, manifest)
    state.wait_for_everyone()

    # the size it will take, from one sample's taps, before writing anything
    split_views = {s: (views if s == "train" else 1) for s in chosen}
    total = sum(len(datasets[s]) * split_views[s] for s in chosen)
    first_collate = task.collate if chosen[0] == "train" else task.eval_collate
    per_sample = _bytes_per_sample(
        task, model, datasets[chosen[0]], first_collate, spec, dtype, state.device, precision
    )
    needed = per_sample * total
    free = shutil.disk_usage(out).free
    logger.info("cache %s: %d samples, about %.1f MiB (%.2f MiB each)", out, total, needed / 2**20, per_sample / 2**20)
    if state.is_main_process and needed * 1.05 > free:
        raise CacheError(
            f"the cache needs about {needed / 2**30:.2f} GiB ({total} samples x {per_sample / 2**20:.2f} MiB) but "
            f"{free / 2**30:.2f} GiB are free on the disk holding {str(out)!r}; free some space, cache fewer splits "
            "(--splits), fewer --views, or fewer methods' taps."
        )
    manifest.bytes = 0

    request = request_of(spec)
    store_dtype = DTYPES[dtype]
    jobs = []  # (split, view, shard index, start, count)
    for split in chosen:
        n = len(datasets[split])
        for view in range(split_views[split]):
            for k in range(math.ceil(n / shard_size)):
                jobs.append((split, view, k, k * shard_size, min(shard_size, n - k * shard_size)))
    if state.is_main_process:
        _remove_damaged_shards(out, jobs, recorded)
    state.wait_for_everyone()
    mine = [job for i, job in enumerate(jobs) if i % world == rank]
    done_samples, my_total = 0, sum(job[4] for job in mine)
    started = time.perf_counter()
    for split, view, k, start, count in mine:
        path = out / shard_name(split, view, k)
        if path.is_file():  # written by an earlier build (damaged ones were removed above)
            done_samples += count
            continue
        source: Dataset = datasets[split]
        if split == "train":
            source = SeededDataset(source, config.seed)
            source.set_epoch(view)  # view v: the augmentation an uncached run draws in epoch v
        collate = task.collate if split == "train" else task.eval_collate
        loader = DataLoader(
            Subset(source, range(start, start + count)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=config.workers,
            collate_fn=collate,
        )
        taps_parts: dict[str, list[torch.Tensor]] = {key: [] for key in spec}
        targets: list[Any] = []
        metas: list[dict[str, Any]] = []
        for batch in loader:
            x, batch_targets, batch_meta = task.cache_inputs(model, batch)
            for key, value in _run_backbone(model, x.to(state.device), request, spec, precision).items():
                taps_parts[key].append(value.to(store_dtype).cpu())
            targets += batch_targets
            metas += batch_meta
            done_samples += len(batch_targets)
            if progress is not None:
                progress(done_samples, my_total)
        try:
            write_shard(path, {k: torch.cat(v) for k, v in taps_parts.items()}, targets, metas)
        except OSError as err:
            import errno

            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            free = shutil.disk_usage(out).free
            raise CacheError(
                f"the disk filled up while writing {path.name}: the cache needs about {needed / 2**30:.2f} GiB in all, "
                f"{free / 2**30:.2f} GiB are free now. The partial shard was removed and the manifest stays "
                "incomplete: free some space and run the same build again to resume."
            ) from None
    logger.info("cache %s: this process wrote its shards in %.1f s", out, time.perf_counter() - started)
    state.wait_for_everyone()

    if state.is_main_process:
        for split in chosen:
            shards = []
            for view in range(split_views[split]):
                n = len(datasets[split])
                for k in range(math.ceil(n / shard_size)):
                    name = shard_name(split, view, k)
                    if not (out / name).is_file():
                        raise CacheError(f"cache {out}: shard {name} is missing after the build; run it again.")
                    size = (out / name).stat().st_size
                    shards.append({"file": name, "start": k * shard_size, "count": min(shard_size, n - k * shard_size),
                                   "view": view, "bytes": size})  # fmt: skip
                    manifest.bytes += size
            manifest.splits[split] = {"samples": len(datasets[split]), "views": split_views[split], "shards": shards}
        manifest.complete = True
        manifest.save(out)
    state.wait_for_everyone()
    return manifest


def _check_resumable(out: Path, manifest: Manifest) -> dict[str, int]:
    """Resume an interrupted build with the same settings; refuse a folder that holds another cache.

    Returns:
        shard file -> size in bytes, as the manifest there records them (a complete cache of this version; else
        empty), read before this build's incomplete manifest replaces it.
    """
    from .store import MANIFEST

    if not (out / MANIFEST).is_file():
        if any(out.glob("*.safetensors")):
            raise CacheError(f"{str(out)!r} holds shard files but no manifest; give an empty folder or remove them.")
        manifest.save(out)  # incomplete: marks the folder as a cache being built with these settings
        return {}
    old = Manifest.load(out)
    fields = ("backbone", "fingerprint", "img_size", "backbone_kwargs", "task", "taps", "dtype", "transform", "data",
              "shard_size")  # fmt: skip
    differ = [f for f in fields if _plain(getattr(old, f)) != _plain(getattr(manifest, f))]
    detail = _first_file_change(old.files, manifest.files)
    if detail:
        differ.append("files")
    if differ:
        raise CacheError(
            f"{str(out)!r} already holds a cache built with other settings ({', '.join(differ)} differ{detail}); "
            "build into another folder, or delete this one."
        )
    if old.complete:
        logger.info("cache %s is already complete; rewriting its manifest and any damaged shard only", out)
    manifest.save(out)
    return {s["file"]: int(s["bytes"]) for info in old.splits.values() for s in info["shards"] if "bytes" in s}


def _remove_damaged_shards(out: Path, jobs: list[tuple[str, int, int, int, int]], recorded: dict[str, int]) -> None:
    """Remove the shards of ``jobs`` an earlier build left damaged, so that this one writes them again: a size other
    than the one ``recorded``, or a safetensors header that does not cover the file or lists another sample count
    (:func:`~sidetune.cache.store.shard_damage`). A file that exists is whole when the build renamed it into place;
    it is damaged later (a disk that filled during a copy, ``truncate``, a partial download)."""
    for split, view, k, _, count in jobs:
        path = out / shard_name(split, view, k)
        if not path.is_file():
            continue
        problem = shard_damage(path, recorded[path.name]) if path.name in recorded else None
        problem = problem or shard_damage(path, None, count)
        if problem:
            logger.warning("cache %s: shard %s is damaged (%s); writing it again", out, path.name, problem)
            path.unlink()


def _first_file_change(old: dict[str, list], new: dict[str, list]) -> str:
    """``': train/a.jpg changed size'``: the first data file that is not the one the build started from ('' if
    none; a file copied again with the same bytes is the same file, see :func:`file_change`)."""
    for split in sorted(set(old) | set(new)):
        before, after = old.get(split, []), new.get(split, [])
        if len(before) != len(after):
            return f": {split} had {len(before)} files, now {len(after)}"
        for saved, now in zip(before, after, strict=True):
            if saved[0] != now[0]:
                return f": {split} file {saved[0]!r} is now {now[0]!r}"
            change = file_change(saved, now[0], now)  # the new manifest's facts: digests already taken
            if change:
                return f": {change}"
    return ""


def _plain(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


@torch.no_grad()
def _run_backbone(model, x: torch.Tensor, request: TapRequest, spec: dict[str, int | None], precision: str):
    """The taps of ``spec`` for a batch of backbone inputs, cut to the tokens kept.

    Video clips ``(B, T, 3, H, W)`` run as ``B*T`` frames, as uncached, ``model.frame_chunk`` frames per backbone
    forward when it is set (the ``frame_chunk`` task option: it bounds the forward's memory), and each clip's taps
    are stored together, ``(B, T, ...)``.
    """
    from ..train.inference import autocast_for

    clip_frames = x.shape[1] if x.ndim == 5 else None
    frames = x.flatten(0, 1) if clip_frames else x
    chunk = (getattr(model, "frame_chunk", None) if clip_frames else None) or len(frames)
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in spec}
    for start in range(0, len(frames), chunk):
        with autocast_for(precision, x.device):
            taps = model.backbone(frames[start : start + chunk], request)
        for key, tokens in spec.items():
            if key == "final":
                value = taps.final  # in the backbone's own layout (a CNN's map stays a map)
            else:
                kind, block = key.split(".")
                value = getattr(taps, kind)[int(block)]
            parts[key].append(value[:, :tokens] if tokens is not None and value.ndim == 3 else value)
    out = {key: values[0] if len(values) == 1 else torch.cat(values) for key, values in parts.items()}
    # a clip's frames are consecutive (clip-major): (B*T, ...) -> (B, T, ...)
    return {key: value.unflatten(0, (-1, clip_frames)) for key, value in out.items()} if clip_frames else out


def _bytes_per_sample(task, model, dataset, collate, spec, dtype, device, precision) -> int:
    x, targets, _ = task.cache_inputs(model, collate([dataset[0]]))
    taps = _run_backbone(model, x.to(device), request_of(spec), spec, precision)
    itemsize = DTYPES[dtype].itemsize
    target_bytes = sum((t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 8) for t in _flat(targets[0]))
    return sum(v[0].numel() * itemsize for v in taps.values()) + target_bytes + 64


def _flat(target: Any) -> list[Any]:
    return list(target.values()) if isinstance(target, dict) else [target]
