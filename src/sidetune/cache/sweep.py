"""``sweep``: train every combination of a grid in one pass over a tap cache, pick the best on validation.

Each batch of taps is read once and feeds every configuration's side network and head, so a grid costs the
side networks' compute and one read of the cache, never a backbone forward. Every configuration trains exactly as
its own ``fit(..., cache=)`` run would: its model is initialised from the run's seed, it has its own AdamW,
schedule and random stream (dropout), and it sees the same batches in the same order. The best configuration on
the validation split (the task's headline) is scored once on the test split.

```
OUTPUT/
  sweep.json, sweep.csv, sweep.md, sweep.png     every configuration: settings, best validation score, epoch...
  configs/<k>/log.jsonl, configs/<k>/best/        each configuration's log and best adapter
  best/                                           the chosen configuration's adapter (sidetune eval / predict)
```
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .store import CacheError, Manifest

logger = logging.getLogger(__name__)

#: TrainConfig fields a grid may vary besides method and task options.
GRID_FIELDS = ("lr", "weight_decay", "min_lr", "warmup_epochs")


@dataclass
class SweepResult:
    """What :func:`sweep` returns: one record per configuration, the chosen one, its test metrics, timing."""

    output: Path
    configs: list[dict[str, Any]]
    best: int
    test: dict[str, Any] | None
    summary: dict[str, Any]


def parse_grid(text: str) -> list[Any]:
    """``"1e-3,3e-3"`` -> ``[0.001, 0.003]``; values that hold commas themselves are separated by ``|``."""
    from ..train.config import parse_value

    parts = text.split("|") if "|" in text else text.split(",")
    values = [parse_value(p) for p in parts if p.strip()]
    if not values:
        raise ConfigError(f"empty grid {text!r}.")
    return values


def expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a fixed order (the first key varies slowest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def config_from_cache(cache: str | Path, method: str, **overrides: Any):
    """The TrainConfig of a run on ``cache``: backbone, weights, size, task, data settings, transforms and
    precision come from its manifest; ``overrides`` set the rest (epochs, batch_size, lr...)."""
    from ..train.config import TrainConfig

    manifest = Manifest.load(cache)
    values = dict(
        backbone=manifest.backbone,
        method=method,
        task=manifest.task,
        weights=manifest.weights,
        img_size=manifest.img_size[0] if manifest.img_size[0] == manifest.img_size[1] else None,
        backbone_kwargs=dict(manifest.backbone_kwargs),
        augmentation=manifest.transform["augmentation"],
        mixed_precision=manifest.transform["precision"],
        cache=str(cache),
        **{k: v for k, v in manifest.data.items()},
    )
    if values["img_size"] is None:
        raise CacheError("sweeps over caches of non-square inputs are not supported; train with sidetune train.")
    # video: the frame settings the clips were cached with (a grid's task options come on top, and are checked)
    task_options = {**manifest.transform.get("frames", {}), **overrides.pop("task_options", {})}
    values.update(overrides, task_options=task_options)
    return TrainConfig(**values)


def sweep(
    cache: str | Path,
    method: str,
    grid: dict[str, list[Any]],
    output: str | Path,
    *,
    callback: Callable[[str, dict[str, Any]], None] | None = None,
    **settings: Any,
) -> SweepResult:
    """Train every configuration of ``grid`` on ``cache`` in one pass per epoch; choose on validation, test once.

    Args:
        cache: a complete tap cache (``sidetune cache build``) holding the taps ``method`` reads.
        method: the side method.
        grid: key -> values: ``lr``, ``weight_decay``, ``min_lr``, ``warmup_epochs``, any option of the method
            (``channel_rank``), or ``task.<option>`` for a task option (``task.label_smoothing``).
        output: the sweep's folder (must not hold a sweep).
        callback: ``callback(event, record)`` with ``start``, ``epoch`` (per configuration), ``end``.
        **settings: TrainConfig fields shared by every configuration (``epochs``, ``batch_size``, ``seed``...).

    Returns:
        A :class:`SweepResult`.

    Raises:
        CacheError, ConfigError: a stale or unfit cache, an unknown grid key, an occupied output.
    """
    from .. import create
    from ..tasks import make_task
    from ..train.inference import autocast_for
    from ..train.inputs import EpochSampler, SeededDataset
    from ..train.loop import EpochTotals, _seed_everything, epoch_record, evaluate_split
    from ..train.rundir import RunLock, save_adapter
    from ..train.setup import WarmupCosine, make_accelerator, param_groups, resolve_mixed_precision
    from .reader import check_cache, open_cache

    callback = callback or (lambda event, record: None)
    started = time.perf_counter()
    out = Path(output).expanduser()
    if (out / "sweep.json").exists():
        raise ConfigError(f"{str(out)!r} already holds a sweep; choose another --output.")
    points = expand(grid)
    if not points:
        raise ConfigError("the grid is empty.")
    configs = []
    for point in points:
        fields = {k: v for k, v in point.items() if k in GRID_FIELDS}
        task_options = {k[5:]: v for k, v in point.items() if k.startswith("task.")}
        method_options = {k: v for k, v in point.items() if k not in GRID_FIELDS and not k.startswith("task.")}
        overrides = dict(settings)
        overrides.update(fields)
        overrides["method_options"] = {**settings.get("method_options", {}), **method_options}
        overrides["task_options"] = {**settings.get("task_options", {}), **task_options}
        configs.append(config_from_cache(cache, method, output=str(out), **overrides))
    base = configs[0]
    if base.grad_accum != 1:
        raise ConfigError("sweeps take one micro-batch per optimizer step (--grad-accum 1).")
    on_cpu = base.cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(base.mixed_precision, on_cpu)
    lock = RunLock(out).acquire()
    try:
        accelerator = make_accelerator(precision, cpu=on_cpu, rng_types=[])
        device = accelerator.device
        task = make_task(base.task, base.task_options)
        classes = list(Manifest.load(cache).classes)
        models, tasks = [], []
        shared = None
        for config in configs:
            # each configuration starts from its own run's initialisation: built as fit() builds it (the backbone
            # first, from the seed), then made to read the one shared backbone (the same weights, checked)
            _seed_everything(config.seed)
            model = create(
                config.backbone, config.method, num_classes=len(classes), weights=config.weights,
                img_size=config.img_size, backbone_kwargs=config.backbone_kwargs or None,
                **task.model_kwargs(config), **config.method_options,
            ).to(device)  # fmt: skip
            if shared is None:
                shared = model.backbone
            else:
                _share_backbone(model, shared, models[0])
            check_cache(Manifest.load(cache), Path(cache), config, model, task, precision)
            models.append(model)
            tasks.append(make_task(config.task, config.task_options))
        data = open_cache(base, models[0], task, precision)
        keys = sorted({k for m in models for k in _keys(m)})
        for split in (data.train, data.val, data.test):
            if split is not None:
                split.keys = keys  # the union of what the configurations read, each batch read once
        for t in tasks:  # what each configuration's loss needs from the training split (class weights)
            t.prepare(data)
        train_set = SeededDataset(data.train, base.seed)
        sampler = EpochSampler(len(train_set), base.seed)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=base.batch_size, sampler=sampler, num_workers=base.workers,
            collate_fn=data.collate, drop_last=len(train_set) >= base.batch_size,
        )  # fmt: skip
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise ConfigError(f"the training split ({len(train_set)} samples) gives no batch of {base.batch_size}.")
        total = base.epochs * steps_per_epoch
        runs = []
        for k, (config, model) in enumerate(zip(configs, models, strict=True)):
            optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
            warmup = round(config.warmup_epochs * steps_per_epoch)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, WarmupCosine(warmup, total, config.min_lr / config.lr)
            )
            _seed_everything(config.seed)  # the dropout stream of a run that starts here
            folder = out / "configs" / f"{k:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            runs.append(
                {
                    "index": k,
                    "point": points[k],
                    "optimizer": optimizer,
                    "scheduler": scheduler,
                    "rng": torch.get_rng_state(),
                    "folder": folder,
                    "log": folder / "log.jsonl",
                    "best": None,
                    "best_epoch": None,
                    "history": [],
                    "train_seconds": 0.0,
                    "params": model.num_parameters(),
                }
            )
        callback("start", {"configs": len(configs), "steps": total, "epochs": base.epochs})
        step = 0
        for epoch in range(base.epochs):
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch)
            totals = [EpochTotals(device) for _ in runs]
            for batch in loader:
                batch = _to(batch, device)
                step += 1
                for run, config, model, t, total_k in zip(runs, configs, models, tasks, totals, strict=True):
                    tick = time.perf_counter()
                    torch.set_rng_state(run["rng"])  # this configuration's own random stream
                    model.train()
                    with autocast_for(precision, device):
                        output_ = t.step(model, batch)
                    if not torch.isfinite(output_.loss.detach()):
                        run["diverged"] = f"non-finite loss at step {step}"
                    else:
                        output_.loss.backward()
                        if config.clip_grad is not None:
                            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), config.clip_grad)
                        run["optimizer"].step()
                    run["optimizer"].zero_grad(set_to_none=True)
                    lr = run["scheduler"].get_last_lr()[0]
                    run["scheduler"].step()
                    run["rng"] = torch.get_rng_state()
                    total_k.add(output_)
                    with run["log"].open("a") as f:
                        f.write(json.dumps({"type": "step", "step": step, "epoch": epoch + 1, "lr": lr,
                                            "loss": _finite(float(output_.loss.detach()))}) + "\n")  # fmt: skip
                    run["train_seconds"] += time.perf_counter() - tick
            last = epoch + 1 == base.epochs
            for run, config, model, t, total_k in zip(runs, configs, models, tasks, totals, strict=True):
                record: dict[str, Any] = {"type": "epoch", "epoch": epoch + 1, "step": step}
                record.update(epoch_record(t, total_k.reduced(accelerator)))
                if data.val is not None and ((epoch + 1) % base.eval_every == 0 or last) and "diverged" not in run:
                    val = evaluate_split(t, model, data.val, classes, accelerator, _eval_batch(config, t),
                                         config.workers, collate=data.eval_collate)  # fmt: skip
                    record.update({f"val_{key}": v for key, v in val.items()})
                    score = t.score(val)
                    if score is not None and (run["best"] is None or score > run["best"]):
                        run["best"], run["best_epoch"] = score, epoch + 1
                        save_adapter(model, run["folder"] / "best", _info(t, config, classes, model, precision))
                run["history"].append(record)
                with run["log"].open("a") as f:
                    f.write(json.dumps(_finite(record)) + "\n")
                callback("epoch", {"config": run["index"], "point": run["point"], **record})
        for run, config, model, t in zip(runs, configs, models, tasks, strict=True):
            if run["best"] is None and "diverged" not in run:  # no validation: the last epoch is the run's result
                save_adapter(model, run["folder"] / "best", _info(t, config, classes, model, precision))
        scored = [r for r in runs if r["best"] is not None]
        if data.val is not None and not scored:
            raise ConfigError("no configuration produced a validation score (all diverged?); see configs/*/log.jsonl.")
        chosen = max(scored, key=lambda r: r["best"]) if scored else runs[0]
        best_dir = out / "best"
        if best_dir.exists():
            shutil.rmtree(best_dir)
        shutil.copytree(chosen["folder"] / "best", best_dir)
        test = None
        if data.test is not None:
            from ..train.loop import _load_trainable

            model = models[chosen["index"]]
            _load_trainable(model, best_dir)
            t = tasks[chosen["index"]]
            test = evaluate_split(t, model, data.test, classes, accelerator, _eval_batch(configs[0], t),
                                  configs[0].workers, collate=data.eval_collate)  # fmt: skip
        rows = [_row(r, task) for r in runs]
        summary = {
            "cache": str(cache),
            "method": method,
            "task": task.name,
            "grid": {k: list(v) for k, v in grid.items()},
            "settings": {k: v for k, v in dataclasses.asdict(base).items() if k not in grid and k != "output"},
            "headline": task.headline,
            "chosen": rows[chosen["index"]],
            "test": test,
            "configs": rows,
            "timing": {
                "wall_time_s": time.perf_counter() - started,
                "train_time_s_per_config": [round(r["train_seconds"], 3) for r in runs],
                "steps": step,
                "epochs": base.epochs,
            },
        }
        _write_outputs(out, summary, task)
        callback("end", summary)
        return SweepResult(output=out, configs=rows, best=chosen["index"], test=test, summary=summary)
    finally:
        lock.release()


def _share_backbone(model, shared, first) -> None:
    """Point ``model``'s side method at ``shared`` (the same frozen weights) and let its own copy go."""
    if model.config.backbone_fingerprint != first.config.backbone_fingerprint:
        raise CacheError("the configurations' backbones differ; a sweep shares one backbone.")
    model.method.backbone = shared


def _keys(model) -> list[str]:
    from .build import tap_spec

    return list(tap_spec(model, [model.config.method], {model.config.method: dict(model.config.method_config)}))


def _to(batch, device):
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)


def _eval_batch(config, task) -> int:
    return config.eval_batch_size or task.eval_batch_factor * config.batch_size


def _info(task, config, classes, model, precision) -> dict[str, Any]:
    from ..train.loop import _inference_info

    return _inference_info(task, config, classes, model, precision)


def _finite(value: Any) -> Any:
    from ..train.metrics import _finite as finite

    return finite(value)


def _row(run: dict[str, Any], task) -> dict[str, Any]:
    last = run["history"][-1] if run["history"] else {}
    return {
        "config": run["index"],
        **run["point"],
        f"best_val_{task.headline}": run["best"],
        "best_epoch": run["best_epoch"],
        "final_train_loss": last.get("train_loss"),
        "trainable_parameters": run["params"],
        "train_time_s": round(run["train_seconds"], 3),
        "diverged": run.get("diverged"),
    }


def _write_outputs(out: Path, summary: dict[str, Any], task) -> None:
    from ..train.rundir import write_json

    write_json(out / "sweep.json", summary)
    rows = summary["configs"]
    keys = list(rows[0])
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    headline = f"best_val_{task.headline}"
    lines = [
        f"# Sweep: {summary['method']} on {summary['cache']}",
        "",
        f"{len(rows)} configurations, {summary['timing']['epochs']} epochs each, one pass over the cache per epoch; "
        f"wall time {summary['timing']['wall_time_s']:.1f} s. Chosen on validation {task.headline}: configuration "
        f"{summary['chosen']['config']}"
        + (f"; test: {task.summary_line(summary['test'])}." if summary["test"] else "."),
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    for row in rows:
        mark = " **(chosen)**" if row["config"] == summary["chosen"]["config"] else ""
        cells = [_cell(row[k]) + (mark if k == headline else "") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(out / "sweep.png", rows, summary, headline)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _plot(path: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any], headline: str) -> None:
    """Validation headline against the learning rate (log scale), one line per setting of the other grid keys."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    others = [k for k in summary["grid"] if k != "lr"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in others), []).append(row)
    fig, ax = plt.subplots(figsize=(6, 4))
    x_key = "lr" if "lr" in summary["grid"] else "config"
    for key, members in groups.items():
        pts = [(m[x_key], m[headline]) for m in members if m[headline] is not None]
        if pts:
            label = ", ".join(f"{k}={v}" for k, v in zip(others, key, strict=True)) or summary["method"]
            ax.plot(*zip(*sorted(pts), strict=True), "o-", label=label)
    if x_key == "lr":
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(headline.replace("_", " "))
    ax.set_title(f"sweep of {summary['method']}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
