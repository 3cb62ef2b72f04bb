"""One declarative spec per exported component.

A :class:`ComponentSpec` names the inputs and outputs, which axes are dynamic, the range each dynamic axis may take
(min/opt/max) and the multiple it must be, how to draw random inputs, and the parity tolerance. ONNX dynamic axes,
torch.export dynamic shapes, TensorRT optimization profiles and the pipeline's size checks are all derived from it.

>>> spec = ComponentSpec("toy", inputs=(TensorSpec("x", ("batch", 4)),), outputs=(TensorSpec("y", ("batch", 4)),),
...                      axes={"batch": AxisRange(1, 2, 8)})
>>> spec.shape_of("x", batch=3)
(3, 4)
>>> spec.profile()["x"]
((1, 4), (2, 4), (8, 4))
"""
from __future__ import annotations

import dataclasses
from diffaccel.optimize.artifact.errors import ShapeError


@dataclasses.dataclass(frozen=True)
class AxisRange:
    """Allowed values of one dynamic axis: ``min <= v <= max`` and ``v % multiple == 0``; ``opt`` is the typical."""

    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"axis range needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        if any(v % self.multiple for v in (self.min, self.opt, self.max)):
            raise ValueError(f"axis range {self.min}/{self.opt}/{self.max} must be multiples of {self.multiple}")

    def allows(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple == 0


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A named tensor. ``dims`` holds ints (static) or axis names; an axis name may carry a factor, ``"8*height"``."""

    name: str
    dims: tuple
    dtype: str = "float32"
    sample: str = "normal"     # how random inputs are drawn: normal | timestep | tokens | uniform
    high: int = 0              # exclusive upper bound for integer samples (vocabulary size, timesteps), or of
    #                            uniform ones (a FLUX sigma in [0, 1), its guidance scale)


def _dim_value(dim, values: dict) -> int:
    if isinstance(dim, int):
        return dim
    factor, _, name = dim.rpartition("*")
    return int(factor or 1) * values[name]


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple
    outputs: tuple
    axes: dict                                  # axis name -> AxisRange
    atol: float = 1e-3
    rtol: float = 1e-3

    # ---- shapes -------------------------------------------------------------------------------------------
    def shape_of(self, tensor: str, **values) -> tuple:
        spec = self._tensor(tensor)
        return tuple(_dim_value(d, values) for d in spec.dims)

    def shapes(self, **values) -> dict:
        return {t.name: self.shape_of(t.name, **values) for t in self.inputs}

    def axis_values(self, shapes: dict) -> dict:
        """Axis values read back from concrete input shapes ({input name: shape})."""
        values = {}
        for t in self.inputs:
            if t.name not in shapes:
                continue
            for d, n in zip(t.dims, shapes[t.name]):
                if isinstance(d, str):
                    factor, _, name = d.rpartition("*")
                    values.setdefault(name, int(n) // int(factor or 1))
        return values

    def opt_values(self) -> dict:
        return {k: r.opt for k, r in self.axes.items()}

    def export_values(self) -> dict:
        """Example values for tracing: opt, except that a dynamic axis never traces at 1 (torch.export would
        specialize it)."""
        out = {}
        for k, r in self.axes.items():
            v = r.opt
            if v == 1 and r.max > 1:
                v = max(2, r.multiple)
            out[k] = v
        return out

    def alt_values(self) -> dict:
        """A second valid point, different from opt wherever the range allows (for two-shape validation); about
        3/4 of opt where it can be, so that a larger batch there costs no more memory than the opt point: a larger
        point made the check the build's memory peak (SD 1.5's U-Net at batch 4, 576x576 held 14.4 GB in ONNX
        Runtime; batch 4 at 384x384 holds less than batch 2 at the opt 512x512)."""
        out = {}
        for k, r in self.axes.items():
            smaller = (r.opt * 3 // 4) // r.multiple * r.multiple
            for cand in (smaller, r.opt - r.multiple, r.opt + r.multiple, r.min, r.max):
                if r.allows(cand) and cand != r.opt:
                    out[k] = cand
                    break
            else:
                out[k] = r.opt
        return out

    def check(self, **values) -> None:
        """Raise :class:`ShapeError` naming every axis value the spec cannot serve."""
        bad = []
        for k, v in values.items():
            r = self.axes.get(k)
            if r is not None and not r.allows(int(v)):
                mult = f", multiple of {r.multiple}" if r.multiple > 1 else ""
                bad.append(f"{k}={v} (allowed {r.min}-{r.max}{mult})")
        if bad:
            raise ShapeError(f"{self.name} cannot serve {', '.join(bad)}")

    def profile(self) -> dict:
        """TensorRT-style (min, opt, max) shapes per input."""
        lo = {k: r.min for k, r in self.axes.items()}
        hi = {k: r.max for k, r in self.axes.items()}
        return {t.name: (self.shape_of(t.name, **lo), self.shape_of(t.name, **self.opt_values()),
                         self.shape_of(t.name, **hi)) for t in self.inputs}

    # ---- exporter views -----------------------------------------------------------------------------------
    def dynamic_axes(self) -> dict:
        """``torch.onnx.export(dynamo=False)`` dynamic_axes: {tensor: {index: axis_name}}."""
        out = {}
        for t in self.inputs + self.outputs:
            axes = {i: d.replace("*", "x") for i, d in enumerate(t.dims) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out

    def dynamic_shapes(self) -> dict:
        """``torch.export`` dynamic shapes: {input: {index: Dim * multiple}} built from the axis ranges."""
        import torch

        dims = {}
        for k, r in self.axes.items():
            if r.min == r.max:
                continue
            lo, hi = -(-r.min // r.multiple), r.max // r.multiple
            base = torch.export.Dim(f"{k}_base" if r.multiple > 1 else k, min=max(lo, 1), max=max(hi, 2))
            dims[k] = base * r.multiple if r.multiple > 1 else base
        out = {}
        for t in self.inputs:
            entry = {}
            for i, d in enumerate(t.dims):
                if isinstance(d, str):
                    factor, _, name = d.rpartition("*")
                    if name in dims:
                        entry[i] = dims[name] * int(factor) if factor else dims[name]
            out[t.name] = entry or None
        return out

    # ---- random inputs ------------------------------------------------------------------------------------
    def random_inputs(self, generator, **values) -> dict:
        import torch

        out = {}
        for t in self.inputs:
            shape = self.shape_of(t.name, **values)
            if t.sample == "tokens":
                out[t.name] = torch.randint(0, t.high, shape, generator=generator, dtype=torch.int64)
            elif t.sample == "timestep":
                out[t.name] = torch.randint(0, t.high, shape, generator=generator).to(torch.float32)
            elif t.sample == "uniform":
                out[t.name] = torch.rand(shape, generator=generator) * t.high
            else:
                out[t.name] = torch.randn(shape, generator=generator, dtype=getattr(torch, t.dtype))
        return out

    def to_dict(self) -> dict:
        return {
            "inputs": [dataclasses.asdict(t) for t in self.inputs],
            "outputs": [dataclasses.asdict(t) for t in self.outputs],
            "axes": {k: dataclasses.asdict(r) for k, r in self.axes.items()},
            "atol": self.atol, "rtol": self.rtol,
        }

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ComponentSpec":
        return cls(
            name=name,
            inputs=tuple(TensorSpec(**{**t, "dims": tuple(t["dims"])}) for t in d["inputs"]),
            outputs=tuple(TensorSpec(**{**t, "dims": tuple(t["dims"])}) for t in d["outputs"]),
            axes={k: AxisRange(**r) for k, r in d["axes"].items()},
            atol=d.get("atol", 1e-3), rtol=d.get("rtol", 1e-3),
        )

    def _tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")


# Parity tolerances of engines that are not fp32, against the fp32 PyTorch component (fp32 engines are held to their
# spec's atol/rtol). "l2" compares ||got - ref|| / ||ref|| with rtol; see diffaccel.optimize.export.parity.
TOLERANCES = {
    "bf16": {"kind": "l2", "rtol": 0.1, "atol": 0.0},          # PyTorch bf16
    "fp16": {"kind": "l2", "rtol": 0.05, "atol": 0.0},         # fp16 graphs and engines (ONNX Runtime, TensorRT)
    "int8": {"kind": "l2", "rtol": 0.3, "atol": 0.0},          # a quantized U-Net: a sanity bound (eval measures quality)
    "int8-dynamic": {"kind": "l2", "rtol": 0.1, "atol": 0.0},  # dynamic int8 MatMuls (text encoder, VAE)
    "qdq-vs-fake-quant": {"kind": "l2", "rtol": 0.1, "atol": 0.0},  # Q/DQ ONNX against Model Optimizer's fake-quant
    "w8a16": {"kind": "l2", "rtol": 0.1, "atol": 0.0},         # int8 weights per channel, bf16 compute
    "w4a16": {"kind": "l2", "rtol": 0.3, "atol": 0.0},         # int4 weights in groups: a sanity bound (eval measures)
}


def tolerance(name: str) -> dict:
    """A copy of the named tolerance.

    >>> tolerance("fp16")["rtol"]
    0.05
    """
    return dict(TOLERANCES[name])
