"""The API's contract: request bodies, response bodies and the error body as pydantic models (strict types, unknown
fields refused), and the job states. The OpenAPI document is generated from these, so it says what the server does.

The synchronous body is OpenAI's Images API (``prompt``, ``n``, ``size`` as ``WIDTHxHEIGHT``, ``response_format``)
plus diffaccel's extensions; a job body is the same minus ``response_format``, plus a webhook. Limits are the ones the
back end can hold: text is valid Unicode (a lone surrogate cannot be tokenized, stored or answered), ``seed + n - 1``
fits the job store's signed 64-bit integers (image *i* of a job is seeded ``seed + i``). What depends on the served
artifacts (sizes, models, schedulers, steps) is checked by :mod:`diffaccel.engines.serving.models`.

>>> JobInput(prompt="a red circle", size="64x48").dimensions()
(48, 64)
>>> JobInput(prompt="x", size="64x64\\n")
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for JobInput
...
>>> JobInput(prompt="x", seed=2**63 - 1, n=2)
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for JobInput
...
"""
from __future__ import annotations

import enum
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")     # used with fullmatch: no trailing newline gets in
JOB_ID = re.compile(r"[0-9a-f]{32}")
EVENTS = ("start", "progress", "completed")
MAX_SEED = 2**63 - 1            # SQLite INTEGER: signed 64 bits
MAX_IMAGES = 64                 # per request, whatever the server allows (ServeConfig.max_images is at most this)
MAX_STEPS = 1000                # denoising steps; schedulers of 1000-step models serve at most 999


def valid_text(value: "str | None") -> "str | None":
    """``value`` if it encodes as UTF-8 (no lone surrogates, which JSON's ``\\ud800`` escapes can carry)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode text (it has a lone surrogate such as \\ud800); send UTF-8 "
                             "text") from None
    return value


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class JobInput(BaseModel):
    """What to generate. ``seed`` None: the server picks one and records it, so a re-run gives the same images."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    negative_prompt: Optional[StrictStr] = None
    n: StrictInt = Field(1, ge=1, le=MAX_IMAGES)
    size: Optional[StrictStr] = Field(None, max_length=11, description="WIDTHxHEIGHT in pixels",
                                      json_schema_extra={"pattern": SIZE_PATTERN})
    steps: Optional[StrictInt] = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: Optional[StrictFloat | StrictInt] = Field(None, ge=0, le=100)
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED, description="image i is seeded seed + i, which must "
                                                                          f"stay <= {MAX_SEED}")
    scheduler: Optional[StrictStr] = Field(None, max_length=100)
    model: Optional[StrictStr] = Field(None, max_length=200)

    @field_validator("prompt", "negative_prompt", "scheduler", "model")
    @classmethod
    def _text(cls, v):
        return valid_text(v)

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v is not None and not SIZE.fullmatch(v):
            raise ValueError("size must be WIDTHxHEIGHT in pixels, e.g. 512x512")
        return v

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, v, info):
        n = info.data.get("n", 1)             # n is declared before seed, so it is validated first
        if v is not None and isinstance(n, int) and v + n - 1 > MAX_SEED:
            raise ValueError(f"seed {v} + n {n} - 1 is more than {MAX_SEED} (image i is seeded seed + i); use a "
                             f"seed <= {MAX_SEED - n + 1}")
        return v

    def dimensions(self) -> "tuple[int, int] | None":
        """(height, width) in pixels, or None for the model's native size."""
        if self.size is None:
            return None
        w, h = SIZE.fullmatch(self.size).groups()
        return int(h), int(w)


class GenerationRequest(JobInput):
    """``POST /v1/images/generations``: OpenAI's Images API body plus diffaccel's extensions."""

    response_format: Literal["b64_json", "url"] = "b64_json"


class JobCreate(JobInput):
    """``POST /v1/jobs``: a job; ``webhook`` gets signed events (``webhook_events_filter``, default all)."""

    webhook: Optional[StrictStr] = Field(None, max_length=2048)
    webhook_events_filter: Optional[list[Literal["start", "progress", "completed"]]] = Field(None, max_length=3)
    id: Optional[StrictStr] = Field(None, max_length=200)     # a client id: idempotent create, like Idempotency-Key

    @field_validator("webhook", "id")
    @classmethod
    def _job_text(cls, v):            # its own name: reusing _text would replace JobInput's validator
        return valid_text(v)

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v):
        if v is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
            raise ValueError("webhook must be an http:// or https:// URL")
        return v


# ---- responses ----------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error | not_found_error | rate_limit_error | server_error | "
                                  "unavailable_error")
    param: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error the server answers, OpenAI-shaped: one line naming what is wrong and the allowed values."""

    error: ErrorDetail


class Progress(BaseModel):
    step: int
    steps: int
    fraction: float


class OutputImage(BaseModel):
    index: int
    seed: int
    url: str


class JobUrls(BaseModel):
    get: str
    cancel: str
    events: str


class JobView(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` shows it (Replicate-like)."""

    id: str
    status: JobStatus
    created_at: float
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    input: dict[str, Any] = Field(description="the resolved work: every default filled in, the seed recorded")
    attempts: int
    progress: Progress
    queue_position: Optional[int] = None
    output: Optional[list[OutputImage]] = None
    error: Optional[str] = None
    metrics: Optional[dict[str, Any]] = None
    urls: JobUrls


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]


class GeneratedImage(BaseModel):
    seed: int
    b64_json: Optional[str] = None
    url: Optional[str] = None


class GenerationResponse(BaseModel):
    """OpenAI's Images API answer plus the job id, each image's seed and the job's metrics."""

    created: int
    id: str
    data: list[GeneratedImage]
    metrics: Optional[dict[str, Any]] = None


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    sizes: str
    default_guidance: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(BaseModel):
    """Liveness (``/health/live``) or readiness (``/health/ready``, ``/health``): ``status`` ok, or ``unavailable``
    with the ``reasons`` (answered with 503)."""

    status: Literal["ok", "unavailable"]
    reasons: list[str] = []
    models: list[str] = []
    queue_depth: int = 0
    running: int = 0
    queue_limit: int = 0
    worker_restarts: int = 0
    uptime_s: float = 0.0
