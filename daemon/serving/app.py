"""HTTP routes of ``unlearnd serve``: the KServe v2 REST subset of contract §5, plus ``/metrics``.

The event loop only moves bytes: each inference (parse, validate, run, encode) runs on the inference
thread pool, so a slow request never holds up the others' I/O, and a reload runs on its own thread so it
never waits behind inference. Every response carries ``X-Model-Version`` (and ``X-Model-Sha256``): the
version that answered it, or the one being served when no model was involved.

With a token (``ServeSettings.token``) the repository endpoints (load, index) and ``/metrics`` need
``Authorization: Bearer <token>``; inference and model metadata need it too with ``auth_inference``. The health
endpoints (``/v2/health/live``, ``/v2/health/ready``) and server metadata (``/v2``) stay open: probes and load
balancers call them without secrets, and they reveal nothing but liveness. A missing or wrong token is answered
401 with ``WWW-Authenticate: Bearer`` (never 403: one token, one scope; ``daemon.endpoint_auth``).

Every answer that is not 2xx, from any endpoint (auth failures, unknown routes, unexpected exceptions), is
counted in ``unlearnd_serve_requests_total`` with its code (``_CountErrors``); inference answers are counted by
the inference path itself, with their latency.
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
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.endpoint_auth import check_bearer, unauthorized_header
from daemon.serving.holder import ModelHolder, ServedVersion
from daemon.serving.metrics import ServeMetrics
from daemon.serving.protocol import ProtocolError, encode_response, loads_json, parse_infer_request
from daemon.serving.sched import set_thread_slice
from daemon.serving.settings import INPUT_NAME, OUTPUT_NAME, ServeSettings
from daemon.serving.verifier import VerifierUnavailable
from daemon.serving.watcher import Watcher

__all__ = ["ServeApp", "build_app", "version_headers"]

_log = structlog.get_logger("unlearnd.serve")
_JSON = "application/json"
# set in a request's scope once its answer is counted (the inference path counts its own, with latency)
_COUNTED = "unlearnd.counted"
# the client went away before its answer: nothing is sent, nothing counted (nginx's "client closed request")
_GONE = 499
_REALM = "unlearnd"


def version_headers(served: ServedVersion | None) -> dict[str, str]:
    """``X-Model-Version`` (and ``X-Model-Sha256``) of an answer given while ``served`` is served."""
    if served is None:
        return {"X-Model-Version": "none"}
    return {"X-Model-Version": str(served.version), "X-Model-Sha256": served.sha256}


def _json(status: int, body: Any, served: ServedVersion | None, extra: dict[str, str] | None = None) -> Response:
    headers = version_headers(served)
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
            if size > limit:        # answered before reading a byte of it; the connection then closes
                raise ProtocolError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
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

    def _unauthorized(self, request: Request, scope: str) -> Response | None:
        """None when the request may reach a ``scope`` endpoint ("admin" or "infer"), else its 401."""
        token = self.settings.token
        if token is None or (scope == "infer" and not self.settings.auth_inference):
            return None
        presented = request.headers.get("authorization")
        if check_bearer(presented, token):
            return None
        message = ("wrong bearer token" if presented else "this endpoint needs Authorization: Bearer <token>") + \
            " (the token of unlearnd serve --token-file)"
        return self._error(401, message, extra={"WWW-Authenticate": unauthorized_header(presented, _REALM)})

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
        except Exception as exc:  # noqa: BLE001 - answered and counted as 500, never an uncounted one
            _log.exception("infer_failed", model=self.settings.model)
            out = json.dumps({"error": f"internal error: {type(exc).__name__}"}).encode()
            status, headers, media = 500, {}, _JSON
        self.metrics.observe_request(served.version if served else None, status, time.perf_counter() - start)
        return status, out, headers, media, served

    async def infer(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            self._check_model(request.path_params["name"])
            body = await self._read_body(request)
        except ClientDisconnect:
            return Response(status_code=_GONE)
        except ProtocolError as exc:
            served = self.holder.current
            self.metrics.observe_request(served.version if served else None, exc.status,
                                         time.perf_counter() - start)
            request.scope[_COUNTED] = True
            extra = {"Connection": "close"} if exc.status == 413 else None
            return self._error(exc.status, exc.message, served, extra)
        request.scope[_COUNTED] = True
        loop = asyncio.get_running_loop()
        status, out, headers, media, served = await loop.run_in_executor(
            self.pool, self._infer_sync, body, request.headers.get("inference-header-content-length"),
            request.path_params.get("version"), start)
        headers.update(version_headers(served))
        return Response(out, status_code=status, headers=headers, media_type=media)

    # -- repository -------------------------------------------------------------------------------------
    async def load(self, request: Request) -> Response:
        """Reload now: read ``LATEST`` and swap to it (retrying a version that failed before)."""
        try:
            self._check_model(request.path_params["name"])
            body = await self._read_body(request)
            if body.strip():
                payload = loads_json(body)
                params = payload.get("parameters") if isinstance(payload, dict) else None
                if params:
                    raise ProtocolError(400, "config and file overrides are not supported: unlearnd serves "
                                             "what the registry's LATEST names")
        except ClientDisconnect:
            return Response(status_code=_GONE)
        except ProtocolError as exc:
            extra = {"Connection": "close"} if exc.status == 413 else None
            return self._error(exc.status, exc.message, extra=extra)
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
        return Response(data, headers=version_headers(self.holder.current), media_type=content_type)

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

    def _guarded(self, endpoint: Any, scope: str) -> Any:
        """``endpoint`` behind the token check of ``scope`` ("admin" or "infer")."""
        async def guarded(request: Request) -> Response:
            denied = self._unauthorized(request, scope)
            return denied if denied is not None else await endpoint(request)
        return guarded

    def routes(self) -> list[Route]:
        m = "/v2/models/{name}"
        admin = lambda e: self._guarded(e, "admin")    # noqa: E731 - two one-line adapters read best here
        infer = lambda e: self._guarded(e, "infer")    # noqa: E731
        return [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route(m, infer(self.model_metadata), methods=["GET"]),
            Route(m + "/versions/{version}", infer(self.model_metadata), methods=["GET"]),
            Route(m + "/ready", infer(self.model_ready), methods=["GET"]),
            Route(m + "/versions/{version}/ready", infer(self.model_ready), methods=["GET"]),
            Route(m + "/infer", infer(self.infer), methods=["POST"]),
            Route(m + "/versions/{version}/infer", infer(self.infer), methods=["POST"]),
            Route("/v2/repository/models/{name}/load", admin(self.load), methods=["POST"]),
            Route("/v2/repository/index", admin(self.repository_index), methods=["POST"]),
            Route("/metrics", admin(self.metrics_endpoint), methods=["GET"]),
        ]


class _CountErrors:
    """ASGI middleware: every answer of 400 or more that its endpoint did not count itself is counted in
    ``unlearnd_serve_requests_total`` under the version being served, an exception as 500."""

    def __init__(self, app: Any, metrics: ServeMetrics, holder: ModelHolder) -> None:
        self.app = app
        self.metrics = metrics
        self.holder = holder

    def _count(self, status: int) -> None:
        served = self.holder.current
        self.metrics.count(served.version if served else None, status)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            if not scope.get(_COUNTED):
                self._count(status or 500)
            raise
        if status is not None and status >= 400 and status != _GONE and not scope.get(_COUNTED):
            self._count(status)


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
        middleware=[Middleware(_CountErrors, metrics=metrics, holder=holder)],
        exception_handlers={HTTPException: routes.http_error, Exception: routes.server_error},
        lifespan=lifespan,
    )
