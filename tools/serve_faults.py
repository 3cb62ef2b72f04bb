"""Fault run: kill -9 the embedded server at random moments during a job run, restart it on the same job store each
time, and count what was lost or delivered twice as a different image.

A client thread creates the jobs (each with an Idempotency-Key, retried through the outages, so a 202 lost with the
process still maps to one job) and watches them: the first image it sees for each job is kept. At the end every
job must have succeeded, and its image must equal the first one seen and the image the same work gives when run
alone in this process.

    python tools/serve_faults.py runs/demo/engines/tinyshapes-onnxruntime-fp32 --jobs 200 --kills 20
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_bench import _free_port, start_server  # noqa: E402


def _client(url_box, n_jobs, steps, seen, accepted, stop):
    import httpx

    for i in range(n_jobs):
        body = {"prompt": f"a red circle number {i}", "seed": 1000 + i, "steps": steps}
        while not stop.is_set():
            try:
                r = httpx.post(f"{url_box[0]}/v1/jobs", json=body, headers={"Idempotency-Key": f"fault-{i}"},
                               timeout=10)
                if r.status_code == 202:
                    accepted[i] = r.json()["id"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    while not stop.is_set() and len(seen) < len(accepted):
        for i, jid in list(accepted.items()):
            if i in seen:
                continue
            try:
                j = httpx.get(f"{url_box[0]}/v1/jobs/{jid}", timeout=5).json()
                if j["status"] == "succeeded":
                    png = httpx.get(f"{url_box[0]}/v1/jobs/{jid}/images/0.png", timeout=5).content
                    seen[i] = hashlib.sha256(png).hexdigest()
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.2)
        time.sleep(0.1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--db", default="/tmp/diffaccel-serve-faults.sqlite")
    args = ap.parse_args(argv)
    import httpx

    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(args.db + suffix):
            os.remove(args.db + suffix)
    rng, port = random.Random(args.seed), _free_port()
    url_box = [f"http://127.0.0.1:{port}"]
    server = start_server(args.artifact, port, args.db, 4, 20, None, queue_limit=args.jobs + 10)
    seen, accepted, stop = {}, {}, threading.Event()
    client = threading.Thread(target=_client, args=(url_box, args.jobs, args.steps, seen, accepted, stop),
                              daemon=True)
    t0 = time.monotonic()
    client.start()
    kills = 0
    try:
        while kills < args.kills and client.is_alive():
            time.sleep(rng.uniform(0.3, 2.5))
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
            kills += 1
            print(f"kill {kills}: {len(accepted)} accepted, {len(seen)} seen done", flush=True)
            server = start_server(args.artifact, port, args.db, 4, 20, None, queue_limit=args.jobs + 10)
        client.join(timeout=1800)
        stop.set()
        final = {}
        for i, jid in accepted.items():
            j = httpx.get(f"{url_box[0]}/v1/jobs/{jid}", timeout=10).json()
            png = httpx.get(f"{url_box[0]}/v1/jobs/{jid}/images/0.png", timeout=10).content \
                if j["status"] == "succeeded" else b""
            final[i] = (j["status"], j["attempts"], hashlib.sha256(png).hexdigest(), png)
        listed = httpx.get(f"{url_box[0]}/v1/jobs?limit=1000", timeout=30).json()["data"]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    wall = time.monotonic() - t0
    reference = _solo_hashes(args.artifact, args.jobs, args.steps)
    lost = [i for i in range(args.jobs) if i not in accepted or final[i][0] != "succeeded"]
    changed = [i for i in seen if seen[i] != final[i][2]]
    wrong = [i for i in final if final[i][2] != reference[i]]
    rerun = sum(1 for v in final.values() if v[1] > 1)
    print(f"{args.jobs} jobs, {kills} kill -9s in {wall:.0f} s: {len(accepted)} accepted, {len(listed)} in the "
          f"store, {len(lost)} lost, {len(changed)} delivered twice as a different image, {len(wrong)} differing "
          f"from the solo image, {rerun} re-run after a kill")
    return 0 if not (lost or changed or wrong or len(listed) != args.jobs) else 1


def _solo_hashes(artifact, n, steps) -> dict:
    """Each job's image run alone in this process (same code path as the server, batch of one)."""
    import io

    from PIL import Image

    from diffaccel.engines.serving.config import ServeConfig
    from diffaccel.engines.serving.models import load_models, resolve
    from diffaccel.engines.serving.schemas import JobInput
    from diffaccel.engines.serving.worker import run_batch
    from diffaccel.optimize.cli.serve import guidance, schedulers

    models, scheds, out = load_models([artifact], guidance=guidance), schedulers(), {}
    for i in range(n):
        work = resolve(JobInput(prompt=f"a red circle number {i}", seed=1000 + i, steps=steps), models, scheds,
                       ServeConfig())
        png = run_batch(models, scheds, [work])[0][0][1]
        Image.open(io.BytesIO(png)).verify()
        out[i] = hashlib.sha256(png).hexdigest()
    return out


if __name__ == "__main__":
    sys.exit(main())
