"""diffaccel.optimize: turn a diffusion checkpoint into an artifact of accelerated engines.

>>> from diffaccel.optimize import OptimizeConfig, optimize
>>> manifest = optimize("random:tiny", "out/tiny", OptimizeConfig(backend="onnxruntime"))  # doctest: +SKIP
"""
from __future__ import annotations

__all__ = ["optimize", "OptimizeConfig", "ShapeRange", "Backend", "Precision", "Exporter", "resolve_source",
           "Manifest", "DiffaccelError", "__version__"]

_LAZY = {
    "optimize": ".api", "OptimizeConfig": ".api", "ShapeRange": ".config", "Backend": ".config",
    "Precision": ".config", "Exporter": ".config", "resolve_source": ".sources", "Manifest": ".artifact.manifest",
    "DiffaccelError": ".artifact.errors",
}


def __getattr__(name):
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("diffaccel")
        except metadata.PackageNotFoundError:
            return "0+unknown"
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
