"""ONNX Runtime engines: CPU by default, CUDA and TensorRT execution providers by name.

>>> resolve_provider("cpu")[0]
'CPUExecutionProvider'
"""
from __future__ import annotations

import logging
from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError

log = logging.getLogger(__name__)


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(double)": "float64"}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed; install diffaccel[cpu] (or diffaccel[gpu] on "
                                      "NVIDIA machines)") from None
    return onnxruntime


def resolve_provider(name: str) -> tuple:
    """Map a short provider name (cpu/cuda/tensorrt) or an ORT provider name to (ORT name, short name)."""
    short = {v: k for k, v in PROVIDERS.items()}
    if name in short:
        return name, short[name]
    if name not in PROVIDERS:
        raise BackendUnavailableError(f"unknown execution provider {name!r}; choose one of: {', '.join(PROVIDERS)}")
    return PROVIDERS[name], name


def check_provider(name: str) -> str:
    ort_name, short = resolve_provider(name)
    available = _ort().get_available_providers()
    if ort_name not in available:
        raise BackendUnavailableError(
            f"execution provider {short} ({ort_name}) is not available in this onnxruntime (available: "
            f"{', '.join(available)}); install diffaccel[gpu] on a machine with an NVIDIA GPU, or use --provider cpu")
    return ort_name


def session_options(threads: "int | None" = None, level: str = "all", optimized_path: "Path | None" = None,
                    external_data_name: "str | None" = None, spin: "bool | None" = None, arena: bool = True,
                    prepack: bool = True):
    """ORT session options. ``spin=False`` stops the intra-op threads from busy-waiting for work after each run
    (ORT spins by default): a benchmark that interleaves an ORT session with other work on the same cores needs it
    off, or the spinning threads slow whatever runs next (a 17 ms PyTorch U-Net step measured 99 ms).

    >>> session_options(spin=False).get_session_config_entry("session.intra_op.allow_spinning")
    '0'
    >>> session_options(prepack=False).get_session_config_entry("session.disable_prepacking")
    '1'
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    if spin is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if not arena:     # one-off checks at build time: the arena keeps its high-water mark (+0.4 GB on SD 1.5's U-Net)
        so.enable_cpu_mem_arena = False
    if not prepack:   # build-time sessions: MLAS pre-packs every constant MatMul/Gemm weight into an anonymous copy
        # (1.1 GB of SD 1.5's 3.4 GB U-Net); without it the weights stay in the mapped external-data file
        so.add_session_config_entry("session.disable_prepacking", "1")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        if external_data_name:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        external_data_name)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return so


def provider_options(ort_name: str, device_id: int = 0, cache_dir: "Path | None" = None, fp16: bool = False,
                     profile: "dict | None" = None):
    """Provider options. For TensorRT: engine and timing caches in ``cache_dir`` (a folder named by the engine cache
    key, see diffaccel.engines.backends.tensorrt_env.ort_trt_cache_dir) and, given the spec's ``profile``, explicit min/opt/max
    shapes, so the EP builds one engine for the artifact's whole shape range instead of one per shape seen.

    >>> provider_options("TensorrtExecutionProvider", profile={"x": ((1, 4), (2, 4), (8, 4))})["trt_profile_opt_shapes"]
    'x:2x4'
    """
    if ort_name == "CUDAExecutionProvider":   # the CUDA EP keeps no engine cache on disk: nothing to key
        return {"device_id": device_id}
    if ort_name == "TensorrtExecutionProvider":
        opts = {"device_id": device_id, "trt_fp16_enable": fp16}
        if cache_dir is not None:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                        trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
        if profile:
            for i, which in enumerate(("min", "opt", "max")):
                opts[f"trt_profile_{which}_shapes"] = ",".join(
                    f"{name}:{'x'.join(str(int(d)) for d in shapes[i])}" for name, shapes in profile.items())
        return opts
    return {}


class OrtEngine:
    """One ONNX Runtime session with named torch-tensor inputs and outputs."""

    def __init__(self, path: "Path | bytes", provider: str = "cpu", threads: "int | None" = None, level: str = "all",
                 device_id: int = 0, cache_dir: "Path | None" = None, spec=None, spin: "bool | None" = None,
                 arena: bool = True, external_data_dir: "Path | None" = None, prepack: bool = True):
        ort = _ort()
        ort_name = check_provider(provider)
        profile = spec.profile() if spec is not None and cache_dir is not None else None
        providers = [(ort_name, provider_options(ort_name, device_id, cache_dir, profile=profile))]
        if ort_name != "CPUExecutionProvider":
            providers.append(("CPUExecutionProvider", {}))
        self.provider = ort_name
        so = session_options(threads, level, spin=spin, arena=arena, prepack=prepack)
        if isinstance(path, bytes):     # a serialized graph whose external weights lie in ``external_data_dir``
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(external_data_dir))
        self.session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._types = {i.name: _NP_TYPES.get(i.type, "float32") for i in self.session.get_inputs()}
        self._out_types = {o.name: _NP_TYPES.get(o.type, "float32") for o in self.session.get_outputs()}
        self.spec = spec
        self._cuda = ort_name != "CPUExecutionProvider"
        self._device_id = device_id

    @property
    def device(self):
        import torch

        return torch.device("cuda", self._device_id) if self._cuda else torch.device("cpu")

    def __call__(self, **inputs) -> dict:
        if self._cuda:
            return self._run_bound(inputs)
        import numpy as np
        import torch

        feed = {}
        for name in self.input_names:
            t = inputs[name]
            arr = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
            feed[name] = np.ascontiguousarray(arr.astype(self._types[name], copy=False))
        outs = self.session.run(None, feed)
        return {n: torch.from_numpy(o) for n, o in zip(self.output_names, outs)}

    def _run_bound(self, inputs: dict) -> dict:
        """GPU providers: bind torch CUDA tensors in place (no host copies); outputs are preallocated from the
        spec's output shapes."""
        import torch

        if self.spec is None:
            raise BackendUnavailableError("GPU execution needs the component spec from the manifest")
        binding = self.session.io_binding()
        feeds = {n: inputs[n].to(self.device, getattr(torch, self._types[n])).contiguous() for n in self.input_names}
        for name, t in feeds.items():
            binding.bind_input(name, "cuda", self._device_id, _np_dtype(self._types[name]), tuple(t.shape),
                               t.data_ptr())
        values = self.spec.axis_values({n: tuple(t.shape) for n, t in feeds.items()})
        outs = {}
        for name in self.output_names:
            dtype = self._out_types[name]
            t = torch.empty(self.spec.shape_of(name, **values), dtype=getattr(torch, dtype), device=self.device)
            binding.bind_output(name, "cuda", self._device_id, _np_dtype(dtype), tuple(t.shape), t.data_ptr())
            outs[name] = t
        self.session.run_with_iobinding(binding)
        return outs


def _np_dtype(name: str):
    import numpy as np

    return np.dtype(name) if name != "bfloat16" else np.uint16


def load(root, component: str, entry: dict, provider: "str | None" = None, threads: "int | None" = None,
         spin: "bool | None" = None, **_ignored) -> OrtEngine:
    built_for = entry.get("provider", "cpu")
    provider = provider or built_for
    if resolve_provider(provider)[1] != resolve_provider(built_for)[1]:
        raise BackendUnavailableError(
            f"{component} was optimized for the {built_for} provider, not {provider}; rebuild with "
            f"diffaccel optimize SRC -o {root} --provider {resolve_provider(provider)[1]}")
    from diffaccel.optimize.artifact.specs import ComponentSpec

    from diffaccel.engines.backends.cpu import warn_if_saturating

    warn_if_saturating(component, entry, log)
    cache = _trt_cache_dir(root, component, entry) if resolve_provider(provider)[1] == "tensorrt" else None
    spec = ComponentSpec.from_dict(component, entry["spec"]) if "spec" in entry else None
    return OrtEngine(Path(root) / entry["engine"], provider=provider, threads=threads, cache_dir=cache, spec=spec,
                     spin=spin)


def _trt_cache_dir(root, component: str, entry: dict) -> Path:
    """The TensorRT EP's engine cache folder, named by the same cache key as diffaccel's own TensorRT engines (source,
    component, precision, quantization, profile shapes, TensorRT version, GPU)."""
    from diffaccel.engines.backends.tensorrt_env import ort_trt_cache_dir, probe_environment_lenient

    return ort_trt_cache_dir(root, component, entry, probe_environment_lenient())
