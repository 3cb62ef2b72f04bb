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

from diffaccel.optimize.artifact.errors import ParityError


def compare(ref: dict, got: dict, atol: float, rtol: float, kind: str = "max") -> dict:
    """Per-output error stats. ``kind="max"`` (float parity) passes when ``max|got-ref| <= atol + rtol * max|ref|``;
    ``kind="l2"`` (quantized engines) when ``||got-ref|| / ||ref|| <= rtol``. NaN/inf never pass."""
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
        norm = float(np.linalg.norm(r))
        rel_l2 = float(np.linalg.norm(g - r)) / norm if norm > 0 else (0.0 if err == 0 else math.inf)
        ok = rel_l2 <= rtol if kind == "l2" else err <= atol + rtol * scale
        collapsed = bool(r.size > 1 and r.std() > 1e-3 and g.std() < 0.01 * r.std())   # e.g. a black image
        out[name] = {"max_abs": err, "max_rel": rel, "rel_l2": rel_l2, "ref_max": scale, "atol": atol,
                     "rtol": rtol, "kind": kind, "finite": finite, "collapsed": collapsed,
                     "passed": finite and ok and not collapsed}
    return out


def named_outputs(module, spec, inputs: dict) -> dict:
    """Call a torch module with the spec's inputs in order and name its outputs as the spec does."""
    out = module(*(inputs[t.name] for t in spec.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o for t, o in zip(spec.outputs, out)}


def parity_cases(spec, *, seed: int = 1234, samples: "list | None" = None):
    """The (axis values, inputs) a parity check runs: ``samples`` (realistic inputs) when given, else fresh seeded
    random inputs at the spec's opt shape and a second shape. The same seed gives the same tensors, so a reference
    recorded once (:class:`RecordedReference`) answers every later check of the component."""
    import torch

    if samples:
        for s in samples:
            yield spec.axis_values({k: tuple(v.shape) for k, v in s.items()}), s
        return
    gen = torch.Generator().manual_seed(seed)
    points = [spec.opt_values(), spec.alt_values()]
    for values in (points if points[0] != points[1] else points[:1]):
        yield values, spec.random_inputs(gen, **values)


def inputs_key(inputs: dict) -> str:
    """A digest of named tensors (names, dtypes, shapes and bytes): how a recorded reference finds its outputs."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for name in sorted(inputs):
        a = inputs[name]
        a = a.detach().cpu().contiguous().numpy() if hasattr(a, "detach") else np.ascontiguousarray(a)
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class RecordedReference:
    """PyTorch's outputs on the parity inputs, recorded while the torch model was in memory, so later stages check
    their engines without loading it again (a build then holds one copy of a model's weights at a time, not two).
    Called with inputs it has not recorded, it asks ``fallback`` (a callable like the torch module), if any.

    >>> import torch
    >>> ref = RecordedReference({})
    >>> ref.record({"x": torch.ones(2)}, {"y": torch.zeros(2)})
    >>> ref(x=torch.ones(2))["y"].tolist()
    [0.0, 0.0]
    >>> ref(x=torch.zeros(2))
    Traceback (most recent call last):
    ...
    KeyError: 'no recorded reference for these inputs'
    """

    def __init__(self, outputs: "dict | None" = None, fallback=None):
        self.outputs = dict(outputs or {})
        self.fallback = fallback

    def record(self, inputs: dict, outputs: dict) -> None:
        self.outputs[inputs_key(inputs)] = {k: v.detach().cpu().clone() if hasattr(v, "detach") else v
                                            for k, v in outputs.items()}

    def covers(self, spec, *, seed: int = 1234, samples: "list | None" = None) -> bool:
        return all(inputs_key(x) in self.outputs for _, x in parity_cases(spec, seed=seed, samples=samples))

    def __call__(self, **inputs) -> dict:
        hit = self.outputs.get(inputs_key(inputs))
        if hit is not None:
            return hit
        if self.fallback is None:
            raise KeyError("no recorded reference for these inputs")
        return self.fallback(**inputs)

    def merged(self, other: "RecordedReference") -> "RecordedReference":
        return RecordedReference({**self.outputs, **other.outputs}, self.fallback or other.fallback)

    def save(self, path) -> None:
        import torch

        torch.save(self.outputs, path)

    @classmethod
    def load(cls, path, fallback=None) -> "RecordedReference":
        import torch

        return cls(torch.load(path, weights_only=True), fallback)

    @classmethod
    def of(cls, spec, reference, *, seed: int = 1234, samples: "list | None" = None) -> "RecordedReference":
        """Run ``reference`` (named inputs -> named outputs) on every parity input and record its outputs."""
        import torch

        rec = cls()
        for _, inputs in parity_cases(spec, seed=seed, samples=samples):
            with torch.no_grad():
                rec.record(inputs, reference(**inputs))
        return rec


def check_parity(spec, reference, candidate, *, seed: int = 1234, atol: "float | None" = None,
                 rtol: "float | None" = None, kind: str = "max", samples: "list | None" = None,
                 advice: str = "") -> dict:
    """Run ``reference`` and ``candidate`` (callables taking the spec's named torch inputs and returning named
    outputs; the reference may be a :class:`RecordedReference`) on random inputs at the spec's opt shape and a second
    shape, or on ``samples`` (realistic inputs, for quantized engines). Returns a JSON-able report; raises
    :class:`ParityError` listing every failing output."""
    import torch

    atol = spec.atol if atol is None else atol
    rtol = spec.rtol if rtol is None else rtol
    report = {"atol": atol, "rtol": rtol, "kind": kind, "seed": seed, "points": [],
              "inputs": "captured pipeline inputs" if samples else "random"}
    failures = []
    for values, inputs in parity_cases(spec, seed=seed, samples=samples):
        with torch.no_grad():
            ref = reference(**inputs)
        got = candidate(**inputs)
        stats = compare(ref, got, atol, rtol, kind)
        report["points"].append({"shape": values, "outputs": stats})
        for name, s in stats.items():
            if not s["passed"]:
                shape = "x".join(str(v) for v in values.values())
                if s.get("error"):
                    detail = s["error"]
                elif kind == "l2":
                    detail = f"relative L2 error {s['rel_l2']:.3g} > {rtol:g}"
                else:
                    detail = (f"max abs {s['max_abs']:.3g}, rel {s['max_rel']:.3g} > tol "
                              f"{atol:g}+{rtol:g}*{s['ref_max']:.3g}")
                detail += "" if s.get("finite", True) else ", non-finite values (NaN/inf)"
                detail += ", constant output (black image)" if s.get("collapsed") else ""
                failures.append(f"{name}@{shape}: {detail}")
    report["passed"] = not failures
    if failures:
        raise ParityError(f"{spec.name} does not match PyTorch: {'; '.join(failures)}. {advice}".strip())
    return report
