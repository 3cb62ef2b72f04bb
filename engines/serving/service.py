"""The service behind the HTTP routes: accepts jobs (durably, before answering), feeds the engine thread, reports
progress, finishes jobs, queues webhooks, and answers what a job looks like. The FastAPI app in
:mod:`diffaccel.engines.serving.app` only translates HTTP to these calls.
"""
from __future__ import annotations

import json
import logging
import math
import time

from diffaccel.engines.serving.events import EventHub
from diffaccel.engines.serving.metrics import Metrics
from diffaccel.engines.serving.models import RequestError, resolve
from diffaccel.engines.serving.schemas import EVENTS, JobStatus
from diffaccel.engines.serving.store import JobStore
from diffaccel.engines.serving.webhooks import Sender
from diffaccel.engines.serving.worker import Worker, finish_status

log = logging.getLogger(__name__)
PROGRESS_WEBHOOK_EVERY_S = 1.0


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Service:
    def __init__(self, cfg, models: dict, schedulers: dict, worker=Worker):
        """``worker(models, schedulers, policy, on_start, on_progress, on_done)`` makes the engine side: the local
        :class:`Worker` thread, or one that hands jobs to Ray Serve replicas."""
        self.cfg, self.models, self.schedulers = cfg, models, schedulers
        self.store = JobStore(cfg.db_path)
        self.metrics = Metrics(cfg.max_batch)
        self.hub = EventHub()
        self.worker = worker(models, schedulers, cfg.policy, self._started, self._progress, self._done)
        key = cfg.secret_key
        self.sender = None if key is None else Sender(self.store, key, cfg.webhook_attempts, cfg.webhook_backoff_s,
                                                      cfg.webhook_timeout_s, self.metrics)
        self._webhooks: "dict[str, tuple]" = {}     # job id -> (url, events) for jobs in flight
        self._last_progress_hook: "dict[str, float]" = {}
        self.started_at = None

    # ---- life ----------------------------------------------------------------------------------------------
    def start(self, loop=None) -> int:
        """Re-enqueue what a previous run left queued or running, start the threads; returns the jobs recovered."""
        self.hub.loop = loop
        recovered = self.store.recover()
        for job in recovered:
            self._remember_webhook(job)
            self.worker.add(job["id"], job["request"])
        if recovered:
            log.warning("recovered %d job(s) from %s", len(recovered), self.store.path)
        self.worker.start()
        if self.sender is not None:
            self.sender.start()
        self.started_at = time.time()
        return len(recovered)

    def stop(self) -> None:
        self.worker.stop()
        if self.sender is not None:
            self.sender.stop()
        self.store.close()

    # ---- accepting -----------------------------------------------------------------------------------------
    def retry_after(self) -> int:
        per_batch = self.worker.batch_seconds or 1.0
        return max(1, math.ceil(per_batch * (self.worker.queue.images / self.cfg.max_batch + 1)))

    def create(self, body, idem_key=None, webhook=None, events=None) -> dict:
        """Check ``body`` against the engines, commit it as a queued job and enqueue it (RequestError, QueueFull,
        IdempotencyConflict)."""
        work = resolve(body, self.models, self.schedulers, self.cfg)
        if webhook is not None and self.sender is None:
            raise RequestError("this server signs no webhooks; start it with --webhook-secret (Standard Webhooks "
                               "secret) to use them", "webhook")
        if len(self.worker.queue) >= self.cfg.queue_limit:
            self.metrics.count("diffaccel_requests_rejected_total", reason="queue_full")
            raise QueueFull(self.retry_after())
        fingerprint = body.model_dump(exclude={"id", "webhook", "webhook_events_filter"}, exclude_none=True)
        job = self.store.create(work, idem_key, webhook, events, fingerprint=fingerprint)
        if not job["replayed"]:
            self._remember_webhook(job)
            self.worker.add(job["id"], work)
        return job

    def cancel(self, job_id: str) -> "dict | None":
        job = self.store.get(job_id)
        if job is None or JobStatus(job["status"]).terminal:
            return job
        where = self.worker.cancel(job_id)
        if where != "running":                  # queued (or no longer in the queue): it ends now
            self._finish(job_id, JobStatus.CANCELED, (), None, None)
        return self.store.get(job_id)

    # ---- what a job looks like -----------------------------------------------------------------------------
    def queue_position(self, job_id: str) -> "int | None":
        with self.worker.cond:
            for i, it in enumerate(self.worker.queue):
                if it.id == job_id:
                    return i
        return None

    def view(self, job: dict, base: str = "") -> dict:
        """A job as the API shows it (Replicate-like): status, progress, outputs with seeds, error, metrics, urls."""
        jid, status, w = job["id"], JobStatus(job["status"]), job["request"]
        item = self.worker.running.get(jid)
        step = item.step if item is not None else (job["metrics"] or {}).get("steps_done", 0)
        out = {"id": jid, "status": status.value, "created_at": job["created"], "started_at": job["started"],
               "completed_at": job["finished"], "input": w, "attempts": job["attempts"],
               "progress": {"step": step, "steps": w["steps"], "fraction": step / w["steps"]},
               "queue_position": self.queue_position(jid) if status == JobStatus.QUEUED else None,
               "output": None, "error": job["error"], "metrics": job["metrics"],
               "urls": {"get": f"{base}/v1/jobs/{jid}", "cancel": f"{base}/v1/jobs/{jid}/cancel",
                        "events": f"{base}/v1/jobs/{jid}/events"}}
        if status == JobStatus.SUCCEEDED:
            out["output"] = [{"index": i, "seed": seed, "url": f"{base}/v1/jobs/{jid}/images/{i}.png"}
                             for i, seed in self.store.images(jid)]
        return out

    def gauges(self) -> dict:
        return {"diffaccel_queue_depth": len(self.worker.queue), "diffaccel_jobs_running": len(self.worker.running),
                "diffaccel_queue_limit": self.cfg.queue_limit}

    # ---- from the engine thread ----------------------------------------------------------------------------
    def _remember_webhook(self, job: dict) -> None:
        if job.get("webhook"):
            self._webhooks[job["id"]] = (job["webhook"], tuple(job.get("webhook_events") or EVENTS))

    def _hook(self, job_id: str, event: str, data: dict, delivery_id: str) -> "tuple | None":
        url, events = self._webhooks.get(job_id, (None, ()))
        if url is None or event not in events:
            return None
        body = json.dumps({"type": f"job.{event}", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "data": data})
        return delivery_id, url, body

    def _send(self, job_id: str, event: str, data: dict, delivery_id: str) -> None:
        d = self._hook(job_id, event, data, delivery_id)
        if d is not None:
            self.store.add_deliveries(job_id, [d])
            self.sender.wake()

    def _started(self, batch: list) -> None:
        self.store.mark_running([it.id for it in batch])
        for it in batch:
            data = {"id": it.id, "status": "running", "batch_size": sum(x.work["n"] for x in batch)}
            self.hub.publish(it.id, "start", data)
            self._send(it.id, "start", data, f"msg_{it.id}_start_{time.time_ns()}")

    def _progress(self, batch: list) -> None:
        now = time.monotonic()
        for it in batch:
            data = {"id": it.id, "step": it.step, "steps": it.work["steps"]}
            self.hub.publish(it.id, "progress", data)
            if now - self._last_progress_hook.get(it.id, -math.inf) >= PROGRESS_WEBHOOK_EVERY_S or \
                    it.step == it.work["steps"]:
                self._last_progress_hook[it.id] = now
                self._send(it.id, "progress", data, f"msg_{it.id}_progress_{it.step}_{time.time_ns()}")

    def _done(self, batch: list, results, error, end: float) -> None:
        images = sum(x.work["n"] for x in batch)
        run_s = end - batch[0].dispatch
        self.metrics.observe_batch(images, run_s)
        for k, it in enumerate(batch):
            status = finish_status(it, error)
            metrics = {"queue_s": it.dispatch - it.arrival, "run_s": run_s, "batch_size": it.engine_batch or images,
                       "batch_jobs": len(batch), "steps_done": it.step, "s_per_step": run_s / max(1, it.step)}
            if it.engine_attempts is not None:
                metrics["engine_attempts"] = it.engine_attempts
            mine = results[k] if results is not None and status == JobStatus.SUCCEEDED else ()
            self._finish(it.id, status, mine, error if status == JobStatus.FAILED else None, metrics)
            self.metrics.observe("diffaccel_job_queue_seconds", metrics["queue_s"])
            self.metrics.observe("diffaccel_job_run_seconds", run_s)
            self.metrics.observe("diffaccel_job_latency_seconds", end - it.arrival)

    def _finish(self, job_id, status: JobStatus, images, error, metrics) -> None:
        job = self.store.get(job_id)
        final = dict(job, status=status.value, error=error, metrics=metrics, finished=time.time())
        data = self._completed_data(final, images)
        hook = self._hook(job_id, "completed", data, f"msg_{job_id}_completed")
        if not self.store.finish(job_id, status, images, error, metrics, [hook] if hook else []):
            return                                      # already ended (e.g. canceled while queued)
        self.metrics.count("diffaccel_jobs_total", status=status.value)
        self.metrics.count("diffaccel_images_total", len(images))
        self._webhooks.pop(job_id, None)
        self._last_progress_hook.pop(job_id, None)
        self.hub.publish(job_id, "completed", data)
        if hook:
            self.sender.wake()

    def _completed_data(self, job: dict, images) -> dict:
        data = {k: job[k] for k in ("id", "status", "error", "metrics")}
        data["output"] = [{"index": i, "seed": seed, "url": f"/v1/jobs/{job['id']}/images/{i}.png"}
                          for i, (seed, _) in enumerate(images)] or None
        return data
