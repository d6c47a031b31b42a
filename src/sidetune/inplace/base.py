"""What every in-place method shares: a trainable timm backbone whose forward runs with autograd.

In-place methods (full fine-tuning, BitFit, LoRA, adapters, prompts...) change what the backbone computes
or which of its weights train, so the loss back-propagates through the whole backbone: every block's
activations are kept for backward. That is the cost the side methods avoid, and what these baselines are
there to measure.

The backbone arrives as a :class:`~sidetune.backbones.TimmBackbone` with every parameter frozen; a method
unfreezes exactly what it trains or injects new modules (PEFT layers, forward hooks), and its forward
returns the same :class:`~sidetune.features.Features` as the linear probe, pooled by the backbone's own
head logic. timm models stay timm models: nothing is forked.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import TapRequest, TimmBackbone
from ..errors import ConfigError
from ..features import Features
from ..heads.pyramid import PyramidSpec, stage_pyramid_spec
from ..side.base import dense_stage_ends, features_from_final, stage_pyramid


@dataclass
class InplaceConfig:
    """Options every in-place method has.

    Attributes:
        grad_checkpointing: recompute block activations in backward instead of keeping them (timm's
            ``set_grad_checkpointing``): the memory baseline a user would try first. Outputs and gradients
            are unchanged; a step costs about one more backbone forward.
        freeze_bn_stats: keep BatchNorm layers in eval mode while training, so their running statistics do
            not move (mmdetection's ``norm_eval``). The adapter checkpoint holds trainable parameters only,
            not running statistics: with False, a reloaded model would not reproduce the trained one.
    """

    grad_checkpointing: bool = False
    freeze_bn_stats: bool = True

    def __post_init__(self) -> None:
        for name in ("grad_checkpointing", "freeze_bn_stats"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{type(self).__name__}: {name} must be True or False, got {getattr(self, name)!r}.")


class InplaceMethod(nn.Module):
    """Base of in-place methods: the backbone runs with autograd and respects train/eval mode.

    Subclasses unfreeze parameters or inject modules in their ``__init__`` (after calling this one).

    Features: pooled by the backbone's own head logic from ``forward_features`` (as the linear probe). For
    classification the pyramid is that final output's map; for dense tasks it is every stage's raw output
    (the last block of each stage, before any final norm: what a dense head's stage norms expect), strides
    4, 8, 16, 32 on Swin, one level on a ViT, the ``feature_info`` stages on a CNN.

    Args:
        backbone: the backbone, every parameter frozen (``requires_grad=False``) on arrival.
        config: the method's config (an :class:`InplaceConfig`).
        task: ``classification`` or a dense task.
    """

    def __init__(self, backbone: TimmBackbone, config: InplaceConfig, task: str = "classification") -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        layout = backbone.layout
        self.stage_ends = dense_stage_ends(layout, task)
        self.tap_request = TapRequest.of(out=self.stage_ends)
        last = layout.num_stages - 1
        self.pyramid_stages = tuple(range(last + 1)) if self.stage_ends else (last,)
        if config.grad_checkpointing:
            enable_grad_checkpointing(backbone)
        self.train(backbone.model.training)  # timm builds models in train mode: freeze BN statistics now
        if not config.freeze_bn_stats and _batch_norms(backbone.model):
            warnings.warn(
                f"{backbone.name}: freeze_bn_stats=False lets BatchNorm running statistics change in training, "
                "but save_adapter() writes trainable parameters only: a reloaded model will use the original "
                "statistics.",
                stacklevel=3,
            )

    pyramid_normalized = False

    def pyramid_spec(self) -> PyramidSpec:
        """Channels and strides of ``Features.pyramid`` (raw stage outputs: the head adds stage norms)."""
        return stage_pyramid_spec(self.backbone.layout, self.pyramid_stages)

    def forward(self, images: torch.Tensor) -> Features:
        """(B, 3, H, W) images -> Features, with autograd through the backbone."""
        taps = self.backbone(images, self.tap_request)
        features = features_from_final(self.backbone, taps.final)
        if self.stage_ends:
            features.pyramid = stage_pyramid(taps, self.stage_ends)
            features.strides = list(self.backbone.layout.stage_strides)
        return features

    def train(self, mode: bool = True) -> InplaceMethod:
        super().train(mode)
        if self.config.freeze_bn_stats:
            for bn in _batch_norms(self.backbone.model):
                bn.eval()
        return self


def enable_grad_checkpointing(backbone: TimmBackbone) -> None:
    """Switch on timm's gradient checkpointing, failing with the reason when the model has none."""
    if not hasattr(backbone.model, "set_grad_checkpointing"):
        raise ConfigError(
            f"grad_checkpointing=True: the timm model {backbone.name!r} ({type(backbone.model).__name__}) has no "
            "set_grad_checkpointing()."
        )
    backbone.model.set_grad_checkpointing(True)


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def residual_blocks(backbone: TimmBackbone) -> list[nn.Module]:
    """The backbone's blocks in forward order: transformer blocks, or a CNN's residual blocks.

    For ViT and Swin these are the tap points; a CNN's tap points are whole stages, so its blocks are read
    from the model (EfficientNet ``blocks[i][j]``, ConvNeXt ``stages[i].blocks[j]``).
    """
    if backbone.family.name != "cnn":
        return [ref.module for ref in backbone.blocks]
    model = backbone.model
    if hasattr(model, "stages"):  # ConvNeXt
        return [blk for stage in model.stages for blk in stage.blocks]
    return [blk for stage in model.blocks for blk in stage]  # EfficientNet
