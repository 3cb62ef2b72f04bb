"""Each microbench variant in its own process, over several passes in alternating order; median of the medians.

One process per variant and pass: no other runtime's thread pool, allocator or page cache sits beside the variant
being timed (ONNX Runtime keeps its default thread spinning, as a user's process would). Before the passes, one
process per variant builds what is missing, so no pass includes a build. Pass 1 runs the variants in the given
order, pass 2 in reverse, and so on: drift in machine load during a run hits the variants at both ends alike. Each
pass gives every variant's median; the headline is the median of those medians, and the ratio of the first
variant's to each one's. A child writes its record to a JSON file; it is started with an argv list, never a shell.

>>> median_of_medians([[0.010, 0.012, 0.011], [0.020, 0.010, 0.030]])
0.0155
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError


def median_of_medians(passes: list) -> float:
    return statistics.median(statistics.median(p) for p in passes)


def speedups(rows: list, key: str) -> None:
    """``speedup_vs_first``: the first timed row's ``stats[key]`` over each row's (skipped rows have no stats)."""
    timed = [r for r in rows if "stats" in r]
    for r in timed:
        r["speedup_vs_first"] = timed[0]["stats"][key] / r["stats"][key]


def ratio_cell(row: dict, first: dict, width: int) -> str:
    """``row``'s speedup over ``first`` right-aligned in ``width`` (then "x"), or "unstable" where either's timings
    disagree with themselves (:mod:`~diffaccel.eval.harness.stability`)."""
    from diffaccel.eval.harness.stability import unstable

    if unstable(row) or unstable(first):
        return f"{'unstable':>{width + 1}}"
    return f"{row['speedup_vs_first']:{width}.2f}x"


def _child(module: str, cfg, name: str, build_only: bool = False) -> dict:
    """``python -m module CONFIG_JSON VARIANT OUT_JSON [--build-only]``; the child's record."""
    with tempfile.TemporaryDirectory(prefix="diffaccel-microbench-") as d:
        out = Path(d) / "result.json"
        argv = [sys.executable, "-m", module, json.dumps(dataclasses.asdict(cfg)), name, str(out)] + \
            (["--build-only"] if build_only else [])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        code = proc.wait()
        if code != 0 or not out.is_file():
            raise DiffaccelError(f"variant {name} failed in its own process (exit code {code}); its output is above")
        return {**json.loads(out.read_text()), "pid": proc.pid}


def run_isolated(cfg, names: list, to_build: list, module: str, source) -> dict:
    """Time ``names`` (microbench variants) each in its own ``python -m module`` process over ``cfg.passes``
    passes; ``to_build`` get a build-only process first (a peer absent here answers "skipped")."""
    from diffaccel.eval.harness.host import host_info
    from diffaccel.eval.harness.timing import LatencyStats

    skipped, builds = {}, {}
    for name in to_build:
        rec = _child(module, cfg, name, build_only=True)
        if "skipped" in rec:
            skipped[name] = rec["skipped"]
        builds[name] = rec.get("setup_seconds")
    from diffaccel.eval.harness.stability import step_problems

    timed = [n for n in names if n not in skipped]
    passes = []
    for p in range(cfg.passes):
        order = timed if p % 2 == 0 else timed[::-1]
        passes.append({"order": order, "records": {n: _child(module, cfg, n) for n in order}})
    rows = []
    for name in names:
        if name in skipped:
            rows.append({"variant": name, "skipped": skipped[name]})
            continue
        recs = [ps["records"][name] for ps in passes]
        samples = [r["samples"] for r in recs]
        row = {"variant": name, "build_seconds": builds.get(name), "setup_seconds": recs[0]["setup_seconds"],
               "stats": {**LatencyStats.from_samples([s for ss in samples for s in ss]).to_dict(),
                         "median_of_medians": median_of_medians(samples)},
               "pass_medians": [statistics.median(s) for s in samples], "samples": samples,
               "pids": [r["pid"] for r in recs], **recs[0]["facts"]}
        row["unstable"] = step_problems(row["stats"], row["pass_medians"])
        rows.append(row)
    speedups(rows, "median_of_medians")
    first = next((r for r in rows if "stats" in r), None)
    for r in rows:
        if "stats" in r:
            r["pass_speedups"] = [a / b for a, b in zip(first["pass_medians"], r["pass_medians"])]
    from diffaccel.eval.harness.bench_variants import denoiser_name

    return {"benchmark": "denoiser-step", "config": dataclasses.asdict(cfg), "source": source.to_dict(),
            "denoiser": denoiser_name(source), "host": host_info(),
            "timing": f"each variant in its own process, {cfg.passes} passes in alternating order, perf_counter, "
                      "median of the per-pass medians",
            "passes": [ps["order"] for ps in passes], "rows": rows}


def format_isolated(result: dict) -> str:
    from diffaccel.eval.harness.host import describe_cpu

    from diffaccel.eval.harness.stability import note

    cfg, rows = result["config"], result["rows"]
    timed = [r for r in rows if "stats" in r]
    ref = timed[0]["variant"] if timed else "-"
    heads = [f"pass {i + 1} ms" for i in range(cfg["passes"])]
    from diffaccel.eval.harness.bench_variants import step_title

    lines = [f"{step_title(result)}; "
             f"each variant in its own process, {cfg['warmup']} warm-up + {cfg['repeat']} timed calls per process; "
             f"{cfg['passes']} passes in alternating order:",
             *(f"  pass {i + 1}: {', '.join(order)}" for i, order in enumerate(result["passes"])),
             f"{'variant':<28} " + " ".join(f"{h:>11}" for h in heads) + f" {'median ms':>10} {'nodes':>6} "
             f"{'x vs ' + ref:>20}  per pass"]
    for r in rows:
        if "stats" not in r:
            lines.append(f"{r['variant']:<28} skipped: {r['skipped']}")
            continue
        nodes = r.get("graph_nodes") or "-"
        per_pass = " / ".join(f"{x:.2f}" for x in r["pass_speedups"])
        lines.append(f"{r['variant']:<28} " + " ".join(f"{m * 1e3:11.2f}" for m in r["pass_medians"])
                     + f" {r['stats']['median_of_medians'] * 1e3:10.2f} {nodes:>6} "
                     f"{ratio_cell(r, timed[0], 19)}  {per_pass}")
    lines += [n for n in [note(timed, lambda r: r["variant"])] if n]
    lines.append(f"CPU: {describe_cpu(result['host'])}")
    return "\n".join(lines)
