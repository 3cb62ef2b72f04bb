"""The quantize stage of the TensorRT plans: Model Optimizer int8/fp8 Q/DQ U-Net, calibrated on the pipeline (see
:mod:`diffaccel.optimize.quant.modelopt`); every other component passes through unchanged."""
from __future__ import annotations

import copy
import dataclasses

from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.quant.modelopt import (export_qdq, modelopt_version, quantize_denoiser, recipe_for, recipe_hash,
                                               require_modelopt, validate_qdq)
from diffaccel.optimize.stages.base import ComponentOutcome, Stage, StageResult


class ModeloptQuantStage(Stage):
    """int8/fp8 Q/DQ U-Net; every other component passes through unchanged."""

    name = "quantize"

    @classmethod
    def preflight(cls, config) -> None:
        if str(config.backend) == "tensorrt":
            from diffaccel.engines.backends.tensorrt_env import probe_environment

            probe_environment()
        recipe_for(config.precision, config.quant)
        from diffaccel.optimize.quant.calibration import check_prompts_file

        check_prompts_file(config.quant)
        require_modelopt(f"--precision {config.precision} with --backend tensorrt")

    def settings(self, ctx):
        recipe = recipe_for(ctx.config.precision, ctx.config.quant)
        return {"recipe": dataclasses.asdict(recipe), "recipe_hash": recipe_hash(recipe, ctx.config.quant),
                "modelopt": modelopt_version(), "opset": ctx.config.opset}

    def run(self, ctx):
        if ctx.denoiser not in ctx.components:
            return StageResult()
        with ctx.timed(self.name, ctx.denoiser):
            outcome, files = self._quantize(ctx)
        result = StageResult()
        result.add(ctx.denoiser, outcome, files)
        return result

    def _quantize(self, ctx) -> tuple:
        import torch

        from diffaccel.optimize.quant.calibration import calibration_samples, calibration_size

        den = ctx.denoiser
        quant, spec = ctx.config.quant, ctx.specs[den]
        recipe = recipe_for(ctx.config.precision, quant)
        size = dict(zip(("height", "width"), calibration_size(ctx)))
        _, calib = calibration_samples(ctx)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = copy.deepcopy(getattr(ctx.pipe, den))
        module = ctx.family.export_module(den, {den: model})
        quantize_denoiser(model, recipe, calib, module, tuple(t.name for t in spec.inputs), device)
        module = module.to("cpu")
        keep = [calib[0], calib[len(calib) // 2], calib[-1]]       # noisy, middle and late steps
        with fresh_dir(ctx.root / den / "quantize") as d:
            written = [p.name for p in export_qdq(module, spec, d / "model.onnx", ctx.config.opset)]
            report = validate_qdq(spec, module, ctx.family.export_module(den, ctx.pipe), d / "model.onnx", keep,
                                  recipe)
            torch.save(keep, d / "validation_inputs.pt")
        outcome = ComponentOutcome(
            model=f"{den}/quantize/model.onnx", validation=report, tolerance=tolerance("int8"),
            validation_inputs=f"{den}/quantize/validation_inputs.pt",
            facts={"method": "modelopt", "precision": recipe.precision, "recipe": dataclasses.asdict(recipe),
                   "recipe_hash": recipe_hash(recipe, quant), "modelopt": modelopt_version(),
                   "calibration": {"samples": len(calib), **size}})
        return outcome, [ctx.root / den / "quantize" / n for n in written + ["validation_inputs.pt"]]
