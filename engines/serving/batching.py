"""The dynamic-batching policy, as a pure object driven by an injected clock (no threads, no sleeping).

Requests wait in a FIFO queue. A batch is dispatched as soon as ``max_batch`` images of one *compatible group* are
queued, or when the oldest queued request has waited ``timeout_s``; it takes, in arrival order, the requests of one
group that fit in ``max_batch`` images. A group is what ``key(request)`` returns (default: one group for everything,
so the queue is a plain FIFO), and a request counts ``size(request)`` images (default 1). The HTTP server
(:mod:`diffaccel.engines.serving.worker`) groups by model, size, steps, scheduler and guidance; the load benchmark
(``diffaccel.eval.loadbench``) and the discrete-event :func:`simulate` use one group, so the policy is tested
deterministically on a :class:`FakeClock` and measured for real with the same code.

>>> clock = FakeClock()
>>> q = BatchQueue(BatchPolicy(max_batch=2, timeout_s=0.5))
>>> q.add(Request(0, arrival=clock())); q.ready(clock()), q.next_deadline()
(False, 0.5)
>>> clock.advance(0.2); q.add(Request(1, arrival=clock())); [r.id for r in q.next_batch(clock())]
[0, 1]
>>> g = BatchQueue(BatchPolicy(2, 0.5), key=lambda r: r.prompt)
>>> for i, p in enumerate("abab"): g.add(Request(i, 0.0, prompt=p))
>>> [[r.id for r in g.next_batch(0.0)] for _ in range(2)]
[[0, 2], [1, 3]]
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """Dispatch when ``max_batch`` images are queued or the oldest request has waited ``timeout_s`` seconds."""

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


def _one_group(request) -> None:
    return None


def _one_image(request) -> int:
    return 1


class BatchQueue:
    """A queue of requests (anything with ``id``, ``arrival``, ``dispatch``, ``batch_id``, ``batch_size``) that hands
    out batches of one compatible group according to a :class:`BatchPolicy`."""

    def __init__(self, policy: BatchPolicy, key: Callable = _one_group, size: Callable = _one_image):
        self.policy, self._key, self._size = policy, key, size
        self._groups: "collections.OrderedDict[object, collections.deque]" = collections.OrderedDict()
        self._images: collections.Counter = collections.Counter()     # queued images per group
        self._count = 0
        self._last_arrival = -math.inf
        self.batches = 0                   # batches handed out so far (the next batch id)

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        """The queued requests in arrival order."""
        return iter(sorted((r for g in self._groups.values() for r in g), key=lambda r: r.arrival))

    @property
    def images(self) -> int:
        """Images queued, over every group."""
        return sum(self._images.values())

    def add(self, request) -> None:
        if request.arrival < self._last_arrival:
            raise ValueError(f"request {request.id} arrived at {request.arrival} before the previous one "
                             f"({self._last_arrival}); add requests in arrival order")
        k = self._key(request)
        self._groups.setdefault(k, collections.deque()).append(request)
        self._images[k] += self._size(request)
        self._count += 1
        self._last_arrival = request.arrival

    def remove(self, request_id) -> bool:
        """Take the queued request with this id out of the queue (a canceled job). False if it is not queued."""
        for k, group in self._groups.items():
            for r in group:
                if r.id == request_id:
                    group.remove(r)
                    self._forget(k, [r])
                    return True
        return False

    def _forget(self, k, taken) -> None:
        self._count -= len(taken)
        self._images[k] -= sum(self._size(r) for r in taken)
        if not self._groups[k]:
            del self._groups[k], self._images[k]

    def _oldest_group(self):
        return min(self._groups, key=lambda k: self._groups[k][0].arrival) if self._groups else None

    def _full_groups(self) -> list:
        return [k for k in self._groups if self._images[k] >= self.policy.max_batch]

    def next_deadline(self) -> "float | None":
        """The time at which the queue is ready if nothing else arrives; None when empty. A full group is ready
        since its oldest arrival."""
        if not self._groups:
            return None
        times = [self._groups[k][0].arrival for k in self._full_groups()]
        times.append(self._groups[self._oldest_group()][0].arrival + self.policy.timeout_s)
        return min(times)

    def ready(self, now: float) -> bool:
        deadline = self.next_deadline()
        return deadline is not None and now >= deadline

    def _group_to_serve(self, now: float):
        oldest = self._oldest_group()
        if now >= self._groups[oldest][0].arrival + self.policy.timeout_s:
            return oldest
        return min(self._full_groups(), key=lambda k: self._groups[k][0].arrival)

    def next_batch(self, now: float) -> list:
        """Requests of one group, oldest first, up to ``max_batch`` images (stamped with dispatch time, batch id and
        size) when ready, else []. A request bigger than ``max_batch`` images leaves alone."""
        if not self.ready(now):
            return []
        k = self._group_to_serve(now)
        group, batch, images = self._groups[k], [], 0
        while group and (not batch or images + self._size(group[0]) <= self.policy.max_batch):
            images += self._size(group[0])
            batch.append(group.popleft())
        self._forget(k, batch)
        for r in batch:
            r.dispatch, r.batch_id, r.batch_size = now, self.batches, len(batch)
        self.batches += 1
        return batch

    def take_all(self) -> list:
        """Remove and return every queued request without dispatching it (a run that hit its time limit)."""
        rest = list(self)
        self._groups.clear()
        self._images.clear()
        self._count = 0
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
