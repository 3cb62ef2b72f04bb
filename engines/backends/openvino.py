"""OpenVINO engines on CPUs: an OpenVINO IR (``model.xml`` + ``model.bin``) compiled for the CPU plugin.

The inference precision is explicit: ``f32`` for fp32 engines (OpenVINO would otherwise pick bf16 on its own on CPUs
with AVX512_BF16 or AMX), ``bf16`` where the artifact asks for it. int8 engines are diffaccel's calibrated Q/DQ
models; OpenVINO runs their quantized layers in int8 and the rest at the recorded float precision. Compiled models are
cached (OpenVINO's model cache) in a folder named by a key of the OpenVINO version, the CPU and its ISA flags and the
inference precision, so a cache is never reused on another CPU or OpenVINO version.

>>> cpu_key("f32")["precision"], len(cache_key("f32"))
('f32', 16)
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError

log = logging.getLogger(__name__)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
_DTYPES = {"f32": "float32", "i64": "int64", "i32": "int32", "f16": "float16"}


def openvino():
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailableError("openvino is not installed; install diffaccel[openvino]") from None
    return ov


def cpu_flags() -> tuple:
    """The ISA flags among ISA_FLAGS that this CPU reports (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return tuple(f for f in ISA_FLAGS if f in have)


def capabilities() -> tuple:
    """OpenVINO's CPU optimization capabilities (e.g. FP32, BF16, INT8)."""
    return tuple(openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def cpu_key(precision: str) -> dict:
    """What a compiled model depends on besides the model itself."""
    import platform

    ov = openvino()
    return {"openvino": ov.__version__, "cpu": platform.processor() or platform.machine(),
            "device": ov.Core().get_property("CPU", "FULL_DEVICE_NAME"), "isa": list(cpu_flags()),
            "precision": precision}


def cache_key(precision: str) -> str:
    return hashlib.sha256(json.dumps(cpu_key(precision), sort_keys=True).encode()).hexdigest()[:16]


class OvEngine:
    """One compiled OpenVINO model with named torch-tensor inputs and outputs."""

    def __init__(self, path: Path, precision: str = "f32", threads: "int | None" = None,
                 cache_dir: "Path | None" = None, hint: str = "LATENCY", spec=None):
        ov = openvino()
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        # a port can carry several tensor names (the converter adds internal ones): name each by the spec
        self._inputs = {_port_name(p, spec.inputs if spec else ()): p for p in self.compiled.inputs}
        self._outputs = {_port_name(p, spec.outputs if spec else ()): p for p in self.compiled.outputs}
        self.input_names, self.output_names = tuple(self._inputs), tuple(self._outputs)
        self._types = {n: _DTYPES.get(p.get_element_type().get_type_name(), "float32")
                       for n, p in self._inputs.items()}
        self.precision = precision

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def __call__(self, **inputs) -> dict:
        import numpy as np
        import torch

        feed = {}
        for name, port in self._inputs.items():
            t = inputs[name]
            arr = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
            feed[port] = np.ascontiguousarray(arr.astype(self._types[name], copy=False))
        result = self.request.infer(feed)
        return {n: torch.from_numpy(np.array(result[p], copy=True)) for n, p in self._outputs.items()}


def _port_name(port, tensors) -> str:
    """The spec's name among the port's tensor names (any of them where no spec is given)."""
    names = port.get_names()
    wanted = [t.name for t in tensors if t.name in names]
    return wanted[0] if wanted else port.get_any_name()


def _cache_dir(root, component: str, precision: str) -> "Path | None":
    """``OUT/<component>/ov_cache/<key>`` where the artifact is writable, else no cache."""
    d = Path(root) / component / "ov_cache" / cache_key(precision)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        log.info("artifact %s is read-only: compiling %s without OpenVINO's model cache", root, component)
        return None
    return d


def load(root, component: str, entry: dict, threads: "int | None" = None, hint: str = "LATENCY",
         **_ignored) -> OvEngine:
    """``hint``: OpenVINO's performance hint, LATENCY (one request at a time, the default) or THROUGHPUT."""
    precision = entry.get("openvino", {}).get("inference_precision", "f32")
    if precision == "bf16" and "BF16" not in capabilities():
        raise BackendUnavailableError(f"{component} was built to run in bf16, which this CPU's OpenVINO plugin does "
                                      f"not offer (capabilities: {', '.join(capabilities())}); rebuild with "
                                      "diffaccel optimize ... --backend openvino --precision fp32")
    from diffaccel.optimize.artifact.specs import ComponentSpec

    from diffaccel.engines.backends.cpu import warn_if_saturating

    warn_if_saturating(component, entry, log)
    spec = ComponentSpec.from_dict(component, entry["spec"]) if "spec" in entry else None
    return OvEngine(Path(root) / entry["engine"], precision, threads, _cache_dir(root, component, precision), hint,
                    spec)
