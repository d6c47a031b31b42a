"""LoRA through PEFT (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight ``W`` is adapted as ``W + (alpha / r) B A`` with ``A`` (r x in) random and ``B`` (out x r)
zero, so the model starts exactly as the frozen one (sec. 4.1). The layers are injected by PEFT
(``peft.inject_adapter_in_model``) into the timm model itself: a targeted ``nn.Linear`` / ``nn.Conv2d``
becomes a PEFT layer wrapping the original as ``base_layer``, whose weights never change. Only the
``lora_A`` / ``lora_B`` tensors (and the head) train and are saved.

Targets (``target_modules``, PEFT's matching: a list matches module names by suffix, a string is a
regular expression matched against the full name). The default depends on the architecture:

* ViT and Swin: the fused attention projection ``qkv`` (LoRA's paper adapts W_q and W_v; timm fuses
  q, k and v into one linear, so a rank-r update of ``qkv`` adapts all three).
* ConvNeXt: the block MLP's ``fc1`` and ``fc2`` (linear layers on channels-last maps).
* EfficientNet: the pointwise (1x1) convolutions ``conv_pw`` and ``conv_pwl``; a 1x1 convolution is a
  linear map per pixel, so LoRA on it is LoRA on a linear layer. (PEFT also adapts k x k convolutions,
  with ``A`` a k x k convolution to r channels and ``B`` a 1x1 one: name them in ``target_modules``.)

E3VA's table 1 reports 3.03M LoRA parameters on Swin-B without saying where or at which rank; LoRA on
``qkv`` at r=63 gives exactly 3,032,064 (see ``docs/param_counts.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..backbones import TimmBackbone
from ..errors import ConfigError, require_positive, require_positive_int
from ..method_spec import MethodSpec
from .base import InplaceConfig, InplaceMethod

#: Default LoRA targets per timm model class.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "VisionTransformer": ("qkv",),
    "SwinTransformer": ("qkv",),
    "ConvNeXt": ("fc1", "fc2"),
    "EfficientNet": ("conv_pw", "conv_pwl"),
}


@dataclass
class LoRAConfig(InplaceConfig):
    """LoRA options (PEFT's ``LoraConfig``).

    Attributes:
        r: rank of the update ``B A``.
        alpha: scaling numerator: the update is ``(alpha / r) B A``.
        dropout: dropout on the LoRA branch's input.
        target_modules: module names to adapt: a tuple matched by name suffix (``("qkv",)``,
            ``("attn.qkv", "attn.proj")``), or a string regular expression matched against full names
            (``r"blocks\\.(10|11)\\.attn\\.qkv"``). None: the architecture's default (``DEFAULT_TARGETS``).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("r", self.r, "LoRA")
        if not isinstance(self.r, int):
            raise ConfigError(f"LoRA: r must be an integer, got {self.r!r}.")
        require_positive("alpha", self.alpha, "LoRA")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA: dropout must be in [0, 1), got {self.dropout!r}.")
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError(f"LoRA: target_modules must be non-empty names, got {self.target_modules!r}.")
        elif self.target_modules is not None and not (isinstance(self.target_modules, str) and self.target_modules):
            raise ConfigError(
                f"LoRA: target_modules must be a tuple of names, a regular expression or None, "
                f"got {self.target_modules!r}."
            )


def _adaptable_names(model: nn.Module, limit: int = 12) -> str:
    """Module names LoRA could target, one per repeated pattern (``blocks.*.attn.qkv``), for error messages."""
    seen, sample = set(), []
    for name, module in model.named_modules():
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name)
        if name and isinstance(module, nn.Linear | nn.Conv2d) and pattern not in seen:
            seen.add(pattern)
            sample.append(name)
    return ", ".join(sample[:limit]) + (" ..." if len(sample) > limit else "")


class LoRA(InplaceMethod):
    """LoRA layers injected by PEFT into the backbone's timm model.

    Args:
        backbone: the backbone (all parameters frozen on arrival).
        config: rank, scaling, dropout and targets.
        task: ``classification`` or a dense task (see :class:`~sidetune.inplace.base.InplaceMethod`).
    """

    def __init__(self, backbone: TimmBackbone, config: LoRAConfig, task: str = "classification") -> None:
        super().__init__(backbone, config, task)
        from peft import LoraConfig, inject_adapter_in_model

        model = backbone.model
        targets = config.target_modules
        if targets is None:
            kind = type(model).__name__
            if kind not in DEFAULT_TARGETS:
                raise ConfigError(
                    f"LoRA has no default target_modules for {backbone.name!r} ({kind}): name them, e.g. "
                    f"target_modules=('qkv',). Adaptable layers: {_adaptable_names(model)}."
                )
            targets = DEFAULT_TARGETS[kind]
        self.targets = targets
        peft_targets = list(targets) if isinstance(targets, tuple) else targets
        lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=peft_targets)
        try:
            inject_adapter_in_model(lora, model)
        except ValueError as err:  # PEFT's NoMatchingPeftModuleError and unsupported-layer errors
            raise ConfigError(
                f"LoRA target_modules={targets!r} on {backbone.name!r}: {str(err).splitlines()[0]} Layers LoRA "
                f"can adapt (nn.Linear, nn.Conv2d), one per name: {_adaptable_names(model)}."
            ) from None
        # PEFT marks adapter tensors trainable; make sure nothing else of the backbone is.
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)


def _build(backbone: TimmBackbone, config: LoRAConfig, task: str) -> LoRA:
    return LoRA(backbone, config, task)


SPECS = [
    MethodSpec(
        name="lora",
        description="LoRA (through PEFT): low-rank updates of frozen weights, attention qkv by default",
        kind="inplace",
        config_cls=LoRAConfig,
        build=_build,
        families=("vit", "swin", "cnn"),
    )
]
