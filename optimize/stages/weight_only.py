"""The weight-only stage on ONNX Runtime (``--precision w8a16 | w4a16``): the exported denoiser and text encoders with
their constant-weight MatMuls as 8- or 4-bit ``MatMulNBits`` (:func:`~diffaccel.optimize.quant.weight_only.compress_onnx`),
checked against PyTorch at the precision's tolerance, which the engine's final check then keeps. The VAE passes
through in fp32. (OpenVINO compresses in its engine stage instead, where NNCF works on the IR.)"""
from __future__ import annotations

from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.stages.base import ComponentOutcome, Stage, StageResult

ALGORITHM_VERSION = 1


class WeightOnlyStage(Stage):
    name = "weights"

    def settings(self, ctx):
        from diffaccel.optimize.quant.weight_only import GROUP_SIZE

        return {"precision": str(ctx.config.precision), "group_size": GROUP_SIZE, "algorithm": ALGORITHM_VERSION}

    def run(self, ctx):
        from diffaccel.engines.backends.onnxruntime import OrtEngine
        from diffaccel.optimize.export.onnx_export import onnx_files
        from diffaccel.optimize.quant.weight_only import compress_onnx, compresses

        precision, result = str(ctx.config.precision), StageResult()
        for comp in ctx.components:
            if not compresses(precision, comp):
                result.add(comp, ComponentOutcome())          # the VAE: float, its precision entry says so
                continue
            src = ctx.latest_model(comp, self.name)
            with ctx.timed(self.name, comp), fresh_dir(ctx.root / comp / "weights") as d:
                facts = compress_onnx(src, d / "model.onnx", precision)
                engine = OrtEngine(d / "model.onnx", threads=ctx.config.threads, level="disable", arena=False,
                                   prepack=False)
                report = ctx.check_against_torch(comp, engine, final=False, **tolerance(precision))
                del engine
                written = [p.name for p in onnx_files(d / "model.onnx")]
            result.add(comp, ComponentOutcome(model=f"{comp}/weights/model.onnx", validation=report,
                                              tolerance=tolerance(precision), facts=facts),
                       files=[ctx.root / comp / "weights" / n for n in written])
        return result
