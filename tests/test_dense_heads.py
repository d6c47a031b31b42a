"""Tests for the dense heads: pyramid spec and necks, UPerNet segmentation, torchvision detectors on sidetune pyramids.

The tiny models run with one intra-op thread: they gain nothing from more, and on a loaded 2-core machine with
two xdist workers extra threads only contend (a 20 ms step becomes a 1 s one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from sidetune.data import (
    BCCD_CLASSES,
    CAMVID_CLASSES,
    CamVidDataset,
    VOCDetectionDataset,
    build_detection_transforms,
    build_segmentation_transforms,
    detection_collate,
    to_coco,
)
from sidetune.errors import ConfigError
from sidetune.features import Features
from sidetune.heads import (
    DETECTORS,
    IGNORE_INDEX,
    FixedSizeTransform,
    PyramidBackbone,
    PyramidNeck,
    PyramidSpec,
    SimpleFeaturePyramid,
    StageNorms,
    UPerNetHead,
    build_detector,
    predict_segmentation,
    run_detector,
    segmentation_loss,
    slide_inference,
    whole_inference,
)
from sidetune.tasks import CocoEvaluator, SegmentationMetrics, coco_ground_truth

from conftest import DATA, IMG, images, require_asset, tiny

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec_of(model) -> PyramidSpec:
    """The pyramid a method declares, from the backbone layout: no forward pass."""
    layout = model.method.layout
    stages = getattr(model.method, "out_stages", (layout.num_stages - 1,))
    return PyramidSpec(tuple(layout.stage_dims[s] for s in stages), tuple(layout.stage_strides[s] for s in stages))


@pytest.fixture(scope="module")
def swin():
    """Tiny Swin with E3VA producing all four stages (strides 4, 8, 16, 32)."""
    return tiny("swin", "e3va", out_stages=(0, 1, 2, 3))


def backbone_untouched(model) -> None:
    grads = [n for n, p in model.backbone.named_parameters() if p.grad is not None]
    assert not grads, f"backbone parameters got gradients: {grads[:5]}"
    assert not any(p.requires_grad for p in model.backbone.parameters())


# -- pyramid spec and necks ----------------------------------------------------------------------------------
def test_pyramid_spec_validates_and_keeps_exact_strides():
    spec = PyramidSpec((16, 32), (4.0, 8))
    assert spec.strides == (4, 8) and all(isinstance(s, int) for s in spec.strides)
    assert PyramidSpec((8,), (3.5,)).strides == (3.5,)
    for channels, strides in [((), ()), ((8, 8), (4,)), ((8, 0), (4, 8)), ((8, 8), (8, 4)), ((8,), (-1,))]:
        with pytest.raises(ConfigError, match="PyramidSpec"):
            PyramidSpec(channels, strides)


def test_declared_spec_matches_the_method_features(swin):
    spec = spec_of(swin)
    assert spec == PyramidSpec((16, 32, 64, 128), (4, 8, 16, 32))
    assert PyramidSpec.from_features(swin.features(images("swin"))) == spec


def test_simple_feature_pyramid_on_a_vit_level():
    vit = tiny("vit", "e3va", task="segmentation", head_options={"channels": 16})
    spec = spec_of(vit)
    assert spec == PyramidSpec((64,), (16,))
    sfp = SimpleFeaturePyramid(spec, 24)
    assert sfp.out_spec == PyramidSpec((24,) * 4, (4, 8, 16, 32))
    out = sfp(vit.features(images("vit")).pyramid)
    assert [tuple(p.shape) for p in out] == [(2, 24, IMG // s, IMG // s) for s in (4, 8, 16, 32)]


def test_simple_feature_pyramid_patch14_strides_exact_or_resampled():
    spec = PyramidSpec((48,), (14,))
    x = [torch.randn(1, 48, 16, 16)]  # a 224 px image
    exact = SimpleFeaturePyramid(spec, 16)
    assert exact.out_spec.strides == (3.5, 7, 14, 28)
    assert [p.shape[-1] for p in exact(x)] == [64, 32, 16, 8]  # 224 / 3.5 = 64: the float stride is exact
    snapped = SimpleFeaturePyramid(spec, 16, out_strides=(4, 8, 16, 32))
    assert snapped.out_spec.strides == (4, 8, 16, 32)
    assert [p.shape[-1] for p in snapped(x)] == [56, 28, 14, 7]
    with pytest.raises(ConfigError, match="powers of two"):
        SimpleFeaturePyramid(spec, 16, scales=(3.0, 1.0))


def test_multi_level_pyramids_pass_through(swin):
    spec = spec_of(swin)
    sfp = SimpleFeaturePyramid(spec, 24)
    assert sfp.out_spec == spec and not list(sfp.parameters())
    pyramid = swin.features(images("swin")).pyramid
    assert all(a is b for a, b in zip(sfp(pyramid), pyramid, strict=True))
    with pytest.raises(ConfigError, match="channels"):
        sfp(pyramid[:3])


def test_stage_norms_and_neck():
    spec = PyramidSpec((8, 16), (4, 8))
    pyramid = [torch.randn(2, 8, 8, 8) * 5 + 3, torch.randn(2, 16, 4, 4)]
    out = StageNorms(spec)(pyramid)
    assert [p.shape for p in out] == [p.shape for p in pyramid]
    assert out[0].mean(1).abs().max() < 1e-4  # normalised over channels at every position
    neck = PyramidNeck(spec, stage_norms=True)
    assert neck.out_spec == spec
    assert sum(p.numel() for p in neck.parameters()) == 2 * (8 + 16)


# -- segmentation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["swin", "vit", "dinov2_reg"])
def test_upernet_logits_have_the_image_size(key, swin):
    model = (
        swin
        if key == "swin"
        else tiny(key, "e3va" if key == "vit" else "losa", task="segmentation", head_options={"channels": 16})
    )
    x = images(key)
    head = UPerNetHead(spec_of(model), 5, channels=16)
    logits = head(model.features(x))
    assert logits.shape == (2, 5, *x.shape[-2:])
    assert head(model.features(x), size=(30, 40)).shape == (2, 5, 30, 40)


def test_upernet_rejects_a_pyramid_it_was_not_built_for(swin):
    head = UPerNetHead(PyramidSpec((8, 8), (4, 8)), 3, channels=16)
    with pytest.raises(ConfigError, match="built for a pyramid"):
        head(swin.features(images("swin")))
    with pytest.raises(ConfigError, match="pyramid"):
        head(Features(pooled=torch.zeros(1, 4)))


def test_segmentation_loss_ignores_pixels():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    masks = torch.randint(0, 3, (2, 8, 8))
    masks[:, :4] = IGNORE_INDEX
    expected = nn.functional.cross_entropy(logits[:, :, 4:], masks[:, 4:])
    torch.testing.assert_close(segmentation_loss(logits, masks), expected)
    # logits at a coarser size are upsampled to the masks
    assert segmentation_loss(torch.randn(2, 3, 4, 4), masks).isfinite()
    empty = segmentation_loss(logits, torch.full((2, 8, 8), IGNORE_INDEX))
    assert empty.item() == 0.0
    empty.backward()  # a batch with every pixel ignored must not break training


def test_slide_inference_equals_a_pointwise_model_on_the_whole_image():
    fn = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        for size in [(100, 90), (64, 64), (40, 50)]:  # larger, equal, smaller than the window
            x = torch.randn(2, 3, *size)
            out = slide_inference(fn, x, 64, stride=40, max_batch=3)
            assert out.shape == (2, 4, *size)
            torch.testing.assert_close(out, fn(x))


def test_whole_inference_resizes_to_the_model_size_and_back():
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[-2:]))
        return x[:, :2]

    out = whole_inference(fn, torch.randn(1, 3, 90, 120), 64)
    assert seen == [(64, 64)] and out.shape == (1, 2, 90, 120)
    assert predict_segmentation(fn, torch.randn(1, 3, 70, 70), 64, mode="slide").shape == (1, 2, 70, 70)
    with pytest.raises(ConfigError, match="mode"):
        predict_segmentation(fn, torch.randn(1, 3, 8, 8), 8, mode="tiles")


def test_segmentation_head_keeps_gradients_out_of_the_backbone(swin):
    head = UPerNetHead(spec_of(swin), 3, channels=16)
    swin.zero_grad(set_to_none=True)
    loss = segmentation_loss(head(swin.features(images("swin"))), torch.randint(0, 3, (2, IMG, IMG)))
    loss.backward()
    backbone_untouched(swin)
    assert all(p.grad is not None for p in swin.method.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in head.parameters())
    swin.zero_grad(set_to_none=True)


def halves(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose left and right halves have different constant colours; the label is the bright half."""
    x = torch.empty(n, 3, IMG, IMG)
    y = torch.zeros(n, IMG, IMG, dtype=torch.long)
    for i in range(n):
        dark, bright = torch.rand(3, generator=generator) * 0.5 - 1.0, torch.rand(3, generator=generator) * 0.5 + 0.5
        left_bright = bool(torch.rand((), generator=generator) < 0.5)
        x[i, :, :, : IMG // 2] = (bright if left_bright else dark)[:, None, None]
        x[i, :, :, IMG // 2 :] = (dark if left_bright else bright)[:, None, None]
        y[i, :, : IMG // 2] = int(left_bright)
        y[i, :, IMG // 2 :] = int(not left_bright)
    return x, y


def test_segmentation_trains_end_to_end():
    torch.manual_seed(0)
    model = tiny("swin", "e3va", out_stages=(0, 1, 2, 3))
    head = UPerNetHead(spec_of(model), 2, channels=16, dropout=0.0)
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    x_val, y_val = halves(8, torch.Generator().manual_seed(1))

    def miou() -> float:
        metrics = SegmentationMetrics(2)
        head.eval()
        with torch.no_grad():
            metrics.update(head(model.features(x_val)), y_val)
        head.train()
        return metrics.compute()["mIoU"]

    before = miou()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        x, y = halves(4, g)
        loss = segmentation_loss(head(model.features(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = miou()
    assert before < 0.7 and after > 0.9, (before, after)
    backbone_untouched(model)


# -- detection ------------------------------------------------------------------------------------------------
def det_targets(masks: bool = False):
    images_ = [torch.rand(3, IMG, IMG), torch.rand(3, 48, 80)]  # any size: the transform letterboxes
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [40.0, 8.0, 70.0, 30.0]]), "labels": torch.tensor([2, 1])},
    ]
    if masks:
        for image, target in zip(images_, targets, strict=True):
            m = torch.zeros(len(target["boxes"]), *image.shape[-2:], dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(target["boxes"].int().tolist()):
                m[j, y1:y2, x1:x2] = 1
            target["masks"] = m
    return images_, targets


def small_detector(kind, model, num_classes=3, **kwargs):
    return build_detector(
        kind,
        model.features,
        spec_of(model),
        num_classes,
        IMG,
        image_mean=MEAN,
        image_std=STD,
        fpn_channels=16,
        box_head_dim=32,
        mask_head_channels=8,
        **kwargs,
    )


@pytest.mark.parametrize("kind", DETECTORS)
def test_detectors_train_and_predict_on_a_side_network(kind, swin):
    torch.manual_seed(0)
    detector = small_detector(kind, swin)
    assert isinstance(detector.backbone, PyramidBackbone) and isinstance(detector.transform, FixedSizeTransform)
    retina = kind == "retinanet"
    assert detector.backbone.strides == ((8, 16, 32, 64, 128) if retina else (4, 8, 16, 32, 64))
    ims, targets = det_targets(masks=kind == "mask_rcnn")
    detector.train()
    swin.zero_grad(set_to_none=True)
    losses = detector(ims, targets)
    expected = {"classification", "bbox_regression"} if retina else {"loss_classifier", "loss_objectness"}
    assert expected <= set(losses) and ("loss_mask" in losses) == (kind == "mask_rcnn")
    sum(losses.values()).backward()
    backbone_untouched(swin)  # gradient isolation holds with a detector on top
    adapters = [p for n, p in swin.method.named_parameters() if "adapters" in n]
    assert adapters and all(p.grad is not None for p in adapters)
    swin.zero_grad(set_to_none=True)

    detector.eval()
    with torch.no_grad():
        out = detector(ims)
    assert len(out) == 2
    for o, image in zip(out, ims, strict=True):
        assert o["boxes"].shape[1] == 4 and len(o["scores"]) == len(o["labels"]) == len(o["boxes"])
        if len(o["boxes"]):  # predictions are in each image's own coordinates
            assert o["boxes"][:, 2].max() <= image.shape[-1] + 1e-4 and o["boxes"][:, 3].max() <= image.shape[-2] + 1e-4
        if kind == "mask_rcnn":
            assert o["masks"].shape[1:] == (1, *image.shape[-2:])


def test_run_detector_autocasts_the_features_only(swin):
    """Under CPU bf16 autocast the method's maps are bf16; the FPN, RPN, box head and losses stay float32."""
    torch.manual_seed(0)
    detector = small_detector("faster_rcnn", swin).train()
    seen: dict[str, torch.dtype] = {}
    hooks = [
        swin.method.register_forward_hook(lambda m, a, out: seen.__setitem__("features", out.pyramid[0].dtype)),
        detector.backbone.fpn.register_forward_hook(lambda m, a, out: seen.__setitem__("fpn", out["0"].dtype)),
        detector.roi_heads.box_predictor.register_forward_hook(lambda m, a, out: seen.__setitem__("box", out[1].dtype)),
    ]
    ims, targets = det_targets()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = run_detector(detector, ims, targets)
            assert torch.is_autocast_enabled("cpu")  # restored for the caller
        assert seen == {"features": torch.bfloat16, "fpn": torch.float32, "box": torch.float32}
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        backbone_untouched(swin)
        swin.zero_grad(set_to_none=True)
        seen.clear()
        run_detector(detector, ims, targets)  # no autocast: everything float32, as a plain call
        assert set(seen.values()) == {torch.float32}
    finally:
        for h in hooks:
            h.remove()


def test_fixed_size_transform_letterboxes_to_exactly_the_backbone_size():
    t = FixedSizeTransform((64, 64), MEAN, STD)
    ims = [torch.rand(3, 48, 96), torch.rand(3, 200, 100), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 96.0, 48.0]]), "labels": torch.tensor([1])} for _ in ims]
    batch, out = t(ims, targets)
    assert batch.tensors.shape == (3, 3, 64, 64)
    assert batch.image_sizes == [(32, 64), (64, 32), (64, 64)]  # aspect ratio kept
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[0.0, 0.0, 64.0, 32.0]]))
    assert batch.tensors[0, :, 32:].abs().max() == 0  # padding after normalisation: the mean colour
    # predictions come back in original coordinates (postprocess runs in eval mode only)
    back = t.eval().postprocess([{"boxes": out[0]["boxes"]}], batch.image_sizes[:1], [(48, 96)])
    torch.testing.assert_close(back[0]["boxes"], torch.tensor([[0.0, 0.0, 96.0, 48.0]]))


def test_detector_on_a_patch14_vit_resamples_to_power_of_two_strides():
    model = tiny("dinov2_reg", "losa")
    spec = spec_of(model)
    assert spec.strides == (14,)
    detector = build_detector(
        "faster_rcnn", model.method, spec, 2, 56, image_mean=MEAN, image_std=STD, fpn_channels=16, box_head_dim=16
    )
    assert detector.backbone.neck.out_spec.strides == (4, 8, 16, 32)
    assert detector.backbone.source is model.method
    detector.eval()
    with torch.no_grad():
        assert detector([torch.rand(3, 56, 56)])[0]["boxes"].shape[1] == 4


def test_build_detector_rejects_bad_options(swin):
    with pytest.raises(ConfigError, match="unknown detector"):
        small_detector("yolo", swin)
    with pytest.raises(ConfigError, match="background"):
        build_detector("faster_rcnn", swin.features, spec_of(swin), 1, IMG, image_mean=MEAN, image_std=STD)
    with pytest.raises(ConfigError, match="anchor_sizes"):
        small_detector("faster_rcnn", swin, anchor_sizes=((32,), (64,)))
    with pytest.raises(ConfigError, match="min_size"):
        small_detector("faster_rcnn", swin, min_size=800)


def squares(n: int, generator: torch.Generator, first_id: int = 0):
    """Dark noisy images with one bright square each; the box is the square."""
    out = []
    for i in range(n):
        x = torch.rand(3, IMG, IMG, generator=generator) * 0.2
        s = int(torch.randint(18, 30, (1,), generator=generator))
        x0, y0 = (int(v) for v in torch.randint(0, IMG - s, (2,), generator=generator))
        x[:, y0 : y0 + s, x0 : x0 + s] = 0.9
        box = torch.tensor([[x0, y0, x0 + s, y0 + s]], dtype=torch.float32)
        out.append((x, {"boxes": box, "labels": torch.tensor([1]), "image_id": first_id + i}))
    return out


def test_detection_trains_end_to_end():
    torch.manual_seed(0)
    model = tiny("swin", "e3va", out_stages=(0, 1, 2, 3))
    detector = build_detector(
        "faster_rcnn",
        model.method,
        spec_of(model),
        2,
        IMG,
        image_mean=MEAN,
        image_std=STD,
        fpn_channels=32,
        box_head_dim=64,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
    )
    val = squares(8, torch.Generator().manual_seed(1))
    gt = coco_ground_truth([t for _, t in val], ["square"])

    def map50() -> float:
        detector.eval()
        evaluator = CocoEvaluator(gt)
        with torch.no_grad():
            evaluator.update(detector([x for x, _ in val]), [t for _, t in val])
        detector.train()
        return evaluator.compute()["bbox_mAP_50"]

    before = map50()
    opt = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    detector.train()
    for step in range(50):
        batch = squares(4, g, first_id=100 + 4 * step)
        loss = sum(detector([x for x, _ in batch], [t for _, t in batch]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = map50()
    assert before < 0.2 and after > 0.6, (before, after)
    backbone_untouched(model)


# -- the shared real data, through the whole pipeline ---------------------------------------------------------
@pytest.mark.e2e
def test_camvid_through_upernet_with_sliding_windows(swin):
    root = require_asset(DATA / "camvid-240x180")
    train = CamVidDataset(root, "train", build_segmentation_transforms(IMG, train=True, mean=MEAN, std=STD))
    x, y = next(iter(DataLoader(train, batch_size=2)))
    head = UPerNetHead(spec_of(swin), train.num_classes, channels=16)
    swin.zero_grad(set_to_none=True)
    segmentation_loss(head(swin.features(x)), y).backward()
    backbone_untouched(swin)
    swin.zero_grad(set_to_none=True)

    tf = build_segmentation_transforms(IMG, train=False, mean=MEAN, std=STD, resize_eval=False)
    x, y = next(iter(DataLoader(CamVidDataset(root, "val", tf), batch_size=2)))
    assert x.shape == (2, 3, 180, 240)  # larger than the model's 64 px: the sliding-window case
    metrics = SegmentationMetrics(11, class_names=CAMVID_CLASSES)
    with torch.no_grad():
        logits = predict_segmentation(lambda im: head(swin.features(im)), x, IMG, mode="slide", stride=48)
    assert logits.shape == (2, 11, 180, 240)
    metrics.update(logits, y)
    assert 0.0 <= metrics.compute()["mIoU"] <= 1.0


@pytest.mark.e2e
def test_bccd_through_faster_rcnn_and_coco_eval(swin):
    root = require_asset(DATA / "bccd")
    train_tf, eval_tf = build_detection_transforms(train=True, img_size=IMG), build_detection_transforms(train=False)
    train = VOCDetectionDataset(root, "test", train_tf, classes=BCCD_CLASSES)
    detector = small_detector("faster_rcnn", swin, num_classes=train.num_classes)  # 3 cell types + background
    ims, targets = detection_collate([train[0], train[1]])
    detector.train()
    swin.zero_grad(set_to_none=True)
    losses = detector(ims, targets)
    sum(losses.values()).backward()
    assert all(v.isfinite() for v in losses.values())
    backbone_untouched(swin)
    swin.zero_grad(set_to_none=True)

    val = Subset(VOCDetectionDataset(root, "test", eval_tf, classes=BCCD_CLASSES), [0, 1])
    ims, targets = detection_collate([val[0], val[1]])
    assert ims[0].shape == (3, 480, 640)
    evaluator = CocoEvaluator(to_coco(val))
    detector.eval()
    with torch.no_grad():
        outputs = detector(ims)
    assert all(len(o["boxes"]) == 0 or o["boxes"][:, 2].max() <= 640 for o in outputs)  # original coordinates
    evaluator.update(outputs, targets)
    assert 0.0 <= evaluator.compute()["bbox_mAP"] <= 1.0


def test_retinanet_on_a_vit_builds_only_the_levels_it_uses():
    vit = tiny("vit", "e3va", task="segmentation", head_options={"channels": 16})
    detector = build_detector(
        "retinanet", vit.method, spec_of(vit), 2, IMG, image_mean=MEAN, image_std=STD, fpn_channels=16
    )
    assert detector.backbone.neck.out_spec.strides == (8, 16, 32)  # no stride-4 deconvolutions for RetinaNet
    assert detector.backbone.strides == (8, 16, 32, 64, 128)
    detector.eval()
    with torch.no_grad():
        assert detector([torch.rand(3, IMG, IMG)])[0]["boxes"].shape[1] == 4
