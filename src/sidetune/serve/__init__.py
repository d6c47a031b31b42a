"""Multi-task inference on one frozen backbone, and the HTTP service on top of it.

* :class:`MultiTask`: many side-network adapters on one shared backbone; one backbone forward per batch.
* :func:`predict_folder`: JSON-able per-task results for a folder of images.
* :mod:`sidetune.serve.app`: the FastAPI service (``sidetune serve``, ``python -m sidetune.serve``), with
  dynamic batching (:mod:`sidetune.serve.batching`). Needs the ``serve`` extra (FastAPI, uvicorn).
"""

from .multitask import MultiTask, PassStats, SharedBackbone, TaskInfo, read_adapter
from .results import decode_mask, predict_folder, task_result

__all__ = [
    "MultiTask",
    "PassStats",
    "SharedBackbone",
    "TaskInfo",
    "decode_mask",
    "predict_folder",
    "read_adapter",
    "task_result",
]
