"""The engine worker survives anything a job does (issue: serving hardening).

An exception is injected at each point of a job's life (validation, queueing, the engine call, image encoding, the
store writes, the progress and start callbacks, the webhook body) for one *poison* job batched with healthy ones: the
poison job fails alone with its reason recorded, its neighbours get their images, the next job is served, and
``/health/ready`` stays true. Then the regressions the fuzzing found (the seed edge with n > 1, a lone surrogate,
PNDM with 1 step), a dead engine thread that restarts itself, the restart budget that makes liveness fail, jobs
quarantined after repeated crashes, and readiness that turns false when the engine hangs or the store is unwritable.
"""
import sqlite3
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the test client needs httpx (the serve extra)")

from starlette.testclient import TestClient  # noqa: E402

from diffaccel.engines.serving import health as health_module  # noqa: E402
from diffaccel.engines.serving import service as service_module  # noqa: E402
from diffaccel.engines.serving import worker as worker_module  # noqa: E402
from diffaccel.engines.serving.app import create_app  # noqa: E402
from diffaccel.engines.serving.store import JobStore  # noqa: E402

from .serve_helpers import make_service, models, wait_for_jobs  # noqa: E402,F401  (models: a fixture)

STEPS = 2
POISON = "poison"


@pytest.fixture
def serve(models, tmp_path):
    """serve(**ServeConfig fields) -> (test client, service); stopped after the test."""
    opened = []

    def make(**kw):
        service = make_service(models, tmp_path / f"jobs-{len(opened)}.sqlite", **kw)
        client = TestClient(create_app(service), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client, service

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def _jobs(client, prompts):
    ids = [client.post("/v1/jobs", json={"prompt": p, "steps": STEPS, "seed": 5}).json()["id"] for p in prompts]
    return wait_for_jobs(lambda j: client.get(f"/v1/jobs/{j}").json(), ids, timeout=60, poll=0.02)


def _poisoned(original, position: int = 0):
    """``original`` wrapped to raise when the work (or item) at ``position`` of its arguments holds the poison."""
    def text_of(x):
        if isinstance(x, (list, tuple)):
            return " ".join(text_of(y) for y in x)
        work = getattr(x, "work", x)
        return str(work.get("prompt", "")) if isinstance(work, dict) else ""

    def wrapped(*args, **kwargs):
        if POISON in text_of(args[position]):
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)
    return wrapped


def _poison_store_finish(monkeypatch):
    original = JobStore.finish

    def finish(self, job_id, status, images=(), *a, **kw):
        if images and POISON in str(self.get(job_id)["request"]["prompt"]):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")   # what the seed edge did
        return original(self, job_id, status, images, *a, **kw)
    monkeypatch.setattr(JobStore, "finish", finish)


INJECTIONS = {
    # where the exception is raised -> how to make only the poison job's part raise
    "engine call": lambda mp: mp.setattr(worker_module, "run_batch", _poisoned(worker_module.run_batch, 2)),
    "store write of the result": _poison_store_finish,
    "progress callback": lambda mp: mp.setattr(service_module.Service, "_progress",
                                               _poisoned(service_module.Service._progress, 1)),
    "start callback": lambda mp: mp.setattr(service_module.Service, "_send",
                                            _poisoned(service_module.Service._send, 1)),
}


@pytest.mark.parametrize("where", list(INJECTIONS))
def test_an_exception_anywhere_in_a_job_fails_that_job_alone(serve, monkeypatch, where):
    INJECTIONS[where](monkeypatch)
    client, service = serve(max_batch=4, max_wait_ms=300)
    jobs = _jobs(client, ["a red circle", f"a {POISON} circle", "a blue star"])
    healthy, poison = [jobs[0], jobs[2]], jobs[1]
    assert all(j["status"] == "succeeded" and j["output"] for j in healthy), jobs
    if where in ("progress callback", "start callback"):   # reports are best effort: the job itself succeeds
        assert poison["status"] == "succeeded", poison
    else:
        assert poison["status"] == "failed" and poison["error"], poison
        assert ("injected" in poison["error"]) or ("could not be stored" in poison["error"]), poison["error"]
    assert service.worker.alive and service.worker.restarts == 0
    assert client.get("/health/ready").status_code == 200
    assert _jobs(client, ["a green square"])[0]["status"] == "succeeded"      # the worker serves the next job


def test_a_failed_batch_is_retried_job_by_job(serve, monkeypatch):
    """The engine call fails for the batch as a whole (one work in it is bad): each job is run again alone."""
    calls = []
    original = worker_module.run_batch

    def run_batch(models, schedulers, works, on_step=None):
        calls.append(len(works))
        if any(POISON in w["prompt"] for w in works):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")   # the tokenizer's failure
        return original(models, schedulers, works, on_step)
    monkeypatch.setattr(worker_module, "run_batch", run_batch)
    client, _ = serve(max_batch=4, max_wait_ms=300)
    jobs = _jobs(client, ["a red circle", f"a {POISON}", "a blue star"])
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded"]
    assert "TypeError" in jobs[1]["error"]
    assert calls[0] == 3 and sorted(calls[1:]) == [1, 1, 1]


def test_queueing_and_validation_failures_answer_without_losing_the_job(serve, monkeypatch):
    client, service = serve()
    original = service.worker.queue.add
    monkeypatch.setattr(service.worker.queue, "add", _poisoned(original))
    r = client.post("/v1/jobs", json={"prompt": POISON, "steps": STEPS})
    assert r.status_code == 202 and r.json()["status"] == "failed" and "queued" in r.json()["error"]
    monkeypatch.setattr(service_module, "resolve", _poisoned(service_module.resolve))
    r = client.post("/v1/images/generations", json={"prompt": POISON, "steps": STEPS})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert 'code="500"' in client.get("/metrics").text and "diffaccel_http_requests_total" in client.get(
        "/metrics").text
    assert _jobs(client, ["a red circle"])[0]["status"] == "succeeded"


def test_a_poison_image_fails_its_job_alone(serve, monkeypatch):
    """PNG encoding fails for one image of a batch (the poison job's, known by its pixels): that job fails, the
    others keep their images."""
    import hashlib
    import io

    from PIL import Image

    client, _ = serve(max_batch=4, max_wait_ms=300)
    alone = _jobs(client, [f"a {POISON} star"])[0]
    pixels = Image.open(io.BytesIO(client.get(alone["output"][0]["url"]).content)).convert("RGB").tobytes()
    bad, original = hashlib.sha256(pixels).hexdigest(), Image.Image.save

    def save(self, fp, *a, **kw):
        if hashlib.sha256(self.convert("RGB").tobytes()).hexdigest() == bad:
            raise OSError("injected encoder failure")
        return original(self, fp, *a, **kw)
    monkeypatch.setattr(Image.Image, "save", save)
    jobs = _jobs(client, ["a blue star", f"a {POISON} star", "a red circle"])
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded"], jobs
    assert "encoder" in jobs[1]["error"]


# ---- the regressions the fuzzing found --------------------------------------------------------------------
def test_the_seed_edge_surrogates_and_short_pndm_are_refused_at_the_edge(serve):
    client, service = serve(max_batch=4, max_wait_ms=200)
    edge = 2**63 - 1
    r = client.post("/v1/jobs", json={"prompt": "x", "seed": edge, "n": 2, "steps": STEPS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed" and str(edge - 1) in r.text
    ok = client.post("/v1/jobs", json={"prompt": "x", "seed": edge - 1, "n": 2, "steps": STEPS}).json()
    r = client.post("/v1/jobs", content=b'{"prompt": "a \\ud800 b", "steps": 2}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "Unicode" in r.text
    for steps in (1, 2, 3):
        r = client.post("/v1/jobs", json={"prompt": "x", "steps": steps, "scheduler": "pndm"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "steps" and "pndm" in r.text
    r = client.post("/v1/jobs", json={"prompt": "x", "size": "64x64\n"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    assert service.store.counts() == {"queued": 1} or service.store.counts().get("succeeded") == 1
    done = wait_for_jobs(lambda j: client.get(f"/v1/jobs/{j}").json(), [ok["id"]], timeout=60)[0]
    assert done["status"] == "succeeded" and [o["seed"] for o in done["output"]] == [edge - 1, edge]
    assert client.get("/v1/jobs?limit=10").status_code == 200 and client.get("/health/ready").status_code == 200


# ---- the worker itself ------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_restarts_and_is_counted(serve, monkeypatch):
    client, service = serve()
    original, dead = service.worker._take, threading.Event()

    def take_once_then_die():
        if not dead.is_set():
            dead.set()
            raise SystemExit("the engine thread dies")          # not an Exception: escapes every handler
        return original()
    monkeypatch.setattr(service.worker, "_take", take_once_then_die)
    assert _jobs(client, ["a blue star"])[0]["status"] == "succeeded"   # then the loop asks for work: dies
    end = time.monotonic() + 15
    while service.worker.restarts < 1:
        assert time.monotonic() < end, "the engine thread was not restarted"
        time.sleep(0.05)
    assert _jobs(client, ["a red circle"])[0]["status"] == "succeeded"
    assert "diffaccel_worker_restarts_total 1" in client.get("/metrics").text
    assert client.get("/health/live").json()["worker_restarts"] == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_past_the_restart_budget_liveness_fails_and_the_process_is_told(serve, monkeypatch):
    client, service = serve()
    monkeypatch.setattr(health_module, "RESTART_BUDGET", (2, 60.0))
    told = threading.Event()
    service.on_fatal = told.set

    def always_die():
        raise SystemExit("the engine thread dies")
    monkeypatch.setattr(service.worker, "_take", always_die)
    _jobs(client, ["a blue star"])                               # then the loop asks for work: dies, again and again
    assert told.wait(20), "the service did not give up"
    live = client.get("/health/live")
    assert live.status_code == 503 and "died" in live.json()["reasons"][0]
    assert client.get("/health/ready").status_code == 503 and client.get("/health").status_code == 503


def test_readiness_is_false_while_the_engine_hangs_and_true_after(serve, monkeypatch):
    release = threading.Event()
    original = worker_module.run_batch

    def run_batch(models, schedulers, works, on_step=None):
        if any(POISON in w["prompt"] for w in works):
            release.wait(30)
        return original(models, schedulers, works, on_step)
    monkeypatch.setattr(worker_module, "run_batch", run_batch)
    client, _ = serve(max_wait_ms=0, heartbeat_timeout_s=1)
    job = client.post("/v1/jobs", json={"prompt": POISON, "steps": STEPS}).json()
    end = time.monotonic() + 15
    while (r := client.get("/health/ready")).status_code == 200:
        assert time.monotonic() < end, "readiness never noticed the hung engine"
        time.sleep(0.1)
    assert r.status_code == 503 and "not reported" in r.json()["reasons"][0]
    assert client.get("/health/live").status_code == 200        # alive: a supervisor should not kill it yet
    release.set()
    wait_for_jobs(lambda j: client.get(f"/v1/jobs/{j}").json(), [job["id"]], timeout=30)
    assert client.get("/health/ready").status_code == 200


def test_readiness_is_false_when_the_store_cannot_be_written(serve, tmp_path):
    client, service = serve()
    assert client.get("/health/ready").status_code == 200
    blocker = sqlite3.connect(str(service.store.path), timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")                          # another writer holds the file
    try:
        time.sleep(1.1)                                         # the probe is taken at most once a second
        r = client.get("/health/ready")
        assert r.status_code == 503 and "job store" in r.json()["reasons"][0]
    finally:
        blocker.rollback()
        blocker.close()
    time.sleep(1.1)
    assert client.get("/health/ready").status_code == 200


def test_a_job_the_server_died_running_twice_is_quarantined(models, tmp_path):
    from diffaccel.engines.serving.config import ServeConfig
    from diffaccel.engines.serving.models import resolve
    from diffaccel.engines.serving.schemas import JobInput
    from diffaccel.engines.pipelines.schedulers import served as schedulers

    db = tmp_path / "jobs.sqlite"
    store = JobStore(db)
    work = lambda prompt: resolve(JobInput(prompt=prompt, steps=STEPS, seed=1), models, schedulers(),  # noqa: E731
                                  ServeConfig())
    twice, once = store.create(work("a suspect")), store.create(work("an unlucky one"))
    store.mark_running([twice["id"], once["id"]])               # the server died running both...
    store._tx(lambda d: d.execute("UPDATE jobs SET attempts = 2 WHERE id = ?", (twice["id"],)))   # ...one twice
    store.close()
    service = make_service(models, db, max_attempts=2)
    with TestClient(create_app(service)) as client:
        suspect = client.get(f"/v1/jobs/{twice['id']}").json()
        assert suspect["status"] == "failed" and "quarantined" in suspect["error"] and "2 times" in suspect["error"]
        assert "diffaccel_jobs_quarantined_total 1" in client.get("/metrics").text
        rerun = wait_for_jobs(lambda j: client.get(f"/v1/jobs/{j}").json(), [once["id"]], timeout=60)[0]
        assert rerun["status"] == "succeeded" and rerun["attempts"] == 2       # run again, once more


def test_the_default_scheduler_stays_the_artifacts_after_a_request_picks_another(serve):
    """A request with scheduler=euler-a used to leave it as the 'default' for every later request (the contract
    fuzzer found it: the same request gave another image after the run)."""
    client, _ = serve(max_wait_ms=0)
    body = {"prompt": "a red circle", "seed": 3, "steps": 4}
    first = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    other = client.post("/v1/images/generations", json={**body, "scheduler": "euler-a"}).json()["data"][0]["b64_json"]
    again = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    assert other != first and again == first
