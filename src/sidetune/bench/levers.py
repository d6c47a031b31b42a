"""Speed levers that only a frozen backbone allows, applied from outside the model.

A side method never back-propagates into its backbone, so the backbone's forward can change how it
computes without touching training numerics: its activations are read, never differentiated. Three
levers, each applied by wrapping the model's frozen forward (no change to the backbone classes):

* ``precision``: run the frozen forward under ``torch.autocast`` in bfloat16 or float16. The taps are
  cast back to float32 before the side network sees them, so the side network, its gradients and its
  optimizer stay in float32 (no loss scaling, no master weights: nothing in the low-precision part
  trains). On CPU the lever is allowed only where the CPU computes that dtype natively (oneDNN's
  ``_is_mkldnn_bf16_supported`` / ``_is_mkldnn_fp16_supported``: AVX512-BF16, AMX); elsewhere
  autocast emulates it and is slower than float32, so asking for it fails with that reason.
* ``compile``: ``torch.compile`` of the timm model's ``forward_features`` (the tap hooks are traced
  with it). Compilation happens on the first call; the profiler reports it apart from the step time.
* ``channels_last``: the backbone's weights and its input images in channels-last memory format, which
  oneDNN and cuDNN convolutions prefer. It matters for CNN backbones only; on ViT and Swin (a single
  patch-embedding convolution) it is reported as not applicable.

In-place methods (full fine-tuning, LoRA, ...) back-propagate through the backbone: for them these
levers are mixed-precision *training*, another matter, and :func:`apply_levers` refuses them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ..backbones import TapRequest, Taps
from ..errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Levers:
    """Which levers a measurement row uses.

    Attributes:
        precision: ``fp32`` (no autocast), ``bf16`` or ``fp16`` for the frozen forward.
        compile: ``torch.compile`` the frozen forward.
        channels_last: channels-last weights and images (CNN backbones).
        compile_backend: ``torch.compile`` backend (``inductor``; tests use ``eager``).
    """

    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}.")

    @property
    def active(self) -> bool:
        return self.precision != "fp32" or self.compile or self.channels_last

    @property
    def label(self) -> str:
        """Suffix naming the levers in a row, e.g. ``+bf16+compile`` (empty for none)."""
        parts = [self.precision] if self.precision != "fp32" else []
        parts += ["compile"] if self.compile else []
        parts += ["channels_last"] if self.channels_last else []
        return "".join(f"+{p}" for p in parts)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def lever_variants(precision: str = "fp32", compile: bool = False, channels_last: bool = False) -> list[Levers]:
    """The rows to measure for the levers a user asked for: none, each one alone, and all together.

    ``--precision bf16 --compile`` gives ``[plain, +bf16, +compile, +bf16+compile]``: each lever is
    measured on its own, and together.
    """
    singles = []
    if precision != "fp32":
        singles.append(Levers(precision=precision))
    if compile:
        singles.append(Levers(compile=True))
    if channels_last:
        singles.append(Levers(channels_last=True))
    variants = [Levers(), *singles]
    if len(singles) > 1:
        variants.append(Levers(precision=precision, compile=compile, channels_last=channels_last))
    return variants


def native_low_precision(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` computes ``dtype`` natively (so autocast to it can be faster than float32)."""
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def lever_problem(levers: Levers, family: str, device: torch.device) -> str | None:
    """Why ``levers`` cannot apply to a side model on ``family`` / ``device``, or None when they can."""
    dtype = PRECISIONS[levers.precision]
    if dtype is not None and not native_low_precision(dtype, device):
        return (
            f"{levers.precision} is not native on this {device.type} (no AVX512-BF16/AMX or a GPU without it): "
            "autocast would emulate it, slower than fp32"
        )
    if levers.channels_last and family != "cnn":
        return f"channels_last applies to CNN backbones only ({family} has one patch-embedding convolution)"
    return None


def _taps_to(taps: Taps, dtype: torch.dtype) -> Taps:
    def cast(d: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: t.to(dtype) for i, t in d.items()}

    return Taps(
        attn=cast(taps.attn), mlp=cast(taps.mlp), out=cast(taps.out), final=taps.final.to(dtype), layout=taps.layout
    )


def apply_levers(model: torch.nn.Module, levers: Levers, kind: str, device: torch.device) -> None:
    """Apply ``levers`` to a side model's frozen backbone, in place.

    Args:
        model: a :class:`~sidetune.model.SidetuneModel` of a side method.
        levers: what to apply.
        kind: the method's kind (``side`` or ``inplace``).
        device: where the model runs.

    Raises:
        ConfigError: the method is in-place, or a lever cannot apply here (see :func:`lever_problem`).
    """
    if not levers.active:
        return
    if kind != "side":
        raise ConfigError("levers apply to side methods only: in-place methods back-propagate through the backbone.")
    backbone = model.backbone
    problem = lever_problem(levers, backbone.layout.family, device)
    if problem:
        raise ConfigError(problem)
    if levers.channels_last:
        backbone.model.to(memory_format=torch.channels_last)
    if levers.compile:
        # Every model of a class shares forward_features' code object, and dynamo's cache is per code object:
        # a profile compiles it once per row (and per grad mode), more than the default limit of 8.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        backbone.model.forward_features = torch.compile(backbone.model.forward_features, backend=levers.compile_backend)
    dtype = PRECISIONS[levers.precision]
    if dtype is None and not levers.channels_last:
        return
    plain_forward = backbone.forward  # bound method of the class; the instance attribute shadows it

    def forward(images: torch.Tensor, request: TapRequest | None = None) -> Taps:
        if levers.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if dtype is None:
            return plain_forward(images, request)
        with torch.autocast(device.type, dtype=dtype):
            taps = plain_forward(images, request)
        return _taps_to(taps, torch.float32)  # the side network trains in float32

    backbone.forward = forward
    logger.debug("levers %s applied to %s", levers.label, backbone.name)
