"""TensorRT engines, built with the TensorRT Python API from the ONNX model the stages before this one wrote.

Precision lives in the ONNX graph, never in builder flags: every network is created strongly typed, so TensorRT runs
each layer in the type the graph gives it. fp32 builds the exported model as is (TF32 off, so it is a reference);
fp16 builds the model that Model Optimizer's AutoCast rewrote to fp16 (fp32 kept where values would overflow); int8
and fp8 build a U-Net with Q/DQ nodes from Model Optimizer (other components fp16). TensorRT 11 removed the
FP16/INT8/FP8 builder flags and TensorRT 10 rejects them on strongly typed networks, so this is the one path that
works on both.

One optimization profile per component comes from its spec (``spec.profile()``; static shapes: min = opt = max).
The timing cache is loaded from and saved (atomically) to ``TensorRTConfig.timing_cache``. Builder messages go to
``OUT/<component>/engine/build.log``; a failed build raises a one-line error naming the first parser or last builder
error and where the full log is. Only :func:`build_engine` and the stage's ``run`` need tensorrt and a GPU; the rest
is plain Python (and tested on CPU).

The precision -> build mapping, profiles, the cache key, the log capture and error formatting are plain Python in
:mod:`diffaccel.optimize.stages.tensorrt_build` and
:mod:`diffaccel.engines.backends.tensorrt_env`; the fp16 conversion and int8/fp8 quantization in
:mod:`diffaccel.optimize.quant.modelopt` (run by the stages in :mod:`~diffaccel.optimize.stages.autocast` and
:mod:`~diffaccel.optimize.stages.modelopt_quantize`).
"""
from __future__ import annotations

from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError, DiffaccelError
from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.stages.base import Stage, StageResult
from diffaccel.engines.backends.tensorrt_env import (BuildLog, default_timing_cache, engine_identity, key_of_identity,
                                                     probe_environment, profile_to_json)
from diffaccel.optimize.stages.tensorrt_build import (BuildFailed, build_engine, build_flags, failure_log_path,
                                                      format_build_error, rebuild_command, trt_profile)


# ---- the stage -------------------------------------------------------------------------------------------------------
class TensorRTBuildStage(Stage):
    """One engine per component from the latest ONNX model, parity-checked against PyTorch on the GPU."""

    name = "engine"

    @classmethod
    def preflight(cls, config) -> None:
        env = probe_environment()
        need = build_flags(config.precision).min_sm
        have = tuple(int(v) for v in env.compute_capability.split("."))
        if need and have < need:
            raise BackendUnavailableError(
                f"{config.precision} engines need a GPU of compute capability {need[0]}.{need[1]} or newer (Ada, "
                f"Hopper, Blackwell); {env.gpu} is {env.sm}; use --precision int8 or fp16")

    def settings(self, ctx):
        t = ctx.config.tensorrt
        return {"precision": str(ctx.config.precision), "opt_level": t.opt_level, "workspace_gb": t.workspace_gb,
                "static_shapes": t.static_shapes, "cuda_graph": t.cuda_graph,
                "environment": probe_environment().to_dict()}

    def run(self, ctx):
        env = probe_environment()
        result = StageResult()
        for comp in ctx.components:
            with ctx.timed(self.name, comp):
                result.add(comp, files=self._build_one(ctx, comp, env))
        return result

    def _build_one(self, ctx, comp: str, env) -> list:
        from diffaccel.engines.backends.tensorrt import TrtEngine

        cfg = ctx.config.tensorrt
        spec, src = ctx.specs[comp], ctx.latest_model(comp, self.name)
        profile = trt_profile(spec, cfg.static_shapes)
        sink = BuildLog()
        cache_path = Path(cfg.timing_cache).expanduser() if cfg.timing_cache else default_timing_cache()
        try:
            plan = build_engine(src, profile, cfg, build_flags(ctx.config.precision), sink, cache_path)
        except BuildFailed as e:
            path = sink.save(failure_log_path(comp))
            raise DiffaccelError(format_build_error(comp, sink, e.parser_errors, path)) from None
        with fresh_dir(ctx.root / comp / "engine") as d:
            (d / "model.plan").write_bytes(plan)
            sink.save(d / "build.log")
            engine = TrtEngine.from_bytes(plan, comp, cuda_graph=False)
            report = ctx.check_against_torch(comp, engine)
            del engine
        plan_file = ctx.root / comp / "engine" / "model.plan"
        ctx.record_component(comp, backend="tensorrt", engine=f"{comp}/engine/model.plan", files=[plan_file],
                             validation=report, tensorrt=self._entry(ctx, comp, profile, env, cache_path))
        return [plan_file, ctx.root / comp / "engine" / "build.log"]

    def _entry(self, ctx, comp: str, profile: dict, env, cache_path: Path) -> dict:
        cfg = ctx.config.tensorrt
        quant = ctx.info_of("quantize", comp).get("recipe_hash")
        identity = engine_identity(ctx.source.sha256, comp, str(ctx.config.precision), quant, profile, env)
        shapes = ctx.config.shapes.to_dict()
        return {"cache_key": key_of_identity(identity), "identity": identity, "profile": profile_to_json(profile),
                "strongly_typed": True, "static_shapes": cfg.static_shapes, "cuda_graph": cfg.cuda_graph,
                "opt_level": cfg.opt_level, "timing_cache": str(cache_path), "build_log": f"{comp}/engine/build.log",
                "onnx": build_flags(ctx.config.precision).onnx,
                "rebuild": rebuild_command(ctx.source.spec, str(ctx.config.precision), shapes, cfg.static_shapes,
                                           None if tuple(ctx.components) == ctx.family.COMPONENTS else ctx.components)}
