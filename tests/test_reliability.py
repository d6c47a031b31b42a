"""What a hostile user found (issue: reliability), one test per defect, each failing before its fix.

Kill-and-resume at every point, epoch records after a resume and non-finite losses are tested for every task in
test_pipeline.py; this file covers the run directory, the command line and loading.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from sidetune.cli import main
from sidetune.errors import ConfigError
from sidetune.train import CheckpointError, fit
from sidetune.train import checkpoint as checkpoint_module
from train_data import IMG, config, make_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    fit(config(data, out, epochs=1))
    return out


# -- the run directory ----------------------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_output_is_refused_naming_the_holder(data, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from sidetune.train.rundir import RunLock
            lock = RunLock(Path({str(out)!r})).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another sidetune run \(pid {holder.pid} "):
            fit(config(data, out, epochs=1))
        assert not (out / "log.jsonl").exists()  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock died with it (a stale lock file is no obstacle)
    assert "pid" in (out / ".lock").read_text()
    fit(config(data, out, epochs=1))
    assert (out / "summary.json").is_file()


def test_output_that_is_a_file_is_refused(data, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        fit(config(data, target, epochs=1))
    assert target.read_text() == "not a folder"


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(data, tmp_path, monkeypatch):
    real = checkpoint_module.torch.save
    calls = {"n": 0}

    def full(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"is full: saving the checkpoint of step \d+ needs about .* MiB"):
        fit(config(data, tmp_path / "run", epochs=2))
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip() == "step-00000003"


def test_a_full_disk_while_writing_the_log_says_so_and_the_run_resumes(data, tmp_path, monkeypatch):
    from sidetune.train.metrics import JsonlLog

    real = JsonlLog.write

    def full(self, record):
        if record.get("step") == 5:  # after the first checkpoint (step 3)
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, record)

    monkeypatch.setattr(JsonlLog, "write", full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"is full \(.*log.jsonl\); the last checkpoint is intact"):
        fit(config(data, out, epochs=2))
    monkeypatch.undo()
    result = fit(config(data, out, epochs=2, resume=str(out)))
    assert result.summary["timing"]["steps"] == 6 and result.summary["metrics"]["test"]["top1"] is not None


def test_a_checkpoint_file_holding_pickled_objects_is_refused(data, tmp_path):
    out = tmp_path / "run"
    fit(config(data, out, epochs=1))
    latest = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    torch.save({"state": {}, "param_groups": [], "evil": io.StringIO("x")}, latest / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer.pt' is not a readable checkpoint state"):
        fit(config(data, out, epochs=1, resume=str(out)))


# -- the command line -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "inf"], "argument --lr: must be a finite number"),
        (["--lr", "0"], "argument --lr: must be a finite number in (0, inf)"),
        (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number"),
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["--val-fraction", "1.5"], "argument --val-fraction: must be a finite number in (0, 1)"),
        (["--val-fraction", "1"], "argument --val-fraction: must be a finite number in (0, 1)"),
        (["--label-smoothing", "1"], "argument --label-smoothing: must be a finite number in [0, 1)"),
    ],
)
def test_non_finite_or_non_positive_hyper_parameters_fail_at_parse_time(argv, message, data, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "test_vit", "linear", "--data", str(data), *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "{run}/best", "{data}/test", "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
        (["predict", "{run}/best", "{data}/test", "--batch-size", "0"], "argument --batch-size: must be an integer"),
        (["eval", "{run}/best", "--data", "{data}", "--batch-size", "0"], "argument --batch-size: must be an integer"),
    ],
)
def test_zero_batch_or_top_k_is_refused_by_the_parser(argv, message, run, data, capsys):
    with pytest.raises(SystemExit):
        main([a.format(run=run, data=data) for a in argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "{run}/best", "--data", "{data}", "--split", "test/../../x"], "must be a plain split name"),
        (["eval", "{run}/best", "--data", "{data}", "--device", "cuda:7"], "--device cuda:7 is not available"),
        (["eval", "{run}/best", "--data", "{data}", "--device", "tpu"], "is not a torch device"),
        (["predict", "{run}/best", "{data}/test", "--output", "{tmp}/missing/p.csv"], "does not exist; create it"),
        (["predict", "{run}/best", "{data}/test", "--eval-mode", "slide"], "--eval-mode: not an option of"),
        (["eval", "{run}/best", "--data", "{data}", "--eval-mode", "slide"], "--eval-mode is a segmentation option"),
        (["predict", "{run}/best", "{data}/test", "--tasks", "seg"], "--tasks chooses among several --adapter"),
    ],
)
def test_eval_and_predict_mistakes_are_one_line_errors(argv, message, run, data, tmp_path, capsys):
    assert main([a.format(run=run, data=data, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (run / "best" / "eval_x.json").exists() and not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize(
    ("step", "kept"),
    [
        (4, "the last checkpoint is kept"),
        (2, "no checkpoint was saved yet, so resuming starts the run again from scratch"),
    ],
)
def test_ctrl_c_prints_the_step_and_the_resume_command_and_exits_130(data, tmp_path, step, kept):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        import sidetune.train.loop as loop
        real = loop.fit

        def fit(config, callback=None, **kw):
            def interrupting(event, record):
                callback(event, record)
                if event == "step" and record["step"] == {step}:
                    raise KeyboardInterrupt
            return real(config, callback=interrupting, **kw)

        loop.fit = fit
        from sidetune.cli import main
        sys.argv = ["sidetune", "train", "test_vit", "linear", "--data", {str(data)!r}, "--img-size", "{IMG}",
                    "--batch-size", "6", "--workers", "0", "--epochs", "2", "--output", {str(out)!r}]
        sys.exit(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sidetune train: interrupted at step {step}; {kept}. Resume with: ")
    assert f"--resume {out}" in last and "Traceback" not in proc.stderr
    # the command it prints is the one that continues the run
    assert main(["train", "test_vit", "linear", "--data", str(data), "--img-size", str(IMG), "--batch-size", "6",
                 "--workers", "0", "--epochs", "2", "--output", str(out), "--resume", str(out)]) == 0  # fmt: skip


def test_class_names_that_look_like_formulas_are_neutralised_in_the_csv(tmp_path):
    from sidetune.tasks.classification import write_predictions_csv

    rows = [{"path": "a.png", "label": "=cmd|' /C calc'!A0", "score": 0.9, "top_k": [("=cmd|' /C calc'!A0", 0.9),
             ("+1", 0.05), ("-2", 0.03), ("@x", 0.02)]}]  # fmt: skip
    write_predictions_csv(rows, tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as f:
        header, row = list(csv.reader(f))
    assert row[1] == "'=cmd|' /C calc'!A0" and row[3] == "'+1" and row[5] == "'-2" and row[7] == "'@x"
    assert header[:3] == ["path", "label", "score"]


def test_the_final_wrote_line_lists_only_what_exists(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "test_vit", "linear", "--data", str(data), "--img-size", str(IMG), "--batch-size", "6"]
    assert main([*argv, "--workers", "0", "--epochs", "1", "--output", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    listed = last.split("{")[1].rstrip("}").split(",")
    assert last.startswith(f"wrote {out}/") and all((out / name).exists() for name in listed)


def test_progress_lines_appear_when_stdout_is_a_file(data, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "stdout.txt"
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "sidetune.cli", "train", "test_vit", "linear", "--data", str(data),
             "--img-size", str(IMG), "--batch-size", "3", "--workers", "0", "--epochs", "2", "--log-every", "0.001",
             "--output", str(out)],
            stdout=f, stderr=subprocess.PIPE, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("step ")]
    assert len(lines) >= 3
    assert all("loss" in line and "images/s per process" in line and "expected end" in line for line in lines)
    assert lines[0].startswith("step ") and "/12 (epoch 1)" in lines[0]


def test_sidetune_version_imports_neither_torch_nor_timm():
    code = (
        "import sys; from sidetune.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith("[]"), proc.stdout + proc.stderr
    assert "sidetune 0.1.0" in proc.stdout
    help_proc = subprocess.run(
        [sys.executable, "-c", code.replace("'--version'", "'--help'")], capture_output=True, text=True, timeout=60
    )
    assert help_proc.stdout.strip().endswith("[]") and "train" in help_proc.stdout


def test_a_single_class_dataset_is_refused_and_imbalance_is_recorded(data, tmp_path):
    """A dataset with one class would train to loss 0 without a word: refused. Imbalance trains, flagged."""
    import numpy as np

    from sidetune.data import DataError
    from train_data import write_image

    rng = np.random.default_rng(0)
    for i in range(6):
        write_image(tmp_path / "one" / "train" / "only" / f"{i}.png", 0, rng)
    with pytest.raises(DataError, match="refusing to train"):
        fit(config(tmp_path / "one", tmp_path / "run", epochs=1, test_split="none"))
    for i in range(22):
        write_image(tmp_path / "skew" / "train" / "many" / f"{i}.png", 0, rng)
    for i in range(2):
        write_image(tmp_path / "skew" / "train" / "few" / f"{i}.png", 1, rng)
    (tmp_path / "skew" / "train" / "few" / "notes.txt").write_text("not an image")
    result = fit(config(tmp_path / "skew", tmp_path / "run2", epochs=1, test_split="none"))
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert "imbalance" in summary["data"]["warning_codes"] and summary["data"]["warnings"]
    assert summary["data"]["skipped"] == 1 and summary["data"]["skipped_files"][0]["path"].endswith("notes.txt")
    assert summary["data"]["class_counts"]["counts"] == [2, 22]
    assert result.summary["warnings"][: len(summary["data"]["warnings"])] == summary["data"]["warnings"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "inference.json' is not valid JSON"),
        ('{"classes": "cat"}', "'classes' must be a list"),
        ('{"classes": ["a", "b"]}', "names 2 classes but the adapter has 3"),
        ('{"task": "segmentation"}', "inference.json says task 'segmentation'"),
    ],
)
def test_a_tampered_inference_json_is_named(content, message, run, data, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "best", adapter)
    (adapter / "inference.json").write_text(content)
    assert main(["eval", str(adapter), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_resume_of_a_folder_that_holds_no_run_is_refused(data, tmp_path):
    """A mistyped --resume path must not silently start a new run there."""
    missing = tmp_path / "typo"
    with pytest.raises(CheckpointError, match="no run there to resume"):
        fit(config(data, missing, resume=str(missing)))
    assert not (missing / "log.jsonl").exists()
    # a run killed before its first step has its config but no log yet: the printed --resume command restarts it
    early = tmp_path / "early"
    early.mkdir()
    config(data, early).save(early / "train_config.yaml")
    result = fit(config(data, early, resume=str(early)))
    assert result.summary["timing"]["steps"] == 6


def test_a_log_line_cut_short_by_a_kill_is_dropped_and_a_damaged_log_is_named(tmp_path):
    """A process killed while writing a log line leaves half a line: resume and read_log drop it; damage elsewhere
    is an error naming the line, never silently skipped."""
    from sidetune.train.metrics import JsonlLog, read_log

    path = tmp_path / "log.jsonl"
    log = JsonlLog(path)
    for step in (1, 2, 3):
        log.write({"type": "step", "step": step, "loss": 0.5})
    with path.open("a") as f:
        f.write('{"type": "step", "step": 4, "lo')
    assert [r["step"] for r in read_log(path)] == [1, 2, 3]
    log.truncate_after(2)
    assert [r["step"] for r in read_log(path)] == [1, 2] and path.read_text().endswith("\n")
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=r"log.jsonl, line 2: not JSON"):
        read_log(path)


def test_each_epoch_line_names_the_worst_classes_of_its_validation(data, tmp_path, capsys):
    """Per-class results at every validation, not only at the end: a collapse shows while the run goes on."""
    assert main(["train", "test_vit", "linear", "--data", str(data), "--img-size", str(IMG), "--batch-size", "6",
                 "--workers", "0", "--epochs", "1", "--val-fraction", "0.5", "--no-progress",
                 "--output", str(tmp_path / "run")]) == 0  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1:")]
    assert len(lines) == 1 and ", val top-1 " in lines[0], lines
    worst = lines[0].split("; worst recall: ")[1].split(", ")
    assert len(worst) == 3 and all(item.split(" ")[0] in ("cat", "dog", "fox") for item in worst), lines[0]


def test_the_epoch_line_shows_only_the_worst_three_classes_worst_first():
    from sidetune.tasks import make_task
    from sidetune.train.commands import _epoch_line

    task = make_task("classification")
    record = {"epoch": 2, "train_loss": 0.5, "val_top1": 0.6, "val_mean_class_acc": 0.6, "val_count": 40,
              "val_per_class": [0.9, 0.2, 0.7, 0.6], "val_support": [10] * 4,
              "val_predicted": [12, 6, 11, 11]}  # fmt: skip
    line = _epoch_line(record, task, ["a", "b", "c", "d"])
    assert line.endswith("; worst recall: b 0.20, d 0.60, c 0.70") and "\n" not in line
