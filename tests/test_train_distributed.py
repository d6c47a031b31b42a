"""The training entry point under ``torchrun --nproc_per_node 2`` on the CPU (gloo): ranks agree, DDP is exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sidetune.train import fit
from train_data import IMG, config, make_image_folder, step_losses


def torchrun() -> str:
    found = Path(sys.executable).parent / "torchrun"
    if found.exists():
        return str(found)
    path = shutil.which("torchrun")
    if path is None:
        pytest.skip("torchrun is not installed")
    return path


@pytest.mark.slow
def test_two_cpu_processes_train_the_same_model_as_one_with_the_global_batch(tmp_path):
    data = make_image_folder(tmp_path / "images")
    out = tmp_path / "ddp"
    command = [
        torchrun(),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sidetune.cli",
        "train",
        "test_vit",
        "losa",
        "--data",
        str(data),
        "--img-size",
        str(IMG),
        "--epochs",
        "2",
        "--batch-size",
        "3",
        "--warmup-epochs",
        "0.5",
        "--lr",
        "0.01",
        "--workers",
        "0",
        "--val-fraction",
        "0.34",
        "--output",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    checksums = summary["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1] and summary["ranks_in_sync"]
    assert summary["timing"]["steps_per_epoch"] == 2  # 12 images, 3 per process per step, 2 processes
    assert summary["metrics"]["test"]["count"] == 6  # the padding of the last shard is not counted twice
    assert summary["metrics"]["final_val"]["count"] == 6
    assert proc.stdout.count("best val top1") == 1  # only the main process prints

    # DDP averages the two ranks' gradients: the same steps as one process with the global batch of 6
    single = tmp_path / "single"
    torch.set_num_threads(1)
    fit(config(data, single, method="losa", batch_size=6, val_fraction=0.34))
    assert step_losses(out) == pytest.approx(step_losses(single), rel=1e-5)
    # the trained models agree on every image. (Their tensors need not: AdamW turns the float noise of a
    # gradient that is zero in exact arithmetic, e.g. a bias that a following norm cancels, into steps of +-lr.)
    reference = json.loads((single / "summary.json").read_text())["metrics"]
    for split in ("test", "final_val"):
        assert summary["metrics"][split]["loss"] == pytest.approx(reference[split]["loss"], rel=1e-5)
        assert summary["metrics"][split]["top1"] == reference[split]["top1"]


@pytest.mark.slow
def test_two_cpu_processes_train_segmentation_as_one_with_the_global_batch(tmp_path):
    """The dense tasks run the same loop: DDP training and validation spread over the processes (each scores its
    own shard; the confusion matrices merge), equal to one process with the global batch."""
    from train_data import SWIN, make_camvid, task_config

    from conftest import SWIN_TINY

    data = make_camvid(tmp_path / "camvid", counts=(("train", 8), ("val", 3)))
    out = tmp_path / "ddp"
    swin = [f"--backbone-opt=embed_dim={SWIN_TINY['embed_dim']}", "--backbone-opt=depths=1,1,2,1",
            "--backbone-opt=num_heads=1,1,2,2", "--backbone-opt=window_size=4"]  # fmt: skip
    opts = ["--head-opt", "channels=16", "--head-opt", "dropout=0", "--augmentation", "none", "--lr", "0.005"]
    command = [torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "sidetune.cli", "train", SWIN, "e3va",
               "--task", "segmentation", "--data", str(data), "--img-size", "64", "--epochs", "2", "--batch-size",
               "2", "--warmup-epochs", "0.5", "--output", str(out), "--no-progress", *opts, *swin]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_in_sync"]
    assert summary["metrics"]["final_val"]["count"] == 3  # 2 + 1 images on the two shards, none twice

    single = tmp_path / "single"
    torch.set_num_threads(1)
    head = {"channels": 16, "dropout": 0.0}
    fit(task_config("segmentation", data, single, batch_size=4, lr=0.005, augmentation="none", head_options=head))
    assert step_losses(out) == pytest.approx(step_losses(single), rel=1e-4)
    reference = json.loads((single / "summary.json").read_text())["metrics"]["final_val"]
    for key in ("mIoU", "aAcc"):
        assert summary["metrics"]["final_val"][key] == pytest.approx(reference[key], abs=1e-3)
    assert summary["metrics"]["final_val"]["pixels"] == reference["pixels"]  # every pixel counted once
