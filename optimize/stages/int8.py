"""The quantize stage (onnxruntime and openvino int8): calibrate on the real pipeline and QDQ the U-Net; the other
components stay float unless ``QuantConfig.dynamic_int8`` names them (dynamic int8 MatMul weights). Which components
are quantized is a setting, never a measurement: an artifact is a function of its inputs, the same on a busy machine
and a quiet one.

Float is the default because dynamic int8 did not pay there. The build used to time each candidate against fp32 and
keep int8 at >= 1.1x; on tinyshapes (2-core AMD EPYC, shared) three back-to-back runs of that check gave the text
encoder 0.93x, 1.19x and 1.18x (0.5-1 ms a call: identical builds made different artifacts) and the VAE decoder
0.70x, 0.75x and 0.96x (its only MatMuls are its mid-block attention; convolutions dominate). The text encoder runs
once per image beside 2 x steps U-Net calls (27 ms each there), so even a steady 1.2x would save under 0.2% of an
image while changing every image.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.artifact.files import TMP_PREFIX, fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.export.onnx_export import onnx_files
from diffaccel.optimize.artifact.roles import DENOISERS
from diffaccel.optimize.quant.ort_static import preprocess, quantize_static_qdq, weight_bits
from diffaccel.optimize.stages.base import ComponentOutcome, Stage, StageResult

# attention's QK^T MatMul by backend when --attention-scores is not given (measured: see attention_score_matmuls)
# (OpenVINO: int8 scores measured 0.99x as fast as float on SD 1.5; docs/openvino.md)
DEFAULT_ATTENTION_SCORES = {"onnxruntime": "float", "openvino": "float"}
FLOAT_REASON = ("kept float: dynamic int8 is applied only to the components QuantConfig.dynamic_int8 names (a setting, "
                "not a build-time timing; see diffaccel.optimize.stages.int8)")


def attention_scores(config) -> str:
    """Whether the U-Net's attention score MatMuls are quantized: the user's choice, else the backend's default.

    >>> from diffaccel.optimize.config import QuantConfig
    >>> from types import SimpleNamespace as NS
    >>> attention_scores(NS(backend="onnxruntime", quant=QuantConfig())), attention_scores(
    ...     NS(backend="onnxruntime", quant=QuantConfig(attention_scores="int8")))
    ('float', 'int8')
    """
    return config.quant.attention_scores or DEFAULT_ATTENTION_SCORES.get(str(config.backend), "float")


def _openvino_precision() -> str:
    """The float precision an OpenVINO int8 engine runs its non-quantized layers in on this CPU."""
    from diffaccel.engines.backends.openvino import capabilities
    from diffaccel.optimize.stages.openvino import inference_precision

    return inference_precision("int8", capabilities())


def judged_on(config) -> str:
    """The runtime --quality-target judges candidates on: the one the engine stage compiles for.

    >>> from types import SimpleNamespace as NS
    >>> judged_on(NS(backend="onnxruntime"))
    'onnxruntime'
    """
    return f"openvino {_openvino_precision()}" if str(config.backend) == "openvino" else "onnxruntime"


def judging_engine(config, spec):
    """``engine(path, threads)`` for the ImageJudge: OpenVINO builds are judged by OpenVINO (its int8 kernels, and
    bf16 for what stays float where the CPU has it), everything else by ONNX Runtime's CPU kernels (None)."""
    if str(config.backend) != "openvino":
        return None
    from diffaccel.engines.backends.openvino import OvEngine

    precision = _openvino_precision()
    return lambda path, threads: OvEngine(path, precision, threads, spec=spec)   # OpenVINO reads the ONNX itself


class QuantizeStage(Stage):
    name = "quantize"

    @classmethod
    def preflight(cls, config) -> None:
        from diffaccel.optimize.families import COMPONENTS
        from diffaccel.optimize.quant.calibration import check_prompts_file

        check_prompts_file(config.quant)
        allowed = [c for c in COMPONENTS if c not in DENOISERS]   # the denoiser is always statically quantized
        unknown = [c for c in config.quant.dynamic_int8 if c not in allowed]
        if unknown:
            raise DiffaccelError(f"dynamic int8 for {', '.join(unknown)}: not a component it applies to; choose "
                                 f"from: {', '.join(allowed)}")

    def settings(self, ctx):
        import dataclasses

        from diffaccel.optimize.quant.ort_static import ALGORITHM_VERSION

        quant = dataclasses.asdict(ctx.config.quant)
        del quant["attention_scores"]       # keyed as resolved below; float scores keep the keys builds had before
        del quant["int8_weights"]           # likewise: 8-bit weights keep the keys builds had before
        scores = {"attention_scores": "int8"} if attention_scores(ctx.config) == "int8" else {}
        if weight_bits(ctx.config.quant)[0] == 7:    # resolved here: an artifact built on a CPU without VNNI differs
            scores["weight_bits"] = 7
        judge = {"judged_on": judged_on(ctx.config)} if ctx.config.quant.quality_target is not None else {}
        return {"precision": str(ctx.config.precision), "quant": quant, "defaults": sorted(ctx.family.KEEP_FLOAT),
                "algorithm": ALGORITHM_VERSION, "threads": ctx.config.threads, **scores, **judge}

    def run(self, ctx):
        result = StageResult()
        for comp in ctx.components:
            with ctx.timed(self.name, comp):
                outcome, files = self._denoiser(ctx) if comp == ctx.denoiser else self._other(ctx, comp)
            result.add(comp, outcome, files)
        return result

    # ---- the denoiser (U-Net or transformer): static QDQ on captured inputs -----------------------------------
    def _denoiser(self, ctx) -> tuple:
        import torch

        from diffaccel.optimize.quant.calibration import calibration_samples

        from diffaccel.optimize.export.parity import RecordedReference

        q, den = ctx.config.quant, ctx.denoiser
        step = lambda what: ctx.reporter.item(self.name, f"{den}: {what}")   # noqa: E731  (minutes each on big models)
        step("sampling calibration prompts")
        prompts, samples = calibration_samples(ctx)
        keep = [samples[0], samples[len(samples) // 2], samples[-1]]   # noisy, middle and late steps
        # PyTorch's outputs on them, for this engine's checks in later stages (the torch model is gone by then)
        step("PyTorch reference outputs")
        reference = RecordedReference.of(ctx.specs[den], ctx.torch_reference(den), samples=keep)
        src = ctx.latest_model(den, self.name)
        external = len(onnx_files(src)) > 1
        float_scores = attention_scores(ctx.config) == "float"
        if q.quality_target is None:
            ctx.release_pipe()   # quantizing holds the ONNX weights: one copy of them at a time, not two
        with fresh_dir(ctx.root / den / "quantized") as d, \
                tempfile.TemporaryDirectory(dir=ctx.root, prefix=TMP_PREFIX) as tmp:
            step("ONNX Runtime pre-processing")
            pre = preprocess(src, Path(tmp) / "pre.onnx", external=external)
            smoothing = None
            if q.smoothquant is not None:
                from diffaccel.optimize.quant.smoothquant import smooth

                smoothing = smooth(pre, Path(tmp) / "smooth.onnx", samples, q.smoothquant, external=external)
                pre = Path(tmp) / "smooth.onnx"
            report = quantize_static_qdq(pre, d / "model.onnx", samples, q, external=external,
                                         keep_float=ctx.family.KEEP_FLOAT, scoped=src,
                                         cache=Path(tmp) / "calibration.json", float_attention_scores=float_scores,
                                         progress=lambda i, n: step(f"calibration ranges {i + 1}/{n}" if i < n
                                                                    else "quantizing"))
            report["smoothquant"] = smoothing
            if q.quality_target is not None:
                report["quality_target"] = self._meet_target(ctx, pre, d, Path(tmp), samples, external, float_scores)
            torch.save(keep, d / "validation_inputs.pt")
            reference.save(d / "reference.pt")
            written = [p.name for p in onnx_files(d / "model.onnx")] + ["validation_inputs.pt", "reference.pt"]
        report.update(prompts=len(prompts), steps=q.calib_steps, reference=f"{den}/quantized/reference.pt")
        outcome = ComponentOutcome(model=f"{den}/quantized/model.onnx", tolerance=tolerance("int8"),
                                   validation_inputs=f"{den}/quantized/validation_inputs.pt", facts=report)
        return outcome, [ctx.root / den / "quantized" / n for n in written]

    def _meet_target(self, ctx, pre: Path, d: Path, tmp: Path, samples: list, external: bool,
                     float_scores: bool) -> dict:
        """Keep the most sensitive layers in float until images reach --quality-target (judged on the
        calibration prompts); the chosen model replaces d/model.onnx."""
        import shutil

        from diffaccel.optimize.quant.calibration import calibration_prompts, calibration_size
        from diffaccel.optimize.quant.quality_target import ImageJudge, meet_target

        q = ctx.config.quant
        spec = ctx.specs[ctx.denoiser]
        judge = ImageJudge(ctx.pipe, spec, calibration_prompts(ctx), q.calib_steps, q.guidance_scale, q.calib_seed,
                           calibration_size(ctx), engine=judging_engine(ctx.config, spec), denoiser=ctx.denoiser)

        def quantize(extra):
            out = tmp / f"candidate-{len(extra)}" / "model.onnx"
            out.parent.mkdir()
            quantize_static_qdq(pre, out, samples, q, external=external, keep_float=ctx.family.KEEP_FLOAT,
                                scoped=ctx.latest_model(ctx.denoiser, self.name), extra_exclude=extra,
                                cache=tmp / "calibration.json", float_attention_scores=float_scores)
            return out

        result = meet_target(quantize, judge, d / "model.onnx", samples, q.quality_target, ctx.config.threads)
        result["judged_on"] = judged_on(ctx.config)
        chosen = Path(result.pop("model"))
        if chosen != d / "model.onnx":
            for p in onnx_files(chosen):
                shutil.copyfile(p, d / p.name)
        return result

    # ---- other components: float, or dynamic int8 MatMuls where QuantConfig.dynamic_int8 names them ---------------
    def _other(self, ctx, comp: str) -> tuple:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        if comp not in ctx.config.quant.dynamic_int8:
            return ComponentOutcome(facts={"decision": "fp32", "method": "none", "reason": FLOAT_REASON}), []
        src = ctx.latest_model(comp, self.name)
        with tempfile.TemporaryDirectory(dir=ctx.root, prefix=TMP_PREFIX) as tmp, \
                fresh_dir(ctx.root / comp / "quantized") as d:
            src = preprocess(src, Path(tmp) / "pre.onnx", external=len(onnx_files(src)) > 1)
            bits, why = weight_bits(ctx.config.quant)
            quantize_dynamic(str(src), str(d / "model.onnx"), op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8, per_channel=False, extra_options={"MatMulConstBOnly": True},
                             use_external_data_format=len(onnx_files(src)) > 1, reduce_range=bits == 7)
            written = [p.name for p in onnx_files(d / "model.onnx")]
        facts = {"decision": "int8", "method": "dynamic-int8-matmul", "weight_bits": bits, "weight_bits_reason": why,
                 "reason": "QuantConfig.dynamic_int8 names it; parity with PyTorch is checked by the engine stage"}
        outcome = ComponentOutcome(model=f"{comp}/quantized/model.onnx", tolerance=tolerance("int8-dynamic"),
                                   facts=facts)
        return outcome, [ctx.root / comp / "quantized" / n for n in written]
