"""Peak-memory probes: CPU resident-set growth in a fresh subprocess, CUDA peak allocation in-process.

Workload protocol
-----------------
A workload is an importable function named by ``"package.module:function"``. The probe calls it with the
given keyword arguments; that call is the *set-up* phase (build the model, the optimizer, the batch) and
is not measured. It must return a zero-argument callable ``run()``: the *measured* phase (one or more
training steps). The child process

1. imports the function (RSS after imports is recorded as ``import_bytes``),
2. calls it, collects garbage and returns freed heap memory to the OS (glibc ``malloc_trim``); the RSS now
   is the ``baseline_bytes``,
3. resets the peak and calls ``run()``; the peak RSS during ``run()`` is ``peak_bytes``,

and writes a JSON result to a file the parent named. A workload that raises (``MemoryError``, a CUDA
out-of-memory error, anything) comes back as ``ok=False`` with the message; so does a child that dies,
e.g. killed by the kernel's OOM killer, or one that runs past the timeout.

How the CPU peak is read (Linux)
--------------------------------
``/proc/self/status`` gives ``VmRSS`` (current) and ``VmHWM`` (high-water mark). Writing ``"5"`` to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, so after the reset ``VmHWM`` is the exact
peak of ``run()`` (method ``"proc_clear_refs"``). This works on the project's sandbox machine (root,
Linux 6.x), checked empirically. Where the write is refused, a thread samples ``VmRSS`` every
millisecond during ``run()``; if ``VmHWM`` rose during ``run()`` it is the exact peak, otherwise the
sampled maximum is used (method ``"proc_sampling"``, a lower bound on short spikes; the thread needs
the GIL, which torch kernels release but a single long pure-Python/C call does not). Without ``/proc``
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is used (method ``"ru_maxrss"``); it cannot be reset, so
the growth is only seen where ``run()`` exceeds every earlier peak of the process.

The functions ``_demo_*`` at the end of this module are tiny workloads for tests and smoke checks.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "ProbeResult",
    "available_memory_bytes",
    "measure_cuda_peak",
    "measure_peak_rss",
    "rss_method",
]

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_INTERVAL_S = 0.001
_POLL_INTERVAL_S = 0.005
_STDERR_TAIL = 4000

# Run in the child with ``python -c``; argv: this file, target, kwargs JSON, result path, method. The child
# loads this file by path, under a private name, so that starting it imports neither ``sidetune`` (whose
# package import pulls in timm) nor torch: only the workload's own imports cost time.
_CHILD_MODULE = "_sidetune_memory_probe_child"
_CHILD_CODE = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location({_CHILD_MODULE!r}, sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "sys.exit(module._child_main(sys.argv[2:]))\n"
)


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of a peak-memory probe.

    Attributes:
        target: The workload (``"module:function"``, or ``"<callable>"`` for in-process probes).
        ok: Whether set-up and ``run()`` both completed.
        error: ``"ExceptionType: message"`` (or why the child failed) when not ``ok``.
        method: How the peak was read: ``"proc_clear_refs"``, ``"proc_sampling"``, ``"ru_maxrss"`` or
            ``"cuda_max_memory_allocated"``.
        baseline_bytes: Memory just before ``run()`` (after imports and set-up).
        peak_bytes: Peak memory during ``run()``.
        growth_bytes: ``peak_bytes - baseline_bytes``, never negative.
        import_bytes: CPU probes: RSS after importing the workload, before set-up.
        setup_s: Seconds the set-up phase took.
        run_s: Seconds ``run()`` took.
        returncode: CPU probes: the child's exit status (``None`` when it timed out).
        reserved_peak_bytes: CUDA probes: peak memory reserved by the caching allocator.
    """

    target: str
    ok: bool
    error: str | None
    method: str
    baseline_bytes: int = 0
    peak_bytes: int = 0
    growth_bytes: int = 0
    import_bytes: int | None = None
    setup_s: float = 0.0
    run_s: float = 0.0
    returncode: int | None = None
    reserved_peak_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The result as a JSON-serialisable dict."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Reading RSS
# --------------------------------------------------------------------------------------------------


def _read_status() -> dict[str, int]:
    """Return ``VmRSS`` and ``VmHWM`` of this process in bytes (empty without ``/proc``)."""
    out: dict[str, int] = {}
    try:
        with _PROC_STATUS.open() as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def _ru_maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def _current_rss() -> int:
    status = _read_status()
    return status.get("VmRSS", 0) if status else _ru_maxrss_bytes()


def _reset_hwm() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; ``False`` where the kernel refuses."""
    try:
        with _PROC_CLEAR_REFS.open("w") as fh:
            fh.write("5")
    except OSError:
        return False
    status = _read_status()
    # A working reset leaves VmHWM at (about) the current RSS.
    return bool(status) and status["VmHWM"] <= status["VmRSS"] + 64 * 1024


_METHODS = ("auto", "proc_clear_refs", "proc_sampling", "ru_maxrss")


def rss_method(requested: str = "auto") -> str:
    """Return the method the CPU probe uses in a process on this machine.

    As a side effect the ``VmHWM`` of the calling process is reset where the kernel allows it.

    Args:
        requested: ``"auto"`` picks the best available; a method name forces that method (used to test
            the fallbacks), falling back to ``"ru_maxrss"`` only where ``/proc`` is missing.

    Returns:
        ``"proc_clear_refs"``, ``"proc_sampling"`` or ``"ru_maxrss"`` (see the module docstring).

    Raises:
        ValueError: If ``requested`` is not a known method, or ``"proc_clear_refs"`` is forced where the
            reset is refused.
    """
    if requested not in _METHODS:
        raise ValueError(f"unknown RSS method {requested!r}; expected one of {_METHODS}")
    if requested == "ru_maxrss" or not _read_status():
        return "ru_maxrss"
    if requested == "proc_sampling":
        return "proc_sampling"
    if _reset_hwm():
        return "proc_clear_refs"
    if requested == "proc_clear_refs":
        raise ValueError("writing to /proc/self/clear_refs is refused here; use 'auto' or 'proc_sampling'")
    return "proc_sampling"


class _RssSampler:
    """Background thread recording the maximum ``VmRSS`` seen while it runs."""

    def __init__(self, interval_s: float = _SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.peak = _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _current_rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss())


# --------------------------------------------------------------------------------------------------
# The child process
# --------------------------------------------------------------------------------------------------


def _release_free_heap() -> None:
    """Return memory that set-up freed to the OS (glibc ``malloc_trim``), where the C library has it.

    Without it, whether memory freed during set-up (a warm-up forward's activations) stays resident
    depends on heap fragmentation: the baseline then varies from run to run, and ``run()`` reuses that
    resident free memory without growing, so its growth would be under-counted by a varying amount.
    """
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _resolve(target: str) -> Callable[..., Any]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def _format_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _measure_in_this_process(target: str, kwargs: Mapping[str, Any], method: str = "auto") -> dict[str, Any]:
    """Run the set-up/run protocol in the current process and return the result fields."""
    result: dict[str, Any] = {"target": target, "ok": False, "error": None, "method": method}
    try:
        fn = _resolve(target)
        gc.collect()
        result["import_bytes"] = _current_rss()
        start = time.perf_counter()
        run = fn(**kwargs)
        result["setup_s"] = time.perf_counter() - start
        if not callable(run):
            raise TypeError(f"{target} must return a zero-argument callable run(), got {type(run).__name__}")
        gc.collect()
        _release_free_heap()
        method = rss_method(method)  # resets VmHWM where possible
        result["method"] = method
        status_before = _read_status()
        baseline = _current_rss()
        result["baseline_bytes"] = baseline
        start = time.perf_counter()
        if method == "proc_clear_refs":
            run()
            peak = _read_status()["VmHWM"]
        elif method == "proc_sampling":
            with _RssSampler() as sampler:
                run()
            status_after = _read_status()
            peak = sampler.peak
            if status_after["VmHWM"] > status_before["VmHWM"]:
                peak = max(peak, status_after["VmHWM"])
        else:
            run()
            peak = max(baseline, _ru_maxrss_bytes())
        result["run_s"] = time.perf_counter() - start
        result["peak_bytes"] = peak
        result["growth_bytes"] = max(0, peak - baseline)
        result["ok"] = True
    except BaseException as exc:  # the parent must get a result, whatever the workload raised
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        result["error"] = _format_error(exc)
    return result


def _child_main(argv: Sequence[str]) -> int:
    """Entry point of the probe subprocess: ``target kwargs_json result_path method``."""
    target, kwargs_json, result_path, method = argv
    kwargs = json.loads(kwargs_json)
    result = _measure_in_this_process(target, kwargs, method)
    Path(result_path).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------
# The parent side
# --------------------------------------------------------------------------------------------------


def _child_env(pythonpath: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    """Environment for the child: make this very ``sidetune`` (and ``pythonpath``) importable."""
    package_root = Path(__file__).resolve().parents[2]  # .../src, holding sidetune/
    paths = [str(Path(p).resolve()) for p in pythonpath] + [str(package_root)]
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of this machine from ``/proc/meminfo``, in bytes (None without ``/proc``)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _run_child(
    cmd: list[str], env: dict[str, str], timeout: float, max_rss_bytes: int | None
) -> tuple[int | None, bytes, str | None]:
    """Run the child; return ``(returncode, stderr, why_stopped)``, stopping it past ``timeout`` or the cap.

    The cap is enforced from here by reading the child's ``VmRSS`` every few milliseconds and killing it
    once above ``max_rss_bytes``, so that a workload too big for the machine is stopped before the kernel's
    OOM killer picks a victim (which might be another process).
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        why = None
        peak_seen = 0
        while proc.poll() is None:
            if time.monotonic() > deadline:
                why = f"timed out after {timeout:g} s"
            elif max_rss_bytes is not None:
                rss = _rss_of(proc.pid) or 0
                peak_seen = max(peak_seen, rss)
                if rss > max_rss_bytes:
                    why = (
                        f"MemoryError: the probe's resident set reached {rss / 2**20:,.0f} MiB, above the max_rss cap "
                        f"of {max_rss_bytes / 2**20:,.0f} MiB; stopped"
                    )
            if why:
                proc.kill()
                proc.wait()
                break
            time.sleep(_POLL_INTERVAL_S)
        err.seek(0)
        return (None if why else proc.returncode), err.read(), why


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-_STDERR_TAIL:].strip()


def measure_peak_rss(
    target: str,
    kwargs: Mapping[str, Any] | None = None,
    timeout: float = 600.0,
    *,
    pythonpath: Sequence[str | os.PathLike[str]] = (),
    python: str | None = None,
    method: str = "auto",
    max_rss_bytes: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ProbeResult:
    """Measure the peak resident-set growth of a workload's ``run()`` in a fresh Python process.

    See the module docstring for the set-up/run protocol and how the peak is read.

    Args:
        target: ``"package.module:function"``; the function takes ``**kwargs`` and returns ``run()``.
        kwargs: JSON-serialisable keyword arguments for the function.
        timeout: Seconds before the child is killed (the result is then ``ok=False``).
        pythonpath: Extra directories the child needs on ``sys.path`` to import ``target``.
        python: Interpreter for the child; defaults to :data:`sys.executable`.
        method: How to read the peak (see :func:`rss_method`); ``"auto"`` picks the best available.
        max_rss_bytes: Cap on the child's resident set (imports and set-up included); above it the child
            is killed and the result is ``ok=False`` with a ``MemoryError`` naming the cap. Polled every
            5 ms, so a fast allocation can overshoot the cap briefly. None: no cap.
        env: Extra environment variables for the child (e.g. glibc ``MALLOC_*`` tunables).

    Returns:
        The probe result; ``ok=False`` with an error message if the workload raised, the child died, was
        stopped at the cap or timed out.

    Raises:
        TypeError: If ``kwargs`` is not JSON-serialisable.
        ValueError: If ``method`` is not a known method name.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown RSS method {method!r}; expected one of {_METHODS}")
    kwargs_json = json.dumps(dict(kwargs or {}))
    with tempfile.TemporaryDirectory(prefix="sidetune-probe-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [
            python or sys.executable,
            "-c",
            _CHILD_CODE,
            str(Path(__file__).resolve()),
            target,
            kwargs_json,
            str(result_path),
            method,
        ]
        logger.debug("probe: %s", cmd)
        child_env = {**_child_env(pythonpath), **dict(env or {})}
        returncode, stderr_bytes, stopped = _run_child(cmd, child_env, timeout, max_rss_bytes)
        stderr = _tail(stderr_bytes)
        if stopped is not None:
            return ProbeResult(target=target, ok=False, error=f"{stopped}\n{stderr}".strip(), method="none")
        if returncode != 0 or not result_path.exists():
            status = f"exited with status {returncode}"
            if returncode is not None and returncode < 0:
                status = f"was killed by signal {-returncode}"
                status += " (SIGKILL: out of memory?)" if returncode == -9 else ""
            return ProbeResult(
                target=target,
                ok=False,
                error=f"probe process {status}\n{stderr}".strip(),
                method="none",
                returncode=returncode,
            )
        data = json.loads(result_path.read_text())
    if not data["ok"]:
        logger.warning("workload %s failed: %s", target, data["error"])
    fields = set(ProbeResult.__dataclass_fields__)
    return ProbeResult(**{k: v for k, v in data.items() if k in fields}, returncode=returncode)


def measure_cuda_peak(run: Callable[[], object], device: Any = None) -> ProbeResult:
    """Measure the peak CUDA memory allocated by ``run()`` in this process.

    Synchronises, resets the allocator's peak statistics, runs ``run()``, synchronises again and reads
    ``torch.cuda.max_memory_allocated``; the baseline is the memory allocated just before. Do the
    set-up (model, optimizer, batch on the device) before calling this. An exception from ``run()``
    (``torch.cuda.OutOfMemoryError`` included) is returned as ``ok=False``, after emptying the cache.

    Args:
        run: Zero-argument closure running the measured steps.
        device: CUDA device; the current one by default.

    Returns:
        The probe result with ``method="cuda_max_memory_allocated"``.

    Raises:
        RuntimeError: If CUDA is not available.
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("measure_cuda_peak needs a CUDA device")
    dev = torch.device("cuda") if device is None else torch.device(device)
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    baseline = torch.cuda.memory_allocated(dev)
    error = None
    start = time.perf_counter()
    try:
        run()
        torch.cuda.synchronize(dev)
    except Exception as exc:
        error = _format_error(exc)
        logger.warning("CUDA workload failed: %s", error)
    run_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev)
    reserved = torch.cuda.max_memory_reserved(dev)
    if error is not None:
        gc.collect()
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()
    return ProbeResult(
        target="<callable>",
        ok=error is None,
        error=error,
        method="cuda_max_memory_allocated",
        baseline_bytes=baseline,
        peak_bytes=peak,
        growth_bytes=max(0, peak - baseline),
        run_s=run_s,
        reserved_peak_bytes=reserved,
    )


# --------------------------------------------------------------------------------------------------
# Demo workloads (for tests and smoke checks of the probe itself)
# --------------------------------------------------------------------------------------------------

_MIB = 1 << 20


def _demo_alloc(mb: int, setup_mb: int = 0) -> Callable[[], None]:
    """Workload: set-up holds ``setup_mb`` MiB (not measured); ``run()`` fills ``mb`` MiB, then frees it.

    Memory is allocated in filled 1 MiB chunks (so every page is resident), which also lets a sampling
    thread take the GIL between chunks.
    """
    held = [b"\x01" * _MIB for _ in range(int(setup_mb))]

    def run() -> None:
        chunks = [b"\x02" * _MIB for _ in range(int(mb))]
        del chunks
        _ = len(held)

    return run


def _demo_raise(message: str = "demo failure", exc_type: str = "RuntimeError") -> Callable[[], None]:
    """Workload whose ``run()`` raises ``exc_type(message)`` (a builtin exception name)."""
    import builtins

    exc_cls = getattr(builtins, exc_type)

    def run() -> None:
        raise exc_cls(message)

    return run
