"""Tasks: what differs between classification, segmentation, detection and instance segmentation, one file each.

A task (:class:`Task`) owns its datasets, transforms, collate functions, loss, metrics (and which one decides the
best checkpoint) and prediction files; the one training loop (:func:`sidetune.train.fit`) drives any of them.
Tasks are registered by one explicit call each (below), like methods in :mod:`sidetune.methods`; a new task is
one file here plus one :func:`register_task` line.

The metric functions of the dense tasks (mIoU, COCO mAP) live in their task's file and are exported here.
"""

from __future__ import annotations

from typing import Any

from ..errors import unknown_choice
from .base import Evaluator, StepOutput, Task, TaskData
from .classification import ClassificationMeter, ClassificationTask
from .detection import CocoEvaluator, DetectionTask, coco_evaluate, coco_ground_truth, to_coco_results
from .instance import InstanceTask
from .segmentation import SegmentationMetrics, SegmentationTask, confusion_matrix, iou_from_confusion, mean_iou

_REGISTRY: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Add a task class to the registry (a name can be registered once)."""
    if not task.name:
        raise ValueError(f"{task.__name__} has no name")
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


register_task(ClassificationTask)
register_task(SegmentationTask)
register_task(DetectionTask)
register_task(InstanceTask)


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise unknown_choice("task", name, _REGISTRY, hint="See sidetune.tasks.list_tasks().")
    return _REGISTRY[name]


def make_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """An instance of task ``name`` with its ``task_options`` validated."""
    cls = get_task(name)
    return cls(cls.make_options(options))


def list_tasks() -> list[dict[str, Any]]:
    """Every task with its description, layouts, options and headline metric."""
    return [
        {
            "name": t.name,
            "description": t.description,
            "layouts": dict(t.layouts),
            "options": t.option_names(),
            "headline": t.headline,
        }
        for t in _REGISTRY.values()
    ]


def task_of_option(option: str) -> str | None:
    """The name of a task that has ``option`` in its ``task_options`` (for messages), or None."""
    return next((t.name for t in _REGISTRY.values() if option in t.option_names()), None)


__all__ = [
    "ClassificationMeter",
    "CocoEvaluator",
    "Evaluator",
    "SegmentationMetrics",
    "StepOutput",
    "Task",
    "TaskData",
    "coco_evaluate",
    "coco_ground_truth",
    "confusion_matrix",
    "get_task",
    "iou_from_confusion",
    "list_tasks",
    "make_task",
    "mean_iou",
    "register_task",
    "task_of_option",
    "to_coco_results",
]
