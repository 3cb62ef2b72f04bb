"""Whether timings can carry a ratio: a speed ratio built on timings that disagree with themselves is not headlined.

A busy machine shows in the timings before it shows anywhere else: on 2026-12-07 ``demo`` and ``eval`` on a contended
2-core machine printed "87x" and "62x" because PyTorch's U-Net step read 695 ms at p50 and 1,939 ms at p90 instead of
~18 ms. Two signs are checked, each against a fixed limit (deterministic: the same timings always get the same
verdict):

- **spread**: a timing's p90 more than :data:`SPREAD_LIMIT` times its p50 (at least :data:`MIN_SAMPLES` samples):
  the calls of one measurement disagree;
- **passes**: the per-pass medians of one variant (``microbench``'s processes, two passes or more) more than
  :data:`PASS_LIMIT` times apart: repeated measurements disagree.

A ratio between two rows is trusted only when both rows are stable; otherwise the tables print "unstable" in its
place and a note beside the table says which timing disagreed, by how much, and what to do. report.json keeps the
raw numbers and the verdict.

>>> problems({"denoiser_step": {"n": 8, "p50": 0.695, "p90": 1.939}}, "U-Net step")
['U-Net step p90 is 2.8x its p50']
>>> problems({"denoiser_step": {"n": 8, "p50": 0.018, "p90": 0.019}}, "U-Net step")
[]
>>> pass_problem([0.010, 0.014])
'pass medians 1.4x apart'
"""
from __future__ import annotations

SPREAD_LIMIT = 1.5          # p90 / p50 above this: the calls disagree
PASS_LIMIT = 1.25           # largest / smallest pass median above this: the passes disagree
MIN_SAMPLES = 3             # fewer samples say nothing about spread
ADVICE = "rerun with nothing else heavy on the machine (more --repeat helps on a noisy one)"


def spread_problem(stats: "dict | None", label: str) -> "str | None":
    """``label p90 is Nx its p50`` when ``stats`` (a LatencyStats dict) spreads past :data:`SPREAD_LIMIT`."""
    if not stats or (stats.get("n") or 0) < MIN_SAMPLES or not stats.get("p50"):
        return None
    ratio = stats["p90"] / stats["p50"]
    return f"{label} p90 is {ratio:.1f}x its p50" if ratio > SPREAD_LIMIT else None


def pass_problem(medians: list) -> "str | None":
    """``pass medians Nx apart`` when two or more passes disagree past :data:`PASS_LIMIT`."""
    medians = [m for m in medians or () if m]
    if len(medians) < 2:
        return None
    ratio = max(medians) / min(medians)
    return f"pass medians {ratio:.1f}x apart" if ratio > PASS_LIMIT else None


def step_problems(stats: dict, pass_medians=()) -> list:
    """What makes a microbench row's step timing unfit for a ratio: its spread, and (isolated passes) its passes."""
    return [p for p in (pass_problem(pass_medians), spread_problem(stats, "step")) if p]


def problems(latency: dict, label: str) -> list:
    """What makes an eval row's timings unfit for a ratio: its denoiser step and its whole image."""
    return [p for p in (spread_problem(latency.get("denoiser_step"), label),
                        spread_problem(latency.get("end_to_end"), "image")) if p]


def unstable(row: dict) -> list:
    """The reasons recorded on an eval row (``latency.unstable``) or a microbench row (``unstable``); [] if none
    (reports written before the check have none)."""
    return list(row.get("unstable") or (row.get("latency") or {}).get("unstable") or [])


def note(rows: list, name=lambda r: r["name"]) -> str:
    """The line beside a table when some rows' timings are unstable ("" when none are)."""
    bad = [f"{name(r)}: {'; '.join(unstable(r))}" for r in rows if unstable(r)]
    if not bad:
        return ""
    return (f"unstable timings, their ratios withheld ({', '.join(bad)}; limits: p90 <= {SPREAD_LIMIT:g}x p50, "
            f"passes within {PASS_LIMIT:g}x): {ADVICE}")
