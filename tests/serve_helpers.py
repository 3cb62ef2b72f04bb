"""Fixtures of the server tests (import them into a test module): the served random:tiny models, and a real
uvicorn server on the loopback in a thread. Needs the serve extra; test modules skip before importing this."""
import socket
import threading
import time

import pytest
import uvicorn

from diffaccel.engines.serving.app import create_app
from diffaccel.engines.serving.config import ServeConfig
from diffaccel.engines.serving.service import Service
from diffaccel.optimize.cli.serve import guidance, schedulers


@pytest.fixture(scope="module")
def models(tiny_ort_ts):
    from diffaccel.engines.serving.models import load_models

    return load_models([tiny_ort_ts], guidance=guidance)


@pytest.fixture
def live(models, tmp_path):
    """live(**ServeConfig fields) -> base URL of a real uvicorn server on the loopback (stopped after the test)."""
    servers = []

    def start(**kw):
        service = Service(ServeConfig(db=str(tmp_path / f"jobs-{len(servers)}.sqlite"), **kw), models, schedulers())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
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
