"""The HTTP API (FastAPI): OpenAI-compatible synchronous generations, Replicate-style durable jobs with progress,
server-sent events, cancel and webhooks, ``/health``, Prometheus ``/metrics`` and a playground page at ``/``.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param"}}``, with a one-line message that names the
allowed values; bad input is always a 4xx, a full queue a 429 with ``Retry-After``.

>>> app = create_app(service=None)              # doctest: +SKIP
>>> import uvicorn; uvicorn.run(app, port=8000)  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from diffaccel.engines.serving.events import sse
from diffaccel.engines.serving.models import RequestError
from diffaccel.engines.serving.schemas import JOB_ID, GenerationRequest, JobCreate, JobStatus
from diffaccel.engines.serving.service import QueueFull
from diffaccel.engines.serving.store import IdempotencyConflict

KEEPALIVE_S = 15.0


def error(status: int, message: str, param=None, kind="invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": " ".join(str(message).split()), "type": kind, "param": param}},
                        status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError, model) -> "tuple[str, str | None]":
    errs = exc.errors()
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    if e.get("type") == "extra_forbidden":
        msg = f"unknown field {field!r}; allowed: {', '.join(model.model_fields)}"
    elif e.get("type") in ("json_invalid", "model_attributes_type", "dict_type"):
        msg, field = "the body must be a JSON object (Content-Type: application/json), e.g. {\"prompt\": \"a red " \
                     "circle\"}", None
    else:
        msg = f"{field}: {e.get('msg', 'invalid')}" if field else e.get("msg", "invalid request")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return msg[:300] + more, field


def _prefer_wait(prefer: "str | None", limit: float) -> float:
    """``Prefer: wait=N`` (RFC 7240) in seconds, capped at ``limit``; absent or malformed: ``limit``."""
    m = re.search(r"(?:^|[,;\s])wait=(\d{1,6})(?:$|[,;\s])", prefer or "")
    return min(float(m.group(1)), limit) if m else limit


def _job_or_404(service, job_id: str):
    job = service.store.get(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise HTTPException(404, f"no job {job_id[:64]!r}; job ids are 32 hex characters from POST /v1/jobs")
    return job


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


class _Guard:
    """Pure ASGI middleware: refuse bodies over ``limit()`` bytes with 413 (read before the app sees them) and count
    responses by status code."""

    def __init__(self, app, limit: int, metrics):
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
                resp = error(413, f"the body has more than {self.limit()} bytes; send at most {self.limit()}")
                self.metrics().count("diffaccel_http_requests_total", code="413")
                return await resp(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics().count("diffaccel_http_requests_total", code=str(message["status"]))
            await send(message)

        await self.app(scope, replay, counting_send)


def create_app(service=None, start_service: bool = True, service_factory=None) -> FastAPI:
    """The app over ``service`` (a :class:`~diffaccel.engines.serving.service.Service`), or over the one
    ``service_factory()`` makes when the app starts (a Ray Serve replica). With ``start_service`` the app's lifespan
    starts and stops it."""

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

    app = FastAPI(title="diffaccel", description="Diffusion engines over HTTP", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_Guard, limit=lambda: app.state.service.cfg.max_body_bytes,
                       metrics=lambda: app.state.service.metrics)
    _handlers(app)
    _routes(app)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        model = GenerationRequest if request.url.path.endswith("/generations") else JobCreate
        msg, field = _validation_message(exc, model)
        return error(400, msg, field)

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path[:100]}")
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "not found",
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


def _routes(app: FastAPI) -> None:
    from diffaccel.engines.serving.page import PAGE

    svc = lambda: app.state.service      # noqa: E731  (set by the embedded server or a Ray replica)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE

    @app.get("/health")
    async def health():
        s = svc()
        return {"status": "ok", "models": list(s.models), "queue_depth": len(s.worker.queue),
                "running": len(s.worker.running), "queue_limit": s.cfg.queue_limit,
                "uptime_s": time.time() - (s.started_at or time.time())}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        s = svc()
        return PlainTextResponse(s.metrics.render(s.gauges()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        s = svc()
        return {"object": "list", "data": [{"id": n, "object": "model", "sizes": m.size_text(),
                                            "default_guidance": m.default_guidance} for n, m in s.models.items()]}

    @app.post("/v1/images/generations")
    async def generations(body: GenerationRequest, request: Request, prefer: "str | None" = Header(None)):
        s = svc()
        wait = _prefer_wait(prefer, s.cfg.sync_wait_s)
        job = s.create(body)
        done = await _wait_done(s, job["id"], wait)
        applied = {"Preference-Applied": f"wait={wait:g}"} if prefer else {}
        if done is None:
            view = s.view(s.store.get(job["id"]), _base(request))
            return JSONResponse(view, status_code=202, headers={"Location": view["urls"]["get"], **applied})
        if done["status"] == JobStatus.FAILED.value:
            return error(500, f"generation failed: {done['error']}", kind="server_error")
        if done["status"] == JobStatus.CANCELED.value:
            return error(409, "the job was canceled")
        data = []
        for i, seed, png in s.store.outputs(job["id"]):
            entry = {"url": f"{_base(request)}/v1/jobs/{job['id']}/images/{i}.png"} \
                if body.response_format == "url" else {"b64_json": base64.b64encode(png).decode()}
            data.append({**entry, "seed": seed})
        return JSONResponse({"created": int(done["created"]), "id": job["id"], "data": data,
                             "metrics": done["metrics"]}, headers=applied)

    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: JobCreate, request: Request,
                         idempotency_key: "str | None" = Header(None, max_length=200)):
        s = svc()
        if idempotency_key is not None and body.id is not None and idempotency_key != body.id:
            raise RequestError("Idempotency-Key and the body's id differ; give one of them", "id")
        job = s.create(body, idempotency_key or body.id, body.webhook, body.webhook_events_filter)
        view = s.view(job, _base(request))
        headers = {"Location": view["urls"]["get"]}
        if job["replayed"]:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(view, status_code=202, headers=headers)

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, status: "str | None" = None, limit: int = Query(100, ge=1, le=1000)):
        s = svc()
        if status is not None and status not in {x.value for x in JobStatus}:
            raise RequestError(f"unknown status {status[:40]!r}; allowed: {', '.join(x.value for x in JobStatus)}",
                               "status")
        return {"object": "list", "data": [s.view(j, _base(request)) for j in s.store.list(status, limit)]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        s = svc()
        return s.view(_job_or_404(s, job_id), _base(request))

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, request: Request):
        s = svc()
        _job_or_404(s, job_id)
        return s.view(s.cancel(job_id), _base(request))

    @app.get("/v1/jobs/{job_id}/images/{index}.png")
    async def job_image(job_id: str, index: int):
        s = svc()
        _job_or_404(s, job_id)
        png = s.store.image(job_id, index) if 0 <= index < 1000 else None
        if png is None:
            raise HTTPException(404, f"job {job_id} has no image {index}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=31536000, immutable"})

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        s = svc()
        _job_or_404(s, job_id)
        return StreamingResponse(_stream(s, job_id, _base(request)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _wait_done(s, job_id: str, timeout: float) -> "dict | None":
    """The job once it ended, or None after ``timeout`` seconds."""
    with s.hub.subscribe(job_id, events=("completed",)) as q:
        job = s.store.get(job_id)
        if JobStatus(job["status"]).terminal:
            return job
        try:
            await asyncio.wait_for(q.get(), timeout)          # the only event it subscribed to
        except asyncio.TimeoutError:
            return None
    return s.store.get(job_id)


async def _stream(s, job_id: str, base: str):
    """Server-sent events: the job as it is now (``status``), then ``start``, ``progress`` and ``completed``."""
    with s.hub.subscribe(job_id) as q:
        view = s.view(s.store.get(job_id), base)
        n = 0
        yield sse("status", view, n)
        if JobStatus(view["status"]).terminal:
            yield sse("completed", {k: view[k] for k in ("id", "status", "error", "metrics", "output")}, n + 1)
            return
        while True:
            try:
                event, data = await asyncio.wait_for(q.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            n += 1
            yield sse(event, data, n)
            if event == "completed":
                return
