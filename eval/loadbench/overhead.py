"""The embedded server's overhead: ``diffaccel serve ARTIFACT`` beside the in-process load benchmark.

``diffaccel bench ARTIFACT --vs-server ROUNDS`` starts the server in a child process on the loopback (its job store in
a temporary folder), loads the same artifact in this process, warms both at the rounds' batch sizes, then runs rounds of one in-process run (``diffaccel bench``'s serving
loop) and one HTTP run (``diffaccel bench --url``'s client, synchronous mode), which goes first alternating, with the same
closed-loop clients, batching policy, steps, guidance and prompts. It reports each round and the pooled ratios:
throughput HTTP / in-process, and the median added latency per request (p50 HTTP - p50 in-process, median over the
rounds), with where an HTTP request's time goes: the server's queue and engine call (its own clock) and the rest
(transport, JSON, base64, the job store, the event loop).

>>> overhead([{"local": {"img_min": 100.0, "p50_s": 1.0}, "http": {"img_min": 95.0, "p50_s": 1.02}},
...           {"local": {"img_min": 100.0, "p50_s": 1.0}, "http": {"img_min": 97.0, "p50_s": 1.01}}])
{'throughput_ratio': 0.96, 'added_latency_ms': 15.0}
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError


def serve_in_child(artifact, folder, load, threads=None):
    """``diffaccel serve ARTIFACT`` in a child process (:class:`~diffaccel.engines.serving.process.ServerProcess`) at
    ``load``'s batching policy, its job store and log in ``folder``; a server that does not get ready fails in one
    line naming its last log line."""
    from diffaccel.engines.serving.process import ServerProcess

    args = ["--max-batch", load.max_batch, "--max-wait-ms", load.timeout_ms,
            "--queue-limit", max(256, load.concurrency or 0)] + (["--threads", threads] if threads else [])
    log = Path(folder) / "serve.log"
    with open(log, "wb") as out:
        try:
            return ServerProcess([artifact], Path(folder) / "jobs.sqlite", args=args, log=out)
        except RuntimeError as e:
            last = ([ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] or ["(no output)"])[-1]
            raise DiffaccelError(f"{e}: {last}") from None


def overhead(rounds: list) -> dict:
    """Pooled throughput ratio (HTTP / in-process) and median added latency per request over ``rounds``."""
    ratio = sum(r["http"]["img_min"] for r in rounds) / sum(r["local"]["img_min"] for r in rounds)
    added = statistics.median(r["http"]["p50_s"] - r["local"]["p50_s"] for r in rounds)
    return {"throughput_ratio": round(ratio, 4), "added_latency_ms": round(added * 1000, 2)}


def _round(run: dict, hrun: dict) -> dict:
    from diffaccel.eval.loadbench.http_report import summarize

    m, h = run["metrics"], summarize(hrun)["overall"]
    served = [x for x in hrun["requests"] if x["status"] == "succeeded"]
    rest = statistics.median(x["latency"] - x["queue_s"] - x["run_s"] for x in served) if served else None
    return {"local": {"img_min": m["throughput_img_min"], "p50_s": m["latency_s"]["p50"], "wait_p50_s":
                      m["wait_s"]["p50"], "service_p50_s": m["service_s"]["p50"], "mean_batch": m["mean_batch"]},
            "http": {"img_min": h["throughput_img_min"], "p50_s": h["e2e"]["p50"], "queue_p50_s": h["queue"]["p50"],
                     "run_p50_s": h["run"]["p50"], "outside_queue_p50_s": rest, "mean_batch": h["mean_batch"],
                     "served": h["served"], "requests": h["requests"]}}


def run_vs_server(artifact, load, rounds: int, prompts=(), threads=None, on_round=None) -> dict:
    """``rounds`` alternating in-process / HTTP runs of the closed-loop ``load`` (a LoadConfig with concurrency)."""
    from diffaccel.optimize.artifact.manifest import now

    from diffaccel.eval.harness.host import describe, host_info
    from diffaccel.eval.loadbench.http import HttpBench, HttpLoadConfig
    from diffaccel.eval.loadbench.runner import LoadBench

    with tempfile.TemporaryDirectory(prefix="diffaccel-vs-server-") as d:
        server = serve_in_child(artifact, d, load, threads)
        try:
            local = LoadBench(artifact, load, prompts, threads=threads)
            local.calibrate(load.max_batch)
            http = HttpBench(HttpLoadConfig(url=server.url, mode="sync", rate=None,
                                            concurrency=load.concurrency, requests=load.requests, steps=load.steps,
                                            guidance=load.guidance), prompts=local.prompts)
            # both sides warmed at the batch sizes the rounds use: the in-process engine by calibrate(max_batch),
            # the server's by one short closed-loop run at the rounds' concurrency (a lone request warmed only
            # batch 1, and the first round's HTTP side paid the batch-4 shapes' first runs: 0.88 vs 0.95 after)
            http.run(dataclasses.replace(http.cfg, requests=2 * (load.concurrency or 1)))
            out = []
            for i in range(rounds):                             # the order alternates: neither side always first
                if i % 2 == 0:
                    run, _ = local.run(load)
                    hrun = http.run()
                else:
                    hrun = http.run()
                    run, _ = local.run(load)
                out.append(_round(run, hrun))
                if on_round is not None:
                    on_round(i, out[-1])
        finally:
            server.stop()
    host = host_info()
    return {"benchmark": "server-overhead", "created": now(), "artifact": str(artifact), "rounds": out,
            "config": {**local.base.to_dict(), "rounds": rounds, "threads": threads, "prompts": list(local.prompts)},
            **overhead(out), "host": host, "host_text": describe(host)}


def format_round(i: int, r: dict) -> str:
    lo, h = r["local"], r["http"]
    rest = "-" if h["outside_queue_p50_s"] is None else f"{h['outside_queue_p50_s'] * 1000:.1f} ms"
    return (f"round {i + 1}: in-process {lo['img_min']:.0f} img/min, p50 {lo['p50_s']:.3f} s (wait "
            f"{lo['wait_p50_s']:.3f} + service {lo['service_p50_s']:.3f}), mean batch {lo['mean_batch']:.2f} | HTTP "
            f"{h['img_min']:.0f} img/min, p50 {h['p50_s']:.3f} s (queue {h['queue_p50_s']:.3f} + run "
            f"{h['run_p50_s']:.3f} + outside the engine queue {rest}), mean batch {h['mean_batch']:.2f}, served "
            f"{h['served']}/{h['requests']}")


def format_console(result: dict) -> str:
    c = result["config"]
    return "\n".join([*(format_round(i, r) for i, r in enumerate(result["rounds"])),
                      f"HTTP / in-process throughput {result['throughput_ratio']:.3f}; median added latency "
                      f"{result['added_latency_ms']:.1f} ms per request (p50 HTTP - p50 in-process, median over "
                      f"{len(result['rounds'])} rounds); {c['concurrency']} clients, max batch {c['max_batch']}, "
                      f"wait {c['timeout_ms']:g} ms, {c['steps']} steps",
                      f"host: {result['host_text']}"])


def to_markdown(result: dict) -> str:
    return "\n".join(["# Embedded server vs in-process", "", "```", format_console(result), "```", ""])


def plot(result: dict, path) -> None:
    """Throughput and p50 latency per round, in-process beside HTTP."""
    from diffaccel.eval.loadbench.report import two_panels

    with two_panels(path) as (left, right):
        xs = range(1, len(result["rounds"]) + 1)
        for side, name in (("local", "in-process"), ("http", "HTTP")):
            left.plot(xs, [r[side]["img_min"] for r in result["rounds"]], "o-", label=name)
            right.plot(xs, [r[side]["p50_s"] for r in result["rounds"]], "o-", label=name)
        left.set(xlabel="round", ylabel="images/min")
        right.set(xlabel="round", ylabel="p50 latency (s)")
        left.legend()
