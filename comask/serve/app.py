"""`comask serve`: an HTTP inference service (FastAPI + uvicorn) with a web page.

Endpoints: `POST /predict` (image -> COCO-style instances with RLE masks), `GET /health`,
`GET /metadata`, `GET /` (the page in `static/`).

The model is loaded once, before the server accepts connections. All inference runs on one
worker thread: PyTorch already uses every core for a single image, so running requests side by
side would only thrash the CPU and multiply peak memory. Requests wait in a bounded queue; when
it is full the server answers 503 at once instead of piling up work it cannot finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import comask

log = logging.getLogger("comask.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"

# Formats PIL decodes that a browser can also display, so the page can draw what was sent.
ALLOWED_TYPES = {
    "image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "image/gif", "image/tiff",
    "image/x-ms-bmp",
}
# Browsers and curl label files they do not recognise this way; the decoder then decides.
SNIFFED_TYPES = {"application/octet-stream", ""}


class ServePredictor(Protocol):
    """What the service needs from a model: `comask.engine.predict.Predictor` satisfies it."""

    classes: list[str]

    def __call__(self, image: np.ndarray) -> dict[str, Any]: ...


@dataclass
class ServeSettings:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000       # ~ 8000 x 5000; a decoded RGB image of this size is 120 MB
    max_side: int = 10_000
    max_queue: int = 64                # requests waiting for the model before 503
    max_batch: int = 4                 # images the worker may run through the model in one call
    # pixels of decoded images held at once (decoding, queued, in the model, encoding); more wait. With
    # about 40 MB per megapixel in flight this bounds the server's memory (docs/SERVING.md, "Memory").
    max_pixels_in_flight: int = 40_000_000
    default_score_thr: float = 0.5
    default_max_det: int = 100
    max_det_limit: int = 1000


@dataclass
class ModelInfo:
    """Facts about the loaded model shown by /metadata."""

    config_name: str | None = None
    model_type: str | None = None
    input_size: dict[str, Any] = field(default_factory=dict)
    category_ids: list[int] | None = None
    weights: str | None = None
    device: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


SECURITY_HEADERS = [
    # The page loads nothing from elsewhere; say so, so that a browser enforces it.
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
     b"script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
]


class GuardMiddleware:
    """Refuse request bodies over `limit` bytes with 413 before they are read into memory, and add
    the security headers to every response.

    The Content-Length header is checked up front; bodies without one (chunked uploads) are
    counted as they stream in, so a client cannot get past the limit by omitting the header.
    When the count runs over, the app is told the client disconnected and whatever it answers
    is replaced by the 413. (Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps
    `receive` in ways that would hide the disconnect.)
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = 0
                if size > self.limit:
                    await self._reject(send)
                    return
        seen = 0
        too_large = False
        started = False

        async def counted_receive() -> Message:
            nonlocal seen, too_large
            if too_large:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if too_large:
                return
            if msg["type"] == "http.response.start":
                started = True
                msg = dict(msg)
                msg["headers"] = list(msg.get("headers", [])) + SECURITY_HEADERS
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"error": f"upload too large: the limit is {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *SECURITY_HEADERS,
        ]})
        await send({"type": "http.response.body", "body": body})


class PixelBudget:
    """At most `limit` pixels of decoded images in the server at once; requests over it wait their turn.

    Each request holds its image's pixel count from before decoding until its answer is encoded, so
    the memory of images waiting in the queue is bounded too, not only of those in the model. One image
    alone is always let through (the upload limits bound its size).
    """

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.used = 0
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._cond is None or self._loop is not loop:  # a new event loop (a restarted app): start afresh
            self._cond, self._loop, self.used = asyncio.Condition(), loop, 0
        return self._cond

    async def acquire(self, pixels: int) -> int:
        n = max(0, min(int(pixels), self.limit))
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        return n

    async def release(self, n: int) -> None:
        cond = self._condition()
        async with cond:
            self.used = max(0, self.used - n)
            cond.notify_all()


def header_pixels(data: bytes) -> int:
    """width x height from the image header alone (0 when unreadable: decoding then gives the 400)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # any header PIL cannot read; decode_image reports it properly
        return 0
    return int(w) * int(h)


def decode_image(data: bytes, settings: ServeSettings) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB through the data layer's reader (EXIF orientation applied, as browsers
    display it; sizes checked from the header before decoding), its errors as 400/413 answers."""
    from comask.data.images import ImageFileError, read_image_bytes

    try:
        return read_image_bytes(data, settings.max_pixels, max_side=settings.max_side, name="upload")
    except ImageFileError as e:
        if e.kind == "image_too_large":
            size = f"{e.size[0]}x{e.size[1]} pixels" if e.size else "too large"
            raise ApiError(413, f"image is {size}: the limit is {settings.max_pixels} pixels and "
                                f"{settings.max_side} per side; resize it first") from None
        raise ApiError(400, _UPLOAD_ERRORS.get(e.kind, _UPLOAD_ERRORS["corrupt_image"])) from None


_UPLOAD_ERRORS = {
    "empty_file": "empty upload: send an image file in the 'file' form field",
    "not_an_image": "could not decode the upload as an image (PNG, JPEG, WebP, BMP, GIF, TIFF)",
    "corrupt_image": "the image file is truncated or corrupt and could not be decoded",
}


def instances_to_json(inst: dict[str, Any], score_thr: float, max_det: int) -> list[dict[str, Any]]:
    """Instances (numpy) -> COCO results rows (without image_id; with `id`, `label`, `class_name`
    and the mask `area`), best score first."""
    # Imported here: it pulls in torch, and `comask serve` should reject a bad path before that.
    from comask.engine.results import coco_rows

    scores = np.asarray(inst["scores"], dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= score_thr][:max_det]
    if order.size == 0:
        return []
    boxes = np.asarray(inst["boxes"], dtype=np.float64).reshape(-1, 4)[order]
    labels = np.asarray(inst["labels"]).reshape(-1)[order]
    cat_ids = np.asarray(inst.get("category_ids", inst["labels"])).reshape(-1)[order]
    masks = np.asarray(inst["masks"])[order].astype(bool)
    fields = {"id": range(order.size), "label": [int(v) for v in labels],
              "class_name": [str(inst["class_names"][i]) for i in order]}
    return coco_rows(boxes, scores[order], cat_ids, masks, fields=fields, with_area=True)


class InferenceWorker:
    """One thread runs the model; requests wait in a bounded queue and are micro-batched.

    Whatever has queued up while the model was busy (up to `max_batch` images) goes through the
    model in one call when the predictor offers `predict_batch`; an idle server therefore answers a
    lone request at once, and a busy one amortises the per-call overhead.
    """

    def __init__(self, predictor: ServePredictor, max_queue: int, max_batch: int = 4):
        self.predictor = predictor
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch) if hasattr(predictor, "predict_batch") else 1
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self.served = 0
        self.failed = 0
        self.batches = 0
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="comask-infer", daemon=True)
                self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, image: np.ndarray, score_thr: float = 0.0,
                  max_det: int | None = None) -> tuple[dict[str, Any], float, int]:
        """-> (instances, model milliseconds, batch size it ran in). A predictor that `trims_before_paste`
        drops detections below `score_thr` / beyond `max_det` before pasting their masks (bounded memory)."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise ApiError(503, "server busy: too many requests are waiting; retry shortly",
                               headers={"Retry-After": "1"})
            self._pending += 1
        self._start()  # after a shutdown/startup cycle of the same app (tests do that)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._queue.put((image, fut, loop, score_thr, max_det))
        try:
            return await fut
        finally:
            with self._lock:
                self._pending -= 1

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # keep the stop signal for after this batch
                    break
                batch.append(nxt)
            # A client that went away (cancelled future) does not need its image run.
            batch = [b for b in batch if not b[1].cancelled()]
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list) -> None:
        t0 = time.perf_counter()
        # one model call for the batch: the loosest request's trim (each request is trimmed again after)
        trim: dict[str, Any] = {}
        if getattr(self.predictor, "trims_before_paste", False):
            caps = [b[4] for b in batch]
            trim = {"score_thr": min(b[3] for b in batch), "max_det": None if None in caps else max(caps)}
        try:
            if len(batch) == 1:
                outs = [self.predictor(batch[0][0], **trim)]
            else:
                outs = self.predictor.predict_batch([b[0] for b in batch], **trim)  # type: ignore[attr-defined]
        except Exception as exc:
            if len(batch) > 1:
                # Run them one by one, so that one bad request cannot fail the others.
                for b in batch:
                    self._run_batch([b])
                return
            self.failed += 1
            self._resolve(batch[0], exc=exc)
            return
        ms = (time.perf_counter() - t0) * 1000.0
        self.batches += 1
        self.served += len(batch)
        for b, out in zip(batch, outs):
            self._resolve(b, result=(out, ms, len(batch)))

    @staticmethod
    def _resolve(item: tuple, result: Any = None, exc: BaseException | None = None) -> None:
        fut, loop = item[1], item[2]

        def _set() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        try:
            loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the event loop has closed (server shutting down)
            pass

    def close(self) -> None:
        if self.alive:
            self._queue.put(None)
            self._thread.join(timeout=10)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(predictor: ServePredictor, info: ModelInfo | None = None,
               settings: ServeSettings | None = None) -> FastAPI:
    """Build the ASGI app around an already loaded predictor (tests inject their own)."""
    settings = settings or ServeSettings()
    info = info or ModelInfo()
    worker = InferenceWorker(predictor, settings.max_queue, settings.max_batch)
    budget = PixelBudget(settings.max_pixels_in_flight)
    started = time.time()

    # No /docs: Swagger UI comes from a CDN, which the page's policy (and offline machines) forbid;
    # the schema itself is at /openapi.json.
    app = FastAPI(title="CoMask inference", version=comask.__version__, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.settings = settings
    app.router.on_shutdown.append(worker.close)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log under an id the client can quote; the client
        # never sees it.
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return _error(500, f"internal server error (reference {ref})")

    @app.get("/health")
    async def health() -> JSONResponse:
        # 503 when the inference thread is gone, so a load balancer takes this instance out.
        body = {
            "status": "ok" if worker.alive else "degraded", "model_loaded": True, "worker_alive": worker.alive,
            "queue": worker.pending, "served": worker.served, "failed": worker.failed,
            "batches": worker.batches, "pixels_in_flight": budget.used,
            "uptime_s": round(time.time() - started, 1),
        }
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        classes = list(getattr(predictor, "classes", []))
        return {
            "version": comask.__version__,
            "classes": classes,
            "num_classes": len(classes),
            "category_ids": info.category_ids,
            "config": info.config_name,
            "model_type": info.model_type,
            "input_size": info.input_size,
            "weights": Path(info.weights).name if info.weights else None,
            "device": info.device,
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
                       "max_side": settings.max_side, "max_det": settings.max_det_limit},
            "defaults": {"score_thr": settings.default_score_thr, "max_det": settings.default_max_det},
        }

    @app.post("/predict")
    async def predict(
        request: Request,
        score_thr: float | None = Query(None, ge=0.0, le=1.0, description="drop instances below this score"),
        max_det: int | None = Query(None, ge=1, description="keep at most this many instances"),
    ) -> dict[str, Any]:
        thr = settings.default_score_thr if score_thr is None else score_thr
        k = min(settings.default_max_det if max_det is None else max_det, settings.max_det_limit)
        data = await _read_upload(request)
        t0 = time.perf_counter()
        # Decoding and RLE encoding take a thread-pool thread, so they overlap with the model's
        # work and never stall the event loop (a 40-megapixel decode takes a while).
        held = await budget.acquire(min(header_pixels(data), settings.max_pixels))
        try:
            image = await run_in_threadpool(decode_image, data, settings)
            inst, infer_ms, batch_size = await worker.run(image, thr, k)
            rows = await run_in_threadpool(instances_to_json, inst, thr, k)
            height, width = int(image.shape[0]), int(image.shape[1])
            del image, inst  # the pixels leave with the budget they held
        finally:
            await budget.release(held)
        return {
            "instances": rows,
            "image": {"width": width, "height": height},
            "time_ms": round((time.perf_counter() - t0) * 1000.0, 2),
            "inference_ms": round(infer_ms, 2),
            "batch_size": batch_size,
            "score_thr": thr,
            "max_det": k,
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_middleware(GuardMiddleware, limit=settings.max_upload_bytes)
    return app


async def _read_upload(request: Request) -> bytes:
    """The image bytes from a multipart form (field `file`) or a raw image/* body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception:
            raise ApiError(400, "could not parse the multipart form") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing form field 'file' with the image")
        part_type = (upload.content_type or "").split(";")[0].strip().lower()
        if part_type not in ALLOWED_TYPES and part_type not in SNIFFED_TYPES:
            raise ApiError(415, f"unsupported file type '{part_type}': send PNG, JPEG, WebP, BMP, GIF or TIFF")
        try:
            return await upload.read()
        finally:
            await upload.close()
    if ctype in ALLOWED_TYPES or ctype == "application/octet-stream":
        return await request.body()
    raise ApiError(415, f"unsupported content type '{ctype or 'none'}': send multipart/form-data with a "
                        "'file' field, or the raw image with an image/* content type")


def load_predictor(weights: str | Path, device: str = "auto",
                   opts: list[str] | None = None) -> tuple[ServePredictor, ModelInfo]:
    """Load the checkpoint once; scores are filtered per request, so the model keeps all of them."""
    from comask.errors import CheckpointError

    if not Path(weights).is_file():
        raise CheckpointError(f"{weights}: checkpoint not found; pass --weights PATH to a .pth written by `comask train`")
    from comask.engine.predict import Predictor

    predictor = Predictor(weights, device=device, score_thr=0.0, opts=opts)
    cfg = getattr(predictor, "cfg", None) or getattr(predictor, "config", None)
    info = ModelInfo(weights=str(weights), device=str(getattr(predictor, "device", device)))
    if cfg is not None:
        info.config_name = cfg.get("name")
        model = cfg.get("model", {})
        info.model_type = model.get("type")
        inp = cfg.get("input", {})
        info.input_size = {"min_size_test": inp.get("min_size_test"), "max_size_test": inp.get("max_size_test")}
    cat_ids = getattr(predictor, "cat_ids", None)
    if cat_ids is not None:
        info.category_ids = [int(c) for c in cat_ids]
    return predictor, info


def serve(weights: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          settings: ServeSettings | None = None, opts: list[str] | None = None) -> None:
    """Load the model, then serve until interrupted (the `comask serve` command)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    predictor, info = load_predictor(weights, device, opts)
    log.info("loaded %s (%s, %d classes) on %s", weights, info.config_name, len(predictor.classes), info.device)
    app = create_app(predictor, info, settings)
    # One process: the model lives in memory once; the worker thread serialises inference.
    uvicorn.run(app, host=host, port=port, log_level="info", workers=1, timeout_graceful_shutdown=5)
