"""Selective tuning: train a subset of the backbone's own weights (Full, BitFit, Norm-tuning, Partial-k).

The baselines of E3VA's tables 1-2 (Yin et al., arXiv 2306.09729, sec. 4.1) that add no module:

* **Full** fine-tuning: every backbone parameter trains.
* **BitFit** (Zaken et al., ACL 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
  Transformer-based Masked Language-models"): only bias terms train, those of linear, convolution and
  normalisation layers (the paper's bias set includes LayerNorm's). Vision PETL code selects parameters
  whose name contains ``bias``, which also catches Swin's relative position bias tables (learned additive
  attention biases); E3VA's 0.20M on Swin-B counts them. ``position_bias`` chooses.
* **Norm-tuning** (E3VA's "Norm-Tuning"; Frankle et al., ICLR 2021, "Training BatchNorm and only
  BatchNorm"): the affine parameters of every normalisation layer (LayerNorm, LayerNorm2d, BatchNorm,
  GroupNorm, RMSNorm...).
* **Partial-k** (VPT, Jia et al., ECCV 2022, sec. 4 "Partial-k"; E3VA's "Partial-1"): the last ``k``
  blocks train, and with them every layer the forward runs after them (Swin's patch merging when the ``k``
  blocks span a stage boundary, the final norm, attention pooling). In timm, parameters are defined in
  forward order, so that is every parameter from the first trained block's on. ``partial-1``,
  ``partial-2``, ... name the method for any ``k``.

The task head always trains. Each method only flips ``requires_grad``: names and shapes stay timm's, and
``save_adapter`` writes exactly the selected tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbones import TimmBackbone
from ..errors import ConfigError
from ..method_spec import MethodSpec
from .base import InplaceConfig, InplaceMethod, residual_blocks


def _norm_types() -> tuple[type, ...]:
    """Normalisation layer classes of torch and timm (timm's LayerNorm2d, BatchNormAct2d... subclass these)."""
    from timm.layers import norm as timm_norm

    timm_types = tuple(
        getattr(timm_norm, n)
        for n in ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d")
        if hasattr(timm_norm, n)
    )
    return (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, *timm_types)


@dataclass
class FullConfig(InplaceConfig):
    """Full fine-tuning: no options beyond those of every in-place method."""


@dataclass
class BitFitConfig(InplaceConfig):
    """BitFit options.

    Attributes:
        position_bias: also train Swin's relative position bias tables (``relative_position_bias_table``),
            as vision PETL code selecting ``"bias" in name`` does; E3VA's table 1 count (0.20M on Swin-B)
            includes them, without them it is 0.14M.
    """

    position_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.position_bias, bool):
            raise ConfigError(f"BitFit: position_bias must be True or False, got {self.position_bias!r}.")


@dataclass
class NormConfig(InplaceConfig):
    """Norm-tuning: no options beyond those of every in-place method."""


@dataclass
class PartialConfig(InplaceConfig):
    """Partial-k options.

    Attributes:
        k: number of final blocks that train (the method name ``partial-k`` sets it; an explicit ``k=``
            overrides the name).
    """

    k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"Partial-k: k must be a positive integer (partial-1, partial-2, ...), got {self.k!r}.")


class SelectiveTuning(InplaceMethod):
    """Train the given parameters of the backbone, and nothing else of it.

    Args:
        backbone: the backbone (all parameters frozen on arrival).
        config: the method's config.
        names: the names (in ``backbone.model``) of the parameters that train.
        task: the task (dense tasks get every stage's output, see :class:`InplaceMethod`).
    """

    def __init__(
        self, backbone: TimmBackbone, config: InplaceConfig, names: list[str], task: str = "classification"
    ) -> None:
        super().__init__(backbone, config, task)
        params = dict(backbone.model.named_parameters())
        self.trained_names = tuple(names)
        for name in names:
            params[name].requires_grad_(True)


def full_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def bias_names(model: nn.Module, position_bias: bool = True) -> list[str]:
    """Bias terms: parameters named ``bias`` or ``*_bias`` (BEiT's ``q_bias``), optionally position bias tables."""
    names = []
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or leaf.endswith("_bias") or (position_bias and leaf == "relative_position_bias_table"):
            names.append(name)
    return names


def norm_names(model: nn.Module) -> list[str]:
    """Parameters held directly by normalisation layers (their affine weight and bias)."""
    types = _norm_types()
    return [
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, module in model.named_modules()
        if isinstance(module, types)
        for p_name, _ in module.named_parameters(recurse=False)
    ]


def partial_names(backbone: TimmBackbone, k: int) -> list[str]:
    """The last ``k`` blocks and every parameter defined after them (forward order in timm)."""
    blocks = residual_blocks(backbone)
    if k > len(blocks):
        raise ConfigError(
            f"partial-{k}: {backbone.name} has {len(blocks)} blocks, so at most partial-{len(blocks)} "
            f"(full fine-tuning trains everything)."
        )
    first = {id(p) for p in blocks[-k].parameters()}
    names = [n for n, _ in backbone.model.named_parameters()]
    start = next(i for i, (_, p) in enumerate(backbone.model.named_parameters()) if id(p) in first)
    return names[start:]


def _check_selected(names: list[str], what: str, backbone: TimmBackbone) -> list[str]:
    if not names:
        raise ConfigError(f"{what}: {backbone.name} has no parameter to train.")
    return names


def _build_full(backbone: TimmBackbone, config: FullConfig, task: str) -> SelectiveTuning:
    return SelectiveTuning(backbone, config, full_names(backbone.model), task)


def _build_bitfit(backbone: TimmBackbone, config: BitFitConfig, task: str) -> SelectiveTuning:
    names = bias_names(backbone.model, config.position_bias)
    return SelectiveTuning(backbone, config, _check_selected(names, "BitFit (no bias terms)", backbone), task)


def _build_norm(backbone: TimmBackbone, config: NormConfig, task: str) -> SelectiveTuning:
    names = norm_names(backbone.model)
    names = _check_selected(names, "Norm-tuning (no affine norm layers)", backbone)
    return SelectiveTuning(backbone, config, names, task)


def _build_partial(backbone: TimmBackbone, config: PartialConfig, task: str) -> SelectiveTuning:
    return SelectiveTuning(backbone, config, partial_names(backbone, config.k), task)


_FAMILIES = ("vit", "swin", "cnn")

SPECS = [
    MethodSpec(
        name="full",
        description="Full fine-tuning: every backbone parameter trains (back-propagates through the backbone)",
        kind="inplace",
        config_cls=FullConfig,
        build=_build_full,
        families=_FAMILIES,
    ),
    MethodSpec(
        name="bitfit",
        description="BitFit: only bias terms train (linear, conv, norm; Swin position bias tables by default)",
        kind="inplace",
        config_cls=BitFitConfig,
        build=_build_bitfit,
        families=_FAMILIES,
    ),
    MethodSpec(
        name="norm",
        description="Norm-tuning: only the affine parameters of normalisation layers train",
        kind="inplace",
        config_cls=NormConfig,
        build=_build_norm,
        families=_FAMILIES,
    ),
    MethodSpec(
        name="partial-1",
        description="Partial-k: the last k blocks (and the layers after them) train; partial-1, partial-2, ...",
        kind="inplace",
        config_cls=PartialConfig,
        build=_build_partial,
        families=_FAMILIES,
        defaults={"k": 1},
    ),
]
