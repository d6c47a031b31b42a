"""``sidetune demo``: adapt frozen backbones to a real dataset that ships with scikit-learn, offline.

The data are scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), upsampled to 32x32 and
split 1,297 / 500 (stratified, seeded); about 200 AdamW steps of 32 images (whole epochs) per method by
default, through the library's own training loop (:func:`sidetune.train.fit`). The methods are linear
probing, LoSA, E3VA and LoRA (which back-propagates through the backbone). The backbones are small
random-initialised timm ViT and Swin configs: nothing is downloaded, and a side network that learns on a
random frozen backbone shows the mechanics (trainable parameters, gradient isolation, speed) without
pretrained weights. It ends with a short ``sidetune bench`` of the demo's ViT (parameters, bytes saved for
backward, step time, ratios to full fine-tuning and to the floor). Under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .errors import SidetuneError
from .methods import get_method

DEMO_BACKBONES: dict[str, tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=64, depth=4, num_heads=2)),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4),
    ),
}
DEMO_METHODS = ("linear", "losa", "e3va", "lora")
IMG_SIZE = 32


@dataclass
class DemoResult:
    backbone: str
    method: str
    trainable: int
    train_acc: float
    test_acc: float
    ms_per_step: float
    steps: int = 0


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as (N, 3, 32, 32) float images normalised to mean 0 / std 1, and labels; train and test."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:  # pragma: no cover - the demo extra installs it
        raise RuntimeError("the demo needs scikit-learn: pip install 'sidetune[demo]'") from err
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in range(10):  # 50 test images per class
        idx = (y == c).nonzero().flatten()
        test_idx.append(idx[torch.randperm(len(idx), generator=g)[:50]])
    test = torch.cat(test_idx)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test] = False
    return x[mask], y[mask], x[test], y[test]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch)
    )
    return correct / len(x)


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)  # the training loader drops the last, partial batch


def train_one(
    backbone: str,
    method: str,
    data: tuple[torch.Tensor, ...],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> DemoResult:
    """Train one method on the digits with :func:`sidetune.train.fit` for about ``steps`` AdamW steps.

    Whole epochs are run (``round(steps / steps_per_epoch)``, at least one), with a warm-up of 10% and a
    cosine decay; the run directory is a temporary folder.
    """
    from .train import TrainConfig, fit

    x_train, y_train, x_test, y_test = data
    name, kwargs = DEMO_BACKBONES[backbone]
    epochs = max(1, round(steps / _steps_per_epoch(len(x_train), batch_size)))
    with tempfile.TemporaryDirectory(prefix="sidetune-demo-") as tmp:
        config = TrainConfig(
            backbone=name,
            method=method,
            img_size=IMG_SIZE,
            backbone_kwargs=kwargs,
            num_classes=10,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=1e-4,
            warmup_epochs=0.1 * epochs,
            workers=0,
            seed=seed,
            cpu=True,
            output=str(Path(tmp) / "run"),
        )
        result = fit(config, train_dataset=TensorDataset(x_train, y_train), test_dataset=TensorDataset(x_test, y_test))
    model, timing = result.model, result.summary["timing"]
    return DemoResult(
        backbone=f"{backbone} ({name}, random init)",
        method=method,
        trainable=model.num_parameters(),
        train_acc=result.summary["metrics"]["final_train"]["top1"],  # running accuracy of the last epoch
        test_acc=result.summary["metrics"]["test"]["top1"],
        ms_per_step=1000 * timing["median_step_time_s"],
        steps=timing["steps"],
    )


def format_table(results: list[DemoResult]) -> str:
    rows = [("backbone", "method", "trainable", "train acc", "test acc", "ms/step")]
    rows += [
        (r.backbone, r.method, f"{r.trainable:,}", f"{r.train_acc:.1%}", f"{r.test_acc:.1%}", f"{r.ms_per_step:.1f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(
    steps: int = 200,
    backbones: tuple[str, ...] = tuple(DEMO_BACKBONES),
    methods: tuple[str, ...] = DEMO_METHODS,
    log=print,
    bench: bool = True,
    bench_options: dict | None = None,
) -> list[DemoResult]:
    """Train every method on every demo backbone and report the table through ``log``; then, with ``bench``,
    a short ``sidetune bench`` of the demo's ViT (:func:`demo_bench`, called with
    ``bench_options``): parameters, bytes saved for backward and step time of full fine-tuning, LoRA, linear,
    LoSA and E3VA side by side.

    A method that is not registered in this installation (``lora`` needs the in-place baselines) is skipped
    with a note.
    """
    available = []
    for method in methods:
        try:
            get_method(method)
            available.append(method)
        except SidetuneError:
            log(f"(method {method!r} is not available in this installation; skipped)")
    # Models this small gain little from a second thread on an idle machine and lose several times over on
    # a busy one (the threads spin while waiting for each other), so the demo runs on one.
    torch.set_num_threads(1)
    data = load_digits()
    log(f"digits: {len(data[0])} train / {len(data[2])} test images, 10 classes, {IMG_SIZE}x{IMG_SIZE}; {steps} steps")
    results = []
    for backbone in backbones:
        for method in available:
            r = train_one(backbone, method, data, steps)
            log(
                f"  {backbone:>4} {method:<8} test acc {r.test_acc:.1%}  ({r.ms_per_step:.1f} ms/step, {r.steps} steps)"
            )
            results.append(r)
    log("")
    log(format_table(results))
    log(
        "\nThe backbones are random, so absolute accuracy mostly measures the side network. E3VA reads the\n"
        "attention- and MLP-branch outputs, which a randomly initialised timm model keeps ~30x smaller than its\n"
        "block outputs (LoSA reads the block outputs, through LayerNorms); with pretrained weights see\n"
        "docs/classification.md."
    )
    if bench:
        demo_bench(log=log, **(bench_options or {}))
    return results


DEMO_BENCH_METHODS = ("full", "lora", "linear", "losa", "e3va")


def demo_bench(
    log: Callable[[str], None] = print,
    out: str | None = None,
    *,
    methods: tuple[str, ...] = DEMO_BENCH_METHODS,
    batch_size: int = 16,
    warmup: int = 1,
    rounds: int = 5,
    peak_memory: bool = False,
) -> Any:
    """The short bench that ``sidetune demo`` ends with: ``profile`` of the demo's ViT (its model config, at the
    demo's image size) for each of ``methods`` that is registered, on this machine, one thread.

    The peak-memory probe (a fresh process per row, seconds each) is off by default: the table's bytes saved
    for backward are the deterministic memory figure. Steps are timed on the CPU-time clock of the one thread,
    which other load on the machine does not inflate (the same as wall time on an idle machine). ``out`` also
    writes ``demo_bench.{md,csv,json}`` there.
    Returns the report.
    """
    from .bench.profile import BenchConfig, profile
    from .bench.report import terminal_table, write_report
    from .methods import list_methods

    name, kwargs = DEMO_BACKBONES["vit"]
    known = {m["name"] for m in list_methods()}
    methods = tuple(m for m in methods if m in known)
    config = BenchConfig(
        backbone=name,
        backbone_kwargs=kwargs,
        methods=methods,
        img_size=IMG_SIZE,
        batch_size=batch_size,
        warmup=warmup,
        rounds=rounds,
        peak_memory=peak_memory,
        threads=1,  # as the demo's training: tiny models gain nothing from a second thread
        clock="cpu",
    )
    size = f"{IMG_SIZE}x{IMG_SIZE}"
    words = ["sidetune", "bench", "--backbone", name, "--backbone-kwargs", json.dumps(kwargs), "--img-size"]
    words += [str(IMG_SIZE), "--batch-size", str(batch_size), "--methods", ",".join(methods), "--threads", "1"]
    words += ["--clock", "cpu"]
    words += ["--warmup", str(warmup), "--rounds", str(rounds)] + ([] if peak_memory else ["--no-peak"])
    command = shlex.join(words)  # the same table from the command line
    log(f"\nsidetune bench on the demo ViT ({', '.join(methods)}; batch {batch_size}, {size}, this machine):\n")
    report = profile(config, log=lambda _: None, command=command)
    log(terminal_table(report))
    for note in report.notes:
        log(f"note: {note}")
    if out:
        write_report(report, out, "demo_bench", plots=False)
    log(
        "\nHow to read it: every row trains the same batch. `saved for bwd` is what autograd keeps for the "
        "backward pass:\nthe side methods (linear, losa, e3va) never back-propagate into the frozen backbone, so "
        "they keep a fraction of\nfull fine-tuning's (`x full saved`); `x full time` compares step times and "
        "`x floor` divides a step by the least\nit can cost (the frozen forward plus the side network's own step). "
        "On a model this small fixed overheads\ndominate the times; measure your own model at its real size "
        "(peak memory, plots, CSV/JSON under runs/bench):\n"
        f"  sidetune bench --backbone vit_base_patch16_224 --methods {','.join(DEMO_BENCH_METHODS)} "
        "--img-size 224 --batch-size 8\n"
        "(docs/bench.md explains every column; the largest batch within a budget: sidetune plan --budget 11GB ...).\n"
        f"This table again: {command}"
    )
    return report
