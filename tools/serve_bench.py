"""Embedded server vs the in-process load benchmark, side by side, at the same batching policy and load.

Starts ``diffaccel serve ARTIFACT`` in a subprocess on the loopback, loads the same artifact in this process, then
alternates rounds: one in-process run (``diffaccel bench``'s serving loop) and one HTTP run (``diffaccel bench
--url``'s client, synchronous mode) with the same closed-loop clients, steps, guidance and prompts. Prints each
round and the pooled ratios: throughput (HTTP / in-process) and the median added latency per request.

    python tools/serve_bench.py runs/demo/engines/tinyshapes-onnxruntime-fp32 --rounds 3 --requests 48
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact, port, db, max_batch, wait_ms, threads, queue_limit=256):
    import httpx

    argv = [sys.executable, "-m", "diffaccel.optimize.cli", "serve", str(artifact), "--port", str(port), "--db",
            str(db), "--max-batch", str(max_batch), "--max-wait-ms", str(wait_ms), "--queue-limit", str(queue_limit)]
    if threads:
        argv += ["--threads", str(threads)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--wait-ms", type=float, default=50.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--db", default="/tmp/diffaccel-serve-bench.sqlite")
    args = ap.parse_args(argv)

    from diffaccel.eval.harness.host import describe, host_info
    from diffaccel.eval.loadbench.http import HttpBench, HttpLoadConfig
    from diffaccel.eval.loadbench.http_report import summarize
    from diffaccel.eval.loadbench.loop import LoadConfig
    from diffaccel.eval.loadbench.runner import LoadBench

    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(args.db + suffix):
            os.remove(args.db + suffix)
    port = _free_port()
    server = start_server(args.artifact, port, args.db, args.max_batch, args.wait_ms, args.threads)
    try:
        load = LoadConfig(rate=None, concurrency=args.concurrency, requests=args.requests, max_batch=args.max_batch,
                          timeout_ms=args.wait_ms, steps=args.steps, guidance=args.guidance)
        local = LoadBench(args.artifact, load, threads=args.threads)
        local.calibrate(args.max_batch)
        http = HttpBench(HttpLoadConfig(url=f"http://127.0.0.1:{port}", mode="sync", rate=None,
                                        concurrency=args.concurrency, requests=args.requests, steps=args.steps,
                                        guidance=args.guidance), prompts=local.prompts)
        http.calibrate(1)                                   # warm the server's engines
        rows = []
        for r in range(args.rounds):
            run, _ = local.run(load)
            m = run["metrics"]
            hrun = http.run()
            h = summarize(hrun)["overall"]
            # where an HTTP request's time goes: the server's queue and engine call (its own clock), and the rest
            # (transport, JSON, base64, the job store, the event loop), per request
            rest = statistics.median(x["latency"] - x["queue_s"] - x["run_s"] for x in hrun["requests"]
                                     if x["status"] == "succeeded")
            rows.append((m["throughput_img_min"], m["latency_s"]["p50"], m["mean_batch"],
                         h["throughput_img_min"], h["e2e"]["p50"], h["mean_batch"], h["served"]))
            print(f"round {r + 1}: in-process {rows[-1][0]:.0f} img/min, p50 {rows[-1][1]:.3f} s (wait "
                  f"{m['wait_s']['p50']:.3f} + service {m['service_s']['p50']:.3f}), mean batch {rows[-1][2]:.2f} | "
                  f"HTTP {rows[-1][3]:.0f} img/min, p50 {rows[-1][4]:.3f} s (queue {h['queue']['p50']:.3f} + run "
                  f"{h['run']['p50']:.3f} + outside the engine queue {rest * 1000:.1f} ms), mean batch "
                  f"{rows[-1][5]:.2f}, served {rows[-1][6]}/{args.requests}", flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    tput = sum(r[3] for r in rows) / sum(r[0] for r in rows)
    added = statistics.median(r[4] - r[1] for r in rows)
    print(f"HTTP / in-process throughput {tput:.3f}; median added latency {added * 1000:.1f} ms per request "
          f"(p50 HTTP - p50 in-process, median over {len(rows)} rounds); {args.concurrency} clients, max batch "
          f"{args.max_batch}, wait {args.wait_ms:g} ms, {args.steps} steps")
    print(f"host: {describe(host_info())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
