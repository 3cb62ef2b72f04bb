"""``--quality-target psnr=DB``: keep the U-Net's most quantization-sensitive layers in float until images generated
with the int8 U-Net match the float pipeline's to the target PSNR on the calibration prompts.

Sensitivity is the signal-to-quantization-noise ratio of each quantized node's input activations under its own
calibrated scale (measured on captured inputs); nodes are returned to float worst-first, doubling the count each
round, and every round is judged by real images, not by a proxy.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError

log = logging.getLogger(__name__)


def activation_sqnr(qdq_model: Path, samples: list) -> dict:
    """{node name: worst SQNR (dB) over its quantized activation inputs} for every node fed by a DequantizeLinear
    whose QuantizeLinear reads an activation."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(qdq_model), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    watch = {}                                     # float tensor -> (scale, zero point, [consumer nodes])
    for n in model.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        for inp in n.input:
            dq = producer.get(inp)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear" or q.input[1] not in inits:
                continue
            scale = float(numpy_helper.to_array(inits[q.input[1]]).reshape(-1)[0])
            zp = float(numpy_helper.to_array(inits[q.input[2]]).reshape(-1)[0]) if len(q.input) > 2 else 0.0
            watch.setdefault(q.input[0], (scale, zp, []))[2].append(n.name)
    for t in watch:
        model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(watch)
    sig, noise = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for s in samples:
        for t, x in zip(names, sess.run(names, {k: v.numpy() for k, v in s.items()})):
            scale, zp, _ = watch[t]
            xhat = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
            sig[t] += float(np.square(x).sum())
            noise[t] += float(np.square(x - xhat).sum())
    worst: dict = {}
    for t, (_, _, nodes) in watch.items():
        db = 10 * math.log10(sig[t] / noise[t]) if noise[t] > 0 else math.inf
        for node in nodes:
            worst[node] = min(worst.get(node, math.inf), db)
    return worst


class ImageJudge:
    """PSNR of images made with an int8 denoiser engine against the float pipeline's, on fixed prompts and seeds."""

    def __init__(self, pipe, spec, prompts: list, steps: int, guidance: float, seed: int, size: tuple,
                 engine=None, *, denoiser: str):
        """``engine(path, threads)``: the runtime the candidate denoiser will be deployed on (default ONNX Runtime),
        so that its int8 kernels and its float precision (e.g. OpenVINO's bf16) are what is judged; ``denoiser``:
        the pipeline attribute it replaces (the family's ``DENOISER``)."""
        self.pipe, self.spec, self.prompts, self.denoiser = pipe, spec, prompts, denoiser
        self.engine = engine or _ort_engine
        self.kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=size[0], width=size[1],
                       output_type="np")
        self.seed = seed
        self.reference = [self._run(pipe, i) for i in range(len(prompts))]

    def _run(self, pipe, i):
        import torch

        pipe.set_progress_bar_config(disable=True)
        return pipe(self.prompts[i], generator=torch.Generator().manual_seed(self.seed + i), **self.kw).images

    def psnr(self, engine_path: Path, threads=None) -> float:
        import numpy as np
        from diffaccel.engines.pipelines.denoisers import denoiser_shim

        original = getattr(self.pipe, self.denoiser)
        shim = denoiser_shim(type(original).__name__, self.engine(engine_path, threads), self.spec, original.config)
        candidate = type(self.pipe)(**{**self.pipe.components, self.denoiser: shim})
        mse = float(np.mean([np.mean((self._run(candidate, i) - ref) ** 2)
                             for i, ref in enumerate(self.reference)]))
        return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _ort_engine(path: Path, threads=None):
    from diffaccel.engines.backends.onnxruntime import OrtEngine

    return OrtEngine(path, threads=threads)


def meet_target(quantize, judge: ImageJudge, first: Path, samples: list, target: float, threads=None) -> dict:
    """Starting from ``first`` (the default int8 model), re-quantize with more nodes kept in float until the
    judge's PSNR reaches ``target``. ``quantize(extra_exclude) -> Path`` writes a candidate model."""
    trail = [{"kept_float_extra": 0, "psnr": judge.psnr(first, threads)}]
    log.info("quality target %.1f dB: default int8 gives %.2f dB", target, trail[0]["psnr"])
    if trail[0]["psnr"] >= target:
        return {"target_psnr": target, "reached": True, "extra_kept_float": [], "trail": trail, "model": first}
    ranking = sorted(activation_sqnr(first, samples[:4]).items(), key=lambda kv: kv[1])
    most = len(ranking) - 1          # at least one node stays int8: every node in float is the fp32 model
    k = 2
    while True:
        k = min(k, most)
        extra = [name for name, _ in ranking[:k]]
        model = quantize(tuple(extra))
        trail.append({"kept_float_extra": k, "psnr": judge.psnr(model, threads),
                      "worst_sqnr_db": [round(db, 2) for _, db in ranking[:k]][:8]})
        log.info("quality target: %d more node(s) in float -> %.2f dB", k, trail[-1]["psnr"])
        if trail[-1]["psnr"] >= target:
            return {"target_psnr": target, "reached": True, "extra_kept_float": extra, "trail": trail, "model": model}
        if k >= most:
            best = max(trail, key=lambda r: r["psnr"])
            raise DiffaccelError(
                f"--quality-target psnr={target:g} is not reachable: the best was {best['psnr']:.2f} dB with "
                f"{best['kept_float_extra']} extra node(s) in float (up to {most} of {len(ranking)} tried); lower the target, use "
                "more --calib-size/--calib-steps, try --calib-method percentile, or keep the denoiser in fp32")
        k *= 2
