"""Metrics of an HTTP load benchmark (per request class and overall), the capacity plan, and its outputs: console
text, ``bench.json``, ``bench.md``, ``bench.png``.

>>> rows = [{"rate_rps": 1, "throughput_img_min": 50, "p95_s": 0.5, "errors": 0, "images_per_request": 1},
...         {"rate_rps": 2, "throughput_img_min": 90, "p95_s": 0.9, "errors": 0, "images_per_request": 1},
...         {"rate_rps": 4, "throughput_img_min": 100, "p95_s": 3.0, "errors": 5, "images_per_request": 1}]
>>> plan = capacity_plan(rows, slo_p95_s=1.0, target_rps=6, price_per_hour=2.0)
>>> plan["replicas"], round(plan["cost_per_1000_images"], 3)
(4, 0.37)
"""
from __future__ import annotations

import collections
import json
import math

from diffaccel.eval.loadbench.report import _stats, two_panels, write_bench_dir

PHASES = (("latency", "e2e"), ("queue_s", "queue"), ("run_s", "run"))


def _group(records: list) -> dict:
    served = [r for r in records if r["status"] == "succeeded"]
    wall = max((r["done"] for r in served), default=0.0) - min((r["send"] for r in records), default=0.0)
    errors = collections.Counter(r["error"] for r in records if r["error"])
    sizes = collections.Counter(r["batch_size"] for r in served if r["batch_size"] is not None)
    images = sum(r["images"] for r in served)
    return {"requests": len(records), "served": len(served), "images": images,
            "throughput_img_min": images / wall * 60 if wall > 0 else 0.0,
            **{name: _stats([r[key] for r in served if r[key] is not None]) for key, name in PHASES},
            "batch_sizes": {str(b): sizes[b] for b in sorted(sizes)},
            "mean_batch": sum(b * n for b, n in sizes.items()) / sum(sizes.values()) if sizes else 0.0,
            "errors": dict(errors), "rejected_429": errors.get("429", 0)}


def summarize(run: dict) -> dict:
    """Overall and per-class metrics of one run of :meth:`HttpBench.run`."""
    recs = run["requests"]
    classes = sorted({r["class"] for r in recs})
    return {"overall": _group(recs), "classes": {c: _group([r for r in recs if r["class"] == c]) for c in classes},
            "wall_s": run["wall_s"], "hit_time_limit": run["hit_time_limit"]}


def table_row(point: dict, metrics: dict) -> dict:
    o = metrics["overall"]
    return {**point, "p50_s": o["e2e"]["p50"], "p95_s": o["e2e"]["p95"], "p99_s": o["e2e"]["p99"],
            "throughput_img_min": o["throughput_img_min"], "mean_batch": o["mean_batch"], "served": o["served"],
            "requests": o["requests"], "errors": sum(o["errors"].values()), "rejected_429": o["rejected_429"],
            "images_per_request": o["images"] / o["served"] if o["served"] else 1.0}


def capacity_plan(rows: list, slo_p95_s: float, target_rps: "float | None" = None,
                  price_per_hour: "float | None" = None, measured_replicas: int = 1) -> dict:
    """Replicas for ``target_rps`` requests/s at p95 <= ``slo_p95_s``, from the best throughput one measured replica
    sustained within the SLO with no errors (replicas assumed to add up linearly), and the cost per 1,000 images
    at ``price_per_hour`` per replica."""
    ok = [r for r in rows if r["p95_s"] is not None and r["p95_s"] <= slo_p95_s and not r["errors"]]
    plan = {"slo_p95_s": slo_p95_s, "target_rps": target_rps, "price_per_hour": price_per_hour,
            "measured_replicas": measured_replicas, "met": bool(ok)}
    if not ok:
        return plan
    best = max(ok, key=lambda r: r["throughput_img_min"])
    per_replica = best["throughput_img_min"] / measured_replicas          # images/min
    plan.update(per_replica_img_min=per_replica, from_point=best.get("load"))
    if target_rps is not None:
        target_img_min = target_rps * best["images_per_request"] * 60
        plan["replicas"] = max(1, math.ceil(target_img_min / per_replica - 1e-9))
        if price_per_hour is not None:
            plan["cost_per_1000_images"] = plan["replicas"] * price_per_hour / (target_img_min * 60) * 1000
    return plan


# ---- text ------------------------------------------------------------------------------------------------------
def _s(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _class_lines(metrics: dict) -> list:
    lines = [f"{'class':>12} {'served':>9} {'img/min':>8} {'e2e p50':>8} {'p95':>7} {'p99':>7} {'queue p50':>9} "
             f"{'p95':>7} {'run p50':>8} {'p95':>7} {'mean B':>7} {'429':>4} {'other err':>9}"]
    for name, g in [*metrics["classes"].items(), ("ALL", metrics["overall"])]:
        other = sum(v for k, v in g["errors"].items() if k != "429")
        lines.append(f"{name:>12} {g['served']:>4}/{g['requests']:<4} {g['throughput_img_min']:>8.0f} "
                     f"{_s(g['e2e']['p50']):>8} {_s(g['e2e']['p95']):>7} {_s(g['e2e']['p99']):>7} "
                     f"{_s(g['queue']['p50']):>9} {_s(g['queue']['p95']):>7} {_s(g['run']['p50']):>8} "
                     f"{_s(g['run']['p95']):>7} {g['mean_batch']:>7.2f} {g['rejected_429']:>4} {other:>9}")
    return lines


def _plan_text(plan: "dict | None") -> list:
    if not plan:
        return []
    if not plan["met"]:
        return [f"capacity plan: no measured load met p95 <= {plan['slo_p95_s']:g} s without errors"]
    line = (f"capacity plan: one replica sustains {plan['per_replica_img_min']:.0f} images/min at p95 <= "
            f"{plan['slo_p95_s']:g} s (at {plan['from_point']})")
    if plan.get("replicas") is not None:
        line += f"; {plan['target_rps']:g} requests/s needs {plan['replicas']} replica(s)"
    if plan.get("cost_per_1000_images") is not None:
        line += f", {plan['cost_per_1000_images']:.4f} per 1,000 images at {plan['price_per_hour']:g}/replica-hour"
    return [line]


def format_console(result: dict) -> str:
    c = result["config"]
    lines = [f"HTTP load benchmark of {c['url']} ({c['mode']} mode, {len(result['mix']['classes'])} class(es))"]
    if result.get("seconds_per_request"):
        lines.append(f"calibration: one request at a time takes {result['seconds_per_request']:.3f} s")
    for run in result["runs"]:
        lines.append(f"-- {run['point']['load']}: {run['metrics']['overall']['served']} served in "
                     f"{run['metrics']['wall_s']:.1f} s" + (" (time limit hit)" if run["metrics"]["hit_time_limit"]
                                                             else ""))
        lines += _class_lines(run["metrics"])
    lines += _plan_text(result.get("plan"))
    return "\n".join(lines)


def to_markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# HTTP load benchmark: {c['url']}", "", f"{c['mode']} mode, arrivals {c['arrivals']}, "
             f"{result['created']}. Host (client side): {result['host_text']}.", "", "## Request mix", "",
             "```json", json.dumps(result["mix"], indent=1), "```", "", "## Runs", ""]
    for run in result["runs"]:
        lines += [f"### {run['point']['load']}", "", "```", *_class_lines(run["metrics"]), "```", ""]
    lines += [*(f"**{t}**" for t in _plan_text(result.get("plan"))), "", "![latency and throughput](bench.png)", "",
              "e2e = client-side seconds from sending to the image (sync) or the job's completed event (jobs); "
              "queue and run are the server's own figures. Per-request records are in `bench.json`."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    with two_panels(path) as (left, right):
        names = sorted({n for r in result["runs"] for n in r["metrics"]["classes"]})
        for name in names:
            pts = [(r["metrics"]["overall"]["throughput_img_min"], r["metrics"]["classes"][name]["e2e"]["p95"])
                   for r in result["runs"] if name in r["metrics"]["classes"]]
            pts = [p for p in pts if p[1] is not None]
            left.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        left.set(xlabel="throughput (images/min, all classes)", ylabel="e2e p95 (s)", title="latency vs load")
        left.legend(fontsize=7)
        sizes = collections.Counter()
        for r in result["runs"]:
            sizes.update({int(k): v for k, v in r["metrics"]["overall"]["batch_sizes"].items()})
        right.bar(list(sizes), list(sizes.values()), color="#59c")
        right.set(xlabel="images in the engine call", ylabel="requests", title="achieved batch sizes")


def write_http_bench(result: dict, out):
    return write_bench_dir(result, out, to_markdown, plot)
