"""Assemble a service from artifact folders: load the engines, then the job store, batcher and webhooks."""
from __future__ import annotations


def missing_extra() -> "str | None":
    """A one-line hint when FastAPI or uvicorn is not installed, else None."""
    import importlib.util

    absent = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    return (f"diffaccel serve needs {' and '.join(absent)}: pip install -e \".[serve]\"") if absent else None


def build_service(paths, cfg, provider=None):
    """A :class:`~diffaccel.engines.serving.service.Service` over the artifacts at ``paths`` (not started: the app's
    lifespan starts it); requests may name the schedulers of :func:`~diffaccel.engines.pipelines.schedulers.served`."""
    from diffaccel.engines.serving.models import load_models
    from diffaccel.engines.serving.service import Service

    return Service(cfg, load_models(paths, threads=cfg.threads, provider=provider))
