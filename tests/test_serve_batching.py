"""The service's dynamic batcher, its counters and the serve command's arguments (no model, no server)."""

from __future__ import annotations

import argparse
import threading
import time

import pytest

from sidetune.errors import ConfigError
from sidetune.serve.batching import BatcherClosedError, DynamicBatcher, QueueFullError, ServiceMetrics
from sidetune.serve.commands import parse_adapters, register


class Recorder:
    """A run_batch that records each batch, optionally slow, failing for items named 'bad'."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.delay = delay

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        time.sleep(self.delay)
        if "bad" in items:
            raise ValueError("bad item")
        return [f"done {x}" for x in items]


def test_concurrent_requests_share_batches_of_at_most_max_batch() -> None:
    run = Recorder(delay=0.05)
    batcher = DynamicBatcher(run, max_batch=4, max_wait_ms=200).start()
    results: dict[int, str] = {}

    def client(i: int) -> None:
        results[i] = batcher.submit(i).result(timeout=10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop()
    assert results == {i: f"done {i}" for i in range(10)}  # each caller gets its own item's result
    sizes = [len(b) for b in run.batches]
    assert sum(sizes) == 10 and max(sizes) <= 4
    assert max(sizes) > 1  # requests that arrive together share a batch


def test_a_lone_request_waits_at_most_max_wait() -> None:
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch=8, max_wait_ms=30).start()
    start = time.perf_counter()
    assert batcher.submit("x").result(timeout=10) == "done x"
    elapsed = time.perf_counter() - start
    batcher.stop()
    assert run.batches == [["x"]]
    assert 0.025 <= elapsed < 2.0


def test_a_failing_request_does_not_fail_the_others_in_its_batch() -> None:
    run = Recorder(delay=0.02)
    sizes: list[int] = []
    batcher = DynamicBatcher(run, max_batch=3, max_wait_ms=300, on_batch=sizes.append)
    futures = [batcher.submit(x) for x in ("a", "bad", "c")]  # queued before the worker starts: one batch
    batcher.start()
    assert futures[0].result(timeout=10) == "done a"
    assert futures[2].result(timeout=10) == "done c"
    with pytest.raises(ValueError, match="bad item"):
        futures[1].result(timeout=10)
    batcher.stop()
    assert run.batches[0] == ["a", "bad", "c"]  # tried together, then one by one
    assert run.batches[1:] == [["a"], ["bad"], ["c"]]
    assert sizes == [1, 1, 1]


def test_stop_runs_what_is_queued_then_refuses_new_requests() -> None:
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch=2, max_wait_ms=0)
    futures = [batcher.submit(i) for i in range(5)]
    batcher.start()
    batcher.stop()
    assert [f.result(timeout=10) for f in futures] == [f"done {i}" for i in range(5)]
    with pytest.raises(BatcherClosedError, match="shutting down"):
        batcher.submit(9)


def test_a_full_queue_is_refused() -> None:
    batcher = DynamicBatcher(Recorder(), max_batch=1, max_queue=2)
    batcher.submit(1)
    batcher.submit(2)
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        batcher.submit(3)
    batcher.start()
    batcher.stop()


@pytest.mark.parametrize(
    ("option", "value"), [("max_batch", 0), ("max_batch", 2.5), ("max_wait_ms", -1), ("max_queue", 0)]
)
def test_bad_batcher_options(option: str, value) -> None:
    with pytest.raises(ConfigError, match=option):
        DynamicBatcher(Recorder(), **{option: value})


def test_metrics_count_statuses_batches_and_latency_percentiles() -> None:
    metrics = ServiceMetrics()
    for ms in range(1, 101):  # 1..100 ms
        metrics.record_request("/predict", 200, float(ms))
    metrics.record_request("/predict", 400, 5000.0)  # errors are counted, not timed
    metrics.record_request("/predict", 413, 1.0)
    metrics.record_request("/health", 200, 1000.0)
    metrics.record_request("/predict", 500, 1.0)
    for size in (1, 4, 4, 8):
        metrics.record_batch(size)
    snap = metrics.snapshot(queue=0)
    assert snap["requests"] == 104
    assert snap["errors"] == {"client": 2, "server": 1, "total": 3}
    assert snap["by_status"] == {"200": 101, "400": 1, "413": 1, "500": 1}
    assert snap["predictions"] == 100
    assert snap["latency_ms"] == {"window": 100, "p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert snap["batches"] == {"count": 4, "mean_size": 4.25, "histogram": {"1": 1, "4": 2, "8": 1}}
    assert snap["queue"] == 0


def test_adapter_arguments_name_tasks(tmp_path) -> None:
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_adapters(["runs/x/best", "y"]) == ["runs/x/best", "y"]
    assert parse_adapters(["cls=runs/x/best", "runs/seg/best"]) == {"cls": "runs/x/best", "seg": "runs/seg/best"}
    assert parse_adapters([str(odd)]) == [str(odd)]  # an existing path is a folder, '=' or not
    with pytest.raises(ConfigError, match=r"two adapters have the task name 'cls' .* give each its own NAME=DIR"):
        parse_adapters(["cls=runs/x/best", "cls=runs/y/best"])
    with pytest.raises(ConfigError, match=r"the task name 'x'"):
        parse_adapters(["x=runs/a/best", "runs/x/best"])  # the bare folder's default name is its run's


def test_serve_registers_its_arguments() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "a", "seg=b", "--port", "9001", "--max-batch", "4", "--max-upload-mb", "2"])
    assert args.adapters == ["a", "seg=b"] and args.port == 9001 and args.max_batch == 4
    assert args.max_wait_ms == 10.0 and args.max_upload_mb == 2.0 and args.host == "127.0.0.1"
    assert args.func.__name__ == "run_serve"


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_is_refused_when_the_arguments_are_parsed(port: str, capsys) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "a", "--port", port])
    assert "must be a port number 0-65535" in capsys.readouterr().err


def test_serve_command_reports_a_bad_adapter_in_one_line(tmp_path, capsys) -> None:
    from sidetune.serve.commands import main

    assert main([str(tmp_path / "missing"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "sidetune serve: error:" in err and "is not an adapter directory" in err and "Traceback" not in err
