"""``crossrec serve``: every region of a bundle behind one HTTP server (FastAPI on uvicorn).

Endpoints (JSON; docs/serving.md has examples):

- ``POST /v1/recommend`` ``{"region", "history": [raw ids], "k", "exclude_seen", "unknown", "model"}``
  -> ``{"region", "items": [{"id", "score"}], "model": {"kind", "version", ...}, "source", ...}``
- ``POST /v1/recommend/batch`` ``{"requests": [...]}`` -> ``{"results": [...]}``
- ``GET /v1/regions``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus text)
- ``PUT /v1/admin/regions/{region}/adapter`` (a zip of an adapter folder; ``Authorization: Bearer``
  the admin token): checked against the base, then live from the next batch.

Errors are JSON ``{"error": message, "field": ...}``: unknown region or model 404, bad fields, unknown
items or k out of range 422, malformed JSON 400, a body over the limit 413; never a traceback.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError
from .admin import record_in_manifest, token_matches, unpack_adapter
from .ann import AnnConfig, index_factory, set_threads
from .batcher import MicroBatcher
from .engine import NotFound, Query, ServingEngine, adapter_record, engine_from_bundle
from .metrics import ServerMetrics
from .shared_adapters import weights_version

log = logging.getLogger("crossrec.serve")
POPULARITY_NOTE = "fewer known events than min_known: the region's popularity list (score = training interactions)"


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    region: str = Field(min_length=1, max_length=200)
    history: list[str | int] = Field(default_factory=list, max_length=100_000)
    k: int = 10
    exclude_seen: bool = True
    unknown: Literal["error", "drop"] = "error"
    model: Literal["default", "adapter", "model", "base", "student"] | None = None
    min_known: int = Field(1, ge=0)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(min_length=1, max_length=1024)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over ``limit`` bytes (``admin_limit`` for /v1/admin/), by Content-Length or as
    it streams in: the server never reads more than that into memory."""

    def __init__(self, app, limit: int, admin_limit: int):
        self.app, self.limit, self.admin_limit = app, limit, admin_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.admin_limit if scope["path"].startswith("/v1/admin/") else self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(send, limit)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send, limit: int) -> None:
    response = JSONResponse({"error": f"request body over the limit of {limit:,} bytes"}, status_code=413)
    await response({"type": "http"}, None, send)


def create_app(engine: ServingEngine, *, max_batch: int = 32, max_wait_ms: float = 2.0, mode: str = "mixed",
               max_body_bytes: int = 1 << 20, max_adapter_bytes: int = 512 << 20, admin_token: str | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    metrics = metrics or ServerMetrics()
    batcher = MicroBatcher(engine, max_batch, max_wait_ms, mode, on_batch=metrics.batch_size.observe)
    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="crossrec serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes, admin_limit=max_adapter_bytes)

    def error(status: int, message: str, field: str | None = None, reason: str = "input") -> JSONResponse:
        metrics.errors.labels(str(status), reason).inc()
        body = {"error": message}
        if field:
            body["field"] = field
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            ctx = next(e for e in errs if e.get("type") == "json_invalid").get("ctx", {})
            return error(400, f"malformed JSON: {ctx.get('error', 'not valid JSON')}", "body", "json")
        first = errs[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return error(422, f"{first.get('msg', 'invalid')}{more}", where, "validation")

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return error(404, exc.message, exc.field, "not_found")

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return error(422, exc.message, exc.field, "input")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details", None, "internal")

    def prepare(req: RecommendRequest, field: str = "") -> tuple[Query | None, dict]:
        region = engine.region(req.region)
        route = region.route(req.model)
        n = engine.catalogue_size(route)
        if not 1 <= req.k <= n:
            raise InputError(f"must be between 1 and the region's catalogue size ({n:,} items), got {req.k}",
                             field=f"{field}k")
        known, dropped = engine.encode(route, req.history, req.unknown)
        head = {"region": req.region, "known_events": len(known), "dropped": dropped}
        if len(known) < req.min_known:
            popular = engine.popular(route, known, req.k, req.exclude_seen)
            if popular is not None:
                return None, {**head, "items": [{"id": i, "score": s} for i, s in zip(*popular)],
                              "model": route.describe(), "source": "popularity", "note": POPULARITY_NOTE}
        return Query(route, known, req.k, req.exclude_seen, req.region, req.model, list(req.history)), head

    def shaped(head: dict, result) -> dict:
        items, scores, route = result
        return {**head, "items": [{"id": i, "score": s} for i, s in zip(items, scores)], "model": route.describe(),
                "source": "model"}

    def observe(region: str, endpoint: str, status: int, started: float) -> None:
        label = region if region in engine.regions else "unknown"
        metrics.requests.labels(label, endpoint, str(status)).inc()
        if status == 200:
            metrics.latency.labels(label).observe(time.perf_counter() - started)

    @app.post("/v1/recommend")
    async def recommend(req: RecommendRequest):
        started = time.perf_counter()
        try:
            query, head = prepare(req)
            if query is None:
                out = head
            else:
                metrics.queue_depth.set(batcher.depth())
                out = shaped(head, await asyncio.wrap_future(batcher.submit(query)))
        except NotFound:
            observe(req.region, "recommend", 404, started)
            raise
        except InputError:
            observe(req.region, "recommend", 422, started)
            raise
        observe(req.region, "recommend", 200, started)
        return out

    @app.post("/v1/recommend/batch")
    async def recommend_batch(batch: BatchRequest):
        started = time.perf_counter()
        prepared = []
        for i, req in enumerate(batch.requests):
            try:
                prepared.append(prepare(req, f"requests.{i}."))
            except InputError as e:       # NotFound too: name the request it came from
                e.field = f"requests.{i}.{e.field}" if e.field and not e.field.startswith("requests.") else e.field
                raise type(e)(e.message, field=e.field) from None
        futures = [batcher.submit(q) if q is not None else None for q, _ in prepared]
        results = []
        for (query, head), future in zip(prepared, futures):
            results.append(head if future is None else shaped(head, await asyncio.wrap_future(future)))
        for req in batch.requests:
            observe(req.region, "batch", 200, started)
        return {"results": results}

    @app.get("/v1/regions")
    async def regions():
        return {"regions": engine.describe()}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not batcher.alive:
            return JSONResponse({"status": "not ready: the batcher has stopped"}, status_code=503)
        return {"status": "ready", "regions": len(engine.regions)}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(batcher.depth())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.put("/v1/admin/regions/{region}/adapter")
    async def put_adapter(region: str, request: Request):
        if admin_token is None:
            return error(403, "admin endpoints are off: start the server with --admin-token-file FILE or "
                              "$CROSSREC_ADMIN_TOKEN", None, "admin")
        if not token_matches(admin_token, request.headers.get("authorization")):
            return error(401, "missing or wrong admin token (Authorization: Bearer TOKEN)", None, "admin")
        root = engine.adapters_root
        if root is None:
            return error(409, "this bundle has no adapters/ folder to add an adapter to", None, "admin")
        if not region or len(region) > 200:
            return error(422, "a region name of 1 to 200 characters", "region", "admin")
        body = await request.body()
        old = engine.regions.get(region)
        folder = None
        try:
            folder = await run_in_threadpool(unpack_adapter, body, root)
            await run_in_threadpool(engine.check_adapter, folder)
            final = root / f"live-{weights_version(folder)}"
            if final.exists():
                shutil.rmtree(folder)
            else:
                os.replace(folder, final)
            folder = None
            info = await run_in_threadpool(adapter_record, final)
            route = await asyncio.wrap_future(batcher.call(lambda: engine.install_adapter(region, final, info)))
            await run_in_threadpool(record_in_manifest, root, region, final.name, info)
        except InputError as e:
            metrics.swaps.labels(region if region in engine.regions else "unknown", "refused").inc()
            return error(422, f"adapter refused, the region keeps its current model: {e}", e.field, "admin")
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        metrics.swaps.labels(region, "installed").inc()
        log.info("region %s now served by adapter %s", region, route.version)
        return {"region": region, "model": route.describe(),
                "previous": old.primary.describe() if old is not None else None}

    return app


def default_threads(cores: int | None = None) -> int:
    """Torch threads for the models: one core is left to the event loop, and more than 4 do not pay for a
    recommender's small matmuls. On 2 cores that is 1 thread: the load test (benchmarks/RESULTS.md §6.2)
    served 1.9x the requests with 1 thread as with 2 (``small`` body, 16 regions, concurrency 32), whose
    second OpenMP worker spins on the core that parses HTTP."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    return max(1, min(4, cores - 1))


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, index: str = "exact",
          ann: AnnConfig | None = None, threads: int | None = None, **options) -> None:
    """Load the bundle, then serve it until interrupted (``crossrec serve``). ``index="faiss"``: top k
    through a FAISS index per output side (``ann.py``) instead of exact scores over every item. ``threads``:
    torch's intra-op threads (None: ``default_threads()``). uvicorn takes httptools and uvloop, the [serve]
    extra's C parser and event loop, where they import."""
    torch.set_num_threads(threads or default_threads())
    set_threads(torch.get_num_threads())      # FAISS takes as many (ONNX Runtime: CROSSREC_ORT_THREADS)
    engine = engine_from_bundle(Path(bundle), item_index=index_factory(ann or AnnConfig()) if index == "faiss" else None)
    app = create_app(engine, **options)
    print(f"crossrec serve: {len(engine.regions)} region(s), torch threads {torch.get_num_threads()}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
