"""The API's contract: request bodies as pydantic models (strict types, unknown fields refused), and the job states.

The synchronous body is OpenAI's Images API (``prompt``, ``n``, ``size`` as ``WIDTHxHEIGHT``, ``response_format``)
plus diffaccel's extensions; a job body is the same minus ``response_format``, plus a webhook. What depends on the
served artifacts (sizes, models, schedulers) is checked by :mod:`diffaccel.engines.serving.models`.

>>> JobInput(prompt="a red circle", size="64x48").dimensions()
(48, 64)
>>> JobInput(prompt="x", size="big")
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for JobInput
...
"""
from __future__ import annotations

import enum
import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
EVENTS = ("start", "progress", "completed")
MAX_SEED = 2**63 - 1


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
    n: StrictInt = Field(1, ge=1)
    size: Optional[StrictStr] = None
    steps: Optional[StrictInt] = Field(None, ge=1)
    guidance_scale: Optional[StrictFloat | StrictInt] = Field(None, ge=0, le=100)
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED)
    scheduler: Optional[StrictStr] = None
    model: Optional[StrictStr] = None

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v is not None and not SIZE.match(v):
            raise ValueError("size must be WIDTHxHEIGHT in pixels, e.g. 512x512")
        return v

    def dimensions(self) -> "tuple[int, int] | None":
        """(height, width) in pixels, or None for the model's native size."""
        if self.size is None:
            return None
        w, h = SIZE.match(self.size).groups()
        return int(h), int(w)


class GenerationRequest(JobInput):
    """``POST /v1/images/generations``: OpenAI's Images API body plus diffaccel's extensions."""

    response_format: Literal["b64_json", "url"] = "b64_json"


class JobCreate(JobInput):
    """``POST /v1/jobs``: a job; ``webhook`` gets signed events (``webhook_events_filter``, default all)."""

    webhook: Optional[StrictStr] = Field(None, max_length=2048)
    webhook_events_filter: Optional[list[Literal["start", "progress", "completed"]]] = None
    id: Optional[StrictStr] = Field(None, max_length=200)     # a client id: idempotent create, like Idempotency-Key

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v):
        if v is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", v):
            raise ValueError("webhook must be an http:// or https:// URL")
        return v
