"""The engine protocol and the backend registry.

An engine is loaded from one component of an artifact and called with named torch tensors; it returns named torch
tensors. Backends are looked up by name and imported lazily, so ``import diffaccel.engines`` never needs onnxruntime
or tensorrt.

Each backend module defines ``load(root, component, entry, **options) -> Engine``: ``root`` is the artifact
directory, ``component`` the component's name (``"unet"``...), ``entry`` its record in ``manifest.json`` (paths in it
are relative to ``root``). Options a backend does not know are ignored, so one call can serve every backend:
``onnxruntime`` takes ``provider``, ``threads``, ``spin``; ``torch`` takes ``device``, ``compile``; ``tensorrt``
takes ``device``, ``cuda_graph``, ``shared_memory``; ``openvino`` takes ``threads``, ``hint`` (LATENCY | THROUGHPUT).

>>> sorted(BACKENDS)
['onnxruntime', 'openvino', 'tensorrt', 'torch']
"""
from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from diffaccel.optimize.artifact.errors import BackendUnavailableError

# backend name -> module that defines `load(root, component, entry, **options) -> Engine` (see above)
BACKENDS = {
    "onnxruntime": "diffaccel.engines.backends.onnxruntime",
    "torch": "diffaccel.engines.backends.torch",
    "tensorrt": "diffaccel.engines.backends.tensorrt",
    "openvino": "diffaccel.engines.backends.openvino",
}
EXTRAS = {"tensorrt": "gpu", "openvino": "openvino"}    # the pip extra that brings a backend's runtime


@runtime_checkable
class Engine(Protocol):
    input_names: tuple
    output_names: tuple

    @property
    def device(self): ...

    def __call__(self, **inputs) -> dict: ...


def backend_module(name: str):
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name} needs a package that is not installed ({e.name or e}); "
                                      f"install diffaccel[{EXTRAS.get(name, 'cpu')}]") from e


def load_engine(backend: str, root, component: str, entry: dict, **options) -> Engine:
    """Load the engine of ``component`` described by its manifest ``entry`` (paths relative to ``root``); a U-Net
    built with ``optimize --step-cache`` loads as its three graphs run in turn (:mod:`diffaccel.engines.split`)."""
    if entry.get("step_cache"):
        from diffaccel.engines import split

        return split.load(root, component, entry, load_engine, **options)
    return backend_module(backend).load(root, component, entry, **options)
