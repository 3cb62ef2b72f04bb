"""Metrics, the SLO choice and the outputs of a load benchmark: console text, ``bench.json``, ``bench.md`` and
``bench.png``.

>>> rows = [{"p95_s": 0.4, "throughput_img_min": 100, "unserved": 0}, {"p95_s": 0.9, "throughput_img_min": 180,
...         "unserved": 0}, {"p95_s": 2.0, "throughput_img_min": 200, "unserved": 0}]
>>> choose_slo(rows, 1.0)["choice"], choose_slo(rows, 0.1)["met"]
(1, False)
"""
from __future__ import annotations

import collections
import contextlib
import json
from pathlib import Path

from diffaccel.optimize.artifact.files import fresh_dir

OUTPUTS = ("bench.json", "bench.md", "bench.png")


def _stats(values, percentiles=(50, 95, 99)) -> dict:
    import numpy as np

    if not values:
        return {**{f"p{p}": None for p in percentiles}, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {**{f"p{p}": float(np.percentile(a, p)) for p in percentiles}, "mean": float(a.mean()),
            "max": float(a.max())}


def capacity_rps(calibration: dict, upto: int) -> float:
    """Requests/s a saturated server could sustain: max over batch sizes b <= upto of b / service time(b)."""
    return max(b / s for b, s in calibration.items() if b <= upto)


def summarize(run: dict, calibration: dict, point: dict) -> dict:
    """Per-run metrics from the request and batch records of :func:`diffaccel.eval.loadbench.loop.serve`."""
    served = [r for r in run["requests"] if r["done"] is not None]
    batches, wall = run["batches"], run["wall_s"]
    sizes = collections.Counter(b["size"] for b in batches)
    by_size = collections.defaultdict(list)
    for b in batches:
        by_size[b["size"]].append(b["end"] - b["start"])
    reach = point["max_batch"] if point.get("concurrency") is None else min(point["max_batch"], point["concurrency"])
    capacity = capacity_rps(calibration, reach) * 60
    last_arrival = max((r["arrival"] for r in run["requests"]), default=0.0)
    offered = len(run["requests"]) / last_arrival * 60 if point.get("rate_rps") and last_arrival > 0 else None
    return {
        "requested": len(run["requests"]), "served": len(served), "unserved": len(run["requests"]) - len(served),
        "batches": len(batches), "wall_s": wall,
        "throughput_img_min": len(served) / wall * 60 if wall > 0 else 0.0,
        "latency_s": _stats([r["latency"] for r in served]),
        "wait_s": _stats([r["wait"] for r in served]),
        "service_s": _stats([r["service"] for r in served]),
        "batch_sizes": {str(b): sizes[b] for b in sorted(sizes)},
        "mean_batch": sum(b["size"] for b in batches) / len(batches) if batches else 0.0,
        "utilization": sum(b["end"] - b["start"] for b in batches) / wall if wall > 0 else 0.0,
        "service_by_batch_s": {str(b): sum(v) / len(v) for b, v in sorted(by_size.items())},
        "capacity_model_img_min": capacity, "offered_img_min": offered,   # as realized by the seeded arrivals
        "predicted_img_min": min(offered, capacity) if offered else capacity,
        "hit_time_limit": run["hit_time_limit"],
    }


def table_row(point: dict, metrics: dict) -> dict:
    return {**point, "p50_s": metrics["latency_s"]["p50"], "p95_s": metrics["latency_s"]["p95"],
            "p99_s": metrics["latency_s"]["p99"], "throughput_img_min": metrics["throughput_img_min"],
            "predicted_img_min": metrics["predicted_img_min"], "mean_batch": metrics["mean_batch"],
            "utilization": metrics["utilization"], "served": metrics["served"], "unserved": metrics["unserved"]}


def choose_slo(rows: list, slo_p95_s: float) -> dict:
    """The row with the highest throughput whose p95 latency meets the SLO (and that served every request); if none
    does, ``met`` is False and ``closest`` is the row with the lowest p95."""
    ok = [i for i, r in enumerate(rows) if r["p95_s"] is not None and r["p95_s"] <= slo_p95_s and not r["unserved"]]
    closest = min(range(len(rows)), key=lambda i: (rows[i]["p95_s"] is None, rows[i]["p95_s"] or 0.0))
    choice = max(ok, key=lambda i: (rows[i]["throughput_img_min"], -rows[i]["p95_s"])) if ok else None
    return {"slo_p95_s": slo_p95_s, "met": choice is not None, "choice": choice, "closest": closest}


# ---- text ----------------------------------------------------------------------------------------------------
def _load_text(p: dict) -> str:
    if p.get("concurrency") is not None:
        return f"{p['concurrency']} closed-loop clients"
    rel = f" ({p['rate_label']} batch-1 capacity)" if str(p["rate_label"]).endswith("x") else ""
    return f"Poisson {p['rate_rps']:.2f} req/s{rel}"


def _s(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _slo_text(result: dict) -> str:
    slo = result.get("slo")
    if not slo:
        return ""
    rows = result["table"]
    if slo["met"]:
        r = rows[slo["choice"]]
        return (f"SLO p95 <= {slo['slo_p95_s']:g} s: choose {_point_text(r)} -> {r['throughput_img_min']:.0f} "
                f"images/min at p95 {r['p95_s']:.3f} s")
    r = rows[slo["closest"]]
    return (f"SLO p95 <= {slo['slo_p95_s']:g} s: no configuration meets it; closest is {_point_text(r)} with p95 "
            f"{_s(r['p95_s'])} s ({r['throughput_img_min']:.0f} images/min)")


def _point_text(r: dict) -> str:
    load = f"concurrency {r['concurrency']}" if r.get("concurrency") is not None else f"rate {r['rate_label']}"
    return f"{load}, max batch {r['max_batch']}, timeout {r['timeout_ms']:g} ms"


def _calibration_text(result: dict) -> str:
    return ", ".join(f"{c['batch']}: {c['seconds']:.3f} s" for c in result["calibration"])


def format_run(result: dict, run: dict) -> list:
    m, p = run["metrics"], run["point"]
    lat, sizes = m["latency_s"], ", ".join(f"{b}x{n}" for b, n in m["batch_sizes"].items())
    offered = f"offered {m['offered_img_min']:.0f}, " if m["offered_img_min"] else ""
    return [f"load       {_load_text(p)}; policy max batch {p['max_batch']}, timeout {p['timeout_ms']:g} ms",
            f"served     {m['served']}/{m['requested']} requests in {m['wall_s']:.1f} s"
            + (" (time limit hit: the rest were left unserved)" if m["hit_time_limit"] else ""),
            f"latency    p50 {_s(lat['p50'])} s   p95 {_s(lat['p95'])} s   p99 {_s(lat['p99'])} s   (mean wait "
            f"{_s(m['wait_s']['mean'])} s + mean service {_s(m['service_s']['mean'])} s)",
            f"throughput {m['throughput_img_min']:.0f} images/min measured; model predicts "
            f"{m['predicted_img_min']:.0f} ({offered}capacity {m['capacity_model_img_min']:.0f})",
            f"batches    {m['batches']} (size x count: {sizes}; mean {m['mean_batch']:.2f}); utilization "
            f"{m['utilization']:.0%}"]


def format_table(rows: list) -> list:
    lines = [f"{'load':>10} {'B':>3} {'timeout ms':>10} {'p50 s':>8} {'p95 s':>8} {'img/min':>8} {'model':>8} "
             f"{'mean B':>7} {'util':>5} {'served':>7}"]
    for r in rows:
        load = f"c={r['concurrency']}" if r.get("concurrency") is not None else str(r["rate_label"])
        lines.append(f"{load:>10} {r['max_batch']:>3} {r['timeout_ms']:>10g} {_s(r['p50_s']):>8} {_s(r['p95_s']):>8} "
                     f"{r['throughput_img_min']:>8.0f} {r['predicted_img_min']:>8.0f} {r['mean_batch']:>7.2f} "
                     f"{r['utilization']:>5.0%} {r['served']:>3}/{r['served'] + r['unserved']:<3}")
    return lines


def format_console(result: dict) -> str:
    c = result["config"]
    lines = [f"load benchmark of {result['artifact']} ({result['source']}, {result['engine']}), "
             f"{c['height']}x{c['width']}, {c['steps']} steps",
             f"calibrated service time per batch size: {_calibration_text(result)}"]
    lines += format_run(result, result["runs"][0]) if len(result["runs"]) == 1 else format_table(result["table"])
    largest, built = max(r["max_batch"] for r in result["table"]), result.get("engine_max_batch")
    if built and largest > built:
        lines.append(f"note: the engines were built for batches up to {built}; larger batches run in chunks "
                     f"(rebuild with diffaccel optimize --batch 1-{largest})")
    if result.get("slo"):
        lines.append(_slo_text(result))
    return "\n".join(lines)


def to_markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# Load benchmark: {result['source']} ({result['engine']})", "",
             f"Artifact `{result['artifact']}`, {c['height']}x{c['width']}, {c['steps']} steps, guidance "
             f"{c['guidance']:g}, seed {c['seed']}, {result['created']}.  ", f"Host: {result['host_text']}.", "",
             "## Calibration (one batch at a time, no queueing)", "", "| batch | service s | images/min |",
             "|---:|---:|---:|"]
    lines += [f"| {x['batch']} | {x['seconds']:.3f} | {x['images_per_min']:.0f} |" for x in result["calibration"]]
    lines += ["", "## Results", "", "| load | max batch | timeout ms | p50 s | p95 s | p99 s | images/min | model "
              "images/min | mean batch | utilization | served |", "|---|" + "---:|" * 10]
    for r in result["table"]:
        load = f"{r['concurrency']} clients" if r.get("concurrency") is not None else f"{r['rate_label']} " \
               f"({r['rate_rps']:.2f}/s)"
        lines.append(f"| {load} | {r['max_batch']} | {r['timeout_ms']:g} | {_s(r['p50_s'])} | {_s(r['p95_s'])} | "
                     f"{_s(r['p99_s'])} | {r['throughput_img_min']:.0f} | {r['predicted_img_min']:.0f} | "
                     f"{r['mean_batch']:.2f} | {r['utilization']:.0%} | {r['served']}/{r['served'] + r['unserved']} |")
    if result.get("slo"):
        lines += ["", f"**{_slo_text(result)}**"]
    if len(result["runs"]) == 1:
        lines += ["", "```", *format_run(result, result["runs"][0]), "```"]
    lines += ["", "![latency and throughput](bench.png)", "",
              "Latency = queue wait + service, seconds from arrival to image. Model = min(offered load as realized by "
              "the arrivals, max over batch sizes b of b / calibrated service time(b)). Per-request records are in "
              "`bench.json`; how to read this: docs/bench.md in diffaccel."]
    return "\n".join(lines) + "\n"


# ---- plot and files ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def two_panels(path):
    """A left and a right axis, saved to ``path`` (PNG) when the block ends; the figure is closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        yield left, right
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot(result: dict, path) -> None:
    with two_panels(path) as (left, right):
        (_plot_curve if len(result["runs"]) > 1 else _plot_requests)(left, result)
        cal = result["calibration"]
        right.bar([c["batch"] for c in cal], [c["images_per_min"] for c in cal], color="#9ab")
        best = max(r["throughput_img_min"] for r in result["table"])
        right.axhline(best, color="#c33", ls="--", label=f"{'best ' if len(result['table']) > 1 else ''}measured "
                                                         f"{best:.0f}")
        right.set_xticks([c["batch"] for c in cal])
        right.set(xlabel="batch size", ylabel="images/min", title="capacity at each batch size (calibration)")
        right.legend(loc="lower right")


def _plot_curve(ax, result: dict) -> None:
    series = collections.defaultdict(list)
    for i, r in enumerate(result["table"]):
        series[(r["max_batch"], r["timeout_ms"])].append(i)
    for (b, t), idx in sorted(series.items()):
        rows = sorted((result["table"][i] for i in idx), key=lambda r: (r["rate_rps"] or 0, r["throughput_img_min"]))
        xs = [r["throughput_img_min"] for r in rows]
        line, = ax.plot(xs, [r["p95_s"] for r in rows], "o-", label=f"B={b}, {t:g} ms")
        ax.plot(xs, [r["p50_s"] for r in rows], ":", color=line.get_color(), alpha=0.6)
    slo = result.get("slo")
    if slo:
        ax.axhline(slo["slo_p95_s"], color="k", ls="--", lw=1, label=f"SLO p95 {slo['slo_p95_s']:g} s")
        if slo["met"]:
            r = result["table"][slo["choice"]]
            ax.plot([r["throughput_img_min"]], [r["p95_s"]], "o", ms=14, mfc="none", mec="k", label="chosen")
    ax.set(xlabel="throughput (images/min)", ylabel="latency (s): p95 solid, p50 dotted",
           title="latency vs throughput")
    ax.legend(fontsize=7)


def _plot_requests(ax, result: dict) -> None:
    reqs = [r for r in result["runs"][0]["requests"] if r["done"] is not None]
    ids = range(len(reqs))
    ax.bar(ids, [r["wait"] for r in reqs], color="#e9a", label="queue wait")
    ax.bar(ids, [r["service"] for r in reqs], bottom=[r["wait"] for r in reqs], color="#59c", label="service")
    ax.set(xlabel="request (arrival order)", ylabel="latency (s)", title="per-request latency = wait + service")
    ax.legend()


def check_out(out) -> Path:
    """``out`` may be new or hold a previous benchmark, nothing else (it is replaced)."""
    from diffaccel.optimize.artifact.errors import DiffaccelError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name not in OUTPUTS for p in out.iterdir())):
        raise DiffaccelError(f"{out} exists and is not a benchmark folder; choose a new -o directory")
    return out


def write_bench_dir(result: dict, out, markdown=None, draw=None) -> Path:
    """Write bench.json, bench.md and bench.png into ``out`` all at once (built in a temporary folder, then
    renamed). An existing ``out`` is replaced only if it holds nothing but a previous benchmark. ``markdown`` and
    ``draw`` render another kind of result (the HTTP benchmark's); default: the in-process benchmark's."""
    out = check_out(out)
    with fresh_dir(out) as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
        (tmp / "bench.md").write_text((markdown or to_markdown)(result))
        (draw or plot)(result, tmp / "bench.png")
    return out
