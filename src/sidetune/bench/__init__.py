"""The efficiency profiler (``sidetune bench``, ``sidetune plan``) and its measurement primitives.

Modules: ``accounting`` and ``memory_probe`` (primitives: saved-activation bytes, static memory, timing,
FLOPs, peak memory), ``profile`` (per-method measurement), ``levers`` (frozen-forward speed levers),
``workload`` (what a row runs, also in the probe processes), ``report`` (tables, CSV/JSON, plots), ``plan``
(largest batch within a memory budget), ``commands`` (CLI).

Names are loaded lazily: importing ``sidetune.bench.memory_probe`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidetune.bench.accounting import (
        OPTIMIZER_STATE_MULTIPLIERS,
        SavedTensorReport,
        StaticMemory,
        TimingReport,
        environment_info,
        inference_flops,
        saved_tensor_bytes,
        static_memory_bytes,
        time_step,
    )
    from sidetune.bench.memory_probe import (
        ProbeResult,
        available_memory_bytes,
        measure_cuda_peak,
        measure_peak_rss,
        rss_method,
    )

_EXPORTS = {
    "OPTIMIZER_STATE_MULTIPLIERS": "accounting",
    "SavedTensorReport": "accounting",
    "StaticMemory": "accounting",
    "TimingReport": "accounting",
    "environment_info": "accounting",
    "inference_flops": "accounting",
    "saved_tensor_bytes": "accounting",
    "static_memory_bytes": "accounting",
    "time_step": "accounting",
    "ProbeResult": "memory_probe",
    "available_memory_bytes": "memory_probe",
    "measure_cuda_peak": "memory_probe",
    "measure_peak_rss": "memory_probe",
    "rss_method": "memory_probe",
}

__all__ = [
    "OPTIMIZER_STATE_MULTIPLIERS",
    "ProbeResult",
    "SavedTensorReport",
    "StaticMemory",
    "TimingReport",
    "available_memory_bytes",
    "environment_info",
    "inference_flops",
    "measure_cuda_peak",
    "measure_peak_rss",
    "rss_method",
    "saved_tensor_bytes",
    "static_memory_bytes",
    "time_step",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
