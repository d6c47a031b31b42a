"""The real service: ``python -m sidetune.serve`` in a subprocess on a free port, called over HTTP from several
client threads; every answer checked against each adapter's model alone; bad input answered with a clear error
while the service keeps serving; a clean shutdown."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from sidetune.serve import decode_mask

from conftest import REPO
from serve_adapters import ADAPTERS, build_adapter, sample_images, single_outputs

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'sidetune[serve]'")
pytest.importorskip("uvicorn", reason="the service needs the serve extra: pip install 'sidetune[serve]'")
pytest.importorskip("multipart", reason="the service needs the serve extra: pip install 'sidetune[serve]'")

pytestmark = pytest.mark.slow  # one server process for the module: a few seconds to start

TASKS = {"cls": "cls-losa", "cls2": "cls-e3va", "seg": "seg", "det": "det"}
THRESHOLD = 0.3
UPLOAD_LIMIT_MB = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.predict_requests = 0
        self._lock = threading.Lock()

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        if path.startswith("/predict"):
            with self._lock:
                self.predict_requests += 1
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def predict(self, image: bytes, query: str = "") -> tuple[int, dict]:
        return self.request(f"/predict{query}", image, {"Content-Type": "image/png"})


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _multipart(field: str, data: bytes, filename: str | None = "image.png") -> tuple[bytes, dict]:
    """A multipart/form-data body with one part: a file (as curl -F field=@file sends it) or a text field."""
    boundary = uuid.uuid4().hex
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    body = (
        (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    return {task: build_adapter(root / name, *ADAPTERS[name], seed=i) for i, (task, name) in enumerate(TASKS.items())}


@pytest.fixture(scope="module")
def service(adapters, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "sidetune.serve",
        *(f"{task}={path}" for task, path in adapters.items()),
        "--port",
        str(port),
        "--max-batch",
        "4",
        "--max-wait-ms",
        "50",
        "--max-upload-mb",
        str(UPLOAD_LIMIT_MB),
        "--score-threshold",
        str(THRESHOLD),
        "--threads",
        "1",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    service = Service(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the service exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if service.request("/health")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the service did not become healthy in 120 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield service
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def references(adapters):
    """Each adapter's model alone on the four test images (three at the model's size, one wide)."""
    images = sample_images()[:4]
    return images, {task: single_outputs(path, images) for task, path in adapters.items()}


def _check(task: str, got: dict, ref, classes_prefix: str) -> None:
    """A served result against the model-alone output. Concurrent requests are batched in varying compositions,
    which may move a float's last bits, so scores are compared to 1e-4 and a label may differ only where the
    model alone is within 1e-4 of a tie."""
    if task.startswith("cls"):
        probs = ref.softmax(-1)
        top = probs.topk(len(got["top_k"]))
        assert [t["score"] for t in got["top_k"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        for t, k in zip(got["top_k"], top.indices.tolist(), strict=True):
            assert t["label"] == f"{classes_prefix}{k}" or abs(t["score"] - float(probs[k])) < 1e-4
    elif task == "seg":
        labels = decode_mask(got)
        expected = ref.argmax(0).numpy()
        differ = labels != expected
        if differ.any():
            top2 = ref.topk(2, dim=0).values
            gap = (top2[0] - top2[1]).numpy()
            assert (gap[differ] < 1e-4).all(), "a label differs where the model alone is not near a tie"
    else:
        rows = zip(ref["boxes"].tolist(), ref["labels"].tolist(), ref["scores"].tolist(), strict=True)
        want = [(int(label), box, float(score)) for box, label, score in rows if score >= THRESHOLD + 1e-4]
        have = [(d["class_id"], d["box"], d["score"]) for d in got["detections"]]
        assert len(have) >= len(want)
        assert all(score >= THRESHOLD for _, _, score in have)
        for label, box, score in want:  # each expected detection is served, to float precision
            assert any(
                lab == label and abs(s - score) < 1e-4 and np.allclose(b, box, atol=1e-3) for lab, b, s in have
            ), (label, box, score)


def _health_and_tasks(service) -> None:
    status, health = service.request("/health")
    assert status == 200 and health["status"] == "ok" and health["tasks"] == list(TASKS)
    status, tasks = service.request("/tasks")
    assert status == 200
    by_name = {t["name"]: t for t in tasks["tasks"]}
    assert list(by_name) == list(TASKS)
    assert by_name["seg"]["task"] == "segmentation" and by_name["seg"]["classes"] == ["seg0", "seg1", "seg2"]
    assert by_name["det"]["classes"] == ["det0", "det1"]
    assert tasks["backbone"]["name"] == "test_vit" and tasks["backbone"]["img_size"] == [64, 64]


def _concurrent_clients_get_the_single_model_answers(service, references) -> None:
    images, refs = references
    uploads = [_png(im) for im in images]
    prefixes = {"cls": "cla", "cls2": "cla", "seg": "seg", "det": "det"}
    queries = ["", "?tasks=cls,seg", "?tasks=det&tasks=cls2", ""]
    answers: list[tuple[int, int, str, dict]] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        for n in range(6):
            i = (worker + n) % len(uploads)
            query = queries[(worker * 7 + n) % len(queries)]
            if n % 3 == 2:  # multipart, as curl -F file=@image.png sends it
                body, headers = _multipart("file", uploads[i])
                status, answer = service.request(f"/predict{query}", body, headers)
            else:
                status, answer = service.predict(uploads[i], query)
            with lock:
                answers.append((i, status, query, answer))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(answers) == 36
    for i, status, query, answer in answers:
        assert status == 200, answer
        expected = {"": set(TASKS), "?tasks=cls,seg": {"cls", "seg"}, "?tasks=det&tasks=cls2": {"det", "cls2"}}[query]
        assert set(answer["tasks"]) == expected
        assert answer["image"] == {"width": images[i].width, "height": images[i].height}
        for task, result in answer["tasks"].items():
            _check(task, result, refs[task][i], prefixes[task])
    status, metrics = service.request("/metrics")
    histogram = {int(k): v for k, v in metrics["batches"]["histogram"].items()}
    assert max(histogram) > 1, histogram  # concurrent requests were batched into one backbone forward
    assert max(histogram) <= 4  # --max-batch
    assert metrics["latency_ms"]["p50"] is not None and metrics["latency_ms"]["p99"] >= metrics["latency_ms"]["p50"]


def _bad_input_gets_a_clear_error_and_the_service_keeps_serving(service, references) -> None:
    images, refs = references
    good = _png(images[0])

    def still_serving() -> None:
        status, answer = service.predict(good, "?tasks=cls")
        assert status == 200
        _check("cls", answer["tasks"]["cls"], refs["cls"][0], "cla")

    _, before = service.request("/metrics")
    cases = [
        (service.predict(b"this is not an image"), 400, "not an image format Pillow recognises"),
        (service.predict(good[: len(good) // 2]), 400, "corrupt or truncated image"),
        (service.predict(b"\x89PNG" + os.urandom(80_000)), 413, f"limit of {UPLOAD_LIMIT_MB:g} MiB"),
        (service.predict(good, "?tasks=cls,nope"), 404, "unknown task(s) 'nope'; loaded tasks: cls, cls2, seg, det"),
        (service.request("/predict", *_multipart("note", b"hello", filename=None)), 400, "no image in the form"),
        (service.predict(b""), 400, "empty request"),
        (service.predict(good, "?top_k=0"), 400, "top_k must be a positive integer"),
        (service.predict(good, "?mask_format=jpeg"), 400, "mask_format must be one of"),
    ]
    for (status, answer), expected_status, message in cases:
        assert status == expected_status, answer
        assert isinstance(answer["detail"], str) and answer["detail"]
        if message:
            assert message in answer["detail"]
        still_serving()
    _, after = service.request("/metrics")
    assert after["errors"]["client"] - before["errors"]["client"] == len(cases)
    assert after["errors"]["server"] == 0


def _shutdown_is_clean_and_every_request_was_logged(service) -> None:
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(60) == 0
    log = service.log.read_text()
    assert "shut down on SIGTERM" in log and "stopped after" in log and "Traceback" not in log
    predict_lines = [ln for ln in log.splitlines() if " POST /predict " in ln]
    assert len(predict_lines) == service.predict_requests  # one line per request, errors included
    served = [ln for ln in predict_lines if " POST /predict 200 " in ln]
    assert served and all(" ms tasks=" in ln and " batch=" in ln for ln in served)


def test_the_service_end_to_end(service, references) -> None:
    """One server process for every check (its start costs seconds), in order, ending with its shutdown."""
    _health_and_tasks(service)
    _concurrent_clients_get_the_single_model_answers(service, references)
    _bad_input_gets_a_clear_error_and_the_service_keeps_serving(service, references)
    _shutdown_is_clean_and_every_request_was_logged(service)
