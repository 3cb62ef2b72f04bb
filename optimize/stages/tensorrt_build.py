"""Building TensorRT engines: the precision -> build mapping, optimization profiles from specs, the build itself
(TensorRT Python API: the one function here that needs tensorrt and a GPU) and its one-line error.

>>> build_flags("fp32").clear, build_flags("fp16").clear
(('TF32',), ())
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from diffaccel.engines.backends.tensorrt_env import BuildLog, default_timing_cache, import_tensorrt, make_logger
from diffaccel.optimize.artifact.errors import one_line
from diffaccel.optimize.artifact.files import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuildFlags:
    """How one precision is built: network creation flags, builder flags to clear, and the GPU it needs."""

    network: tuple = ("STRONGLY_TYPED",)
    clear: tuple = ()
    min_sm: "tuple | None" = None      # (major, minor) compute capability
    onnx: str = ""                      # what the graph reaching the builder holds


PRECISION_FLAGS = {
    "fp32": BuildFlags(clear=("TF32",), onnx="fp32, as exported"),
    "fp16": BuildFlags(onnx="fp16 from Model Optimizer AutoCast (fp32 where values would overflow), fp32 I/O"),
    "int8": BuildFlags(onnx="U-Net with int8 Q/DQ from Model Optimizer on fp16; other components fp16"),
    "fp8": BuildFlags(min_sm=(8, 9), onnx="U-Net with fp8 Q/DQ from Model Optimizer on fp16; other components fp16"),
}


def build_flags(precision) -> BuildFlags:
    try:
        return PRECISION_FLAGS[str(precision)]
    except KeyError:
        raise ValueError(f"no TensorRT build for precision {precision}; choose one of: "
                         f"{', '.join(PRECISION_FLAGS)}") from None


def trt_profile(spec, static: bool = False) -> dict:
    """{input: (min, opt, max)} for one optimization profile; static shapes build for the opt shape only."""
    prof = spec.profile()
    if static:
        return {name: (opt, opt, opt) for name, (_, opt, _) in prof.items()}
    return prof


def rebuild_command(source_spec: str, precision: str, shapes: dict, static: bool = False,
                    components: "tuple | None" = None) -> str:
    """The ``diffaccel optimize`` command that rebuilds an artifact here (OUT is filled in at load time)."""
    def rng(v):
        return None if v is None else (str(v[0]) if v[0] == v[1] else f"{v[0]}-{v[1]}")

    parts = ["diffaccel optimize", source_spec, "-o {out}", "--backend tensorrt", f"--precision {precision}"]
    for flag in ("batch", "height", "width"):
        if rng(shapes.get(flag)) is not None:
            parts.append(f"--{flag} {rng(shapes.get(flag))}")
    if static:
        parts.append("--static-shapes")
    if components:
        parts.append("--components " + ",".join(components))
    return " ".join(parts + ["--force"])


def format_build_error(component: str, sink: BuildLog, parser_errors: list, log_path) -> str:
    """One line: what failed first, where the full log is, what to try."""
    if parser_errors:
        what = f"the ONNX parser rejected the model: {parser_errors[0]}"
        if len(parser_errors) > 1:
            what += f" (and {len(parser_errors) - 1} more)"
    else:
        errors = sink.errors()
        what = f"the builder failed: {errors[-1]}" if errors else "the builder returned no engine"
    return one_line(f"TensorRT could not build the {component} engine; {what[:400]}; full log: {log_path}. Try "
                    "--opt-level 2, a smaller --batch/--height/--width range, or --precision fp32")


def failure_log_path(component: str) -> Path:
    """Where the log of a failed build goes (OUT is not written when a build fails)."""
    return default_timing_cache().parent / "logs" / f"{component}-{time.strftime('%Y%m%d-%H%M%S')}.build.log"


class BuildFailed(Exception):
    def __init__(self, parser_errors: list):
        super().__init__("TensorRT build failed")
        self.parser_errors = parser_errors


# ---- GPU glue (TensorRT Python API) --------------------------------------------------------------------------------------------------------
def build_engine(onnx_path: Path, profile: dict, trt_config, flags: BuildFlags, sink: BuildLog,
                 timing_cache: Path) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (TensorRT Python API). Raises :class:`BuildFailed`."""
    trt = import_tensorrt()
    logger = make_logger(trt, sink)
    builder = trt.Builder(logger)
    net_flags = 0
    for name in flags.network:
        if hasattr(trt.NetworkDefinitionCreationFlag, name):   # accepted (and implied) on TensorRT 11
            net_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildFailed([_parser_error(parser.get_error(i)) for i in range(parser.num_errors)])
    config = builder.create_builder_config()
    config.builder_optimization_level = int(trt_config.opt_level)
    if trt_config.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(trt_config.workspace_gb * (1 << 30)))
    for name in flags.clear:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s was made for another GPU or TensorRT; starting a new one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildFailed([])
    atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def _parser_error(err) -> str:
    node = f" at node {err.node_name()} ({err.node_operator()})" if err.node_name() else ""
    return f"{err.desc()}{node}"
