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
:mod:`diffaccel.optimize.quant.modelopt`.
"""
from __future__ import annotations

from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError, DiffaccelError
from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.export.parity import check_parity
from diffaccel.optimize.quant.modelopt import _modelopt_version, autocast_fp16, has_trt_ops
from diffaccel.optimize.stages.base import ComponentOutcome, Stage, StageResult
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


class AutoCastStage(Stage):
    """fp16 ONNX for every component (Q/DQ U-Nets included), checked against its source model on ORT CPU, on inputs
    captured from the pipeline for the U-Net and VAE decoder (random inputs for the others)."""

    name = "fp16"

    @classmethod
    def preflight(cls, config) -> None:
        if str(config.backend) == "tensorrt":
            probe_environment()        # the plan's real requirement first: TensorRT and a GPU
        try:
            import modelopt.onnx.autocast  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError(f"fp16 conversion needs Model Optimizer's AutoCast (nvidia-modelopt with "
                                          f"its onnx extra; import failed: {e.name or e}); install diffaccel[gpu]"
                                          ) from None

    def settings(self, ctx):
        return {"low_precision": "fp16", "keep_io_types": True, "modelopt": _modelopt_version(),
                "seed": ctx.config.seed}

    def run(self, ctx):
        from diffaccel.optimize.sources.prompts import default_prompts
        from diffaccel.optimize.stages.fp16 import capture_validation_inputs

        prompts = list(default_prompts(n=2))
        samples = capture_validation_inputs(ctx, prompts)
        result = StageResult()
        for comp in ctx.components:
            with ctx.timed(self.name, comp):
                result.add(comp, *self._convert(ctx, comp, samples.get(comp)))
        return result

    def _convert(self, ctx, comp: str, samples: "list | None") -> tuple:
        import torch

        from diffaccel.engines.backends.onnxruntime import OrtEngine

        spec, src = ctx.specs[comp], ctx.latest_model(comp, self.name)
        info = {"decision": "fp16", "method": "modelopt-autocast", "tolerance": ctx.tolerance(comp) or tolerance("fp16")}
        with fresh_dir(ctx.root / comp / "fp16") as d:
            written = [p.name for p in autocast_fp16(src, d / "model.onnx", spec, samples, ctx.config.seed)]
            if has_trt_ops(d / "model.onnx"):
                info["validation"] = {"skipped": "TensorRT-only ops; checked on the engine after the build"}
            else:
                ref, got = OrtEngine(src, "cpu", level="basic"), OrtEngine(d / "model.onnx", "cpu", level="basic")
                info["validation"] = check_parity(spec, ref, got, samples=samples, **info["tolerance"],
                                                  advice="Try --precision fp32.")
                del ref, got
            if samples:
                torch.save(samples, d / "validation_inputs.pt")
                info["validation_inputs"] = f"{comp}/fp16/validation_inputs.pt"
                written.append("validation_inputs.pt")
        outcome = ComponentOutcome(model=f"{comp}/fp16/model.onnx", validation=info.pop("validation"),
                                   tolerance=info.pop("tolerance"), validation_inputs=info.pop("validation_inputs", None),
                                   facts=info)
        return outcome, [ctx.root / comp / "fp16" / n for n in written]
