"""diffaccel.eval: latency and quality of accelerated engines against the diffusers baseline, side by side.

>>> from diffaccel.eval import EvalConfig, evaluate                                    # doctest: +SKIP
>>> report = evaluate(["out/tiny-ort"], config=EvalConfig(steps=(10, 20)), out_dir="report")  # doctest: +SKIP
>>> print(format_summary(report))                                                       # doctest: +SKIP

Importing this package is light (no torch): names load on first use.
"""
from __future__ import annotations

__all__ = ["evaluate", "EvalConfig", "render_report", "load_report", "format_summary", "PEERS", "psnr", "ssim",
           "latent_rel_error", "frechet_distance", "LatencyStats", "measure", "host_info"]

_LAZY = {
    "evaluate": ".harness.evaluate", "EvalConfig": ".harness.evaluate", "render_report": ".report.write", "load_report": ".report.write",
    "format_summary": ".report.tables", "PEERS": ".harness.variants", "psnr": ".metrics.images", "ssim": ".metrics.images",
    "latent_rel_error": ".metrics.images", "frechet_distance": ".metrics.images", "LatencyStats": ".harness.timing", "measure": ".harness.timing",
    "host_info": ".harness.host",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
