"""In-place methods, the baselines: gradients flow through the backbone (full, BitFit, Norm, Partial-k, LoRA,
Adapter, AdaptFormer, VPT)."""

from .adapter import Adapter, AdapterConfig, Bottleneck
from .adaptformer import AdaptFormer, AdaptFormerConfig
from .base import InplaceConfig, InplaceMethod, enable_grad_checkpointing, residual_blocks
from .lora import LoRA, LoRAConfig
from .selective import BitFitConfig, FullConfig, NormConfig, PartialConfig, SelectiveTuning
from .vpt import VPT, VPTConfig

__all__ = [
    "VPT",
    "AdaptFormer",
    "AdaptFormerConfig",
    "Adapter",
    "AdapterConfig",
    "BitFitConfig",
    "Bottleneck",
    "FullConfig",
    "InplaceConfig",
    "InplaceMethod",
    "LoRA",
    "LoRAConfig",
    "NormConfig",
    "PartialConfig",
    "SelectiveTuning",
    "VPTConfig",
    "enable_grad_checkpointing",
    "residual_blocks",
]
