"""The report renders from a stored report.json alone; the HTML is self-contained; tables say what they show."""
import json
import math
import re

import numpy as np
import pytest

from diffaccel.eval.report.plots import pareto_front
from diffaccel.eval.report.write import json_safe, load_report, render_report, write_report
from diffaccel.eval.report.tables import format_summary, reference_peer, summary_rows
from diffaccel.optimize.artifact.errors import DiffaccelError

PROMPTS = ["a small red circle at the top left on a white background", "a large blue star in the center on a "
           "black background"]


def _stats(ms):
    s = ms / 1e3
    return {"n": 8, "mean": s * 1.05, "std": s * 0.1, "min": s * 0.9, "p50": s, "p90": s * 1.2, "p99": s * 1.3,
            "max": s * 1.4}


def _variant(name, kind, unet_ms, psnr, status="ok"):
    if status != "ok":
        return {"name": name, "kind": kind, "status": "failed", "error": "RuntimeError: not implemented for 'Half'",
                "info": {}, "setup": {"load_seconds": None, "prepare_seconds": None, "first_call_seconds": None}}
    per_image = [{"steps": 4, "prompt": p, "seed": s, "mse": 0.0 if kind == "baseline" else 1e-4,
                  "psnr": psnr, "ssim": 1.0 if kind == "baseline" else 0.99, "latent_rel_error": 0.0 if
                  kind == "baseline" else 1e-3, "lpips": None, "clip_score": None,
                  "image": f"images/{name}/p{p}-seed{s}.png",
                  "adherence": {"shape": "circle", "color": "red", "background": "white", "ok": p == 0,
                                "held_out": False}}
                 for p in range(2) for s in (0,)]
    split = {"n": 2, "background": 1.0, "color": 0.5, "shape": 0.5, "all": 0.5}
    return {
        "name": name, "kind": kind, "status": "ok", "error": None, "info": {}, "size": [64, 64],
        "clock": "perf_counter",
        "setup": {"load_seconds": 0.5, "prepare_seconds": 0.01, "first_call_seconds": 0.2},
        "latency": {"denoiser_step": _stats(unet_ms),
                    "denoiser_step_samples": list(np.linspace(0.9, 1.4, 8) * unet_ms / 1e3),
                    "text_encoder": _stats(2), "vae_decode": _stats(5), "other": _stats(1),
                    "end_to_end": _stats(4 * unet_ms + 8), "steps_per_second": 1e3 / unet_ms,
                    "breakdown": {"text_encoder": 0.002, "denoiser": 4 * unet_ms / 1e3, "vae_decode": 0.005,
                                  "other": 0.001}},
        "throughput": [{"batch_size": b, "end_to_end": _stats(b * 10), "images_per_second": 100 / (10 + b),
                        "denoiser_step_p50": unet_ms / 1e3} for b in (1, 2)],
        "memory": {"rss_before_mb": 400, "rss_after_load_mb": 420, "peak_rss_mb": 450,
                   "gpu_allocator_peak_mb": None, "gpu_nvml_peak_mb": None},
        "quality": {"per_image": per_image, "aggregate": {
            "n": 2, "psnr": psnr, "psnr_min": psnr, "ssim": 0.99, "ssim_min": 0.98, "latent_rel_error": 1e-3,
            "latent_rel_error_max": 2e-3, "fid": None, "reference": kind == "baseline"}},
        "adherence": {"splits": {"overall": split, "seen": split, "held_out": {**split, "n": 0}},
                      "per_image": [r["adherence"] for r in per_image]},
        "sweep": [{"steps": s, "end_to_end": _stats(s * unet_ms), "images_per_second": 1e3 / (s * unet_ms),
                   "denoiser_step_p50": unet_ms / 1e3, "psnr": psnr, "ssim": 0.99, "latent_rel_error": 1e-3,
                   "psnr_vs_reference": psnr if s == 4 else 25.0, "ssim_vs_reference": 0.9,
                   "adherence_all": 0.5} for s in (2, 4)],
        "speedup": {"denoiser_step_p50": 10.0 / unet_ms, "end_to_end_p50": 1.0},
    }


def synthetic_report():
    return {
        "schema_version": 1, "kind": "diffaccel-eval", "created": "2026-01-01T00:00:00+00:00",
        "config": {"prompts": PROMPTS, "seeds": [0], "steps": [2, 4], "batch_sizes": [1, 2], "headline_steps": 4,
                   "scheduler": "DDIMScheduler", "guidance_scale": 7.5, "height": 64, "width": 64, "peers": []},
        "denoiser": "unet", "baseline": {"variant": "torch-fp32", "source": {"spec": "tinyshapes", "sha256": "0" * 64}},
        "host": {"cpu": {"model": "Test CPU", "logical_cores": 2, "flags": ["avx2"]}, "gpu": None,
                 "torch_threads": 1},
        "clock": "perf_counter",
        "metrics": {"lpips": "not computed (pass --lpips PATH)", "clip_score": "not computed (pass --clip-model DIR)",
                    "fid": "not computed (pass --inception PATH)", "adherence": "tinyshapes adherence checker"},
        "variants": [_variant("torch-fp32", "baseline", 10.0, math.inf),
                     _variant("onnxruntime-fp32", "artifact", 4.0, 52.5),
                     _variant("onnxruntime-int8", "artifact", 2.0, 31.0),
                     _variant("torch-fp16", "peer", 0, 0, status="failed")],
    }


def _images(report):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = {}
    for v in report["variants"]:
        for r in v.get("quality", {}).get("per_image", []):
            noise = 0 if v["kind"] == "baseline" else rng.integers(0, 8, base.shape)
            out[r["image"]] = np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "report"
    report = synthetic_report()
    write_report(report, _images(report), out)
    return out


def test_json_is_strict_and_infinity_is_the_string_inf(stored):
    text = (stored / "report.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["variants"][0]["quality"]["aggregate"]["psnr"] == "inf"
    assert json_safe({"a": (float("nan"), np.float32(2.5), -math.inf)}) == {"a": [None, 2.5, "-inf"]}


def test_report_files_and_tables(stored):
    assert {p.name for p in stored.iterdir()} >= {"report.json", "report.md", "report.html", "plots", "images"}
    plots = {p.stem for p in (stored / "plots").iterdir()}
    assert {"quality_vs_speed", "latency_distribution", "stage_breakdown", "throughput", "steps_sweep",
            "grid-p0-seed0", "grid-p1-seed0"} <= plots
    md = (stored / "report.md").read_text()
    for needle in ("## Summary", "| onnxruntime-int8 | ok | 2.00 |", "## U-Net per-step latency (ms)",
                   "## Steps sweep", "PSNR vs baseline@4", "not computed (pass --lpips PATH)",
                   "## Prompt adherence", "| onnxruntime-fp32 | seen | 2 | 100% | 50% |",
                   "failed** torch-fp16: RuntimeError", "![quality_vs_speed]"):
        assert needle in md, needle
    assert "held_out" not in md    # empty splits are left out


def test_html_is_self_contained(stored):
    page = (stored / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)
    assert not re.search(r"<(script|link|iframe|object|embed)\b|@import|url\(", page, re.I)
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 7 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "a large blue star in the center" in page and "torch-fp16" in page


def test_render_from_the_stored_json_alone(stored, tmp_path):
    only = tmp_path / "only-json"
    only.mkdir()
    (only / "report.json").write_text((stored / "report.json").read_text())
    paths = render_report(only / "report.json")                    # no images beside it: no grids, no failure
    page = paths["html"].read_text()
    assert "No images stored with this report." in page
    assert paths["md"].read_text().count("## Summary") == 1
    again = render_report(stored / "report.json", tmp_path / "elsewhere")   # images read next to report.json
    assert (tmp_path / "elsewhere" / "plots" / "grid-p0-seed0.png").is_file()
    assert again["html"].read_text().count("data:image/png;base64,") >= 7


def test_summary_table_rows():
    report = json.loads(json.dumps(json_safe(synthetic_report())))
    rows = summary_rows(report)
    assert [r[0] for r in rows[1:]] == ["torch-fp32 (baseline)", "onnxruntime-fp32", "onnxruntime-int8", "torch-fp16"]
    assert rows[3][2:5] == ["2.00", "2.40", "5.00x"] and rows[3][7] == "31.0"
    text = format_summary(report)
    assert "failed: torch-fp16: RuntimeError" in text and "host: Test CPU" in text


def with_peers(report):
    """``report`` plus two measured peers (torch-bf16 at 8 ms, a faster "reference" at 5 ms: listed second, and not
    named like a peer, so the fastest is found by the rows' kind and p50) and one skipped peer."""
    skipped = {**_variant("optimum-intel-int8", "peer", 0, 0, status="failed"), "status": "skipped",
               "error": "optimum-intel is not installed"}
    report["variants"][1:1] = [_variant("torch-bf16", "peer", 8.0, 40.0), _variant("reference", "peer", 5.0, 35.0),
                               skipped]
    return report


def test_summary_vs_peer_column():
    """Each engine's U-Net step p50 against the fastest measured peer's: peer p50 / engine p50, named; "—" for the
    baseline and the peers; a line under the table names the reference."""
    report = json.loads(json.dumps(json_safe(with_peers(synthetic_report()))))
    assert reference_peer(report)["name"] == "reference"
    rows = summary_rows(report)
    assert rows[0][-1] == "vs peer" and all(len(r) == len(rows[0]) for r in rows)
    col = {r[0]: r[-1] for r in rows[1:]}
    assert col == {"torch-fp32 (baseline)": "—", "torch-bf16": "—", "reference": "—", "optimum-intel-int8": "—",
                   "onnxruntime-fp32": "1.25× reference", "onnxruntime-int8": "2.50× reference", "torch-fp16": "—"}
    assert rows[4][1] == "skipped"
    text = format_summary(report)
    assert "vs peer: the fastest peer's U-Net step p50 (reference, 5.00 ms)" in text
    assert "2.50× reference" in text and "skipped: optimum-intel-int8: optimum-intel is not installed" in text


def test_summary_has_no_vs_peer_column_without_a_measured_peer(tmp_path):
    report = synthetic_report()                                 # its only peer (torch-fp16) failed
    assert reference_peer(report) is None
    assert "vs peer" not in summary_rows(report)[0] and "vs peer" not in format_summary(report)
    report["variants"] = [v for v in report["variants"] if v["kind"] != "peer"]
    assert len(summary_rows(report)[0]) == 11 and "vs peer" not in format_summary(report)


def test_report_files_name_the_reference_peer(tmp_path):
    report = with_peers(synthetic_report())
    write_report(report, {}, tmp_path / "report")
    md, page = (tmp_path / "report" / "report.md").read_text(), (tmp_path / "report" / "report.html").read_text()
    assert "| vs peer |" in md and "| 2.50× reference |" in md and "vs peer: the fastest peer's" in md
    assert "<th>vs peer</th>" in page and "2.50× reference" in page and "vs peer: the fastest peer&#x27;s" in page


def test_wrong_schema_is_refused(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": 99, "kind": "diffaccel-eval"}))
    with pytest.raises(DiffaccelError, match="not a diffaccel eval report of schema 1"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{broken")
    with pytest.raises(DiffaccelError, match="cannot read"):
        render_report(tmp_path / "report.json")


def test_write_report_replaces_a_report_but_not_other_folders(stored, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(DiffaccelError, match="exists and is not a diffaccel report"):
        write_report(synthetic_report(), {}, other)
    assert (other / "x.txt").read_text() == "mine"
    write_report(synthetic_report(), {}, stored.parent / "second")
    write_report(synthetic_report(), {}, stored.parent / "second")     # a previous report is replaced
    assert not list(stored.parent.glob(".second*"))


def test_pareto_front():
    assert pareto_front([(1.0, 30.0), (2.0, 40.0), (3.0, 35.0), (0.5, 20.0)]) == [3, 0, 1]
    assert pareto_front([(1.0, math.inf), (1.0, 10.0)]) == [0]


def test_load_benchmarks_are_linked(tmp_path):
    from diffaccel.eval.report.benchlinks import bench_summaries
    from diffaccel.optimize.artifact.errors import DiffaccelError

    bench = tmp_path / "bench"
    bench.mkdir()
    row = {"rate_label": "1x", "concurrency": None, "max_batch": 4, "timeout_ms": 100.0, "p50_s": 0.15,
           "p95_s": 0.22, "p99_s": 0.24, "throughput_img_min": 586.0, "predicted_img_min": 608.0}
    (bench / "bench.json").write_text(json.dumps({"schema_version": 1, "engine": "onnxruntime/fp32",
                                                  "table": [row], "slo": None}))
    out = tmp_path / "report"
    report = synthetic_report()
    report["load_benchmarks"] = bench_summaries([bench], out)
    write_report(report, _images(report), out)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "[bench.md](../bench/bench.md)" in md and "586" in md
    assert '<a href="../bench/bench.md">bench.md</a>' in page
    assert not re.search(r"https?://", page)
    with pytest.raises(DiffaccelError, match="no readable bench.json"):
        bench_summaries([tmp_path / "missing"], out)


def test_unstable_timings_withhold_their_ratios_and_say_why(tmp_path):
    """A row whose timings disagree with themselves (p90 far above p50, as PyTorch's step on a busy machine) gets no
    speedup or vs-peer ratio, nor does any row whose ratio is built on it; a note under the table names the row and
    the spread. Stable rows keep their numbers."""
    from diffaccel.eval.harness.runner import _latency

    busy = _latency([{"e2e": 1.0, "denoiser": [0.018, 0.7, 0.69, 1.9, 0.7], "text_encoder": 0.01,
                      "vae_decode": 0.02}] * 2, 5)
    assert busy["unstable"] == ["step p90 is 2.7x its p50"]
    quiet = _latency([{"e2e": 1.0, "denoiser": [0.018, 0.019, 0.018, 0.0185], "text_encoder": 0.01,
                       "vae_decode": 0.02}] * 2, 4)
    assert quiet["unstable"] == []

    report = json.loads(json.dumps(json_safe(with_peers(synthetic_report()))))
    rows = {v["name"]: v for v in report["variants"]}
    rows["reference"]["latency"]["unstable"] = ["step p90 is 2.8x its p50"]
    col = {r[0]: (r[4], r[-1]) for r in summary_rows(report)[1:]}
    assert col["onnxruntime-int8"] == ("5.00x", "unstable")             # vs the unstable peer: withheld
    rows["torch-fp32"]["latency"]["unstable"] = ["image p90 is 1.7x its p50"]
    col = {r[0]: r[4] for r in summary_rows(report)[1:]}
    assert col["onnxruntime-int8"] == col["onnxruntime-fp32"] == "unstable"   # vs the unstable baseline
    text = format_summary(report)
    assert ("unstable timings, their ratios withheld (torch-fp32: image p90 is 1.7x its p50, reference: step p90 is "
            "2.8x its p50; limits:") in text and "rerun with nothing else heavy" in text
    write_report(report, {}, tmp_path / "report")
    assert "unstable timings, their ratios withheld" in (tmp_path / "report" / "report.md").read_text()
    assert "unstable timings, their ratios withheld" in (tmp_path / "report" / "report.html").read_text()
