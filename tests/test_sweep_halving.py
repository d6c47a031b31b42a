"""``sweep(..., halving=eta)`` and ``sidetune sweep --halving``: successive halving over a tap cache.

A tiny LoSA cache (test_vit at 32 px, 12 training and 6 validation images, batches of 3: 4 steps per epoch); the
grid of 4 (2 learning rates x 2 ranks) for 2 epochs (8 steps) with eta 2 is cut after steps 2 and 4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sidetune.cache import build
from sidetune.cache.sweep import expand, halving_budget, rung_steps, sweep
from sidetune.cli import main
from sidetune.errors import ConfigError
from train_data import make_image_folder, task_config

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = {"lr": [1e-3, 1e-2], "channel_rank": [2, 4]}
SETTINGS = dict(epochs=2, batch_size=3, warmup_epochs=0.5)


@pytest.fixture(scope="module")
def module_one_thread():
    """One torch thread for the module's shared sweeps too (``one_thread`` is per test, set after them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, module_one_thread) -> Path:
    root = tmp_path_factory.mktemp("halving")
    data = make_image_folder(root / "data")
    config = task_config("classification", data, root / "x", method="losa", val_fraction=0.34, batch_size=3)
    build(config, ["losa"], root / "cache")
    return root / "cache"


@pytest.fixture(scope="module")
def exhaustive(cache, tmp_path_factory):
    return sweep(cache, "losa", GRID, tmp_path_factory.mktemp("exhaustive") / "sweep", **SETTINGS)


@pytest.fixture(scope="module")
def halved(cache, tmp_path_factory):
    return sweep(cache, "losa", GRID, tmp_path_factory.mktemp("halved") / "sweep", halving=2, **SETTINGS)


def log(result, k: int) -> list[dict]:
    path = result.output / "configs" / f"{k:03d}" / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("n", "eta", "total", "cuts"),
    [
        (9, 3, 18, [2, 6]),  # T/9, T/3; the survivor trains to T
        (4, 2, 16, [4, 8]),  # T/4, T/2
        (1, 3, 18, []),  # one configuration: nothing to cut
        (5, 3, 18, [2, 6]),  # ceil(log_3 5) = 2 cuts
        (27, 3, 81, [3, 9, 27]),  # T/27, T/9, T/3
        (125, 5, 625, [5, 25, 125]),  # exactly 3 cuts: in floats, ceil(math.log(125, 5)) is 4
        (9, 3, 2, [1]),  # 2/9 and 2/3 both round to step 1 (clamped, the duplicate dropped)
        (9, 3, 1, []),  # a cut at the last step saves nothing
    ],
)
def test_rung_steps_follow_the_hyperband_schedule(n, eta, total, cuts):
    assert rung_steps(n, eta, total) == cuts


def test_the_budget_of_9_configurations_with_eta_3_is_7_thirds_of_one_run():
    # 9 x T/9 + 3 x (T/3 - T/9) + 1 x (T - T/3) = 7/3 T, against 9 T for the exhaustive grid
    assert halving_budget(9, 3, rung_steps(9, 3, 90), 90) == 210
    assert halving_budget(4, 2, [], 8) == 32  # no cut: the exhaustive grid's steps


def test_rung_steps_refuse_what_has_no_schedule():
    with pytest.raises(ValueError, match="eta >= 2"):
        rung_steps(9, 1, 18)


def test_a_grid_that_repeats_a_value_is_refused():
    assert len(expand({"lr": [1e-3, 3e-3], "channel_rank": [8]})) == 2
    with pytest.raises(ConfigError, match=r"the grid repeats lr 0.001 .*give each value once"):
        expand({"lr": [1e-3, 0.001], "channel_rank": [8]})


def test_a_survivor_trains_exactly_as_in_the_exhaustive_sweep(exhaustive, halved):
    assert halved.summary["timing"]["steps_per_epoch"] == 4 and rung_steps(4, 2, 8) == [2, 4]
    k = halved.best
    assert halved.configs[k]["stopped_at_step"] is None and halved.configs[k]["steps"] == 8
    steps = [r for r in log(halved, k) if r["type"] == "step"]
    same = [r for r in log(exhaustive, k) if r["type"] == "step"]
    assert steps == same  # every loss and learning rate bit for bit: same batches, stream and cosine over all 8
    # the epoch records (training totals, validation metrics) too: the model at each epoch's end is the same
    epochs = [r for r in log(halved, k) if r["type"] == "epoch"]
    assert epochs == [r for r in log(exhaustive, k) if r["type"] == "epoch"] and len(epochs) == 2
    # here its best is at epoch 1 in both (the second cut falls at epoch 1's end): the same adapter, bit for bit
    assert halved.configs[k]["best_epoch"] == exhaustive.configs[k]["best_epoch"] == 1
    a, b = (load_file(r.output / "configs" / f"{k:03d}" / "best" / "adapter_model.safetensors")
            for r in (halved, exhaustive))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_stopped_configurations_take_fewer_steps_and_keep_their_best_adapter(halved):
    rows, timing = halved.configs, halved.summary["timing"]
    stopped = [r for r in rows if r["stopped_at_step"] is not None]
    assert sorted(r["stopped_at_step"] for r in stopped) == [2, 2, 4]  # 4 -> 2 -> 1
    for row in rows:
        records = log(halved, row["config"])
        steps = [r["step"] for r in records if r["type"] == "step"]
        assert len(steps) == row["steps"] and steps == list(range(1, row["steps"] + 1))
        if row["stopped_at_step"] is not None:
            assert row["steps"] == row["stopped_at_step"] < 8
            assert row["stopped_at_epoch"] == row["stopped_at_step"] / 4
            # no evaluation after the stop; the rung that stopped it says so
            assert all(r["step"] <= row["stopped_at_step"] for r in records)
            assert records[-1]["type"] == "rung" and records[-1]["kept"] is False
            assert row["rung_scores"][-1] == records[-1]["val_top1"]
            assert (halved.output / "configs" / f"{row['config']:03d}" / "best" / "adapter_model.safetensors").is_file()
    assert timing["side_network_steps"] == sum(r["steps"] for r in rows) == 4 * 2 + 2 * 2 + 1 * 4
    assert timing["exhaustive_side_network_steps"] == 4 * 8
    cuts = halved.summary["halving"]["cuts"]
    assert [(c["step"], c["active"], len(c["kept"])) for c in cuts] == [(2, 4, 2), (4, 2, 1)]
    # kept: the best ceil(active / eta), ties to the lower index
    for c in cuts:
        ranked = sorted(zip(c["configs"], c["scores"], strict=True), key=lambda x: (-x[1], x[0]))
        assert c["kept"] == sorted(k for k, _ in ranked[: len(c["kept"])])
    md = (halved.output / "sweep.md").read_text()
    assert "Successive halving, eta 2" in md and "Side-network steps: 16 against 32" in md
    header = (halved.output / "sweep.csv").read_text().splitlines()[0].split(",")
    assert {"steps", "stopped_at_step", "stopped_at_epoch", "rung_scores"} <= set(header)
    assert json.loads((halved.output / "sweep.json").read_text())["halving"]["eta"] == 2


def test_the_exhaustive_sweep_records_no_halving(exhaustive):
    assert exhaustive.summary["halving"] is None
    assert all(r["steps"] == 8 and "stopped_at_step" not in r for r in exhaustive.configs)
    assert all(r["type"] != "rung" for k in range(4) for r in log(exhaustive, k))


def test_the_choice_is_among_configurations_that_trained_the_whole_budget(cache, tmp_path, monkeypatch):
    """Configuration 1 scores best of all (0.95) at the first cut, then loses the second and stops: configuration
    2, the one that trained all 8 steps, is chosen though its best (0.6) is lower."""
    import sidetune.train.loop as loop

    real = loop.evaluate_split
    table = {0: [0.2], 1: [0.95, 0.1], 2: [0.3, 0.6, 0.5], 3: [0.1]}  # validation top-1 per call, in order
    seen: list[int] = []

    def scripted(task, model, dataset, *args, **kwargs):
        metrics = real(task, model, dataset, *args, **kwargs)
        if id(model) not in seen:
            seen.append(id(model))  # the first cut scores configurations 0..3 in order
        k = seen.index(id(model))
        if table[k]:  # validation calls; the chosen one's test call finds its list empty
            metrics["top1"] = table[k].pop(0)
        return metrics

    monkeypatch.setattr(loop, "evaluate_split", scripted)
    result = sweep(cache, "losa", GRID, tmp_path / "sweep", halving=2, **SETTINGS)
    assert not any(table.values())  # each scripted score was used: cut 1, cut 2 (= epoch 1's end), epoch 2
    assert result.configs[1]["best_val_top1"] == 0.95 and result.configs[1]["stopped_at_step"] == 4
    assert result.best == 2 and result.configs[2]["best_val_top1"] == 0.6
    assert result.summary["chosen"]["config"] == 2 and result.test is not None


def test_a_diverged_configuration_stops_at_once_and_is_never_kept(cache, tmp_path):
    result = sweep(cache, "losa", {"lr": [1e-2, 1e30]}, tmp_path / "sweep", halving=2, **SETTINGS)
    diverged = result.configs[1]
    assert diverged["diverged"] and diverged["steps"] == diverged["stopped_at_step"] < 4  # before the cut at 4
    assert result.summary["halving"]["cuts"][0]["configs"] == [0]
    assert result.best == 0 and result.configs[0]["steps"] == 8


def test_halving_refuses_a_rate_below_2_and_a_cache_without_validation(cache, tmp_path):
    for eta in (1, 0, True, 2.5):
        with pytest.raises(ConfigError, match="ETA must be an integer >= 2"):
            sweep(cache, "losa", GRID, tmp_path / "sweep", halving=eta, **SETTINGS)
    data = make_image_folder(tmp_path / "data")  # train and test only
    config = task_config("classification", data, tmp_path / "x", method="losa", batch_size=3)
    build(config, ["losa"], tmp_path / "no-val")
    with pytest.raises(ConfigError, match=r"no validation split.*--val-fraction"):
        sweep(tmp_path / "no-val", "losa", GRID, tmp_path / "sweep", halving=3, **SETTINGS)
    assert not (tmp_path / "sweep").exists()  # refused before anything was written


def test_sweep_command_with_halving_prints_each_cut(cache, tmp_path, capsys):
    args = ["sweep", "losa", "--cache", str(cache), "--lr", "1e-3,1e-2", "--opt", "channel_rank=2,4",
            "--epochs", "2", "--batch-size", "3"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "one"), "--halving", "1"]) == 2
    assert "ETA must be an integer >= 2" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "sweep"), "--halving", "2"]) == 0
    out = capsys.readouterr().out
    assert "successive halving, eta 2: cuts after steps 2, 4; about 16 side-network steps against 32" in out
    assert re.search(r"^cut 1 at step 2: kept 2 of 4: configs \d, \d$", out, re.M)
    assert re.search(r"^cut 2 at step 4: kept 1 of 2: configs \d$", out, re.M)
    assert "side-network steps: 16 against 32 for the exhaustive grid" in out
    for name in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png", "best/adapter_model.safetensors"):
        assert (tmp_path / "sweep" / name).is_file(), name


def load_benchmark():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("cache_benchmark", REPO / "benchmarks" / "cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_times_a_halving_sweep_beside_one_cached_run_and_reports_it(cache, tmp_path):
    bench = load_benchmark()
    data = Path(json.loads((cache / "manifest.json").read_text())["data"]["data"])
    alone = task_config("classification", data, tmp_path / "losa-cached-retimed", method="losa", val_fraction=0.34,
                        cache=str(cache), **SETTINGS)  # fmt: skip
    record = bench.halving_sweep(cache, "losa", GRID, tmp_path, alone, eta=2, **SETTINGS)
    assert record["eta"] == 2 and record["configs"] == 4
    assert record["side_network_steps"] == 16 and record["exhaustive_side_network_steps"] == 32
    assert record["x_one_cached_run"] == record["wall_time_s"] / record["cached_run_wall_time_s"]
    assert [c["step"] for c in record["cuts"]] == [2, 4] and record["test_top1"] is not None
    made = (tmp_path / "losa-sweep-halving" / "sweep.json").stat().st_mtime_ns
    assert bench.halving_sweep(cache, "losa", GRID, tmp_path, alone, eta=2, **SETTINGS) == record  # kept, reused
    assert (tmp_path / "losa-sweep-halving" / "sweep.json").stat().st_mtime_ns == made
    # the page: a report made before halving was measured still renders (--report-only); with it, a table and a target
    from conftest import REPO

    report = json.loads((REPO / "docs" / "benchmarks" / "cache.json").read_text())
    for row in report["methods"].values():
        row.pop("sweep_halving", None)  # the page's report as it was before halving was measured
    before = bench.render(report)
    assert "not measured in this report" in before and "## Sweep of 9 with successive halving" not in before
    for row in report["methods"].values():
        row["sweep_halving"] = {**record, "x_one_cached_run": 2.5}
    page = bench.render(report)
    assert "## Sweep of 9 with successive halving" in page and "| 16 (32, 0.50x) | 2 (2 of 4), 4 (1 of 2) |" in page
    assert page.count("met (2.5x, eta 2) |") == len(report["methods"])


def test_sweep_command_sweeps_the_head_rate(cache, tmp_path, capsys):
    args = ["sweep", "losa", "--cache", str(cache), "--lr", "1e-2", "--epochs", "1", "--batch-size", "3"]
    assert main([*args, "--head-lr-mult", "1,10", "--output", str(tmp_path / "sweep")]) == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["grid"]["head_lr_mult"] == [1, 10] and len(summary["configs"]) == 2
    assert main([*args, "--head-lr-mult", "0", "--output", str(tmp_path / "zero")]) != 0
    assert "--head-lr-mult: 0 is not a finite number > 0" in capsys.readouterr().err
