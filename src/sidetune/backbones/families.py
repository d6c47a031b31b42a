"""Tap specifications: how sidetune reads each supported timm family without forking the model.

A family says which submodules carry a block's attention-branch output, MLP-branch output and block
output, which stage each block belongs to, and which module downsamples at the start of each stage.
``FrozenBackbone`` registers forward hooks on exactly those modules. timm models stay timm models.

Branch outputs are read at ``drop_path1`` / ``drop_path2``: in both timm ViT and timm Swin that module
receives the branch output after layer-scale, right before it is added to the residual stream (in eval
mode it is the identity, so its output is that branch output).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import timm
from torch import nn

from ..errors import ConfigError, unknown_choice


@dataclass(frozen=True)
class BlockRef:
    """One tap point: a block (or, for CNNs, a stage) of the backbone.

    Attributes:
        stage: index of the stage the block belongs to.
        module: the module whose output is the block output.
        attn: the module whose output is the attention-branch output, or None.
        mlp: the module whose output is the MLP-branch output, or None.
    """

    stage: int
    module: nn.Module
    attn: nn.Module | None = None
    mlp: nn.Module | None = None


@dataclass(frozen=True)
class Family:
    """A supported backbone family.

    Attributes:
        name: short name (``vit``, ``swin``, ``cnn``).
        description: one line for ``list_backbones()``.
        patterns: timm model-name globs that belong to the family.
        token_format: layout of block outputs: ``nlc`` (B, N, C), ``nhwc`` or ``nchw``.
        has_branches: whether attention / MLP branch taps exist.
        blocks: returns the tap points of a built model, in forward order.
        stage_downsample: returns, per stage, the module that downsamples at the stage start (or None).
        model_check: returns True when a built model really is of this family.
        accepts_img_size: whether ``timm.create_model`` takes ``img_size`` for this family.
    """

    name: str
    description: str
    patterns: tuple[str, ...]
    token_format: str
    has_branches: bool
    blocks: Callable[[nn.Module], list[BlockRef]]
    stage_downsample: Callable[[nn.Module], list[nn.Module | None]]
    model_check: Callable[[nn.Module], bool]
    accepts_img_size: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    def matches(self, model_name: str) -> bool:
        return any(fnmatch.fnmatch(model_name, p) for p in self.patterns)


# --- ViT: vit_*, deit_*, *_dinov2 (layer-scale, register tokens) -------------------------------------


def _vit_blocks(model: nn.Module) -> list[BlockRef]:
    return [BlockRef(0, blk, blk.drop_path1, blk.drop_path2) for blk in model.blocks]


def _single_stage_downsample(model: nn.Module) -> list[nn.Module | None]:
    return [None]


def _vit_check(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer) and all(
        hasattr(b, "drop_path1") and hasattr(b, "drop_path2") for b in model.blocks
    )


# --- Swin: swin_* (window attention, patch merging between stages) -----------------------------------


def _swin_blocks(model: nn.Module) -> list[BlockRef]:
    return [
        BlockRef(s, blk, blk.drop_path1, blk.drop_path2) for s, stage in enumerate(model.layers) for blk in stage.blocks
    ]


def _swin_downsample(model: nn.Module) -> list[nn.Module | None]:
    return [None if isinstance(stage.downsample, nn.Identity) else stage.downsample for stage in model.layers]


def _swin_check(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


# --- CNNs through stage outputs (EfficientNet, ConvNeXt) ---------------------------------------------


def _cnn_blocks(model: nn.Module) -> list[BlockRef]:
    modules = dict(model.named_modules())
    return [BlockRef(i, modules[info["module"]]) for i, info in enumerate(model.feature_info)]


def _cnn_downsample(model: nn.Module) -> list[nn.Module | None]:
    # Each CNN stage downsamples inside its own first block: there is no separate module to reuse.
    return [None] * len(model.feature_info)


def _cnn_check(model: nn.Module) -> bool:
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet

    return isinstance(model, EfficientNet | ConvNeXt)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="vit",
            description="timm VisionTransformer (vit_*, deit_*, *_dinov2 incl. layer-scale and register tokens)",
            patterns=("vit_*", "deit_*", "deit3_*", "*_dinov2*", "test_vit*"),
            token_format="nlc",
            has_branches=True,
            blocks=_vit_blocks,
            stage_downsample=_single_stage_downsample,
            model_check=_vit_check,
        ),
        Family(
            name="swin",
            description="timm SwinTransformer (swin_*): per-block taps through hooks, patch merging between stages",
            patterns=("swin_*",),
            token_format="nhwc",
            has_branches=True,
            blocks=_swin_blocks,
            stage_downsample=_swin_downsample,
            model_check=_swin_check,
        ),
        Family(
            name="cnn",
            description="timm EfficientNet / ConvNeXt through stage outputs (no attention or MLP branch taps)",
            patterns=("efficientnet_*", "tf_efficientnet_*", "convnext_*", "test_efficientnet*", "test_convnext*"),
            token_format="nchw",
            has_branches=False,
            blocks=_cnn_blocks,
            stage_downsample=_cnn_downsample,
            model_check=_cnn_check,
            accepts_img_size=False,
        ),
    )
}


def family_of(model_name: str) -> Family:
    """Return the family a timm model name belongs to.

    Raises:
        ConfigError: the name is not a timm model, or timm knows it but sidetune has no tap spec for it.
    """
    for fam in FAMILIES.values():
        if fam.matches(model_name):
            if not timm.is_model(model_name):
                raise unknown_choice(
                    "backbone", model_name, timm.list_models([p for f in FAMILIES.values() for p in f.patterns])
                )
            return fam
    if timm.is_model(model_name):
        supported = "; ".join(f"{f.name}: {', '.join(f.patterns)}" for f in FAMILIES.values())
        raise ConfigError(
            f"backbone {model_name!r} is a timm model, but sidetune has no tap specification for its family. "
            f"Supported families: {supported}."
        )
    raise unknown_choice(
        "backbone",
        model_name,
        timm.list_models([p for f in FAMILIES.values() for p in f.patterns]),
        hint="See sidetune.list_backbones().",
    )


def list_backbones(pattern: str | None = None) -> list[dict[str, object]] | list[str]:
    """Tell which backbones sidetune supports.

    Args:
        pattern: when given (e.g. ``"vit_small*"``), return the timm model names that match it and belong
            to a supported family; otherwise return one record per supported family.

    Returns:
        Family records ``{"family", "description", "patterns", "branch_taps"}``, or model names.
    """
    if pattern is not None:
        return [name for name in timm.list_models(pattern) if any(f.matches(name) for f in FAMILIES.values())]
    return [
        {"family": f.name, "description": f.description, "patterns": list(f.patterns), "branch_taps": f.has_branches}
        for f in FAMILIES.values()
    ]
