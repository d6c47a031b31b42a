"""Dynamic batching for the service: requests that arrive together share one backbone forward.

:class:`DynamicBatcher` owns one worker thread. The first request to arrive opens a batch; the worker then
waits at most ``max_wait_ms`` for more, and runs the batch as soon as it holds ``max_batch`` requests or the
wait is over. So a lone request pays at most ``max_wait_ms`` of extra latency, and under load the batches fill
up and the backbone runs on ``max_batch`` images at a time. Inference runs in the worker thread, never on the
event loop, which stays free to accept and decode the next uploads meanwhile.

If a batch fails, each of its requests is retried alone, so one request's failure never fails the others.

:class:`ServiceMetrics` holds the counters the ``/metrics`` endpoint reports.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["BatcherClosedError", "DynamicBatcher", "QueueFullError", "ServiceMetrics"]


class BatcherClosedError(RuntimeError):
    """The batcher is stopped (the service is shutting down)."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the batcher accepts (``max_queue``)."""


@dataclass
class _Job:
    item: Any
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class DynamicBatcher:
    """Collects submitted items into batches and runs ``run_batch`` on them in one worker thread.

    Args:
        run_batch: items -> one result per item, in order (called in the worker thread).
        max_batch: most items per batch.
        max_wait_ms: how long the first item of a batch waits for others.
        max_queue: most items waiting; :meth:`submit` raises :class:`QueueFullError` beyond it.
        on_batch: called with each batch's size after it ran (metrics).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}.")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, int | float) or max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}.")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"max_queue must be a positive integer, got {max_queue!r}.")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="sidetune-batcher", daemon=True)

    def start(self) -> DynamicBatcher:
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize()

    def submit(self, item: Any) -> Future:
        """Queue ``item``; the future gets its result (or its exception) once its batch ran."""
        with self._lock:
            if self._closed:
                raise BatcherClosedError("the service is shutting down.")
            if self._queue.qsize() >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting; retry later.")
            future: Future = Future()
            self._queue.put(_Job(item, future))
        return future

    def stop(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then stop the worker; later submits raise :class:`BatcherClosedError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker ----------------------------------------------------------------------------------------------
    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        batch, stop = [first], False
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                stop = True
                break
            batch.append(job)
        return batch, stop

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            self._run(batch)
        while True:  # anything submitted while stopping (cannot happen once closed, but never leave a future open)
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.future.set_exception(BatcherClosedError("the service is shutting down."))

    def _run(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        # Each batch is counted before its futures are set, so that a caller who got an answer sees its batch in
        # the counters.
        try:
            results = self.run_batch([job.item for job in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
        except Exception as err:
            if len(live) == 1:
                self._count(1)
                live[0].future.set_exception(err)
                return
            logger.warning("a batch of %d failed (%s); running its requests one by one", len(live), err)
            for job in live:
                try:
                    (result,) = self.run_batch([job.item])
                except Exception as single_err:
                    self._count(1)
                    job.future.set_exception(single_err)
                else:
                    self._count(1)
                    job.future.set_result(result)
            return
        self._count(len(live))
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)

    def _count(self, size: int) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(size)
            except Exception:  # metrics must never break serving
                logger.exception("batch metrics callback failed")


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))))
    return float(sorted_values[rank - 1])


class ServiceMetrics:
    """Thread-safe counters of the service: requests, errors, batch sizes and latency percentiles.

    Args:
        window: latency percentiles are over the last ``window`` successful predict requests.
    """

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests = 0
        self.by_status: collections.Counter[int] = collections.Counter()
        self.predictions = 0
        self.batches: collections.Counter[int] = collections.Counter()
        self._latency: collections.deque[float] = collections.deque(maxlen=window)

    def record_request(self, path: str, status: int, latency_ms: float) -> None:
        with self._lock:
            self.requests += 1
            self.by_status[status] += 1
            if path == "/predict" and status == 200:
                self._latency.append(latency_ms)
                self.predictions += 1

    def record_batch(self, size: int) -> None:
        with self._lock:
            self.batches[size] += 1

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        """The counters as JSON: ``requests``, ``errors`` (4xx and 5xx), ``by_status``, ``predictions``,
        ``batches`` (count, mean size, histogram size -> count), ``latency_ms`` (p50/p95/p99/max over the window
        of successful predict requests, from the request's arrival to its answer), ``uptime_s``."""
        with self._lock:
            latency = sorted(self._latency)
            batches = dict(sorted(self.batches.items()))
            count = sum(batches.values())
            errors = {
                "client": sum(n for s, n in self.by_status.items() if 400 <= s < 500),
                "server": sum(n for s, n in self.by_status.items() if s >= 500),
            }
            snapshot = {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": self.requests,
                "errors": {**errors, "total": errors["client"] + errors["server"]},
                "by_status": {str(s): n for s, n in sorted(self.by_status.items())},
                "predictions": self.predictions,
                "batches": {
                    "count": count,
                    "mean_size": round(sum(s * n for s, n in batches.items()) / count, 3) if count else None,
                    "histogram": {str(s): n for s, n in batches.items()},
                },
                "latency_ms": {
                    "window": len(latency),
                    "p50": _percentile(latency, 50),
                    "p95": _percentile(latency, 95),
                    "p99": _percentile(latency, 99),
                    "max": latency[-1] if latency else None,
                },
            }
        snapshot.update(extra)
        return snapshot
