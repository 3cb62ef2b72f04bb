"""OpenVINO's threading modes for a U-Net step, side by side: what a one-request-at-a-time caller (per-step latency,
batch 2 with CFG) and a server (throughput) should ask for.

Modes, each in its own process, passes in alternating order, medians reported:
- ``latency``: PERFORMANCE_HINT=LATENCY, one request of batch B (one stream using every core);
- ``latency-xN``: LATENCY, one request of batch N*B (dynamic batching: N requests' images in one call);
- ``throughput``: PERFORMANCE_HINT=THROUGHPUT, OpenVINO's own stream count, as many requests of batch B in flight
  as it recommends (independent requests served concurrently).
Reported: ms per call, and U-Net batch-B steps per second over all requests (the serving rate).

    python tools/ov_streams.py runs/peer15/random_sd15-unet-openvino-int8/unet/engine/model.xml --size 256
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading


def child(path: str, mode: str, size: int, batch: int, seconds: float, precision: str) -> dict:
    import time

    import openvino as ov

    from ov_profile import _feeds          # the same inputs the profile uses (tools/ is this script's sys.path[0])

    hint = "THROUGHPUT" if mode == "throughput" else "LATENCY"
    factor = int(mode.split("-x")[1]) if "-x" in mode else 1
    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision})
    feeds = _feeds(compiled, size, batch * factor)
    n = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") if mode == "throughput" else 1
    streams = compiled.get_property("NUM_STREAMS")
    requests = [compiled.create_infer_request() for _ in range(n)]
    for r in requests:                                 # warm-up: every request once
        r.infer(feeds)
    lat: list = []
    counts = [0] * n
    t0 = time.perf_counter()

    def serve(k):                                      # one caller per request in flight (infer releases the GIL)
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            requests[k].infer(feeds)
            lat.append(time.perf_counter() - t)
            counts[k] += 1

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = sum(counts)
    return {"mode": mode, "streams": streams, "requests": n, "calls": done, "ms_per_call": statistics.median(lat) * 1e3,
            "steps_per_s": done * factor / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="OpenVINO IR (model.xml) or ONNX of a U-Net")
    ap.add_argument("--modes", default="latency,latency-x2,throughput")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="U-Net batch of one request (2 = one image with CFG)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per mode and pass")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--precision", default="bf16", help="INFERENCE_PRECISION_HINT")
    ap.add_argument("--json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.child, a.size, a.batch, a.seconds, a.precision)))
        return
    modes = a.modes.split(",")
    runs: dict = {m: [] for m in modes}
    for p in range(a.passes):
        for m in (modes if p % 2 == 0 else modes[::-1]):
            cmd = [sys.executable, __file__, a.model, "--child", m, "--size", str(a.size), "--batch", str(a.batch),
                   "--seconds", str(a.seconds), "--precision", a.precision]
            runs[m].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
            print(f"pass {p + 1} {m}: {runs[m][-1]}", file=sys.stderr)
    print(f"| mode | streams | requests in flight | ms per call (median) | batch-{a.batch} steps/s | vs latency |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = statistics.median(r["steps_per_s"] for r in runs[modes[0]])
    for m in modes:
        rate = statistics.median(r["steps_per_s"] for r in runs[m])
        ms = statistics.median(r["ms_per_call"] for r in runs[m])
        print(f"| {m} | {runs[m][0]['streams']} | {runs[m][0]['requests']} | {ms:.0f} | {rate:.2f} | "
              f"{rate / base:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
