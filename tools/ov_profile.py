"""Where an OpenVINO U-Net step spends its time: OpenVINO's per-node performance counters summed by node type and
executed precision (e.g. ``MatMul`` in ``I8`` vs ``BF16``), for one or more compiled IRs side by side.

Used to decide what to quantize next (issue 14's "go past the peer"): whatever still runs in float shows up here.
Each model runs in its own process (two OpenVINO instances in one process share a thread pool).

    python tools/ov_profile.py runs/peer15/random_sd15-unet-openvino-int8/unet/engine/model.xml \\
        runs/peer15/random_sd15-optimum-intel-int8/unet/openvino_model.xml --size 256 --batch 2 --runs 5
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict


def _feeds(compiled, size: int, batch: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for port in compiled.inputs:
        name = port.get_any_name()
        etype = port.get_element_type().get_type_name()
        dtype = {"f32": np.float32, "i64": np.int64, "i32": np.int32, "f16": np.float16}.get(etype, np.float32)
        if "sample" in name:
            arr = rng.standard_normal((batch, 4, size // 8, size // 8))
        elif "timestep" in name:
            shape = port.get_partial_shape()        # optimum-intel's U-Net takes one timestep: shape [1]
            n = (batch if shape[0].is_dynamic else shape[0].get_length()) if shape.rank.get_length() else None
            arr = np.full((n,) if n else (), 500)
        elif "encoder_hidden_states" in name:
            dim = port.get_partial_shape()[2].get_length()
            arr = rng.standard_normal((batch, 77, dim))
        else:
            raise SystemExit(f"ov_profile: no feed for input {name!r}")
        feeds[port] = np.asarray(arr, dtype=dtype)
    return feeds


def child(path: str, size: int, batch: int, runs: int, precision: str) -> dict:
    import statistics
    import time

    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY",
                                                "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    feeds = _feeds(compiled, size, batch)
    request.infer(feeds)
    walls, totals = [], defaultdict(float)
    for _ in range(runs):
        t = time.perf_counter()
        request.infer(feeds)
        walls.append((time.perf_counter() - t) * 1e3)
        for info in request.profiling_info:
            if info.status.name != "EXECUTED":
                continue
            key = f"{info.node_type} {info.exec_type.split('_')[-1]}"
            totals[key] += info.real_time.total_seconds() * 1e3 / runs
    return {"model": path, "wall_ms": statistics.median(walls), "by_type_ms": dict(totals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="OpenVINO IR files (model.xml)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--precision", default="bf16", help="INFERENCE_PRECISION_HINT (what the engine runs with)")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--json", help="write the full breakdown here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.models[0], a.size, a.batch, a.runs, a.precision)))
        return
    results = []
    for m in a.models:
        cmd = [sys.executable, __file__, m, "--child", "--size", str(a.size), "--batch", str(a.batch),
               "--runs", str(a.runs), "--precision", a.precision]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    keys = sorted({k for r in results for k in r["by_type_ms"]},
                  key=lambda k: -max(r["by_type_ms"].get(k, 0.0) for r in results))
    print("| node type / exec precision | " + " | ".join(f"model {i + 1} ms" for i in range(len(results))) + " |")
    print("| --- |" + " --- |" * len(results))
    for k in keys[:a.top]:
        print(f"| {k} | " + " | ".join(f"{r['by_type_ms'].get(k, 0.0):.1f}" for r in results) + " |")
    print("| sum of counters | " + " | ".join(f"{sum(r['by_type_ms'].values()):.1f}" for r in results) + " |")
    print("| wall (median) | " + " | ".join(f"{r['wall_ms']:.1f}" for r in results) + " |")
    for i, r in enumerate(results):
        print(f"model {i + 1}: {r['model']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
