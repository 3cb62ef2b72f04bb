"""The dynamic-batching policy on a fake clock: deterministic, no threads, no sleeping."""
import math

import numpy as np
import pytest

from diffaccel.eval.loadbench.batching import BatchPolicy, BatchQueue, FakeClock, Request, simulate


def _queue(max_batch, timeout_s):
    return BatchQueue(BatchPolicy(max_batch, timeout_s)), FakeClock()


def test_dispatch_on_size():
    q, clock = _queue(3, 10.0)
    for i in range(2):
        q.add(Request(i, clock()))
        clock.advance(0.1)
    assert not q.ready(clock()) and q.next_batch(clock()) == [] and len(q) == 2
    q.add(Request(2, clock()))
    batch = q.next_batch(clock())
    assert [r.id for r in batch] == [0, 1, 2] and len(q) == 0
    assert all(r.dispatch == clock() and r.batch_id == 0 and r.batch_size == 3 for r in batch)


def test_dispatch_on_timeout():
    q, clock = _queue(4, 0.5)
    q.add(Request(0, clock()))
    clock.advance(0.3)
    q.add(Request(1, clock()))
    assert q.next_deadline() == 0.5
    clock.advance_to(0.49)
    assert not q.ready(clock()) and q.next_batch(clock()) == []
    clock.advance_to(q.next_deadline())
    assert [r.id for r in q.next_batch(clock())] == [0, 1]
    assert q.next_deadline() is None and not q.ready(clock() + 100)


def test_zero_timeout_dispatches_whatever_is_queued():
    q, clock = _queue(8, 0.0)
    q.add(Request(0, clock()))
    assert [r.id for r in q.next_batch(clock())] == [0]


def test_overfull_queue_keeps_fifo_across_batches():
    q, clock = _queue(2, 1.0)
    for i in range(5):
        q.add(Request(i, 0.1 * i))
    clock.advance_to(0.4)
    got = [[r.id for r in q.next_batch(clock())] for _ in range(2)]
    assert got == [[0, 1], [2, 3]] and len(q) == 1
    assert not q.ready(clock()) and q.next_deadline() == pytest.approx(1.4)   # the rest waits for its own timeout
    assert [[r.id, r.batch_id] for r in q.next_batch(1.4)] == [[4, 2]]


def test_out_of_order_arrival_is_refused():
    q, _ = _queue(2, 1.0)
    q.add(Request(0, 1.0))
    with pytest.raises(ValueError, match="arrival order"):
        q.add(Request(1, 0.5))


@pytest.mark.parametrize("max_batch,timeout,needle", [(0, 0.1, "max batch 0"), (1.5, 0.1, "max batch 1.5"),
                                                      (True, 0.1, "max batch True"), (2, -0.1, "timeout -0.1"),
                                                      (2, math.nan, "timeout nan"), (2, math.inf, "timeout inf")])
def test_policy_validation_names_the_bad_value(max_batch, timeout, needle):
    with pytest.raises(ValueError, match=needle):
        BatchPolicy(max_batch, timeout)


def test_fake_clock_never_goes_back():
    clock = FakeClock(1.0)
    with pytest.raises(ValueError):
        clock.advance(-0.1)
    with pytest.raises(ValueError):
        clock.advance_to(0.5)


def _expected_dispatch(arrivals, first, worker_free, policy):
    """When the batch starting at request ``first`` must leave: once the worker is free, at the earlier of the
    oldest request's deadline and the arrival that fills the batch."""
    fill = arrivals[first + policy.max_batch - 1] if first + policy.max_batch - 1 < len(arrivals) else math.inf
    return max(worker_free, min(arrivals[first] + policy.timeout_s, fill))


def _arrivals(rng, n):
    kind = rng.integers(3)
    if kind == 0:                                      # Poisson
        gaps = rng.exponential(rng.uniform(0.01, 1.0), n)
    elif kind == 1:                                    # bursts: several requests at the same instant
        gaps = rng.choice([0.0, 0.0, 0.0, rng.uniform(0.1, 2.0)], n)
    else:                                              # evenly spaced
        gaps = np.full(n, rng.uniform(0.0, 0.5))
    return list(np.cumsum(gaps))


def test_random_arrival_patterns_every_request_once_in_order_and_on_time():
    rng = np.random.default_rng(1234)
    for _ in range(300):
        arrivals = _arrivals(rng, int(rng.integers(0, 40)))
        policy = BatchPolicy(int(rng.integers(1, 7)), float(rng.choice([0.0, rng.exponential(0.3)])))
        base, per_item = rng.uniform(0.01, 0.5), rng.uniform(0.0, 0.3)
        batches = simulate(arrivals, policy, lambda b: base + per_item * b)
        ids = [r.id for b in batches for r in b]
        assert ids == list(range(len(arrivals)))               # none lost, none twice, FIFO within and across
        worker_free, first = 0.0, 0
        for k, batch in enumerate(batches):
            t = batch[0].dispatch
            assert 1 <= len(batch) <= policy.max_batch
            assert t == pytest.approx(_expected_dispatch(arrivals, first, worker_free, policy))
            assert all(r.dispatch == t and r.batch_id == k and r.batch_size == len(batch) for r in batch)
            assert all(r.arrival <= t for r in batch)
            waiting = sum(1 for a in arrivals[first:] if a <= t)   # took everything queued, up to max_batch
            assert len(batch) == min(waiting, policy.max_batch)
            assert all(r.latency == pytest.approx(r.wait + r.service) for r in batch)
            worker_free, first = batch[0].done, first + len(batch)
