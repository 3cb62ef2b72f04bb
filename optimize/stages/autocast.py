"""The fp16 stage of the TensorRT plans: every component's latest ONNX model (Q/DQ U-Nets included) converted to fp16
by Model Optimizer's AutoCast (:func:`~diffaccel.optimize.quant.modelopt.autocast_fp16`), checked against its source
model on ONNX Runtime's CPU kernels."""
from __future__ import annotations

from diffaccel.optimize.artifact.errors import BackendUnavailableError
from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.export.parity import check_parity
from diffaccel.optimize.quant.modelopt import autocast_fp16, has_trt_ops, modelopt_version
from diffaccel.optimize.stages.base import ComponentOutcome, Stage, StageResult


class AutoCastStage(Stage):
    """fp16 ONNX for every component (Q/DQ U-Nets included), checked against its source model on ORT CPU, on inputs
    captured from the pipeline for the U-Net and VAE decoder (random inputs for the others)."""

    name = "fp16"

    @classmethod
    def preflight(cls, config) -> None:
        if str(config.backend) == "tensorrt":
            from diffaccel.engines.backends.tensorrt_env import probe_environment

            probe_environment()        # the plan's real requirement first: TensorRT and a GPU
        try:
            import modelopt.onnx.autocast  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError(f"fp16 conversion needs Model Optimizer's AutoCast (nvidia-modelopt with "
                                          f"its onnx extra; import failed: {e.name or e}); install diffaccel[gpu]"
                                          ) from None

    def settings(self, ctx):
        return {"low_precision": "fp16", "keep_io_types": True, "modelopt": modelopt_version(),
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
