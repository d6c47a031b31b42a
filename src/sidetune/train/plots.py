"""Training curves of a run as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "", metric: str = "top1") -> Path:
    """Draw loss (per step, with a moving average), learning rate, and the task's headline metric per epoch.

    Args:
        records: the run's log records (:func:`sidetune.train.metrics.read_log`).
        path: PNG to write.
        title: figure title.
        metric: the headline metric (``top1``, ``mIoU``, ``bbox_mAP``): ``train_<metric>`` and ``val_<metric>``
            are drawn where the log has them.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    if steps:
        x = [r["step"] for r in steps]
        y = [r["loss"] for r in steps]
        ax.plot(x, y, lw=0.6, alpha=0.4, label="train loss (step)")
        window = max(1, len(y) // 25)
        smooth = [
            sum(y[max(0, i - window + 1) : i + 1]) / len(y[max(0, i - window + 1) : i + 1]) for i in range(len(y))
        ]
        ax.plot(x, smooth, lw=1.5, label=f"moving average ({window})")
    val = [r for r in epochs if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    if steps:
        ax.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    ax.set_xlabel("optimizer step")
    ax.set_title("learning rate")
    ax = axes[2]
    curves = [(f"train_{metric}", f"train {metric}"), (f"val_{metric}", f"val {metric}")]
    if metric == "top1":
        curves.append(("val_mean_class_acc", "val mean class acc"))
    values = []
    for key, label in curves:
        pts = [(r["epoch"], r[key]) for r in epochs if isinstance(r.get(key), int | float)]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=label)
            values += [v for _, v in pts]
    ax.set_xlabel("epoch")
    if values and all(0 <= v <= 1 for v in values):
        ax.set_ylim(0, 1)
    ax.set_title(metric)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
