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
from diffaccel.engines.serving.health import Watchdog
from diffaccel.engines.serving.metrics import Metrics
from diffaccel.engines.serving.models import RequestError, resolve
from diffaccel.engines.serving.schemas import EVENTS, JobStatus
from diffaccel.engines.serving.store import JobStore
from diffaccel.engines.serving.webhooks import Sender
from diffaccel.engines.serving.worker import Worker, finish_status
from diffaccel.optimize.artifact.errors import one_line

log = logging.getLogger(__name__)
PROGRESS_WEBHOOK_EVERY_S = 1.0


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Service:
    def __init__(self, cfg, models: dict, schedulers: "dict | None" = None, worker=Worker):
        """``schedulers`` maps the names requests may use to scheduler classes (default: the aliases of
        :func:`~diffaccel.engines.pipelines.schedulers.served`); ``worker(models, schedulers, policy, on_start,
        on_progress, on_done)`` makes the engine side: the local :class:`Worker` thread, or one that hands jobs to
        Ray Serve replicas."""
        from diffaccel.engines.pipelines.schedulers import served

        self.cfg, self.models = cfg, models
        self.schedulers = served() if schedulers is None else dict(schedulers)
        self.store = JobStore(cfg.db_path)
        self.metrics = Metrics(cfg.max_batch)
        self.hub = EventHub()
        self.worker = worker(models, self.schedulers, cfg.policy, self._started, self._progress, self._done)
        key = cfg.secret_key
        self.egress = cfg.egress()
        self.sender = None if key is None else Sender(self.store, key, cfg.webhook_attempts, cfg.webhook_backoff_s,
                                                      cfg.webhook_timeout_s, self.metrics, self.egress)
        self._webhooks: "dict[str, tuple]" = {}     # job id -> (url, events) for jobs in flight
        self._last_progress_hook: "dict[str, float]" = {}
        self.started_at = None
        self.on_fatal = None                        # called once if the service gives up (the CLI exits then)
        self.watchdog = Watchdog(self)              # restarts a dead engine thread; answers liveness, readiness

    # ---- life ----------------------------------------------------------------------------------------------
    def start(self, loop=None) -> int:
        """Re-enqueue what a previous run left queued or running, start the threads; returns the jobs recovered."""
        self.hub.loop = loop
        recovered, suspects = self.store.recover(self.cfg.max_attempts)
        for job in suspects:
            self._remember_webhook(job)
            self._finish(job["id"], JobStatus.FAILED, (), f"quarantined: the server stopped {job['attempts']} times "
                         "while running this job, so it is not run again (resubmit it to try once more)", None)
            self.metrics.count("diffaccel_jobs_quarantined_total")
        for job in recovered:
            self._remember_webhook(job)
            self.worker.add(job["id"], job["request"])
        if recovered or suspects:
            log.warning("recovered %d job(s) from %s, quarantined %d", len(recovered), self.store.path,
                        len(suspects))
        self.worker.start()
        if self.sender is not None:
            self.sender.start()
        self.watchdog.start()
        self.started_at = time.time()
        return len(recovered)

    def stop(self) -> None:
        self.watchdog.stop()
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
        refused = None if webhook is None else self.egress.problem(webhook)     # resolves the host: call off the loop
        if refused:
            raise RequestError(refused, "webhook")
        if len(self.worker.queue) >= self.cfg.queue_limit:
            self.metrics.count("diffaccel_requests_rejected_total", reason="queue_full")
            raise QueueFull(self.retry_after())
        fingerprint = body.model_dump(exclude={"id", "webhook", "webhook_events_filter"}, exclude_none=True)
        job = self.store.create(work, idem_key, webhook, events, fingerprint=fingerprint)
        if not job["replayed"]:
            self._remember_webhook(job)
            try:
                self.worker.add(job["id"], work)
            except Exception as e:        # committed but not queued: it ends now, failed, not lost
                log.exception("could not queue job %s", job["id"])
                self._finish(job["id"], JobStatus.FAILED, (), one_line(f"could not be queued ({type(e).__name__}: "
                                                                       f"{e})"), None)
                job = dict(self.store.get(job["id"]), replayed=False)
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
                "diffaccel_queue_limit": self.cfg.queue_limit,
                "diffaccel_worker_heartbeat_age_seconds": time.monotonic() - self.worker.heartbeat}

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
        try:
            self.store.mark_running([it.id for it in batch])
        except Exception:             # the jobs run anyway; their end is stored (or failed) when they finish
            log.exception("could not mark %d job(s) running", len(batch))
        for it in batch:
            data = {"id": it.id, "status": "running", "batch_size": sum(x.work["n"] for x in batch)}
            try:
                self.hub.publish(it.id, "start", data)
                self._send(it.id, "start", data, f"msg_{it.id}_start_{time.time_ns()}")
            except Exception:             # events and webhooks are reports: the job runs regardless
                log.exception("could not report the start of job %s", it.id)

    def _progress(self, batch: list) -> None:
        now = time.monotonic()
        for it in batch:
            data = {"id": it.id, "step": it.step, "steps": it.work["steps"]}
            self.hub.publish(it.id, "progress", data)
            if now - self._last_progress_hook.get(it.id, -math.inf) >= PROGRESS_WEBHOOK_EVERY_S or \
                    it.step == it.work["steps"]:
                self._last_progress_hook[it.id] = now
                self._send(it.id, "progress", data, f"msg_{it.id}_progress_{it.step}_{time.time_ns()}")

    def _done(self, batch: list, outcomes: list, end: float) -> None:
        """Store each job's end, on its own: a job whose result cannot be stored (or whose bookkeeping fails) is
        failed with the reason, and its neighbours are stored as they are."""
        images = sum(x.work["n"] for x in batch)
        run_s = end - (batch[0].dispatch if batch[0].dispatch is not None else end)
        self.metrics.observe_batch(images, run_s)
        for it, (mine, error) in zip(batch, outcomes):
            try:
                self._done_one(it, mine, error, images, len(batch), run_s, end)
            except Exception as e:
                log.exception("could not store the result of job %s", it.id)
                reason = one_line(f"the result could not be stored ({type(e).__name__}: {e})")
                self._finish(it.id, JobStatus.FAILED, (), reason, None)

    def _done_one(self, it, mine, error, images: int, jobs: int, run_s: float, end: float) -> None:
        status = finish_status(it, mine, error)
        dispatch = it.dispatch if it.dispatch is not None else end
        metrics = {"queue_s": dispatch - it.arrival, "run_s": run_s, "batch_size": it.engine_batch or images,
                   "batch_jobs": jobs, "steps_done": it.step, "s_per_step": run_s / max(1, it.step)}
        if it.engine_attempts is not None:
            metrics["engine_attempts"] = it.engine_attempts
        self._finish(it.id, status, mine if status == JobStatus.SUCCEEDED else (),
                     error if status == JobStatus.FAILED else None, metrics)
        self.metrics.observe("diffaccel_job_queue_seconds", metrics["queue_s"])
        self.metrics.observe("diffaccel_job_run_seconds", run_s)
        self.metrics.observe("diffaccel_job_latency_seconds", end - it.arrival)

    def _finish(self, job_id, status: JobStatus, images, error, metrics) -> None:
        job = self.store.get(job_id)
        if job is None:
            return
        final = dict(job, status=status.value, error=error, metrics=metrics, finished=time.time())
        data = self._completed_data(final, images)
        try:
            hook = self._hook(job_id, "completed", data, f"msg_{job_id}_completed")
        except Exception:                 # the job's end is stored regardless; only its webhook is lost
            log.exception("could not make the completed webhook of job %s", job_id)
            hook = None
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
