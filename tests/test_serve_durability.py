"""Durability: ``kill -9`` the real ``diffaccel serve`` process mid-job, start it again on the same job store, and
every accepted job completes once, with the image it would have had anyway."""
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")

from diffaccel.engines.serving.process import ServerProcess  # noqa: E402

from .helpers import run_cli  # noqa: E402
from .serve_helpers import png_pixels, wait_for_jobs  # noqa: E402


ARGS = ["--max-batch", "1", "--max-wait-ms", "0", "--max-steps", "999", "--threads", "1"]


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_completes_every_job_with_its_own_image(tiny_ort_ts, tmp_path, capsys):
    db, log = tmp_path / "jobs.sqlite", open(tmp_path / "server.log", "wb")
    jobs = [("a red circle", 7, 400), ("a blue star", 8, 3), ("a green square", 9, 3)]
    server = ServerProcess([tiny_ort_ts], db, ARGS, log=log)
    try:
        ids = [httpx.post(f"{server.url}/v1/jobs", json={"prompt": p, "seed": s, "steps": n}).json()["id"]
               for p, s, n in jobs]
        end = time.monotonic() + 60
        while (j := httpx.get(f"{server.url}/v1/jobs/{ids[0]}").json())["progress"]["step"] < 2:
            assert j["status"] in ("queued", "running") and time.monotonic() < end, j
            time.sleep(0.01)
        server.kill9()                                    # mid-job: job 0 running, jobs 1 and 2 queued
        server.restart()
        done = wait_for_jobs(lambda jid: httpx.get(f"{server.url}/v1/jobs/{jid}").json(), ids)
        listed = httpx.get(f"{server.url}/v1/jobs").json()["data"]
        images = [httpx.get(f"{server.url}/v1/jobs/{jid}/images/0.png").content for jid in ids]
        missing = httpx.get(f"{server.url}/v1/jobs/{ids[0]}/images/1.png").status_code
    finally:
        server.stop()
        log.close()
    assert [j["status"] for j in done] == ["succeeded"] * 3, (tmp_path / "server.log").read_text()[-2000:]
    assert done[0]["attempts"] == 2 and done[1]["attempts"] == 1            # job 0 was re-run, once
    assert sorted(j["id"] for j in listed) == sorted(ids) and missing == 404  # nothing lost, nothing extra
    for (prompt, seed, steps), png, j in zip(jobs, images, done):
        path = tmp_path / f"ref-{seed}.png"
        code, _, err = run_cli(capsys, "generate", tiny_ort_ts, prompt, "--steps", steps, "--seed", seed, "-o", path)
        assert code == 0, err
        assert j["output"] == [{"index": 0, "seed": seed, "url": j["output"][0]["url"]}]
        assert np.array_equal(png_pixels(png), png_pixels(path.read_bytes())), prompt
