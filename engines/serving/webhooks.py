"""Webhooks signed the Standard Webhooks way, delivered from a durable outbox with retries and backoff.

Each event is one delivery with a fixed ``webhook-id`` (the same on every retry, so receivers can drop duplicates);
each attempt is signed anew: ``webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`` with
``webhook-timestamp`` the attempt's Unix seconds. A 2xx answer ends the delivery; anything else (or no answer within
the timeout) retries after ``backoff * 4**(attempt-1)`` seconds, up to ``attempts`` tries.

>>> now = int(time.time())
>>> sig = sign(b"k" * 24, "msg_1", now, b'{"a":1}')
>>> sig.startswith("v1,"), verify(b"k" * 24, "msg_1", now, b'{"a":1}', sig)
(True, True)
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(key: bytes, msg_id: str, timestamp: int, body: bytes, header: str, tolerance_s: float = 300) -> bool:
    """What a receiver does: any ``v1,`` signature in the space-separated header matches, and the timestamp is
    within ``tolerance_s`` of now."""
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    want = sign(key, msg_id, int(timestamp), body)
    return any(hmac.compare_digest(want, s) for s in header.split())


def headers(key: bytes, msg_id: str, body: bytes, now: "float | None" = None) -> dict:
    ts = int(time.time() if now is None else now)
    return {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(key, msg_id, ts, body), "user-agent": "diffaccel-webhooks"}


class Sender:
    """A thread that posts due deliveries from the store's outbox; :meth:`wake` after queueing one."""

    def __init__(self, store, key: bytes, attempts: int, backoff_s: float, timeout_s: float, metrics=None):
        self.store, self.key, self.attempts = store, key, attempts
        self.backoff_s, self.timeout_s, self.metrics = backoff_s, timeout_s, metrics
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="diffaccel-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=self.timeout_s + 5)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop:
            for d in self.store.due_deliveries(time.time()):
                if self._stop:
                    return
                self._attempt(d)
            nxt = self.store.next_delivery_at()
            self._wake.wait(timeout=1.0 if nxt is None else min(1.0, max(0.0, nxt - time.time())))
            self._wake.clear()

    def _attempt(self, d: dict) -> None:
        body = d["body"].encode()
        req = urllib.request.Request(d["url"], data=body, method="POST", headers=headers(self.key, d["id"], body))
        error = None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                ok = 200 <= resp.status < 300
                error = None if ok else f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            ok, error = False, f"HTTP {e.code}"
        except Exception as e:     # refused, timed out, bad host: retried like a 5xx
            ok, error = False, f"{type(e).__name__}: {e}"[:300]
        tries = d["attempts"] + 1
        retry_at = None if ok or tries >= self.attempts else time.time() + self.backoff_s * 4 ** (tries - 1)
        self.store.delivery_result(d["id"], ok, error, retry_at)
        if self.metrics is not None:
            self.metrics.count("diffaccel_webhook_deliveries_total",
                               outcome="delivered" if ok else "retry" if retry_at else "failed")
        if not ok:
            log.warning("webhook %s to %s failed (%s), attempt %d of %d", d["id"], d["url"], error, tries,
                        self.attempts)
