"""Feature pyramids for dense heads: their declared shape, and the necks that make one from any ``Features``.

Every dense head and neck here is built from a :class:`PyramidSpec` (channels and input-pixel strides of
each level, fine to coarse), never by running a forward: a method knows its stage widths and strides
from the backbone's layout (Swin with E3VA: 4 levels, strides 4/8/16/32; a ViT: one level, stride = the
patch size).

* :class:`SimpleFeaturePyramid` turns the single stride-``s`` map of a plain ViT into levels at strides
  ``s/4, s/2, s, 2s`` with strided deconvolutions and pooling (ViTDet, Li et al. 2022, sec. 3; DESIGN.md:
  "a simple feature pyramid serves dense heads" on a plain ViT). A multi-level input passes through
  unchanged, so a dense head can always put one in front of its input.
* :class:`StageNorms`: a trainable LayerNorm per level, for methods whose stage outputs come without a
  norm (E3VA already ends each stage in one; a backbone's raw intermediate stages do not).
* :class:`PyramidNeck`: the two above in order; what the dense heads put before their own layers.

Strides of a patch-14 ViT (policy). ``s/4`` is 3.5 for patch 14: strides are kept as exact values (an
``int`` when whole, else a ``float``), because a rounded stride would lie about the map size (a 224 px
image gives a 64 x 64 map: 224 / 64 = 3.5, not 4). Consumers that need power-of-two strides (torchvision's
RoI pooling infers each level's scale as a power of two) pass ``out_strides=(4, 8, 16, 32)``: each level is
then resampled (bilinear) to ``round(H * s_in / t)`` cells, exact when the image size is divisible by the
stride. :func:`sidetune.heads.detection.build_detector` does this by itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from ..errors import ConfigError
from ..features import Features

__all__ = ["PyramidNeck", "PyramidSpec", "SimpleFeaturePyramid", "StageNorms", "exact_stride"]


def exact_stride(value: float) -> int | float:
    """A stride as an ``int`` when it is whole (4.0 -> 4), else the ``float`` itself (3.5)."""
    value = float(value)
    return int(value) if value.is_integer() else value


@dataclass(frozen=True)
class PyramidSpec:
    """The declared shape of a feature pyramid, fine to coarse.

    Attributes:
        channels: C_i of each level.
        strides: input pixels per map cell of each level, strictly increasing (``int`` when whole, else
            ``float``: 3.5 for the finest level of a patch-14 ViT's simple pyramid).

    Raises:
        ConfigError: empty, mismatched lengths, non-positive values, or strides not increasing.
    """

    channels: tuple[int, ...]
    strides: tuple[int | float, ...]

    def __post_init__(self) -> None:
        channels, strides = tuple(self.channels), tuple(self.strides)
        if not channels or len(channels) != len(strides):
            raise ConfigError(
                f"PyramidSpec: need one channel count and one stride per level, got channels={channels}, "
                f"strides={strides}."
            )
        if any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in channels):
            raise ConfigError(f"PyramidSpec: channels must be positive integers, got {channels}.")
        if any(isinstance(s, bool) or not isinstance(s, int | float) or s <= 0 for s in strides):
            raise ConfigError(f"PyramidSpec: strides must be positive numbers, got {strides}.")
        if any(b <= a for a, b in itertools.pairwise(strides)):
            raise ConfigError(f"PyramidSpec: strides must increase from fine to coarse, got {strides}.")
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "strides", tuple(exact_stride(s) for s in strides))

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    @classmethod
    def from_features(cls, features: Features) -> PyramidSpec:
        """The spec of an existing ``Features`` (for inspection; build heads from the method's declared spec)."""
        if features.pyramid is None or features.strides is None:
            raise ConfigError("these Features carry no pyramid: the method was not built for a dense task.")
        return cls(tuple(int(p.shape[1]) for p in features.pyramid), tuple(features.strides))

    def check(self, pyramid: Sequence[torch.Tensor], owner: str) -> None:
        """Raise a ConfigError when a runtime pyramid does not have this spec's levels and channels."""
        got = tuple(int(p.shape[1]) for p in pyramid)
        if got != self.channels:
            raise ConfigError(
                f"{owner} was built for a pyramid with channels {self.channels} (strides {self.strides}) but got "
                f"{len(got)} level(s) with channels {got}; build it from the method's own PyramidSpec."
            )


def _pyramid_of(features: Features | Sequence[torch.Tensor], owner: str) -> list[torch.Tensor]:
    if isinstance(features, Features):
        if features.pyramid is None:
            raise ConfigError(
                f"{owner} needs Features.pyramid, which this method did not produce; build the method for a "
                "dense task (e.g. E3VA with out_stages covering every stage)."
            )
        return list(features.pyramid)
    return list(features)


def _power_of_two(scale: float) -> int:
    k = math.log2(scale)
    if scale <= 0 or not float(k).is_integer():
        raise ConfigError(f"SimpleFeaturePyramid: scales must be powers of two (4, 2, 1, 0.5, ...), got {scale!r}.")
    return int(k)


class SimpleFeaturePyramid(nn.Module):
    """One stride-``s`` map -> a pyramid at strides ``s / scale`` (ViTDet's simple feature pyramid).

    Per scale ``2^k``: ``k`` stride-2 deconvolutions (``ConvTranspose2d``, with LayerNorm + GELU between
    them, halving the width each time) for ``k > 0``, nothing for ``k = 0``, ``-k`` stride-2 max-pools for
    ``k < 0``; then a 1x1 convolution to ``out_channels`` and a LayerNorm (over channels). ViTDet adds a 3x3
    convolution after the 1x1 one; it is left out because every head here (UPerNet's FPN, torchvision's
    FPN) starts with 3x3 convolutions of its own.

    A pyramid with more than one level (Swin, E3VA) passes through unchanged: ``out_spec == in_spec``.

    Args:
        spec: the input pyramid's spec.
        out_channels: width of every output level.
        scales: upsampling factor of each output level, fine to coarse (powers of two).
        out_strides: resample the levels to these strides (see the module docstring: power-of-two strides
            for a patch-14 ViT); None keeps the exact strides ``s / scale``.

    Shapes: ``[(B, C, H, W)]`` -> ``[(B, out_channels, H * scale_i, W * scale_i)]``.
    """

    def __init__(
        self,
        spec: PyramidSpec,
        out_channels: int = 128,
        *,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        out_strides: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.in_spec = spec
        self.passthrough = spec.num_levels > 1
        self.levels = nn.ModuleList()
        if self.passthrough:
            self.out_spec = spec
            self.resample: tuple[float | None, ...] = ()
            return
        scales = tuple(float(s) for s in scales)
        if not scales or any(b >= a for a, b in itertools.pairwise(scales)):
            raise ConfigError(f"SimpleFeaturePyramid: scales must decrease from fine to coarse, got {scales}.")
        natural = tuple(spec.strides[0] / s for s in scales)
        if out_strides is not None and len(tuple(out_strides)) != len(scales):
            raise ConfigError(
                f"SimpleFeaturePyramid: out_strides {tuple(out_strides)} needs one stride per scale {scales}."
            )
        strides = tuple(out_strides) if out_strides is not None else natural
        # The ratio (input cells -> output cells) each level is resampled by; None where the level is exact.
        self.resample = tuple(
            None if math.isclose(t, n) else spec.strides[0] / t for t, n in zip(strides, natural, strict=True)
        )
        c = spec.channels[0]
        for scale in scales:
            k = _power_of_two(scale)
            layers: list[nn.Module] = []
            width = c
            for i in range(k):
                if i > 0:
                    layers += [LayerNorm2d(width), nn.GELU()]
                layers.append(nn.ConvTranspose2d(width, max(1, width // 2), kernel_size=2, stride=2))
                width = max(1, width // 2)
            layers += [nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(-k)]
            layers += [nn.Conv2d(width, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels)]
            self.levels.append(nn.Sequential(*layers))
        self.out_spec = PyramidSpec((out_channels,) * len(scales), strides)

    def forward(self, pyramid: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        pyramid = list(pyramid)
        self.in_spec.check(pyramid, "SimpleFeaturePyramid")
        if self.passthrough:
            return pyramid
        x = pyramid[0]
        outs = []
        for level, ratio in zip(self.levels, self.resample, strict=True):
            y = level(x)
            if ratio is not None:
                size = (max(1, round(x.shape[-2] * ratio)), max(1, round(x.shape[-1] * ratio)))
                if tuple(y.shape[-2:]) != size:
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y)
        return outs


class StageNorms(nn.Module):
    """A trainable LayerNorm per pyramid level, over channels at each position (channels-last).

    For methods whose stage outputs come without a norm (an in-place method's raw intermediate stages);
    E3VA's stage outputs already end in one (paper sec. 3.2, "FPN in E3VA").
    """

    def __init__(self, spec: PyramidSpec) -> None:
        super().__init__()
        self.in_spec = self.out_spec = spec
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in spec.channels)

    def forward(self, pyramid: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        pyramid = list(pyramid)
        self.in_spec.check(pyramid, "StageNorms")
        return [norm(x) for norm, x in zip(self.norms, pyramid, strict=True)]


class PyramidNeck(nn.Module):
    """What a dense head puts before its own layers: optional :class:`StageNorms`, then a
    :class:`SimpleFeaturePyramid` (which builds a pyramid from one level and passes several through).

    Args:
        spec: the method's pyramid spec.
        channels: width of the simple pyramid's levels (one-level input only).
        stage_norms: add a trainable LayerNorm per input level.
        scales: see :class:`SimpleFeaturePyramid`.
        out_strides: see :class:`SimpleFeaturePyramid`.

    Attributes:
        out_spec: the spec of what :meth:`forward` returns.
    """

    def __init__(
        self,
        spec: PyramidSpec,
        channels: int = 128,
        *,
        stage_norms: bool = False,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        out_strides: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.in_spec = spec
        self.norms = StageNorms(spec) if stage_norms else nn.Identity()
        self.simple = SimpleFeaturePyramid(spec, channels, scales=scales, out_strides=out_strides)
        self.out_spec = self.simple.out_spec

    def forward(self, features: Features | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``Features`` (or its pyramid) -> list of (B, C_i, H_i, W_i) maps of ``out_spec``."""
        return self.simple(self.norms(_pyramid_of(features, "PyramidNeck")))


def stage_pyramid_spec(layout, stages: Sequence[int]) -> PyramidSpec:
    """The declared pyramid of a method whose levels are backbone stages: their widths and strides.

    Args:
        layout: the backbone's :class:`~sidetune.backbones.TapLayout`.
        stages: the stages that make the pyramid, fine to coarse.
    """
    return PyramidSpec(
        channels=tuple(layout.stage_dims[s] for s in stages), strides=tuple(layout.stage_strides[s] for s in stages)
    )
