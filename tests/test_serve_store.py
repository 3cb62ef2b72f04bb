"""The server's pure parts, no HTTP and no engines: compatible-group batching, the SQLite job store (durability,
idempotency, the webhook outbox), Standard Webhooks signatures, Prometheus text, the operator config."""
import base64
import json
import sqlite3

import pytest

from diffaccel.engines.serving.batching import BatchPolicy, BatchQueue, FakeClock, Request
from diffaccel.engines.serving.config import ServeConfig
from diffaccel.engines.serving.metrics import Metrics
from diffaccel.engines.serving.schemas import JobStatus
from diffaccel.engines.serving.store import IdempotencyConflict, JobStore
from diffaccel.engines.serving.webhooks import headers, sign, verify


def _req(i, t, group="a", n=1):
    r = Request(i, t, prompt=group)
    r.n = n
    return r


def _grouped(max_batch=4, timeout=1.0):
    return BatchQueue(BatchPolicy(max_batch, timeout), key=lambda r: r.prompt, size=lambda r: r.n)


def test_only_compatible_requests_share_a_batch():
    q = _grouped()
    for i, g in enumerate("abcabab"):
        q.add(_req(i, 0.1 * i, g))
    assert not q.ready(0.5)                                 # no group has 4 images, nobody waited 1 s
    q.add(_req(7, 0.7, "b"))                                # group b is full now: ready at once
    assert q.ready(0.7) and q.next_deadline() == pytest.approx(0.1)
    assert [r.id for r in q.next_batch(0.7)] == [1, 4, 6, 7]
    assert [r.id for r in q.next_batch(1.0)] == [0, 3, 5]      # the oldest waited its timeout
    assert not q.ready(1.1) and [r.id for r in q.next_batch(1.2)] == [2]
    assert len(q) == 0 and q.next_batch(5.0) == []


def test_images_count_toward_the_batch_and_fifo_holds_within_a_group():
    q = _grouped(max_batch=4)
    q.add(_req(0, 0.0, n=3))
    q.add(_req(1, 0.1, n=2))                                 # 3 + 2 > 4: waits for the next batch
    q.add(_req(2, 0.2, n=1))                                 # would fit, but may not overtake request 1
    assert q.images == 6 and q.ready(0.2)
    assert [r.id for r in q.next_batch(0.2)] == [0]
    assert [r.id for r in q.next_batch(1.1)] == [1, 2]


def test_remove_takes_a_canceled_request_out():
    q, clock = _grouped(), FakeClock()
    for i in range(3):
        q.add(_req(i, clock()))
    assert q.remove(1) and not q.remove(1) and not q.remove(99)
    assert [r.id for r in q] == [0, 2] and q.images == 2
    clock.advance(1.0)
    assert [r.id for r in q.next_batch(clock())] == [0, 2]


def test_one_group_keeps_the_load_benchmark_policy():
    q = BatchQueue(BatchPolicy(2, 0.5))
    for i, t in enumerate([0.0, 0.1, 0.2]):
        q.add(Request(i, t))
    assert [r.id for r in q.next_batch(0.1)] == [0, 1] and q.next_deadline() == pytest.approx(0.7)


# ---- the job store ---------------------------------------------------------------------------------------------
WORK = {"model": "m", "prompt": "a red circle", "n": 1, "seed": 3, "steps": 2}


def test_a_job_is_committed_and_survives_a_new_connection(tmp_path):
    db = tmp_path / "jobs.sqlite"
    s = JobStore(db)
    job = s.create(WORK)
    # another connection (as a restarted server would open) sees it: committed, WAL mode
    con = sqlite3.connect(db)
    assert con.execute("SELECT status FROM jobs WHERE id = ?", (job["id"],)).fetchone() == ("queued",)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()
    s.mark_running([job["id"]])
    s.close()
    again = JobStore(db)
    recovered, _ = again.recover()                            # its worker died while running: run it again
    assert [j["id"] for j in recovered] == [job["id"]] and recovered[0]["request"] == WORK
    assert again.get(job["id"])["status"] == "queued" and again.get(job["id"])["attempts"] == 1


def test_a_job_ends_once_with_its_images(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    job = s.create(WORK)
    hook = ("msg_1", "http://127.0.0.1:9/hook", "{}")
    assert s.finish(job["id"], JobStatus.SUCCEEDED, [(3, b"png0")], metrics={"run_s": 1.0}, deliveries=[hook])
    assert not s.finish(job["id"], JobStatus.SUCCEEDED, [(3, b"other")])       # a second result is refused
    assert s.images(job["id"]) == [(0, 3)] and s.image(job["id"], 0) == b"png0"
    assert [d["id"] for d in s.due_deliveries(now=1e12)] == ["msg_1"]
    assert s.recover() == ([], [])


def test_idempotency_key_returns_the_same_job_or_refuses_another_body(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    a = s.create(WORK, idem_key="k1")
    b = s.create(WORK, idem_key="k1")
    assert a["id"] == b["id"] and not a["replayed"] and b["replayed"]
    with pytest.raises(IdempotencyConflict):
        s.create(dict(WORK, prompt="other"), idem_key="k1")
    assert len(s.list()) == 1


def test_webhook_outbox_retries_then_gives_up(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    job = s.create(WORK)
    s.add_deliveries(job["id"], [("msg_a", "http://127.0.0.1:9/", "{}")])
    s.delivery_result("msg_a", False, "HTTP 500", next_at=5.0)
    assert s.deliveries(job["id"])[0]["status"] == "pending" and s.next_delivery_at() == 5.0
    s.delivery_result("msg_a", False, "HTTP 500", next_at=None)
    d = s.deliveries(job["id"])[0]
    assert (d["status"], d["attempts"], d["last_error"]) == ("failed", 2, "HTTP 500")


# ---- signatures, metrics, config -------------------------------------------------------------------------------
def test_standard_webhooks_signature():
    key = b"0123456789abcdef0123"
    body = json.dumps({"type": "job.completed"}).encode()
    h = headers(key, "msg_x", body, now=1_700_000_000)
    assert h["webhook-id"] == "msg_x" and h["webhook-timestamp"] == "1700000000"
    import hashlib
    import hmac

    expect = base64.b64encode(hmac.new(key, b"msg_x.1700000000." + body, hashlib.sha256).digest()).decode()
    assert h["webhook-signature"] == f"v1,{expect}"
    assert not verify(key, "msg_x", 1_700_000_000, body, h["webhook-signature"])      # too old
    import time

    now = int(time.time())
    good = sign(key, "msg_x", now, body)
    assert verify(key, "msg_x", now, body, f"v1,bogus {good}")
    assert not verify(key, "msg_x", now, body + b" ", good)


def test_prometheus_text():
    m = Metrics(max_batch=4)
    m.observe_batch(3, 0.2)
    m.count("diffaccel_jobs_total", status="succeeded")
    m.count("diffaccel_images_total", 3)
    text = m.render({"diffaccel_queue_depth": 5})
    assert "# TYPE diffaccel_batch_size histogram" in text
    assert 'diffaccel_batch_size_bucket{le="2"} 0' in text and 'diffaccel_batch_size_bucket{le="3"} 1' in text
    assert 'diffaccel_jobs_total{status="succeeded"} 1' in text and "diffaccel_queue_depth 5" in text
    assert "diffaccel_images_total 3" in text


@pytest.mark.parametrize("kw, needle", [({"max_batch": 0}, "max batch 0"), ({"max_wait_ms": -1}, "max wait ms"),
                                        ({"webhook_secret": "whsec_!!"}, "base64"),
                                        ({"webhook_secret": "whsec_" + base64.b64encode(b"x" * 4).decode()},
                                         "16 to 64"),
                                        ({"default_steps": 200, "max_steps": 100}, "exceed")])
def test_bad_config_names_the_value(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ServeConfig(**kw)


def test_serve_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    from .helpers import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "serve", tmp_path / "missing")
    assert_one_line_error(code, err, "missing")
    code, _, err = run_cli(capsys, "serve", tmp_path, "--max-batch", "0")
    assert_one_line_error(code, err, "max batch 0")
    code, _, err = run_cli(capsys, "serve", tmp_path, "--ray", "--autoscale", "4-2")
    assert_one_line_error(code, err)
