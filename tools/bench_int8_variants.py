"""Reproduce the int8 design measurement: the SD U-Net quantized with the attention-score MatMuls (QK^T) in int8
(ONNX Runtime then fuses the softmax into QLinearSoftmax) against diffaccel's default (those MatMuls in float),
both against the fp32 engine, timed side by side in interleaved rounds on identical captured inputs.

    python tools/bench_int8_variants.py                      # random:sd15, 256x256, U-Net batch 2, 1 thread
    python tools/bench_int8_variants.py --threads 2 --rounds 8

Builds (and caches under --work) the fp32 U-Net engine with diffaccel optimize, captures calibration inputs from
the real pipeline, quantizes both variants, then prints p50 latency and relative L2 error against fp32.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="random:sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default="runs/int8-variants")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.families.sd import capture_unet_inputs
    from diffaccel.optimize.config import QuantConfig, ShapeRange
    from diffaccel.optimize.quant.ort_static import preprocess, quantize_static_qdq
    from diffaccel.optimize.sources import resolve_source
    from diffaccel.optimize.sources.prompts import calibration_prompts

    work = Path(args.work)
    shapes = ShapeRange(batch=(1, 1), height=(args.size, args.size), width=(args.size, args.size))
    art = work / "fp32"
    optimize(args.src, art, OptimizeConfig(components=("unet",), shapes=shapes, threads=args.threads))
    quant = QuantConfig(calib_size=4, calib_steps=4)
    pipe = resolve_source(args.src).load()
    samples = capture_unet_inputs(pipe, calibration_prompts(args.src, quant.calib_size, quant.calib_seed), steps=quant.calib_steps, guidance_scale=7.5,
                                  seed=0, height=args.size, width=args.size)
    del pipe
    pre = preprocess(art / "unet" / "export" / "model.onnx", work / "pre.onnx", external=True)
    models = {"fp32": art / "unet" / "engine" / "model.onnx"}
    for name, float_scores in (("int8, QK^T in int8", False), ("int8, QK^T in float (default)", True)):
        out = work / ("scores-float" if float_scores else "scores-int8") / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        quantize_static_qdq(pre, out, samples, quant, external=True, float_attention_scores=float_scores)
        models[name] = out
    sessions = {}
    for name, path in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in samples[len(samples) // 2].items()}
    ref = sessions["fp32"].run(None, feed)[0]
    times = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, feed)                                   # warm-up
    for _ in range(args.rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["fp32"]))
    print(f"{args.src} U-Net, {args.size}x{args.size}, batch 2, {args.threads} thread(s), {args.rounds} rounds")
    for name, s in sessions.items():
        out = s.run(None, feed)[0]
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        p50 = float(np.median(times[name]))
        print(f"{name:32s} p50 {p50 * 1e3:8.1f} ms   {base / p50:5.2f}x fp32   rel L2 vs fp32 {err:.4f}")


if __name__ == "__main__":
    main()
