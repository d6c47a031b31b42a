"""Opening a tap cache for a run: every check that it holds the right features, then its splits as datasets.

A cache is refused, with what differs, when it is missing, incomplete, corrupt (a shard of another size than the
build wrote: checked before training, not when the test step first reads it), or stale: another backbone or
weights, another input size, taps the method needs but the cache lacks, other transforms, other data settings
(splits, validation fraction, seed, limits), or image files changed since the build. Features are never used
silently when they may be wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..data.check import DataWarning
from .build import DATA_FIELDS, file_change, sample_files, tap_spec, transform_spec
from .store import CachedSplit, CacheError, Manifest, cached_collate, check_shards


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def check_cache(manifest: Manifest, root: Path, config, model, task, precision: str) -> None:
    """Raise :class:`CacheError` naming every way ``manifest`` does not fit this run."""
    if not manifest.complete:
        raise CacheError(
            f"the cache at {str(root)!r} is incomplete (its build was interrupted); run the same `sidetune cache "
            "build` again to finish it."
        )
    mc = model.config
    problems = []
    if manifest.backbone != mc.backbone:
        problems.append(f"backbone {manifest.backbone!r} (this run: {mc.backbone!r})")
    if manifest.fingerprint != mc.backbone_fingerprint:
        random = " (a random backbone, weights 'none', is drawn from --seed: use the build's)" if not mc.weights else ""
        problems.append(
            f"backbone weights {manifest.weights!r} (fingerprint {manifest.fingerprint[:12]}...; this run's "
            f"{mc.weights!r}: {mc.backbone_fingerprint[:12]}...){random}"
        )
    if list(manifest.img_size) != list(mc.img_size):
        problems.append(f"input size {manifest.img_size} (this run: {list(mc.img_size)})")
    if manifest.task != task.name:
        problems.append(f"task {manifest.task!r} (this run: {task.name!r})")
    for field in DATA_FIELDS:
        if _plain(manifest.data.get(field)) != _plain(getattr(config, field)):
            problems.append(f"{field} {manifest.data.get(field)!r} (this run: {getattr(config, field)!r})")
    current = transform_spec(config, model, precision, manifest.transform.get("views", 1), task)
    for key, value in current.items():
        if key != "views" and _plain(manifest.transform.get(key)) != _plain(value):
            problems.append(f"transform {key} {manifest.transform.get(key)!r} (this run: {value!r})")
    if problems:
        raise CacheError(f"the cache at {str(root)!r} does not fit this run: " + "; ".join(problems) + ".")
    need = tap_spec(model, [mc.method], {mc.method: dict(mc.method_config)})
    missing, short = uncovered_taps(manifest.taps, need)
    if missing or short:
        what = []
        if missing:
            what.append(f"taps {', '.join(missing[:6])}{'...' if len(missing) > 6 else ''} are not cached")
        if short:
            what.append(f"taps {', '.join(short[:6])} hold only the leading tokens")
        raise CacheError(
            f"method {mc.method!r} reads what the cache at {str(root)!r} lacks: {'; '.join(what)} (the cache was "
            f"built for {', '.join(manifest.methods)}). Build a cache with "
            f"{_build_flags(model, mc.method, dict(mc.method_config))}"
            " (or with both)."
        )


def _build_flags(model, method: str, options: dict[str, Any]) -> str:
    """The ``cache build`` flags of a cache for ``method`` with ``options``: ``--methods``, and ``--opt`` for each
    option that changes what the method reads (``probe_blocks``, LoSA's ``blocks``)."""
    from ..errors import ConfigError
    from ..methods import get_method

    need = tap_spec(model, [method], {method: options})
    defaults = dataclasses.asdict(get_method(method).make_config())
    flags = [f"--methods {method}"]
    for key, value in options.items():
        if key not in defaults or _plain(value) == _plain(defaults[key]):
            continue
        try:
            matters = tap_spec(model, [method], {method: {k: v for k, v in options.items() if k != key}}) != need
        except ConfigError:  # the other options need this one
            matters = True
        if matters:
            shown = value if isinstance(value, str) else json.dumps(_plain(value), separators=(",", ":"))
            flags.append(f"--opt {method}.{key}={shown}")
    return " ".join(flags)


def uncovered_taps(have: dict[str, int | None], need: dict[str, int | None]) -> tuple[list[str], list[str]]:
    """What a cache holding ``have`` lacks of ``need`` (both tap -> leading tokens kept, None: all): the taps it does
    not hold, and those it holds too few tokens of."""
    missing = [k for k in need if k not in have]
    short = [
        k for k, tokens in need.items() if k in have and have[k] is not None and (tokens is None or have[k] < tokens)
    ]
    return missing, short


def _check_files(manifest: Manifest, root: Path, split: str, dataset) -> None:
    """The image (and mask, annotation) files of a split are those the cache was built from, unchanged."""
    saved = manifest.files.get(split)
    if saved is None:
        return
    now = sample_files(dataset)
    saved_paths = [f[0] for f in saved]
    if now != saved_paths:
        added = sorted(set(now) - set(saved_paths))
        removed = sorted(set(saved_paths) - set(now))
        raise CacheError(
            f"the {split} files of {manifest.data.get('data')!r} changed since the cache at {str(root)!r} was built "
            f"({len(added)} added, {len(removed)} removed; e.g. {(added or removed or ['order'])[0]}); rebuild it."
        )
    for facts in saved:
        change = file_change(facts, facts[0])
        if change:
            raise CacheError(f"the cache at {str(root)!r} is stale: {change}; rebuild it.")


def open_cache(config, model, task, precision: str):
    """The :class:`~sidetune.tasks.TaskData` of a run that trains from the cache ``config.cache``.

    Raises:
        CacheError: see the module docstring.
    """
    from ..tasks import TaskData

    root = Path(config.cache).expanduser()
    manifest = Manifest.load(root)
    check_cache(manifest, root, config, model, task, precision)
    data = task.build_data(config, model)  # the datasets as training would read them: the files to check
    keys = list(tap_spec(model, [model.config.method], {model.config.method: dict(model.config.method_config)}))
    splits = {}
    for split, dataset in (("train", data.train), ("val", data.val), ("test", data.test)):
        if dataset is None:
            splits[split] = None
            continue
        if split not in manifest.splits:
            raise CacheError(
                f"the cache at {str(root)!r} has no {split} split but this run uses one; build it with that split "
                "(--splits) or run without it."
            )
        _check_files(manifest, root, split, dataset)
        splits[split] = CachedSplit(root, split, manifest.splits[split], keys, manifest.classes, config.seed)
        splits[split].source = dataset  # the files' dataset: labels and masks to count (class weights, checks)
        if len(splits[split]) != len(dataset):
            raise CacheError(f"the cache's {split} split has {len(splits[split])} samples, the data {len(dataset)}.")
    check_shards(manifest, root, [split for split, cached in splits.items() if cached is not None])
    if list(manifest.classes) != list(data.classes):
        raise CacheError(f"the cache's classes {manifest.classes[:5]}... differ from the data's {data.classes[:5]}...")
    warnings = list(data.warnings)
    views = manifest.splits.get("train", {}).get("views", 1)
    if splits["train"] is not None and manifest.transform.get("seed") is not None and views < config.epochs:
        message = (
            f"the cache holds {views} view(s) of its random draws (augmentation, frame offsets) for {config.epochs} "
            f"epochs: epochs after the {views}th reuse earlier views where an uncached run draws new ones; build "
            f"with --views {config.epochs} to match it."
        )
        warnings.append(DataWarning("cache_views", message, "train").to_dict())
    return TaskData(
        splits["train"],
        splits["val"],
        splits["test"],
        list(data.classes),
        source=f"tap cache {root} of {data.source}",
        splits=data.splits,
        skipped=data.skipped,
        counts=data.counts,
        warnings=warnings,
        collate=cached_collate(task.collate),
        eval_collate=cached_collate(task.eval_collate),
    )


def cache_size(path: str | os.PathLike) -> dict[str, Any]:
    """Bytes of a cache, in all and per sample, per split (for ``sidetune bench`` and the docs)."""
    manifest = Manifest.load(path)
    samples = sum(s["samples"] * s["views"] for s in manifest.splits.values())
    return {"bytes": manifest.bytes, "samples": samples, "bytes_per_sample": manifest.bytes / max(1, samples)}
