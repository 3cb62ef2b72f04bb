"""What the operator sets when starting a server: one frozen dataclass, validated on construction.

>>> ServeConfig(max_batch=4, max_wait_ms=50).policy
BatchPolicy(max_batch=4, timeout_s=0.05)
>>> ServeConfig(queue_limit=0)
Traceback (most recent call last):
...
ValueError: queue limit 0 must be an integer >= 1
"""
from __future__ import annotations

import base64
import dataclasses
import math
from pathlib import Path

from diffaccel.engines.serving.batching import BatchPolicy
from diffaccel.engines.serving.schemas import MAX_IMAGES, MAX_STEPS


def _int_at_least(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} {value!r} must be an integer >= {low}")


def _number_at_least(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} {value!r} must be a finite number >= {low}")


def decode_secret(secret: str) -> bytes:
    """A Standard Webhooks secret ``whsec_<base64>`` (or bare base64) -> the HMAC key bytes.

    >>> decode_secret("whsec_" + base64.b64encode(b"k" * 24).decode()) == b"k" * 24
    True
    """
    text = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("the webhook secret must be base64, optionally prefixed whsec_ (Standard Webhooks); "
                         "make one with: python -c \"import base64,os;print('whsec_'+base64.b64encode(os.urandom("
                         "24)).decode())\"") from None
    if len(key) < 16:
        raise ValueError(f"the webhook secret has {len(key)} bytes; use 16 to 64 (24 is usual)")
    return key


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Server settings. ``db`` is the SQLite job store (``None``: ``diffaccel-jobs.sqlite`` in the working folder).

    Batching: one engine call takes up to ``max_batch`` images of compatible jobs, dispatched when that many wait or
    the oldest has waited ``max_wait_ms``. Backpressure: at most ``queue_limit`` jobs wait; beyond that a create
    answers 429 with Retry-After. ``webhook_secret`` signs webhooks (Standard Webhooks); without it, jobs that ask
    for a webhook are refused; ``webhook_allow`` (hosts or CIDR networks) opens private targets, refused by default
    (:mod:`~diffaccel.engines.serving.egress`). Health: the engine worker is ready while its heartbeat is younger than
    ``heartbeat_timeout_s``. A job the server died running ``max_attempts`` times is failed (quarantined) instead of
    run again at the next start."""

    db: "str | None" = None
    max_batch: int = 4
    max_wait_ms: float = 50.0
    queue_limit: int = 64
    max_prompt_chars: int = 1000
    max_images: int = 4                  # n per job
    max_steps: int = 150
    default_steps: int = 20
    sync_wait_s: float = 300.0           # the synchronous endpoint answers 202 with the job after this long
    webhook_secret: "str | None" = None
    webhook_attempts: int = 6
    webhook_backoff_s: float = 1.0       # retry k waits backoff * 4**(k-1): 1, 4, 16, 64, 256 s by default
    webhook_timeout_s: float = 5.0
    max_body_bytes: int = 65536
    threads: "int | None" = None         # ONNX Runtime intra-op threads per engine
    webhook_allow: tuple = ()            # hosts / CIDR networks webhooks may reach besides public addresses
    max_attempts: int = 2                # runs a crash may cut off before the job is failed as a suspect
    heartbeat_timeout_s: float = 120.0   # longer than one denoising step of the slowest model served

    def __post_init__(self):
        for name, low in (("max_batch", 1), ("queue_limit", 1), ("max_prompt_chars", 1), ("max_images", 1),
                          ("max_steps", 1), ("default_steps", 1), ("webhook_attempts", 1), ("max_body_bytes", 256),
                          ("max_attempts", 1)):
            _int_at_least(name.replace("_", " "), getattr(self, name), low)
        for name, most in (("max_images", MAX_IMAGES), ("max_steps", MAX_STEPS)):
            if getattr(self, name) > most:
                raise ValueError(f"{name.replace('_', ' ')} {getattr(self, name)} is more than the API allows "
                                 f"({most})")
        for name in ("max_wait_ms", "sync_wait_s", "webhook_backoff_s", "webhook_timeout_s"):
            _number_at_least(name.replace("_", " "), getattr(self, name), 0)
        _number_at_least("heartbeat timeout s", self.heartbeat_timeout_s, 1)
        object.__setattr__(self, "webhook_allow", tuple(self.webhook_allow))
        self.egress()                    # a bad --webhook-allow fails here, naming it
        if self.default_steps > self.max_steps:
            raise ValueError(f"default steps {self.default_steps} exceed max steps {self.max_steps}")
        if self.threads is not None:
            _int_at_least("threads", self.threads, 1)
        if self.webhook_secret is not None:
            decode_secret(self.webhook_secret)

    @property
    def policy(self) -> BatchPolicy:
        return BatchPolicy(self.max_batch, self.max_wait_ms / 1000.0)

    @property
    def db_path(self) -> Path:
        return Path(self.db or "diffaccel-jobs.sqlite")

    def egress(self):
        """The :class:`~diffaccel.engines.serving.egress.EgressPolicy` for webhook targets."""
        from diffaccel.engines.serving.egress import EgressPolicy

        return EgressPolicy(self.webhook_allow)

    @property
    def secret_key(self) -> "bytes | None":
        return None if self.webhook_secret is None else decode_secret(self.webhook_secret)
