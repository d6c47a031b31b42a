"""Evaluate and predict with a saved adapter (a run's ``best/`` or ``last/``, or any ``save_adapter`` folder).

The adapter's task (recorded in ``adapter_config.json``) decides the data layout, the metrics and the prediction
files (:mod:`sidetune.tasks`); ``inference.json`` beside the adapter records what the run used (class names,
transforms, precision), so that ``sidetune eval`` reproduces the run's validation numbers by default.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .. import load
from ..data import DataError
from ..data.classification import IMG_EXTENSIONS
from ..errors import ConfigError, WeightsError
from ..model import SidetuneModel

logger = logging.getLogger(__name__)

INFERENCE = "inference.json"
PRECISIONS = ("no", "bf16", "fp16")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a torch device ({err}); use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} is not available here (no CUDA device); use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: sidetune runs on cpu or cuda.")
    return device


def read_inference_info(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``inference.json`` of an adapter folder (empty when absent).

    Raises:
        WeightsError: the file exists but is not a JSON object with the expected field types.
    """
    path = Path(adapter_dir) / INFERENCE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(
            f"{str(path)!r} is not valid JSON ({err}): restore it from a copy (a run's best/ and last/ hold the "
            "same file). It holds the adapter's class names and transform, which nothing else records."
        ) from None
    if not isinstance(info, dict):
        raise WeightsError(f"{str(path)!r} must hold a JSON object, got {type(info).__name__}.")
    expected = {"classes": list, "seed": int, "augmentation": str, "task": str, "mixed_precision": str}
    for key, kind in expected.items():
        if key in info and not isinstance(info[key], kind):
            raise WeightsError(f"{str(path)!r}: {key!r} must be a {kind.__name__}, got {info[key]!r}.")
    if "classes" in info and not all(isinstance(c, str) for c in info["classes"]):
        raise WeightsError(f"{str(path)!r}: 'classes' must be a list of names.")
    return info


def load_for_inference(
    adapter_dir: str | os.PathLike, weights: Any = "saved", device: str | torch.device | None = None
) -> tuple[SidetuneModel, dict[str, Any]]:
    """The model of an adapter folder in eval mode, and its ``inference.json`` with defaults filled in.

    Folders written by :meth:`SidetuneModel.save_adapter` outside ``fit`` have no ``inference.json``: their
    classes are ``"0".."K-1"``, the transform is the task's default, the precision float32 and the seed 0.

    Raises:
        WeightsError: the folder is not a readable adapter, or its ``inference.json`` disagrees with it.
    """
    info = read_inference_info(adapter_dir)
    target = _device(device)
    with torch.random.fork_rng(devices=[]):
        # fit() creates the model right after seeding torch with the run's seed: a random backbone
        # (weights=None, the tests' tiny models) is rebuilt bit for bit only from the same RNG state
        torch.manual_seed(info.get("seed", 0))
        model = load(adapter_dir, weights=weights, map_location=target).eval()
    info.setdefault("task", model.config.task)
    if info["task"] != model.config.task:
        raise WeightsError(
            f"{adapter_dir}: inference.json says task {info['task']!r}, adapter_config.json {model.config.task!r}."
        )
    info.setdefault("classes", [str(i) for i in range(model.config.num_classes)])
    if len(info["classes"]) != model.config.num_classes:
        raise WeightsError(
            f"{adapter_dir}: inference.json names {len(info['classes'])} classes but the adapter has "
            f"{model.config.num_classes}; restore the file from the run."
        )
    if model.config.task in ("classification", "video"):
        info.setdefault("augmentation", "vtab")
    info.setdefault("mixed_precision", "no")
    info.setdefault("task_options", {})
    return model, info


def autocast_for(mixed_precision: str, device: torch.device):
    """The autocast context of ``mixed_precision`` (``no``, ``bf16``, ``fp16``) on ``device``.

    Raises:
        ConfigError: an unknown precision, or one the device cannot run (fp16 on a CPU; bf16 on a CPU without
            native bfloat16).
    """
    from .setup import resolve_mixed_precision

    if mixed_precision not in PRECISIONS:
        raise ConfigError(f"mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}.")
    if mixed_precision != "no":
        resolve_mixed_precision(mixed_precision, on_cpu=device.type == "cpu")
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def inference_precision(requested: str | None, info: dict[str, Any], device: torch.device) -> str:
    """The precision to evaluate in: the one asked for, else the run's when this device can run it."""
    if requested is not None:
        return requested
    trained = info.get("mixed_precision", "no")
    if trained == "no":
        return "no"
    try:
        autocast_for(trained, device)
    except ConfigError as err:
        logger.warning(
            "the adapter was trained in %s, which this device cannot run (%s): float32 instead", trained, err
        )
        return "no"
    return trained


def evaluate_adapter(
    adapter_dir: str | os.PathLike,
    data: str | os.PathLike,
    split: str | None = "auto",
    *,
    layout: str = "auto",
    batch_size: int | None = None,
    workers: int = 0,
    weights: Any = "saved",
    augmentation: str | None = None,
    device: str | torch.device | None = None,
    mixed_precision: str | None = None,
    eval_mode: str | None = None,
) -> dict[str, Any]:
    """The task's metrics of a saved adapter on a labelled split.

    Args:
        adapter_dir: folder written by ``save_adapter`` (a run's ``best/`` or ``last/``).
        data: the dataset, in a layout of the adapter's task (as for training).
        split: split name; ``auto``: classification ``test`` when the data has one, else the whole data;
            dense tasks ``val``.
        layout: data layout (default: the run's).
        batch_size: images per batch (default: 64 for classification, 4 for dense tasks).
        workers: data-loading workers.
        weights: backbone weights (default: what the adapter recorded).
        augmentation: classification's eval transform (default: the one the run trained with).
        device: default CUDA when available.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (default: the precision the run trained in, when this device
            runs it), so that the run's validation numbers are reproduced.
        eval_mode: segmentation inference, ``whole`` or ``slide`` (default: the run's).

    Returns:
        The task's metrics plus ``count``, ``classes``, ``adapter``, ``task``, ``data``, ``split``,
        ``mixed_precision``.

    Raises:
        DataError: the data is missing, or its classes disagree with the adapter's.
        ConfigError: an option the adapter's task does not take.
    """
    from ..tasks import make_task

    model, info = load_for_inference(adapter_dir, weights, device)
    task_name = model.config.task
    overrides: dict[str, Any] = {}
    if eval_mode is not None:
        _only(task_name, "segmentation", "eval_mode")
        overrides["eval_mode"] = eval_mode
    if augmentation is not None:
        if task_name != "video":  # video's eval transform is chosen like classification's
            _only(task_name, "classification", "augmentation")
        info["augmentation"] = augmentation
    task = make_task(task_name, {**_eval_options(task_name, info), **overrides})
    dev = next(model.parameters()).device
    precision = inference_precision(mixed_precision, info, dev)
    dataset = task.eval_dataset(model, info, data, split, layout)
    bs = batch_size or (64 if task_name == "classification" else 4)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    evaluator = task.evaluator(model, dataset, info["classes"])
    loader = DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=workers, collate_fn=task.eval_collate)
    from accelerate.utils import send_to_device

    with torch.no_grad():
        for batch in loader:
            with autocast_for(precision, dev):
                evaluator.update(model, send_to_device(batch, dev))
    metrics = evaluator.compute([evaluator.state()])
    metrics["count"] = len(dataset)
    return {
        **metrics,
        "classes": info["classes"],
        "adapter": str(adapter_dir),
        "task": task_name,
        "data": str(data),
        "split": getattr(dataset, "split", split),
        "mixed_precision": precision,
    }


def _eval_options(task: str, info: dict[str, Any]) -> dict[str, Any]:
    """The task options an evaluation uses from the run's (not the loss's class weights)."""
    options = dict(info.get("task_options") or {})
    options.pop("class_weights", None)
    if task == "segmentation" and "eval_mode" in info:
        options.setdefault("eval_mode", info["eval_mode"])
    return options


def _only(task: str, owner: str, option: str) -> None:
    if task != owner:
        flag = "--" + option.replace("_", "-")
        raise ConfigError(f"{flag} is a {owner} option; this adapter's task is {task}.")


def list_images(path: str | os.PathLike) -> list[Path]:
    """Image files under a folder (recursively, hidden files and folders skipped, sorted), or the one file given.

    Raises:
        DataError: nothing there, or no image in the folder.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path} does not exist; pass a folder of images or an image file.")
    found = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not found:
        raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {path}.")
    return found


def predict(
    adapter_dir: str | os.PathLike,
    images: str | os.PathLike,
    output: str | os.PathLike,
    *,
    weights: Any = "saved",
    device: str | torch.device | None = None,
    mixed_precision: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Predict every image under ``images`` with a saved adapter and write the task's prediction files.

    Classification writes a CSV (``output`` a file, ``-`` for stdout); segmentation palette PNG masks and overlays;
    detection ``predictions.json`` and overlays (``output`` a folder). ``options`` are the task's prediction options
    (``top_k``, ``batch_size``, ``workers``, ``augmentation``; ``eval_mode``; ``score_threshold``).

    Returns:
        ``{"images": N, "files": [...], "task": ...}`` (classification adds ``rows``).

    Raises:
        ConfigError: an option the adapter's task does not take, or an output that cannot be written.
    """
    from ..tasks import make_task
    from ..tasks.classification import ClassificationTask

    model, info = load_for_inference(adapter_dir, weights, device)
    task = make_task(model.config.task, _eval_options(model.config.task, info))
    writes_csv = isinstance(task, ClassificationTask)  # classification and video: one CSV row per image or clip
    allowed = set(task.predict_options) | ({"batch_size", "workers"} if writes_csv else set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        flags = ", ".join("--" + o.replace("_", "-") for o in unknown)
        takes = ", ".join("--" + o.replace("_", "-") for o in sorted(allowed)) or "none"
        raise ConfigError(f"{flags}: not an option of {task.name} predictions (they take: {takes}).")
    check_output(output, is_file=writes_csv)
    paths = task.list_inputs(images)
    dev = next(model.parameters()).device
    precision = inference_precision(mixed_precision, info, dev)
    result = task.predict(model, info, paths, output, autocast=autocast_for(precision, dev), **options)
    return {**result, "task": task.name, "mixed_precision": precision}


def predict_multi(
    adapters: list[str] | dict[str, str],
    images: str | os.PathLike,
    output: str | os.PathLike,
    *,
    weights: Any = "saved",
    device: str | torch.device | None = None,
    batch_size: int = 8,
    tasks: list[str] | None = None,
    mixed_precision: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Predict every image with several adapters sharing ONE backbone forward per batch (:class:`sidetune.MultiTask`)
    and write each task's files, under ``output/<task name>/``, as that task's :func:`predict` writes them alone
    (classification ``predictions.csv``; segmentation PNG masks and overlays; detection ``predictions.json`` and
    overlays). ``options``: ``top_k``, ``score_threshold``. ``mixed_precision``: as in :func:`predict` (default: the
    precision the adapters recorded, which must agree; see :class:`sidetune.MultiTask`).

    Returns:
        ``{"images": N, "tasks": {name: what its writer returned}, "mixed_precision": ...}``.
    """
    from PIL import Image

    from ..serve import MultiTask
    from ..tasks import make_task

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    check_output(output, is_file=False)
    paths = list_images(images)
    multitask = MultiTask(adapters, weights, device=device, mixed_precision=mixed_precision)
    names = multitask.select(tasks)
    outputs: dict[str, list[Any]] = {name: [] for name in names}
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = [Image.open(p) for p in paths[start : start + batch_size]]
            for name, out in multitask(batch, names).items():
                outputs[name] += [o.float().cpu() if isinstance(o, torch.Tensor) else o for o in out]
    written = {}
    for name in names:
        info = multitask.tasks[name]
        adapter_info = read_inference_info(info.adapter)
        task = make_task(info.task, _eval_options(info.task, adapter_info))
        allowed = {"classification": {"top_k"}, "detection": {"score_threshold"}, "instance": {"score_threshold"}}
        kwargs = {k: v for k, v in options.items() if k in allowed.get(info.task, set()) and v is not None}
        written[name] = task.write_outputs(
            outputs[name], {"classes": list(info.classes), **adapter_info}, paths, Path(output) / name, **kwargs
        )
    return {"images": len(paths), "tasks": written, "mixed_precision": multitask.mixed_precision}


def check_output(output: str | os.PathLike, *, is_file: bool) -> None:
    """Fail before any inference when ``output`` cannot be written (a missing parent folder, a file for a folder).

    Raises:
        ConfigError: naming the path and the fix.
    """
    if str(output) == "-":
        if not is_file:
            raise ConfigError("--output - (stdout) is for classification CSVs; give a folder for this task.")
        return
    path = Path(output).expanduser()
    if is_file:
        if path.is_dir():
            raise ConfigError(f"--output {str(path)!r} is a folder; give the CSV file to write.")
        if not path.parent.is_dir():
            raise ConfigError(
                f"--output {str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first."
            )
    else:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--output {str(path)!r} is a file; give a folder for the predictions.")
        if not path.exists() and not path.parent.is_dir():
            raise ConfigError(
                f"--output {str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first."
            )


def predict_images(
    adapter_dir: str | os.PathLike,
    images: str | os.PathLike,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    workers: int = 0,
    weights: Any = "saved",
    augmentation: str | None = None,
    device: str | torch.device | None = None,
    mixed_precision: str | None = None,
) -> list[dict[str, Any]]:
    """Predict the class of every image under ``images`` with a classification adapter.

    Returns:
        One record per image: ``{"path", "label", "score", "top_k": [(label, score), ...]}`` with softmax
        scores, ``top_k`` sorted by score (at most the class count).
    """
    from ..tasks import make_task

    model, info = load_for_inference(adapter_dir, weights, device)
    if model.config.task != "classification":
        raise ConfigError(
            f"predict_images is for classification adapters; this one is {model.config.task}: use predict()."
        )
    task = make_task("classification")
    dev = next(model.parameters()).device
    precision = inference_precision(mixed_precision, info, dev)
    return task.predict_rows(
        model, info, list_images(images), top_k=top_k, batch_size=batch_size, workers=workers,
        augmentation=augmentation, autocast=autocast_for(precision, dev),
    )  # fmt: skip
