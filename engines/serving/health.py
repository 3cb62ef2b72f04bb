"""Health that tells the truth: liveness and readiness as Kubernetes and Ray Serve expect them, and the watchdog that
restarts a dead engine thread.

*Live* (``/health/live``): the engine threads run and the service has not given up; a supervisor restarts what is not
live. *Ready* (``/health/ready``, ``/health``): live, started, the engine's heartbeat younger than the configured
timeout (a hung call is not ready) and the job store takes a write; a load balancer sends traffic only to what is
ready. Past :data:`RESTART_BUDGET` restarts the service gives up: liveness fails and ``service.on_fatal`` is called
(the CLI stops the process, which exits non-zero).
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)
RESTART_BUDGET = (5, 60.0)          # more worker restarts than this within this many seconds: give up (not live)


class Watchdog:
    """A thread that checks the service's engine threads every second; and the service's health verdicts."""

    def __init__(self, service):
        self.service = service
        self.fatal: "str | None" = None             # why the service gave up (liveness fails)
        self._restarts: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="diffaccel-watchdog", daemon=True)
        self._probe = (-float("inf"), None)         # (when, result) of the last store write probe

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(1.0) and self.fatal is None:
            try:
                n = self.service.worker.ensure_alive()
            except Exception:
                log.exception("restarting the engine thread failed")
                n = 1
            if n:
                self._restarted(n)

    def _restarted(self, n: int) -> None:
        now, (most, window) = time.monotonic(), RESTART_BUDGET
        self.service.metrics.count("diffaccel_worker_restarts_total", n)
        self._restarts = [t for t in self._restarts if now - t < window] + [now] * n
        if len(self._restarts) > most:
            self.fatal = f"the engine thread died {len(self._restarts)} times in {window:g} s"
            log.critical("%s; giving up so that a supervisor restarts the process", self.fatal)
            if self.service.on_fatal is not None:
                self.service.on_fatal()

    def _store_problem(self) -> "str | None":
        when, result = self._probe
        if time.monotonic() - when > 1.0:          # one write probe a second at most, however often health is asked
            self._probe = (time.monotonic(), self.service.store.writable())
        return self._probe[1]

    def live_problems(self) -> list:
        """Why the process should be restarted ([] = live): the service gave up, or an engine thread is dead."""
        if self.fatal:
            return [self.fatal]
        s = self.service
        return [] if s.worker.alive or s.started_at is None else ["an engine thread is not running"]

    def ready_problems(self) -> list:
        """Why the server should get no traffic now ([] = ready): not live, not started, the engine's heartbeat is
        older than ``heartbeat_timeout_s`` (a call hung), or the job store cannot be written."""
        s = self.service
        problems = self.live_problems()
        if s.started_at is None:
            problems.append("not started")
        age, limit = time.monotonic() - s.worker.heartbeat, s.cfg.heartbeat_timeout_s
        if age > limit:
            problems.append(f"the engine has not reported for {age:.0f} s (limit {limit:g})")
        store = self._store_problem()
        return problems + ([store] if store else [])

    def answer(self, problems: list) -> dict:
        """The health body: ``status`` ok or unavailable, the ``reasons``, and what the server is doing."""
        s = self.service
        return {"status": "unavailable" if problems else "ok", "reasons": problems, "models": list(s.models),
                "queue_depth": len(s.worker.queue), "running": len(s.worker.running),
                "queue_limit": s.cfg.queue_limit, "worker_restarts": s.worker.restarts,
                "uptime_s": time.time() - (s.started_at or time.time())}
