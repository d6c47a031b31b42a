"""``sweep``: train every combination of a grid in one pass over a tap cache, pick the best on validation.

Each batch of taps is read once and feeds every configuration's side network and head, so a grid costs the
side networks' compute and one read of the cache, never a backbone forward. Every configuration trains exactly as
its own ``fit(..., cache=)`` run would: its model is initialised from the run's seed, it has its own AdamW,
schedule and random stream (dropout), and it sees the same batches in the same order. The best configuration on
the validation split (the task's headline) is scored once on the test split.

With ``halving=ETA`` the grid is searched by synchronous successive halving (Jamieson & Talwalkar, AISTATS 2016)
on the rung schedule of Hyperband (Li et al., JMLR 2018): every configuration trains on a small share of the
budget, the best 1/ETA on validation go on, the rest stop (:func:`rung_steps`). A configuration that goes on trains
exactly as in the exhaustive sweep, so the survivor's steps are those of its own run.

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
import math
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
GRID_FIELDS = ("lr", "head_lr_mult", "weight_decay", "min_lr", "warmup_epochs")


@dataclass
class SweepResult:
    """What :func:`sweep` returns: one record per configuration, the chosen one, its test metrics, timing."""

    output: Path
    configs: list[dict[str, Any]]
    best: int
    test: dict[str, Any] | None
    summary: dict[str, Any]


def rung_steps(n: int, eta: int, total: int) -> list[int]:
    """The steps after which successive halving cuts ``n`` configurations that each have ``total`` steps.

    With ``R = ceil(log_eta(n))`` cuts (computed in integers: the smallest R with ``eta**R >= n``), cut ``i``
    (``i = 1..R``) comes after step ``round(total * eta**(i - R - 1))`` (rounded to nearest, halves up): each rung
    trains ``eta`` times longer than the one before and the last survivors train all ``total`` steps, as in
    Hyperband's bracket of ``n`` configurations (Li et al., JMLR 2018). ``n=9, eta=3``: cuts after T/9 and T/3; at a
    cut the best ``ceil(active / eta)`` go on (9 -> 3 -> 1).

    Each step is clamped to at least 1; a cut at or past ``total`` saves nothing and is dropped, and so is a cut at
    the step of the one before it (the schedule is strictly increasing): a short budget makes fewer cuts and leaves
    more configurations to train it whole.

    Args:
        n: configurations (>= 1).
        eta: the halving rate (>= 2).
        total: steps of the whole budget (epochs x steps per epoch, >= 1).

    Returns:
        The cut steps, strictly increasing, each in ``[1, total)``; empty for ``n = 1``.
    """
    if n < 1 or eta < 2 or total < 1:
        raise ValueError(f"rung_steps needs n >= 1, eta >= 2, total >= 1; got n={n}, eta={eta}, total={total}.")
    cuts = 0
    while eta**cuts < n:
        cuts += 1
    steps: list[int] = []
    for i in range(1, cuts + 1):
        d = eta ** (cuts + 1 - i)
        step = max(1, (2 * total + d) // (2 * d))  # round(total / d), halves up, in integers
        if step < total and (not steps or step > steps[-1]):
            steps.append(step)
    return steps


def halving_budget(n: int, eta: int, cuts: Sequence[int], total: int) -> int:
    """Side-network steps of a halving sweep when no configuration diverges: ``n`` train to the first cut, then
    ``ceil(n / eta)`` to the next, ..., and the last survivors to ``total`` (``n=9, eta=3``: 2.33 ``total``
    against the exhaustive grid's ``9 total``)."""
    active, spent, previous = n, 0, 0
    for step in cuts:
        spent += active * (step - previous)
        previous, active = step, math.ceil(active / eta)
    return spent + active * (total - previous)


def parse_grid(text: str) -> list[Any]:
    """``"1e-3,3e-3"`` -> ``[0.001, 0.003]``; values that hold commas themselves are separated by ``|``."""
    from ..train.config import parse_value

    parts = text.split("|") if "|" in text else text.split(",")
    values = [parse_value(p) for p in parts if p.strip()]
    if not values:
        raise ConfigError(f"empty grid {text!r}.")
    return values


def expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a fixed order (the first key varies slowest).

    Raises:
        ConfigError: a key repeats a value (``--lr 1e-3,1e-3``): the same configuration would train twice.
    """
    for key, values in grid.items():
        seen = [v for i, v in enumerate(values) if v in values[:i]]
        if seen:
            raise ConfigError(f"the grid repeats {key} {seen[0]!r} ({values}): give each value once.")
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
    halving: int | None = None,
    **settings: Any,
) -> SweepResult:
    """Train every configuration of ``grid`` on ``cache`` in one pass per epoch; choose on validation, test once.

    With ``halving=eta`` (successive halving; Jamieson & Talwalkar, AISTATS 2016) the configurations are cut after
    the steps of :func:`rung_steps`: at a cut every configuration still training is scored on the validation split
    (the task's headline, as at an epoch's end; its adapter is saved when the score is its best), the best
    ``ceil(active / eta)`` go on (ties: the lower index) and the rest stop: they take no more steps and no more
    evaluations, and keep their best adapter so far. A configuration whose loss turns non-finite stops at once and
    is never kept. Those that go on train exactly as in the exhaustive sweep (same batches, random stream and
    cosine schedule over the whole budget, which is not shortened). The choice is the best validation score among
    the configurations that trained the whole budget, never a stopped one's early score.

    Args:
        cache: a complete tap cache (``sidetune cache build``) holding the taps ``method`` reads.
        method: the side method.
        grid: key -> values: ``lr``, ``head_lr_mult``, ``weight_decay``, ``min_lr``, ``warmup_epochs``, any option
            of the method (``channel_rank``), or ``task.<option>`` for a task option (``task.label_smoothing``).
        output: the sweep's folder (must not hold a sweep, nor a ``sidetune train`` run).
        callback: ``callback(event, record)`` with ``start``, ``epoch`` (per configuration), ``cut`` (halving),
            ``end``.
        halving: the halving rate ``eta`` (an integer >= 2; 3 is usual), or None for the exhaustive grid. Needs a
            cache with a validation split.
        **settings: TrainConfig fields shared by every configuration (``epochs``, ``batch_size``, ``seed``...).

    Returns:
        A :class:`SweepResult`.

    Raises:
        CacheError, ConfigError: a stale or unfit cache, an unknown grid key, an occupied output, a halving rate
            below 2 or halving on a cache without a validation split.
    """
    from .. import create
    from ..tasks import make_task
    from ..train.inference import autocast_for
    from ..train.inputs import EpochSampler, SeededDataset
    from ..train.loop import EpochTotals, _seed_everything, epoch_record, evaluate_split
    from ..train.rundir import LOG, SWEEP, RunLock, save_adapter
    from ..train.setup import WarmupCosine, make_accelerator, make_optimizer, resolve_mixed_precision
    from .reader import check_cache, open_cache

    callback = callback or (lambda event, record: None)
    started = time.perf_counter()
    out = Path(output).expanduser()
    if (out / SWEEP).exists():
        raise ConfigError(f"{str(out)!r} already holds a sweep; choose another --output.")
    if (out / LOG).exists():
        raise ConfigError(
            f"{str(out)!r} holds a training run ({LOG}, with its adapter in best/); a sweep there would replace that "
            "best/: choose another --output."
        )
    points = expand(grid)
    if not points:
        raise ConfigError("the grid is empty.")
    if halving is not None:
        if isinstance(halving, bool) or not isinstance(halving, int) or halving < 2:
            raise ConfigError(
                f"halving={halving!r}: successive halving keeps 1/ETA of the configurations at each cut, so ETA must "
                "be an integer >= 2 (3 is usual); leave --halving out for the exhaustive grid."
            )
        splits = Manifest.load(cache).splits
        if "val" not in splits:
            raise ConfigError(
                f"--halving chooses which configurations go on by their validation score, and the cache {str(cache)!r}"
                f" has no validation split (it holds {', '.join(splits) or 'no split'}); build it with --val-fraction "
                "F (or from data with a validation split, --val-split), or sweep without --halving."
            )
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
            optimizer = make_optimizer(model, config)
            warmup = round(config.warmup_epochs * steps_per_epoch)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, WarmupCosine(warmup, total, config.min_lr / config.lr)
            )
            _seed_everything(config.seed)  # the dropout stream of a run that starts here
            folder = out / "configs" / f"{k:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            # a sweep interrupted in this folder left logs and adapters: this one starts them afresh
            (folder / "log.jsonl").unlink(missing_ok=True)
            if (folder / "best").exists():
                shutil.rmtree(folder / "best")
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
                    "active": True,  # halving: still training
                    "steps": 0,
                    "stopped_at_step": None,
                    "rung_scores": [],
                    "val": None,  # (step, metrics) of its last validation: a cut at an epoch's end is not rerun
                }
            )
        cuts = rung_steps(len(runs), halving, total) if halving is not None else []
        cut_log: list[dict[str, Any]] = []
        callback("start", {"configs": len(configs), "steps": total, "epochs": base.epochs, "halving": halving,
                           "cuts": cuts, "steps_per_epoch": steps_per_epoch})  # fmt: skip
        step = 0

        def at_epoch(at: int) -> float | int:
            """Where step ``at`` falls in epochs: an int at an epoch's end, else a fraction."""
            whole, rest = divmod(at, steps_per_epoch)
            return whole if rest == 0 else round(at / steps_per_epoch, 4)

        def validate(run: dict[str, Any], config, model, t) -> dict[str, Any]:
            """``run``'s validation metrics at this step (once per step); saves its adapter at a new best score."""
            if run["val"] is None or run["val"][0] != step:
                val = evaluate_split(t, model, data.val, classes, accelerator, _eval_batch(config, t),
                                     config.workers, collate=data.eval_collate)  # fmt: skip
                run["val"] = (step, val)
                score = t.score(val)
                if score is not None and (run["best"] is None or score > run["best"]):
                    run["best"], run["best_epoch"] = score, at_epoch(step)
                    save_adapter(model, run["folder"] / "best", _info(t, config, classes, model, precision))
            return run["val"][1]

        def cut(number: int, totals: list[EpochTotals]) -> None:
            """Successive halving's cut: score the active configurations on validation, keep the best 1/eta."""
            contenders = [k for k, run in enumerate(runs) if run["active"]]
            scores: dict[int, float | None] = {}
            metrics: dict[int, dict[str, Any]] = {}
            for k in contenders:
                metrics[k] = validate(runs[k], configs[k], models[k], tasks[k])
                scores[k] = tasks[k].score(metrics[k])
            # the best scores first, a configuration without a score last, ties to the lower index
            ranked = sorted(contenders, key=lambda k: (scores[k] is None, -(scores[k] or 0.0), k))
            kept = sorted(ranked[: math.ceil(len(contenders) / halving)])
            for k in contenders:
                run = runs[k]
                run["rung_scores"].append(scores[k])
                record: dict[str, Any] = {"type": "rung", "cut": number, "step": step, "epoch": at_epoch(step)}
                # the training part covers this epoch's steps so far: a stopped configuration's last train loss
                record.update(epoch_record(tasks[k], totals[k].reduced(accelerator)))
                record.update({f"val_{key}": v for key, v in metrics[k].items()})
                record["kept"] = k in kept
                if k not in kept:
                    run["active"], run["stopped_at_step"] = False, step
                run["history"].append(record)
                with run["log"].open("a") as f:
                    f.write(json.dumps(_finite(record)) + "\n")
            entry = {"cut": number, "step": step, "epoch": at_epoch(step), "active": len(contenders), "kept": kept,
                     "configs": contenders, "scores": [scores[k] for k in contenders]}  # fmt: skip
            cut_log.append(entry)
            callback("cut", entry)

        for epoch in range(base.epochs):
            if not any(run["active"] for run in runs):
                break  # halving: every configuration diverged
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch)
            totals = [EpochTotals(device) for _ in runs]
            for batch in loader:
                batch = _to(batch, device)
                step += 1
                for run, config, model, t, total_k in zip(runs, configs, models, tasks, totals, strict=True):
                    if not run["active"]:
                        continue  # stopped by halving: no forward
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
                    run["steps"] += 1
                    if halving is not None and "diverged" in run:
                        run["active"], run["stopped_at_step"] = False, step  # never kept, so stopped at once
                if len(cut_log) < len(cuts) and step == cuts[len(cut_log)]:
                    cut(len(cut_log) + 1, totals)
                if not any(run["active"] for run in runs):
                    break
            last = epoch + 1 == base.epochs
            for run, config, model, t, total_k in zip(runs, configs, models, tasks, totals, strict=True):
                if not run["active"]:
                    continue  # stopped by halving: no more epoch evaluations
                record: dict[str, Any] = {"type": "epoch", "epoch": epoch + 1, "step": step}
                record.update(epoch_record(t, total_k.reduced(accelerator)))
                if data.val is not None and ((epoch + 1) % base.eval_every == 0 or last) and "diverged" not in run:
                    val = validate(run, config, model, t)
                    record.update({f"val_{key}": v for key, v in val.items()})
                run["history"].append(record)
                with run["log"].open("a") as f:
                    f.write(json.dumps(_finite(record)) + "\n")
                callback("epoch", {"config": run["index"], "point": run["point"], **record})
        for run, config, model, t in zip(runs, configs, models, tasks, strict=True):
            if run["best"] is None and "diverged" not in run:  # no validation: the last epoch is the run's result
                save_adapter(model, run["folder"] / "best", _info(t, config, classes, model, precision))
        # halving: only a configuration that trained the whole budget can be chosen (a stopped one's score is early)
        finished = [r for r in runs if r["active"]]
        scored = [r for r in finished if r["best"] is not None]
        if data.val is not None and not scored:
            which = "configuration that trained the whole budget" if halving is not None else "configuration"
            raise ConfigError(f"no {which} produced a validation score (all diverged?); see configs/*/log.jsonl.")
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
        rows = [_row(r, task, steps_per_epoch if halving is not None else None) for r in runs]
        summary = {
            "cache": str(cache),
            "method": method,
            "task": task.name,
            "grid": {k: list(v) for k, v in grid.items()},
            "settings": {k: v for k, v in dataclasses.asdict(base).items() if k not in grid and k != "output"},
            "halving": {"eta": halving, "cuts": cut_log} if halving is not None else None,
            "headline": task.headline,
            "chosen": rows[chosen["index"]],
            "test": test,
            "configs": rows,
            "timing": {
                "wall_time_s": time.perf_counter() - started,
                "train_time_s_per_config": [round(r["train_seconds"], 3) for r in runs],
                "steps": step,
                "epochs": base.epochs,
                "steps_per_epoch": steps_per_epoch,
                "side_network_steps": sum(r["steps"] for r in runs),
                "exhaustive_side_network_steps": len(runs) * total,
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


def _row(run: dict[str, Any], task, steps_per_epoch: int | None) -> dict[str, Any]:
    """One configuration's record; ``steps_per_epoch`` (halving only) adds where it stopped and its rung scores."""
    last = run["history"][-1] if run["history"] else {}
    row = {
        "config": run["index"],
        **run["point"],
        f"best_val_{task.headline}": run["best"],
        "best_epoch": run["best_epoch"],
        "steps": run["steps"],
        "final_train_loss": last.get("train_loss"),
        "trainable_parameters": run["params"],
        "train_time_s": round(run["train_seconds"], 3),
        "diverged": run.get("diverged"),
    }
    if steps_per_epoch is not None:
        stopped = run["stopped_at_step"]
        row["stopped_at_step"] = stopped
        row["stopped_at_epoch"] = None if stopped is None else round(stopped / steps_per_epoch, 4)
        row["rung_scores"] = list(run["rung_scores"])
    return row


def _write_outputs(out: Path, summary: dict[str, Any], task) -> None:
    from ..train.rundir import SWEEP, write_json

    write_json(out / SWEEP, summary)  # the marker train and sweep check before writing into a folder
    rows = summary["configs"]
    keys = list(rows[0])
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        # a list (rung_scores) is one cell: its values separated by ';'
        writer.writerows(
            {k: ";".join("" if x is None else str(x) for x in v) if isinstance(v, list) else v for k, v in row.items()}
            for row in rows
        )
    headline = f"best_val_{task.headline}"
    timing, halving = summary["timing"], summary.get("halving")
    lines = [
        f"# Sweep: {summary['method']} on {summary['cache']}",
        "",
        f"{len(rows)} configurations, {'up to ' if halving else ''}{timing['epochs']} epochs "
        f"({timing['steps_per_epoch'] * timing['epochs']} steps) each, one pass over the cache per epoch; "
        f"wall time {timing['wall_time_s']:.1f} s. Chosen on validation {task.headline}: configuration "
        f"{summary['chosen']['config']}"
        + (f"; test: {task.summary_line(summary['test'])}." if summary["test"] else "."),
        "",
    ]
    if halving:
        cuts = "; ".join(
            f"after step {c['step']} (epoch {c['epoch']:g}) kept {len(c['kept'])} of {c['active']} "
            f"({', '.join(map(str, c['kept']))})"
            for c in halving["cuts"]
        )
        lines += [
            f"Successive halving, eta {halving['eta']}: {cuts or 'no cut (too few configurations or steps)'}. "
            f"Side-network steps: {timing['side_network_steps']} against {timing['exhaustive_side_network_steps']} "
            f"for the exhaustive grid ({timing['side_network_steps'] / timing['exhaustive_side_network_steps']:.2f}x)."
            f" The choice is among the configurations that trained all {timing['steps_per_epoch'] * timing['epochs']}"
            " steps; a stopped configuration's score is that of a shorter budget (`steps`), not comparable.",
            "",
        ]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        mark = " **(chosen)**" if row["config"] == summary["chosen"]["config"] else ""
        cells = [_cell(row[k]) + (mark if k == headline else "") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(out / "sweep.png", rows, summary, headline)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _plot(path: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any], headline: str) -> None:
    """Validation headline against the learning rate (log scale), one line per setting of the other grid keys.

    With halving, a line joins the configurations that trained the whole budget; a stopped configuration is a
    hollow marker at its best score before it stopped (a shorter budget's score).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    others = [k for k in summary["grid"] if k != "lr"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in others), []).append(row)
    fig, ax = plt.subplots(figsize=(6, 4))
    x_key = "lr" if "lr" in summary["grid"] else "config"
    any_stopped = False
    for i, (key, members) in enumerate(groups.items()):
        label = ", ".join(f"{k}={v}" for k, v in zip(others, key, strict=True)) or summary["method"]
        scored = [m for m in members if m[headline] is not None]
        done = sorted((m[x_key], m[headline]) for m in scored if m.get("stopped_at_step") is None)
        stopped = [(m[x_key], m[headline]) for m in scored if m.get("stopped_at_step") is not None]
        color = f"C{i % 10}"
        if done:
            ax.plot(*zip(*done, strict=True), "o-", color=color, label=label)
        if stopped:
            any_stopped = True
            ax.plot(*zip(*stopped, strict=True), "o", mfc="none", color=color, label=None if done else label)
    if any_stopped:
        ax.plot([], [], "o", mfc="none", color="gray", label="stopped by halving (shorter budget)")
    if x_key == "lr":
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(headline.replace("_", " "))
    title = f"sweep of {summary['method']}"
    if summary.get("halving"):
        title += f", successive halving (eta {summary['halving']['eta']})"
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
