"""The HTTP API (FastAPI): OpenAI-compatible synchronous generations, Replicate-style durable jobs with progress,
server-sent events, cancel and webhooks, liveness and readiness, Prometheus ``/metrics`` and a playground page at ``/``.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param"}}``, with a one-line message that names the
allowed values; bad input is always a 4xx, a full queue a 429 with ``Retry-After``. The OpenAPI document lists every
status each route answers with its real body (:mod:`diffaccel.engines.serving.routes`); FastAPI's own 422 validation
shape, which this server never sends, is taken out of it. Anything a route raises unexpectedly still answers a
JSON 500 of that shape and is counted in ``/metrics``.

>>> app = create_app(service=None)              # doctest: +SKIP
>>> import uvicorn; uvicorn.run(app, port=8000)  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException

from diffaccel.engines.serving.models import RequestError
from diffaccel.engines.serving.responses import JSON_BODY, SafeJSON, error
from diffaccel.engines.serving.schemas import GenerationRequest, JobCreate
from diffaccel.engines.serving.service import QueueFull
from diffaccel.engines.serving.store import IdempotencyConflict

log = logging.getLogger(__name__)


def limits(cfg) -> dict:
    """What this server allows of the bounded request fields (the schema's ceilings are looser)."""
    return {"n": (1, cfg.max_images), "steps": (1, cfg.max_steps)}


def _validation_message(exc: RequestValidationError, model, cfg=None) -> "tuple[str, str | None]":
    errs = exc.errors()
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    bounded = limits(cfg).get(field) if cfg is not None else None
    if bounded and e.get("type") in ("less_than_equal", "greater_than_equal"):
        msg = f"{field}={e.get('input')!r:.40} is outside what this server runs; allowed: {bounded[0]}-{bounded[1]}"
    elif e.get("type") == "extra_forbidden" and field == "cache":   # its state lives in the model's U-Net: a
        msg = ("cache is set per deployment, not per request (a batch shares the model's step cache); choose a "
               "model served with one, e.g. diffaccel serve OUT@cache=deepcache:interval=3")
    elif e.get("type") == "extra_forbidden":
        msg = f"unknown field {field!r}; allowed: {', '.join(model.model_fields)}"
    elif e.get("type") in ("json_invalid", "model_attributes_type", "dict_type"):
        msg, field = JSON_BODY, None
    else:
        text = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        msg = f"{field}: {text}" if field else text
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return msg[:300] + more, field


class _Guard:
    """Pure ASGI middleware: refuse bodies over ``limit()`` bytes with 413 (read before the app sees them), count
    responses by status code, and answer a JSON 500 (counted) for anything the app raises."""

    def __init__(self, app, limit, metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.limit():
                self.metrics().count("diffaccel_http_requests_total", code="413")
                resp = error(413, f"the body has more than {self.limit()} bytes; send at most {self.limit()}")
                return await resp(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body, replayed, started = b"".join(chunks), False, False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics().count("diffaccel_http_requests_total", code=str(message["status"]))
            await send(message)

        try:
            await self.app(scope, replay, counting_send)
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise                   # the answer had begun: let the server close the connection
            await error(500, "the server failed on this request; it is logged", kind="server_error")(
                scope, receive, counting_send)


def create_app(service=None, start_service: bool = True, service_factory=None) -> FastAPI:
    """The app over ``service`` (a :class:`~diffaccel.engines.serving.service.Service`), or over the one
    ``service_factory()`` makes when the app starts (a Ray Serve replica). With ``start_service`` the app's lifespan
    starts and stops it."""
    from diffaccel.engines.serving.routes import add_routes

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if app.state.service is None:
            app.state.service = service_factory()
        if start_service:
            app.state.service.start(asyncio.get_running_loop())
        else:
            app.state.service.hub.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            if start_service:
                app.state.service.stop()

    app = FastAPI(title="diffaccel", description="Diffusion engines over HTTP", lifespan=lifespan,
                  default_response_class=SafeJSON, redirect_slashes=False)   # /v1/jobs/ is a 404, not a 307
    app.state.service = service
    app.add_middleware(_Guard, limit=lambda: app.state.service.cfg.max_body_bytes,
                       metrics=lambda: app.state.service.metrics)
    _handlers(app)
    add_routes(app)
    app.openapi = lambda: _openapi(app)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        model = GenerationRequest if request.url.path.endswith("/generations") else JobCreate
        service = app.state.service
        msg, field = _validation_message(exc, model, service.cfg if service is not None else None)
        return error(400, msg, field)

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        if exc.status_code == 405:
            allowed = _methods_of(app, request.scope)
            return error(405, f"{request.method} is not allowed on {request.url.path[:100]}; allowed: "
                              f"{', '.join(allowed)}", headers={"Allow": ", ".join(allowed)})
        detail = exc.detail if isinstance(exc.detail, str) else "not found"
        if exc.status_code == 400 and "parsing the body" in detail:       # FastAPI's words for a body not JSON
            detail = JSON_BODY
        return error(exc.status_code, detail,
                     kind="not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(RequestError)
    async def _request_error(request, exc):
        return error(exc.status, str(exc), exc.param)

    @app.exception_handler(QueueFull)
    async def _full(request, exc):
        return error(429, str(exc), kind="rate_limit_error", headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(request, exc):
        return error(422, "this idempotency key was used with a different request body; use a new key",
                     "Idempotency-Key")


def _methods_of(app: FastAPI, scope) -> list:
    """Every method some route serves at the request's path (Starlette's own 405 names only one route's)."""
    from starlette.routing import Match

    methods = set()
    for route in app.router.routes:
        if getattr(route, "methods", None) and route.matches({**scope, "method": "GET"})[0] != Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


def _served_values(service) -> dict:
    """Request fields whose allowed values this server knows: the served model names and scheduler names."""
    return {"model": sorted(service.models), "scheduler": ["default", *sorted(service.schedulers)]}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document without the 422 validation responses it adds by itself (this server answers 400 with
    the error body instead; the 422 a route declares itself stays), with this server's own limits on ``n`` and
    ``steps``."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in doc.get("paths", {}).values():
            for op in path.values():
                resp = op.get("responses", {}).get("422", {})
                if "HTTPValidationError" in json.dumps(resp):
                    del op["responses"]["422"]
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        service = app.state.service
        if service is not None:
            for body in ("GenerationRequest", "JobCreate"):
                props = schemas.get(body, {}).get("properties", {})
                for field, (_, most) in limits(service.cfg).items():
                    for alt in props.get(field, {}).get("anyOf", [props.get(field, {})]):
                        if "maximum" in alt:
                            alt["maximum"] = most
                for field, values in _served_values(service).items():
                    for alt in props.get(field, {}).get("anyOf", []):
                        if alt.get("type") == "string":
                            alt["enum"] = values
        app.openapi_schema = doc
    return app.openapi_schema
