"""The dynamic-batching policy, as a pure object driven by an injected clock (no threads, no sleeping).

Requests wait in a FIFO queue. A batch is dispatched as soon as ``max_batch`` requests are queued, or when the
oldest queued request has waited ``timeout_s``; it takes the oldest ``max_batch`` requests, in arrival order. The
serving loop in :mod:`diffaccel.eval.loadbench.loop` and the discrete-event :func:`simulate` below both use it, so the
policy is tested deterministically on a :class:`FakeClock` and measured for real with the same code.

>>> clock = FakeClock()
>>> q = BatchQueue(BatchPolicy(max_batch=2, timeout_s=0.5))
>>> q.add(Request(0, arrival=clock())); q.ready(clock()), q.next_deadline()
(False, 0.5)
>>> clock.advance(0.2); q.add(Request(1, arrival=clock())); [r.id for r in q.next_batch(clock())]
[0, 1]
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """Dispatch when ``max_batch`` requests are queued or the oldest has waited ``timeout_s`` seconds."""

    max_batch: int = 4
    timeout_s: float = 0.1

    def __post_init__(self):
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max batch {self.max_batch!r} must be an integer >= 1")
        if not isinstance(self.timeout_s, (int, float)) or not math.isfinite(self.timeout_s) or self.timeout_s < 0:
            raise ValueError(f"batch timeout {self.timeout_s!r} s must be a finite number >= 0 (0: never wait)")


@dataclasses.dataclass
class Request:
    """One request and what happened to it. Times are seconds on the serving clock."""

    id: int
    arrival: float
    prompt: str = ""
    seed: int = 0
    client: "int | None" = None       # closed-loop client that sent it (None: open-loop arrivals)
    dispatch: "float | None" = None   # when its batch left the queue
    done: "float | None" = None       # when its image was returned
    batch_id: "int | None" = None
    batch_size: "int | None" = None

    @property
    def wait(self) -> float:
        return self.dispatch - self.arrival

    @property
    def service(self) -> float:
        return self.done - self.dispatch

    @property
    def latency(self) -> float:
        return self.done - self.arrival

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        served = self.done is not None
        d.update(wait=self.wait if served else None, service=self.service if served else None,
                 latency=self.latency if served else None)
        return d


class BatchQueue:
    """A FIFO queue of :class:`Request` that hands out batches according to a :class:`BatchPolicy`."""

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._queue: collections.deque = collections.deque()
        self._last_arrival = -math.inf
        self.batches = 0                   # batches handed out so far (the next batch id)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, request: Request) -> None:
        if request.arrival < self._last_arrival:
            raise ValueError(f"request {request.id} arrived at {request.arrival} before the previous one "
                             f"({self._last_arrival}); add requests in arrival order")
        self._queue.append(request)
        self._last_arrival = request.arrival

    def next_deadline(self) -> "float | None":
        """The time at which the queue is ready if nothing else arrives; None when empty. A full queue is ready
        since its oldest arrival."""
        if not self._queue:
            return None
        oldest = self._queue[0].arrival
        return oldest if len(self._queue) >= self.policy.max_batch else oldest + self.policy.timeout_s

    def ready(self, now: float) -> bool:
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline

    def next_batch(self, now: float) -> list:
        """The oldest ``max_batch`` requests (stamped with dispatch time, batch id and size) when ready, else []."""
        if not self.ready(now):
            return []
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.policy.max_batch))]
        for r in batch:
            r.dispatch, r.batch_id, r.batch_size = now, self.batches, len(batch)
        self.batches += 1
        return batch

    def take_all(self) -> list:
        """Remove and return every queued request without dispatching it (a run that hit its time limit)."""
        rest = list(self._queue)
        self._queue.clear()
        return rest


class FakeClock:
    """A clock that moves only when told: ``clock()`` is the time, ``clock.advance(dt)`` moves it."""

    def __init__(self, start: float = 0.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.now += seconds

    def advance_to(self, t: float) -> None:
        """Move to time ``t`` exactly (no rounding from adding a difference)."""
        if t < self.now:
            raise ValueError("a clock does not go back")
        self.now = float(t)


def simulate(arrivals, policy: BatchPolicy, service_time: Callable[[int], float]) -> list:
    """Serve requests arriving at ``arrivals`` (sorted seconds) with one worker whose batch of ``b`` takes
    ``service_time(b)`` seconds. Returns the batches (lists of stamped :class:`Request`) in dispatch order.

    >>> [[r.id for r in b] for b in simulate([0.0, 0.1, 0.15, 2.0], BatchPolicy(2, 0.5), lambda b: 1.0)]
    [[0, 1], [2], [3]]
    """
    clock, queue = FakeClock(), BatchQueue(policy)
    pending = collections.deque(Request(i, float(a)) for i, a in enumerate(arrivals))
    batches, worker_free = [], 0.0
    while pending or len(queue):
        while pending and pending[0].arrival <= clock():
            queue.add(pending.popleft())
        if clock() >= worker_free and queue.ready(clock()):
            batch = queue.next_batch(clock())
            worker_free = clock() + service_time(len(batch))
            for r in batch:
                r.done = worker_free
            batches.append(batch)
            continue
        events = [pending[0].arrival] if pending else []
        if len(queue):
            events.append(max(worker_free, queue.next_deadline()))
        clock.advance_to(max(clock(), min(events)))
    return batches
