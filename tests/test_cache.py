"""The tap cache: build, train from it (every task) without the backbone, resume a build, refuse stale caches, sweep."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sidetune
from sidetune.backbones import TimmBackbone
from sidetune.cache import CacheError, Manifest, build
from sidetune.cache.sweep import sweep
from sidetune.errors import ConfigError
from sidetune.train import fit
from train_data import IMG, files, make_task_data, step_losses, task_config

build_module = importlib.import_module("sidetune.cache.build")
TASKS = ("classification", "segmentation", "detection")
# deterministic transforms: a cached run must see the images of an uncached one
DETERMINISTIC = {
    "classification": dict(method="losa", augmentation="vtab", val_fraction=0.34, test_split="none"),
    "segmentation": dict(augmentation="none"),
    "detection": dict(augmentation="none", val_split="none"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-data")
    return {task: make_task_data(task, root / task) for task in TASKS}


def no_backbone(monkeypatch):
    """Make any backbone forward fail: a cached run must never call it."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("the backbone ran during a cached run")

    monkeypatch.setattr(TimmBackbone, "_run", refuse)


@pytest.mark.parametrize("task", TASKS)
def test_training_from_the_cache_reproduces_uncached_training_without_the_backbone(
    task, datasets, tmp_path, monkeypatch
):
    opts = DETERMINISTIC[task]
    method = opts.get("method", "e3va")
    config = task_config(task, datasets[task], tmp_path / "plain", **opts)
    plain = fit(config)
    build(config, [method], tmp_path / "cache", batch_size=4, shard_size=5)
    no_backbone(monkeypatch)
    cached = fit(task_config(task, datasets[task], tmp_path / "cached", cache=str(tmp_path / "cache"), **opts))
    a, b = step_losses(tmp_path / "plain"), step_losses(tmp_path / "cached")
    assert len(a) == len(b) >= 4
    tolerance = 5e-3 if task != "detection" else 5e-2  # float16 taps; the RPN's sampling reacts to tiny changes
    assert b == pytest.approx(a, rel=tolerance, abs=tolerance)
    if task != "detection":
        pm, cm = plain.summary["metrics"]["final_val"], cached.summary["metrics"]["final_val"]
        key = "top1" if task == "classification" else "mIoU"
        assert cm[key] == pytest.approx(pm[key], abs=0.02)
    assert cached.summary["data"]["source"].startswith("tap cache")


def test_a_cached_detection_run_is_scored_against_the_files_it_was_cached_from(datasets, tmp_path, monkeypatch):
    """Validation and test from a detection cache: COCO ground truth comes from the split's source files (a cached
    split holds letterboxed images, not the records to_coco reads), sample for sample as the uncached run has it."""
    from sidetune.cache.reader import open_cache
    from sidetune.data import to_coco
    from sidetune.tasks import make_task
    from sidetune.train.setup import resolve_mixed_precision

    opts = dict(augmentation="none", val_fraction=0.34, test_split="val")  # validation carved from train; VOC val
    config = task_config("detection", datasets["detection"], tmp_path / "plain", **opts)
    build(config, ["e3va"], tmp_path / "cache", batch_size=4)
    no_backbone(monkeypatch)
    run = task_config("detection", datasets["detection"], tmp_path / "cached", cache=str(tmp_path / "cache"), **opts)
    result = fit(run)
    for key in ("final_val", "test"):
        assert 0.0 <= result.summary["metrics"][key]["bbox_mAP"] <= 1.0
    task = make_task("detection", run.task_options)
    torch.manual_seed(run.seed)  # the model fit() built, so its backbone's fingerprint is the cache's
    model = sidetune.create(run.backbone, run.method, num_classes=len(task.scan_classes(run)), img_size=run.img_size,
                            backbone_kwargs=run.backbone_kwargs, **task.model_kwargs(run))  # fmt: skip
    data = open_cache(run, model, task, resolve_mixed_precision(run.mixed_precision, True))
    for split in (data.val, data.test):
        cached, files = to_coco(split).dataset, to_coco(split.source).dataset
        assert cached["images"] == files["images"] and cached["annotations"] == files["annotations"]
        assert len(cached["images"]) == len(split) > 0


def test_cache_holds_only_what_the_methods_read(datasets, tmp_path):
    splits = dict(test_split="none", val_split="none")
    config = task_config("classification", datasets["classification"], tmp_path / "x", method="e3va", **splits)
    manifest = build(config, ["e3va"], tmp_path / "e3va-cache", splits=("train",))
    assert set(manifest.taps) >= {"attn.0", "mlp.0", "out.5"}
    assert set(manifest.taps.values()) == {1}  # E3VA on a class-token ViT reads the class token only
    full = build(config, ["losa", "e3va"], tmp_path / "union", splits=("train",))
    assert full.taps["out.5"] is None and full.taps["attn.0"] == 1  # the union: LoSA needs every token
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "e3va-cache").glob("train-*"))), "pt") as f:
        assert f.get_slice("tap.attn.0").get_shape() == [18, 1, 64]  # 18 images, the class token, 64 channels
    with safe_open(str(next((tmp_path / "union").glob("train-*"))), "pt") as f:
        assert f.get_slice("tap.out.5").get_shape() == [18, 5, 64]  # every token of the 2x2 grid + the class token
    # a head that also reads the last blocks' mean patch tokens needs every token of those blocks, not of the rest
    read = build(config, ["e3va"], tmp_path / "read", splits=("train",), method_options={"e3va": {"probe_blocks": 2}})
    assert read.taps["out.4"] is None and read.taps["out.5"] is None
    assert read.taps == {**manifest.taps, "out.4": None, "out.5": None}  # the rest: the class token only
    with pytest.raises(CacheError, match=r"Build a cache with --methods e3va --opt e3va\.probe_blocks=2 "):
        fit(task_config("classification", datasets["classification"], tmp_path / "r0", method="e3va",
                        method_options={"probe_blocks": 2}, cache=str(tmp_path / "e3va-cache"), **splits))  # fmt: skip
    with pytest.raises(CacheError, match=r"method 'losa' reads what the cache .* lacks: .*hold only the leading"):
        fit(task_config("classification", datasets["classification"], tmp_path / "r", method="losa",
                        cache=str(tmp_path / "e3va-cache"), **splits))  # fmt: skip
    with pytest.raises(CacheError, match=r"taps .* are not cached"):
        fit(task_config("classification", datasets["classification"], tmp_path / "r2", method="linear",
                        cache=str(tmp_path / "e3va-cache"), **splits))  # fmt: skip


def test_in_place_methods_are_refused(datasets, tmp_path):
    config = task_config("classification", datasets["classification"], tmp_path / "x")
    with pytest.raises(ConfigError, match=r"'lora' changes the backbone .* cannot be cached"):
        build(config, ["lora"], tmp_path / "c")


def test_an_interrupted_build_resumes_at_its_first_missing_shard(datasets, tmp_path, monkeypatch):
    config = task_config("classification", datasets["classification"], tmp_path / "x", method="losa")
    real = build_module.write_shard
    calls = {"n": 0}

    def dying(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(build_module, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build(config, ["losa"], tmp_path / "c", shard_size=4)
    monkeypatch.undo()
    assert not Manifest.load(tmp_path / "c").complete
    written = sorted((tmp_path / "c").glob("*.safetensors"))
    assert len(written) == 2 and not list((tmp_path / "c").glob(".*tmp"))
    with pytest.raises(CacheError, match="incomplete"):
        fit(task_config("classification", datasets["classification"], tmp_path / "r", cache=str(tmp_path / "c")))
    stamps = {p.name: p.stat().st_mtime_ns for p in written}
    manifest = build(config, ["losa"], tmp_path / "c", shard_size=4)
    assert manifest.complete and sum(s["samples"] for s in manifest.splits.values()) == 24
    assert all((tmp_path / "c" / name).stat().st_mtime_ns == ns for name, ns in stamps.items())  # not rewritten


def test_resuming_a_build_accepts_files_copied_again_and_refuses_edited_ones(datasets, tmp_path):
    import shutil as sh

    data = tmp_path / "data"
    sh.copytree(datasets["classification"], data)
    config = task_config("classification", data, tmp_path / "x", method="losa")
    build(config, ["losa"], tmp_path / "c")
    image = next((data / "train" / "cat").iterdir())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert build(config, ["losa"], tmp_path / "c").complete  # same bytes: the same cache
    image.write_bytes(image.read_bytes()[::-1])  # same size, other bytes
    with pytest.raises(CacheError, match=rf"files differ: '.*{image.name}' was modified since the build"):
        build(config, ["losa"], tmp_path / "c")


def test_stale_or_broken_caches_are_refused_naming_what_differs(datasets, tmp_path):
    data = datasets["classification"]
    opts = dict(method="losa", test_split="none")
    config = task_config("classification", data, tmp_path / "x", **opts)
    build(config, ["losa"], tmp_path / "c")
    cache = str(tmp_path / "c")

    def run(name: str, **extra):
        return fit(task_config("classification", data, tmp_path / name, cache=cache, **{**opts, **extra}))

    with pytest.raises(CacheError, match=r"input size \[32, 32\] \(this run: \[64, 64\]\)"):
        run("a", img_size=64)
    with pytest.raises(CacheError, match=r"backbone weights .*fingerprint.*a random backbone.*drawn from --seed"):
        run("b", seed=5)  # a random backbone is drawn from the seed: other weights
    with pytest.raises(CacheError, match=r"val_fraction None \(this run: 0.5\)"):
        run("c", val_fraction=0.5)
    with pytest.raises(CacheError, match=r"transform augmentation 'vtab' .*'standard'"):
        run("d", augmentation="standard")
    image = next((data / "train" / "cat").iterdir())
    original = image.read_bytes()
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    run("copied")  # copied again: a new modification time, the same bytes (the manifest's digest): accepted
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 0xFF  # the same size, other content
    image.write_bytes(bytes(edited))
    try:
        with pytest.raises(CacheError, match=rf"stale: .*{image.name}' was modified since the build"):
            run("e")
    finally:
        image.write_bytes(original)
    run("ok")  # the bytes of the build again: accepted
    shard = next((tmp_path / "c").glob("train-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CacheError, match="truncated or corrupt"):
        run("f")
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not a sidetune cache manifest"):
        run("g")
    with pytest.raises(CacheError, match="no tap cache"):
        fit(task_config("classification", data, tmp_path / "h", cache=str(tmp_path / "absent"), **opts))


def cache_info(cache: Path, capsys) -> tuple[int, dict]:
    from sidetune.cli import main

    code = main(["cache", "info", str(cache)])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("sizes", ["recorded", "older manifest"])
def test_a_truncated_shard_is_refused_before_training_reported_by_info_and_rewritten_by_the_build(
    sizes, datasets, tmp_path, monkeypatch, capsys, caplog
):
    """A shard cut short after the build (a copy onto a full disk): a run stops before its first step naming it,
    `cache info` lists it, and the build the message advises rewrites it (and only it). A manifest of an older
    version records no sizes: the safetensors header, which no longer covers the file, tells the same."""
    data = datasets["classification"]
    opts = dict(method="losa", epochs=1)
    config = task_config("classification", data, tmp_path / "x", **opts)
    manifest = build(config, ["losa"], tmp_path / "c", shard_size=4)
    shards = [s for info in manifest.splits.values() for s in info["shards"]]
    assert all(s["bytes"] == (tmp_path / "c" / s["file"]).stat().st_size for s in shards)
    if sizes == "older manifest":
        saved = json.loads((tmp_path / "c" / "manifest.json").read_text())
        for info in saved["splits"].values():
            for shard in info["shards"]:
                del shard["bytes"]
        (tmp_path / "c" / "manifest.json").write_text(json.dumps(saved))
    damaged = tmp_path / "c" / "test-v0-00000.safetensors"
    whole = damaged.read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.safetensors") if p != damaged}
    with damaged.open("r+b") as f:
        f.truncate(100)

    code, info = cache_info(tmp_path / "c", capsys)
    assert code == 1 and info["complete"] is False
    assert len(info["damaged"]) == 1 and info["damaged"][0].startswith("test-v0-00000.safetensors: 100 bytes")

    def read(self, index):  # the test split is read last: a check there comes after every training step
        raise AssertionError("a cached sample was read before the damaged shard was found")

    with monkeypatch.context() as patch:
        patch.setattr(sidetune.cache.CachedSplit, "__getitem__", read)
        refused = r"test-v0-00000\.safetensors: 100 bytes.*run the same `sidetune cache build`"
        with pytest.raises(CacheError, match=refused):
            fit(task_config("classification", data, tmp_path / "r", cache=str(tmp_path / "c"), **opts))

    with caplog.at_level("WARNING", logger="sidetune.cache.build"):
        rebuilt = build(config, ["losa"], tmp_path / "c", shard_size=4)
    assert damaged.read_bytes() == whole  # written again, the same taps
    assert any("test-v0-00000.safetensors is damaged" in r.getMessage() for r in caplog.records)
    assert {n: (tmp_path / "c" / n).stat().st_mtime_ns for n in stamps} == stamps  # the whole ones kept
    assert rebuilt.complete and rebuilt.splits == manifest.splits  # sizes recorded again
    code, info = cache_info(tmp_path / "c", capsys)
    assert code == 0 and info["complete"] is True and "damaged" not in info
    fit(task_config("classification", data, tmp_path / "ok", cache=str(tmp_path / "c"), **opts))


def test_a_shard_overwritten_at_its_size_fails_in_a_data_worker_with_the_message_not_a_traceback(datasets, tmp_path):
    """Sizes do not catch bytes overwritten in place; reading does, and torch's re-raise of a worker's error keeps
    sidetune's message (not "Caught CacheError in DataLoader worker process 0. Original Traceback ...")."""
    data = datasets["classification"]
    opts = dict(method="losa", epochs=1, test_split="none")
    build(task_config("classification", data, tmp_path / "x", **opts), ["losa"], tmp_path / "c")
    shard = tmp_path / "c" / "train-v0-00000.safetensors"
    garbled = bytearray(shard.read_bytes())
    garbled[8:24] = b"\xff" * 16  # inside the header: the size stays, the header no longer parses
    shard.write_bytes(bytes(garbled))
    with pytest.raises(CacheError) as caught:
        fit(task_config("classification", data, tmp_path / "r", cache=str(tmp_path / "c"), workers=1, **opts))
    message = str(caught.value)
    assert message.startswith(f"cache shard {str(shard)!r} cannot be read"), message
    assert "DataLoader worker" not in message and "Traceback" not in message
    assert "DataLoader worker process 0" in caught.value.worker_traceback  # kept for debugging


def test_the_disk_check_refuses_before_writing(datasets, tmp_path, monkeypatch):
    config = task_config("classification", datasets["classification"], tmp_path / "x", method="losa")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(build_module.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(CacheError, match=r"the cache needs about .* GiB .* are free"):
        build(config, ["losa"], tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.safetensors"))


def test_several_views_of_a_deterministic_transform_are_refused(datasets, tmp_path):
    config = task_config("classification", datasets["classification"], tmp_path / "run", method="losa")
    with pytest.raises(ConfigError, match=r"--views 3 with the deterministic 'vtab' transform .* identical copies"):
        build(config, ["losa"], tmp_path / "c", views=3)
    assert not (tmp_path / "c").exists()


def test_views_of_random_augmentation_replay_the_uncached_epochs(datasets, tmp_path, monkeypatch):
    opts = dict(method="losa", augmentation="standard", test_split="none", epochs=2)
    config = task_config("classification", datasets["classification"], tmp_path / "plain", **opts)
    fit(config)
    build(config, ["losa"], tmp_path / "c", views=2)
    no_backbone(monkeypatch)
    fit(task_config("classification", datasets["classification"], tmp_path / "cached", cache=str(tmp_path / "c"),
                    **opts))  # fmt: skip
    assert step_losses(tmp_path / "cached") == pytest.approx(step_losses(tmp_path / "plain"), rel=5e-3, abs=5e-3)


def test_a_sweep_trains_each_configuration_as_its_own_cached_run(datasets, tmp_path):
    data = datasets["classification"]
    opts = dict(method="losa", val_fraction=0.34, epochs=2)
    config = task_config("classification", data, tmp_path / "x", **opts)
    build(config, ["losa"], tmp_path / "c")
    grid = {"lr": [1e-3, 1e-2], "channel_rank": [2, 4]}
    result = sweep(tmp_path / "c", "losa", grid, tmp_path / "sweep", epochs=2, batch_size=config.batch_size,
                   warmup_epochs=config.warmup_epochs)  # fmt: skip
    assert len(result.configs) == 4 and result.test is not None
    for name in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png", "best/adapter_model.safetensors"):
        assert (tmp_path / "sweep" / name).is_file(), name
    chosen = result.configs[result.best]
    assert chosen["best_val_top1"] == max(c["best_val_top1"] for c in result.configs)
    # configuration 3 (lr 1e-2, rank 4) is exactly the run `sidetune train --cache` makes with those settings
    alone = fit(task_config("classification", data, tmp_path / "alone", cache=str(tmp_path / "c"), lr=1e-2,
                            method_options={"channel_rank": 4}, **opts))  # fmt: skip
    swept = [
        json.loads(line) for line in (tmp_path / "sweep" / "configs" / "003" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in swept if r["type"] == "step"] == pytest.approx(step_losses(tmp_path / "alone"), rel=1e-5)
    assert alone.summary["metrics"]["best_val"] == pytest.approx(result.configs[3]["best_val_top1"])


def test_a_sweep_and_a_training_run_never_replace_each_others_best_adapter(datasets, tmp_path):
    data = datasets["classification"]
    opts = dict(method="losa", val_fraction=0.34, epochs=1)
    config = task_config("classification", data, tmp_path / "run", **opts)
    fit(config)
    build(config, ["losa"], tmp_path / "c")
    run = files(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"holds a training run \(log.jsonl.*replace that best/: choose another"):
        sweep(tmp_path / "c", "losa", {"lr": [1e-2]}, tmp_path / "run", epochs=1, batch_size=config.batch_size)
    assert files(tmp_path / "run") == run
    sweep(tmp_path / "c", "losa", {"lr": [1e-2]}, tmp_path / "sweep", epochs=1, batch_size=config.batch_size)
    swept = files(tmp_path / "sweep")
    assert "best/adapter_model.safetensors" in swept
    for resume in (None, str(tmp_path / "run")):  # a new run, and a resume of another run continued there
        with pytest.raises(ConfigError, match=r"holds a sweep \(sweep.json.*replace that best/: choose another"):
            fit(task_config("classification", data, tmp_path / "sweep", resume=resume, **opts))
        assert files(tmp_path / "sweep") == swept


def test_a_sweep_over_the_head_rate_trains_what_train_head_lr_mult_trains(datasets, tmp_path):
    data = datasets["classification"]
    opts = dict(method="losa", val_fraction=0.34, epochs=1)
    config = task_config("classification", data, tmp_path / "x", **opts)
    build(config, ["losa"], tmp_path / "c")
    result = sweep(tmp_path / "c", "losa", {"lr": [1e-2], "head_lr_mult": [1, 10]}, tmp_path / "sweep", epochs=1,
                   batch_size=config.batch_size, warmup_epochs=config.warmup_epochs)  # fmt: skip
    assert [c["head_lr_mult"] for c in result.configs] == [1, 10]
    fit(task_config("classification", data, tmp_path / "alone", cache=str(tmp_path / "c"), lr=1e-2, head_lr_mult=10,
                    **opts))  # fmt: skip
    logs = {k: (tmp_path / "sweep" / "configs" / f"{k:03d}" / "log.jsonl").read_text().splitlines() for k in (0, 1)}
    losses = {k: [json.loads(x)["loss"] for x in v if json.loads(x)["type"] == "step"] for k, v in logs.items()}
    assert losses[1] == pytest.approx(step_losses(tmp_path / "alone"), rel=1e-5)
    assert losses[0][1:] != pytest.approx(losses[1][1:], rel=1e-3)  # the head's rate changed the run


@pytest.mark.slow
def test_two_processes_build_one_cache(datasets, tmp_path):
    data = datasets["classification"]
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.exists():
        pytest.skip("torchrun is not installed")
    command = [str(exe), "--standalone", "--nproc_per_node", "2", "-m", "sidetune.cli", "cache", "build", "test_vit",
               "--methods", "losa", "--data", str(data), "--img-size", str(IMG), "--shard-size", "4",
               "--workers", "0", "--output", str(tmp_path / "ddp")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    config = task_config("classification", data, tmp_path / "x", method="losa")
    one = build(config, ["losa"], tmp_path / "one", shard_size=4)
    two = Manifest.load(tmp_path / "ddp")
    assert two.complete and two.splits == one.splits and two.taps == one.taps
    from safetensors.torch import load_file

    for shard in (tmp_path / "one").glob("*.safetensors"):
        a, b = load_file(str(shard)), load_file(str(tmp_path / "ddp" / shard.name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), shard.name


def test_one_cache_serves_several_seeds_with_one_validation_split(datasets, tmp_path):
    """Deterministic transforms draw nothing at random: runs of other seeds (model init, data order) read the same
    cache when they keep its validation split (split_seed); random augmentation is tied to its seed's views."""
    data = datasets["classification"]
    opts = dict(method="losa", val_fraction=0.34, test_split="none", epochs=1)
    # a random backbone is drawn from the seed: share seed 0's weights by saving them as a file
    from safetensors.torch import save_file

    import sidetune

    torch.manual_seed(0)
    model = sidetune.create("test_vit", "losa", num_classes=3, img_size=IMG)
    save_file(
        {k: v.contiguous() for k, v in model.backbone.model.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    opts["weights"] = str(tmp_path / "w.safetensors")
    build(task_config("classification", data, tmp_path / "x", **opts), ["losa"], tmp_path / "cw")
    runs = [fit(task_config("classification", data, tmp_path / f"s{s}", cache=str(tmp_path / "cw"), seed=s,
                            split_seed=0, **opts)) for s in (1, 2)]  # fmt: skip
    assert step_losses(tmp_path / "s1") != step_losses(tmp_path / "s2")  # other seeds: other runs
    assert all(r.summary["data"]["val"] == runs[0].summary["data"]["val"] for r in runs)
    with pytest.raises(CacheError, match=r"split_seed 0 \(this run: 1\)"):
        fit(task_config("classification", data, tmp_path / "s3", cache=str(tmp_path / "cw"), seed=1, **opts))


# -- video: a clip's taps are its T frames' taps ------------------------------------------------------------------
def make_clips(root: Path, per_class: int = 2, frames: int = 5) -> Path:
    """``root/{train,val}/<class>/c<i>/img_0000k.png``: frame folders of noisy frames whose colour tells the class
    and whose brightness grows with time, so that frames sampled at other offsets give other features."""
    import numpy as np
    from PIL import Image

    from train_data import CLASSES

    rng = np.random.default_rng(3)
    for split, n in (("train", per_class), ("val", 1)):
        for label, name in enumerate(CLASSES):
            for i in range(n):
                folder = root / split / name / f"c{i}"
                folder.mkdir(parents=True)
                for k in range(frames):
                    base = np.zeros((12, 12, 3), dtype=np.float32)
                    base[..., label] = 40.0 + 50.0 * k
                    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"img_{k + 1:05d}.png")
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_clips(tmp_path_factory.mktemp("cache-clips") / "data")


def video_config(data: Path, output: Path, **overrides):
    from sidetune.train import TrainConfig

    sampling = overrides.pop("frame_sampling", "uniform")
    values = dict(backbone="test_vit", method="losa", task="video", data=str(data), img_size=IMG, epochs=2,
                  batch_size=2, lr=1e-2, warmup_epochs=0.5, workers=0, output=str(output), augmentation="vtab",
                  task_options={"num_frames": 3, "frame_sampling": sampling})  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("method", ["losa", "linear"])
def test_training_video_from_the_cache_reproduces_uncached_training_without_the_backbone(
    method, clips, tmp_path, monkeypatch
):
    plain = fit(video_config(clips, tmp_path / "plain", method=method))
    manifest = build(video_config(clips, tmp_path / "x", method=method), [method], tmp_path / "cache", batch_size=4,
                     shard_size=4)  # fmt: skip
    assert manifest.transform["frames"]["num_frames"] == 3 and manifest.transform["seed"] is None
    from safetensors import safe_open

    key = "out.5" if method == "losa" else "final"
    with safe_open(str(tmp_path / "cache" / "train-v0-00000.safetensors"), "pt") as f:
        assert f.get_slice(f"tap.{key}").get_shape() == [4, 3, 5, 64]  # 4 clips of 3 frames: per clip, per frame
        whole = f.get_tensor(f"tap.{key}")
    # frame_chunk bounds the build's backbone forward (2 frames at a time here) and stores the same taps
    chunked = video_config(clips, tmp_path / "y", method=method)
    chunked.task_options = {**chunked.task_options, "frame_chunk": 2}
    build(chunked, [method], tmp_path / "chunked", batch_size=4, shard_size=4)
    with safe_open(str(tmp_path / "chunked" / "train-v0-00000.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor(f"tap.{key}"), whole, rtol=1e-3, atol=1e-3)
    no_backbone(monkeypatch)
    cached = fit(video_config(clips, tmp_path / "cached", method=method, cache=str(tmp_path / "cache")))
    a, b = step_losses(tmp_path / "plain"), step_losses(tmp_path / "cached")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=5e-3, abs=5e-3)  # float16 taps
    pm, cm = plain.summary["metrics"]["final_val"], cached.summary["metrics"]["final_val"]
    assert cm["count"] == pm["count"] == 3 and cm["top1"] == pytest.approx(pm["top1"], abs=0.02)
    assert cached.summary["data"]["source"].startswith("tap cache")


def test_random_frame_offsets_are_cached_as_views_of_the_epochs(clips, tmp_path, monkeypatch):
    """Random offsets are drawn from the sample's seeded RNG: view v holds the frames epoch v reads uncached."""
    opts = dict(frame_sampling="random")
    plain = fit(video_config(clips, tmp_path / "plain", **opts))
    manifest = build(video_config(clips, tmp_path / "x", **opts), ["losa"], tmp_path / "c", views=2)
    assert manifest.transform["seed"] == 0 and manifest.splits["train"]["views"] == 2
    from safetensors.torch import load_file

    views = [load_file(str(tmp_path / "c" / f"train-v{v}-00000.safetensors"))["tap.out.5"] for v in (0, 1)]
    assert not torch.equal(*views)  # the two epochs' offsets: other frames
    no_backbone(monkeypatch)
    cached = fit(video_config(clips, tmp_path / "cached", cache=str(tmp_path / "c"), **opts))
    assert step_losses(tmp_path / "cached") == pytest.approx(step_losses(tmp_path / "plain"), rel=5e-3, abs=5e-3)
    assert not any("view(s) of its random draws" in w for w in cached.summary["data"]["warnings"])
    # fewer views than epochs: later epochs reuse earlier draws, which the run says
    short = fit(video_config(clips, tmp_path / "short", cache=str(tmp_path / "c"), epochs=3, **opts))
    warned = [w for w in short.summary["data"]["warnings"] if "holds 2 view(s) of its random draws" in w]
    assert len(warned) == 1 and "--views 3" in warned[0]
    assert cached.summary["metrics"]["final_val"]["top1"] == pytest.approx(
        plain.summary["metrics"]["final_val"]["top1"], abs=0.02
    )
    # the frame settings decide the cached clips: another sampling or frame count is refused, naming it
    with pytest.raises(CacheError, match=r"transform frames .*'frame_sampling': 'random'.*'frame_sampling': 'uniform'"):
        fit(video_config(clips, tmp_path / "u", cache=str(tmp_path / "c")))
    with pytest.raises(CacheError, match=r"transform frames .*'num_frames': 3.*'num_frames': 2"):
        fit(video_config(clips, tmp_path / "n", cache=str(tmp_path / "c"),
                         task_options={"num_frames": 2, "frame_sampling": "random"}))  # fmt: skip


def test_a_frame_edited_after_the_build_is_refused(clips, tmp_path):
    import shutil as sh

    data = tmp_path / "data"
    sh.copytree(clips, data)
    build(video_config(data, tmp_path / "x", val_split="none"), ["linear"], tmp_path / "c")
    frame = next((data / "train").rglob("img_00003.png"))
    frame.write_bytes(frame.read_bytes() + b"\0")  # one byte more
    with pytest.raises(CacheError, match=r"img_00003\.png' changed size"):
        fit(video_config(data, tmp_path / "r", method="linear", cache=str(tmp_path / "c"), val_split="none"))


def test_a_sweep_over_a_video_cache_takes_its_frame_settings_from_the_cache(clips, tmp_path):
    build(video_config(clips, tmp_path / "x", method="linear"), ["linear"], tmp_path / "c")
    result = sweep(tmp_path / "c", "linear", {"lr": [1e-3, 1e-2]}, tmp_path / "sweep", epochs=1, batch_size=2)
    assert len(result.configs) == 2 and result.configs[result.best]["best_val_top1"] is not None
    saved = json.loads((tmp_path / "sweep" / "best" / "adapter_config.json").read_text())
    assert saved["task"] == "video" and saved["num_frames"] == 3
