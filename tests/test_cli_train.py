"""``sidetune train``, ``eval`` and ``predict`` from the command line."""

from __future__ import annotations

import csv
import io
import json

import pytest

from sidetune.cli import build_parser, main
from train_data import CLASSES, IMG, make_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished run, trained from a YAML file with command-line overrides."""
    root = tmp_path_factory.mktemp("cli")
    yaml_file = root / "run.yaml"
    yaml_file.write_text(
        f"backbone: test_vit\nmethod: losa\ndata: {data}\nimg_size: {IMG}\nepochs: 9\nbatch_size: 6\n"
        "lr: 0.01\nworkers: 0\nwarmup_epochs: 0.5\nmethod_options:\n  channel_rank: 8\n  token_rank: 2\n"
    )
    out = root / "run"
    argv = ["train", "--config", str(yaml_file), "--epochs", "2", "--opt", "channel_rank=4", "--output", str(out)]
    code = main([*argv, "--no-progress", "--val-fraction", "0.34"])
    assert code == 0
    return out


def test_train_from_yaml_with_overrides(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    cfg = summary["config"]
    assert cfg["epochs"] == 2 and cfg["batch_size"] == 6  # the flag beat the YAML; the YAML beat the default
    assert cfg["method_options"] == {"channel_rank": 4, "token_rank": 2}  # --opt merged per key into the YAML's
    assert summary["model"]["method_config"]["channel_rank"] == 4
    assert (run / "train_config.yaml").is_file() and (run / "best" / "adapter_model.safetensors").is_file()


def test_train_prints_results(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "test_vit", "linear", "--data", str(data), "--img-size", str(IMG), "--epochs", "1"]
    assert main([*args, "--batch-size", "6", "--workers", "0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1: train loss" in printed and "test (last checkpoint, 6 images): top-1" in printed
    assert str(out) in printed and "per class, worst first (recall)" in printed
    assert main([*args, "--batch-size", "6", "--workers", "0", "--output", str(out), "--resume", str(out)]) == 0


def test_eval_prints_and_writes_metrics(run, data, tmp_path, capsys):
    target = tmp_path / "metrics.json"
    assert main(["eval", str(run / "best"), "--data", str(data), "--workers", "0", "--output", str(target)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(target.read_text())
    assert printed["split"] == "test" and printed["count"] == 6 and len(printed["per_class"]) == 3
    assert printed["top1"] == pytest.approx(json.loads((run / "summary.json").read_text())["metrics"]["test"]["top1"])
    assert main(["eval", str(run / "best"), "--data", str(data), "--split", "train", "--workers", "0"]) == 0
    assert (run / "best" / "eval_train.json").is_file()


def test_predict_writes_csv_with_top_k(run, data, tmp_path, capsys):
    target = tmp_path / "pred.csv"
    assert (
        main(
            [
                "predict",
                str(run / "last"),
                str(data / "test"),
                "--top-k",
                "2",
                "--workers",
                "0",
                "--output",
                str(target),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(target.open()))
    assert len(rows) == 6 and list(rows[0]) == ["path", "label", "score", "label_2", "score_2"]
    assert all(r["label"] in CLASSES and float(r["score"]) >= float(r["score_2"]) for r in rows)
    capsys.readouterr()
    assert main(["predict", str(run / "last"), str(data / "test" / "cat" / "0.png"), "--workers", "0"]) == 0
    stdout_rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(stdout_rows) == 1 and len(stdout_rows[0]) == 2 + 2 * len(CLASSES) - 1  # top-k capped at 3 classes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "test_vit", "losa", "--data", "{tmp}/missing"], "missing does not exist"),
        (["train", "test_vit", "losa", "--data", "{data}", "--num-classes", "7"], "--num-classes 7"),
        (["train", "test_vit", "losa", "--data", "{data}", "--mixed-precision", "fp16"], "needs a CUDA device"),
        (["train", "test_vit", "losa", "--data", "{data}", "--opt", "rank"], "--opt takes key=value"),
        (
            ["train", "test_vit", "e3va", "--data", "{data}", "--opt", "input_norm=maybe"],
            "method 'e3va': option input_norm must be true or false, got 'maybe'",
        ),
        (["train", "test_vit", "losa", "--data", "{data}", "--opt", "norm=maybe"], "norm must be true or false"),
        (["train", "test_vit", "losa", "--data", "{data}", "--opt", "blocks=x"], "blocks must be integers"),
        (["train", "test_vit", "losa", "--data", "{data}", "--resume", "{tmp}/none"], "nothing to resume"),
        (["train", "--config", "{tmp}/absent.yaml"], "absent.yaml' does not exist"),
        (["eval", "{tmp}/noadapter", "--data", "{data}"], "not an adapter directory"),
        (["predict", "{run}/best", "{tmp}"], "no image files"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, data, run, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, data=data, run=run) for a in argv]
    assert main([*argv, "--output", str(tmp_path / "out")] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sidetune {argv[0]}: error:") and message in err, err
    assert "\n" not in err and "Traceback" not in err


def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- 1\n- 2\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sidetune train: error: {str(config)!r} must hold a mapping of settings, got list."


def test_one_value_of_a_list_option_trains(data, tmp_path):
    """``--opt blocks=1`` parses to the number 1, which LoSA takes as the one block ``(1,)``."""
    out = tmp_path / "run"
    args = ["train", "test_vit", "losa", "--data", str(data), "--img-size", str(IMG), "--epochs", "1"]
    assert main([*args, "--batch-size", "6", "--workers", "0", "--opt", "blocks=1", "--output", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["model"]["method_config"]["blocks"] == [1]


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    expected = {
        "train": [
            "--config",
            "--weights",
            "--img-size",
            "--opt",
            "--data",
            "--train-split",
            "--val-split",
            "--test-split",
            "--val-fraction",
            "--epochs",
            "--batch-size",
            "--lr",
            "--head-lr-mult",
            "--weight-decay",
            "--warmup-epochs",
            "--label-smoothing",
            "--grad-accum",
            "--mixed-precision",
            "--augmentation",
            "--eval-every",
            "--seed",
            "--workers",
            "--output",
            "--resume",
            "--no-progress",
            "torchrun",
        ],
        "eval": ["adapter", "--data", "--split", "--output", "--batch-size"],
        "predict": ["adapter", "images", "--top-k", "--output"],
    }[command]
    missing = [flag for flag in expected if flag not in text]
    assert not missing, missing
