"""diffaccel.engines.serving: the engines over HTTP (``diffaccel serve``).

An ASGI app (FastAPI + uvicorn) in one process with a SQLite job store (WAL) and the dynamic batcher, or the same app
on Ray Serve replicas (:mod:`diffaccel.engines.serving.ray_app`). FastAPI and uvicorn are the ``serve`` extra:
``pip install -e ".[serve]"``; importing this package needs neither.

>>> from diffaccel.engines.serving import ServeConfig, build_service, create_app     # doctest: +SKIP
>>> app = create_app(build_service(["engines/tiny"], ServeConfig(db="jobs.sqlite")))  # doctest: +SKIP
"""
from __future__ import annotations

__all__ = ["ServeConfig", "build_service", "create_app", "BatchPolicy", "BatchQueue"]

_LAZY = {"ServeConfig": ".config", "create_app": ".app", "BatchPolicy": ".batching", "BatchQueue": ".batching",
         "build_service": ".build"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
