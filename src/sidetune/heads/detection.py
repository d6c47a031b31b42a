"""Detection and instance segmentation: torchvision's RetinaNet, Faster R-CNN and Mask R-CNN on sidetune's pyramid.

torchvision's detectors accept any ``backbone`` module that has ``out_channels`` and maps a batch of
images to an ordered dict of feature maps (``torchvision/models/detection/backbone_utils.py``).
:class:`PyramidBackbone` is that module: it calls a sidetune feature function (the method), optionally
builds a pyramid from a one-level ViT map (:class:`~sidetune.heads.pyramid.PyramidNeck`), and runs an FPN
(``torchvision.ops.FeaturePyramidNetwork``) with the extra levels each detector expects:
``LastLevelP6P7`` for RetinaNet (levels of stride >= 8, then P6, P7: the RetinaNet paper's P3-P7),
``LastLevelMaxPool`` for the R-CNNs (all levels, then a stride-2 "pool" level for the RPN only).

Choices, and why:

* **Fixed input size.** A ViT or Swin backbone is built for one image size (position embeddings, window
  grids, LoSA's token mixing), but torchvision's ``GeneralizedRCNNTransform`` resizes each image to
  ``min_size``/``max_size`` keeping its aspect ratio and pads the batch to a multiple of 32: the backbone
  would see a different size per batch. :class:`FixedSizeTransform` replaces it: each image is resized to
  fit inside ``img_size`` keeping its aspect ratio, then padded at the bottom/right to exactly
  ``img_size`` (the letterbox of ViTDet's large-scale-jitter recipe). Stretching to ``img_size`` would be
  simpler but distorts every object of a non-square image; padding wastes some pixels instead. Boxes and
  masks are resized with the image, and predictions are mapped back to each input image's own size, so
  evaluation happens in original image coordinates.
* **Normalisation happens in the detector**, as everywhere in torchvision: images go in as float tensors
  in ``[0, 1]`` (what :mod:`sidetune.data.detection` yields) and ``image_mean``/``image_std`` (the
  backbone's data config) are applied once, inside :class:`FixedSizeTransform`. Do not normalise in the
  dataset transform as well. Padding is applied after normalisation, so it is the mean colour.
* **Anchors follow the pyramid.** One anchor size set per FPN level, proportional to its stride:
  RetinaNet ``4 s * 2^(k/3)``, k = 0, 1, 2 (32-40-50 px at stride 8, torchvision's defaults), R-CNN RPN
  ``8 s`` (32 px at stride 4); aspect ratios 0.5, 1, 2. Override with ``anchor_sizes``.
* **Power-of-two strides.** torchvision's RoI pooling infers each level's scale as a power of two from
  the map size. A patch-14 ViT's simple pyramid has strides 3.5/7/14/28, so the neck resamples it to
  4/8/16/32 (:class:`~sidetune.heads.pyramid.SimpleFeaturePyramid` ``out_strides``); choose an image
  size divisible by 32 to make those strides exact.
* **Mixed precision: the backbone only.** Under autocast (CPU bf16, CUDA fp16/bf16) only the feature
  function (the frozen backbone and the side network, where the time goes) runs in 16 bits; the neck, FPN,
  RPN and box/mask heads run in float32 (:func:`run_detector`, which ``SidetuneModel`` calls). torchvision
  decodes boxes in the dtype of the regression output, and bfloat16's 8-bit mantissa moves a coordinate of
  160 px by several pixels (decoded proposals, RoI boxes, NMS), enough to spoil mAP at high IoU.
* **Labels**: ``num_classes`` counts the background, as in torchvision: a dataset with K classes has
  labels 1..K and needs ``num_classes = K + 1`` (for RetinaNet too, where index 0 is simply never a target).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..errors import ConfigError, require_positive_int, unknown_choice
from ..features import Features
from .pyramid import PyramidNeck, PyramidSpec, _pyramid_of

__all__ = [
    "DETECTORS",
    "FixedSizeTransform",
    "PyramidBackbone",
    "build_detector",
    "default_anchor_sizes",
    "run_detector",
    "run_detector_on_taps",
]

DetectorKind = Literal["retinanet", "faster_rcnn", "mask_rcnn"]
#: The detectors :func:`build_detector` builds.
DETECTORS: tuple[str, ...] = ("retinanet", "faster_rcnn", "mask_rcnn")
FeaturesFn = Callable[[torch.Tensor], Features]
#: The autocast states (device type, dtype) that :func:`run_detector` suspended around the detector and
#: :class:`PyramidBackbone` restores around the feature function only.
_FEATURE_AUTOCAST: ContextVar[tuple[tuple[str, torch.dtype], ...]] = ContextVar("_FEATURE_AUTOCAST", default=())
#: The taps of the batch in progress when a detector runs from a tap cache (:func:`run_detector_on_taps`):
#: :class:`PyramidBackbone` hands them to the feature function instead of the (placeholder) images.
_CACHED_TAPS: ContextVar[Any] = ContextVar("_CACHED_TAPS", default=None)


def _active_autocast() -> tuple[tuple[str, torch.dtype], ...]:
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple((d, torch.get_autocast_dtype(d)) for d in devices if torch.is_autocast_enabled(d))


@contextlib.contextmanager
def _autocast(states: Sequence[tuple[str, torch.dtype]], enabled: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device, dtype in states:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


def run_detector(detector: nn.Module, images: Any, targets: Any = None) -> Any:
    """Call a detector of :func:`build_detector` with autocast, if any is active, around its features only.

    The active autocast (e.g. the training loop's CPU bf16) is switched off for the detector and switched back on
    by its :class:`PyramidBackbone` around the feature function (backbone + side network), whose maps then go
    on in float32: the neck, FPN, RPN and heads, and with them every box computation, stay float32. Without an
    active autocast this is ``detector(images, targets)``.
    """
    states = _active_autocast()
    if not states:
        return detector(images, targets)
    token = _FEATURE_AUTOCAST.set(states)
    try:
        with _autocast(states, enabled=False):
            return detector(images, targets)
    finally:
        _FEATURE_AUTOCAST.reset(token)


class _CachedTransform(nn.Module):
    """Stands in for a detector's transform when its inputs come from a tap cache: the images were normalised and
    letterboxed (and the targets resized with them) when the cache was built, so nothing is left to do but to
    say where each image sits inside the padded input. ``postprocess`` (back to original sizes) is the real one.
    """

    def __init__(self, real: nn.Module, image_sizes: list[tuple[int, int]], padded: torch.Tensor) -> None:
        super().__init__()
        self.real = [real]  # a list: not a submodule (the detector keeps owning it)
        self.image_sizes, self.padded = image_sizes, padded

    def forward(self, images, targets=None):
        from torchvision.models.detection.image_list import ImageList

        return ImageList(self.padded, self.image_sizes), targets

    def postprocess(self, *args, **kwargs):
        return self.real[0].postprocess(*args, **kwargs)


def run_detector_on_taps(
    detector: nn.Module,
    taps: Any,
    image_sizes: torch.Tensor,
    original_sizes: torch.Tensor,
    targets: Any = None,
) -> Any:
    """:func:`run_detector` on cached taps instead of images: the same losses (train) or detections mapped back to
    each image's original size (eval), without running the backbone.

    Args:
        detector: a detector of :func:`build_detector` whose feature function accepts
            :class:`~sidetune.backbones.Taps` (every side method does).
        taps: the taps of the letterboxed, normalised images (what the detector's transform would have fed its
            backbone).
        image_sizes: (B, 2) height and width of each letterboxed image inside the padded input.
        original_sizes: (B, 2) height and width of each image before the letterbox (predictions map back there).
        targets: the targets in letterboxed coordinates (train mode).
    """
    height, width = detector.transform.img_size
    device = image_sizes.device
    padded = torch.zeros((), device=device).expand(len(image_sizes), 3, height, width)  # shape only: no memory
    placeholders = [torch.zeros((), device=device).expand(3, int(h), int(w)) for h, w in original_sizes.tolist()]
    real = detector.transform
    detector.transform = _CachedTransform(real, [tuple(int(v) for v in s) for s in image_sizes.tolist()], padded)
    token = _CACHED_TAPS.set(taps)
    try:
        return run_detector(detector, placeholders, targets)
    finally:
        _CACHED_TAPS.reset(token)
        detector.transform = real


def _size(img_size: int | Sequence[int]) -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size):
        raise ConfigError(f"img_size must be a positive int or (height, width), got {img_size!r}.")
    return int(size[0]), int(size[1])


def _is_power_of_two(stride: float) -> bool:
    return stride >= 1 and float(math.log2(stride)).is_integer()


def _snap_power_of_two(stride: float) -> int:
    return 2 ** round(math.log2(stride))


class PyramidBackbone(nn.Module):
    """A torchvision detection backbone made of a sidetune feature function and an FPN.

    Args:
        features_fn: images (B, 3, H, W) -> :class:`~sidetune.features.Features` with a pyramid: the method
            module (``model.method``), or a bound method of a module (``model.features``). The module is
            registered as the submodule ``source``, so its trainable parameters are the detector's too
            (with ``model.features`` that includes the classification head, which then gets no gradient).
        spec: the method's pyramid spec.
        out_channels: FPN width (256 in the papers; smaller is cheaper).
        extra_blocks: ``"p6p7"`` (RetinaNet), ``"maxpool"`` (R-CNNs) or ``"none"``.
        min_stride: pyramid levels with a smaller stride are not used (RetinaNet: 8, as its paper's P3).
        neck_channels: width of the simple pyramid built from a one-level input; default ``out_channels``.
        stage_norms: a trainable LayerNorm per input level (methods whose stages come unnormalised).

    Attributes:
        out_channels: the width of every returned map (what torchvision reads).
        strides: the stride of every returned map, in order.
        names: the keys of the levels that come from the pyramid (what RoI pooling reads).
    """

    def __init__(
        self,
        features_fn: FeaturesFn,
        spec: PyramidSpec,
        *,
        out_channels: int = 256,
        extra_blocks: Literal["p6p7", "maxpool", "none"] = "maxpool",
        min_stride: float = 0,
        neck_channels: int | None = None,
        stage_norms: bool = False,
    ) -> None:
        super().__init__()
        require_positive_int("out_channels", out_channels, "PyramidBackbone")
        if not callable(features_fn):
            raise ConfigError(f"PyramidBackbone: features_fn must be callable, got {type(features_fn).__name__}.")
        owner = features_fn if isinstance(features_fn, nn.Module) else getattr(features_fn, "__self__", None)
        self.source = owner if isinstance(owner, nn.Module) else None
        self._features_fn = None if isinstance(features_fn, nn.Module) else features_fn
        scales, out_strides = (4.0, 2.0, 1.0, 0.5), None
        if spec.num_levels == 1:  # a ViT: build only the simple-pyramid levels that will be used
            snapped = {s: _snap_power_of_two(spec.strides[0] / s) for s in scales}
            scales = tuple(s for s in scales if snapped[s] >= min_stride) or scales[-1:]
            if not _is_power_of_two(spec.strides[0]):
                out_strides = tuple(snapped[s] for s in scales)
        self.neck = PyramidNeck(
            spec, neck_channels or out_channels, stage_norms=stage_norms, scales=scales, out_strides=out_strides
        )
        levels = self.neck.out_spec
        bad = [s for s in levels.strides if not _is_power_of_two(s)]
        if bad:
            raise ConfigError(
                f"PyramidBackbone: pyramid strides {levels.strides} include {bad}, not powers of two; torchvision's "
                "RoI pooling and anchors assume power-of-two strides. Resample the pyramid (SimpleFeaturePyramid "
                "out_strides) first."
            )
        self.levels = [i for i, s in enumerate(levels.strides) if s >= min_stride]
        if not self.levels:
            raise ConfigError(
                f"PyramidBackbone: no pyramid level has stride >= {min_stride} (strides {levels.strides})."
            )
        self.names = [str(i) for i in range(len(self.levels))]
        in_channels = [levels.channels[i] for i in self.levels]
        strides = [levels.strides[i] for i in self.levels]
        if extra_blocks == "p6p7":
            extra: nn.Module | None = LastLevelP6P7(out_channels, out_channels)  # P6 from P5, as RetinaNet v2
            strides += [strides[-1] * 2, strides[-1] * 4]
        elif extra_blocks == "maxpool":
            extra = LastLevelMaxPool()
            strides += [strides[-1] * 2]
        elif extra_blocks == "none":
            extra = None
        else:
            raise unknown_choice("extra_blocks", str(extra_blocks), ("p6p7", "maxpool", "none"))
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.strides = tuple(strides)

    def features(self, images: torch.Tensor) -> Features:
        fn = self._features_fn if self._features_fn is not None else self.source
        cached = _CACHED_TAPS.get()
        return fn(images if cached is None else cached)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, 3, H, W) normalised images -> ordered dict of (B, out_channels, H / s, W / s) maps, fine to coarse.

        Inside :func:`run_detector` with autocast, only the feature function runs under it; its maps are cast
        to float32 for the neck and the FPN.
        """
        states = _FEATURE_AUTOCAST.get()
        if states:
            with _autocast(states, enabled=True):
                levels = _pyramid_of(self.features(images), "PyramidBackbone")
            levels = [x.float() for x in levels]
        else:
            levels = _pyramid_of(self.features(images), "PyramidBackbone")
        pyramid = self.neck(levels)
        return self.fpn(OrderedDict((name, pyramid[i]) for name, i in zip(self.names, self.levels, strict=True)))


class FixedSizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform, with every batch exactly ``img_size``: normalise, letterbox, pad.

    Each image is normalised, resized (bilinear; masks nearest) by ``min(H / h, W / w)`` so that it fits
    inside ``img_size = (H, W)`` keeping its aspect ratio, and padded at the bottom/right to exactly
    ``(H, W)``. Predictions are mapped back to each input image's own size by torchvision's ``postprocess``.

    Args:
        img_size: the backbone's fixed input size (int or (H, W)).
        image_mean: per-channel mean of the backbone's data config (images come in ``[0, 1]``).
        image_std: per-channel std.
    """

    def __init__(self, img_size: int | Sequence[int], image_mean: Sequence[float], image_std: Sequence[float]):
        h, w = _size(img_size)
        super().__init__(min(h, w), max(h, w), list(image_mean), list(image_std), size_divisible=1)
        self.img_size = (h, w)

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        h, w = image.shape[-2:]
        height, width = self.img_size
        scale = min(height / h, width / w)
        size = (min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale))))
        if size != (h, w):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], [h, w], list(size))
        if "masks" in target and target["masks"].shape[-2:] != size:
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 1) -> torch.Tensor:
        batch = images[0].new_zeros((len(images), images[0].shape[0], *self.img_size))
        for out, image in zip(batch, images, strict=True):
            out[:, : image.shape[-2], : image.shape[-1]].copy_(image)
        return batch

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, mean={self.image_mean}, std={self.image_std}, "
            "letterbox: fit keeping aspect ratio, pad bottom/right)"
        )


def default_anchor_sizes(kind: DetectorKind, strides: Sequence[float]) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per FPN level: RetinaNet ``4 s 2^(k/3)`` for k = 0, 1, 2; R-CNN RPN ``8 s``."""
    if kind == "retinanet":
        return tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
    return tuple((int(8 * s),) for s in strides)


def build_detector(
    kind: DetectorKind,
    features_fn: FeaturesFn,
    spec: PyramidSpec,
    num_classes: int,
    img_size: int | Sequence[int],
    *,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    fpn_channels: int = 256,
    neck_channels: int | None = None,
    stage_norms: bool = False,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    **detector_kwargs: Any,
) -> RetinaNet | FasterRCNN | MaskRCNN:
    """Build a torchvision RetinaNet, Faster R-CNN or Mask R-CNN on a sidetune method's pyramid.

    The result is a plain torchvision model: ``model(images)`` in eval mode returns one dict per image with
    ``boxes`` (XYXY, in that image's own pixel coordinates), ``scores``, ``labels`` (and ``masks``,
    (N, 1, H, W) probabilities, for Mask R-CNN); ``model(images, targets)`` in train mode returns a dict of
    losses. ``images`` is a list of (3, H, W) float tensors in ``[0, 1]`` of any size (see the module
    docstring for the fixed-size letterbox and the normalisation).

    Args:
        kind: ``"retinanet"``, ``"faster_rcnn"`` or ``"mask_rcnn"``.
        features_fn: the method (see :class:`PyramidBackbone`).
        spec: the method's pyramid spec.
        num_classes: number of classes including the background (K + 1 for labels 1..K).
        img_size: the backbone's fixed input size.
        image_mean: the backbone's normalisation mean (its data config).
        image_std: the backbone's normalisation std.
        fpn_channels: FPN width.
        neck_channels: width of the simple pyramid built from a one-level (ViT) input; default ``fpn_channels``.
        stage_norms: a trainable LayerNorm per input level.
        anchor_sizes: one tuple of sizes per FPN level (default :func:`default_anchor_sizes`).
        aspect_ratios: anchor aspect ratios, the same at every level.
        box_head_dim: width of the R-CNN box head's two fully connected layers (torchvision: 1024).
        mask_head_channels: width of the Mask R-CNN mask head's four convolutions (torchvision: 256).
        **detector_kwargs: passed to the torchvision constructor (e.g. ``box_score_thresh``,
            ``box_detections_per_img``, ``score_thresh``, ``detections_per_img``).

    Returns:
        The torchvision detector; its ``backbone`` is a :class:`PyramidBackbone`, its ``transform`` a
        :class:`FixedSizeTransform`.
    """
    if kind not in DETECTORS:
        raise unknown_choice("detector", str(kind), DETECTORS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(
            f"num_classes counts the background: K + 1 for a dataset with K classes (at least 2), got {num_classes!r}."
        )
    size = _size(img_size)
    for name in ("min_size", "max_size", "image_mean", "image_std"):
        if name in detector_kwargs:
            raise ConfigError(f"build_detector: {name} is fixed by img_size/image_mean/image_std; do not pass it.")
    retina = kind == "retinanet"
    backbone = PyramidBackbone(
        features_fn,
        spec,
        out_channels=fpn_channels,
        extra_blocks="p6p7" if retina else "maxpool",
        min_stride=8 if retina else 0,
        neck_channels=neck_channels,
        stage_norms=stage_norms,
    )
    sizes = tuple(tuple(s) for s in anchor_sizes) if anchor_sizes is not None else None
    sizes = sizes or default_anchor_sizes(kind, backbone.strides)
    if len(sizes) != len(backbone.strides):
        raise ConfigError(
            f"anchor_sizes has {len(sizes)} level(s) but the FPN returns {len(backbone.strides)} (strides "
            f"{backbone.strides}); give one tuple of sizes per level."
        )
    anchors = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
    common = dict(min_size=min(size), max_size=max(size), image_mean=list(image_mean), image_std=list(image_std))
    if retina:
        model: RetinaNet | FasterRCNN | MaskRCNN = RetinaNet(
            backbone, num_classes, anchor_generator=anchors, **common, **detector_kwargs
        )
    else:
        box_pool = MultiScaleRoIAlign(backbone.names, output_size=7, sampling_ratio=2)
        box_head = TwoMLPHead(fpn_channels * 7 * 7, box_head_dim)
        box_predictor = FastRCNNPredictor(box_head_dim, num_classes)
        rcnn = dict(rpn_anchor_generator=anchors, box_roi_pool=box_pool, box_head=box_head, box_predictor=box_predictor)
        if kind == "faster_rcnn":
            model = FasterRCNN(backbone, None, **rcnn, **common, **detector_kwargs)
        else:
            mask_pool = MultiScaleRoIAlign(backbone.names, output_size=14, sampling_ratio=2)
            mask_head = MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, 1)
            mask_predictor = MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes)
            model = MaskRCNN(
                backbone,
                None,
                mask_roi_pool=mask_pool,
                mask_head=mask_head,
                mask_predictor=mask_predictor,
                **rcnn,
                **common,
                **detector_kwargs,
            )
    model.transform = FixedSizeTransform(size, image_mean, image_std)
    return model
