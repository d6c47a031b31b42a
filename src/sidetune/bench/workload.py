"""What one row runs: the model, batch and training step, shared by the profiler and its probe processes.

:func:`train_steps_workload` is the peak-memory probe's workload (see :mod:`sidetune.bench.memory_probe`):
it runs in a fresh process, so it imports only what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..methods import get_method
from .levers import Levers, apply_levers, autocast

WORKLOAD = "sidetune.bench.workload:train_steps_workload"


def build_model(
    backbone: str,
    method: str,
    *,
    num_classes: int,
    img_size: int | None,
    weights: str | None,
    backbone_kwargs: dict[str, Any],
    options: dict[str, Any],
    seed: int,
    device: torch.device,
):
    """``sidetune.create`` with a fixed seed, moved to ``device``, in train mode."""
    from ..factory import create

    torch.manual_seed(seed)
    model = create(
        backbone,
        method,
        num_classes=num_classes,
        weights=weights,
        img_size=img_size,
        backbone_kwargs=backbone_kwargs,
        **options,
    )
    return model.to(device).train()


def make_batch(
    batch_size: int, img_size: tuple[int, int], num_classes: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of Gaussian images and labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, *img_size, generator=g)
    labels = torch.randint(num_classes, (batch_size,), generator=g)
    return images.to(device), labels.to(device)


def make_step(
    model, images: torch.Tensor, labels: torch.Tensor, optimizer, levers: Levers | None = None
) -> Callable[[], None]:
    """One training step: forward and cross-entropy (under the row's autocast), backward, optimizer update.

    With the ``cache`` lever, the step of the side network alone on taps computed once beforehand (under
    ``no_grad``, in the row's precision): what a step costs when a tap cache replays the taps.
    """
    levers = levers or Levers()
    device = images.device
    if levers.cache:
        with torch.no_grad(), autocast(levers, device):
            taps = model.backbone(images, model.method.tap_request)
        return make_side_step(model, taps, labels, optimizer, levers)

    def step() -> None:
        with autocast(levers, device):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_side_step(model, taps, labels: torch.Tensor, optimizer, levers: Levers | None = None) -> Callable[[], None]:
    """The side network's own step on fixed taps: ``forward_taps``, head, loss, backward, optimizer update."""
    levers = levers or Levers()
    method, head, device = model.method, model.head, labels.device

    def step() -> None:
        with autocast(levers, device):
            loss = F.cross_entropy(head(method.forward_taps(taps)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def optimizer_for(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=1e-4)


def train_steps_workload(
    backbone: str,
    method: str,
    batch_size: int,
    num_classes: int,
    img_size: int | None,
    weights: str | None,
    backbone_kwargs: dict[str, Any],
    options: dict[str, Any],
    levers: dict[str, Any],
    seed: int,
    steps: int,
    threads: int | None = None,
    device: str = "cpu",
) -> Callable[[], None]:
    """Peak-memory probe workload (see :mod:`sidetune.bench.memory_probe` for the protocol).

    Set-up (not measured): build the model, apply the row's levers, build AdamW and the batch, and run one
    no-grad forward (warms the kernels; compiles when the ``compile`` lever is on; with the ``cache`` lever, the
    taps the steps replay are computed here). ``run()``: ``steps`` training steps, so that the peak includes
    gradients, optimizer state and the activations of a step taken while the optimizer state exists.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model = build_model(
        backbone,
        method,
        num_classes=num_classes,
        img_size=img_size,
        weights=weights,
        backbone_kwargs=backbone_kwargs,
        options=options,
        seed=seed,
        device=dev,
    )
    row_levers = Levers(**levers)
    apply_levers(model, row_levers, get_method(method).kind, dev)
    images, labels = make_batch(batch_size, model.backbone.layout.img_size, num_classes, seed, dev)
    with torch.no_grad(), autocast(row_levers, dev):
        model(images)
    step = make_step(model, images, labels, optimizer_for(model), row_levers)

    def run() -> None:
        for _ in range(steps):
            step()

    return run
