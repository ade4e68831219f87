"""An HTTP API and a web page over a run: ``hierclass serve``.

``POST /predict`` takes the photos of one product (multipart field ``image``, one or more files) and
answers with the ranked leaves (category_id, ``[level1, level2, leaf]`` path, probability), the level-1
distribution, the model and the time taken. ``GET /`` is a page to drop photos on, ``GET /model``
describes the model, ``GET /health`` says the server is up.

The run is loaded and its backbone built (or its ONNX export found) once, when the app is made. Requests
are decoded in parallel threads and their images then go through the backbone in micro-batches: one
worker thread takes every request waiting (and, while others are on their way, those that arrive
within ``batch_wait_ms``) and runs them as one batch, so concurrent clients share backbone passes
instead of queueing for one each. A lone request does not wait.

Uploads stay in memory (the multipart parser's spool is larger than any upload accepted, so nothing is
written to disk) and each request is capped at ``max_upload_mb`` while it is read. Every bad request
gets a 4xx answer ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from hierclass.errors import HierclassError
from hierclass.predictor import NOT_AN_IMAGE

if TYPE_CHECKING:
    import torch

    from hierclass.predictor import ImagePrediction, ImagePredictor
    from hierclass.run import Run

FIELD = "image"
PAGE = "serve_page.html"
MAX_TOPK = 50
VALIDATION_KEYS = (
    "val_acc", "val_loss", "val_source", "holdout_acc", "holdout_loss", "holdout_source",
    "n_train", "n_val", "n_holdout",
)  # fmt: skip


@dataclass(frozen=True)
class ServeConfig:
    """How the server answers.

    Attributes:
        topk: leaves ranked per answer (a request may ask for another number with ``?topk=``).
        max_upload_mb: the largest request accepted, all its images together, in MB.
        max_images: the most images one request (one product) may hold.
        abstain_threshold: below this probability an answer stops at level 2 or 1 (``depth``);
            None: always the leaf (a request may set it with ``?abstain=``).
        batch_wait_ms: how long a batch waits for requests already on their way (never when alone).
        max_batch_images: the most images one backbone pass takes.
    """

    topk: int = 5
    max_upload_mb: float = 10.0
    max_images: int = 16
    abstain_threshold: float | None = None
    batch_wait_ms: float = 5.0
    max_batch_images: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.topk <= MAX_TOPK:
            raise ValueError(f"topk must be in 1..{MAX_TOPK}, got {self.topk}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if self.max_images < 1 or self.max_batch_images < 1:
            raise ValueError("max_images and max_batch_images must be >= 1")
        if self.abstain_threshold is not None and not 0.0 <= self.abstain_threshold <= 1.0:
            raise ValueError(f"abstain_threshold must be in [0, 1], got {self.abstain_threshold}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and one line saying what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------- micro-batching
@dataclass
class _Job:
    images: list[torch.Tensor]
    names: list[str]
    topk: int
    abstain_threshold: float | None
    future: concurrent.futures.Future


class MicroBatcher:
    """Runs the backbone and heads for several requests at once, in one worker thread.

    Args:
        predictor: the run's model on decoded images.
        wait_ms: how long a batch waits for requests announced (being read or decoded) but not yet queued.
        max_images: the most images of one batch (a request larger than that is a batch of its own).
        warm_up: an image to run once in the worker thread before any request (the first pass in a
            thread sets up the thread's kernels: a second or so), so that no request pays for it.
    """

    def __init__(
        self,
        predictor: ImagePredictor,
        wait_ms: float = 5.0,
        max_images: int = 64,
        warm_up: torch.Tensor | None = None,
    ) -> None:
        self.predictor = predictor
        self.wait_s = wait_ms / 1000.0
        self.max_images = max_images
        self.batches = 0  # how many backbone batches ran, and for how many requests: for tests and /health
        self.requests = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._coming = 0
        self._lock = threading.Lock()
        self._warm_up = warm_up
        self.ready = threading.Event()  # set once the worker thread has warmed up
        self.error: Exception | None = None  # what the warm-up raised
        self._thread = threading.Thread(target=self._work, name="hierclass-batcher", daemon=True)
        self._thread.start()

    def announce(self) -> None:
        """Say a request is on its way (a batch then waits ``wait_ms`` for it)."""
        with self._lock:
            self._coming += 1

    def withdraw(self) -> None:
        """An announced request will not come (it was refused)."""
        with self._lock:
            self._coming -= 1

    async def predict(
        self, images: list[torch.Tensor], names: list[str], topk: int, abstain_threshold: float | None
    ) -> ImagePrediction:
        """The answer for one product's decoded images (call :meth:`announce` first)."""
        job = _Job(images, names, topk, abstain_threshold, concurrent.futures.Future())
        with self._lock:  # together, so that the worker never counts this request both waiting and coming
            self._coming -= 1
            self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def close(self) -> None:
        """Stop the worker thread after the batches queued."""
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        try:
            if self._warm_up is not None:
                self.predictor.predict_decoded([[self._warm_up]], [["warm-up"]], topk=1)
        except Exception as e:  # noqa: BLE001  (create_app reports it; requests would get the same error)
            self.error = e
        finally:
            self.ready.set()
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            n = len(job.images)
            deadline = time.monotonic() + self.wait_s
            while n < self.max_images:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    with self._lock:
                        coming = self._coming
                    remaining = deadline - time.monotonic()
                    if coming <= 0 or remaining <= 0:
                        break
                    try:
                        more = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
                n += len(more.images)
            # a request whose client went away was cancelled: drop it (its future can no longer be set)
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            proba = self.predictor.proba([im for job in batch for im in job.images])
        except Exception as e:  # noqa: BLE001  (each waiting request gets the error, the worker lives on)
            for job in batch:
                job.future.set_exception(e)
            return
        self.batches += 1
        self.requests += len(batch)
        start = 0
        for job in batch:
            rows = proba[start : start + len(job.images)]
            start += len(job.images)
            try:
                (answer,) = self.predictor.predict_decoded(
                    [job.images], [job.names], topk=job.topk, abstain_threshold=job.abstain_threshold, proba=rows
                )
                job.future.set_result(answer)
            except Exception as e:  # noqa: BLE001
                job.future.set_exception(e)


# ---------------------------------------------------------------------------- reading uploads
async def _capped(stream: AsyncIterator[bytes], limit: int, limit_mb: float) -> AsyncIterator[bytes]:
    """The request body, refused as soon as it passes ``limit`` bytes (never read whole first)."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise BadRequest(
                413, f"the upload is over {limit_mb:g} MB; send smaller photos (JPEG, at most {limit_mb:g} MB)"
            )
        yield chunk


async def read_images(request: Request, config: ServeConfig) -> list[tuple[str, bytes]]:
    """The ``(file name, bytes)`` of each file of the request's ``image`` field, read into memory.

    Raises:
        BadRequest: not multipart, over the size limit, too many files, no ``image`` field, malformed.
    """
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise BadRequest(
            415,
            f"expected multipart/form-data with the photos in field '{FIELD}', got "
            f"{kind.split(';')[0] or 'no content type'}; e.g. curl -F {FIELD}=@photo.jpg URL/predict",
        )
    limit = config.max_upload_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise BadRequest(413, f"the upload is over {config.max_upload_mb:g} MB; send smaller photos")
    parser = MultiPartParser(
        request.headers,
        _capped(request.stream(), limit, config.max_upload_mb),
        max_files=config.max_images,
        max_fields=config.max_images + 8,
    )
    parser.spool_max_size = limit + 1  # every file stays in memory: uploads are never written to disk
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise BadRequest(
                422, f"more than {config.max_images} images in one request; send at most {config.max_images} "
                "(the photos of one product), or one request per product"
            ) from None  # fmt: skip
        raise BadRequest(400, f"malformed multipart upload ({e.message}); send the photos in field '{FIELD}'") from None
    try:
        values = form.getlist(FIELD)
        files = [v for v in values if isinstance(v, UploadFile)]
        if not values:
            got = ", ".join(sorted({f"'{k}'" for k in form})) or "no field"
            raise BadRequest(422, f"no field '{FIELD}' in the upload (got {got}); send the photos as field '{FIELD}'")
        if len(files) != len(values):
            raise BadRequest(422, f"field '{FIELD}' holds text, not a file; send the photo as a file upload")
        return [(f.filename or f"image {i + 1}", await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


def decode_all(predictor: ImagePredictor, uploads: Sequence[tuple[str, bytes]]) -> list[torch.Tensor]:
    """Decode every upload, or refuse the request naming the first that does not decode."""
    images = []
    for i, (name, data) in enumerate(uploads, 1):
        if not data:
            raise BadRequest(422, f"image {i} ({name}) is empty (0 bytes); send the photo's file")
        image = predictor.decode(data)
        if image is None:
            raise BadRequest(422, f"image {i} ({name}) is {NOT_AN_IMAGE}; send a photo")
        images.append(image)
    return images


# ---------------------------------------------------------------------------- the app
def model_info(run: Run, predictor: ImagePredictor, engine: str) -> dict[str, Any]:
    """What ``GET /model`` shows: backbone, cut, taxonomy, and the run's validation figures."""
    spec = run.spec
    tax = predictor.taxonomy
    clf = run.models[predictor.model]
    manifest = run.manifest()
    recorded = manifest.get("heads") or {}
    validation = {}
    for head, meta in clf.meta.items():  # what run.json records of each head, else its checkpoint
        entry = recorded.get(head) or {}
        metrics = entry.get("metrics") or meta.get("metrics") or {}
        validation[head] = {k: metrics[k] for k in VALIDATION_KEYS if k in metrics}
        if "trained_at" in entry:
            validation[head]["trained_at"] = entry["trained_at"]
    return {
        "run": run.root.name,
        "model": predictor.model,
        "backbone": spec.backbone,
        "pretrained": spec.pretrained,
        "image_size": spec.image_size,
        "cut": f"top {spec.top_stages} stage(s) trained" if spec.top_stages else "pooled features",
        "engine": engine,
        "describe": spec.describe(),
        "taxonomy": {
            "fingerprint": tax.fingerprint,
            "leaves": tax.n_leaves,
            "level1": tax.n_level1,
            "level2": tax.n_level2,
        },
        "validation": validation,
        "calibration": (manifest.get("calibration") or {}).get("on"),
    }


def create_app(
    run: Run,
    config: ServeConfig | None = None,
    *,
    model: str | None = None,
    engine: str = "onnx",
) -> FastAPI:
    """The FastAPI app serving ``run`` (loaded with :meth:`Run.load`); the backbone is built here, once.

    Args:
        run: the run to serve.
        config: limits and defaults (:class:`ServeConfig`).
        model: ``hierarchical`` (default when the run has it), ``flat`` or ``fused``.
        engine: ``onnx`` (export kept in ``RUN/onnx/``) or ``torch``.
    """
    config = config or ServeConfig()
    predictor = run.image_predictor(model, engine=engine, batch_size=config.max_batch_images)
    import torch

    size = predictor.transform.size
    # warm-up (resize kernels, the backbone's first run in the worker thread): the first request is not the slow one
    warm = torch.zeros((3, 2 * size[0] + 1, 2 * size[1] + 3), dtype=torch.uint8)
    batcher = MicroBatcher(predictor, config.batch_wait_ms, config.max_batch_images, warm_up=warm)
    batcher.ready.wait(timeout=120)
    if batcher.error is not None:
        raise HierclassError(f"{run.root}: the model fails on a test image ({batcher.error}); check the run's heads")
    info = model_info(run, predictor, engine)
    short = {k: info[k] for k in ("run", "model", "backbone", "image_size", "cut")}
    short["taxonomy"] = info["taxonomy"]["fingerprint"]
    page = resources.files("hierclass").joinpath(PAGE).read_text(encoding="utf-8")

    app = FastAPI(title="hierclass", summary="Product photos to categories", docs_url="/docs", redoc_url=None)
    app.state.run, app.state.predictor, app.state.batcher, app.state.config = run, predictor, batcher, config

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, e: BadRequest) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "requests": batcher.requests, "batches": batcher.batches}

    @app.get("/model")
    async def describe() -> dict[str, Any]:
        return info

    @app.post("/predict")
    async def predict(request: Request, topk: int | None = None, abstain: float | None = None) -> JSONResponse:
        start = time.perf_counter()
        k = config.topk if topk is None else topk
        if not 1 <= k <= MAX_TOPK:
            raise BadRequest(422, f"topk={k} is outside 1..{MAX_TOPK}; ask for fewer leaves")
        threshold = config.abstain_threshold if abstain is None else abstain
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise BadRequest(422, f"abstain={threshold} is outside [0, 1]; give a probability")
        batcher.announce()
        try:
            uploads = await read_images(request, config)
            images = await run_in_threadpool(decode_all, predictor, uploads)
        except BaseException:
            batcher.withdraw()
            raise
        answer = await batcher.predict(
            images, [name for name, _ in uploads], min(k, predictor.taxonomy.n_leaves), threshold
        )
        body = {
            "predictions": [leaf.to_dict() for leaf in answer.leaves],
            "level1": [{"name": name, "probability": p} for name, p in answer.level1],
            "model": short,
            "images": len(uploads),
        }
        if threshold is not None:
            body["abstain_threshold"] = threshold
            body["depth"] = answer.depth
        body["ms"] = round((time.perf_counter() - start) * 1000.0, 2)
        return JSONResponse(body)

    return app


def serve(
    run: Run,
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str | None = None,
    engine: str = "onnx",
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve ``run`` with uvicorn until interrupted.

    Raises:
        HierclassError: the port is taken or the host cannot be bound.
    """
    import socket

    import uvicorn

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise HierclassError(
            f"{host}:{port}: cannot listen there ({e.strerror}); pass another --port or --host"
        ) from None
    app = create_app(run, config, model=model, engine=engine)
    if announce is not None:
        announce(f"http://{host if ':' not in host else f'[{host}]'}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
