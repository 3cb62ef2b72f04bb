"""The HTTP server in this process (FastAPI's test client) on random:tiny engines: synchronous calls equal to
``diffaccel generate``, batched jobs equal to their solo images, progress events, cancel, backpressure, idempotency,
signed webhooks with retries, metrics, and 1,000 hostile requests that all get a 4xx."""
import base64
import http.server
import json
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the test client needs httpx (the serve extra)")

from starlette.testclient import TestClient  # noqa: E402

from diffaccel.engines.serving.app import create_app  # noqa: E402
from diffaccel.engines.serving.webhooks import verify  # noqa: E402

from .helpers import run_cli  # noqa: E402
from .serve_helpers import make_service, models, png_pixels, wait_for_jobs  # noqa: E402,F401  (models: a fixture)

SECRET = "whsec_" + base64.b64encode(b"serve-test-secret-0123456").decode()
STEPS = 3


@pytest.fixture
def serve(models, tmp_path):
    """serve(**ServeConfig fields) -> (test client, service); stopped after the test."""
    opened = []

    def make(**kw):
        service = make_service(models, tmp_path / f"jobs-{len(opened)}.sqlite", **kw)
        client = TestClient(create_app(service))
        client.__enter__()
        opened.append(client)
        return client, service

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def _wait(client, job_id, timeout=60):
    return wait_for_jobs(lambda j: client.get(f"/v1/jobs/{j}").json(), [job_id], timeout=timeout, poll=0.02)[0]


@pytest.fixture(scope="module")
def generated(tiny_ort_ts, tmp_path_factory):
    """Images of ``diffaccel generate`` (seed -> pixels), made once."""
    out, cache = tmp_path_factory.mktemp("generate"), {}

    def get(prompt, seed, capsys):
        if (prompt, seed) not in cache:
            path = out / f"{seed}.png"
            code, _, err = run_cli(capsys, "generate", tiny_ort_ts, prompt, "--steps", STEPS, "--seed", seed,
                                   "-o", path)
            assert code == 0, err
            cache[prompt, seed] = np.asarray(Image.open(path).convert("RGB"))
        return cache[prompt, seed]
    return get


def test_sync_call_returns_the_image_diffaccel_generate_makes(serve, generated, capsys):
    client, _ = serve()
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 5, "steps": STEPS})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 1 and data[0]["seed"] == 5
    assert np.array_equal(png_pixels(base64.b64decode(data[0]["b64_json"])), generated("a red circle", 5, capsys))
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 5, "steps": STEPS,
                                                     "response_format": "url", "n": 2})
    urls = [d["url"] for d in r.json()["data"]]
    assert [d["seed"] for d in r.json()["data"]] == [5, 6]              # image i has seed + i
    first = client.get(urls[0].replace("http://testserver", ""))
    assert first.headers["content-type"] == "image/png"
    assert np.array_equal(png_pixels(first.content), generated("a red circle", 5, capsys))


def test_prefer_wait_answers_202_with_the_job_when_not_done(serve):
    client, _ = serve(max_wait_ms=60_000)                # a lone job waits for a batch that never fills
    r = client.post("/v1/images/generations", json={"prompt": "x", "steps": STEPS}, headers={"Prefer": "wait=0"})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert r.headers["Preference-Applied"] == "wait=0" and r.headers["Location"].endswith(r.json()["id"])
    client.post(f"/v1/jobs/{r.json()['id']}/cancel")


def test_compatible_jobs_share_an_engine_call_and_keep_their_solo_images(serve, generated, capsys):
    client, service = serve(max_batch=4, max_wait_ms=2000)
    prompts = ["a red circle", "a blue star", "a green square"]
    ids = [client.post("/v1/jobs", json={"prompt": p, "seed": 10 + i, "steps": STEPS}).json()["id"]
           for i, p in enumerate(prompts)]
    other = client.post("/v1/jobs", json={"prompt": "a red circle", "seed": 1, "steps": STEPS + 1}).json()["id"]
    ids.append(client.post("/v1/jobs", json={"prompt": "a red circle", "seed": 13, "steps": STEPS}).json()["id"])
    jobs = [_wait(client, j) for j in ids]
    assert [j["metrics"]["batch_jobs"] for j in jobs] == [4, 4, 4, 4]      # one call, the 4 compatible jobs
    assert _wait(client, other)["metrics"]["batch_jobs"] == 1              # other step count: its own call
    for j, p, seed in zip(jobs, prompts + ["a red circle"], range(10, 14)):
        png = client.get(f"/v1/jobs/{j['id']}/images/0.png").content
        assert j["output"][0]["seed"] == seed
        assert np.array_equal(png_pixels(png), generated(p, seed, capsys)), p
    text = client.get("/metrics").text                                     # a batch of 4 and one of 1
    assert 'diffaccel_batch_size_bucket{le="3"} 1' in text and 'diffaccel_batch_size_bucket{le="4"} 2' in text


def test_job_progress_streams_as_server_sent_events(serve):
    client, _ = serve(max_wait_ms=0)
    job = client.post("/v1/jobs", json={"prompt": "x", "steps": 6})
    assert job.status_code == 202 and job.json()["queue_position"] in (0, None)
    events = []
    with client.stream("GET", f"/v1/jobs/{job.json()['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [e for e, _ in events]
    assert names[0] == "status" and names[-1] == "completed" and events[-1][1]["status"] == "succeeded"
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6 and set(steps) >= {6}
    with client.stream("GET", f"/v1/jobs/{job.json()['id']}/events") as r:
        again = list(r.iter_lines())
    assert "event: completed" in again                       # a finished job's stream ends at once


def test_cancel_a_queued_and_a_running_job(serve):
    client, _ = serve(max_wait_ms=0, max_batch=1, max_steps=999)
    r = client.post("/v1/jobs", json={"prompt": "x", "steps": 1000})
    assert r.status_code == 400 and "1-999" in r.json()["error"]["message"]      # the model's trained steps
    running = client.post("/v1/jobs", json={"prompt": "x", "steps": 999}).json()["id"]
    queued = client.post("/v1/jobs", json={"prompt": "y", "steps": STEPS}).json()["id"]
    assert client.get(f"/v1/jobs/{queued}").json()["queue_position"] == 0
    assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "canceled"
    end = time.monotonic() + 60
    while (job := client.get(f"/v1/jobs/{running}").json())["progress"]["step"] < 2:
        assert job["status"] in ("queued", "running") and time.monotonic() < end, job
        time.sleep(0.01)
    client.post(f"/v1/jobs/{running}/cancel")
    job = _wait(client, running)
    assert job["status"] == "canceled" and job["output"] is None
    assert 2 <= job["metrics"]["steps_done"] == job["progress"]["step"] < 999  # stopped early
    assert [j["id"] for j in client.get("/v1/jobs?status=canceled").json()["data"]] == [queued, running]  # newest first
    assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "canceled"   # idempotent


def test_full_queue_answers_429_with_retry_after(serve):
    client, service = serve(queue_limit=2, max_wait_ms=60_000, max_batch=4)
    ids = [client.post("/v1/jobs", json={"prompt": "x", "steps": STEPS}).json()["id"] for _ in range(2)]
    r = client.post("/v1/jobs", json={"prompt": "x", "steps": STEPS})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert client.post("/v1/images/generations", json={"prompt": "x"}).status_code == 429
    assert 'diffaccel_requests_rejected_total{reason="queue_full"} 2' in client.get("/metrics").text
    for j in ids:
        client.post(f"/v1/jobs/{j}/cancel")
    assert client.post("/v1/jobs", json={"prompt": "x", "steps": STEPS}).status_code == 202


def test_idempotent_create(serve):
    client, _ = serve(max_wait_ms=0)
    body = {"prompt": "x", "steps": STEPS}
    a = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    b = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    assert a.json()["id"] == b.json()["id"] and b.headers["Idempotent-Replayed"] == "true"
    assert a.json()["input"]["seed"] == b.json()["input"]["seed"]          # the seed the server picked, kept
    c = client.post("/v1/jobs", json={**body, "prompt": "y"}, headers={"Idempotency-Key": "order-17"})
    assert c.status_code == 422 and "different request body" in c.json()["error"]["message"]
    d = client.post("/v1/jobs", json={**body, "id": "client-1"})
    assert client.post("/v1/jobs", json={**body, "id": "client-1"}).json()["id"] == d.json()["id"]


class _Receiver(http.server.BaseHTTPRequestHandler):
    fail_first = set()
    got = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
        event = json.loads(body)["type"]
        code = 500 if event in self.fail_first else 204
        self.fail_first.discard(event)
        self.send_response(code)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_webhooks_are_signed_filtered_and_retried_with_the_same_id(serve):
    _Receiver.fail_first, _Receiver.got = {"job.completed"}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client, service = serve(max_wait_ms=0, webhook_secret=SECRET, webhook_backoff_s=0.05,
                                webhook_allow=("127.0.0.1",))
        url = f"http://127.0.0.1:{httpd.server_port}/hook"
        job = client.post("/v1/jobs", json={"prompt": "x", "steps": STEPS, "webhook": url,
                                            "webhook_events_filter": ["start", "completed"]}).json()
        end = time.monotonic() + 30
        while sum(json.loads(b)["type"] == "job.completed" for _, b in _Receiver.got) < 2:
            assert time.monotonic() < end, _Receiver.got
            time.sleep(0.02)
    finally:
        httpd.shutdown()
    types = [json.loads(b)["type"] for _, b in _Receiver.got]
    assert types == ["job.start", "job.completed", "job.completed"]         # no progress: filtered out
    (h1, b1), (h2, b2) = [(h, b) for h, b in _Receiver.got if json.loads(b)["type"] == "job.completed"]
    assert h1["webhook-id"] == h2["webhook-id"] == f"msg_{job['id']}_completed"
    for h, b in _Receiver.got:
        assert verify(service.cfg.secret_key, h["webhook-id"], int(h["webhook-timestamp"]), b,
                      h["webhook-signature"])
    assert json.loads(b2)["data"]["status"] == "succeeded" and json.loads(b2)["data"]["output"][0]["url"]
    # the receiver saw the body before the sender got its 204 and recorded it: wait for the record, do not race it
    while [d["status"] for d in service.store.deliveries(job["id"])][-1] != "delivered":
        assert time.monotonic() < end, service.store.deliveries(job["id"])
        time.sleep(0.02)
    r = client.post("/v1/jobs", json={"prompt": "x", "webhook": "file:///etc/passwd"})
    assert r.status_code == 400 and "http" in r.json()["error"]["message"]


def test_health_metrics_models_and_page(serve, models):
    client, _ = serve()
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["models"] == list(models)
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    for name in ("diffaccel_queue_depth", "diffaccel_batch_size_bucket", "diffaccel_job_latency_seconds_count",
                 "diffaccel_images_total"):
        assert name in text.text
    assert "allowed" not in client.get("/v1/models").text and client.get("/v1/models").json()["data"][0]["sizes"]
    page = client.get("/").text
    assert "<form" in page and "EventSource" in page and "http" not in page.split("<script>")[0].lower()


BAD_BODIES = [
    ({"prompt": "x", "size": "8x8"}, "size", "allowed"), ({"prompt": "x", "model": "nope"}, "model", "allowed"),
    ({"prompt": "x", "scheduler": "nope"}, "scheduler", "ddim"), ({"prompt": "x", "n": 99}, "n", "1-4"),
    ({"prompt": "x" * 5000}, "prompt", "characters"), ({"prompt": 3}, "prompt", "string"),
    ({"prompt": "x", "bogus": 1}, "bogus", "guidance_scale, seed, scheduler, model, response_format"), ({"prompt": "x", "steps": 10_000}, "steps", "1-150"),
    ({"prompt": "x", "response_format": "gif"}, "response_format", "b64_json"), ({}, "prompt", "required"),
]


@pytest.mark.parametrize("body, param, needle", BAD_BODIES)
def test_bad_requests_get_one_line_4xx_naming_allowed_values(serve, body, param, needle):
    client, _ = serve()
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and "\n" not in err["message"]


def _hostile(rng: random.Random):
    """One request the server must refuse with a 4xx: (method, path, headers, raw body)."""
    junk = [None, True, -1, 1e308, "", "x" * rng.choice([10, 5000, 70000]), [], {}, [1, "a"], {"a": {"b": []}},
            "../../etc/passwd", "\x00\ud7ff", 2**70]
    field = rng.choice(["prompt", "n", "size", "steps", "seed", "guidance_scale", "scheduler", "model",
                        "response_format", "negative_prompt", "webhook", "webhook_events_filter", "id", "__proto__"])
    kind = rng.randrange(8)
    if kind == 0:                                                   # a field of the wrong type or out of range
        body = {"prompt": "x", field: rng.choice([j for j in junk if j not in (None, [])] if field != "prompt"
                                                 else junk)}              # null and [] are valid for the others
        if field in ("prompt", "negative_prompt", "id") and isinstance(body[field], str) and len(body[field]) < 4000:
            body[field] = 7
        if field == "seed":
            body[field] = rng.choice([-1, 2**64, "1", 1.5])
        return "POST", rng.choice(["/v1/jobs", "/v1/images/generations"]), {}, json.dumps(body).encode()
    if kind == 1:                                                   # not JSON, or not an object
        raw = rng.choice([b"{", b"[]", b"null", b"\xff\xfe", b'{"prompt": "x",}', bytes(rng.randrange(256)
                                                                                         for _ in range(40))])
        return "POST", "/v1/jobs", {}, raw
    if kind == 2:                                                   # a body too big
        return "POST", "/v1/jobs", {}, b'{"prompt": "' + b"a" * 70_000 + b'"}'
    if kind == 3:                                                   # ids that are not ours, traversal
        jid = rng.choice(["../../etc/passwd", "%2e%2e%2fetc", "0" * 31, "g" * 32, "x" * 500, "1;DROP TABLE jobs"])
        return rng.choice(["GET", "POST"]), rng.choice([f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/cancel",
                                                        f"/v1/jobs/{jid}/events", f"/v1/jobs/{jid}/images/0.png"]), \
            {}, b""
    if kind == 4:                                                   # sizes, steps, n out of range
        return "POST", "/v1/jobs", {}, json.dumps({"prompt": "x", rng.choice(["size", "steps", "n"]):
                                                   rng.choice(["4096x4096", "0x0", "64x", 0, -3, 10**9])}).encode()
    if kind == 5:
        return "GET", "/v1/jobs?status=" + rng.choice(["x", "'; --", "%00", ""]) + "&limit=" + \
            rng.choice(["0", "-1", "abc", "1000000"]), {}, b""
    if kind == 6:
        return rng.choice(["PUT", "DELETE", "PATCH"]), "/v1/jobs", {}, b"{}"
    return "POST", "/v1/jobs", {"content-type": "text/plain"}, b"prompt=x"


def test_1000_hostile_requests_all_get_4xx_and_the_server_stays_healthy(serve):
    client, service = serve(queue_limit=4)
    rng, codes = random.Random(16), {}
    for _ in range(1000):
        method, path, headers, body = _hostile(rng)
        r = client.request(method, path, content=body, headers={"content-type": "application/json", **headers})
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        assert 400 <= r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:300])
        assert "\n" not in r.json()["error"]["message"]
    assert set(codes) <= {400, 404, 405, 413, 415, 422}, codes
    assert service.store.list() == []                                    # nothing hostile became a job
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/images/generations", json={"prompt": "x", "steps": STEPS}).status_code == 200
