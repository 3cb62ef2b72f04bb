"""Tables of an evaluation report, shared by the console summary, report.md and report.html.

Each table is a list of rows (the first is the header) of display strings, built from report.json alone.

>>> text_table([["a", "b"], ["x", "1"]]).splitlines()[0]
'a  b'
"""
from __future__ import annotations

import json
import math


LEARNED = (("lpips", "LPIPS"), ("clip_score", "CLIP score"), ("fid", "FID"))


def num(x) -> "float | None":
    """A number read back from report.json ("inf" -> inf; None stays None).

    >>> num("inf"), num(None)
    (inf, None)
    """
    if x is None:
        return None
    return float(x) if isinstance(x, (int, float, str)) else None


def fmt(x, spec: str = ".3g", scale: float = 1.0) -> str:
    v = num(x)
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞"
    return format(v * scale, spec)


def _ok(report: dict) -> list:
    return [v for v in report["variants"] if v["status"] == "ok"]


def _step_p50(v: dict) -> "float | None":
    return num(v["latency"]["denoiser_step"]["p50"])


def denoiser_label(report: dict) -> str:
    """What the report's denoiser is called in its tables and plots: "U-Net" or "transformer"."""
    from diffaccel.optimize.artifact.roles import label

    return label(report.get("denoiser"))


def reference_peer(report: dict) -> "dict | None":
    """The fastest measured peer row (``kind`` "peer", lowest denoiser step p50): what "vs peer" compares with."""
    peers = [v for v in _ok(report) if v.get("kind") == "peer" and _step_p50(v)]
    return min(peers, key=_step_p50, default=None)


def _vs_peer(v: dict, peer: dict) -> str:
    """An engine row's denoiser step speed relative to ``peer`` (peer p50 / engine p50), e.g. "1.42× torch-bf16"."""
    mine = _step_p50(v)
    if v.get("kind") != "artifact" or not mine:
        return "—"
    if not _trusted(v, peer):
        return "unstable"
    return f"{fmt(_step_p50(peer) / mine, '.2f')}× {peer['name']}"


def _trusted(*rows) -> bool:
    """Whether a ratio between ``rows`` may be shown: all of their timings stable (see
    :mod:`diffaccel.eval.harness.stability`)."""
    from diffaccel.eval.harness.stability import unstable

    return not any(unstable(r) for r in rows if r is not None)


def summary_note(report: dict) -> str:
    """The lines under the summary table: the "vs peer" reference and which timings were too unstable for a
    ratio ("" when neither applies)."""
    from diffaccel.eval.harness.stability import note

    return "\n".join(n for n in (peer_note(report), note(_ok(report))) if n)


def peer_note(report: dict) -> str:
    """The line under the summary that names the "vs peer" reference ("" when no peer was measured)."""
    peer = reference_peer(report)
    if peer is None:
        return ""
    return (f"vs peer: the fastest peer's {denoiser_label(report)} step p50 ({peer['name']}, "
            f"{fmt(_step_p50(peer), '.2f', 1e3)} ms) "
            "divided by each engine's; above 1 the engine is faster")


def summary_rows(report: dict) -> list:
    """Header plus one row per variant: the headline numbers. With a measured peer, a "vs peer" column gives each
    engine's denoiser step speed relative to the fastest peer (see :func:`peer_note`)."""
    peer = reference_peer(report)
    head = ["variant", "status", f"{denoiser_label(report)} p50 ms", "p90 ms", "speedup", "e2e s/img", "best img/s",
            "PSNR dB", "SSIM", "latent err", "adherence"] + (["vs peer"] if peer else [])
    rows = [head]
    base = next((v for v in _ok(report) if v["quality"]["aggregate"].get("reference")), None)
    for v in report["variants"]:
        if v["status"] != "ok":
            rows.append([v["name"], v["status"]] + ["—"] * (len(head) - 2))   # failed | skipped
            continue
        lat, agg = v["latency"], v["quality"]["aggregate"]
        ref = agg.get("reference")
        best = max(v["throughput"], key=lambda t: t["images_per_second"]) if v["throughput"] else None
        adh = v.get("adherence")
        rows.append([v["name"] + (" (baseline)" if ref else ""), "ok", fmt(lat["denoiser_step"]["p50"], ".2f", 1e3),
                     fmt(lat["denoiser_step"]["p90"], ".2f", 1e3),
                     fmt(v["speedup"]["denoiser_step_p50"], ".2f") + "x" if _trusted(v, base) else "unstable",
                     fmt(lat["end_to_end"]["p50"], ".3f"),
                     f"{fmt(best['images_per_second'], '.2f')} @b{best['batch_size']}" if best else "—",
                     "ref" if ref else fmt(agg["psnr"], ".1f"), "ref" if ref else fmt(agg["ssim"], ".4f"),
                     "ref" if ref else fmt(agg["latent_rel_error"], ".2e"),
                     fmt(adh["splits"]["overall"]["all"], ".0%") if adh else "—"] +
                    ([_vs_peer(v, peer)] if peer else []))
    return rows


def failures(report: dict) -> list:
    return [f"{v['name']}: {v['error']}" for v in report["variants"] if v["status"] != "ok"]


def text_table(rows: list) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def md_table(rows: list) -> str:
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    return "\n".join(["| " + " | ".join(map(cell, rows[0])) + " |", "|" + "---|" * len(rows[0])] +
                     ["| " + " | ".join(map(cell, r)) + " |" for r in rows[1:]])


def headline(report: dict) -> str:
    c = report["config"]
    return (f"{report['baseline']['source']['spec']}: {len(c['prompts'])} prompt(s) x {len(c['seeds'])} seed(s), "
            f"{c['headline_steps']} steps ({c['scheduler']}, guidance {c['guidance_scale']}), "
            f"{c['height']}x{c['width']}, clock {report['clock']}")


def format_summary(report: dict) -> str:
    """The console summary: a headline, the per-variant table, the "vs peer" reference, failed and skipped rows with
    their reasons, and the host."""
    from diffaccel.eval.harness.host import describe

    lines = [headline(report), text_table(summary_rows(report))] + [n for n in [summary_note(report)] if n]
    lines += [f"{v['status']}: {v['name']}: {v['error']}" for v in report["variants"] if v["status"] != "ok"]
    return "\n".join(lines + [f"host: {describe(report['host'])}"])


# ---- detail sections ------------------------------------------------------------------------------------------
def _latency(report) -> list:
    rows = [["variant", "n", "mean", "p50", "p90", "p99", "min", "max"]]
    for v in _ok(report):
        s = v["latency"]["denoiser_step"]
        rows.append([v["name"], s["n"]] + [fmt(s[k], ".2f", 1e3) for k in ("mean", "p50", "p90", "p99", "min", "max")])
    return rows


def _stages(report) -> list:
    rows = [["variant", "text encoder", f"{denoiser_label(report)} (all steps)", "VAE decode", "other",
             "end-to-end p50", "steps/s"]]
    for v in _ok(report):
        b, lat = v["latency"]["breakdown"], v["latency"]
        rows.append([v["name"]] + [fmt(b[k], ".1f", 1e3)
                                   for k in ("text_encoder", "denoiser", "vae_decode", "other")] +
                    [fmt(lat["end_to_end"]["p50"], ".1f", 1e3), fmt(lat["steps_per_second"], ".1f")])
    return rows


def _throughput(report) -> list:
    sizes = report["config"]["batch_sizes"]
    rows = [["variant"] + [f"batch {b} img/s" for b in sizes]]
    for v in _ok(report):
        by = {t["batch_size"]: t for t in v["throughput"]}
        rows.append([v["name"]] + [fmt(by[b]["images_per_second"], ".2f") if b in by else "—" for b in sizes])
    return rows


def _setup(report) -> list:
    rows = [["variant", "load s", "prepare s", "first call s", "RSS after load MB", "peak RSS MB",
             "GPU allocator peak MB", "GPU NVML peak MB"]]
    for v in _ok(report):
        s, m = v["setup"], v["memory"]
        rows.append([v["name"], fmt(s["load_seconds"], ".2f"), fmt(s["prepare_seconds"], ".2f"),
                     fmt(s["first_call_seconds"], ".2f")] +
                    [fmt(m[k], ".0f") for k in ("rss_after_load_mb", "peak_rss_mb", "gpu_allocator_peak_mb",
                                                "gpu_nvml_peak_mb")])
    return rows


def _quality(report) -> list:
    status = report["metrics"]
    rows = [["variant", "PSNR dB (pooled)", "PSNR mean", "PSNR min", "SSIM mean", "SSIM min", "latent err mean",
             "latent err max"] + [label for _, label in LEARNED]]
    for v in _ok(report):
        a = v["quality"]["aggregate"]
        cells = [fmt(a["psnr"], ".2f"), fmt(a.get("psnr_mean"), ".2f"), fmt(a["psnr_min"], ".2f"),
                 fmt(a["ssim"], ".4f"), fmt(a["ssim_min"], ".4f"),
                 fmt(a["latent_rel_error"], ".2e"), fmt(a["latent_rel_error_max"], ".2e")]
        learned = [fmt(a.get(k), ".4g") if not status[k].startswith("not computed") else "not computed"
                   for k, _ in LEARNED]
        rows.append([v["name"]] + cells + learned)
    return rows


def _adherence(report) -> "list | str":
    if not any(v.get("adherence") for v in _ok(report)):
        return report["metrics"]["adherence"]
    rows = [["variant", "pairs", "n", "background", "color", "shape", "all three"]]
    for v in _ok(report):
        for split, s in v["adherence"]["splits"].items():
            if s["n"]:
                rows.append([v["name"], split, s["n"]] +
                            [fmt(s[k], ".0%") for k in ("background", "color", "shape", "all")])
    return rows


def _sweep(report) -> "list | str":
    if len(report["config"]["steps"]) < 2:
        return "one step count only; pass --steps 10,20,30,50 for a sweep"
    top = report["config"]["headline_steps"]
    rows = [["variant", "steps", "e2e p50 s", "img/s", "PSNR vs baseline (same steps)", "SSIM (same steps)",
             f"PSNR vs baseline@{top}", f"SSIM vs baseline@{top}", "adherence"]]
    for v in _ok(report):
        for r in v["sweep"]:
            rows.append([v["name"], r["steps"], fmt(r["end_to_end"]["p50"], ".3f"), fmt(r["images_per_second"], ".2f"),
                         fmt(r["psnr"], ".1f"), fmt(r["ssim"], ".4f"), fmt(r["psnr_vs_reference"], ".1f"),
                         fmt(r["ssim_vs_reference"], ".4f"), fmt(r.get("adherence_all"), ".0%")])
    return rows


def _per_image(report) -> list:
    prompts = report["config"]["prompts"]
    rows = [["variant", "prompt", "seed", "PSNR dB", "SSIM", "latent err", "LPIPS", "CLIP score", "adherent"]]
    for v in _ok(report):
        for r in v["quality"]["per_image"]:
            adh = r.get("adherence")
            rows.append([v["name"], prompts[r["prompt"]], r["seed"], fmt(r["psnr"], ".1f"), fmt(r["ssim"], ".4f"),
                         fmt(r["latent_rel_error"], ".2e"), fmt(r.get("lpips"), ".4f"), fmt(r.get("clip_score"), ".2f"),
                         "—" if adh is None else ("yes" if adh["ok"] else f"no (saw {adh['color']} {adh['shape']} "
                                                                           f"on {adh['background']})")])
    return rows


def _load_benchmarks(report) -> list:
    if not report.get("load_benchmarks"):
        return []
    from diffaccel.eval.report.benchlinks import bench_rows

    return [("Load benchmark (diffaccel bench)", bench_rows(report))]


def sections(report: dict) -> list:
    """(title, rows or text) for every detail section, in report order."""
    notes = "\n".join(f"- **{k}**: {v}" for k, v in report["metrics"].items())
    notes += "\n- **PSNR** in report.json: identical images give the string \"inf\" (shown as ∞)."
    notes += "".join(f"\n- **failed** {f}" for f in failures(report))
    return [(f"{denoiser_label(report)} per-step latency (ms)", _latency(report)),
            ("Stages per image (ms)", _stages(report)),
            ("Throughput vs batch size", _throughput(report)), ("Setup and memory", _setup(report)),
            ("Quality vs baseline (same prompts, seeds, scheduler)", _quality(report)),
            ("Prompt adherence", _adherence(report)), ("Steps sweep", _sweep(report)),
            ("Per image", _per_image(report)), *_load_benchmarks(report), ("Metric notes", notes),
            ("Configuration", "```json\n" + json.dumps(report["config"], indent=1) + "\n```")]
