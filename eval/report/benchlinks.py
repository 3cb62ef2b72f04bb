"""Link load-benchmark results (``diffaccel bench``) into an eval report: their key numbers, and relative links to
their own bench.md / bench.png, so one report shows both the per-step and the under-load picture.

>>> link("bench.md", "../bench/bench.md")
'[bench.md](../bench/bench.md)'
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError


def link(text: str, href: str) -> str:
    return f"[{text}]({href})"


def bench_summaries(dirs, report_dir) -> list:
    """Read each BENCH_DIR/bench.json (checked before any evaluation work) into a small summary."""
    out = []
    for d in dirs:
        path = Path(d) / "bench.json"
        try:
            bench = json.loads(path.read_text())
            rows = bench["table"]
        except (OSError, ValueError, KeyError) as e:
            raise DiffaccelError(f"--bench {d}: no readable bench.json ({type(e).__name__}); run diffaccel bench "
                                 f"... -o {d} first") from None
        rel = os.path.relpath(Path(d).resolve(), Path(report_dir).resolve())
        out.append({"dir": str(Path(d).resolve()), "relative_dir": rel, "artifact": bench.get("artifact"),
                    "engine": bench.get("engine"), "slo": bench.get("slo"), "table": rows,
                    "schema_version": bench.get("schema_version")})
    return out


def bench_rows(report: dict) -> list:
    rows = [["benchmark", "engine", "load", "max batch", "timeout ms", "p50 s", "p95 s", "p99 s", "images/min",
             "model images/min", "details"]]
    for b in report.get("load_benchmarks", []):
        for r in b["table"]:
            load = r.get("rate_label") or f"{r.get('concurrency')} clients"
            rows.append([Path(b["dir"]).name, b.get("engine") or "", load, r["max_batch"], f"{r['timeout_ms']:g}",
                         f"{r['p50_s']:.3f}", f"{r['p95_s']:.3f}", f"{r['p99_s']:.3f}",
                         f"{r['throughput_img_min']:.0f}", f"{r.get('predicted_img_min') or 0:.0f}",
                         link("bench.md", f"{b['relative_dir']}/bench.md")])
    return rows
