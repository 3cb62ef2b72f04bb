"""Fixtures and helpers of the server tests (import the fixtures into a test module): the served random:tiny models,
a Service on its own job store, a real uvicorn server on the loopback in a thread, a free port, PNG pixels, and waiting
until jobs end. Needs the serve extra; test modules skip before importing this."""
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from diffaccel.engines.serving.config import ServeConfig
from diffaccel.engines.serving.process import free_port
from diffaccel.engines.serving.service import Service
from diffaccel.engines.pipelines.schedulers import served as schedulers

ENDED = ("succeeded", "failed", "canceled")


def png_pixels(data: bytes) -> np.ndarray:
    """The RGB pixels of PNG bytes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def make_service(models, db, **kw) -> Service:
    """A Service over ``models`` with ``ServeConfig(**kw)`` and its job store in the file ``db``."""
    return Service(ServeConfig(db=str(db), **kw), models, schedulers())


def wait_for_jobs(get_job, ids, timeout=120.0, poll=0.05) -> list:
    """Poll ``get_job(id) -> job`` until each job has ended; the ended jobs, in the order of ``ids``. Fails naming
    the job that did not end within ``timeout`` seconds (each)."""
    jobs = []
    for jid in ids:
        end = time.monotonic() + timeout
        while (job := get_job(jid))["status"] not in ENDED:
            assert time.monotonic() < end, f"job {jid} did not end: {job}"
            time.sleep(poll)
        jobs.append(job)
    return jobs


@pytest.fixture(scope="module")
def models(tiny_ort_ts):
    from diffaccel.engines.serving.models import load_models

    return load_models([tiny_ort_ts])


@pytest.fixture
def live(models, tmp_path):
    """live(**ServeConfig fields) -> base URL of a real uvicorn server on the loopback (stopped after the test)."""
    import uvicorn

    from diffaccel.engines.serving.app import create_app

    servers = []

    def start(**kw):
        service = make_service(models, tmp_path / f"jobs-{len(servers)}.sqlite", **kw)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        end = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < end and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)
