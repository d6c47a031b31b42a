"""``create`` and ``load``: the one way to build a sidetune model."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbones import FrozenBackbone, TimmBackbone, create_timm_model, family_of, fingerprint, normalize_weights
from .errors import ConfigError, FingerprintMismatchError, WeightsError, unknown_choice
from .heads import ClassificationHead
from .heads.detection import build_detector
from .heads.segmentation import UPerNetHead
from .methods import get_method
from .model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ModelConfig,
    SidetuneModel,
    config_from_json,
    edited_fields,
    non_finite_tensors,
)

TASKS = ("classification", "segmentation", "detection", "instance", "video")
DETECTORS = {"detection": ("faster_rcnn", "retinanet"), "instance": ("mask_rcnn",)}


def _mix_over_time_losa(method_module: torch.nn.Module, num_frames: int) -> torch.nn.Module:
    from .side.losa import mix_over_time

    return mix_over_time(method_module, num_frames)


#: Methods that model time in a video model: method name -> ``f(frame_method, num_frames)`` making its side network
#: mix across the frames of a clip. Every other method classifies the mean over time of its per-frame features.
TEMPORAL_METHODS = {"losa": _mix_over_time_losa}


def method_task(task: str) -> str:
    """The task a model's method is built for: a video model is a clip classifier on frames (``classification``)."""
    return "classification" if task == "video" else task


def _img_size(model: torch.nn.Module, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if img_size is None:
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
        return int(size[0]), int(size[1])
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    if len(img_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in img_size):
        raise ConfigError(f"img_size must be a positive int or (H, W), got {img_size!r}.")
    return tuple(img_size)


def create(
    backbone: str,
    method: str,
    task: str = "classification",
    num_classes: int = 1000,
    weights: str | os.PathLike | bool | None = None,
    *,
    img_size: int | tuple[int, int] | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    head_dropout: float = 0.0,
    head_options: dict[str, Any] | None = None,
    shared_backbone: FrozenBackbone | None = None,
    num_frames: int | None = None,
    frame_chunk: int | None = None,
    **method_options: Any,
) -> SidetuneModel:
    """Build a frozen timm backbone adapted by ``method``, with a task head.

    Args:
        backbone: timm model name of a supported family (see :func:`sidetune.list_backbones`).
        method: method name (see :func:`sidetune.list_methods`), e.g. ``"losa"``, ``"e3va"``.
        task: ``"classification"``, ``"segmentation"`` (UPerNet on the method's pyramid), ``"detection"``
            (torchvision Faster R-CNN, or RetinaNet with ``head_options={"detector": "retinanet"}``) or
            ``"instance"`` (Mask R-CNN) or ``"video"`` (clips of ``num_frames`` frames -> class logits; the frames go
            through the image backbone, LoSA mixes across them, every other method averages its frame features
            over time; docs/video.md).
        num_classes: number of classes (for detection: object classes, without the background).
        weights: None for a random backbone, ``"hub"`` for timm's pretrained weights (downloads on first
            use), or a path to a ``.safetensors`` / ``.pth`` file of timm weights (position embeddings are
            resampled to ``img_size`` by timm).
        img_size: input size (default: the timm model's default).
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. a tiny ``depth``).
        head_dropout: dropout before the classifier.
        head_options: options of the task head: ``UPerNetHead`` arguments (``channels``, ``pool_scales``,
            ``dropout``) for segmentation; ``detector`` and ``build_detector`` arguments (``fpn_channels``,
            ``anchor_sizes``, ``box_head_dim``, ...) for detection.
        shared_backbone: an already-built :class:`FrozenBackbone` to adapt instead of building a new one, so
            that several side-method models hold ONE backbone in memory (:class:`sidetune.MultiTask`). It must
            be ``backbone`` built at ``img_size`` with ``weights`` and ``backbone_kwargs`` (those are recorded in
            the config; the fingerprint is computed from the shared weights). In-place methods are refused: they
            change the backbone they adapt.
        num_frames: video: T, the frames of every clip (required for ``task="video"``, refused otherwise).
        frame_chunk: video: frames per backbone forward (None: all at once); see :class:`SidetuneModel`.
        **method_options: fields of the method's config dataclass (e.g. ``alpha=16``, ``channel_rank=8``).

    Returns:
        A :class:`SidetuneModel`: images to (B, num_classes) logits (classification), (B, num_classes, H, W)
        logits (segmentation), or a torchvision detector's losses / detections (detection, instance), or
        (B, T, 3, H, W) clips to (B, num_classes) logits (video).
    """
    spec = get_method(method)
    if task not in TASKS:
        raise unknown_choice("task", task, TASKS)
    if task == "video":
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ConfigError(
                f"task='video' needs num_frames, the frames per clip (an integer >= 1), got {num_frames!r}."
            )
    elif num_frames is not None:
        raise ConfigError(f"num_frames is for task='video'; task {task!r} takes images.")
    frame_task = method_task(task)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if not 0.0 <= head_dropout < 1.0:
        raise ConfigError(f"head_dropout must be in [0, 1), got {head_dropout!r}.")
    weights_spec = normalize_weights(weights)
    config = spec.make_config(**method_options)  # fail on bad options before building anything big
    spec.check_family(family_of(backbone).name, backbone)
    requested = img_size if img_size is None else _img_size(torch.nn.Identity(), img_size)
    if shared_backbone is not None:
        wrapped = _check_shared(shared_backbone, spec.name, spec.kind, backbone, requested)
        size = wrapped.layout.img_size
    else:
        timm_model, family = create_timm_model(
            backbone, weights=weights_spec, img_size=requested, model_kwargs=backbone_kwargs
        )
        size = _img_size(timm_model, requested)
        # Side methods get a backbone frozen for real; in-place methods unfreeze what they train.
        backbone_cls = FrozenBackbone if spec.kind == "side" else TimmBackbone
        wrapped = backbone_cls(timm_model, family, size, name=backbone)
    backbone_fingerprint = fingerprint(wrapped.model)  # before any method touches the weights
    method_module = spec.build(wrapped, config, frame_task)
    if task == "video" and spec.name in TEMPORAL_METHODS:
        method_module = TEMPORAL_METHODS[spec.name](method_module, num_frames)
    head_options = dict(head_options or {})
    head = _build_head(frame_task, method_module, num_classes, size, head_dropout, dict(head_options))
    model_config = ModelConfig(
        backbone=backbone,
        img_size=size,
        weights=weights_spec,
        backbone_fingerprint=backbone_fingerprint,
        method=spec.name,
        method_config=dataclasses.asdict(config),
        task=task,
        num_classes=num_classes,
        backbone_kwargs=dict(backbone_kwargs or {}),
        head_dropout=head_dropout,
        head_options=head_options,
        sidetune_version=_version(),
        num_frames=num_frames,
    )
    return SidetuneModel(method_module, head, model_config, frame_chunk=frame_chunk)


def _check_shared(
    shared: FrozenBackbone, method: str, kind: str, backbone: str, img_size: tuple[int, int] | None
) -> FrozenBackbone:
    """The shared backbone, when ``method`` may adapt it: a side method, the same timm model, the same size."""
    if kind != "side":
        raise ConfigError(
            f"method {method!r} is an in-place method: it changes the backbone it adapts, so it cannot share one "
            "with other models. Build it without shared_backbone."
        )
    if not isinstance(shared, FrozenBackbone):
        raise ConfigError(f"shared_backbone must be a FrozenBackbone, got {type(shared).__name__}.")
    if shared.name != backbone:
        raise ConfigError(f"shared_backbone is {shared.name!r}, but backbone={backbone!r} was asked for.")
    if img_size is not None and tuple(img_size) != shared.layout.img_size:
        raise ConfigError(f"shared_backbone was built for img_size={shared.layout.img_size}, not {tuple(img_size)}.")
    return shared


def _build_head(
    task: str,
    method_module: torch.nn.Module,
    num_classes: int,
    size: tuple[int, int],
    head_dropout: float,
    options: dict[str, Any],
) -> torch.nn.Module:
    """The task head, built from the method's declared pyramid (dense) or pooled width (classification)."""
    if task == "classification":
        if options:
            raise ConfigError(f"classification takes no head_options (got {sorted(options)}); use head_dropout.")
        return ClassificationHead(_pooled_width(method_module, size), num_classes, head_dropout)
    spec = method_module.pyramid_spec()
    stage_norms = not method_module.pyramid_normalized  # E3VA normalises its stages itself (the paper's norms)
    if task == "segmentation":
        try:
            return UPerNetHead(spec, num_classes, stage_norms=stage_norms, **options)
        except TypeError as err:
            raise ConfigError(f"segmentation head_options: {err}") from None
    kinds = DETECTORS[task]
    kind = options.pop("detector", kinds[0])
    if kind not in kinds:
        raise unknown_choice(f"{task} detector", kind, kinds)
    data = method_module.backbone.data_config
    try:
        return build_detector(
            kind,
            method_module,
            spec,
            num_classes + 1,  # torchvision counts the background as class 0
            size,
            image_mean=data["mean"],
            image_std=data["std"],
            stage_norms=stage_norms,
            **options,
        )
    except TypeError as err:
        raise ConfigError(f"{task} head_options: {err}") from None


def _pooled_width(method_module: torch.nn.Module, size: tuple[int, int]) -> int:
    """Width of ``Features.pooled``: the method's ``pooled_width`` where it declares one (the multi-layer probe's
    concatenation), else the model's ``num_features`` where the pooling keeps it."""
    declared = getattr(method_module, "pooled_width", None)
    if declared:
        return int(declared)
    model = method_module.backbone.model
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if width is None:
        with torch.no_grad():
            width = method_module(torch.zeros(1, 3, *size)).pooled.shape[-1]
    return int(width)


def _version() -> str:
    from . import __version__

    return __version__


def load(
    directory: str | os.PathLike,
    weights: str | os.PathLike | bool | None = "saved",
    *,
    map_location: str | torch.device = "cpu",
    shared_backbone: FrozenBackbone | None = None,
) -> SidetuneModel:
    """Rebuild a model saved with :meth:`SidetuneModel.save_adapter`.

    Args:
        directory: the adapter directory.
        weights: backbone weights to load the adapter onto: ``"saved"`` (default) reuses what the config
            recorded (a file path, or ``"hub"``); otherwise as in :func:`create`. A random backbone
            (weights None) is rebuilt from torch's current RNG state: the fingerprint check passes only
            when it is seeded as it was at creation (``torch.manual_seed``).
        map_location: device for the rebuilt model.
        shared_backbone: rebuild the model around this already-built backbone (see :func:`create`); the
            fingerprint check applies to it as to a new one.

    Raises:
        FingerprintMismatchError: the backbone's weights differ from those the adapter was trained on.
        WeightsError: a missing or damaged file: ``adapter_config.json`` that is not JSON, has unknown, missing or
            mistyped fields, or was edited after saving so that it no longer describes the saved adapter (the
            message names the field); an adapter file that is unreadable, does not fit the model, or holds NaN or
            infinite values.
    """
    directory = Path(directory)
    cfg_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise WeightsError(
                f"{str(p)!r} not found: {str(directory)!r} is not an adapter directory written by save_adapter()."
            )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(
            f"{str(cfg_path)!r} is not valid JSON ({err}); restore the file or save the adapter again."
        ) from None
    config = config_from_json(raw, cfg_path)
    # An edited adapter_config.json surfaces as a model that does not fit the weights (another fingerprint, other
    # shapes): the copy saved inside the weights file names the edited field instead.
    edited = edited_fields(config, weights_path)
    edit_note = (
        f" {str(cfg_path)!r} was edited after the adapter was saved: {'; '.join(edited)}. Restore the field(s)."
        if edited
        else ""
    )
    chosen = config.weights if isinstance(weights, str) and weights == "saved" else weights
    try:
        model = create(
            config.backbone,
            config.method,
            task=config.task,
            num_classes=config.num_classes,
            weights=chosen,
            img_size=tuple(config.img_size),
            backbone_kwargs=config.backbone_kwargs,
            head_dropout=config.head_dropout,
            head_options=config.head_options,
            shared_backbone=shared_backbone,
            num_frames=config.num_frames,
            **config.method_config,
        )
    except (ConfigError, TypeError) as err:
        raise WeightsError(
            f"{str(cfg_path)!r} does not describe a model sidetune can build: {err}{edit_note}"
        ) from None
    found = model.config.backbone_fingerprint
    if found != config.backbone_fingerprint:
        if edited:
            raise WeightsError(
                f"the model described by {str(cfg_path)!r} does not fit its adapter: its backbone has other weights "
                f"(fingerprint {found[:23]}..., saved {config.backbone_fingerprint[:23]}...).{edit_note}"
            )
        raise FingerprintMismatchError(
            f"the adapter in {str(directory)!r} was trained on {config.backbone} weights with fingerprint "
            f"{config.backbone_fingerprint[:23]}..., but the backbone built from weights={chosen!r} has "
            f"{found[:23]}.... Load it with the weights it was trained on (and if {ADAPTER_CONFIG} was edited, "
            "e.g. img_size or backbone_kwargs, restore it)."
        )
    try:
        state = load_file(str(weights_path))
    except SafetensorError as err:
        raise WeightsError(f"{str(weights_path)!r} is not a readable safetensors file: {err}") from None
    expected = dict(model.named_trainable_parameters())
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{str(weights_path)!r} does not match the {config.method} model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}.{edit_note}"
        )
    for name, tensor in state.items():
        if expected[name].shape != tensor.shape:
            raise WeightsError(
                f"{str(weights_path)!r}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}.{edit_note}"
            )
    bad = non_finite_tensors(state)
    if bad:
        raise WeightsError(
            f"{str(weights_path)!r} holds NaN or infinite values in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}. The run that saved it diverged; a model with these weights predicts "
            "nothing meaningful. Use an earlier checkpoint, or train again with a lower learning rate."
        )
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
    return model.to(map_location)
