"""The HTTP service: every loaded task on one uploaded image, one backbone forward per batch of requests.

FastAPI on uvicorn (see ``docs/serving.md`` for why this stack). Endpoints:

* ``GET /health``: ``{"status": "ok", ...}`` once the tasks are loaded and warmed up.
* ``GET /tasks``: the backbone and every task with its kind, method, classes and preprocessing.
* ``POST /predict``: an image (multipart field ``file``, or the raw body with an ``image/*`` content type) ->
  ``{"tasks": {name: result}, "image": {"width", "height"}, "batch_size": n}`` with each result as
  :func:`sidetune.serve.results.task_result` makes it. Query parameters: ``tasks`` (comma-separated names,
  default all), ``top_k``, ``score_threshold``, ``mask_format`` (``png`` or ``rle``).
* ``GET /metrics``: requests, errors, batch-size histogram, latency percentiles (:class:`ServiceMetrics`).

Errors are JSON ``{"detail": message}``: 400 for an upload that is not a decodable image or a bad parameter,
404 for an unknown task name, 413 for an upload over ``max_upload_mb`` (or an image of more pixels than
Pillow's decompression-bomb limit), 503 while shutting down or when ``max_queue`` requests already wait, 500
for a failure of the model. None of them stops the service.

Each request is logged on one line (method, path, status, latency, tasks and batch size) by the
``sidetune.serve.app`` logger; the CLI prints it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ..errors import ConfigError, SidetuneError
from .batching import BatcherClosedError, DynamicBatcher, QueueFullError, ServiceMetrics
from .multitask import MultiTask
from .results import check_result_options, task_result

logger = logging.getLogger(__name__)

__all__ = ["ServeConfig", "create_app"]

_MB = 1024 * 1024
#: An oversized upload is read (and dropped) up to this many bytes past the limit before the 413 goes out, so
#: that a client still sending its body reads the answer instead of a reset connection; past it we hang up.
_DRAIN_BYTES = 64 * _MB


@dataclass
class ServeConfig:
    """Options of the service.

    Attributes:
        max_batch: most requests per backbone forward.
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_upload_mb: largest request body accepted (MiB); larger gets 413.
        max_queue: most requests waiting for a batch; more get 503.
        top_k: default number of classification labels per task.
        score_threshold: default lowest detection score returned.
        mask_format: default segmentation mask format, ``png`` or ``rle``.
        warmup: run one blank image through every task before reporting healthy (the first forward is slow).
    """

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_upload_mb: float = 10.0
    max_queue: int = 256
    top_k: int = 5
    score_threshold: float = 0.5
    mask_format: str = "png"
    warmup: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_upload_mb, bool) or not isinstance(self.max_upload_mb, int | float):
            raise ConfigError(f"max_upload_mb must be a positive number, got {self.max_upload_mb!r}.")
        if self.max_upload_mb <= 0:
            raise ConfigError(f"max_upload_mb must be a positive number, got {self.max_upload_mb!r}.")
        check_result_options(self.top_k, self.score_threshold, self.mask_format)
        # max_batch, max_wait_ms and max_queue are checked by DynamicBatcher

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * _MB)


@dataclass
class _Item:
    image: Image.Image
    tasks: list[str]
    top_k: int
    score_threshold: float
    mask_format: str


def _decode(data: bytes) -> Image.Image:
    """Decode an upload fully, as RGB; HTTP errors for what is not an image."""
    from ..data.classification import to_rgb

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise HTTPException(413, f"image too large to decode: {err}") from None
    except Image.UnidentifiedImageError:
        raise HTTPException(
            400,
            f"the upload ({len(data)} bytes) is not an image format Pillow recognises; send a JPEG, PNG, BMP, "
            "TIFF or WebP file.",
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt image data
        raise HTTPException(400, f"the upload is a corrupt or truncated image: {err}.") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond)."""
    too_large = HTTPException(
        413,
        f"the upload exceeds the limit of {limit / _MB:.4g} MiB; resize the image, or start the service with a "
        "larger --max-upload-mb.",
    )
    length = request.headers.get("content-length")
    declared = None
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise HTTPException(400, f"invalid Content-Length {length!r}.") from None
    over = declared is not None and declared > limit
    received, chunks = 0, []
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if over:  # drop the rest, reading it so that the client gets to read the 413
                if received > limit + _DRAIN_BYTES:
                    break
                continue
            chunks.append(chunk)
            if received > limit:
                over = True
                chunks.clear()
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before the upload was complete.") from None
    if over:
        raise too_large
    return b"".join(chunks)


async def _image_bytes(request: Request, limit: int) -> bytes:
    """The uploaded image's bytes: the multipart field ``file`` (or the one file sent), or the raw body."""
    body = await _read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        sent = False

        async def receive() -> dict[str, Any]:  # replay the body we already read to Starlette's form parser
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive).form(max_files=8, max_fields=32, max_part_size=limit)
        except Exception as err:  # python-multipart's parse errors
            raise HTTPException(400, f"could not parse the multipart upload: {err}") from None
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            upload = form.get("file") if isinstance(form.get("file"), UploadFile) else None
            if upload is None and len(files) == 1:
                upload = files[0]
            if upload is None:
                raise HTTPException(
                    400, "no image in the form: send it as the multipart field 'file' (curl -F file=@image.jpg)."
                )
            return await upload.read()
        finally:
            await form.close()
    if not body:
        raise HTTPException(
            400,
            "empty request: send an image as the multipart field 'file' (curl -F file=@image.jpg) or as the "
            "raw body (curl --data-binary @image.jpg -H 'Content-Type: image/jpeg').",
        )
    return body


def _task_names(request: Request, multitask: MultiTask) -> list[str]:
    raw = request.query_params.getlist("tasks")
    if not raw:
        return list(multitask.tasks)
    names = [n.strip() for value in raw for n in value.split(",") if n.strip()]
    if not names:
        raise HTTPException(400, "the tasks parameter is empty; omit it to run every task.")
    unknown = [n for n in names if n not in multitask.tasks]
    if unknown:
        raise HTTPException(
            404, f"unknown task(s) {', '.join(map(repr, unknown))}; loaded tasks: {', '.join(multitask.tasks)}."
        )
    return multitask.select(names)


def _options(request: Request, config: ServeConfig) -> tuple[int, float, str]:
    params = request.query_params
    try:
        top_k = int(params.get("top_k", config.top_k))
        threshold = float(params.get("score_threshold", config.score_threshold))
    except ValueError as err:
        raise HTTPException(400, f"bad query parameter: {err}.") from None
    mask_format = params.get("mask_format", config.mask_format)
    try:
        check_result_options(top_k, threshold, mask_format)
    except ConfigError as err:
        raise HTTPException(400, str(err)) from None
    return top_k, threshold, mask_format


def create_app(multitask: MultiTask, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``multitask``; its lifespan starts and stops the batcher.

    Args:
        multitask: the loaded tasks.
        config: service options (default :class:`ServeConfig`).
    """
    config = config or ServeConfig()
    metrics = ServiceMetrics()

    def run_batch(items: list[_Item]) -> list[tuple[dict[str, Any], int]]:
        names = multitask.select(sorted({n for item in items for n in item.tasks}))
        outputs = multitask([item.image for item in items], names)
        results = []
        for i, item in enumerate(items):
            result = {}
            for name in item.tasks:
                info = multitask.tasks[name]
                result[name] = task_result(
                    info.task,
                    outputs[name][i],
                    info.classes,
                    top_k=item.top_k,
                    score_threshold=item.score_threshold,
                    mask_format=item.mask_format,
                )
            results.append((result, len(items)))
        return results

    batcher = DynamicBatcher(
        run_batch,
        max_batch=config.max_batch,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        on_batch=metrics.record_batch,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.warmup:
            blank = Image.new("RGB", multitask.img_size[::-1], (128, 128, 128))
            item = _Item(blank, list(multitask.tasks), config.top_k, config.score_threshold, config.mask_format)
            start = time.perf_counter()
            await anyio.to_thread.run_sync(run_batch, [item])
            logger.info("warm-up forward of %d task(s): %.0f ms", len(multitask.tasks), _ms(start))
        batcher.start()
        logger.info(
            "serving %d task(s) on %s (%s): %s; max_batch=%d max_wait_ms=%g",
            len(multitask.tasks),
            multitask.backbone.name,
            multitask.device,
            ", ".join(f"{n} ({t.task})" for n, t in multitask.tasks.items()),
            config.max_batch,
            config.max_wait_ms,
        )
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(batcher.stop)
            logger.info("stopped after %d request(s)", metrics.requests)

    app = FastAPI(
        title="sidetune",
        summary="Every task adapter on one frozen backbone, one backbone forward per batch of requests.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.batcher = batcher

    @app.middleware("http")
    async def log_request(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            logger.exception("%s %s failed", request.method, request.url.path)
            response = JSONResponse({"detail": "internal error; see the service log."}, status_code=500)
        latency = _ms(start)
        metrics.record_request(request.url.path, response.status_code, latency)
        note = getattr(request.state, "note", "")
        logger.info("%s %s %d %.1f ms%s", request.method, request.url.path, response.status_code, latency, note)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and readiness: answers once the tasks are loaded (and warmed up)."""
        return {
            "status": "ok",
            "backbone": multitask.backbone.name,
            "tasks": list(multitask.tasks),
            "device": str(multitask.device),
        }

    @app.get("/tasks")
    async def tasks() -> dict[str, Any]:
        """The shared backbone and every loaded task with its classes."""
        return multitask.describe()

    @app.get("/metrics")
    async def metrics_endpoint() -> dict[str, Any]:
        """Counters: requests, errors, batch sizes, latency percentiles of /predict."""
        return metrics.snapshot(queue=batcher.pending, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """Every task (or ``?tasks=a,b``) on one uploaded image."""
        # the body first (bounded): a client still sending it would not read an early error answer
        data = await _image_bytes(request, config.max_upload_bytes)
        names = _task_names(request, multitask)
        top_k, threshold, mask_format = _options(request, config)
        image = await anyio.to_thread.run_sync(_decode, data)
        try:
            future = batcher.submit(_Item(image, names, top_k, threshold, mask_format))
        except (BatcherClosedError, QueueFullError) as err:
            raise HTTPException(503, str(err)) from None
        try:
            result, batch_size = await asyncio.wrap_future(future)
        except BatcherClosedError as err:
            raise HTTPException(503, str(err)) from None
        except SidetuneError as err:
            raise HTTPException(400, str(err)) from None
        except Exception as err:
            logger.exception("inference failed")
            raise HTTPException(500, f"inference failed: {type(err).__name__}: {err}") from None
        request.state.note = f" tasks={','.join(names)} batch={batch_size} image={image.width}x{image.height}"
        return JSONResponse(
            {"tasks": result, "image": {"width": image.width, "height": image.height}, "batch_size": batch_size}
        )

    return app


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
