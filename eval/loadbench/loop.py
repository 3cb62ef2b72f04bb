"""Load benchmark: a real in-process serving loop with dynamic batching, measured per request.

Requests arrive (Poisson at ``rate`` requests/s, or ``concurrency`` closed-loop clients that each send the next
request when the previous one returns), wait in a queue and leave it in batches chosen by a
:class:`~diffaccel.engines.serving.batching.BatchPolicy`. One worker thread runs each batch as one pipeline call, with one
generator per request (so an image depends only on its own prompt and seed), and returns each image to its request.
Every time is ``time.perf_counter`` seconds since the run started. Runs are bounded in count (``requests``) or time
(``duration_s``: stop admitting, then drain), and by a hard ``time_limit_s`` after which queued requests are left
unserved and counted as such.

>>> parse_rate("2.5"), parse_rate("1x")
((2.5, False), (1.0, True))
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import math
import threading
import time

from diffaccel.optimize.sources.prompts import default_prompts
from diffaccel.engines.serving.batching import BatchPolicy, BatchQueue, Request

MAX_REQUESTS = 10_000


def parse_rate(text) -> tuple:
    """``"2.5"`` -> 2.5 requests/s; ``"1x"`` -> 1 times the measured batch-1 capacity. Returns (value, relative)."""
    t = str(text).strip().lower()
    relative = t.endswith("x")
    try:
        value = float(t[:-1] if relative else t)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bad rate {text!r}: give requests per second > 0 (e.g. 2.5) or a multiple of the "
                         "measured batch-1 capacity (e.g. 1x)")
    return value, relative


def _positive(name, value, kind=float, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} {value!r} must be {'an integer' if kind is int else 'a number'} > 0")


def check_timeout_ms(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"batch timeout {value!r} ms must be a finite number >= 0 (0: never wait for a batch "
                         "to fill)")


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """One load test. Give ``rate`` (Poisson arrivals, requests/s; with ``rate_relative`` a multiple of the
    measured batch-1 capacity) or ``concurrency`` (closed-loop clients), and ``requests`` and/or ``duration_s``."""

    rate: "float | None" = 1.0
    rate_relative: bool = True
    concurrency: "int | None" = None
    requests: "int | None" = 48
    duration_s: "float | None" = None
    max_batch: int = 4
    timeout_ms: float = 100.0
    steps: int = 10
    height: "int | None" = None
    width: "int | None" = None
    guidance: float = 7.5
    seed: int = 0
    time_limit_s: float = 300.0

    def __post_init__(self):
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give either an arrival rate or a number of concurrent clients, not both")
        _positive("rate", self.rate)
        _positive("concurrency", self.concurrency, int)
        if self.requests is None and self.duration_s is None:
            raise ValueError("bound the run with a number of requests, a duration, or both")
        _positive("requests", self.requests, int)
        if self.requests is not None and self.requests > MAX_REQUESTS:
            raise ValueError(f"requests {self.requests} exceeds the limit of {MAX_REQUESTS}")
        _positive("duration", self.duration_s)
        _positive("steps", self.steps, int, allow_none=False)
        _positive("time limit", self.time_limit_s, allow_none=False)
        for name in ("height", "width"):
            _positive(name, getattr(self, name), int)
        check_timeout_ms(self.timeout_ms)
        self.policy  # validates max_batch

    @property
    def policy(self) -> BatchPolicy:
        return BatchPolicy(self.max_batch, self.timeout_ms / 1000.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Server:
    """One worker thread serving a :class:`BatchQueue`: ``run_batch(list of Request) -> list of images``."""

    def __init__(self, run_batch, policy: BatchPolicy, time_limit_s: float, clock=time.perf_counter):
        self._run_batch, self._clock = run_batch, clock
        self.queue, self.stop_at = BatchQueue(policy), time_limit_s
        self._cond = threading.Condition()
        self._futures: dict = {}
        self.requests, self.batches, self.unserved = [], [], []
        self.closed = self.finished = False
        self.error: "BaseException | None" = None
        self._t0 = clock()
        self._thread = threading.Thread(target=self._work, name="diffaccel-bench-worker", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return self._clock() - self._t0

    def submit(self, request: Request) -> "concurrent.futures.Future | None":
        """Queue ``request`` (stamping its arrival); its future gets the image. None once the server stopped."""
        with self._cond:
            now = self.now()
            if self.closed or self.finished or now >= self.stop_at:
                return None
            request.arrival = now
            self._futures[request.id] = future = concurrent.futures.Future()
            self.requests.append(request)
            self.queue.add(request)
            self._cond.notify()
        return future

    def close(self, abandon: bool = False) -> None:
        """Admit nothing more; the worker drains the queue (policy unchanged), or with ``abandon`` leaves it
        unserved after the batch in flight, and stops."""
        with self._cond:
            self.closed = True
            if abandon:
                self.stop_at = min(self.stop_at, self.now())
            self._cond.notify()
        self._thread.join()

    def _take(self) -> "list | None":
        with self._cond:
            while True:
                now = self.now()
                if now >= self.stop_at:
                    return None
                if self.queue.ready(now):
                    return self.queue.next_batch(now)
                if self.closed and not len(self.queue):
                    return None
                deadline = self.queue.next_deadline()
                self._cond.wait(min(self.stop_at, self.stop_at if deadline is None else deadline) - now)

    def _work(self) -> None:
        try:
            while (batch := self._take()) is not None:
                images = self._run_batch(batch)
                if len(images) != len(batch):
                    raise RuntimeError(f"the pipeline returned {len(images)} images for a batch of {len(batch)}")
                end = self.now()
                self.batches.append({"id": batch[0].batch_id, "size": len(batch), "start": batch[0].dispatch,
                                     "end": end})
                for r, image in zip(batch, images):
                    r.done = end
                    self._futures.pop(r.id).set_result(image)
        except BaseException as e:  # re-raised by serve(); the clients are released below
            self.error = e
        with self._cond:
            self.finished = True
            self.unserved = [r for r in self.requests if r.done is None]
            for r in self.unserved:
                self._futures.pop(r.id).cancel()
            self.queue.take_all()


class _Sink:
    """Receives each request's image: checks one arrives per request and, if asked, keeps it."""

    def __init__(self, keep: bool):
        self.keep, self.received, self.sizes, self.images = keep, collections.Counter(), {}, {}

    def attach(self, request: Request, future) -> None:
        def receive(f, rid=request.id):
            if f.cancelled() or f.exception() is not None:
                return
            self.received[rid] += 1
            self.sizes[rid] = list(f.result().size)
            if self.keep:
                self.images[rid] = f.result()
        future.add_done_callback(receive)


def poisson_arrivals(rate: float, requests: "int | None", duration_s: "float | None", seed: int):
    """Seeded arrival times (seconds) of a Poisson process: ``requests`` of them, or those before ``duration_s``."""
    import numpy as np

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=requests or MAX_REQUESTS)
    times = np.cumsum(gaps)
    return times[times <= duration_s] if duration_s is not None else times


def _open_loop(server: Server, cfg: LoadConfig, rate: float, make, sink) -> None:
    for i, t in enumerate(poisson_arrivals(rate, cfg.requests, cfg.duration_s, cfg.seed)):
        if t >= server.stop_at:
            return
        delay = t - server.now()
        if delay > 0:
            time.sleep(delay)
        request = make(i, None)
        future = server.submit(request)
        if future is None:
            return
        sink.attach(request, future)


def _closed_loop(server: Server, cfg: LoadConfig, make, sink) -> None:
    ids, lock = itertools.count(), threading.Lock()

    def client(c: int) -> None:
        while True:
            with lock:
                i = next(ids)
            if (cfg.requests is not None and i >= cfg.requests) or \
                    (cfg.duration_s is not None and server.now() >= cfg.duration_s):
                return
            request = make(i, c)
            future = server.submit(request)
            if future is None:
                return
            sink.attach(request, future)
            try:
                future.result()
            except BaseException:  # cancelled at the time limit, or the pipeline failed: the run reports it
                return

    threads = [threading.Thread(target=client, args=(c,), name=f"diffaccel-bench-client-{c}", daemon=True)
               for c in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def serve(run_batch, cfg: LoadConfig, rate: "float | None", prompts, keep_images: bool = False) -> dict:
    """Run one load test against ``run_batch``. ``rate`` is in requests/s (None for closed-loop clients).
    Returns per-request records, per-batch records, the wall time and (if kept) the images by request id."""
    prompts = tuple(prompts) or default_prompts()
    sink = _Sink(keep_images)

    def make(i: int, client) -> Request:
        return Request(i, 0.0, prompt=prompts[i % len(prompts)], seed=cfg.seed + i, client=client)

    server = Server(run_batch, cfg.policy, cfg.time_limit_s)
    try:
        if cfg.concurrency is None:
            _open_loop(server, cfg, rate, make, sink)
        else:
            _closed_loop(server, cfg, make, sink)
    except BaseException:          # e.g. Ctrl-C: stop after the batch in flight instead of draining
        server.close(abandon=True)
        raise
    server.close()
    if server.error is not None:
        raise server.error
    served = [r for r in server.requests if r.done is not None]
    wall = max((r.done for r in served), default=server.now())
    records = [dict(r.to_dict(), images_received=sink.received[r.id], image_size=sink.sizes.get(r.id))
               for r in server.requests]
    return {"requests": records, "batches": server.batches, "wall_s": wall,
            "hit_time_limit": bool(server.unserved), "images": sink.images}
