"""benchmarks/side_gap.py: the commands its runs are made with, and the CamVid study's page from finished runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gap():
    spec = importlib.util.spec_from_file_location("side_gap", REPO / "benchmarks" / "side_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dataset", ["camvid", "bccd"])
def test_a_schedule_study_runs_every_method_at_both_schedules_side_methods_from_the_cache(gap, dataset) -> None:
    study = gap.SCHEDULES[dataset]
    runs = {spec.name: spec for spec in gap.STUDIES[dataset]}
    heads = {f"{m}-{study['epochs'][0]}-head{x:g}": x for m in gap.HEAD_METHODS for x in gap.HEAD_MULTS}
    assert set(runs) == {f"{m}-{e}" for m in study["rates"] for e in study["epochs"]} | set(heads)
    for name, mult in heads.items():  # the head-rate runs: the page's schedule, the method's rate, a head multiple
        assert runs[name].epochs == study["epochs"][0] and runs[name].args[-2:] == ["--head-lr-mult", f"{mult:g}"]
        runs.pop(name)
    assert all(spec.kind == ("train" if spec.args[0] == "lora" else "cached") for spec in runs.values())
    assert all(spec.args[1:3] == ["--lr", study["rates"][spec.args[0]]] for spec in gap.STUDIES[dataset])
    assert [spec.epochs for spec in gap.STUDIES[dataset][: len(runs)]] == sorted(
        (s.epochs for s in runs.values()), reverse=True
    )
    assert gap.STUDIES[dataset][0].name == f"lora-{max(study['epochs'])}"  # the longest run starts first


def test_a_run_is_made_with_its_own_epochs_and_the_datasets_settings(gap, tmp_path, monkeypatch) -> None:
    made = []
    monkeypatch.setattr(gap, "sidetune", lambda args, log, threads: made.append(args))
    gap.run(gap.Run("e3va-12", "camvid", "cached", ["e3va", "--lr", "3e-3"], 12), tmp_path, 1)
    gap.run(gap.Run("224px", "sign-digits", "train", ["losa", "--lr", "3e-3"], img_size=224), tmp_path, 1)
    gap.run(gap.Run("lora-15", "bccd", "train", ["lora", "--lr", "1e-3"], 15), tmp_path, 1)
    camvid, digits, bccd = made

    def value(args: list[str], flag: str) -> str:
        return args[len(args) - 1 - args[::-1].index(flag) + 1]  # the last occurrence wins, as in argparse

    assert camvid[:3] == ["train", "vit_small_patch14_dinov2", "e3va"]
    assert value(camvid, "--epochs") == "12" and value(camvid, "--batch-size") == "8"
    assert value(camvid, "--task") == "segmentation" and value(camvid, "--augmentation") == "none"
    assert value(camvid, "--img-size") == "224" and value(camvid, "--lr") == "3e-3"
    assert value(camvid, "--cache") == str(tmp_path / "caches" / "camvid")
    assert value(camvid, "--data").endswith("camvid-240x180")
    assert value(digits, "--epochs") == "10" and value(digits, "--batch-size") == "32"
    assert value(digits, "--img-size") == "224" and "--cache" not in digits and "--augmentation" not in digits
    assert value(bccd, "--task") == "detection" and value(bccd, "--epochs") == "15" and "--cache" not in bccd
    assert [bccd[i + 1] for i, a in enumerate(bccd) if a == "--head-opt"] == [
        "fpn_channels=128",
        "box_head_dim=256",
        "box_batch_size_per_image=128",
    ]  # the results page's head


def _finished_run(folder: Path, best: float, vals: list[float], losses: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder.parent / f"{folder.name}.log").write_text(f"$ sidetune train {folder.name}\nmore output\n")
    best_epoch = vals.index(max(vals)) + 1
    summary = {"metrics": {"headline": "mIoU", "best_val": best, "best_epoch": best_epoch}, "data": {"val": 73}}
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
            losses = [1.0 / (i + 1) for i in range(epochs)]
            folders[f"{method}-{epochs}"] = tmp_path / "camvid" / f"{method}-{epochs}"
            _finished_run(folders[f"{method}-{epochs}"], score, vals, losses)
    for method in gap.HEAD_METHODS:
        for mult in gap.HEAD_MULTS:
            name = f"{method}-{short}-head{mult:g}"
            folders[name] = tmp_path / "camvid" / name
            _finished_run(folders[name], best[method][0] + 0.001 * mult, [0.1] * short, [1.0] * short)
    gap.write_schedule("camvid", folders, argparse.Namespace(out=tmp_path / "out"))

    page = (tmp_path / "out" / "side_gap_camvid.md").read_text()
    assert f"| e3va | 3e-3 | 0.410 ({short}) | 0.450 ({long}) | +4.0 |" in page
    assert f"| e3va | {2.0:.1f} | {1.0:.1f} |" in page  # LoRA's lead shrinks from 2 points to 1
    assert f"| linear | {4.0:.1f} | {6.0:.1f} |" in page
    assert f"{1 / long:.3f} ({(1 / long - 1 / (long - 1)) / (1 / (long - 1)):+.0%})" in page  # last loss, change
    assert "| e3va | 0.410 | 0.410 | 0.413 |" in page and "| lora | 0.430 | 0.430 | 0.433 |" in page
    assert "validation is 73" in page and "- `sidetune train lora-12`" in page
    saved = json.loads((tmp_path / "out" / "side_gap_camvid.json").read_text())
    assert saved["rows"]["losa"][str(long)]["val_by_epoch"][-1] == pytest.approx(0.44)
    assert saved["rows"]["lora"][str(short)]["best_epoch"] == short
