"""benchmarks/side_gap.py: its runs are the results page's runs (settings, rates), a finished run made otherwise is
refused, and a schedule study's page is read right from finished runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = json.loads((REPO / "docs" / "results" / "results.json").read_text())["datasets"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gap():
    return _script("side_gap")


@pytest.fixture(scope="module")
def results():
    return _script("results")


def _commands(gap, runs, work: Path, monkeypatch) -> list[list[str]]:
    made = []
    monkeypatch.setattr(gap, "sidetune", lambda args, log, threads: made.append(args))
    for spec in runs:
        gap.run(spec, work, 1)
    return made


@pytest.mark.parametrize("dataset", ["camvid", "bccd"])
def test_a_schedule_study_runs_each_method_at_the_pages_rate_and_schedule_and_three_times_it(gap, dataset) -> None:
    study, page = gap.SCHEDULES[dataset], PAGE[dataset]
    assert study["epochs"] == (page["setting"]["epochs"], 3 * page["setting"]["epochs"])
    assert {m: float(lr) for m, lr in study["rates"].items()} == {m: page["methods"][m]["lr"] for m in study["rates"]}
    runs = {spec.name: spec for spec in gap.STUDIES[dataset]}
    short, long = study["epochs"]
    heads = {f"{m}-{short}-head{x:g}": x for m in gap.HEAD_METHODS for x in gap.HEAD_MULTS}
    assert set(runs) == {f"{m}-{e}" for m in study["rates"] for e in study["epochs"]} | set(heads)
    for name, mult in heads.items():  # the head-rate runs: the page's schedule, the method's rate, a head multiple
        assert runs[name].epochs == short and runs[name].args[-2:] == ["--head-lr-mult", f"{mult:g}"]
    assert all(spec.kind == ("train" if spec.args[0] == "lora" else "cached") for spec in runs.values())
    assert all(spec.args[1:3] == ["--lr", study["rates"][spec.args[0]]] for spec in runs.values())
    assert gap.STUDIES[dataset][0].name == f"lora-{long}"  # the longest run starts first


@pytest.mark.parametrize("dataset", ["camvid", "bccd"])
def test_every_study_run_has_the_settings_of_the_pages_run_of_its_method(gap, results, dataset, tmp_path,
                                                                         monkeypatch) -> None:  # fmt: skip
    from sidetune.cli import build_parser
    from sidetune.train.commands import config_from_args

    page = results.Page(argparse.Namespace(runs=str(tmp_path / "page"), epochs=0, img_size=None, val_fraction=0.2,
                                           mixed_precision="bf16", threads=1, train_limit=None, label=""))  # fmt: skip
    runs = gap.STUDIES[dataset]
    for spec, command in zip(runs, _commands(gap, runs, tmp_path, monkeypatch), strict=True):
        config = config_from_args(build_parser("train").parse_args(command))
        out = tmp_path / dataset / spec.name
        cache = {"cache": str(tmp_path / "caches" / dataset)} if spec.kind == "cached" else {}
        head = {"head_lr_mult": float(spec.args[-1])} if "--head-lr-mult" in spec.args else {}
        asked = page.config(dataset, spec.args[0], out, lr=float(spec.args[2]), seed=0, epochs=spec.epochs,
                            **cache, **head)  # fmt: skip
        assert results.normalised(config.to_dict()) == results.normalised(asked), spec.name


def test_the_losa_study_makes_the_commands_its_page_lists(gap, tmp_path, monkeypatch) -> None:
    """The runs behind docs/results/side_gap.md keep their commands (``--task classification``, the default, aside)."""
    listed = re.findall(r"^- `(sidetune .*)`$", (REPO / "docs" / "results" / "side_gap.md").read_text(), re.M)
    made = []
    for command in _commands(gap, gap.RUNS, tmp_path, monkeypatch):
        text = shlex.join(a for i, a in enumerate(command) if "--task" not in command[max(i - 1, 0) : i + 1])
        made.append(
            "sidetune " + text.replace(str(tmp_path), "runs/side_gap").replace(str(gap.SHARED), "../shared/assets")
        )
    assert sorted(made) == sorted(listed)


def _finished_run(folder: Path, vals: list[float], losses: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder.parent / f"{folder.name}.log").write_text(f"$ sidetune train {folder.name}\nmore output\n")
    best_epoch = vals.index(max(vals)) + 1
    summary = {"metrics": {"headline": "mIoU", "best_val": max(vals), "best_epoch": best_epoch}, "data": {"val": 73}}
    (folder / "summary.json").write_text(json.dumps(summary))
    epochs = [{"type": "epoch", "epoch": i + 1, "train_loss": loss, "val_mIoU": v}
              for i, (v, loss) in enumerate(zip(vals, losses, strict=True))]  # fmt: skip
    lines = [json.dumps({"type": "step", "epoch": 1, "loss": 9.0})] + [json.dumps(r) for r in epochs]
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")


def test_the_schedule_page_reads_each_runs_best_validation_and_its_gap_to_lora(gap, tmp_path) -> None:
    short, long = gap.SCHEDULES["camvid"]["epochs"]
    best = {"lora": (0.43, 0.46), "e3va": (0.41, 0.45), "linear": (0.39, 0.40), "losa": (0.40, 0.44)}
    folders = {}
    for method, scores in best.items():
        for epochs, score in zip((short, long), scores, strict=True):
            vals = [score - 0.01 * (epochs - 1 - i) for i in range(epochs)]  # rising to the best at the last epoch
            if method == "linear" and epochs == long:  # the best epoch in the middle of the long run
                vals = [0.45 if i == 5 else 0.3 for i in range(epochs)]
            losses = [1.0 / (i + 1) for i in range(epochs)]
            folders[f"{method}-{epochs}"] = tmp_path / "camvid" / f"{method}-{epochs}"
            _finished_run(folders[f"{method}-{epochs}"], vals, losses)
    for method in gap.HEAD_METHODS:
        for mult in gap.HEAD_MULTS:
            name = f"{method}-{short}-head{mult:g}"
            folders[name] = tmp_path / "camvid" / name
            _finished_run(folders[name], [0.1] * (short - 1) + [best[method][0] + 0.01 * mult], [1.0] * short)
    gap.write_schedule("camvid", folders, argparse.Namespace(out=tmp_path / "out"))

    page = (tmp_path / "out" / "side_gap_camvid.md").read_text()
    assert f"| e3va | 3e-3 | 0.410 ({short}) | 0.450 ({long}) | +4.0 |" in page
    linear_long = json.loads((tmp_path / "out" / "side_gap_camvid.json").read_text())["rows"]["linear"][str(long)]
    assert linear_long["best_epoch"] == 6 and f"| linear | 1e-2 | 0.390 ({short}) | 0.450 (6) |" in page
    assert f"| e3va | {2.0:.1f} | {1.0:.1f} |" in page  # LoRA's lead shrinks from 2 points to 1
    assert f"| linear | {4.0:.1f} | {1.0:.1f} |" in page
    assert f"{1 / long:.3f} ({(1 / long - 1 / (long - 1)) / (1 / (long - 1)):+.0%})" in page  # last loss, change
    assert "| e3va | 0.413 | 0.410 | 0.440 |" in page and "| lora | 0.433 | 0.430 | 0.460 |" in page  # x0.3, x1, x3
    e3va_long = " | ".join(f"{0.45 - 0.01 * (long - 1 - i):.3f}" for i in range(long))
    assert f"| e3va | {e3va_long} |" in page  # validation after every epoch of the long run
    assert "validation is 73 images" in " ".join(page.split())  # the page's text is wrapped
    assert "- `sidetune train lora-12`" in page and "- `sidetune train e3va-4-head3`" in page
    saved = json.loads((tmp_path / "out" / "side_gap_camvid.json").read_text())
    assert saved["gap_to_lora"]["losa"][str(long)] == pytest.approx(0.02)
    assert saved["head_rate"]["lora"]["0.3"]["val"] == pytest.approx(0.433)
    assert saved["rows"]["lora"][str(short)]["best_epoch"] == short


def test_a_finished_run_made_by_another_command_is_refused(gap, tmp_path, monkeypatch) -> None:
    spec = gap.Run("e3va-4", "camvid", "cached", ["e3va", "--lr", "3e-3"], 4)
    (command,) = _commands(gap, [spec], tmp_path, monkeypatch)
    out = tmp_path / "camvid" / "e3va-4"
    out.mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    log = out.parent / "e3va-4.log"
    log.write_text("$ sidetune " + shlex.join(command).replace("--threads 1", "--threads 2") + "\n")
    assert gap.run(spec, tmp_path, 1) == out  # the same command, other threads: reused
    with pytest.raises(SystemExit, match="made by another command"):
        gap.run(spec._replace(args=["e3va", "--lr", "1e-3"]), tmp_path, 1)
    with pytest.raises(SystemExit, match="made by another command"):
        gap.run(spec._replace(epochs=12, name="e3va-4"), tmp_path, 1)


def test_the_regularisation_study_reads_each_setting_against_the_unregularised_configuration(gap, tmp_path) -> None:
    folder = tmp_path / "sign-digits" / "regularisation"
    folder.mkdir(parents=True)
    (folder.parent / "regularisation.log").write_text("$ sidetune sweep losa --weight-decay 1e-4,0.05,0.3\n")
    configs = [{"lr": lr, "weight_decay": wd, "task.label_smoothing": ls, "channel_rank": 64, "read": "norm",
                "best_val_top1": 0.9 + lr * 10 + wd / 10 - ls / 2, "final_train_loss": 0.01 + ls}
               for lr in (1e-3, 3e-3) for wd in (1e-4, 0.05, 0.3) for ls in (0, 0.1)]  # fmt: skip
    (folder / "sweep.json").write_text(json.dumps({"configs": configs}))
    rows = {}
    for suspect, _, (name, setting), (ref_name, ref_setting) in gap.REGULARISATION:
        assert name == ref_name == "regularisation"  # one sweep holds every setting and its reference
        rows[suspect] = gap.scores(folder, setting)["val"] - gap.scores(folder, ref_setting)["val"]
    assert len(rows) == 6
    assert rows["weight decay 0.3 (lr 3e-3)"] == pytest.approx((0.3 - 1e-4) / 10)
    assert rows["label smoothing 0.1 (lr 1e-3)"] == pytest.approx(-0.05)
    assert gap.STUDIES["regularisation"][0].args[:5] == ["losa", *gap.BEST]  # the variant of the other checks
