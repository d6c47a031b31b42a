"""Dense tasks through sidetune.create: declared pyramids, gradient isolation with heads, save/load."""

from __future__ import annotations

import pytest
import torch

import sidetune
from sidetune.methods import list_methods

from conftest import TINY_BACKBONES, images, tiny

SEG = {"channels": 16, "pool_scales": (1, 2)}
DET = {"fpn_channels": 32, "box_head_dim": 64}
FAMILY_KEYS = ("vit", "vit_reg", "swin", "efficientnet")


def _supported(key: str) -> list[str]:
    family = tiny(key, "linear").backbone.layout.family
    return [m["name"] for m in list_methods() if family in m["families"] and not m["name"].endswith("+")]


@pytest.mark.parametrize(
    ("key", "method"), [(key, method) for key in FAMILY_KEYS for method in _supported(key) if method != "vpt"]
)
def test_declared_pyramid_matches_the_features_for_every_method(key: str, method: str) -> None:
    model = tiny(key, method, task="segmentation", head_options=SEG)
    spec = model.method.pyramid_spec()
    feats = model.features(images(key, 2))
    assert [tuple(p.shape[:2]) for p in feats.pyramid] == [(2, c) for c in spec.channels]
    assert feats.strides == list(spec.strides)
    size = TINY_BACKBONES[key][2]
    for level, stride in zip(feats.pyramid, spec.strides, strict=True):
        assert level.shape[-1] * stride == pytest.approx(size)
    layout = model.backbone.layout
    if layout.family in ("swin", "cnn") and method != "lst":
        assert spec.strides == layout.stage_strides  # every stage, fine to coarse
    assert model(images(key, 2)).shape == (2, 5, size, size)


def test_vpt_segmentation_on_vit() -> None:
    model = tiny("vit", "vpt", task="segmentation", head_options=SEG)
    assert model(images("vit", 1)).shape == (1, 5, 64, 64)


@pytest.mark.parametrize("method", ["losa", "e3va", "lst", "linear"])
@pytest.mark.parametrize("task", ["segmentation", "detection", "instance"])
def test_side_methods_keep_gradients_out_of_the_backbone_with_dense_heads(task: str, method: str) -> None:
    options = SEG if task == "segmentation" else DET
    model = tiny("swin", method, task=task, num_classes=3, head_options=options).train()
    x = images("swin", 2)
    if task == "segmentation":
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 3, (2, 64, 64)))
    else:
        targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([2])} for _ in range(2)]
        if task == "instance":
            for t in targets:
                t["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
                t["masks"][0, 6:30, 4:40] = 1
        loss = sum(model(list(x.sigmoid()), targets).values())
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.method.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("task", "detector"), [("detection", "retinanet"), ("detection", "faster_rcnn"), ("instance", "mask_rcnn")]
)
def test_detection_models_under_autocast_run_only_the_features_in_16_bits(task: str, detector: str) -> None:
    """SidetuneModel calls run_detector: under bf16 autocast the method's maps are bf16, every layer of the
    detector (neck, FPN, RPN, heads) float32, in training and in evaluation."""
    model = tiny("swin", "losa", task=task, num_classes=3, head_options={**DET, "detector": detector})
    low: set[str] = set()

    def record(name: str):
        return lambda m, a, out: low.add(name) if torch.is_tensor(out) and out.dtype != torch.float32 else None

    detector_layers = [
        (n, m)
        for n, m in model.head.named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and not n.startswith("backbone.source.")  # the method's
    ]
    assert detector_layers
    hooks = [m.register_forward_hook(record(n)) for n, m in detector_layers]
    method_dtype = []
    hooks.append(model.method.register_forward_hook(lambda m, a, out: method_dtype.append(out.pyramid[0].dtype)))
    x = list(images("swin", 2).sigmoid())
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([2])} for _ in range(2)]
    for t in targets:
        t["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        t["masks"][0, 6:30, 4:40] = 1
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model.train()(x, targets)
            with torch.no_grad():
                detections = model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    assert method_dtype == [torch.bfloat16, torch.bfloat16] and not low
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert all(d["boxes"].dtype == torch.float32 for d in detections)


def test_e3va_dense_pyramid_is_normalised_by_its_own_stage_norms() -> None:
    e3va = tiny("swin", "e3va", task="segmentation", head_options=SEG)
    assert e3va.method.out_stages == (0, 1, 2, 3) and e3va.method.pyramid_normalized
    assert isinstance(e3va.head.neck.norms, torch.nn.Identity)  # no second norm on top of the paper's
    losa = tiny("swin", "losa", task="segmentation", head_options=SEG)
    assert not isinstance(losa.head.neck.norms, torch.nn.Identity)


@pytest.mark.parametrize(("task", "options"), [("segmentation", SEG), ("detection", DET)])
def test_dense_models_round_trip_through_save_and_load(tmp_path, task: str, options: dict) -> None:
    model = tiny("swin", "e3va", task=task, num_classes=3, seed=3, head_options=options).eval()
    x = images("swin", 2).sigmoid()
    with torch.no_grad():
        expected = model(x) if task == "segmentation" else model(list(x))
    model.save_adapter(tmp_path)
    torch.manual_seed(3)
    loaded = sidetune.load(tmp_path).eval()
    assert loaded.config.head_options == model.config.head_options
    with torch.no_grad():
        got = loaded(x) if task == "segmentation" else loaded(list(x))
    if task == "segmentation":
        assert torch.equal(got, expected)
    else:
        for a, b in zip(got, expected, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_unknown_task_and_detector_and_head_option_fail_clearly() -> None:
    with pytest.raises(sidetune.ConfigError, match=r"unknown task 'segmentaion'.*segmentation"):
        tiny("vit", "losa", task="segmentaion")
    with pytest.raises(sidetune.ConfigError, match=r"unknown detection detector 'yolo'.*faster_rcnn, retinanet"):
        tiny("vit", "losa", task="detection", head_options={"detector": "yolo"})
    with pytest.raises(sidetune.ConfigError, match=r"segmentation head_options: .*'widht'"):
        tiny("vit", "losa", task="segmentation", head_options={"widht": 3})
    with pytest.raises(sidetune.ConfigError, match="classification takes no head_options"):
        tiny("vit", "losa", head_options={"channels": 3})
