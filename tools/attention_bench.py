"""Side-by-side U-Net step latency and peak memory of an ONNX Runtime engine with attention fused
(``<OUT>/unet/engine/model.onnx``) and the same export without the fusion (``<OUT>/unet/export/model.onnx`` at the
engine's graph level, i.e. what the engine stage built before the fusion). Each variant runs in its own process,
the order alternates over the passes, medians are reported (speed is a ratio, never an absolute time).

    python tools/attention_bench.py runs/sd15 --size 512 --batch 2 --runs 3 --passes 2
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path


def child(model: str, level: str, size: int, batch: int, runs: int, threads: "int | None") -> dict:
    import resource
    import time

    import numpy as np

    from diffaccel.engines.backends.onnxruntime import OrtEngine

    eng = OrtEngine(Path(model), provider="cpu", level=level, threads=threads, arena=False)
    rng = np.random.default_rng(0)
    names = {i.name: i for i in eng.session.get_inputs()}
    feeds = {"sample": rng.standard_normal((batch, 4, size // 8, size // 8), dtype=np.float32),
             "timestep": np.full((batch,), 500, np.int64),
             "encoder_hidden_states": rng.standard_normal((batch, 77, names["encoder_hidden_states"].shape[2]),
                                                          dtype=np.float32)}
    feeds = {k: v.astype(np.float32) if "float" in names[k].type else v for k, v in feeds.items() if k in names}
    eng(**feeds)                                # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        eng(**feeds)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.size, a.batch, a.runs, a.threads)))
        return 0
    m = json.loads((a.out / "manifest.json").read_text())
    level = m["config"]["graph_level"] if "graph_level" in m.get("config", {}) else "extended"
    variants = {"fused": (str(a.out / m["components"]["unet"]["engine"]), "disable"),   # saved already optimized
                "unfused": (str(a.out / "unet" / "export" / "model.onnx"), level)}
    results = {k: [] for k in variants}
    for i in range(a.passes):
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            cmd = [sys.executable, __file__, str(a.out), "--size", str(a.size), "--batch", str(a.batch), "--runs",
                   str(a.runs), "--child", *variants[name]] + (["--threads", str(a.threads)] if a.threads else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            results[name].append(r)
            print(f"pass {i + 1} {name:8s} {r['median_s']:.2f} s/step, peak {r['peak_rss_gb']:.2f} GB", flush=True)
    med = {k: statistics.median(x["median_s"] for x in v) for k, v in results.items()}
    peak = {k: max(x["peak_rss_gb"] for x in v) for k, v in results.items()}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"U-Net {a.size}x{a.size} batch {a.batch} on {cpu}: fused attention {med['unfused'] / med['fused']:.2f}x "
          f"the unfused step's speed; peak RSS {peak['fused']:.2f} GB fused vs {peak['unfused']:.2f} GB unfused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
