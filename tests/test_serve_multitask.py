"""MultiTask: every adapter on one shared backbone, one backbone forward per batch, outputs equal to each model
alone; the refusals; the JSON results and the folder prediction built on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import sidetune
from sidetune.bench.levers import native_low_precision
from sidetune.serve import MultiTask, decode_mask, predict_folder
from sidetune.serve.multitask import default_task_name
from sidetune.train.inference import autocast_for

from conftest import TINY_BACKBONES
from serve_adapters import ADAPTERS, KEY, build_adapter, build_all, load_single, sample_images, single_outputs


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    return build_all(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def multitask(adapters) -> MultiTask:
    return MultiTask(list(adapters.values()))


@pytest.fixture(scope="module")
def outputs(multitask):
    out = multitask(sample_images())
    return out, multitask.last_pass


def _assert_same(name: str, got, ref) -> None:
    if isinstance(ref, torch.Tensor):
        assert torch.equal(got, ref), f"{name}: max diff {(got - ref).abs().max()}"
    elif isinstance(ref[0], torch.Tensor):
        assert [tuple(g.shape) for g in got] == [tuple(r.shape) for r in ref]
        assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True)), name
    else:
        for g, r in zip(got, ref, strict=True):
            assert set(g) == set(r)
            assert all(torch.equal(g[k], r[k]) for k in r), name


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_every_task_equals_its_model_alone(adapters, outputs, name: str) -> None:
    """Classification (two eval transforms), segmentation (whole and slide), detection and instance segmentation
    together, on images at the backbone's size and at other sizes: bit-identical to each model run alone."""
    out, _ = outputs
    ref = single_outputs(adapters[name], sample_images())
    _assert_same(name, out[name], ref)
    if ADAPTERS[name][1] in ("detection", "instance"):
        assert all(len(r["boxes"]) > 0 for r in ref), "the comparison needs detections to compare"


def test_one_backbone_forward_serves_every_task(multitask, outputs) -> None:
    _, stats = outputs
    assert stats.recomputed == 0  # every backbone input a task asked for came from the shared pass
    assert stats.task_rows == 34  # 6 tasks x 5 images + 4 more windows of the slide segmenter (96x80 image)
    # images at the backbone's size share one row across every task; the others need one row per distinct
    # preprocessing (vtab stretch, resize + crop, bilinear resize, letterbox; slide windows)
    assert stats.backbone_rows == 20
    assert set(stats.seconds) == {"prepare", "backbone", "tasks"} and set(stats.seconds["tasks"]) == set(ADAPTERS)
    assert all(v >= 0 for v in [stats.cpu_seconds["backbone"], *stats.cpu_seconds["tasks"].values()])
    calls = []
    # the patch embedding runs once per forward of the timm model (forward_features)
    handle = multitask.backbone.model.patch_embed.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        size = TINY_BACKBONES[KEY][2]
        multitask([Image.new("RGB", (size, size), (30, 90, 200))] * 3)
    finally:
        handle.remove()
    assert calls == [3]  # one forward of the timm model, one row per image, for six tasks
    assert multitask.last_pass.task_rows == 18 and multitask.last_pass.backbone_rows == 3


def test_the_backbone_is_held_once(multitask) -> None:
    backbones = {id(m.method.backbone) for m in multitask.models.values()}
    assert backbones == {id(multitask.backbone)}
    backbone_params = sum(p.numel() for p in multitask.backbone.parameters())
    total = sum(p.numel() for p in multitask.parameters())
    assert total == backbone_params + sum(t.parameters for t in multitask.tasks.values())
    assert multitask.backbone_bytes() == sum(
        t.numel() * t.element_size() for t in [*multitask.backbone.parameters(), *multitask.backbone.buffers()]
    )


def test_a_task_subset_and_the_task_facts(multitask) -> None:
    out = multitask(sample_images()[:2], tasks=["seg", "cls-losa"])
    assert list(out) == ["cls-losa", "seg"]  # load order
    assert multitask.last_pass.backbone_rows == 2
    with pytest.raises(sidetune.ConfigError, match=r"unknown task 'sge'.*Did you mean 'seg'"):
        multitask(sample_images()[:1], tasks=["sge"])
    facts = multitask.describe()
    assert facts["backbone"]["name"] == TINY_BACKBONES[KEY][0]
    by_name = {t["name"]: t for t in facts["tasks"]}
    assert by_name["det"]["classes"] == ["det0", "det1"] and by_name["det"]["task"] == "detection"
    assert "slide" in by_name["seg-slide"]["preprocessing"]
    json.dumps(facts)


def test_inputs_other_than_pil_images(multitask) -> None:
    image = sample_images()[0]
    pixels = np.array(image)
    out = multitask([image, pixels, torch.from_numpy(pixels).permute(2, 0, 1)], tasks=["cls-losa"])
    logits = out["cls-losa"]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    with pytest.raises(sidetune.ConfigError, match=r"\(3, H, W\) uint8"):
        multitask([torch.rand(3, 8, 8)])


def test_predict_gives_json_results_that_match_the_outputs(adapters, multitask, outputs) -> None:
    out, _ = outputs
    images = sample_images()
    rows = multitask.predict(images, top_k=3, score_threshold=0.3, mask_format="png")
    rle_rows = multitask.predict(images, tasks=["seg", "inst"], mask_format="rle")
    json.dumps(rows)
    json.dumps(rle_rows)
    for i, row in enumerate(rows):
        cls = row["cls-losa"]
        probs = out["cls-losa"][i].softmax(-1)
        assert [t["label"] for t in cls["top_k"]] == [f"cla{k}" for k in probs.topk(3).indices.tolist()]
        assert cls["score"] == pytest.approx(float(probs.max()))
        assert len(row["cls-e3va"]["top_k"]) == 3
        labels = out["seg"][i].argmax(0).numpy()
        assert np.array_equal(decode_mask(row["seg"]), labels)
        assert np.array_equal(decode_mask(rle_rows[i]["seg"]), labels)
        assert row["seg"]["size"] == [images[i].height, images[i].width]
        assert sum(row["seg"]["classes"].values()) == pytest.approx(1.0)
        det = out["det"][i]
        kept = det["scores"] >= 0.3
        assert [d["score"] for d in row["det"]["detections"]] == pytest.approx(det["scores"][kept].tolist())
        boxes = torch.tensor([d["box"] for d in row["det"]["detections"]]).reshape(-1, 4)
        torch.testing.assert_close(boxes, det["boxes"][kept])
        assert all(d["label"] == f"det{d['class_id'] - 1}" for d in row["det"]["detections"])
        inst = rle_rows[i]["inst"]["detections"]
        assert inst and all(d["mask"]["size"] == [images[i].height, images[i].width] for d in inst)


def test_predict_folder(adapters, tmp_path) -> None:
    for i, image in enumerate(sample_images()):
        image.save(tmp_path / f"img{i}.png")
    (tmp_path / ".hidden.png").write_bytes(b"not read")
    records = predict_folder(
        {"a": adapters["cls-losa"], "b": adapters["seg"]}, tmp_path, batch_size=2, mask_format="rle"
    )
    assert [r["path"] for r in records] == [str(tmp_path / f"img{i}.png") for i in range(5)]
    assert all(set(r["tasks"]) == {"a", "b"} for r in records)
    assert (records[3]["width"], records[3]["height"]) == (72, 40)
    ref = single_outputs(adapters["cls-losa"], sample_images())
    got = [r["tasks"]["a"]["label"] for r in records]
    assert got == [f"cla{k}" for k in ref.argmax(-1).tolist()]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(sidetune.SidetuneError, match=r"broken\.png"):
        predict_folder([adapters["cls-losa"]], tmp_path)


def test_task_names_default_to_the_folder_or_the_run(tmp_path) -> None:
    assert default_task_name(tmp_path / "runs" / "camvid-e3va" / "best") == "camvid-e3va"
    assert default_task_name(tmp_path / "my_adapter") == "my_adapter"


def test_duplicate_and_invalid_names_are_refused(adapters, tmp_path) -> None:
    run_a = tmp_path / "a" / "best"
    run_b = tmp_path / "b" / "cls-losa"
    shutil.copytree(adapters["cls-losa"], run_a)
    shutil.copytree(adapters["cls-losa"], run_b)
    with pytest.raises(sidetune.ConfigError, match=r"both be task 'cls-losa'.*names="):
        MultiTask([adapters["cls-losa"], run_b])
    tasks = MultiTask([run_a, run_b])  # the run folder names the best/ checkpoint
    assert list(tasks.tasks) == ["a", "cls-losa"]
    with pytest.raises(sidetune.ConfigError, match=r"task name 'a b'"):
        MultiTask({"a b": run_a})
    assert list(MultiTask([run_a, run_b], names=["x", "y"]).tasks) == ["x", "y"]
    # names that nn.ModuleDict keys could not be (a '.', a Module attribute) are task names like any other
    tasks = MultiTask([run_a, run_b], names=["v1.2", "half"])
    assert list(tasks.tasks) == ["v1.2", "half"] and set(tasks(sample_images()[:1])) == {"v1.2", "half"}


def test_in_place_adapters_are_refused_with_the_reason(adapters, tmp_path) -> None:
    name, kwargs, size = TINY_BACKBONES[KEY]
    torch.manual_seed(0)
    sidetune.create(name, "lora", num_classes=3, img_size=size, backbone_kwargs=kwargs).save_adapter(tmp_path / "lora")
    with pytest.raises(sidetune.ConfigError, match=r"'lora'.*in-place method 'lora'.*changes the backbone itself"):
        MultiTask([adapters["cls-losa"], tmp_path / "lora"])
    with pytest.raises(sidetune.ConfigError, match="in-place method"):
        sidetune.create(
            name, "lora", img_size=size, backbone_kwargs=kwargs, shared_backbone=load_single(adapters["seg"]).backbone
        )


def test_adapters_of_another_backbone_size_or_weights_are_refused(adapters, tmp_path) -> None:
    other_size = tmp_path / "size"
    name, kwargs, _ = TINY_BACKBONES[KEY]
    torch.manual_seed(0)
    sidetune.create(name, "losa", num_classes=3, img_size=48, backbone_kwargs=kwargs).save_adapter(other_size)
    with pytest.raises(sidetune.ConfigError, match=r"'size' differs from 'cls-losa' in img_size 48x48 vs 64x64"):
        MultiTask([adapters["cls-losa"], other_size])

    torch.manual_seed(0)
    sidetune.create(name, "losa", num_classes=3, img_size=64, backbone_kwargs={"depth": 4}).save_adapter(
        tmp_path / "shallow"
    )
    with pytest.raises(sidetune.ConfigError, match=r"'shallow' differs from 'cls-losa' in backbone_kwargs \{'depth'"):
        MultiTask([adapters["cls-losa"], tmp_path / "shallow"])

    reg_name, reg_kwargs, reg_size = TINY_BACKBONES["vit_reg"]
    torch.manual_seed(0)
    sidetune.create(reg_name, "losa", num_classes=3, img_size=reg_size, backbone_kwargs=reg_kwargs).save_adapter(
        tmp_path / "other"
    )
    with pytest.raises(sidetune.ConfigError, match=rf"backbone '{reg_name}' vs '{name}'"):
        MultiTask([adapters["cls-losa"], tmp_path / "other"])

    other_weights = tmp_path / "weights"
    build_adapter(other_weights, "losa", "classification", 3, {}, {})
    config = json.loads((other_weights / "adapter_config.json").read_text())
    config["backbone_fingerprint"] = "sha256:" + "0" * 64  # trained on other weights
    (other_weights / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        sidetune.FingerprintMismatchError, match=r"'weights' differs from 'cls-losa' in backbone weights"
    ):
        MultiTask([adapters["cls-losa"], other_weights])
    with pytest.raises(sidetune.FingerprintMismatchError, match="Load them with the weights they were trained on"):
        MultiTask([other_weights])


def test_models_built_on_a_shared_backbone_still_work_alone(adapters, multitask) -> None:
    x = torch.randn(2, 3, 64, 64)
    alone = load_single(adapters["cls-losa"])
    with torch.no_grad():
        assert torch.equal(multitask.models["cls-losa"](x), alone(x))


BF16 = pytest.mark.skipif(
    not native_low_precision(torch.bfloat16, torch.device("cpu")), reason="no native bfloat16 on this CPU"
)
PRECISION_TASKS = ("cls-losa", "seg", "det")


@pytest.fixture(scope="module")
def bf16_adapters(tmp_path_factory) -> dict[str, Path]:
    """Adapters whose run trained in bf16 (``inference.json`` records it), one per task kind."""
    root = tmp_path_factory.mktemp("bf16")
    out = {}
    for i, name in enumerate(PRECISION_TASKS):
        method, task, k, head, extras = ADAPTERS[name]
        out[name] = build_adapter(root / name, method, task, k, head, {**extras, "mixed_precision": "bf16"}, seed=i)
    return out


@BF16
def test_adapters_trained_in_bf16_run_in_bf16_as_single_predict_does(bf16_adapters) -> None:
    """The recorded precision is the default, as for single-adapter predict: the shared pass and every head under
    bf16 autocast give what each model alone gives under it (and not its float32 output)."""
    images = [sample_images()[i] for i in (0, 3, 4)]  # at the backbone's size, wide, larger: every resize path
    tasks = MultiTask(list(bf16_adapters.values()))
    assert tasks.mixed_precision == "bf16" and tasks.describe()["mixed_precision"] == "bf16"
    out = tasks(images)
    assert tasks.last_pass.recomputed == 0  # still one shared pass under autocast
    with autocast_for("bf16", torch.device("cpu")):
        refs = {n: single_outputs(bf16_adapters[n], images) for n in PRECISION_TASKS}
    for name, ref in refs.items():
        _assert_same(name, out[name], ref)
    assert out["cls-losa"].dtype == torch.bfloat16
    assert not torch.equal(out["cls-losa"].float(), single_outputs(bf16_adapters["cls-losa"], images))


def test_adapters_trained_in_different_precisions_are_refused_naming_each(adapters, bf16_adapters) -> None:
    mixed = {"cls32": adapters["cls-losa"], "seg16": bf16_adapters["seg"]}
    with mock.patch("sidetune.serve.multitask.create_timm_model", side_effect=AssertionError("weights loaded")):
        with pytest.raises(
            sidetune.ConfigError, match=r"different precisions \('cls32' .*: no; 'seg16' .*: bf16\).*--mixed-precision"
        ):
            MultiTask(mixed)
        with pytest.raises(sidetune.ConfigError, match="--mixed-precision fp16 on the CPU"):
            MultiTask(mixed, mixed_precision="fp16", device="cpu")
    assert MultiTask(mixed, mixed_precision="no").mixed_precision == "no"


def test_video_adapters_are_refused_before_any_weights_load(adapters, tmp_path, capsys) -> None:
    from sidetune.cli import main

    name, kwargs, size = TINY_BACKBONES[KEY]
    torch.manual_seed(0)
    video = sidetune.create(
        name, "losa", task="video", num_frames=2, num_classes=3, img_size=size, backbone_kwargs=kwargs
    )
    video.save_adapter(tmp_path / "clips")
    message = r"adapter 'clips' .* is a video adapter.*not images.*sidetune predict ADAPTER CLIPS"
    no_weights = mock.patch("sidetune.serve.multitask.create_timm_model", side_effect=AssertionError("weights loaded"))
    with no_weights, pytest.raises(sidetune.ConfigError, match=message):
        MultiTask([adapters["cls-losa"], tmp_path / "clips"])
    sample_images()[0].save(tmp_path / "frame.png")
    argv = ["--adapter", str(adapters["cls-losa"]), "--adapter", str(tmp_path / "clips"), str(tmp_path / "frame.png")]
    assert main(["predict", *argv, "--output", str(tmp_path / "out")]) != 0
    assert "is a video adapter" in capsys.readouterr().err


@BF16
def test_the_precision_flag_reaches_predict_and_serve(adapters, bf16_adapters, tmp_path, capsys) -> None:
    """`predict --adapter` writes what `predict ADAPTER` writes in the same precision (the recorded bf16 by
    default, or --mixed-precision no); `serve` takes --mixed-precision and refuses adapters that disagree."""
    import csv

    from sidetune.cli import main
    from sidetune.serve.commands import main as serve_main

    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(sample_images()):
        image.save(images / f"img{i}.png")

    def rows(path: Path) -> list[list[str]]:
        with open(path, newline="") as f:
            return list(csv.reader(f))

    cls = str(bf16_adapters["cls-losa"])
    for flag in ([], ["--mixed-precision", "no"]):
        out = tmp_path / f"multi{len(flag)}"
        alone = tmp_path / f"alone{len(flag)}.csv"
        argv = ["--adapter", f"cls={cls}", "--adapter", f"seg={bf16_adapters['seg']}", str(images)]
        assert main(["predict", *argv, "--output", str(out), *flag]) == 0
        assert main(["predict", cls, str(images), "--output", str(alone), *flag]) == 0
        assert rows(out / "cls" / "predictions.csv") == rows(alone)
    assert rows(tmp_path / "alone0.csv") != rows(tmp_path / "alone2.csv")  # bf16 and float32 do differ

    mixed = [f"cls32={adapters['cls-losa']}", f"seg16={bf16_adapters['seg']}", "--port", "1", "--no-warmup"]
    assert serve_main(mixed) == 2
    assert "different precisions" in capsys.readouterr().err
    served = []

    def stop(multitask, config):
        served.append(multitask.mixed_precision)
        raise sidetune.ConfigError("stopped before serving")

    with mock.patch("sidetune.serve.app.create_app", side_effect=stop):
        assert serve_main([*mixed, "--mixed-precision", "no"]) == 2
    assert served == ["no"]


def test_multi_adapter_predict_writes_each_task_as_it_writes_alone(adapters, tmp_path) -> None:
    """`sidetune predict --adapter A --adapter B ... IMAGES`: one backbone pass per batch, and every task's files
    (CSV, PNG masks, COCO JSON) are those `sidetune predict ADAPTER IMAGES` writes for that adapter alone."""
    import csv

    from sidetune.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(sample_images()):
        image.save(images / f"img{i}.png")
    names = ("cls-losa", "seg", "det")
    argv = ["predict", str(images), "--output", str(tmp_path / "multi"), "--score-threshold", "0.3"]
    for name in names:
        argv += ["--adapter", f"{name}={adapters[name]}"]
    assert main(argv) == 0
    assert main(["predict", str(adapters["cls-losa"]), str(images), "--output", str(tmp_path / "alone.csv")]) == 0
    for name in ("seg", "det"):
        extra = ["--score-threshold", "0.3"] if name == "det" else []
        assert main(["predict", str(adapters[name]), str(images), "--output", str(tmp_path / name), *extra]) == 0

    def rows(path: Path) -> list[list[str]]:
        with open(path, newline="") as f:
            return list(csv.reader(f))

    assert rows(tmp_path / "multi" / "cls-losa" / "predictions.csv") == rows(tmp_path / "alone.csv")
    for i in range(len(sample_images())):
        a = np.asarray(Image.open(tmp_path / "multi" / "seg" / f"img{i}.png"))
        b = np.asarray(Image.open(tmp_path / "seg" / f"img{i}.png"))
        assert np.array_equal(a, b), i
    multi = json.loads((tmp_path / "multi" / "det" / "predictions.json").read_text())
    alone = json.loads((tmp_path / "det" / "predictions.json").read_text())
    # `predict` alone runs the detector image by image, the shared pass a batch: the same up to float rounding
    assert len(multi) == len(alone) and all(
        m["category_id"] == a["category_id"] and m["image_id"] == a["image_id"]
        and np.allclose(m["bbox"], a["bbox"], atol=1e-3) and abs(m["score"] - a["score"]) < 1e-5
        for m, a in zip(multi, alone, strict=True)
    )  # fmt: skip


def test_create_on_a_shared_backbone_checks_it_fits(multitask) -> None:
    name, kwargs, size = TINY_BACKBONES[KEY]
    shared = multitask.backbone
    options = {"img_size": size, "backbone_kwargs": kwargs, "shared_backbone": shared}
    model = sidetune.create(name, "linear", num_classes=2, **options)
    assert model.backbone is shared
    assert model.config.backbone_fingerprint == multitask.models["seg"].config.backbone_fingerprint
    with pytest.raises(sidetune.ConfigError, match=r"shared_backbone is 'test_vit', but backbone='test_vit2'"):
        sidetune.create("test_vit2", "losa", img_size=size, shared_backbone=shared)
    with pytest.raises(sidetune.ConfigError, match=r"built for img_size=\(64, 64\), not \(32, 32\)"):
        sidetune.create(name, "losa", img_size=32, backbone_kwargs=kwargs, shared_backbone=shared)
