"""``MultiTask``: many task adapters on ONE frozen backbone, and one backbone forward per batch for all of them.

Side methods never change the backbone they read (DESIGN.md, "Reuse"): every adapter's side network and head
depends on the images only through the taps. So adapters trained on the same frozen backbone can share it in
memory (one copy of its weights) and share its forward (one pass per batch, keeping the union of the taps they
read).

How a batch runs (:meth:`MultiTask.forward`):

1. **Prepare.** Each task computes the backbone input that its own single-model inference would compute from
   each raw image (the task's preprocessing, below). Identical inputs of the same image are kept once.
2. **One backbone pass** over those unique inputs, keeping the union of every task's taps.
3. **Replay.** Each task runs its own single-model inference code unchanged: the classification transform and
   ``model(x)``, :func:`~sidetune.heads.predict_segmentation`, the torchvision detector with its own letterbox
   transform, RPN and heads. Only the backbone call inside it is answered from the shared pass: the shared
   backbone checks that the input it receives equals (``torch.equal``) the prepared one and hands out those
   rows of the shared taps, restricted to what that method requested. An input it did not prepare is computed
   for real (correct, only slower) and counted in :attr:`MultiTask.last_pass`, so a result is never silently
   wrong.

Preprocessing (the rule): every task keeps the preprocessing it was trained and evaluated with, because a
shared pass must not change any task's answer.

* classification: the run's eval transform from ``inference.json`` (``vtab``: PIL resize straight to
  ``img_size``, normalise; ``none``: timm's resize + center crop);
* segmentation: normalise the image at its own size, then ``whole`` (bilinear resize to ``img_size``, logits
  resized back) or ``slide`` (windows of ``img_size``) as the run's ``eval_mode`` says;
* detection / instance: the detector's letterbox (normalise, fit inside ``img_size`` keeping the aspect ratio,
  pad bottom/right).

For an image already at the backbone's ``img_size`` (a camera pipeline that resizes at the source), these
all give bit-identical inputs, and every task shares one backbone row per image. For other sizes the tasks
whose preprocessing gives different inputs get their own rows, still in the same single backbone call:
correctness first, the sharing where the inputs coincide.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from ..backbones import FrozenBackbone, TapRequest, Taps, create_timm_model, fingerprint, normalize_weights
from ..errors import ConfigError, FingerprintMismatchError, WeightsError, unknown_choice
from ..factory import load
from ..heads.segmentation import predict_segmentation
from ..methods import get_method
from ..model import ADAPTER_CONFIG, ModelConfig, SidetuneModel

logger = logging.getLogger(__name__)

__all__ = ["MultiTask", "PassStats", "SharedBackbone", "TaskInfo", "read_adapter"]

#: Written beside an adapter by the training runs: class names, eval transform, eval mode, seed.
INFERENCE_FILE = "inference.json"
#: Folders that training runs save checkpoints into; a task in one is named after the run folder instead.
_RUN_CHECKPOINTS = ("best", "last")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
DENSE_MODES = ("whole", "slide")


# -- the shared backbone -----------------------------------------------------------------------------------------


class _Replay:
    """The shared pass of one batch, answering the backbone calls of each task's own inference code."""

    def __init__(self, backbone: SharedBackbone, views: torch.Tensor, taps: Taps, request: TapRequest) -> None:
        self.backbone, self.views, self.taps, self.request = backbone, views, taps, request
        self.order: list[int] = []
        self.cursor = 0
        self.task = ""
        self.recomputed = 0

    def start(self, task: str, order: list[int]) -> None:
        """The rows of ``views`` that ``task`` will send to the backbone, in the order it sends them."""
        self.task, self.order, self.cursor = task, order, 0

    def serve(self, images: torch.Tensor, request: TapRequest | None) -> Taps:
        request = request or TapRequest()
        self.backbone.check_input(images)
        n = images.shape[0]
        rows = self.order[self.cursor : self.cursor + n]
        if (
            len(rows) == n
            and _covers(self.request, request)
            and all(torch.equal(images[j], self.views[r]) for j, r in enumerate(rows))
        ):
            self.cursor += n
            return _select(self.taps, rows, request)
        # Not prepared (a bug in a task's prepare step, or an input built differently): compute it for real.
        self.recomputed += n
        warnings.warn(
            f"MultiTask: task {self.task!r} sent {n} backbone input(s) that the shared pass did not prepare; they "
            "were computed separately (results are correct, the pass was not shared).",
            RuntimeWarning,
            stacklevel=2,
        )
        return self.backbone.compute(images, request)


_REPLAY: ContextVar[_Replay | None] = ContextVar("sidetune_multitask_replay", default=None)


def _covers(have: TapRequest, want: TapRequest) -> bool:
    return want.attn <= have.attn and want.mlp <= have.mlp and want.out <= have.out


def _select(taps: Taps, rows: list[int], request: TapRequest) -> Taps:
    """Rows ``rows`` of the shared taps, only the entries ``request`` asks for (what the backbone alone returns)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):  # contiguous (the usual case): views, no copy

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[rows[0] : rows[0] + len(rows)]
    else:
        index = torch.tensor(rows, device=taps.final.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index)

    return Taps(
        attn={i: pick(taps.attn[i]) for i in request.attn},
        mlp={i: pick(taps.mlp[i]) for i in request.mlp},
        out={i: pick(taps.out[i]) for i in request.out},
        final=pick(taps.final),
        layout=taps.layout,
    )


class SharedBackbone(FrozenBackbone):
    """A :class:`FrozenBackbone` that several side-method models hold at once (one copy of the weights).

    Outside :meth:`MultiTask.forward` it is a plain frozen backbone: each model it is shared by still works
    alone. Inside, its forward is answered from the batch's shared pass (see the module docstring).
    """

    def forward(self, images: torch.Tensor, request: TapRequest | None = None) -> Taps:
        replay = _REPLAY.get()
        if replay is not None and replay.backbone is self:
            return replay.serve(images, request)
        return super().forward(images, request)

    def compute(self, images: torch.Tensor, request: TapRequest | None = None) -> Taps:
        """A real frozen forward (no grad), whatever pass is active."""
        return FrozenBackbone.forward(self, images, request)


# -- adapters on disk --------------------------------------------------------------------------------------------


def read_adapter(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The config of an adapter folder and its ``inference.json`` (empty when the folder has none).

    Raises:
        WeightsError: not an adapter folder, or an unreadable config.
    """
    directory = Path(directory).expanduser()
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise WeightsError(
            f"{str(path)!r} not found: {str(directory)!r} is not an adapter directory written by save_adapter()."
        )
    try:
        config = ModelConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise WeightsError(f"{str(path)!r} is not a valid sidetune adapter config: {err}") from None
    info_path = directory / INFERENCE_FILE
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    except json.JSONDecodeError as err:
        raise WeightsError(f"{str(info_path)!r} is not valid JSON: {err}") from None
    return config, info


def default_task_name(directory: str | os.PathLike) -> str:
    """The folder's name; for a run's ``best/`` or ``last/`` checkpoint, the run folder's name."""
    path = Path(directory).expanduser().resolve()
    return path.parent.name if path.name in _RUN_CHECKPOINTS and path.parent.name else path.name


@dataclass(frozen=True)
class TaskInfo:
    """What one loaded task is.

    Attributes:
        name: the task's name (the key of its outputs).
        task: ``classification``, ``segmentation``, ``detection`` or ``instance``.
        method: the side method of its adapter.
        classes: class names (detection: label ``k`` is ``classes[k - 1]``).
        adapter: the adapter folder.
        preprocessing: how the task turns a raw image into its backbone input (its eval recipe).
        parameters: parameters of the task's own modules (side network and head), not the shared backbone.
        bytes: bytes of those parameters and buffers.
    """

    name: str
    task: str
    method: str
    classes: tuple[str, ...]
    adapter: str
    preprocessing: str
    parameters: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "method": self.method,
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "adapter": self.adapter,
            "preprocessing": self.preprocessing,
            "parameters": self.parameters,
            "bytes": self.bytes,
        }


@dataclass
class PassStats:
    """What the last :meth:`MultiTask.forward` did.

    Attributes:
        images: images in the batch.
        tasks: tasks that ran.
        backbone_rows: rows of the one shared backbone call (unique backbone inputs).
        task_rows: backbone inputs the tasks asked for, in all (what separate models would have computed).
        recomputed: inputs that were not prepared and had to be computed separately (0 when all is shared).
        seconds: where the time went, wall-clock: ``prepare`` (every task's preprocessing), ``backbone`` (the
            shared pass) and, per task, its own part (side network, head, postprocessing).
        cpu_seconds: the same in CPU time of the calling thread (all of it with one torch thread).
    """

    images: int = 0
    tasks: tuple[str, ...] = ()
    backbone_rows: int = 0
    task_rows: int = 0
    recomputed: int = 0
    seconds: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: dict[str, Any] = field(default_factory=dict)


class _Clock:
    """Wall and thread-CPU seconds of consecutive phases."""

    def __init__(self) -> None:
        self.wall: dict[str, Any] = {"tasks": {}}
        self.cpu: dict[str, Any] = {"tasks": {}}
        self._mark()

    def _mark(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, phase: str, task: str | None = None) -> None:
        wall, cpu = time.perf_counter() - self._wall, time.thread_time() - self._cpu
        if task is None:
            self.wall[phase], self.cpu[phase] = wall, cpu
        else:
            self.wall["tasks"][task], self.cpu["tasks"][task] = wall, cpu
        self._mark()


# -- one runner per task kind: the single model's own inference, split into prepare and run ---------------------


@dataclass
class _Prepared:
    inputs: Any  # what run() feeds the single model's code
    rows: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (image index, backbone input (3, H, W))


class _Runner:
    """A task's single-model inference. ``prepare`` computes its backbone inputs, ``run`` its outputs."""

    def __init__(self, model: SidetuneModel, info: dict[str, Any]) -> None:
        self.model = model
        self.info = info
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def describe(self) -> str:
        raise NotImplementedError

    def prepare(self, images: list[Image.Image]) -> _Prepared:
        raise NotImplementedError

    def run(self, inputs: Any) -> Any:
        raise NotImplementedError

    def _normalized(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) image normalised with the backbone's mean/std at its own size (the dense tasks' way)."""
        data = self.model.data_config
        mean = torch.tensor(data["mean"]).view(3, 1, 1)
        std = torch.tensor(data["std"]).view(3, 1, 1)
        x = pil_to_tensor(image).float().div(255)
        return ((x - mean) / std).to(self.device, self.dtype)


class _Classification(_Runner):
    def __init__(self, model: SidetuneModel, info: dict[str, Any]) -> None:
        super().__init__(model, info)
        from ..data import build_transforms  # the training runs' eval transform, exactly

        self.augmentation = info.get("augmentation", "vtab")
        self.transform = build_transforms(model.data_config, tuple(model.config.img_size), self.augmentation)

    def describe(self) -> str:
        return f"eval transform {self.augmentation!r} to {_size_text(self.model.config.img_size)}"

    def prepare(self, images: list[Image.Image]) -> _Prepared:
        x = torch.stack([self.transform(im) for im in images]).to(self.device, self.dtype)
        return _Prepared(x, [(i, x[i]) for i in range(len(images))])

    def run(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)


class _Segmentation(_Runner):
    def __init__(self, model: SidetuneModel, info: dict[str, Any]) -> None:
        super().__init__(model, info)
        self.mode = info.get("eval_mode", "whole")
        if self.mode not in DENSE_MODES:
            raise ConfigError(f"unknown segmentation eval_mode {self.mode!r} in inference.json; use {DENSE_MODES}.")
        self.size = tuple(model.config.img_size)

    def describe(self) -> str:
        how = "resized to" if self.mode == "whole" else "windows of"
        return f"normalised at its own size, {how} {_size_text(self.size)} ({self.mode}); logits at the image size"

    def prepare(self, images: list[Image.Image]) -> _Prepared:
        tensors = [self._normalized(im) for im in images]
        groups = _same_size_groups(tensors)
        rows: list[tuple[int, torch.Tensor]] = []
        k = self.model.config.num_classes
        for group in groups:
            crops: list[torch.Tensor] = []

            def record(x: torch.Tensor, crops: list[torch.Tensor] = crops) -> torch.Tensor:
                crops.append(x)
                return x.new_zeros((x.shape[0], k, *x.shape[-2:]))

            # predict_segmentation itself decides the inputs (resize or windows): record them, run nothing
            predict_segmentation(record, torch.stack([tensors[i] for i in group]), self.size, mode=self.mode)
            inputs = torch.cat(crops)
            per_image = inputs.shape[0] // len(group)  # windows come image by image, as many per image
            rows += [(group[j // per_image], inputs[j]) for j in range(inputs.shape[0])]
        return _Prepared((tensors, groups), rows)

    def run(self, inputs: tuple[list[torch.Tensor], list[list[int]]]) -> list[torch.Tensor]:
        tensors, groups = inputs
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for group in groups:
            x = torch.stack([tensors[i] for i in group])
            for i, logits in zip(group, predict_segmentation(self.model, x, self.size, mode=self.mode), strict=True):
                out[i] = logits
        return out  # type: ignore[return-value]


class _Detection(_Runner):
    def describe(self) -> str:
        return f"letterboxed into {_size_text(self.model.config.img_size)} by the detector; boxes in image pixels"

    def _to_tensors(self, images: list[Image.Image]) -> list[torch.Tensor]:
        return [pil_to_tensor(im).float().div(255).to(self.device) for im in images]

    def prepare(self, images: list[Image.Image]) -> _Prepared:
        tensors = self._to_tensors(images)
        # The detector's own transform, with autocast off as run_detector has it around the detector.
        with _no_autocast():
            batch, _ = self.model.head.transform(list(tensors))
        return _Prepared(tensors, [(i, batch.tensors[i]) for i in range(len(images))])

    def run(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(list(inputs))


_RUNNERS: dict[str, type[_Runner]] = {
    "classification": _Classification,
    "segmentation": _Segmentation,
    "detection": _Detection,
    "instance": _Detection,
}


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _size_text(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _same_size_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return list(groups.values())


def _as_rgb(image: Any, index: int) -> Image.Image:
    """A PIL RGB image from a PIL image (any mode), an (H, W, 3) uint8 array or a (3, H, W) uint8 tensor."""
    from ..data.classification import to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ConfigError(
                f"image {index}: a tensor must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}. "
                "Pass raw pixels: every task applies its own preprocessing."
            )
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ConfigError(f"image {index}: an array must be (H, W, 3) uint8, got {image.shape} {image.dtype}.")
        return Image.fromarray(image, mode="RGB")
    raise ConfigError(f"image {index}: expected a PIL image or uint8 pixels, got {type(image).__name__}.")


def _module_bytes(module: nn.Module, skip: set[int]) -> tuple[int, int]:
    params = [p for p in module.parameters() if id(p) not in skip]
    buffers = [b for b in module.buffers() if id(b) not in skip]
    count = sum(p.numel() for p in params)
    size = sum(t.numel() * t.element_size() for t in [*params, *buffers])
    return count, size


# -- MultiTask ---------------------------------------------------------------------------------------------------


class MultiTask(nn.Module):
    """Many side-network adapters on one shared frozen backbone; one backbone forward per batch.

    Args:
        adapters: adapter folders (written by ``save_adapter`` or a training run's ``best/``), or a mapping
            task name -> folder.
        weights: backbone weights: ``"saved"`` (default: what the first adapter recorded), or as in
            :func:`sidetune.create`. Every adapter must have been trained on weights with the same fingerprint.
        names: task names, one per adapter (default: the folder name; for a run's ``best/`` or ``last/``, the
            run folder's name). Names are the keys of the outputs and of the HTTP API: letters, digits, ``_``,
            ``.``, ``-``.
        device: where to run (default: CUDA when available, else the CPU).
        mixed_precision: the autocast of every forward, ``no``, ``bf16`` or ``fp16``, as in ``sidetune predict``
            (:func:`sidetune.train.inference.autocast_for`): the shared backbone pass and every task's side network
            and head run under it, so each task's output equals its single-adapter ``predict`` in that precision.
            Default: the precision the adapters recorded in ``inference.json`` (float32 when that device cannot run
            it, with a warning, as single-adapter ``predict`` does); adapters that recorded different precisions
            are refused, since one shared pass runs in one precision. A caller's own autocast around
            :meth:`forward` does not apply: this one replaces it.

    Raises:
        ConfigError: duplicate or invalid names; an in-place adapter (LoRA etc.) or a video adapter; adapters
            built on another backbone, input size or timm options (the message lists every difference);
            adapters trained in different precisions with no ``mixed_precision`` given, or a precision this
            device cannot run.
        FingerprintMismatchError: adapters trained on different backbone weights, or ``weights`` that are not
            the ones they were trained on.

    Example::

        tasks = sidetune.MultiTask(["runs/defects/best", "runs/camvid-e3va/best", "runs/bccd-losa/best"])
        out = tasks([Image.open("frame.jpg")])
        out["defects"]  # (1, K) logits, as the defects model alone gives
    """

    def __init__(
        self,
        adapters: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
        weights: str | os.PathLike | bool | None = "saved",
        *,
        names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        mixed_precision: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(adapters, Mapping):
            if names is not None:
                raise ConfigError("MultiTask: pass names either as the mapping's keys or as names=, not both.")
            names, dirs = list(adapters), [Path(p) for p in adapters.values()]
        else:
            if isinstance(adapters, str | os.PathLike):
                adapters = [adapters]
            dirs = [Path(p) for p in adapters]
        if not dirs:
            raise ConfigError("MultiTask needs at least one adapter folder.")
        names = list(names) if names is not None else [default_task_name(d) for d in dirs]
        _check_names(names, dirs)
        read = [read_adapter(d) for d in dirs]
        configs = dict(zip(names, (c for c, _ in read), strict=True))
        infos = dict(zip(names, (i for _, i in read), strict=True))
        _check_compatible(configs, dict(zip(names, dirs, strict=True)))
        device = torch.device(device) if device is not None else _default_device()
        # before any weights load: a precision problem is a configuration error, found in milliseconds
        self.mixed_precision = _shared_precision(mixed_precision, infos, dict(zip(names, dirs, strict=True)), device)

        first_name = names[0]
        first = configs[first_name]
        chosen = first.weights if isinstance(weights, str) and weights == "saved" else weights
        with torch.random.fork_rng(devices=[]):
            # a random backbone (weights=None, tests' tiny models) is rebuilt from the seed it was created with
            torch.manual_seed(infos[first_name].get("seed", 0))
            timm_model, family = create_timm_model(
                first.backbone,
                weights=normalize_weights(chosen),
                img_size=tuple(first.img_size),
                model_kwargs=first.backbone_kwargs,
            )
        backbone = SharedBackbone(timm_model, family, tuple(first.img_size), name=first.backbone)
        found = fingerprint(backbone.model)
        if found != first.backbone_fingerprint:
            raise FingerprintMismatchError(
                f"the adapters were trained on {first.backbone} weights with fingerprint "
                f"{first.backbone_fingerprint[:23]}..., but the backbone built from weights={chosen!r} has "
                f"{found[:23]}.... Load them with the weights they were trained on."
            )
        self.backbone = backbone.to(device)
        # Task name -> model. A plain dict: task names may hold '.' or be nn.Module attributes ('half', 'train'),
        # which ModuleDict keys cannot; the models are registered in load order in task_models instead, so that
        # .to(), .eval() and parameters() still reach them.
        self.models: dict[str, SidetuneModel] = {}
        self.task_models = nn.ModuleList()
        self._runners: dict[str, _Runner] = {}
        infos_out: dict[str, TaskInfo] = {}
        shared = {id(t) for t in [*self.backbone.parameters(), *self.backbone.buffers()]}  # after the move
        for name, directory in zip(names, dirs, strict=True):
            model = load(directory, weights=chosen, map_location=device, shared_backbone=backbone).eval()
            info = infos[name]
            runner = _RUNNERS[model.config.task](model, info)
            self.models[name] = model
            self.task_models.append(model)
            self._runners[name] = runner
            count, size = _module_bytes(model, shared)
            classes = info.get("classes") or [str(i) for i in range(model.config.num_classes)]
            if len(classes) != model.config.num_classes:
                raise ConfigError(
                    f"{directory}: inference.json lists {len(classes)} classes but the adapter has "
                    f"{model.config.num_classes}."
                )
            infos_out[name] = TaskInfo(
                name=name,
                task=model.config.task,
                method=model.config.method,
                classes=tuple(str(c) for c in classes),
                adapter=str(directory),
                preprocessing=runner.describe(),
                parameters=count,
                bytes=size,
            )
        self.tasks: dict[str, TaskInfo] = infos_out
        self.weights = chosen
        self.last_pass = PassStats()

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def img_size(self) -> tuple[int, int]:
        return self.backbone.layout.img_size

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def backbone_bytes(self) -> int:
        """Bytes of the shared backbone's parameters and buffers (held once, whatever the number of tasks)."""
        return sum(t.numel() * t.element_size() for t in [*self.backbone.parameters(), *self.backbone.buffers()])

    def describe(self) -> dict[str, Any]:
        """JSON-able facts: the backbone, its size and bytes, and every task (:meth:`TaskInfo.to_dict`)."""
        return {
            "backbone": {
                "name": self.backbone.name,
                "img_size": list(self.img_size),
                "weights": self.weights,
                "parameters": sum(p.numel() for p in self.backbone.parameters()),
                "bytes": self.backbone_bytes(),
                "device": str(self.device),
            },
            "mixed_precision": self.mixed_precision,
            "tasks": [t.to_dict() for t in self.tasks.values()],
        }

    def select(self, tasks: Sequence[str] | None) -> list[str]:
        """The task names to run (all when ``tasks`` is None), in load order; an unknown name lists the known."""
        if tasks is None:
            return list(self.tasks)
        if isinstance(tasks, str):
            tasks = [tasks]
        for name in tasks:
            if name not in self.tasks:
                raise unknown_choice("task", name, self.tasks)
        wanted = set(tasks)
        return [n for n in self.tasks if n in wanted]

    # -- inference -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, images: Sequence[Any], tasks: Sequence[str] | None = None) -> dict[str, Any]:
        """Run every task (or ``tasks``) on raw images with one backbone forward, under :attr:`mixed_precision`.

        Args:
            images: B raw images: PIL images (any mode), (H, W, 3) uint8 arrays or (3, H, W) uint8 tensors, of
                any sizes. Each task applies its own preprocessing (module docstring).
            tasks: names of the tasks to run (default: all).

        Returns:
            Task name -> what that task's model alone gives for these images: classification ``(B, K)`` logits;
            segmentation a list of B ``(K, H_i, W_i)`` logits at each image's own size; detection / instance a
            list of B torchvision detection dicts (``boxes`` XYXY in image pixels, ``scores``, ``labels`` 1..K,
            and ``masks`` (N, 1, H_i, W_i) for instance). Under ``bf16``/``fp16`` the logits are in that dtype,
            as the model alone gives them under that autocast.
        """
        from ..train.inference import autocast_for  # the single-adapter path's autocast, so both agree

        # Everything under it, as single-adapter predict has the model call and the dense resizing under it; the
        # preprocessing that predict runs outside autocast (transforms, the detector's letterbox) keeps its
        # float32 either way (element-wise and resampling ops do not autocast, run_detector switches it off).
        with autocast_for(self.mixed_precision, self.device):
            return self._forward(images, tasks)

    def _forward(self, images: Sequence[Any], tasks: Sequence[str] | None) -> dict[str, Any]:
        names = self.select(tasks)
        if isinstance(images, Image.Image):
            images = [images]
        pil = [_as_rgb(im, i) for i, im in enumerate(images)]
        if not pil:
            raise ConfigError("MultiTask: no images given.")
        self.eval()
        clock = _Clock()
        views: list[torch.Tensor] = []
        by_image: dict[int, list[int]] = {}
        prepared: dict[str, _Prepared] = {}
        order: dict[str, list[int]] = {}
        for name in names:
            prep = self._runners[name].prepare(pil)
            prepared[name] = prep
            order[name] = [_dedup(views, by_image, i, row) for i, row in prep.rows]
        request = _union(self.models[n].method.tap_request for n in names)
        views_t = torch.stack(views)
        clock.lap("prepare")
        replay = _Replay(self.backbone, views_t, self.backbone.compute(views_t, request), request)
        clock.lap("backbone")
        token = _REPLAY.set(replay)
        try:
            outputs = {}
            for name in names:
                replay.start(name, order[name])
                outputs[name] = self._runners[name].run(prepared[name].inputs)
                clock.lap("tasks", name)
        finally:
            _REPLAY.reset(token)
        self.last_pass = PassStats(
            images=len(pil),
            tasks=tuple(names),
            backbone_rows=len(views),
            task_rows=sum(len(o) for o in order.values()),
            recomputed=replay.recomputed,
            seconds=clock.wall,
            cpu_seconds=clock.cpu,
        )
        return outputs

    def predict(
        self,
        images: Sequence[Any],
        tasks: Sequence[str] | None = None,
        *,
        top_k: int = 5,
        score_threshold: float = 0.5,
        mask_format: str = "png",
    ) -> list[dict[str, dict[str, Any]]]:
        """:meth:`forward`, then every task's output as JSON-able results, one dict task -> result per image.

        See :func:`sidetune.serve.results.task_result` for the result of each task kind.
        """
        from .results import check_result_options, task_result

        check_result_options(top_k, score_threshold, mask_format)
        outputs = self(images, tasks)
        rows: list[dict[str, dict[str, Any]]] = [{} for _ in range(self.last_pass.images)]
        for name, out in outputs.items():
            info = self.tasks[name]
            for i, row in enumerate(rows):
                row[name] = task_result(
                    info.task,
                    out[i],
                    info.classes,
                    top_k=top_k,
                    score_threshold=score_threshold,
                    mask_format=mask_format,
                )
        return rows


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shared_precision(
    requested: str | None, infos: dict[str, dict[str, Any]], dirs: dict[str, Path], device: torch.device
) -> str:
    """The one precision of the shared pass: ``requested``, else the one every adapter recorded.

    Chosen as single-adapter ``predict`` chooses it (:func:`sidetune.train.inference.inference_precision`: the recorded
    precision, float32 when this device cannot run it) once the adapters agree.

    Raises:
        ConfigError: the adapters recorded different precisions and none was requested (naming each); an unknown
            precision or one ``device`` cannot run.
    """
    from ..train.inference import autocast_for, inference_precision

    recorded = {name: info.get("mixed_precision", "no") for name, info in infos.items()}
    if requested is None and len(set(recorded.values())) > 1:
        listed = "; ".join(f"{name!r} ({str(dirs[name])!r}): {p}" for name, p in recorded.items())
        raise ConfigError(
            f"these adapters were trained in different precisions ({listed}), and one shared backbone pass runs in "
            "one precision. Pass one explicitly: mixed_precision='no' (float32), 'bf16' or 'fp16' "
            "(on the command line --mixed-precision no)."
        )
    precision = inference_precision(requested, next(iter(infos.values())), device)
    autocast_for(precision, device)  # an unknown precision, or one this device cannot run: refused now
    return precision


def _dedup(views: list[torch.Tensor], by_image: dict[int, list[int]], image: int, row: torch.Tensor) -> int:
    """Index of ``row`` among the views of the same image, appended when new. Only equal tensors are merged."""
    for v in by_image.get(image, ()):
        if views[v].shape == row.shape and views[v].dtype == row.dtype and torch.equal(views[v], row):
            return v
    views.append(row)
    by_image.setdefault(image, []).append(len(views) - 1)
    return len(views) - 1


def _union(requests: Any) -> TapRequest:
    attn: set[int] = set()
    mlp: set[int] = set()
    out: set[int] = set()
    for r in requests:
        attn |= r.attn
        mlp |= r.mlp
        out |= r.out
    return TapRequest.of(attn, mlp, out)


def _check_names(names: list[str], dirs: list[Path]) -> None:
    if len(names) != len(dirs):
        raise ConfigError(f"MultiTask: {len(names)} names for {len(dirs)} adapters; give one name per adapter.")
    for name, d in zip(names, dirs, strict=True):
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"task name {name!r} (adapter {str(d)!r}) must be letters, digits, '_', '.' or '-'; "
                "pass names=[...] (or NAME=DIR on the command line) to choose one."
            )
    seen: dict[str, Path] = {}
    for name, d in zip(names, dirs, strict=True):
        if name in seen:
            raise ConfigError(
                f"two adapters would both be task {name!r}: {str(seen[name])!r} and {str(d)!r}. Task names must be "
                "unique; pass names=[...] (or NAME=DIR on the command line)."
            )
        seen[name] = d


def _check_compatible(configs: dict[str, ModelConfig], dirs: dict[str, Path]) -> None:
    """Refuse adapters that cannot share one frozen backbone, naming every difference."""
    for name, config in configs.items():
        if config.task == "video":
            raise ConfigError(
                f"adapter {name!r} ({str(dirs[name])!r}) is a video adapter: it reads clips of "
                f"{config.num_frames} frames, not images, so it cannot share an image batch (or its backbone pass) "
                "with the other tasks. Serve video adapters one at a time: sidetune predict ADAPTER CLIPS."
            )
        if config.task not in _RUNNERS:
            raise ConfigError(
                f"adapter {name!r} ({str(dirs[name])!r}) is a {config.task!r} adapter; MultiTask serves "
                f"{', '.join(_RUNNERS)} adapters. Run it on its own with sidetune predict ADAPTER IMAGES."
            )
        spec = get_method(config.method)
        if spec.kind != "side":
            raise ConfigError(
                f"adapter {name!r} ({str(dirs[name])!r}) uses the in-place method {config.method!r}, which changes "
                "the backbone itself (its weights or its forward), so no other task can share that backbone or its "
                "forward. Serve it on its own with sidetune.load, or train a side method (losa, e3va, lst, linear)."
            )
    names = list(configs)
    ref_name, ref = names[0], configs[names[0]]
    problems: list[str] = []
    weights_only = True
    for name in names[1:]:
        c = configs[name]
        diffs = []
        if c.backbone != ref.backbone:
            diffs.append(f"backbone {c.backbone!r} vs {ref.backbone!r}")
        if tuple(c.img_size) != tuple(ref.img_size):
            diffs.append(f"img_size {_size_text(c.img_size)} vs {_size_text(ref.img_size)}")
        if c.backbone_kwargs != ref.backbone_kwargs:
            diffs.append(f"backbone_kwargs {dict(c.backbone_kwargs)} vs {dict(ref.backbone_kwargs)}")
        if c.backbone_fingerprint != ref.backbone_fingerprint:
            diffs.append(
                f"backbone weights (fingerprint {c.backbone_fingerprint[:23]}... vs {ref.backbone_fingerprint[:23]}..."
                f"; weights {c.weights!r} vs {ref.weights!r})"
            )
        if diffs:
            weights_only = weights_only and len(diffs) == 1 and diffs[0].startswith("backbone weights")
            problems.append(f"{name!r} differs from {ref_name!r} in " + "; ".join(diffs))
    if problems:
        error = FingerprintMismatchError if weights_only else ConfigError
        raise error(
            "these adapters cannot share one frozen backbone: "
            + ". ".join(problems)
            + ". Every task of a MultiTask must be trained on the same backbone, weights, img_size and options."
        )
