"""Parity of an exported or optimized component with PyTorch, on fresh random inputs at two shapes.

A failure lists every failing output at every shape with its max abs / relative error and tolerance, then says what
to try, in one line.

>>> import torch
>>> r = compare({"y": torch.ones(3)}, {"y": torch.ones(3) + 1e-6}, atol=1e-4, rtol=0)
>>> r["y"]["passed"]
True
"""
from __future__ import annotations

import math

from .errors import ParityError


def compare(ref: dict, got: dict, atol: float, rtol: float) -> dict:
    """Per-output error stats; pass when ``max|got-ref| <= atol + rtol * max|ref|`` and nothing is NaN/inf."""
    import numpy as np

    out = {}
    for name, r in ref.items():
        r = np.asarray(r.detach().float().cpu() if hasattr(r, "detach") else r, dtype=np.float64)
        g = got[name]
        g = np.asarray(g.detach().float().cpu() if hasattr(g, "detach") else g, dtype=np.float64)
        finite = bool(np.isfinite(g).all())
        if r.shape != g.shape:
            out[name] = {"passed": False, "error": f"shape {g.shape} != {r.shape}"}
            continue
        err = float(np.abs(g - r).max()) if r.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
        out[name] = {"max_abs": err, "max_rel": rel, "ref_max": scale, "atol": atol, "rtol": rtol,
                     "finite": finite, "passed": finite and err <= atol + rtol * scale}
    return out


def check_parity(spec, reference, candidate, *, seed: int = 1234, atol: "float | None" = None,
                 rtol: "float | None" = None, advice: str = "") -> dict:
    """Run ``reference`` and ``candidate`` (callables taking the spec's named torch inputs and returning named
    outputs) on random inputs at the spec's opt shape and a second shape. Returns a JSON-able report; raises
    :class:`ParityError` listing every failing output if any fails."""
    import torch

    atol = spec.atol if atol is None else atol
    rtol = spec.rtol if rtol is None else rtol
    gen = torch.Generator().manual_seed(seed)
    report = {"atol": atol, "rtol": rtol, "seed": seed, "points": []}
    failures = []
    points = [spec.opt_values(), spec.alt_values()]
    if points[0] == points[1]:
        points = points[:1]
    for values in points:
        inputs = spec.random_inputs(gen, **values)
        with torch.no_grad():
            ref = reference(**inputs)
        got = candidate(**inputs)
        stats = compare(ref, got, atol, rtol)
        report["points"].append({"shape": values, "outputs": stats})
        for name, s in stats.items():
            if not s["passed"]:
                shape = "x".join(str(v) for v in values.values())
                detail = s.get("error") or (f"max abs {s['max_abs']:.3g}, rel {s['max_rel']:.3g} > tol "
                                            f"{atol:g}+{rtol:g}*{s['ref_max']:.3g}" +
                                            ("" if s["finite"] else ", non-finite values"))
                failures.append(f"{name}@{shape}: {detail}")
    report["passed"] = not failures
    if failures:
        raise ParityError(f"{spec.name} does not match PyTorch: {'; '.join(failures)}. {advice}".strip())
    return report
