"""Every measuring tool takes SDXL artifacts: ``diffaccel eval`` (baseline = diffusers' StableDiffusionXLPipeline, the
watermark off in both), ``diffaccel bench`` and ``diffaccel microbench`` (the U-Net's text_embeds/time_ids inputs),
on random:tiny-xl. ``demo`` is ``optimize`` then ``evaluate``: the same code paths."""
import json

import pytest

from .helpers import FAST, run_cli

SDXL = "random:tiny-xl"


@pytest.fixture(scope="module")
def xl_ort(artifacts):
    return artifacts(SDXL, "onnxruntime", **FAST)      # the same session artifact as test_sdxl's


def test_eval_of_an_sdxl_artifact_against_diffusers_sdxl_pipeline(xl_ort, capsys, tmp_path, monkeypatch):
    from diffaccel.eval.harness import runner

    watermarks, real = [], runner.generate
    monkeypatch.setattr(runner, "generate", lambda pipe, *a: watermarks.append(pipe.watermark) or real(pipe, *a))
    out = tmp_path / "report"
    (tmp_path / "p.txt").write_text("a red circle on the left\n")
    code, stdout, err = run_cli(capsys, "eval", xl_ort, "--prompts", tmp_path / "p.txt", "--steps", "3", "--seeds",
                                "0,1", "--batch-sizes", "1", "--repeat", "1", "--warmup", "0", "--guidance", "5",
                                "-o", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = {v["name"]: v for v in report["variants"]}
    assert rows["torch-fp32"]["pipeline"] == "StableDiffusionXLPipeline"
    assert rows["onnxruntime-fp32"]["pipeline"] == "AcceleratedStableDiffusionXLPipeline"
    assert set(watermarks) == {None}                            # no invisible watermark in either
    q = rows["onnxruntime-fp32"]["quality"]["aggregate"]
    print(f"tiny SDXL eval: fp32 engines vs diffusers {q['psnr']:.1f} dB (min {q['psnr_min']:.1f})")
    assert q["psnr"] > 40 and q["psnr_min"] > 40
    assert report["config"]["guidance_scale"] == 5 and report["baseline"]["source"]["spec"] == SDXL
    assert rows["onnxruntime-fp32"]["latency"]["breakdown"]["text_encoder"] > 0


def test_bench_runs_an_sdxl_artifact(xl_ort, capsys, tmp_path):
    out = tmp_path / "bench"
    code, _, err = run_cli(capsys, "bench", xl_ort, "-o", out, "--requests", "2", "--steps", "2", "--rate", "8x",
                           "--max-batch", "1", "--calib-repeats", "1")
    assert code == 0, err
    result = json.loads((out / "bench.json").read_text())
    served = [r for r in result["runs"][0]["requests"] if r["done"] is not None]
    assert len(served) == 2 and all(r["images_received"] == 1 for r in served)


def test_microbench_times_the_sdxl_unet_with_its_added_inputs(tmp_path):
    from diffaccel.eval.harness.microbench import StepBenchConfig, run_step_bench

    cfg = StepBenchConfig(src=SDXL, variants=("torch/fp32", "onnxruntime/fp32@torchscript"), height=64, width=64,
                          warmup=0, repeat=1, work=str(tmp_path), threads=1, isolation="interleaved")
    rows = {r["variant"]: r for r in run_step_bench(cfg)["rows"]}
    assert all(len(r["samples"]) == 1 for r in rows.values()), rows
