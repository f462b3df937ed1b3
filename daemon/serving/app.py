"""HTTP routes of ``unlearnd serve``: the KServe v2 REST subset of contract §5, plus ``/metrics``.

The event loop only moves bytes: each inference (parse, validate, run, encode) runs on the inference
thread pool, so a slow request never holds up the others' I/O, and a reload runs on its own thread so it
never waits behind inference. Every response carries ``X-Model-Version`` (and ``X-Model-Sha256``): the
version that answered it, or the one being served when no model was involved.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.serving.holder import ModelHolder, ServedVersion
from daemon.serving.metrics import ServeMetrics
from daemon.serving.protocol import ProtocolError, encode_response, parse_infer_request
from daemon.serving.sched import set_thread_slice
from daemon.serving.settings import INPUT_NAME, OUTPUT_NAME, ServeSettings
from daemon.serving.verifier import VerifierUnavailable
from daemon.serving.watcher import Watcher

__all__ = ["ServeApp", "build_app"]

_log = structlog.get_logger("unlearnd.serve")
_JSON = "application/json"
# A body over the limit is read and discarded up to this many times the limit (so the client sees the
# 413 instead of a reset connection), then the connection is dropped.
_DRAIN_FACTOR = 4


def _version_headers(served: ServedVersion | None) -> dict[str, str]:
    if served is None:
        return {"X-Model-Version": "none"}
    return {"X-Model-Version": str(served.version), "X-Model-Sha256": served.sha256}


def _json(status: int, body: Any, served: ServedVersion | None, extra: dict[str, str] | None = None) -> Response:
    headers = _version_headers(served)
    if extra:
        headers.update(extra)
    return Response(json.dumps(body, separators=(",", ":")).encode(), status_code=status, headers=headers,
                    media_type=_JSON)


class ServeApp:
    """The routes, bound to one holder, watcher and metrics (built by ``build_app``)."""

    def __init__(self, settings: ServeSettings, holder: ModelHolder, watcher: Watcher, metrics: ServeMetrics,
                 pool: ThreadPoolExecutor, control_pool: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.holder = holder
        self.watcher = watcher
        self.metrics = metrics
        self.pool = pool
        self.control_pool = control_pool

    # -- helpers ----------------------------------------------------------------------------------------
    def _error(self, status: int, message: str, served: ServedVersion | None = None,
               extra: dict[str, str] | None = None) -> Response:
        return _json(status, {"error": message}, served if served is not None else self.holder.current, extra)

    def _check_model(self, name: str) -> None:
        if name != self.settings.model:
            raise ProtocolError(404, f"unknown model {name!r}; this server serves {self.settings.model!r}")

    def _served(self, version: str | None) -> ServedVersion:
        served = self.holder.current
        if served is None:
            raise ProtocolError(503, f"model {self.settings.model!r} has no version loaded yet")
        if version is not None and version != str(served.version):
            raise ProtocolError(404, f"model {self.settings.model!r} version {version!r} is not served; "
                                     f"serving version {served.version}")
        return served

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise ProtocolError(400, "Content-Length must be an integer") from None
            if size > limit:
                await self._drain(request)
                raise ProtocolError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                await self._drain(request)
                raise ProtocolError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
        try:
            inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
            out = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise ProtocolError(400, f"request body is not valid {encoding}: {exc}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise ProtocolError(413, f"decompressed request body exceeds the limit of {limit} bytes")
        return out

    async def _drain(self, request: Request) -> None:
        cap = _DRAIN_FACTOR * self.settings.max_body_bytes
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > cap:
                    break
        except Exception:  # noqa: BLE001 - the client went away: there is nothing left to drain
            pass

    # -- health and metadata ----------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return _json(200, {"live": True}, self.holder.current)

    async def ready(self, request: Request) -> Response:
        served = self.holder.current
        return _json(200 if served else 503, {"ready": served is not None}, served)

    async def server_metadata(self, request: Request) -> Response:
        return _json(200, {"name": "unlearnd", "version": _package_version(),
                           "extensions": ["binary_tensor_data", "model_repository"]}, self.holder.current)

    async def model_ready(self, request: Request) -> Response:
        try:
            self._check_model(request.path_params["name"])
            served = self._served(request.path_params.get("version"))
        except ProtocolError as exc:
            return self._error(exc.status, exc.message)
        return _json(200, {"name": served.model, "version": str(served.version), "ready": True}, served)

    async def model_metadata(self, request: Request) -> Response:
        try:
            self._check_model(request.path_params["name"])
            served = self._served(request.path_params.get("version"))
        except ProtocolError as exc:
            return self._error(exc.status, exc.message)
        body = {
            "name": served.model,
            "versions": [str(served.version)],
            "platform": "pytorch_libtorch",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *served.input_shape]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, served.num_classes]}],
        }
        return _json(200, body, served)

    # -- inference --------------------------------------------------------------------------------------
    def _infer_sync(self, body: bytes, header_length: str | None, version: str | None,
                    start: float) -> tuple[int, bytes, dict[str, str], str, ServedVersion | None]:
        served: ServedVersion | None = self.holder.current
        try:
            served = self._served(version)       # one snapshot for the whole request
            request = parse_infer_request(body, header_length, input_shape=served.input_shape,
                                          max_batch=self.settings.max_batch_size, classes=served.classes)
            logits = served.infer(request.batch)
            out, headers, media = encode_response(logits, model=served.model, version=served.version,
                                                  request_id=request.request_id, binary=request.binary_output,
                                                  classification=request.classification, classes=served.classes)
            status = 200
        except ProtocolError as exc:
            status, out, headers, media = exc.status, json.dumps({"error": exc.message}).encode(), {}, _JSON
        self.metrics.observe_request(served.version if served else None, status, time.perf_counter() - start)
        return status, out, headers, media, served

    async def infer(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            self._check_model(request.path_params["name"])
            body = await self._read_body(request)
        except ProtocolError as exc:
            served = self.holder.current
            self.metrics.observe_request(served.version if served else None, exc.status,
                                         time.perf_counter() - start)
            extra = {"Connection": "close"} if exc.status == 413 else None
            return self._error(exc.status, exc.message, served, extra)
        loop = asyncio.get_running_loop()
        status, out, headers, media, served = await loop.run_in_executor(
            self.pool, self._infer_sync, body, request.headers.get("inference-header-content-length"),
            request.path_params.get("version"), start)
        headers.update(_version_headers(served))
        return Response(out, status_code=status, headers=headers, media_type=media)

    # -- repository -------------------------------------------------------------------------------------
    async def load(self, request: Request) -> Response:
        """Reload now: read ``LATEST`` and swap to it (retrying a version that failed before)."""
        try:
            self._check_model(request.path_params["name"])
            body = await self._read_body(request)
            if body.strip():
                try:
                    payload = json.loads(body)
                except ValueError as exc:
                    raise ProtocolError(400, f"malformed JSON in request body: {exc}") from None
                params = payload.get("parameters") if isinstance(payload, dict) else None
                if params:
                    raise ProtocolError(400, "config and file overrides are not supported: unlearnd serves "
                                             "what the registry's LATEST names")
        except ProtocolError as exc:
            return self._error(exc.status, exc.message)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.control_pool, lambda: self.watcher.check(force=True))
        served = self.holder.current
        if result.outcome == "failed":
            err = result.error
            message = (f"version {result.attempted} refused ({err.reason}): {err.detail}" if err else "load failed")
            message += f"; still serving version {served.version}" if served else "; no version is served"
            return self._error(500, message, served)
        return _json(200, {"model_name": self.settings.model,
                           "model_version": str(served.version) if served else None,
                           "outcome": result.outcome, "load": result.kind,
                           "load_ms": round(result.seconds * 1e3, 3)}, served)

    async def repository_index(self, request: Request) -> Response:
        served = self.holder.current
        entry: dict[str, Any] = {"name": self.settings.model, "state": "READY" if served else "UNAVAILABLE"}
        if served:
            entry["version"] = str(served.version)
        else:
            entry["reason"] = "no version loaded yet"
        return _json(200, [entry], served)

    async def metrics_endpoint(self, request: Request) -> Response:
        data, content_type = self.metrics.render()
        return Response(data, headers=_version_headers(self.holder.current), media_type=content_type)

    # -- errors -----------------------------------------------------------------------------------------
    async def http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        if status == 404:
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif status == 405:
            detail = f"method {request.method} not allowed on {request.url.path}"
        return self._error(status, str(detail))

    async def server_error(self, request: Request, exc: Exception) -> Response:
        _log.exception("request_failed", path=request.url.path)
        return self._error(500, f"internal error: {type(exc).__name__}")

    def routes(self) -> list[Route]:
        m = "/v2/models/{name}"
        return [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route(m, self.model_metadata, methods=["GET"]),
            Route(m + "/versions/{version}", self.model_metadata, methods=["GET"]),
            Route(m + "/ready", self.model_ready, methods=["GET"]),
            Route(m + "/versions/{version}/ready", self.model_ready, methods=["GET"]),
            Route(m + "/infer", self.infer, methods=["POST"]),
            Route(m + "/versions/{version}/infer", self.infer, methods=["POST"]),
            Route("/v2/repository/models/{name}/load", self.load, methods=["POST"]),
            Route("/v2/repository/index", self.repository_index, methods=["POST"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unlearnd")
    except PackageNotFoundError:
        return "0"


def build_app(settings: ServeSettings, holder: ModelHolder, watcher: Watcher, metrics: ServeMetrics) -> Starlette:
    """The ASGI app; its lifespan loads ``LATEST``, starts polling, and at shutdown stops and releases."""
    import contextlib

    # inference threads get the short scheduler slice of request threads (daemon.serving.sched)
    pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="unlearnd-infer",
                              initializer=set_thread_slice, initargs=(settings.request_slice_us,))
    # Reloads asked for explicitly (a publisher's notification) run at normal priority: they should be fast.
    control_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unlearnd-reload")
    routes = ServeApp(settings, holder, watcher, metrics, pool, control_pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # noqa: ANN202 - Starlette's lifespan type
        loop = asyncio.get_running_loop()
        if holder.verifier is not None:
            try:
                await loop.run_in_executor(control_pool, holder.verifier.start)
                _log.info("verifier_started", model=settings.model, pid=holder.verifier.pid,
                          nice=holder.verifier.nice)
            except VerifierUnavailable as exc:     # loads verify in this process instead
                _log.warning("verifier_unavailable", model=settings.model, detail=str(exc))
        result = await loop.run_in_executor(control_pool, watcher.check)
        if result.version is None:
            _log.warning("no_version_served", model=settings.model, registry=str(settings.registry),
                         detail=str(result.error) if result.error else "LATEST names no version yet")
        watcher.start()
        _log.info("serve_started", model=settings.model, version=result.version, host=settings.host,
                  port=settings.port, poll_interval_s=settings.poll_interval_s, threads=settings.threads)
        try:
            yield
        finally:
            watcher.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            control_pool.shutdown(wait=False, cancel_futures=True)
            if holder.verifier is not None:
                holder.verifier.close()
            _log.info("serve_stopped", model=settings.model)

    return Starlette(
        routes=routes.routes(),
        exception_handlers={HTTPException: routes.http_error, Exception: routes.server_error},
        lifespan=lifespan,
    )
