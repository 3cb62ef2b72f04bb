"""Whole-image time and quality of DeepCache on a ``--step-cache`` artifact: each interval in its own process, passes
in alternating order, medians; PSNR of each interval's images against interval 1's (every step whole).

    python tools/step_cache_bench.py ARTIFACT --whole UNSPLIT --intervals 1,3,5 --steps 20 --images 8 --passes 2

With --whole (the same source built without --step-cache) it first times one U-Net step in one process, alternating:
the unsplit engine, the split one whole, and a cached step.

One process per (pass, interval) runs ``--images`` images (seeds 0..N-1, one per call, after one warm-up call) through
the family's drop-in with ``pipe.unet.enable_cache(DeepCacheConfig(interval))`` and reports per-image seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS = ["a large red circle on the left on a white background", "a small blue square at the top on a black background",
           "a large green triangle in the middle on a gray background", "a small yellow star on the right on a navy background"]


def one(args) -> None:
    import numpy as np
    import torch

    from diffaccel.engines import DeepCacheConfig
    from diffaccel.engines.pipelines import pipeline_class

    pipe = pipeline_class(args.artifact).from_pretrained(args.artifact)
    pipe.set_progress_bar_config(disable=True)
    if args.interval > 0:       # 0: the cache off (an artifact built without --step-cache: the baseline)
        pipe.unet.enable_cache(DeepCacheConfig(interval=args.interval, branch=pipe.unet.engine.branch))
    kw = dict(num_inference_steps=args.steps, guidance_scale=pipe.manifest.built_guidance, output_type="np")
    if args.size:
        kw.update(height=args.size, width=args.size)
    pipe(PROMPTS[0], generator=torch.Generator().manual_seed(999), **kw)     # warm-up
    times, images = [], []
    for seed in range(args.images):
        t0 = time.perf_counter()
        out = pipe(PROMPTS[seed % len(PROMPTS)], generator=torch.Generator().manual_seed(seed), **kw)
        times.append(time.perf_counter() - t0)
        images.append(out.images[0])
    np.save(args.save, np.stack(images))
    print(json.dumps({"interval": args.interval, "seconds": times}))


def unet_steps(split: str, whole: str, rounds: int = 200) -> None:
    """One U-Net step at the opt shape, in one process, alternating: the unsplit engine, the split one whole
    (head -> deep -> tail) and a cached step (head -> tail); medians in ms. ONNX Runtime threads do not spin in any
    (one engine's spinning pool would slow the next one timed)."""
    import torch

    from diffaccel.engines.base import load_engine
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.artifact.specs import ComponentSpec

    engines = {n: load_engine(Manifest.load(a).components["unet"]["backend"], a, "unet",
                              Manifest.load(a).components["unet"], spin=False) for n, a in (("unsplit", whole), ("split", split))}
    spec = ComponentSpec.from_dict("unet", Manifest.load(split).components["unet"]["spec"])
    x = spec.random_inputs(torch.Generator().manual_seed(0), **spec.opt_values())
    feature = engines["split"].full(x)[1]
    runs = {"unsplit": lambda: engines["unsplit"](**x), "split, whole step": lambda: engines["split"](**x),
            "split, cached step": lambda: engines["split"].shallow(x, feature)}
    times = {n: [] for n in runs}
    for r in range(rounds + 5):
        for n, run in runs.items():
            t0 = time.perf_counter()
            run()
            if r >= 5:
                times[n].append(time.perf_counter() - t0)
    print(f"U-Net step at {spec.opt_values()}: " + ", ".join(f"{n} {statistics.median(t) * 1000:.2f} ms"
                                                            for n, t in times.items()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--intervals", default="1,3,5")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--whole", default=None, help="an artifact of the same source built without --step-cache: "
                                                 "timed too, as the first variant (interval 0)")
    p.add_argument("--interval", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.interval is not None:
        return one(args)
    if args.whole:
        unet_steps(args.artifact, args.whole)
    import numpy as np

    intervals = ([0] if args.whole else []) + [int(i) for i in args.intervals.split(",")]
    seconds = {i: [] for i in intervals}
    tmp = tempfile.mkdtemp()
    for n in range(args.passes):
        for i in (intervals if n % 2 == 0 else intervals[::-1]):
            art = args.whole if i == 0 else args.artifact
            cmd = [sys.executable, __file__, art, "--interval", str(i), "--steps", str(args.steps),
                   "--images", str(args.images), "--save", os.path.join(tmp, f"{i}.npy")] + (
                ["--size", str(args.size)] if args.size else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            seconds[i] += json.loads(out)["seconds"]
    ref = np.load(os.path.join(tmp, f"{intervals[0]}.npy")).astype(np.float64)
    base = statistics.median(seconds[intervals[0]])
    for i in intervals:
        img = np.load(os.path.join(tmp, f"{i}.npy")).astype(np.float64)
        mse = [float(np.mean((a - b) ** 2)) for a, b in zip(img, ref)]
        psnr = statistics.mean(float("inf") if m == 0 else 10 * np.log10(1 / m) for m in mse)
        med = statistics.median(seconds[i])
        per_pass = [statistics.median(seconds[i][k * args.images:(k + 1) * args.images]) * 1000
                    for k in range(args.passes)]
        print(f"{'unsplit' if i == 0 else f'interval {i}'}: {med * 1000:.1f} ms/image (median of {len(seconds[i])}; per pass "
              f"{' / '.join(f'{v:.1f}' for v in per_pass)}), {base / med:.2f}x, PSNR vs {'unsplit' if intervals[0] == 0 else 'interval 1'} "
              f"{psnr:.1f} dB")


if __name__ == "__main__":
    main()
