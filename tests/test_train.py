"""Tests of sidetune.train: the Accelerate loop, reproducibility, resumable atomic checkpoints, metrics, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

import sidetune
from sidetune.bench.levers import native_low_precision
from sidetune.data import DataError
from sidetune.errors import ConfigError, SidetuneError
from sidetune.tasks import make_task
from sidetune.train import (
    CheckpointError,
    ClassificationMeter,
    TrainConfig,
    WarmupCosine,
    evaluate_adapter,
    fit,
    parse_options,
    parse_value,
    predict_images,
    read_log,
)
from sidetune.train.setup import make_optimizer, param_groups, resolve_mixed_precision, unused_parameters
from train_data import CLASSES, IMG, comparable_log, config, files, make_image_folder, step_losses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


# -- a whole run -----------------------------------------------------------------------------------------------
def test_fit_writes_a_complete_run_directory(data, tmp_path):
    out = tmp_path / "run"
    result = fit(config(data, out, method="losa", val_fraction=0.34, eval_every=1))
    for name in ("log.jsonl", "summary.json", "curves.png", "train_config.yaml", "checkpoints/LATEST"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_log(out / "log.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(steps) == summary["timing"]["steps"] == 4  # 12 train images / 6 per batch, 2 epochs
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["step_time_s"] > 0 for r in steps)
    assert all(len(r["val_per_class"]) == len(CLASSES) and 0 <= r["val_top1"] <= 1 for r in epochs)
    assert summary["model"]["trainable_parameters"] == result.model.num_parameters()
    assert summary["data"]["train"] == 12 and summary["data"]["val"] == 6 and summary["data"]["test"] == 6
    assert summary["data"]["classes"] == list(CLASSES)
    assert summary["metrics"]["test"]["count"] == 6 and summary["metrics"]["test_checkpoint"] == "best"
    assert summary["memory"]["bytes"] > 0 and summary["memory"]["kind"] == "cpu_peak_rss"
    assert set(summary["versions"]) >= {"torch", "timm", "sidetune"} and "git_commit" in summary
    assert summary["config"]["method"] == "losa" and summary["ranks_in_sync"]
    # best/ and last/ are adapter-only folders that sidetune.load rebuilds
    for which in ("best", "last"):
        files = sorted(p.name for p in (out / which).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors", "inference.json"]
        assert json.loads((out / which / "inference.json").read_text())["classes"] == list(CLASSES)
    torch.manual_seed(0)  # the run's seed: the random test backbone is rebuilt from it
    reloaded = sidetune.load(out / "best").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", [m["name"] for m in sidetune.list_methods()])
def test_every_registered_method_trains_through_the_loop(method, data, tmp_path):
    out = tmp_path / method
    result = fit(config(data, out, method=method, epochs=1, test_split="none", lr=1e-3))
    losses = step_losses(out)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    saved = load_file(str(out / "last" / "adapter_model.safetensors"))
    assert set(saved) == {n for n, _ in result.model.named_trainable_parameters()}
    torch.manual_seed(0)
    fresh = sidetune.create("test_vit", method, num_classes=len(CLASSES), img_size=IMG)
    initial = dict(fresh.named_trainable_parameters())
    assert any(not torch.equal(saved[n], initial[n].detach()) for n in saved), "no trainable tensor changed"


def test_resume_from_another_method_or_backbone_names_both(data, tmp_path):
    fit(config(data, tmp_path / "losa", method="losa", epochs=1))
    with pytest.raises(
        CheckpointError, match=r"method 'losa' on backbone 'test_vit'.*method 'e3va' on backbone 'test_vit'"
    ):
        fit(config(data, tmp_path / "e3va", method="e3va", epochs=1, resume=str(tmp_path / "losa")))
    assert not (tmp_path / "e3va").exists()  # refused before writing anything
    with pytest.raises(CheckpointError, match=r"backbone 'test_vit'.*backbone 'test_vit2'"):
        fit(
            config(
                data, tmp_path / "other", method="losa", backbone="test_vit2", epochs=1, resume=str(tmp_path / "losa")
            )
        )
    with pytest.raises(CheckpointError, match="channel_rank"):
        fit(
            config(
                data,
                tmp_path / "rank",
                method="losa",
                method_options={"channel_rank": 2},
                resume=str(tmp_path / "losa"),
            )
        )
    with pytest.raises(CheckpointError, match="nothing to resume"):
        fit(config(data, tmp_path / "x", resume=str(tmp_path / "missing")))


def test_resume_with_another_schedule_is_refused_and_leaves_the_run_as_it_was(data, tmp_path):
    run = tmp_path / "run"
    fit(config(data, run, method="losa", epochs=1))
    saved_config = (run / "train_config.yaml").read_text()
    log = (run / "log.jsonl").read_text()
    # more epochs: the restored cosine would silently keep the old length
    with pytest.raises(CheckpointError, match=r"total_steps 3 -> 6 \(--epochs\)"):
        fit(config(data, run, method="losa", epochs=2, resume=str(run)))
    # another batch size: the saved position in the epoch would skip the wrong images
    with pytest.raises(CheckpointError, match=r"steps_per_epoch 3 -> 6 .*images_per_step 6 -> 3"):
        fit(config(data, run, method="losa", epochs=1, batch_size=3, resume=str(run)))
    assert (run / "train_config.yaml").read_text() == saved_config
    assert (run / "log.jsonl").read_text() == log
    fit(config(data, run, method="losa", epochs=1, resume=str(run)))  # the same schedule still resumes


def test_an_existing_run_is_not_overwritten(data, tmp_path):
    fit(config(data, tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(config(data, tmp_path / "run", epochs=1))


def test_a_resume_into_another_folder_continues_the_run_there_and_leaves_the_run_as_it_was(data, tmp_path):
    opts = dict(method="losa", val_fraction=0.34, save_every_steps=1)  # 2 epochs of 2 steps
    straight = fit(config(data, tmp_path / "straight", **opts))
    stopped = tmp_path / "stopped"

    def stop_at_step_4(event, record):
        if event == "step" and record["step"] == 4:
            raise KeyboardInterrupt  # inside the second epoch, after the checkpoint of step 3

    with pytest.raises(KeyboardInterrupt):
        fit(config(data, stopped, **opts), callback=stop_at_step_4)
    kept = files(stopped)
    fit(config(data, tmp_path / "copy", resume=str(stopped), **opts))
    assert files(stopped) == kept
    assert comparable_log(tmp_path / "copy") == comparable_log(tmp_path / "straight")  # the records before step 3 too
    for which in ("best", "last"):
        assert files(tmp_path / "copy" / which) == files(tmp_path / "straight" / which)
    # a finished run: nothing left to train, the new folder is that run (this read a log never written)
    kept = files(tmp_path / "straight")
    again = fit(config(data, tmp_path / "again", resume=str(tmp_path / "straight"), **opts))
    assert files(tmp_path / "straight") == kept
    assert comparable_log(tmp_path / "again") == comparable_log(tmp_path / "straight")
    assert again.summary["metrics"]["test"] == straight.summary["metrics"]["test"]
    assert files(tmp_path / "again" / "best") == files(tmp_path / "straight" / "best")
    resumed = fit(config(data, tmp_path / "again", resume=str(tmp_path / "again"), **opts))  # its own checkpoint
    assert resumed.summary["resumed_from"].startswith(str(tmp_path / "again"))
    # a folder that holds another run is never the one a resume continues in
    with pytest.raises(ConfigError, match=r"already holds a run .* continues another one.* --output .*stopped"):
        fit(config(data, tmp_path / "straight", resume=str(stopped), **opts))
    assert files(tmp_path / "straight") == kept


# -- optimisation details (seeded losses, exact resume and accumulation: test_pipeline.py, for every task) ----------
def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup_steps=4, total_steps=14, floor=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0) and s(9) == pytest.approx(0.55) and s(14) == pytest.approx(0.1)
    values = [s(i) for i in range(4, 15)]
    assert values == sorted(values, reverse=True)


def test_weight_decay_skips_biases_norms_and_tokens():
    model = sidetune.create("test_vit", "full", num_classes=3, img_size=IMG)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_trainable_parameters())
    assert all(id(p) in ids for n, p in named.items() if n.endswith(".bias") or p.ndim == 1 or "pos_embed" in n)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_head_lr_mult_gives_the_task_head_a_rate_of_its_own(task):
    model = sidetune.create("test_vit", "full", task=task, num_classes=3, img_size=IMG)
    config = TrainConfig(backbone="test_vit", method="full", task=task, lr=1e-4, head_lr_mult=30, weight_decay=0.05)
    optimizer = make_optimizer(model, config)
    names = {id(p): n for n, p in model.named_trainable_parameters()}
    groups = optimizer.param_groups
    assert sorted(names[id(p)] for g in groups for p in g["params"]) == sorted(names.values())  # each once
    for g in groups:
        heads = {names[id(p)].startswith("head.") for p in g["params"]}
        assert len(heads) == 1  # a group is the head's or the method's, never both
        assert g["lr"] == pytest.approx(3e-3 if heads == {True} else 1e-4)
    assert not names[id(groups[0]["params"][0])].startswith("head.")  # the method first: the log's lr is its rate
    # the schedule scales both rates alike: the head stays 30x the backbone through warm-up and cosine
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(2, 10, 0.0))
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    rates = {g["lr"] for g in groups}
    assert max(rates) / min(rates) == pytest.approx(30)
    # the default keeps the two groups of earlier versions (their optimizer checkpoints still load)
    plain = make_optimizer(model, TrainConfig(backbone="test_vit", method="full", task=task, lr=1e-4))
    assert len(plain.param_groups) == 2 and {g["lr"] for g in plain.param_groups} == {1e-4}


def test_head_lr_mult_without_a_second_rate_to_give_is_refused():
    model = sidetune.create("test_vit", "linear", num_classes=3, img_size=IMG)
    with pytest.raises(ConfigError, match=r"'linear' has only head tensors to train \(set --lr instead\)"):
        make_optimizer(model, TrainConfig(backbone="test_vit", method="linear", head_lr_mult=10))


def test_a_resume_with_another_learning_rate_is_refused(data, tmp_path):
    # the optimizer's state holds each group's rate: a resume would silently train at the old one
    run = tmp_path / "run"
    fit(config(data, run, method="losa", epochs=1, head_lr_mult=10))
    with pytest.raises(CheckpointError, match=r"head_lr_mult 10.0 -> 1.0 \(--head-lr-mult\)"):
        fit(config(data, run, method="losa", epochs=1, resume=str(run)))
    with pytest.raises(CheckpointError, match=r"lr 0.01 -> 0.003 \(--lr\)"):
        fit(config(data, run, method="losa", epochs=1, lr=3e-3, head_lr_mult=10, resume=str(run)))
    with pytest.raises(CheckpointError, match=r"warmup_steps 2 -> 3 \(--warmup-epochs\).*min_lr 0.0 -> 0.001"):
        fit(config(data, run, method="losa", epochs=1, head_lr_mult=10, warmup_epochs=1, min_lr=1e-3,
                   resume=str(run)))  # fmt: skip
    fit(config(data, run, method="losa", epochs=1, head_lr_mult=10, resume=str(run)))


def test_a_checkpoint_from_before_the_rates_were_recorded_still_resumes(data, tmp_path):
    run = tmp_path / "run"
    fit(config(data, run, method="losa", epochs=1, save_every_steps=1))
    latest = run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()
    state = json.loads((latest / "trainer_state.json").read_text())
    for key in ("lr", "head_lr_mult", "warmup_steps", "min_lr"):
        del state["run"][key]
    (latest / "trainer_state.json").write_text(json.dumps(state))
    # one rate for every tensor is what such a checkpoint holds: another head rate is refused, not a torch error
    with pytest.raises(CheckpointError, match=r"head_lr_mult 1.0 -> 10.0 \(--head-lr-mult\)"):
        fit(config(data, run, method="losa", epochs=1, head_lr_mult=10, resume=str(latest)))
    fit(config(data, run, method="losa", epochs=1, resume=str(latest)))


def test_mixed_precision_is_validated_against_the_device():
    assert resolve_mixed_precision("auto", on_cpu=True) == "no"
    assert resolve_mixed_precision("no", on_cpu=True) == "no"
    with pytest.raises(ConfigError, match="float16 autocast needs a CUDA device; use --mixed-precision no"):
        resolve_mixed_precision("fp16", on_cpu=True)
    with (
        mock.patch("sidetune.train.setup.native_low_precision", return_value=False),
        pytest.raises(ConfigError, match="no native bfloat16"),
    ):
        resolve_mixed_precision("bf16", on_cpu=True)
    with mock.patch("sidetune.train.setup.native_low_precision", return_value=True):
        assert resolve_mixed_precision("bf16", on_cpu=True) == "bf16"
    with pytest.raises(ConfigError, match="--mixed-precision must be one of"):
        TrainConfig(backbone="test_vit", method="linear", mixed_precision="fp8")


@pytest.mark.skipif(
    not native_low_precision(torch.bfloat16, torch.device("cpu")), reason="no native bfloat16 on this CPU"
)
def test_bf16_on_a_native_cpu_changes_the_numbers_slightly_and_keeps_fp32_state(data, tmp_path):
    opts = dict(method="losa", epochs=1, test_split="none")
    fit(config(data, tmp_path / "fp32", **opts))
    result = fit(config(data, tmp_path / "bf16", mixed_precision="bf16", **opts))
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["config"]["mixed_precision"] == "bf16"
    fp32, bf16 = step_losses(tmp_path / "fp32"), step_losses(tmp_path / "bf16")
    assert fp32 != bf16  # autocast was on: bfloat16 matmuls round differently
    assert bf16 == pytest.approx(fp32, rel=0.05)  # ...but it is the same training
    assert all(p.dtype == torch.float32 for p in result.model.trainable_parameters())


def test_unused_parameters_are_found_for_ddp():
    model = sidetune.create("test_vit", "losa", num_classes=3, img_size=IMG)
    task = make_task("classification")
    samples = [(torch.randn(3, IMG, IMG), 0)] * 2
    assert unused_parameters(model, task, samples) == []
    model.head.spare = torch.nn.Linear(2, 2)  # trainable but never called
    found = unused_parameters(model, task, samples)
    assert found == ["head.spare.weight", "head.spare.bias"]
    assert all(p.grad is None for p in model.trainable_parameters())


# -- metrics, evaluation and prediction ---------------------------------------------------------------------------
def test_classification_meter_per_class_accuracy():
    meter = ClassificationMeter(4)
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 5.0, 0]])
    meter.update(logits, torch.tensor([0, 1, 1, 2]))
    m = meter.compute()
    assert m["top1"] == 0.75 and m["count"] == 4
    assert m["per_class"] == [1.0, 0.5, 1.0, None]  # class 3 absent
    assert m["mean_class_acc"] == pytest.approx(2.5 / 3)


def test_evaluate_and_predict_with_a_saved_adapter(data, tmp_path):
    result = fit(config(data, tmp_path / "run", method="losa", epochs=3))
    metrics = evaluate_adapter(tmp_path / "run" / "last", data, "test", workers=0)
    assert metrics["count"] == 6 and metrics["classes"] == list(CLASSES)
    assert metrics["top1"] == pytest.approx(result.summary["metrics"]["test"]["top1"])
    rows = predict_images(tmp_path / "run" / "last", data / "test", top_k=2, workers=0)
    assert len(rows) == 6 and all(r["label"] in CLASSES and len(r["top_k"]) == 2 for r in rows)
    assert all(r["top_k"][0] == (r["label"], r["score"]) and r["top_k"][0][1] >= r["top_k"][1][1] for r in rows)


# -- configuration -----------------------------------------------------------------------------------------------
def test_yaml_config_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("backbone: test_vit\nmethod: losa\nepochs: 7\nlr: 0.01\nmethod_options:\n  channel_rank: 4\n")
    cfg = TrainConfig.from_yaml(path, epochs=2, method_options={"token_rank": 2})
    assert (cfg.epochs, cfg.lr, cfg.method_options) == (2, 0.01, {"channel_rank": 4, "token_rank": 2})
    cfg.save(tmp_path / "again.yaml")
    assert TrainConfig.from_yaml(tmp_path / "again.yaml") == cfg
    path.write_text("backbone: test_vit\nmethod: losa\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml.*'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_yaml_reads_exponent_numbers_and_refuses_settings_of_the_wrong_shape(tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as a string and ``no`` as false: a config file takes both as meant."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "backbone: test_vit\nmethod: losa\nlr: 1e-3\nmin_lr: 1E-5\nwarmup_epochs: 5e-1\nmixed_precision: no\n"
        "method_options:\n  dropout: 1.0e-1\n"
    )
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.mixed_precision) == (0.001, 1e-5, 0.5, "no")
    assert cfg.method_options == {"dropout": 0.1}
    path.write_text("- backbone: test_vit\n- method: losa\n")
    with pytest.raises(ConfigError, match=r"run.yaml' must hold a mapping of settings, got list"):
        TrainConfig.from_yaml(path)
    path.write_text("backbone: test_vit\nmethod: losa\ndata: [1, 2]\ncpu: 'no'\n")
    with pytest.raises(ConfigError, match=r"--data must be a string, got \[1, 2\]"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match=r"--cpu must be true or false, got 'no'"):
        TrainConfig.from_yaml(path, data="images")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("lr", -1.0, "lr must be a finite number > 0"),
        ("lr", float("inf"), "lr must be a finite number > 0"),
        ("lr", float("nan"), "lr must be a finite number > 0"),
        ("head_lr_mult", 0.0, "--head-lr-mult must be a finite number > 0"),
        ("weight_decay", float("inf"), "--weight-decay must be a finite number"),
        ("task_options", {"label_smoothing": 1.0}, "label_smoothing must be in"),
        ("task_options", {"smoothing": 0.1}, "'smoothing' .*did you mean 'label_smoothing'"),
        ("augmentation", "heavy", "not one of the classification recipes"),
        ("layout", "coco", "not a classification layout"),
        ("val_split", "../x", "plain split name"),
        ("val_fraction", 1.5, "--val-fraction must be in"),
        ("warmup_epochs", 20.0, "--warmup-epochs 20.0 is longer than --epochs 10"),
        ("cpu", "no", r"--cpu must be true or false, got 'no' \(in YAML, unquoted"),  # a truthy string
        ("compile", "false", "--compile must be true or false, got 'false'"),
        ("cpu", 0, "--cpu must be true or false, got 0"),
        ("data", [1, 2], r"--data must be a string, got \[1, 2\]"),
        ("output", 3, "--output must be a string, got 3"),
        ("task", None, "--task must be a string, got None"),
    ],
)
def test_invalid_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(backbone="test_vit", method="linear", **{field: value})


def test_option_values_parse():
    assert parse_value("8") == 8 and parse_value("0.5") == 0.5 and parse_value("1e-3") == 0.001
    assert parse_value("true") is True and parse_value("none") is None and parse_value("gelu") == "gelu"
    assert parse_value("2,5") == (2, 5) and parse_value("(1, 2, 3)") == (1, 2, 3)
    assert parse_options(["channel-rank=8", "norm=false"]) == {"channel_rank": 8, "norm": False}
    with pytest.raises(ConfigError, match="key=value"):
        parse_options(["rank"])


# -- bad input ---------------------------------------------------------------------------------------------------
def test_missing_or_empty_data_is_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        fit(config(tmp_path / "nope", tmp_path / "out"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty/train has no class folders"):
        fit(config(tmp_path / "empty", tmp_path / "out"))
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="hollow"):
        fit(config(tmp_path / "hollow", tmp_path / "out", test_split="none"))


def test_a_run_without_data_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"no training data: set --data"):
        fit(config(None, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("splits", "pattern"),
    [
        ({"val_split": "test"}, r"validation split 'test' is also the test split"),
        ({"val_split": "test", "test_split": "test"}, r"validation split 'test' is also the test split"),
        ({"val_split": "train"}, r"validation split 'train' is also the training split"),
    ],
)
def test_a_validation_split_that_is_the_test_or_training_split_is_refused(splits, pattern, data, tmp_path):
    with pytest.raises(ConfigError, match=pattern):
        fit(config(data, tmp_path / "out", **splits))
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_num_classes_disagreeing_with_the_data(data, tmp_path):
    with pytest.raises(DataError, match=r"--num-classes 5 .* 3 classes"):
        fit(config(data, tmp_path / "out", num_classes=5))


def test_labels_outside_the_class_count(data, tmp_path):
    csv_file = tmp_path / "labels.csv"
    first = next((data / "train" / "cat").iterdir())
    csv_file.write_text(f"path,label\n{first},0\n{first},7\n")
    with pytest.raises(DataError, match=r"labels.csv.*7"):
        fit(config(csv_file, tmp_path / "out", num_classes=3, train_split=None, test_split="none"))
    images = torch.randn(6, 3, IMG, IMG)
    bad = TensorDataset(images, torch.tensor([0, 1, 2, 0, 1, 5]))
    with pytest.raises(DataError, match="outside the model's 3 classes"):
        fit(config(None, tmp_path / "tensors", num_classes=3, epochs=1), train_dataset=bad)


def test_errors_are_sidetune_errors():
    assert issubclass(CheckpointError, SidetuneError) and issubclass(DataError, SidetuneError)


def test_real_benchmark_skips_cleanly_without_the_shared_assets(tmp_path, monkeypatch, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "classification_real.py"
    spec = importlib.util.spec_from_file_location("classification_real", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "WEIGHTS", tmp_path / "absent.safetensors")
    assert bench.main(["--results", str(tmp_path / "results"), "--doc", str(tmp_path / "doc.md")]) == 0
    assert "skipping the real classification run" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()
