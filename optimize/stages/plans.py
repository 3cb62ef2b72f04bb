"""Which stages build which (backend, precision) pair: a plain dict filled by the stage modules.

Adding a backend or precision = one stage module that calls :func:`register_plan`, plus its name in
``PLAN_MODULES``; ``optimize()`` does not change. Modules are imported lazily and never import a GPU library at
import time.

>>> from diffaccel.optimize.config import Backend, Precision
>>> (Backend.ONNXRUNTIME, Precision.FP32) in plans()
True
"""
from __future__ import annotations

import importlib

PLAN_MODULES = ("diffaccel.optimize.stages.onnx_export", "diffaccel.optimize.stages.torch_save", "diffaccel.optimize.stages.int8",
                "diffaccel.optimize.stages.fp16",
                "diffaccel.optimize.stages.tensorrt")
_PLANS: dict = {}
_loaded = False


def register_plan(backend, precision, stages: list, note: str = "") -> None:
    from diffaccel.optimize.config import Backend, Precision

    _PLANS[(Backend(backend), Precision(precision))] = {"stages": list(stages), "note": note}


def plans() -> dict:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in PLAN_MODULES:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name != name:   # a stage module that exists but fails to import is a bug: surface it
                    raise
    return _PLANS


def stages_for(backend, precision) -> list:
    return plans()[(backend, precision)]["stages"]


def supported_pairs() -> str:
    return ", ".join(f"{b}/{p}" for b, p in plans())
