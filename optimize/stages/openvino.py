"""The OpenVINO engine stage: the latest ONNX model of each component (exported, or diffaccel's calibrated int8 Q/DQ)
converted to OpenVINO IR, compiled for the CPU at the plan's inference precision, and checked against PyTorch.

fp32 engines run in f32 (set explicitly: OpenVINO picks bf16 by itself on CPUs that have it); bf16 engines in bf16;
int8 engines run the quantized U-Net's int8 layers in int8 and everything left in float in bf16 where the CPU has
bf16 (f32 elsewhere); weight-only engines (w8a16, w4a16: :mod:`~diffaccel.optimize.quant.weight_only`) hold int8 or
int4 weights and compute in bf16 where the CPU has it. The precision, OpenVINO's version and the CPU's ISA flags go
into the manifest.
"""
from __future__ import annotations

from diffaccel.optimize.artifact.errors import BackendUnavailableError
from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.stages.base import Stage, StageResult


def inference_precision(precision: str, caps: tuple) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a diffaccel precision on a CPU with OpenVINO capabilities ``caps``.

    >>> inference_precision("fp32", ("FP32", "BF16")), inference_precision("int8", ("FP32", "BF16", "INT8"))
    ('f32', 'bf16')
    >>> inference_precision("int8", ("FP32", "INT8"))
    'f32'
    """
    if precision == "fp32":
        return "f32"
    return "bf16" if "BF16" in caps else "f32"        # bf16, int8's float parts, and weight-only's compute


class OpenVinoEngineStage(Stage):
    name = "engine"

    @classmethod
    def preflight(cls, config) -> None:
        from diffaccel.engines.backends.openvino import capabilities

        caps = capabilities()                # raises a one-line error where openvino is not installed
        if str(config.precision) == "bf16" and "BF16" not in caps:
            raise BackendUnavailableError(
                f"this CPU has no bf16 support in OpenVINO (capabilities: {', '.join(caps)}); use --precision fp32 "
                "or int8 with --backend openvino")

    def settings(self, ctx):
        from diffaccel.engines.backends.openvino import capabilities, cpu_key

        precision = inference_precision(str(ctx.config.precision), capabilities())
        return {"precision": str(ctx.config.precision), "environment": cpu_key(precision)}

    def run(self, ctx):
        from diffaccel.engines.backends.openvino import OvEngine, capabilities, cache_key, cpu_key, openvino
        from diffaccel.optimize.quant.weight_only import compress_openvino, compresses, entry_precision

        ov = openvino()
        asked = str(ctx.config.precision)
        precision = inference_precision(asked, capabilities())
        result = StageResult()
        for comp in ctx.components:
            src = ctx.latest_model(comp, self.name)
            with ctx.timed(self.name, comp), fresh_dir(ctx.root / comp / "engine") as d:
                model, weights = ov.convert_model(str(src)), None
                if compresses(asked, comp):        # weight-only: int8/int4 weights, the rest at `precision`
                    model, weights = compress_openvino(model, asked)
                ov.save_model(model, str(d / "model.xml"), compress_to_fp16=False)
                del model
                engine = OvEngine(d / "model.xml", precision, ctx.config.threads, spec=ctx.specs[comp])
                low = tolerance(asked) if weights else {} if precision == "f32" else tolerance("bf16")
                report = ctx.check_against_torch(comp, engine, **(ctx.tolerance(comp) or low))
                del engine
            files = [ctx.root / comp / "engine" / n for n in ("model.xml", "model.bin")]
            result.add(comp, files=files)
            extra = {**entry_precision(asked, comp, "bf16" if precision == "bf16" else "fp32"),
                     **({"weights": weights} if weights else {})}
            ctx.record_component(comp, backend="openvino", engine=f"{comp}/engine/model.xml", files=files,
                                 validation=report, openvino={**cpu_key(precision), "inference_precision": precision,
                                                              "cache_key": cache_key(precision)}, **extra)
        return result
