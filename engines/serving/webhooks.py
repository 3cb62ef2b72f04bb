"""Webhooks signed the Standard Webhooks way, delivered from a durable outbox with retries and backoff.

Each event is one delivery with a fixed ``webhook-id`` (the same on every retry, so receivers can drop duplicates);
each attempt is signed anew: ``webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`` with
``webhook-timestamp`` the attempt's Unix seconds. A 2xx answer ends the delivery; anything else (or no answer within
the timeout) retries after ``backoff * 4**(attempt-1)`` seconds, up to ``attempts`` tries. Each attempt goes only
where the :class:`~diffaccel.engines.serving.egress.EgressPolicy` allows, to the address it checked; redirects are not
followed (a 3xx is a failed attempt), so a receiver cannot bounce a delivery inside the network.

>>> now = int(time.time())
>>> sig = sign(b"k" * 24, "msg_1", now, b'{"a":1}')
>>> sig.startswith("v1,"), verify(b"k" * 24, "msg_1", now, b'{"a":1}', sig)
(True, True)
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import logging
import socket
import ssl
import threading
import time
import urllib.parse

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


def post(policy, url: str, body: bytes, head: dict, timeout_s: float) -> int:
    """POST ``body`` to ``url`` at an address ``policy`` allows (resolved and checked now, then connected to
    directly); the HTTP status. Raises ValueError (a refused target), LookupError or OSError."""
    scheme, host, port, ips = policy.addresses(url)
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sock = None
    for ip in ips:
        try:
            sock = socket.create_connection((str(ip), port), timeout=timeout_s)
            break
        except OSError:
            if ip == ips[-1]:
                raise
    if scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    conn.sock = sock                       # the checked address; Host stays the URL's
    name = f"[{host}]" if ":" in host else host
    name = name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"
    try:
        conn.request("POST", target, body=body, headers={**head, "Host": name})
        return conn.getresponse().status
    finally:
        conn.close()


class Sender:
    """A thread that posts due deliveries from the store's outbox; :meth:`wake` after queueing one."""

    def __init__(self, store, key: bytes, attempts: int, backoff_s: float, timeout_s: float, metrics=None,
                 policy=None):
        from diffaccel.engines.serving.egress import EgressPolicy

        self.store, self.key, self.attempts = store, key, attempts
        self.backoff_s, self.timeout_s, self.metrics = backoff_s, timeout_s, metrics
        self.policy = policy or EgressPolicy()
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
            try:
                for d in self.store.due_deliveries(time.time()):
                    if self._stop:
                        return
                    self._attempt(d)
                nxt = self.store.next_delivery_at()
            except Exception:          # the store failed (disk full, locked): try again in a second, never die
                log.exception("webhook outbox failed; retrying")
                nxt = None
            self._wake.wait(timeout=1.0 if nxt is None else min(1.0, max(0.0, nxt - time.time())))
            self._wake.clear()

    def _attempt(self, d: dict) -> None:
        body = d["body"].encode()
        refused = False
        try:
            status = post(self.policy, d["url"], body, headers(self.key, d["id"], body), self.timeout_s)
            ok, error = 200 <= status < 300, None if 200 <= status < 300 else f"HTTP {status}"
        except ValueError as e:    # a target the policy refuses (it resolves to a private address now): no retry
            ok, error, refused = False, f"refused: {e}"[:300], True
        except Exception as e:     # refused connection, timed out, does not resolve: retried like a 5xx
            ok, error = False, f"{type(e).__name__}: {e}"[:300]
        tries = d["attempts"] + 1
        retry_at = None if ok or refused or tries >= self.attempts else \
            time.time() + self.backoff_s * 4 ** (tries - 1)
        self.store.delivery_result(d["id"], ok, error, retry_at)
        if self.metrics is not None:
            self.metrics.count("diffaccel_webhook_deliveries_total",
                               outcome="delivered" if ok else "retry" if retry_at else "failed")
        if not ok:
            log.warning("webhook %s to %s failed (%s), attempt %d of %d", d["id"], d["url"], error, tries,
                        self.attempts)
