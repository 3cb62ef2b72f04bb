"""The evaluation harness end to end on random:tiny: every variant measured alike, quality against the baseline on
the same seeds, failures reported rather than crashing, bad input refused in one line before any work."""
import json
import re

import numpy as np
import pytest
import torch

from diffaccel.eval import EvalConfig, evaluate
from diffaccel.eval.harness import variants as var
from diffaccel.eval.harness.instrument import instrument
from diffaccel.eval.harness.timing import Clock

from .helpers import assert_one_line_error, make_tiny_clip, run_cli, save_fake_metric_models

PROMPTS = ("a small red circle at the top left on a white background",
           "a large blue star in the center on a black background")


@pytest.fixture(scope="module")
def artifact(tiny_ort_ts):
    return tiny_ort_ts


def _broken_peer(pipe, device):
    raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")


@pytest.fixture(scope="module")
def result(artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    inception, lpips = save_fake_metric_models(d)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(var.PEERS, "torch-broken", _broken_peer)
        config = EvalConfig(prompts=PROMPTS, seeds=(0, 1), steps=(3, 2), batch_sizes=(2, 1), repeat=1,
                            scheduler="EulerDiscreteScheduler", peers=("torch-bf16", "torch-broken"),
                            adherence=True, clip_model=str(make_tiny_clip(d / "clip")),
                            inception=str(inception), lpips=str(lpips), threads=1)
        report = evaluate([artifact], config=config, out_dir=d / "report")
    return report, d / "report"


def rows(report):
    return {v["name"]: v for v in report["variants"]}


def test_variants_and_failures(result):
    report, _ = result
    assert [v["name"] for v in report["variants"]] == ["torch-fp32", "torch-bf16", "torch-broken", "onnxruntime-fp32"]
    r = rows(report)
    assert r["torch-broken"]["status"] == "failed" and "not implemented for 'Half'" in r["torch-broken"]["error"]
    assert all(r[n]["status"] == "ok" for n in ("torch-fp32", "torch-bf16", "onnxruntime-fp32"))
    assert r["onnxruntime-fp32"]["info"]["backend"] == "onnxruntime"
    assert report["schema_version"] == 1 and report["config"]["scheduler"] == "EulerDiscreteScheduler"
    assert report["config"]["steps"] == [2, 3] and report["config"]["headline_steps"] == 3
    assert report["baseline"]["source"]["spec"] == "random:tiny" and report["host"]["cpu"]["logical_cores"]


def test_quality_against_the_baseline(result):
    r = rows(result[0])
    base, ort, bf16 = (r[n]["quality"]["aggregate"] for n in ("torch-fp32", "onnxruntime-fp32", "torch-bf16"))
    assert base["psnr"] == "inf" and base["reference"] is True and base["latent_rel_error"] == 0
    assert ort["psnr"] >= 40 and ort["ssim"] > 0.999 and ort["latent_rel_error"] < 1e-3
    assert 10 < bf16["psnr"] < ort["psnr"] and bf16["latent_rel_error"] > ort["latent_rel_error"]
    per = r["onnxruntime-fp32"]["quality"]["per_image"]
    assert [(p["prompt"], p["seed"]) for p in per] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert min(p["psnr"] for p in per) == ort["psnr_min"]
    assert ort["psnr_mean"] == pytest.approx(np.mean([p["psnr"] for p in per])) and ort["psnr_mean"] >= ort["psnr"]


def test_latency_is_measured_alike(result):
    for name in ("torch-fp32", "torch-bf16", "onnxruntime-fp32"):
        v = rows(result[0])[name]
        lat = v["latency"]
        assert lat["denoiser_step"]["n"] == len(lat["denoiser_step_samples"]) == 2 * 2 * 3   # prompts x seeds x steps
        s = lat["denoiser_step"]
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        # each call's parts are timed inside its end-to-end span: they fit in it, and the breakdown's U-Net is
        # every step of a call, not one step
        b, calls = lat["breakdown"], 2 * 2                                          # prompts x seeds
        assert lat["end_to_end"]["n"] == calls and lat["other"]["n"] == calls and lat["other"]["min"] > 0
        assert b["denoiser"] == pytest.approx(sum(lat["denoiser_step_samples"]) / calls, rel=1e-6)
        assert b["text_encoder"] == pytest.approx(lat["text_encoder"]["mean"])
        assert b["vae_decode"] == pytest.approx(lat["vae_decode"]["mean"])
        assert all(b[k] > 0 for k in ("text_encoder", "denoiser", "vae_decode"))
        assert lat["steps_per_second"] > 0 and v["clock"] == "perf_counter"
        assert [t["batch_size"] for t in v["throughput"]] == [1, 2]
        assert all(t["images_per_second"] > 0 and t["end_to_end"]["n"] == 1 for t in v["throughput"])
        assert v["setup"]["load_seconds"] >= 0 and v["setup"]["first_call_seconds"] > 0
        assert v["memory"]["peak_rss_mb"] >= v["memory"]["rss_after_load_mb"] > 0


def test_steps_sweep(result):
    r = rows(result[0])
    base, ort = r["torch-fp32"]["sweep"], r["onnxruntime-fp32"]["sweep"]
    assert [s["steps"] for s in base] == [s["steps"] for s in ort] == [2, 3]
    assert base[1]["psnr_vs_reference"] == "inf" and base[0]["psnr"] == "inf"
    assert np.isfinite(base[0]["psnr_vs_reference"])          # fewer steps: not the same image
    assert ort[0]["psnr"] >= 40 and ort[0]["psnr_vs_reference"] == pytest.approx(base[0]["psnr_vs_reference"],
                                                                                  abs=0.5)
    assert all(s["end_to_end"]["n"] == 4 and "adherence_all" in s for s in ort)


def test_adherence_and_learned_metrics(result):
    report, _ = result
    r = rows(report)
    for name in ("torch-fp32", "onnxruntime-fp32"):
        adh = r[name]["adherence"]
        assert adh["splits"]["overall"]["n"] == 4 and 0 <= adh["splits"]["overall"]["all"] <= 1
        assert len(adh["per_image"]) == 4 and r[name]["quality"]["per_image"][0]["adherence"] == adh["per_image"][0]
    assert all(report["metrics"][k].startswith("computed with") for k in ("lpips", "clip_score", "fid"))
    ort, base = r["onnxruntime-fp32"]["quality"], r["torch-fp32"]["quality"]
    assert ort["aggregate"]["fid"] >= 0 and ort["aggregate"]["lpips"] < 1e-6
    assert 0 <= ort["aggregate"]["clip_score"] <= 100
    assert base["aggregate"]["fid"] is None and base["per_image"][0]["lpips"] is None
    assert base["aggregate"]["clip_score"] == pytest.approx(ort["aggregate"]["clip_score"], abs=0.5)


def test_report_files(result):
    report, out = result
    assert json.loads((out / "report.json").read_text()) == report
    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page) and not re.search(r"<(script|link)\b", page)
    assert all((out / p["image"]).is_file() for v in report["variants"] if v["status"] == "ok"
               for p in v["quality"]["per_image"])
    assert (out / "plots" / "steps_sweep.png").is_file() and (out / "plots" / "grid-p1-seed1.png").is_file()


# ---- instrumentation -------------------------------------------------------------------------------------------
def test_instrument_times_components_and_restores_everything(tiny_pipe, artifact):
    from diffaccel.engines import AcceleratedStableDiffusionPipeline

    acc = AcceleratedStableDiffusionPipeline.from_pretrained(artifact)
    acc.set_progress_bar_config(disable=True)
    for pipe in (tiny_pipe, acc):
        engines = {n: getattr(getattr(pipe, n), "engine", None) for n in ("unet", "vae", "text_encoder")}
        with instrument(pipe, Clock()) as timings:
            pipe("a red circle", num_inference_steps=3, output_type="np")
        assert [c for c, _ in timings.records].count("denoiser") == 3
        assert [c for c, _ in timings.records].count("vae_decode") == 1
        assert [c for c, _ in timings.records].count("text_encoder") >= 1
        with pytest.raises(RuntimeError, match="boom"):
            with instrument(pipe, Clock()):
                raise RuntimeError("boom")
        assert not pipe.unet._forward_hooks if isinstance(pipe.unet, torch.nn.Module) else True
        assert "decode" not in vars(pipe.vae) and "encode" not in vars(pipe.vae)
        assert {n: getattr(getattr(pipe, n), "engine", None) for n in engines} == engines


# ---- bad input: one line, before any work ------------------------------------------------------------------------
def test_bad_input(capsys, tmp_path, artifact):
    out, art = str(tmp_path / "r"), str(artifact)

    def refused(argv, *needles):
        code, _, err = run_cli(capsys, "eval", *argv)
        assert_one_line_error(code, err, *needles)

    refused([str(tmp_path / "nope"), "-o", out], "is not a directory", "diffaccel optimize")
    refused([art, "--seeds", "0,x", "-o", out], "bad --seeds", "e.g.")
    refused([art, "--steps", "0", "-o", out], "bad step count 0", ">= 1")
    refused([art, "--steps", "", "-o", out], "bad --steps")
    refused([art, "--scheduler", "FooScheduler", "-o", out], "unknown scheduler 'FooScheduler'", "DDIMScheduler")
    refused([art, "--peers", "torch-int3", "-o", out], "unknown peer(s) torch-int3", "torch-bf16")
    refused([art, "--baseline", "random:sd15", "-o", out], "source hashes differ", "--allow-different-source")
    refused(["-o", out], "nothing to compare", "--baseline")
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    refused([art, "--adherence", "--prompts", str(tmp_path / "p.txt"), "-o", out],
            "--adherence needs tinyshapes captions")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused([art, "-o", str(tmp_path / "mine")], "exists and is not a diffaccel report")
    assert not (tmp_path / "r").exists()


def test_cli_run_and_render_only(capsys, tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na red circle\n")
    out = tmp_path / "report"
    code, stdout, _ = run_cli(capsys, "eval", "--baseline", "random:tiny", "--prompts", tmp_path / "p.txt", "--steps",
                              "2", "--seeds", "3", "--batch-sizes", "1", "--repeat", "1", "-o", out)
    assert code == 0 and "torch-fp32 (baseline)" in stdout and f"report: {out / 'report.html'}" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["seeds"] == [3]
    from diffaccel.eval.metrics.images import NOT_COMPUTED   # no local weights given: each column says why and what to pass

    assert report["metrics"] == {**report["metrics"], **NOT_COMPUTED}
    assert "not computed (pass --lpips PATH" in (out / "report.md").read_text()
    (out / "report.html").unlink()
    code, stdout, _ = run_cli(capsys, "eval", "--render-only", "-o", out)
    assert code == 0 and (out / "report.html").is_file() and "rebuilt from" in stdout


# ---- microbench: side by side, both exporters --------------------------------------------------------------------
@pytest.mark.slow
def test_microbench_times_variants_side_by_side(tmp_path, monkeypatch):
    import diffaccel.engines
    from diffaccel.eval.harness.microbench import StepBenchConfig, format_table, run_step_bench
    from diffaccel.optimize.artifact.errors import DiffaccelError

    loaded, real_load = [], diffaccel.engines.load_engine
    monkeypatch.setattr(diffaccel.engines, "load_engine", lambda *a, **k: loaded.append(real_load(*a, **k)) or
                        loaded[-1])

    cfg = StepBenchConfig(src="random:tiny", variants=("torch/fp32", "onnxruntime/fp32",
                                                       "onnxruntime/fp32@torchscript"),
                          height=64, width=64, warmup=1, repeat=2, work=str(tmp_path), threads=1,
                          isolation="interleaved")
    result = run_step_bench(cfg)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == list(cfg.variants) and rows["torch/fp32"]["speedup_vs_first"] == 1.0
    assert all(len(r["samples"]) == 2 and r["stats"]["p50"] > 0 for r in rows.values())
    assert rows["onnxruntime/fp32"]["exporter"] == "dynamo"
    assert rows["onnxruntime/fp32@torchscript"]["exporter"] == "torchscript"
    assert rows["onnxruntime/fp32"]["graph_nodes"] > 0 and rows["onnxruntime/fp32@torchscript"]["graph_nodes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random_tiny-unet-onnxruntime-fp32",
                                                          "random_tiny-unet-onnxruntime-fp32-torchscript"]
    # ORT threads must not spin between interleaved rounds (they would slow the variant timed next)
    assert len(loaded) == 2 and all(e.session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0" for e in loaded)
    table = format_table(result)
    assert "onnxruntime/fp32@torchscript" in table and str(rows["onnxruntime/fp32"]["graph_nodes"]) in table
    with pytest.raises(DiffaccelError, match="backend/precision"):
        run_step_bench(StepBenchConfig(src="random:tiny", variants=("onnxruntime/fp32@",), work=str(tmp_path)))


def test_microbench_int8_builds_take_the_calibration_size(tmp_path):
    """SDXL-size int8 builds need a smaller calibration than optimize's default: --calib-size/--calib-steps reach the
    build's quantize stage (and the default build stays optimize's own)."""
    from diffaccel.eval.harness.microbench import StepBenchConfig, run_step_bench
    from diffaccel.optimize.artifact.manifest import Manifest

    cfg = StepBenchConfig(src="random:tiny", variants=("onnxruntime/int8",), height=64, width=64, warmup=0, repeat=1,
                          work=str(tmp_path), threads=1, isolation="interleaved", calib_size=1, calib_steps=2)
    run_step_bench(cfg)
    quant = Manifest.load(tmp_path / "random_tiny-unet-onnxruntime-int8").stages["quantize"]["config"]["quant"]
    assert (quant["calib_size"], quant["calib_steps"]) == (1, 2)
    with pytest.raises(ValueError, match="calib"):
        StepBenchConfig(calib_steps=0)
