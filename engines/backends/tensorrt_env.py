"""What a TensorRT engine is valid for, in plain Python (no TensorRT needed): the environment it runs in, its cache key
and the check at load time; and the TensorRT logger that keeps messages in order. Build-time helpers (precision
flags, profiles, build errors) are in :mod:`diffaccel.optimize.stages.tensorrt_build`.

What a TensorRT engine is valid for: its cache key, the environment it was built in, and the check at load time.

A serialized TensorRT plan only runs on the TensorRT version that built it and is tuned for one GPU; it also serves
only the shapes of its optimization profile. The cache key therefore covers the source hash, the component, the
precision and quantization config, the profile shapes, the TensorRT version and the GPU (name and compute
capability). It is stored in the component's manifest entry; a loader on another GPU or TensorRT version gets a
one-line error that says how to rebuild. Nothing here imports tensorrt at module import time.

>>> env = TrtEnvironment(tensorrt="10.13.0.35", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
>>> profile = {"x": ((1, 4), (2, 4), (8, 4))}
>>> key = engine_cache_key("ab" * 32, "unet", "fp16", None, profile, env)
>>> len(key), key == engine_cache_key("ab" * 32, "unet", "fp16", None, profile, env)
(32, True)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from diffaccel.optimize.artifact.errors import ArtifactError, BackendUnavailableError

KEY_VERSION = 1     # bump when the key's recipe changes, so old keys never match new ones


@dataclasses.dataclass(frozen=True)
class TrtEnvironment:
    """The TensorRT version and GPU an engine is built for (or that a loader runs on)."""

    tensorrt: str
    gpu: str
    compute_capability: str     # "8.9"

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")

    def describe(self) -> str:
        return f"{self.gpu} ({self.sm}) with TensorRT {self.tensorrt}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def import_tensorrt():
    """``import tensorrt`` or a one-line :class:`BackendUnavailableError` that says what to install."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed (import tensorrt failed); on a machine with an NVIDIA GPU install "
            "diffaccel[gpu], or use --backend onnxruntime") from None
    return tensorrt


def require_cuda(device: int = 0) -> None:
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("the tensorrt backend needs an NVIDIA GPU with CUDA, and torch sees none "
                                      "(torch.cuda.is_available() is False); use --backend onnxruntime here")
    if device >= torch.cuda.device_count():
        raise BackendUnavailableError(f"CUDA device {device} does not exist (this machine has "
                                      f"{torch.cuda.device_count()}); pick another device")


def probe_environment(device: int = 0) -> TrtEnvironment:
    """The running TensorRT version and GPU. Raises BackendUnavailableError without TensorRT or CUDA."""
    trt = import_tensorrt()
    require_cuda(device)
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return TrtEnvironment(tensorrt=str(trt.__version__), gpu=torch.cuda.get_device_name(device),
                          compute_capability=f"{major}.{minor}")


def probe_environment_lenient(device: int = 0) -> TrtEnvironment:
    """Like :func:`probe_environment`, with "unknown" for what cannot be found (the ONNX Runtime TensorRT EP loads
    TensorRT's libraries itself; the ``tensorrt`` Python package may be absent)."""
    try:
        version = str(import_tensorrt().__version__)
    except BackendUnavailableError:
        version = "unknown"
    import torch

    if not torch.cuda.is_available():   # e.g. onnxruntime-gpu beside a CPU build of torch: ask the driver (NVML)
        gpu, cc = _nvml_gpu(device) or ("unknown", "0.0")
        return TrtEnvironment(tensorrt=version, gpu=gpu, compute_capability=cc)
    major, minor = torch.cuda.get_device_capability(device)
    return TrtEnvironment(tensorrt=version, gpu=torch.cuda.get_device_name(device),
                          compute_capability=f"{major}.{minor}")


def _nvml_gpu(device: int) -> "tuple | None":
    """(GPU name, "major.minor") from NVML (package nvidia-ml-py, in the gpu extra), or None where it is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = _nvml_handle(pynvml, device)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # ImportError, NVMLError (no driver): the key then says "unknown"
        return None
    return (name.decode() if isinstance(name, bytes) else str(name)), f"{major}.{minor}"


def _nvml_handle(pynvml, device: int):
    """NVML numbers GPUs physically; CUDA numbers the ones CUDA_VISIBLE_DEVICES lists (indices or UUIDs)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if device < len(visible):
        chosen = visible[device]
        if chosen.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(chosen))
        return pynvml.nvmlDeviceGetHandleByUUID(chosen)
    return pynvml.nvmlDeviceGetHandleByIndex(device)


def profile_to_json(profile: dict) -> dict:
    """{input: ((min), (opt), (max))} -> {input: [[min], [opt], [max]]} (JSON-shaped, order kept)."""
    return {name: [list(map(int, s)) for s in shapes] for name, shapes in profile.items()}


def engine_identity(source_sha256: str, component: str, precision: str, quant_hash: "str | None", profile: dict,
                    env: TrtEnvironment) -> dict:
    """Everything the cache key covers, JSON-shaped (stored in the manifest next to the key)."""
    return {"key_version": KEY_VERSION, "source_sha256": source_sha256, "component": component,
            "precision": str(precision), "quant_config_hash": quant_hash, "profile": profile_to_json(profile),
            **env.to_dict()}


def key_of_identity(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def engine_cache_key(source_sha256: str, component: str, precision: str, quant_hash: "str | None", profile: dict,
                     env: TrtEnvironment) -> str:
    """A stable hash of what an engine is valid for (see the module docstring)."""
    return key_of_identity(engine_identity(source_sha256, component, precision, quant_hash, profile, env))


def check_engine_compatible(component: str, trt_entry: dict, env: TrtEnvironment, out) -> None:
    """Raise a one-line :class:`ArtifactError` unless the engine of ``component`` was built for ``env``."""
    ident = trt_entry.get("identity") or {}
    if not ident or key_of_identity(ident) != trt_entry.get("cache_key"):
        raise ArtifactError(f"{out}: the TensorRT entry of {component} in manifest.json does not match its cache key "
                            "(edited by hand?); rebuild with diffaccel optimize --force")
    built = TrtEnvironment(tensorrt=ident["tensorrt"], gpu=ident["gpu"],
                           compute_capability=ident["compute_capability"])
    if built != env:
        hint = trt_entry.get("rebuild", "diffaccel optimize SRC -o {out} --backend tensorrt --force")
        raise ArtifactError(f"{component} engine in {out} was built for {built.describe()}; this machine has "
                            f"{env.describe()}; rebuild with: {hint.format(out=out)}")


def default_timing_cache() -> Path:
    """``$XDG_CACHE_HOME/diffaccel/trt-timing.cache`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffaccel" / "trt-timing.cache"


def ort_trt_cache_dir(root, component: str, entry: dict, env: "TrtEnvironment | None") -> Path:
    """Engine cache folder of the ONNX Runtime TensorRT execution provider for one component: keyed like our own
    engines, so ORT never reuses an engine built for other shapes, another GPU or another TensorRT version."""
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.artifact.specs import ComponentSpec

    spec = ComponentSpec.from_dict(component, entry["spec"])
    env = env or TrtEnvironment(tensorrt="unknown", gpu="unknown", compute_capability="0.0")
    manifest = Manifest.load(root)
    source = manifest.source.get("sha256", "")
    quant = (entry.get("quantize") or {}).get("recipe_hash") or manifest.stages.get("quantize", {}).get("recipe_hash")
    key = engine_cache_key(source, component, entry.get("precision", "fp32"), quant, spec.profile(), env)
    return Path(root) / component / "trt_cache" / key


SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


# ---- builder log ---------------------------------------------------------------------------------------------------
class BuildLog:
    """Messages of one build, kept in order; the ILogger subclass in :func:`make_logger` feeds it."""

    def __init__(self):
        self.lines = []

    def add(self, severity: str, msg: str) -> None:
        self.lines.append((severity, str(msg).rstrip()))

    def errors(self) -> list:
        return [m for s, m in self.lines if s in ("INTERNAL_ERROR", "ERROR")]

    def text(self) -> str:
        return "".join(f"[{s}] {m}\n" for s, m in self.lines)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.text())
        return path


def make_logger(trt, sink: BuildLog, min_severity: str = "INFO"):
    """A ``trt.ILogger`` that sends every message at or above ``min_severity`` to ``sink``."""
    keep = set(SEVERITIES[: SEVERITIES.index(min_severity) + 1])

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            name = getattr(severity, "name", str(severity)).rsplit(".", 1)[-1]
            if name in keep:
                sink.add(name, msg)

    return _Logger()


