"""``kill -9`` the real ``diffaccel serve`` at random moments during a run of jobs, restart it on the same job store
each time, and count what was lost or delivered twice as a different image (formerly tools/serve_faults.py).

A client thread creates the jobs (each with an Idempotency-Key, retried through the outages, so a 202 lost with the
process still maps to one job) and watches them: the first image it sees for each job is kept. At the end every job
must have succeeded, once, with the image it first showed and the one the same work gives run alone.

CI runs a short version; the issue's run is
``DIFFACCEL_KILL_JOBS=200 DIFFACCEL_KILLS=20 pytest tests/test_serve_kills.py -s`` (it prints the counts).
"""
import hashlib
import os
import random
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")

from diffaccel.engines.serving.process import ServerProcess  # noqa: E402

JOBS = int(os.environ.get("DIFFACCEL_KILL_JOBS", "24"))
KILLS = int(os.environ.get("DIFFACCEL_KILLS", "3"))
STEPS = 4


def _client(server, seen, accepted, stop, kills_done):
    for i in range(JOBS):
        body = {"prompt": f"a red circle number {i}", "seed": 1000 + i, "steps": STEPS}
        while not stop.is_set():
            try:
                r = httpx.post(f"{server.url}/v1/jobs", json=body, headers={"Idempotency-Key": f"kill-{i}"},
                               timeout=10)
                if r.status_code == 202:
                    accepted[i] = r.json()["id"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    # it watches on until every kill is done, so a fast machine cannot finish the run before the last kill
    while not stop.is_set() and (len(seen) < len(accepted) or not kills_done.is_set()):
        for i, jid in list(accepted.items()):
            if i in seen:
                continue
            try:
                if httpx.get(f"{server.url}/v1/jobs/{jid}", timeout=5).json()["status"] == "succeeded":
                    png = httpx.get(f"{server.url}/v1/jobs/{jid}/images/0.png", timeout=5).content
                    seen[i] = hashlib.sha256(png).hexdigest()
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.2)
        time.sleep(0.1)


def _solo_hashes(artifact) -> dict:
    """Each job's image run alone in this process (the server's code path, a batch of one)."""
    from diffaccel.engines.serving.config import ServeConfig
    from diffaccel.engines.serving.models import load_models, resolve
    from diffaccel.engines.serving.schemas import JobInput
    from diffaccel.engines.serving.worker import run_batch
    from diffaccel.engines.pipelines.schedulers import served as schedulers

    models, scheds, out = load_models([artifact]), schedulers(), {}
    for i in range(JOBS):
        work = resolve(JobInput(prompt=f"a red circle number {i}", seed=1000 + i, steps=STEPS), models, scheds,
                       ServeConfig())
        out[i] = hashlib.sha256(run_batch(models, scheds, [work])[0][0][1]).hexdigest()
    return out


@pytest.mark.slow
def test_kills_during_a_run_lose_nothing_and_change_no_image(tiny_ort_ts, tmp_path, capsys):
    rng = random.Random(0)
    log = open(tmp_path / "server.log", "wb")
    server = ServerProcess([tiny_ort_ts], tmp_path / "jobs.sqlite", ["--max-batch", "4", "--max-wait-ms", "20",
                                                                     "--queue-limit", str(JOBS + 10), "--threads", "1"],
                           log=log, env={"OMP_NUM_THREADS": "1"})
    seen, accepted, stop, kills_done = {}, {}, threading.Event(), threading.Event()
    client = threading.Thread(target=_client, args=(server, seen, accepted, stop, kills_done), daemon=True)
    t0, kills = time.monotonic(), 0
    client.start()
    try:
        # kill k lands once the run's progress (jobs accepted + jobs seen done, out of 2 x JOBS) passes k/(KILLS+1),
        # a random moment after it: spread over creating and running on any machine's speed, never after the run
        while kills < KILLS and client.is_alive():
            while (len(accepted) + len(seen)) * (KILLS + 1) < (kills + 1) * 2 * JOBS and client.is_alive():
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.2))
            server.kill9()
            kills += 1
            server.restart()
        kills_done.set()
        client.join(timeout=900)
        stop.set()
        final = {}
        for i, jid in accepted.items():
            j = httpx.get(f"{server.url}/v1/jobs/{jid}", timeout=10).json()
            png = httpx.get(f"{server.url}/v1/jobs/{jid}/images/0.png", timeout=10).content \
                if j["status"] == "succeeded" else b""
            final[i] = (j["status"], j["attempts"], hashlib.sha256(png).hexdigest())
        listed = httpx.get(f"{server.url}/v1/jobs?limit=1000", timeout=30).json()["data"]
        ready = httpx.get(f"{server.url}/health/ready", timeout=10).status_code
    finally:
        stop.set()
        server.stop()
    reference = _solo_hashes(tiny_ort_ts)
    lost = [i for i in range(JOBS) if i not in accepted or final[i][0] != "succeeded"]
    changed = [i for i in seen if seen[i] != final[i][2]]
    wrong = [i for i in final if final[i][2] != reference[i]]
    rerun = sum(1 for v in final.values() if v[1] > 1)
    with capsys.disabled():
        print(f"\n{JOBS} jobs, {kills} kill -9s in {time.monotonic() - t0:.0f} s: {len(accepted)} accepted, "
              f"{len(listed)} in the store, {len(lost)} lost, {len(changed)} delivered twice as a different image, "
              f"{len(wrong)} differing from the solo image, {rerun} re-run after a kill")
    assert kills == KILLS and not lost and not changed and not wrong and len(listed) == JOBS and ready == 200
