"""The engine thread: takes batches of compatible jobs from the :class:`BatchQueue`, runs each batch as one pipeline
call (one seeded generator per image, so each job's images are the ones it would get alone), reports every job's
denoising step, stops at the next step when every job of the batch was canceled, and stores the results. No job can
stop it (see :class:`Worker`).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time

from diffaccel.engines.serving.batching import BatchQueue
from diffaccel.engines.serving.models import batch_key
from diffaccel.engines.serving.schemas import JobStatus
from diffaccel.optimize.artifact.errors import one_line

log = logging.getLogger(__name__)
# zlib level 1 instead of Pillow's 6: the encoding runs on the engine thread between batches, and level 6 took
# 2.6 ms per 64x64 image and 48 / 197 ms per 512 / 1024 image against 0.5 / 25 / 99 ms at level 1, for files
# 0-14% larger (2-core AMD EPYC, Pillow 12; smooth images like a diffusion model's)
PNG_LEVEL = 1


@dataclasses.dataclass(eq=False)
class Item:
    """A queued job as the batcher sees it (``arrival`` on the monotonic clock)."""

    id: str
    arrival: float
    work: dict
    dispatch: "float | None" = None
    batch_id: "int | None" = None
    batch_size: "int | None" = None
    step: int = 0
    cancel: bool = False
    engine_batch: "int | None" = None     # images in the engine call, when another process made it (Ray)
    engine_attempts: "int | None" = None  # engine calls it took (Ray: a lost replica's calls are sent again)
    thread: str = ""                      # the engine thread running it


class Worker:
    """The engine thread(s) over ``models``; ``on_*`` callbacks tell the service what happened (from the thread).

    Nothing a job does stops the thread: a batch whose call fails is run again job by job, so only the job that
    fails is failed, with the reason recorded; a failure while reporting or storing is that job's alone. The thread
    beats a heartbeat at least every second while idle and at every denoising step (readiness reads it), and
    :meth:`ensure_alive` starts a new thread if one died anyway (the service's watchdog calls it)."""

    THREADS = 1
    NAME = "diffaccel-engine"

    def __init__(self, models: dict, schedulers: dict, policy, on_start, on_progress, on_done):
        self.models, self.schedulers = models, schedulers
        self.queue = BatchQueue(policy, key=lambda it: batch_key(it.work), size=lambda it: it.work["n"])
        self.cond = threading.Condition()
        self.running: "dict[str, Item]" = {}
        self._on_start, self._on_progress, self._on_done = on_start, on_progress, on_done
        self._stop = False
        self.batch_seconds = None          # moving average of one engine call (for Retry-After)
        self.heartbeat = time.monotonic()
        self.restarts = 0
        self._threads = [self._spawn(i) for i in range(self.THREADS)]

    def _spawn(self, i: int) -> threading.Thread:
        return threading.Thread(target=self._loop, name=f"{self.NAME}-{i}" if self.THREADS > 1 else self.NAME,
                                daemon=True)

    def start(self) -> None:
        self.heartbeat = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        for t in self._threads:
            t.join(timeout=60)

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def ensure_alive(self) -> int:
        """Start a new thread in place of each one that died (jobs it was running fail, reason recorded); the
        number restarted."""
        if self._stop:
            return 0
        dead = [i for i, t in enumerate(self._threads) if t.ident is not None and not t.is_alive()]
        for i in dead:
            log.error("the engine thread %s died; starting a new one", self._threads[i].name)
            with self.cond:
                orphans = [it for it in self.running.values() if it.thread == self._threads[i].name]
            self._fail(orphans, "the engine thread stopped while running this job (it was restarted)")
            self._threads[i] = self._spawn(i)
            self._threads[i].start()
            self.restarts += 1
        return len(dead)

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def add(self, job_id: str, work: dict) -> Item:
        with self.cond:
            item = Item(job_id, time.monotonic(), work)
            self.queue.add(item)
            self.cond.notify()
        return item

    def cancel(self, job_id: str) -> str:
        """'queued' (taken out of the queue), 'running' (stops at the next step) or '' (not here)."""
        with self.cond:
            if self.queue.remove(job_id):
                return "queued"
            item = self.running.get(job_id)
            if item is not None:
                item.cancel = True
                return "running"
        return ""

    def _take(self) -> "list | None":
        with self.cond:
            while not self._stop:
                self.beat()
                now = time.monotonic()
                if self.queue.ready(now):
                    batch = self.queue.next_batch(now)
                    name = threading.current_thread().name
                    for it in batch:
                        it.thread = name
                    self.running.update((it.id, it) for it in batch)
                    return batch
                deadline = self.queue.next_deadline()
                self.cond.wait(1.0 if deadline is None else min(1.0, max(0.0, deadline - now)))
        return None

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._serve(batch)
            except Exception as e:       # a bug in the bookkeeping itself: these jobs fail, the thread goes on
                log.exception("engine worker failed serving a batch")
                self._fail(batch, one_line(f"{type(e).__name__}: {e}"))
            finally:
                with self.cond:
                    for it in batch:
                        self.running.pop(it.id, None)

    def _serve(self, batch: list) -> None:
        self._on_start(batch)
        outcomes = self._outcomes(batch)
        end = time.monotonic()
        seconds = end - batch[0].dispatch
        self.batch_seconds = seconds if self.batch_seconds is None else 0.8 * self.batch_seconds + 0.2 * seconds
        self._on_done(batch, outcomes, end)

    def _outcomes(self, batch: list) -> list:
        """Per job, (its images, None) or (None, why it failed). A failed call of several jobs is run again job by
        job, so a poison job fails alone and its neighbours get the images they would get anyway."""
        try:
            return [(images, None) for images in self._run(batch)]
        except Exception as e:
            error = one_line(f"{type(e).__name__}: {e}")
            log.exception("engine call of %d job(s) failed", len(batch))
        live = [it for it in batch if not it.cancel]
        if len(batch) == 1 or not live:
            return [(None, error)] * len(batch)
        log.warning("running the %d jobs of the failed batch one by one", len(live))
        out = []
        for it in batch:
            try:
                out.append((None, None) if it.cancel else (self._run([it])[0], None))
            except Exception as e:
                log.exception("job %s failed alone", it.id)
                out.append((None, one_line(f"{type(e).__name__}: {e}")))
        return out

    def _fail(self, items: list, reason: str) -> None:
        """Record ``items`` as failed with ``reason``, each on its own (a failure to record one is logged)."""
        for it in items:
            try:
                self._on_done([it], [(None, reason)], time.monotonic())
            except Exception:
                log.exception("could not record job %s as failed", it.id)

    def _run(self, batch: list) -> list:
        """One pipeline call; returns, per job, its list of (seed, PNG bytes)."""
        def on_step(step: int) -> bool:
            self.beat()
            for it in batch:
                it.step = step
            try:
                self._on_progress(batch)
            except Exception:            # progress is best effort: the job goes on
                log.exception("progress report failed")
            return all(it.cancel for it in batch)

        return run_batch(self.models, self.schedulers, [it.work for it in batch], on_step)


def run_batch(models: dict, schedulers: dict, works: list, on_step=None) -> list:
    """Run compatible ``works`` (equal :func:`batch_key`) as one pipeline call, one seeded generator per image;
    returns, per work, its list of (seed, PNG bytes). ``on_step(step)`` is called after each denoising step; when
    it returns True the remaining steps are skipped."""
    import torch

    w = works[0]
    model = models[w["model"]]
    pipe = model.pipe
    cls = schedulers[w["scheduler"]] if w["scheduler"] != "default" else model.default_scheduler
    pipe.scheduler = cls.from_config(model.base_scheduler_config)
    seeds = [x["seed"] + i for x in works for i in range(x["n"])]
    prompts = [x["prompt"] for x in works for _ in range(x["n"])]
    # no negative prompt at all is None, as `diffaccel generate` passes it: SDXL pipelines with
    # force_zeros_for_empty_prompt then use zeros, not the empty prompt's embedding (batch_key keeps the two apart)
    negatives = [x["negative_prompt"] or "" for x in works for _ in range(x["n"])]
    negatives = negatives if any(negatives) else None

    def callback(p, i, t, kwargs):
        if on_step is not None and on_step(i + 1):
            p._interrupt = True               # diffusers skips the remaining steps
        return kwargs

    out = pipe(prompts, negative_prompt=negatives, num_inference_steps=w["steps"], guidance_scale=w["guidance_scale"],
               height=w["height"], width=w["width"], generator=[torch.Generator().manual_seed(s) for s in seeds],
               output_type="pil", callback_on_step_end=callback).images
    results, k = [], 0
    for x in works:
        mine = []
        for _ in range(x["n"]):
            buf = io.BytesIO()
            out[k].save(buf, format="PNG", compress_level=PNG_LEVEL)
            mine.append((seeds[k], buf.getvalue()))
            k += 1
        results.append(mine)
    return results


def finish_status(item: Item, images, error: "str | None") -> JobStatus:
    if item.cancel:
        return JobStatus.CANCELED
    return JobStatus.FAILED if error is not None or images is None else JobStatus.SUCCEEDED
