"""Precision and speed levers of a measurement row, applied from outside the model.

A comparison is fair only when a lever that a baseline can use is applied to the baseline too. So the levers
come in two kinds:

**Run-wide** (every row of a run, side and in-place alike; the report's header names them):

* ``precision``: the training precision. ``bf16`` / ``fp16`` run each row's whole forward and loss under
  ``torch.autocast`` (mixed-precision training, as ``sidetune train --mixed-precision`` runs it): matrix
  products in 16 bits, parameters, gradients and AdamW state in float32. A side method's frozen forward and its
  side network run under the same autocast as full fine-tuning's and LoRA's forward. On CPU a 16-bit precision is
  allowed only where the CPU computes it natively (oneDNN's ``_is_mkldnn_bf16_supported`` /
  ``_is_mkldnn_fp16_supported``: AVX512-BF16, AMX); elsewhere autocast emulates it, slower than float32.
* ``frozen_low_precision``: the frozen weights that autocast casts anyway (linear layers whose parameters do not
  train) stored in the autocast dtype, so no step casts them again. The numbers are the same (autocast would cast
  them to exactly these values); any method with frozen weights gains: LoRA's base weights, an adapter's frozen
  backbone, a side method's backbone. Full fine-tuning has none. Convolutions stay float32: the backbone checks
  the images' dtype against its first parameter, a convolution's in Swin and CNNs (a ViT's patch embedding is a
  few hundred thousand weights; a CNN gains little from this lever).
* ``compile``: ``torch.compile`` of the timm model's ``forward_features`` for every row (the tap hooks are traced
  with it; in-place rows compile it with autograd) and of the side network's ``forward_taps`` for side rows.
  Compilation happens on the first call; the profiler reports it apart from the step time.
* ``channels_last``: weights and images in channels-last memory format (CNN backbones only).

**Side-only** (a separate, labelled row beside the plain one, for side methods only: no in-place method can use
them, because they change a forward that is never differentiated, or skip it):

* ``frozen_precision`` (row suffix ``+bf16-frozen``): the frozen forward alone under bf16 (or fp16) autocast, its
  taps cast to float32, so the side network, its gradients and AdamW stay float32. Only in a float32 run (in a
  16-bit run the frozen forward already is 16-bit).
* ``cache`` (row suffix ``+cache``): the step of a side network on taps held in memory, as a tap cache replays
  them: no frozen forward at all (a cache on disk adds its reading time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import TapRequest, Taps
from ..errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Levers:
    """The levers of one measurement row (see the module docstring for what each does).

    Attributes:
        precision: training precision of the row: ``fp32`` (no autocast), ``bf16`` or ``fp16`` (autocast).
        frozen_low_precision: frozen linear weights stored in the autocast dtype.
        compile: ``torch.compile`` of the backbone's ``forward_features`` (and a side network's ``forward_taps``).
        channels_last: channels-last weights and images (CNN backbones).
        frozen_precision: side only: the frozen forward alone under this autocast dtype (``fp32``: off).
        cache: side only: the step on taps held in memory, without the frozen forward.
        compile_backend: ``torch.compile`` backend (``inductor``; tests use ``eager``).
    """

    precision: str = "fp32"
    frozen_low_precision: bool = False
    compile: bool = False
    channels_last: bool = False
    frozen_precision: str = "fp32"
    cache: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        for name in ("precision", "frozen_precision"):
            value = getattr(self, name)
            if value not in PRECISIONS:
                raise ConfigError(f"unknown {name} {value!r}; expected one of {', '.join(PRECISIONS)}.")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype of the row (None: float32, no autocast)."""
        return PRECISIONS[self.precision]

    @property
    def side_only(self) -> bool:
        """Whether the row uses a lever that only a side method can (then it is a row of its own)."""
        return self.frozen_precision != "fp32" or self.cache

    @property
    def active(self) -> bool:
        return (
            self.precision != "fp32"
            or self.frozen_low_precision
            or self.compile
            or self.channels_last
            or self.side_only
        )

    @property
    def label(self) -> str:
        """Suffix naming the side-only levers of a row, e.g. ``+bf16-frozen`` (empty for none): run-wide levers
        are the same for every row and named in the report's header, not in row names."""
        parts = [f"{self.frozen_precision}-frozen"] if self.frozen_precision != "fp32" else []
        parts += ["cache"] if self.cache else []
        return "".join(f"+{p}" for p in parts)

    @property
    def description(self) -> str:
        """Every lever of the row, e.g. ``bf16,frozen-weights-bf16,compile`` (``none`` for none)."""
        parts = [self.precision] if self.precision != "fp32" else []
        parts += [f"frozen-weights-{self.precision}"] if self.frozen_low_precision else []
        parts += ["compile"] if self.compile else []
        parts += ["channels_last"] if self.channels_last else []
        parts += [p.lstrip("+") for p in self.label.split("+") if p]
        return ",".join(parts) or "none"

    def run_wide(self) -> Levers:
        """The same levers without the side-only ones: what every row of the run has."""
        return dataclasses.replace(self, frozen_precision="fp32", cache=False)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def side_variants(run: Levers, frozen_precision: str = "fp32", cache: bool = False) -> list[Levers]:
    """The levers of a side method's rows: the run's own, then each side-only lever asked for, on its own.

    ``side_variants(Levers(), "bf16", True)`` gives ``[plain, +bf16-frozen, +cache]``.
    """
    variants = [run]
    if frozen_precision != "fp32":
        variants.append(dataclasses.replace(run, frozen_precision=frozen_precision))
    if cache:
        variants.append(dataclasses.replace(run, cache=True))
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


def lever_problem(levers: Levers, family: str, device: torch.device, kind: str = "side") -> str | None:
    """Why ``levers`` cannot apply to a row of ``kind`` on ``family`` / ``device``, or None when they can."""
    if levers.precision == "fp16" and device.type == "cpu":  # a frozen forward alone in fp16 needs no gradient
        return (
            "fp16 training runs on CUDA only (sidetune train refuses --mixed-precision fp16 on the CPU), so a CPU "
            "row in fp16 would time a step nobody can train with; use --precision fp32 (or bf16 where the CPU computes "
            "it natively)"
        )
    for name in ("precision", "frozen_precision"):
        value = getattr(levers, name)
        dtype = PRECISIONS[value]
        if dtype is not None and not native_low_precision(dtype, device):
            return (
                f"{value} is not native on this {device.type} (no AVX512-BF16/AMX, or a GPU without it): "
                "autocast would emulate it, slower than fp32"
            )
    if levers.frozen_low_precision and levers.precision == "fp32":
        return "frozen weights in low precision need a 16-bit precision (autocast) to run in"
    if levers.channels_last and family != "cnn":
        return f"channels_last applies to CNN backbones only ({family} has one patch-embedding convolution)"
    if levers.side_only and kind != "side":
        return "this lever changes the frozen forward (or skips it): only side methods have one"
    if levers.frozen_precision != "fp32" and levers.precision != "fp32":
        return f"the frozen forward already runs in {levers.precision} in a {levers.precision} run"
    return None


def autocast(levers: Levers, device: torch.device) -> contextlib.AbstractContextManager:
    """The row's training autocast (a no-op context in float32)."""
    dtype = levers.dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _taps_to(taps: Taps, dtype: torch.dtype) -> Taps:
    def cast(d: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: t.to(dtype) for i, t in d.items()}

    return Taps(
        attn=cast(taps.attn), mlp=cast(taps.mlp), out=cast(taps.out), final=taps.final.to(dtype), layout=taps.layout
    )


def store_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of ``model``'s frozen linear layers in ``dtype``; return how many layers.

    A layer counts as frozen when none of its own parameters trains (a BitFit layer, whose bias trains, keeps its
    weight in float32). Under autocast to ``dtype`` the layer computes the same numbers as before: autocast casts
    its float32 weight to exactly these values on every call.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        params = list(module.parameters(recurse=False))
        if not params or any(p.requires_grad for p in params):
            continue
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_floating_point():
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
        count += 1
    return count


def apply_levers(model: nn.Module, levers: Levers, kind: str, device: torch.device) -> None:
    """Apply ``levers`` to a model, in place (autocast itself is the step's: see :func:`autocast`).

    Args:
        model: a :class:`~sidetune.model.SidetuneModel`.
        levers: what to apply.
        kind: the method's kind (``side`` or ``inplace``).
        device: where the model runs.

    Raises:
        ConfigError: a lever cannot apply here (see :func:`lever_problem`).
    """
    if not levers.active:
        return
    backbone = model.backbone
    problem = lever_problem(levers, backbone.layout.family, device, kind)
    if problem:
        raise ConfigError(problem)
    if levers.frozen_low_precision:
        store_frozen_weights(model, levers.dtype)
    if levers.channels_last:
        backbone.model.to(memory_format=torch.channels_last)
    if levers.compile:
        # Every model of a class shares forward_features' code object, and dynamo's cache is per code object:
        # a profile compiles it once per row (and per grad mode), more than the default limit of 8.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        backbone.model.forward_features = torch.compile(backbone.model.forward_features, backend=levers.compile_backend)
        if kind == "side" and hasattr(model.method, "forward_taps"):
            model.method.forward_taps = torch.compile(model.method.forward_taps, backend=levers.compile_backend)
    frozen_dtype = PRECISIONS[levers.frozen_precision]
    if frozen_dtype is None and not levers.channels_last:
        return
    plain_forward = backbone.forward  # bound method of the class; the instance attribute shadows it

    def forward(images: torch.Tensor, request: TapRequest | None = None) -> Taps:
        if levers.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if frozen_dtype is None:
            return plain_forward(images, request)
        with torch.autocast(device.type, dtype=frozen_dtype):
            taps = plain_forward(images, request)
        return _taps_to(taps, torch.float32)  # the side network trains in float32

    backbone.forward = forward
    logger.debug("levers %s applied to %s", levers.description, backbone.name)
