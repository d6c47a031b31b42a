"""The one training loop, the same for every task: reproducible, resumable at any kill point, extensible by a new task.

Each guarantee is one test parametrised over the tasks (not a copy per task): the loop code is shared, so are its
tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sidetune import tasks as task_registry
from sidetune.errors import ConfigError
from sidetune.tasks import Evaluator, StepOutput, Task, TaskData
from sidetune.train import TrainingError, find_checkpoint, fit, read_log
from sidetune.train import checkpoint as checkpoint_module
from train_data import comparable_log, config, make_task_data, step_losses, task_config

TASKS = ("classification", "segmentation", "detection")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-data")
    return {task: make_task_data(task, root / task) for task in TASKS}


def crash_at(step: int):
    def callback(event, record):
        if event == "step" and record["step"] == step:
            raise KeyboardInterrupt  # what Ctrl-C does

    return callback


def adapters_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


# every source of randomness the checkpoint must carry: dropout (LoSA's head dropout / UPerNet's Dropout2d),
# random augmentation (crops, flips, scale jitter), RPN/RoI sampling (detection), gradient accumulation
RESUMABLE = {
    "classification": dict(method="losa", epochs=3, batch_size=3, grad_accum=2, augmentation="standard",
                           task_options={"head_dropout": 0.3}),
    "segmentation": dict(epochs=3, batch_size=2, grad_accum=2),
    "detection": dict(epochs=2, batch_size=2, val_split="none"),
}  # fmt: skip


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_gives_the_same_losses_bit_for_bit_for_every_task(task, datasets, tmp_path):
    opts = dict(RESUMABLE[task], epochs=1)
    fit(task_config(task, datasets[task], tmp_path / "a", **opts))
    fit(task_config(task, datasets[task], tmp_path / "b", **opts))
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert len(a) >= 2 and a == b
    fit(task_config(task, datasets[task], tmp_path / "c", seed=1, **opts))
    assert step_losses(tmp_path / "c") != a  # not vacuous: the seed matters


@pytest.mark.parametrize("task", TASKS)
def test_resume_mid_epoch_replays_the_whole_log_and_adapter_of_the_uninterrupted_run(task, datasets, tmp_path):
    opts = dict(RESUMABLE[task], save_every_steps=1)
    straight = fit(task_config(task, datasets[task], tmp_path / "straight", **opts))
    per_epoch = straight.summary["timing"]["steps_per_epoch"]
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        fit(task_config(task, datasets[task], stopped, **opts), callback=crash_at(per_epoch + 2))
    step, epoch, batch = (json.loads((find_checkpoint(stopped) / "trainer_state.json").read_text())[k]
                          for k in ("step", "epoch", "batch_in_epoch"))  # fmt: skip
    assert (step, epoch) == (per_epoch + 1, 1) and batch > 0  # mid-epoch: inside the second epoch
    fit(task_config(task, datasets[task], stopped, resume=str(stopped), **opts))
    assert comparable_log(stopped) == comparable_log(tmp_path / "straight")  # epoch records (train_loss...) too
    assert adapters_equal(stopped / "last", tmp_path / "straight" / "last")
    if task == "detection":  # the detector's loss parts are logged per step and per epoch
        first = read_log(stopped / "log.jsonl")[0]
        assert {"loss_classifier", "loss_box_reg", "loss_objectness"} <= set(first)


def _kill_during_save(monkeypatch, at_call: int):
    real = checkpoint_module.torch.save
    calls = {"n": 0}

    def flaky(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", flaky)


def _kill_before_latest(monkeypatch, at_call: int):
    real = checkpoint_module._atomic_text
    calls = {"n": 0}

    def flaky(path, text):
        calls["n"] += 1
        if calls["n"] == at_call:  # the checkpoint folder is renamed into place, LATEST still names the old one
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(checkpoint_module, "_atomic_text", flaky)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("kill", ["during-save", "before-latest", "before-first-checkpoint"])
def test_a_kill_at_any_point_then_resume_gives_the_uninterrupted_run(task, kill, datasets, tmp_path, monkeypatch):
    opts = dict(RESUMABLE[task], epochs=2)
    fit(task_config(task, datasets[task], tmp_path / "straight", **opts))
    run = tmp_path / "run"
    if kill == "before-first-checkpoint":  # Ctrl-C in the first epoch, checkpoints at epoch ends only
        with pytest.raises(KeyboardInterrupt):
            fit(task_config(task, datasets[task], run, **opts), callback=crash_at(2))
        with pytest.raises(ConfigError, match=r"no complete checkpoint.*--resume"):
            fit(task_config(task, datasets[task], run, **opts))  # a plain restart says what to do
    else:
        opts["save_every_steps"] = 1
        if kill == "during-save":
            _kill_during_save(monkeypatch, at_call=5)  # 3 torch.save calls a checkpoint: inside the second
        else:
            _kill_before_latest(monkeypatch, at_call=2)
        with pytest.raises(KeyboardInterrupt):
            fit(task_config(task, datasets[task], run, **opts))
        monkeypatch.undo()
        assert find_checkpoint(run).name == "step-00000001"  # the last complete one, named by LATEST
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    fit(task_config(task, datasets[task], run, resume=str(run), **opts))
    assert comparable_log(run) == comparable_log(tmp_path / "straight")
    assert adapters_equal(run / "last", tmp_path / "straight" / "last")


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_gradient_accumulation_matches_one_big_batch(task, datasets, tmp_path):
    opts = dict(epochs=1, warmup_epochs=0.0, val_split="none", test_split="none")
    size = 6  # 18 classification images, 8 segmentation images: whole batches either way
    if task == "segmentation":
        opts.update(head_options={"channels": 16, "dropout": 0.0}, augmentation="none")
        size = 4
    big_config = task_config(task, datasets[task], tmp_path / "big", batch_size=size, **opts)
    big = fit(big_config).model
    accum = fit(task_config(task, datasets[task], tmp_path / "accum", batch_size=size // 2, grad_accum=2, **opts)).model
    assert step_losses(tmp_path / "big") == pytest.approx(step_losses(tmp_path / "accum"), rel=1e-5)
    # Adam moves every weight by up to lr a step whatever its gradient's size, so the rounding of a near-zero
    # gradient (summed in another order, by another CPU's kernels) can move a weight by a fraction of lr: seen up to
    # 0.8% of lr on an AMX CPU. A broken accumulation (a lost micro-batch, a step per micro-batch) moves most weights
    # by the order of lr; a twentieth of it is the tolerance.
    for (name, a), (_, b) in zip(big.named_trainable_parameters(), accum.named_trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=big_config.lr / 20, msg=name)


# -- non-finite training ---------------------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_the_run_and_saves_nothing_non_finite(datasets, tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite .* at step \d+ \(epoch 1\)"):
        fit(task_config("classification", datasets["classification"], tmp_path / "run", lr=1e30, epochs=2))
    for sub in ("best", "last"):
        assert not (tmp_path / "run" / sub).exists()
    steps = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["type"] == "step"]
    assert steps[-1]["skipped"] == "non-finite loss"


def test_non_finite_patience_skips_the_bad_steps(datasets, tmp_path, monkeypatch):
    from sidetune.tasks.classification import ClassificationTask

    real = ClassificationTask.step
    calls = {"n": 0}

    def sometimes_nan(self, model, batch):
        out = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ClassificationTask, "step", sometimes_nan)
    result = fit(task_config("classification", datasets["classification"], tmp_path / "run", nonfinite_patience=1))
    assert result.summary["metrics"]["nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in result.model.trainable_parameters())
    epochs = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["type"] == "epoch"]
    assert all(r["train_loss"] is not None for r in epochs)


# -- the extension point: a task registered in a test trains through fit without touching the loop ------------------
@dataclass
class MeanOptions:
    """No options."""


class MeanImages(torch.utils.data.Dataset):
    classes = ("mean",)

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g) * torch.rand(n, 1, 1, 1, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.images[i].mean()


class MeanError(Evaluator):
    def __init__(self) -> None:
        self.sum, self.n = 0.0, 0

    def update(self, model, batch) -> None:
        images, target = batch
        self.sum += float(((model(images)[:, 0] - target) ** 2).sum())
        self.n += len(target)

    def state(self):
        return self.sum, self.n

    def compute(self, states):
        total, n = sum(s[0] for s in states), sum(s[1] for s in states)
        return {"neg_mse": -total / n, "mse": total / n}


class MeanRegression(Task):
    """Regress each image's mean value: a task that exists only in this test."""

    name = "mean-regression"
    options_cls = MeanOptions
    layouts = {"auto": "synthetic"}  # noqa: RUF012
    augmentations = ("none",)
    headline = "neg_mse"
    defaults = {"batch_size": 8, "weight_decay": 0.0, "workers": 0}  # noqa: RUF012

    def model_kwargs(self, config):
        return {"task": "classification"}  # a one-output linear head is a regressor

    def scan_classes(self, config):
        return ["mean"]

    def build_data(self, config, model):
        return TaskData(MeanImages(32, 0), MeanImages(16, 1), MeanImages(16, 2), ["mean"], source="synthetic")

    def step(self, model, batch):
        images, target = batch
        return StepOutput(loss=torch.nn.functional.mse_loss(model(images)[:, 0].float(), target), count=len(target))

    def evaluator(self, model, dataset, classes):
        return MeanError()


def test_a_task_registered_outside_the_library_trains_through_fit(tmp_path):
    task_registry.register_task(MeanRegression)
    try:
        result = fit(config(None, tmp_path / "run", task="mean-regression", epochs=6, lr=3e-2))
    finally:
        del task_registry._REGISTRY["mean-regression"]
    summary = result.summary
    assert summary["task"] == "mean-regression" and summary["metrics"]["headline"] == "neg_mse"
    epochs = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["type"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] / 2
    assert summary["metrics"]["best_val"] == max(r["val_neg_mse"] for r in epochs)
    assert summary["metrics"]["test"]["mse"] < epochs[0]["val_mse"]
