"""The quantize stage (onnxruntime int8): calibrate on the real pipeline, QDQ the U-Net, and for the text encoder
and VAE measure whether dynamic MatMul-only int8 pays before using it (the decision goes into the manifest)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from diffaccel.optimize.artifact.files import TMP_PREFIX, fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.export.onnx_export import onnx_files
from diffaccel.optimize.quant.ort_static import preprocess, quantize_static_qdq
from diffaccel.optimize.stages.base import ComponentOutcome, Stage, StageResult

MIN_SPEEDUP = 1.10            # dynamic int8 must beat fp32 by this much to be kept
# attention's QK^T MatMul by backend when --attention-scores is not given (measured: see attention_score_matmuls)
# (OpenVINO: int8 scores measured 0.99x as fast as float on SD 1.5; README "Going past the peer")
DEFAULT_ATTENTION_SCORES = {"onnxruntime": "float", "openvino": "float"}


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
        from diffaccel.optimize.quant.calibration import check_prompts_file

        check_prompts_file(config.quant)

    def settings(self, ctx):
        import dataclasses

        from diffaccel.optimize.quant.ort_static import ALGORITHM_VERSION, DEFAULT_KEEP_FP32

        quant = dataclasses.asdict(ctx.config.quant)
        del quant["attention_scores"]       # keyed as resolved below; float scores keep the keys builds had before
        scores = {"attention_scores": "int8"} if attention_scores(ctx.config) == "int8" else {}
        return {"precision": str(ctx.config.precision), "quant": quant, "defaults": sorted(DEFAULT_KEEP_FP32),
                "algorithm": ALGORITHM_VERSION, "threads": ctx.config.threads, **scores}

    def run(self, ctx):
        result = StageResult()
        for comp in ctx.components:
            with ctx.timed(self.name, comp):
                outcome, files = self._unet(ctx) if comp == "unet" else self._maybe_dynamic(ctx, comp)
            result.add(comp, outcome, files)
        return result

    # ---- U-Net: static QDQ on captured inputs -------------------------------------------------------------
    def _unet(self, ctx) -> tuple:
        import torch

        from diffaccel.optimize.quant.calibration import calibration_samples

        from diffaccel.optimize.export.parity import RecordedReference

        q = ctx.config.quant
        prompts, samples = calibration_samples(ctx)
        keep = [samples[0], samples[len(samples) // 2], samples[-1]]   # noisy, middle and late steps
        # PyTorch's outputs on them, for this engine's checks in later stages (the torch model is gone by then)
        reference = RecordedReference.of(ctx.specs["unet"], ctx.torch_reference("unet"), samples=keep)
        src = ctx.latest_model("unet", self.name)
        external = len(onnx_files(src)) > 1
        float_scores = attention_scores(ctx.config) == "float"
        if q.quality_target is None:
            ctx.release_pipe()   # quantizing holds the ONNX weights: one copy of them at a time, not two
        with fresh_dir(ctx.root / "unet" / "quantized") as d, \
                tempfile.TemporaryDirectory(dir=ctx.root, prefix=TMP_PREFIX) as tmp:
            pre = preprocess(src, Path(tmp) / "pre.onnx", external=external)
            smoothing = None
            if q.smoothquant is not None:
                from diffaccel.optimize.quant.smoothquant import smooth

                smoothing = smooth(pre, Path(tmp) / "smooth.onnx", samples, q.smoothquant, external=external)
                pre = Path(tmp) / "smooth.onnx"
            report = quantize_static_qdq(pre, d / "model.onnx", samples, q, external=external,
                                         cache=Path(tmp) / "calibration.json", float_attention_scores=float_scores)
            report["smoothquant"] = smoothing
            if q.quality_target is not None:
                report["quality_target"] = self._meet_target(ctx, pre, d, Path(tmp), samples, external, float_scores)
            torch.save(keep, d / "validation_inputs.pt")
            reference.save(d / "reference.pt")
            written = [p.name for p in onnx_files(d / "model.onnx")] + ["validation_inputs.pt", "reference.pt"]
        report.update(prompts=len(prompts), steps=q.calib_steps, reference="unet/quantized/reference.pt")
        outcome = ComponentOutcome(model="unet/quantized/model.onnx", tolerance=tolerance("int8"),
                                   validation_inputs="unet/quantized/validation_inputs.pt", facts=report)
        return outcome, [ctx.root / "unet" / "quantized" / n for n in written]

    def _meet_target(self, ctx, pre: Path, d: Path, tmp: Path, samples: list, external: bool,
                     float_scores: bool) -> dict:
        """Keep the most sensitive layers in float until images reach --quality-target (judged on the
        calibration prompts); the chosen model replaces d/model.onnx."""
        import shutil

        from diffaccel.optimize.quant.calibration import calibration_prompts, calibration_size
        from diffaccel.optimize.quant.quality_target import ImageJudge, meet_target

        q = ctx.config.quant
        judge = ImageJudge(ctx.pipe, ctx.specs["unet"], calibration_prompts(ctx), q.calib_steps, q.guidance_scale,
                           q.calib_seed, calibration_size(ctx), engine=judging_engine(ctx.config, ctx.specs["unet"]))

        def quantize(extra):
            out = tmp / f"candidate-{len(extra)}" / "model.onnx"
            out.parent.mkdir()
            quantize_static_qdq(pre, out, samples, q, external=external, extra_exclude=extra,
                                cache=tmp / "calibration.json", float_attention_scores=float_scores)
            return out

        result = meet_target(quantize, judge, d / "model.onnx", samples, q.quality_target, ctx.config.threads)
        result["judged_on"] = judged_on(ctx.config)
        chosen = Path(result.pop("model"))
        if chosen != d / "model.onnx":
            for p in onnx_files(chosen):
                shutil.copyfile(p, d / p.name)
        return result

    # ---- other components: dynamic int8 only where measured to pay ----------------------------------------
    def _maybe_dynamic(self, ctx, comp: str) -> tuple:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = ctx.latest_model(comp, self.name)
        spec = ctx.specs[comp]
        with tempfile.TemporaryDirectory(dir=ctx.root, prefix=TMP_PREFIX) as tmp:
            cand = Path(tmp) / "model.onnx"
            src = preprocess(src, Path(tmp) / "pre.onnx", external=len(onnx_files(src)) > 1)
            quantize_dynamic(str(src), str(cand), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=False, extra_options={"MatMulConstBOnly": True},
                             use_external_data_format=len(onnx_files(src)) > 1)
            decision = _measure(src, cand, spec, ctx.config.threads)
            if decision["decision"] != "int8":
                return ComponentOutcome(facts=decision), []
            with fresh_dir(ctx.root / comp / "quantized") as d:
                for p in onnx_files(cand):
                    p.rename(d / p.name)
            written = [p.name for p in onnx_files(ctx.root / comp / "quantized" / "model.onnx")]
        outcome = ComponentOutcome(model=f"{comp}/quantized/model.onnx", tolerance=tolerance("int8-dynamic"),
                                   facts=decision)
        return outcome, [ctx.root / comp / "quantized" / n for n in written]


def _measure(fp32: Path, int8: Path, spec, threads) -> dict:
    """Latency (same inputs, same loop) and error of the dynamic-int8 candidate against fp32."""
    import torch

    from diffaccel.engines.backends.onnxruntime import OrtEngine
    from diffaccel.optimize.export.parity import compare

    inputs = spec.random_inputs(torch.Generator().manual_seed(0), **spec.opt_values())
    a, b = OrtEngine(fp32, threads=threads), OrtEngine(int8, threads=threads)
    ta, tb = _median_seconds(lambda: a(**inputs)), _median_seconds(lambda: b(**inputs))
    stats = compare(a(**inputs), b(**inputs), **tolerance("int8-dynamic"))
    err = max(s["rel_l2"] for s in stats.values())
    speedup = ta / tb
    ok = speedup >= MIN_SPEEDUP and all(s["passed"] for s in stats.values())
    reason = (f"dynamic int8 MatMul is {speedup:.2f}x fp32 with relative L2 error {err:.3g}" +
              ("" if ok else f"; kept fp32 (needs >= {MIN_SPEEDUP}x and error <= 0.1)"))
    return {"method": "dynamic-int8-matmul" if ok else "none", "decision": "int8" if ok else "fp32",
            "fp32_ms": ta * 1e3, "int8_ms": tb * 1e3, "speedup": speedup, "rel_l2": err, "reason": reason}


def _median_seconds(fn, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of ``fn()`` after ``warmup`` calls (a build-time decision, not a benchmark)."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
