"""The routes, each with every status it answers documented in the OpenAPI document (a schema-driven fuzzer holds the
server to it: tests/test_serve_contract.py). The service (:mod:`~diffaccel.engines.serving.service`) does the work;
these only translate HTTP to its calls. Work that can block (a job's commit, its webhook host's DNS lookup, the
schedule check) runs off the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import re

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from diffaccel.engines.serving.events import sse
from diffaccel.engines.serving.models import RequestError
from diffaccel.engines.serving.responses import SafeJSON, error
from diffaccel.engines.serving.schemas import (JOB_ID, ErrorResponse, GenerationRequest, GenerationResponse, Health,
                                               JobCreate, JobList, JobStatus, JobView, ModelList)

KEEPALIVE_S = 15.0
MAX_INDEX = 999                   # image indices a job can have (n is at most schemas.MAX_IMAGES)
_WHY = {400: "the request is invalid or cannot be served by these engines; the message names the allowed values",
        404: "no such job (or image)", 409: "the job was canceled before it ended",
        413: "the body is larger than the server takes (--max-body-bytes)",
        422: "the idempotency key was used with another body", 429: "the queue is full; retry after Retry-After s",
        500: "the job failed in the engine (a server fault, never the request's: its reason is in the message)"}


def errors(*codes) -> dict:
    """OpenAPI ``responses`` entries for error statuses, each with the error body the server really sends."""
    return {c: {"model": ErrorResponse, "description": _WHY[c]} for c in (*codes, 413)}


def _health_doc() -> dict:
    return {503: {"model": Health, "description": "not live / not ready: the reasons are listed"}}


def _prefer_wait(prefer: "str | None", limit: float) -> float:
    """``Prefer: wait=N`` (RFC 7240) in seconds, capped at ``limit``; absent or malformed: ``limit``."""
    m = re.search(r"(?:^|[,;\s])wait=(\d{1,6})(?:$|[,;\s])", prefer or "")
    return min(float(m.group(1)), limit) if m else limit


def _job_or_404(service, job_id: str):
    job = service.store.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise HTTPException(404, f"no job {job_id[:64]!r}; job ids are 32 hex characters from POST /v1/jobs")
    return job


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def add_routes(app: FastAPI) -> None:
    """Add every route to ``app``: the page, health and metrics, models; generations; jobs (in this order, the
    OpenAPI document's)."""
    svc = lambda: app.state.service      # noqa: E731  (set by the embedded server or a Ray replica)
    _status_routes(app, svc)
    _generation_routes(app, svc)
    _job_routes(app, svc)


def _status_routes(app: FastAPI, svc) -> None:
    """The page, liveness and readiness, Prometheus metrics and the served models."""
    from diffaccel.engines.serving.page import PAGE

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE

    def health_answer(problems: list):
        return SafeJSON(svc().watchdog.answer(problems), status_code=503 if problems else 200)

    @app.get("/health/live", response_model=Health, responses={**_health_doc(), **errors()})
    async def live():
        """Liveness (Kubernetes, Ray): the engine threads run and the service has not given up."""
        return health_answer(svc().watchdog.live_problems())

    @app.get("/health/ready", response_model=Health, responses={**_health_doc(), **errors()})
    async def ready():
        """Readiness: live, started, the engine's heartbeat recent and the job store writable."""
        return health_answer(svc().watchdog.ready_problems())

    @app.get("/health", response_model=Health, responses={**_health_doc(), **errors()})
    async def health():
        """The readiness answer (as ``/health/ready``)."""
        return health_answer(svc().watchdog.ready_problems())

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors())
    async def metrics():
        s = svc()
        return PlainTextResponse(s.metrics.render(s.gauges()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=errors())
    async def models():
        s = svc()
        return {"object": "list", "data": [{"id": n, "object": "model", "sizes": m.size_text(),
                                            "default_guidance": m.default_guidance} for n, m in s.models.items()]}


def _generation_routes(app: FastAPI, svc) -> None:
    """Images now (OpenAI's Images API body, waiting up to ``Prefer: wait``), or a job to poll (Replicate-style)."""
    @app.post("/v1/images/generations", response_model=GenerationResponse,
              responses={202: {"model": JobView, "description": "not done within the wait: the job, to poll"},
                         **errors(400, 409, 429, 500)})
    async def generations(body: GenerationRequest, request: Request,
                          prefer: "str | None" = Header(None, max_length=200)):
        s = svc()
        wait = _prefer_wait(prefer, s.cfg.sync_wait_s)
        job = await run_in_threadpool(s.create, body)
        done = await _wait_done(s, job["id"], wait)
        applied = {"Preference-Applied": f"wait={wait:g}"} if prefer else {}
        if done is None:
            view = s.view(s.store.get(job["id"]), _base(request))
            return SafeJSON(view, status_code=202,
                                                     headers={"Location": view["urls"]["get"], **applied})
        if done["status"] == JobStatus.FAILED.value:
            return error(500, f"generation failed: {done['error']}", kind="server_error")
        if done["status"] == JobStatus.CANCELED.value:
            return error(409, "the job was canceled")
        data = []
        for i, seed, png in s.store.outputs(job["id"]):
            entry = {"url": f"{_base(request)}/v1/jobs/{job['id']}/images/{i}.png"} \
                if body.response_format == "url" else {"b64_json": base64.b64encode(png).decode()}
            data.append({**entry, "seed": seed})
        return SafeJSON(
            {"created": int(done["created"]), "id": job["id"], "data": data, "metrics": done["metrics"]},
            headers=applied)

    @app.post("/v1/jobs", status_code=202, response_model=JobView, responses=errors(400, 422, 429))
    async def create_job(body: JobCreate, request: Request,
                         idempotency_key: "str | None" = Header(None, max_length=200)):
        s = svc()
        if idempotency_key is not None and body.id is not None and idempotency_key != body.id:
            raise RequestError("Idempotency-Key and the body's id differ; give one of them", "id")
        job = await run_in_threadpool(s.create, body, idempotency_key or body.id, body.webhook,
                                      body.webhook_events_filter)
        view = s.view(job, _base(request))
        headers = {"Location": view["urls"]["get"]}
        if job["replayed"]:
            headers["Idempotent-Replayed"] = "true"
        return SafeJSON(view, status_code=202, headers=headers)


def _job_routes(app: FastAPI, svc) -> None:
    """A job's list, status, cancel, images and event stream."""
    @app.get("/v1/jobs", response_model=JobList, responses=errors(400))
    async def list_jobs(request: Request, status: "JobStatus | None" = None,
                        limit: int = Query(100, ge=1, le=1000)):
        s = svc()
        return {"object": "list",
                "data": [s.view(j, _base(request)) for j in s.store.list(status and status.value, limit)]}

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=errors(404))
    async def get_job(job_id: str, request: Request):
        s = svc()
        return s.view(_job_or_404(s, job_id), _base(request))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView, responses=errors(404))
    async def cancel_job(job_id: str, request: Request):
        s = svc()
        _job_or_404(s, job_id)
        return s.view(s.cancel(job_id), _base(request))

    @app.get("/v1/jobs/{job_id}/images/{index}.png", response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "the PNG image"}, **errors(400, 404)})
    async def job_image(job_id: str, index: int = Path(ge=0, le=MAX_INDEX)):
        s = svc()
        _job_or_404(s, job_id)
        png = s.store.image(job_id, index)
        if png is None:
            raise HTTPException(404, f"job {job_id} has no image {index}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=31536000, immutable"})

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "status, start, progress, "
                                                                                     "completed"}, **errors(404)})
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
