"""Report figures as PNG bytes, drawn from report.json alone with matplotlib's Agg canvas (no pyplot state).

Figures: quality vs speed with the Pareto front, per-step denoiser latency distributions, the stage breakdown,
throughput vs batch size, the steps sweep, and per prompt/seed an image grid (baseline | each variant | its
|difference| heat-map).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from diffaccel.eval.report.tables import denoiser_label, num


def _figure(w: float, h: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()


def _ok(report: dict) -> list:
    return [v for v in report["variants"] if v["status"] == "ok"]


def pareto_front(points: list) -> list:
    """Indices of points (latency, quality) not dominated by another (lower latency and higher quality),
    ordered by latency.

    >>> pareto_front([(1.0, 30.0), (2.0, 40.0), (3.0, 35.0), (0.5, 20.0)])
    [3, 0, 1]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


LOSSLESS_DB = 60.0      # PSNR above this is float rounding (fp32 engines read 130-140 dB): drawn on one line


def shown_psnr(p) -> float:
    """Where a PSNR is drawn: at :data:`LOSSLESS_DB` + 3 when identical (inf) or lossless (above the line), so a
    139 dB fp32 engine does not squash the 25-40 dB differences that matter into the bottom of the chart.

    >>> shown_psnr(139.2), shown_psnr(float("inf")), shown_psnr(31.5)
    (63.0, 63.0, 31.5)
    """
    return LOSSLESS_DB + 3.0 if p is None or math.isinf(p) or p > LOSSLESS_DB else p


def quality_vs_speed(report: dict) -> bytes:
    """Each variant's whole-image latency (end to end, p50) against its PSNR vs the baseline, with the Pareto
    front; identical and lossless variants share the top line."""
    rows = _ok(report)
    xs = [v["latency"]["end_to_end"]["p50"] for v in rows]
    psnr = [num(v["quality"]["aggregate"]["psnr"]) for v in rows]
    ys = [shown_psnr(p) for p in psnr]
    fig, (ax,) = _figure(6.4, 4.2)
    for v, x, y, p in zip(rows, xs, ys, psnr):
        ax.scatter([x], [y], s=60, marker="*" if v["kind"] == "baseline" else "o", zorder=3)
        label = v["name"] + (" (∞ dB)" if p is None or math.isinf(p) else f" ({p:.1f} dB)")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = pareto_front(list(zip(xs, ys)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="gray", zorder=1, label="Pareto front")
    ax.axhline(LOSSLESS_DB + 3.0, color="lightgray", lw=0.8)
    ax.set_xlabel("whole image, end to end p50 (s)  ← faster")
    ax.set_ylabel(f"PSNR vs baseline (dB; top line: identical or > {LOSSLESS_DB:g})  ↑ closer")
    ax.set_title("Quality vs speed")
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def latency_distributions(report: dict) -> bytes:
    rows = _ok(report)
    fig, (ax,) = _figure(6.4, 1.2 + 0.5 * max(len(rows), 2))
    data = [np.asarray(v["latency"]["denoiser_step_samples"], dtype=float) * 1e3 for v in rows]
    try:
        ax.boxplot(data, orientation="horizontal", whis=(1, 99), showmeans=True)
    except TypeError:  # matplotlib < 3.10
        ax.boxplot(data, vert=False, whis=(1, 99), showmeans=True)
    ax.set_yticks(range(1, len(rows) + 1), labels=[v["name"] for v in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{denoiser_label(report)} step latency (ms)")
    ax.set_title("Per-step latency: box p25-p75, whiskers p1-p99, triangle = mean", fontsize=10)
    return _png(fig)


def stage_breakdown(report: dict) -> bytes:
    rows = _ok(report)
    fig, (ax,) = _figure(6.4, 1.2 + 0.5 * max(len(rows), 2))
    left = np.zeros(len(rows))
    for part in ("text_encoder", "denoiser", "vae_decode", "other"):
        vals = np.asarray([v["latency"]["breakdown"][part] * 1e3 for v in rows])
        ax.barh([v["name"] for v in rows], vals, left=left, label=part)
        left += vals
    ax.invert_yaxis()
    ax.set_xlabel("mean time per image (ms)")
    ax.set_title(f"Where the time goes ({report['config']['headline_steps']} steps, batch 1)")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
    return _png(fig)


def throughput(report: dict) -> bytes:
    fig, (ax,) = _figure(6.4, 4.0)
    for v in _ok(report):
        pts = sorted((t["batch_size"], t["images_per_second"]) for t in v["throughput"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=v["name"])
    ax.set_xlabel("batch size (images per call)")
    ax.set_ylabel("images / s")
    ax.set_xticks(report["config"]["batch_sizes"])
    ax.set_title("Throughput vs batch size")
    ax.legend(fontsize=8)
    return _png(fig)


def steps_sweep(report: dict) -> "bytes | None":
    if len(report["config"]["steps"]) < 2:
        return None
    top = report["config"]["headline_steps"]
    fig, (a1, a2) = _figure(10.0, 4.0, ncols=2)
    cap = shown_psnr(math.inf)
    for v in _ok(report):
        steps = [r["steps"] for r in v["sweep"]]
        a1.plot(steps, [r["end_to_end"]["p50"] for r in v["sweep"]], "o-", label=v["name"])
        q = [num(r["psnr_vs_reference"]) for r in v["sweep"]]
        a2.plot(steps, [shown_psnr(p) for p in q], "o-", label=v["name"])
    a1.set_xlabel("denoising steps")
    a1.set_ylabel("end-to-end s / image (p50)")
    a1.set_title("Latency vs steps")
    a2.set_xlabel("denoising steps")
    a2.set_ylabel(f"PSNR vs baseline@{top} steps (dB; top line: identical or > {LOSSLESS_DB:g})")
    a2.axhline(cap, color="lightgray", lw=0.8)
    a2.set_title("What fewer steps cost")
    for a in (a1, a2):
        a.legend(fontsize=8)
        a.set_xticks(sorted(report["config"]["steps"]))
    return _png(fig)


def all_plots(report: dict) -> dict:
    """{name: PNG bytes} of every summary figure that has data."""
    if not _ok(report):
        return {}
    figs = {"quality_vs_speed": quality_vs_speed(report), "latency_distribution": latency_distributions(report),
            "stage_breakdown": stage_breakdown(report), "throughput": throughput(report),
            "steps_sweep": steps_sweep(report)}
    return {k: v for k, v in figs.items() if v is not None}


# ---- image grids ------------------------------------------------------------------------------------------------
def _read(root: Path, rel: "str | None"):
    from PIL import Image

    if not rel or not (root / rel).is_file():
        return None
    return np.asarray(Image.open(root / rel).convert("RGB"), dtype=np.float64) / 255.0


def _grid(report: dict, root: Path, index: int) -> "bytes | None":
    rows = _ok(report)
    base = next((v for v in rows if v["kind"] == "baseline"), None)
    if base is None:
        return None
    ref = _read(root, base["quality"]["per_image"][index].get("image"))
    others = [(v, _read(root, v["quality"]["per_image"][index].get("image"))) for v in rows if v is not base]
    others = [(v, img) for v, img in others if img is not None]
    if ref is None:
        return None
    diffs = [np.abs(img - ref).mean(axis=2) for _, img in others]
    vmax = max([float(d.max()) for d in diffs] + [1 / 255])
    side = min(max(ref.shape[0] / 100, 2.0), 3.2)           # inches per panel: 200-320 px
    fig, axes = _figure(side * (1 + 2 * len(others)), side + 0.6, ncols=1 + 2 * len(others))
    axes[0].imshow(ref)
    axes[0].set_title(base["name"] + "\n(baseline)", fontsize=8)
    for k, ((v, img), d) in enumerate(zip(others, diffs)):
        r = v["quality"]["per_image"][index]
        psnr = num(r["psnr"])
        axes[1 + 2 * k].imshow(img)
        axes[1 + 2 * k].set_title(f"{v['name']}\nPSNR {'∞' if psnr is None or math.isinf(psnr) else f'{psnr:.1f}'}",
                                  fontsize=8)
        axes[2 + 2 * k].imshow(d, cmap="inferno", vmin=0, vmax=vmax)
        axes[2 + 2 * k].set_title(f"|diff| max {d.max():.3f}\n(scale 0..{vmax:.3f})", fontsize=8)
    for a in axes:
        a.set_axis_off()
    return _png(fig)


def image_grids(report: dict, root) -> dict:
    """{"grid-p{prompt}-seed{seed}": PNG} for every headline image whose files exist under ``root``."""
    rows = _ok(report)
    base = next((v for v in rows if v["kind"] == "baseline"), None)
    if base is None:
        return {}
    out = {}
    for i, r in enumerate(base["quality"]["per_image"]):
        png = _grid(report, Path(root), i)
        if png is not None:
            out[f"grid-p{r['prompt']}-seed{r['seed']}"] = png
    return out
