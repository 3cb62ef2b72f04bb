"""``diffaccel serve`` in a child process on a free loopback port: the one way tools and tests start a real server.

>>> with ServerProcess(["engines/tiny"], db="jobs.sqlite", args=["--max-batch", "1"]) as server:   # doctest: +SKIP
...     httpx.get(server.url + "/health/ready").json()["status"]
'ok'
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Start ``diffaccel serve ARTIFACTS --port P --db DB ARGS`` and wait until ``/health/ready`` answers 200.

    ``log`` is a file (binary) for the server's output (default: discarded). :meth:`restart` starts it again on the
    same port and store (after :meth:`kill9`, a crash)."""

    def __init__(self, artifacts, db, args=(), port: "int | None" = None, log=None, start_timeout_s: float = 180,
                 env: "dict | None" = None):
        self.argv = [sys.executable, "-m", "diffaccel.optimize.cli", "serve", *map(str, artifacts),
                     "--db", str(db), *map(str, args)]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log, self.timeout, self.env = log, start_timeout_s, env
        self.proc = None
        self.start()

    def start(self) -> "ServerProcess":
        import httpx

        out = self.log if self.log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen([*self.argv, "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **(self.env or {})})
        end = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"diffaccel serve exited with code {self.proc.returncode} while starting")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                self.kill9()
                raise RuntimeError(f"diffaccel serve did not get ready within {self.timeout:g} s")
            time.sleep(0.2)

    restart = start

    def kill9(self) -> None:
        """``kill -9`` the server (a crash: nothing is flushed or shut down)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> "int | None":
        """Ask the server to stop (SIGINT, as Ctrl-C), kill it if it does not within 30 s; its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
