"""What a run sets up before its first step, the same for every task: precision, Accelerator, AdamW groups, schedule.

The recipe: AdamW on the trainable parameters only (no weight decay on biases, norms and other 1-D tensors,
position embeddings and class/register tokens), linear warm-up then cosine decay, stepped once per optimizer
step (one step per ``grad_accum`` micro-batches).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..bench.levers import native_low_precision
from ..data import DataError
from ..errors import ConfigError
from ..model import SidetuneModel
from .checkpoint import CheckpointError


class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up from ``1/warmup`` to 1, then cosine to ``floor``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict()`` saves it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, floor: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.floor = warmup_steps, max(1, total_steps), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_mixed_precision(requested: str, on_cpu: bool) -> str:
    """``auto`` -> ``bf16``/``fp16`` on CUDA, ``no`` on CPU; a 16-bit mode the device lacks is an error.

    On the CPU, ``bf16`` is accepted where the processor computes it natively (AVX512-BF16 or AMX, as
    oneDNN reports): there autocast runs the matrix products in bfloat16, about 2.5x faster for a ViT, with
    parameters, gradients and optimizer state in float32. Elsewhere autocast would emulate it, slower than
    float32, so it is refused. ``auto`` stays ``no`` on the CPU: bf16 changes the numbers, so it is asked for.
    """
    if on_cpu:
        if requested in ("auto", "no"):
            return "no"
        if requested == "bf16" and native_low_precision(torch.bfloat16, torch.device("cpu")):
            return "bf16"
        reason = (
            "float16 autocast needs a CUDA device"
            if requested == "fp16"
            else "this CPU has no native bfloat16 (AVX512-BF16 or AMX), so autocast would be slower than float32"
        )
        raise ConfigError(f"--mixed-precision {requested} on the CPU: {reason}; use --mixed-precision no.")
    bf16 = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if bf16 else "fp16"
    if requested == "bf16" and not bf16:
        raise ConfigError(
            f"--mixed-precision bf16 is not supported by {torch.cuda.get_device_name()}; use --mixed-precision fp16."
        )
    return requested


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Accelerator:
    """``Accelerator(mixed_precision=..., **kwargs)`` that a second run in the same process may also build.

    Accelerate keeps its state in a process-wide singleton and refuses a second ``Accelerator`` with another
    precision ("restart your runtime"). A notebook or script that trains twice (fp32, then bf16) is normal
    use, so the precision part of that state is dropped first; the process group (``PartialState``) stays.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


def compile_side_network(model: SidetuneModel) -> None:
    """``--compile``: ``torch.compile`` the side network of a side method, in place.

    Only the side network's ``forward_taps`` is compiled (an instance attribute over the method's own), so the
    frozen backbone, the head, the state dict, checkpoints and saved adapters are those of the uncompiled model.
    The first training step compiles (and the first evaluation, without autograd, once more).

    Raises:
        ConfigError: an in-place method (its backbone is the trained network: nothing side-only to compile).
    """
    from ..methods import get_method

    name = model.config.method
    method = model.method
    if get_method(name).kind != "side" or not hasattr(method, "forward_taps"):
        raise ConfigError(
            f"--compile compiles a side method's side network; {name!r} changes the backbone in place, so there is no "
            "side network to compile: leave --compile out."
        )
    method.forward_taps = torch.compile(method.forward_taps, **COMPILE_OPTIONS)


#: keyword arguments of ``torch.compile`` for ``--compile`` (the default backend, inductor; tests may pick a
#: quicker one)
COMPILE_OPTIONS: dict[str, Any] = {}


def param_groups(model: SidetuneModel, weight_decay: float, head_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and convolutions; not biases, norms, 1-D tensors, embeddings and tokens.

    With ``head_lr`` the task head's tensors (``head.*``) get groups of their own at that rate (the others take
    the optimizer's); without it there are the two groups of earlier versions, so their checkpoints still resume.
    """
    skip_names = ("pos_embed", "cls_token", "reg_token", "dist_token", "relative_position_bias_table")
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_trainable_parameters():
        decays = not (p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip_names))
        groups.setdefault((head_lr is not None and name.startswith("head."), decays), []).append(p)
    out = []
    for head, decays in ((False, True), (False, False), (True, True), (True, False)):
        if groups.get((head, decays)):
            group = {"params": groups[head, decays], "weight_decay": weight_decay if decays else 0.0}
            out.append({**group, "lr": head_lr} if head else group)
    return out


def make_optimizer(model: SidetuneModel, config) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` at ``config.lr``, the head's at ``config.lr * config.head_lr_mult``; the
    schedule scales every group alike.

    Raises:
        ConfigError: ``head_lr_mult`` is not 1 but the model has no trainable head tensor.
    """
    if config.head_lr_mult == 1.0:
        return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    groups = param_groups(model, config.weight_decay, head_lr=config.lr * config.head_lr_mult)
    heads = sum("lr" in g for g in groups)
    if heads in (0, len(groups)):
        what = "no trainable head tensor" if heads == 0 else "only head tensors to train (set --lr instead)"
        raise ConfigError(
            f"--head-lr-mult {config.head_lr_mult:g}: {model.config.method!r} has {what}, so there is no second "
            "learning rate to give; leave --head-lr-mult at 1."
        )
    return torch.optim.AdamW(groups, lr=config.lr)  # the method's groups first: a step record's lr is theirs


def make_schedule(
    config, optimizer, batches_per_epoch: int, num_images: int, accelerator: Accelerator
) -> tuple[torch.optim.lr_scheduler.LambdaLR, dict[str, Any]]:
    """The warm-up + cosine scheduler of a run and its schedule facts (saved with checkpoints, checked on resume).

    ``config`` is the run's ``TrainConfig`` (batch_size, grad_accum, epochs, warmup_epochs, lr, min_lr);
    ``optimizer`` the prepared one; one optimizer step per ``grad_accum`` batches.

    Raises:
        DataError: the training data gives no batch.
    """
    if batches_per_epoch == 0:
        raise DataError(f"the training data ({num_images} images) gives no batch of {config.batch_size}.")
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer, WarmupCosine(warmup_steps, total_steps, config.min_lr / config.lr)
    )
    facts = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_processes": accelerator.num_processes,
        "images_per_step": config.batch_size * accelerator.num_processes * config.grad_accum,
        "lr": float(config.lr),
        "head_lr_mult": float(config.head_lr_mult),
        "warmup_steps": warmup_steps,
        "min_lr": float(config.min_lr),
    }
    return scheduler, facts


_SCHEDULE_FACTS = {
    "steps_per_epoch": "--batch-size, --grad-accum or the training data",
    "images_per_step": "--batch-size, --grad-accum or the number of processes",
    "total_steps": "--epochs",
    # the optimizer's and the scheduler's states hold the rates and the warm-up and floor they started with: a
    # resume with others would silently follow the old ones (a checkpoint written before a fact was recorded is
    # not checked for it, except as _EARLIER_FACTS says)
    "lr": "--lr",
    "head_lr_mult": "--head-lr-mult",
    "warmup_steps": "--warmup-epochs",
    "min_lr": "--min-lr",
}
#: what a checkpoint written before a fact was recorded had: every earlier run trained one rate for every tensor
_EARLIER_FACTS = {"head_lr_mult": 1.0}


def check_schedule(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume a checkpoint into another schedule.

    The position in the epoch (batches to skip) and the learning-rate schedule (whose warm-up and length the
    scheduler's state carries) are only meaningful for the same steps per epoch, images per step and total
    steps; resuming with, say, more epochs would silently follow the old cosine.

    Raises:
        CheckpointError: naming each fact that differs, both values and the setting behind it.
    """
    saved = {**_EARLIER_FACTS, **saved}
    diffs = [
        f"{key} {saved[key]} -> {current[key]} ({why})"
        for key, why in _SCHEDULE_FACTS.items()
        if key in saved and key in current and saved[key] != current[key]
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {str(checkpoint)!r}: this run's schedule differs from the checkpoint's: "
            f"{'; '.join(diffs)}. Resume with the settings the run started with, or start a new run "
            "(another --output) initialised from its adapter."
        )


def unused_parameters(model: SidetuneModel, task: Any, dataset: Any) -> list[str]:
    """Trainable parameters that get no gradient from a training step (DDP must then look for them).

    Runs the task's loss on a batch of two training samples, forward and backward, with the RNG state preserved
    and the gradients cleared afterwards.
    """
    batch = task.collate([dataset[i] for i in range(min(2, len(dataset)))])
    with torch.random.fork_rng(devices=[]):
        was_training = model.training
        model.train()
        task.step(model, batch).loss.float().backward()
        model.train(was_training)
    names = [n for n, p in model.named_trainable_parameters() if p.grad is None]
    model.zero_grad(set_to_none=True)
    return names
