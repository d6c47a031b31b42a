"""Semantic segmentation: a UPerNet-style head on ``Features.pyramid``, its loss and its inference modes.

The head (Xiao et al. 2018, "Unified Perceptual Parsing"; the E3VA paper's segmentation head, sec. 4.1):

1. a pyramid pooling module (PPM, PSPNet) on the coarsest level: average-pool to 1x1, 2x2, 3x3, 6x6,
   1x1 conv each, upsample, concatenate with the level itself, 3x3 conv;
2. an FPN over the other levels with the PPM output on top (``torchvision.ops.FeaturePyramidNetwork``:
   1x1 lateral convs, top-down nearest upsampling, 3x3 output convs);
3. every FPN output upsampled to the finest level, concatenated, fused by a 3x3 conv, dropout, 1x1
   classifier, and bilinear upsampling of the logits to the image size.

Norms are GroupNorm rather than the paper's (synchronised) BatchNorm: side-tuning runs at small batch
sizes, where batch statistics are noise, and GroupNorm behaves the same in train and eval mode. The PPM's
pooled branches have no norm at all (a norm over a 1x1 map normalises nothing).

A one-level input (a plain ViT) first goes through a :class:`~sidetune.heads.pyramid.SimpleFeaturePyramid`
(inside the head's :class:`~sidetune.heads.pyramid.PyramidNeck`).

Inference: :func:`whole_inference` resizes each image to the model's fixed input size and the logits back;
:func:`slide_inference` tiles images larger than the model's input with overlapping windows of exactly that
size and averages the logits where windows overlap (the mmsegmentation "slide" mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation

from ..errors import ConfigError, require_positive_int
from ..features import Features
from .pyramid import PyramidNeck, PyramidSpec, _pyramid_of

__all__ = [
    "IGNORE_INDEX",
    "UPerNetHead",
    "group_norm",
    "predict_segmentation",
    "segmentation_loss",
    "slide_inference",
    "whole_inference",
]

#: The label every sidetune segmentation dataset gives to pixels that are not scored (void, unlabelled, borders).
IGNORE_INDEX = 255

SegmentFn = Callable[[torch.Tensor], torch.Tensor]


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with as many groups as divide ``channels``, at most ``max_groups``, at least 2 channels each."""
    groups = max(1, min(max_groups, channels // 2))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(
        in_channels, out_channels, kernel_size, norm_layer=group_norm, activation_layer=nn.ReLU, bias=False
    )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling on the coarsest level. (B, C, H, W) -> (B, channels, H, W)."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
            for s in pool_scales
        )
        self.fuse = _conv(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.branches]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class UPerNetHead(nn.Module):
    """UPerNet-style segmentation head: ``Features`` -> (B, num_classes, H, W) logits at the image size.

    Args:
        spec: the method's pyramid spec (any number of levels; one level gets a simple feature pyramid).
        num_classes: number of classes (the ignore label is not a class).
        channels: width of the PPM, FPN and fusion layers (and of the simple pyramid). 512 in the paper's
            Swin setting; the default is small for CPU training.
        pool_scales: PPM output sizes.
        dropout: dropout before the classifier.
        stage_norms: add a trainable LayerNorm per input level (for methods whose stages come unnormalised).

    Shapes: levels ``(B, C_i, H_i, W_i)`` -> ``(B, num_classes, H, W)`` with ``(H, W)`` = ``size`` when given,
    else the finest level's size times its stride (the input image size).
    """

    def __init__(
        self,
        spec: PyramidSpec,
        num_classes: int,
        *,
        channels: int = 128,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        stage_norms: bool = False,
    ) -> None:
        super().__init__()
        require_positive_int("num_classes", num_classes, "UPerNet head")
        require_positive_int("channels", channels, "UPerNet head")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"UPerNet head: dropout must be in [0, 1), got {dropout!r}.")
        self.spec = spec
        self.num_classes = num_classes
        self.neck = PyramidNeck(spec, channels, stage_norms=stage_norms)
        levels = self.neck.out_spec
        self.ppm = PyramidPooling(levels.channels[-1], channels, pool_scales)
        self.fpn = FeaturePyramidNetwork([*levels.channels[:-1], channels], channels, norm_layer=group_norm)
        self.fuse = _conv(levels.num_levels * channels, channels, 3)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Features | Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        pyramid = _pyramid_of(features, "UPerNetHead")
        if size is None:  # the finest level times its stride is the input size (exact for whole strides)
            stride = self.spec.strides[0]
            size = (round(pyramid[0].shape[-2] * stride), round(pyramid[0].shape[-1] * stride))
        levels = self.neck(pyramid)
        top = self.ppm(levels[-1])
        inputs = {str(i): x for i, x in enumerate([*levels[:-1], top])}
        outs = list(self.fpn(inputs).values())
        fine = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=fine, mode="bilinear", align_corners=False) for x in outs[1:]]
        logits = self.classifier(self.drop(self.fuse(torch.cat(outs, dim=1))))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Pixel-wise cross-entropy, skipping ``ignore_index`` pixels.

    Args:
        logits: (B, K, h, w); resized (bilinear) to the masks' size when it differs.
        masks: (B, H, W) integer labels in ``[0, K)`` or ``ignore_index``.
        ignore_index: the label that is not scored.
        class_weights: optional (K,) weights.
        label_smoothing: see ``torch.nn.functional.cross_entropy``.

    Returns:
        The mean loss over scored pixels; zero (with a graph, so ``backward`` works) when every pixel is ignored.
    """
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    masks = masks.long()
    if not (masks != ignore_index).any():
        return logits.sum() * 0.0  # cross_entropy's mean over zero pixels would be nan
    return F.cross_entropy(
        logits, masks, weight=class_weights, ignore_index=ignore_index, label_smoothing=label_smoothing
    )


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair):
        raise ConfigError(f"{name} must be a positive int or (height, width), got {value!r}.")
    return int(pair[0]), int(pair[1])


def whole_inference(fn: SegmentFn, images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize each image to the model's input ``size``, predict, resize the logits back.

    Args:
        fn: (B, 3, h, w) -> (B, K, h, w) logits at ``size``.
        images: (B, 3, H, W) normalised images.
        size: the model's fixed input size (int or (h, w)).

    Returns:
        (B, K, H, W) logits.
    """
    h, w = _pair(size, "size")
    height, width = images.shape[-2:]
    x = images if (height, width) == (h, w) else F.interpolate(images, (h, w), mode="bilinear", align_corners=False)
    logits = fn(x)
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
    return logits


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = [*range(0, length - window, stride), length - window]
    return sorted(set(starts))


def slide_inference(
    fn: SegmentFn,
    images: torch.Tensor,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    max_batch: int = 16,
) -> torch.Tensor:
    """Tile images with overlapping windows of the model's input size; average the logits where they overlap.

    Windows start every ``stride`` pixels, the last one flush with the border, so every pixel is covered;
    an image smaller than the window (in either dimension) is zero-padded at the bottom/right (zero is the
    mean colour of a normalised image) and the padding is cropped from the logits.

    Args:
        fn: (N, 3, h, w) -> (N, K, h, w) logits, at the window size.
        images: (B, 3, H, W) normalised images.
        window: the model's fixed input size (int or (h, w)).
        stride: distance between window starts; default two thirds of the window (one third overlap).
        max_batch: windows per call of ``fn``.

    Returns:
        (B, K, H, W) logits.
    """
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride") if stride is not None else (max(1, 2 * wh // 3), max(1, 2 * ww // 3))
    require_positive_int("max_batch", max_batch, "slide_inference")
    b, _, height, width = images.shape
    pad_h, pad_w = max(0, wh - height), max(0, ww - width)
    x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    big_h, big_w = x.shape[-2:]
    boxes = [(y, xx) for y in _starts(big_h, wh, sh) for xx in _starts(big_w, ww, sw)]
    crops = [(i, y, xx) for i in range(b) for y, xx in boxes]
    total: torch.Tensor | None = None
    count = x.new_zeros((1, 1, big_h, big_w))
    for y, xx in boxes:
        count[..., y : y + wh, xx : xx + ww] += 1
    for start in range(0, len(crops), max_batch):
        chunk = crops[start : start + max_batch]
        logits = fn(torch.stack([x[i, :, y : y + wh, xx : xx + ww] for i, y, xx in chunk]))
        if total is None:
            total = logits.new_zeros((b, logits.shape[1], big_h, big_w))
        for (i, y, xx), out in zip(chunk, logits, strict=True):
            total[i, :, y : y + wh, xx : xx + ww] += out
    assert total is not None
    return (total / count)[..., :height, :width]


def predict_segmentation(
    fn: SegmentFn,
    images: torch.Tensor,
    size: int | Sequence[int],
    *,
    mode: str = "whole",
    stride: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Logits for images of any size: ``mode="whole"`` (:func:`whole_inference`) or ``"slide"``
    (:func:`slide_inference`).

    Returns:
        (B, K, H, W) logits at the images' own size; ``argmax(1)`` gives the labels.
    """
    if mode == "whole":
        return whole_inference(fn, images, size)
    if mode == "slide":
        return slide_inference(fn, images, size, stride)
    raise ConfigError(f"unknown segmentation inference mode {mode!r}; choose 'whole' or 'slide'.")
