"""Builds for guidance <= 1 (``optimize --guidance off``: SDXL-Turbo, LCM-LoRA, any checkpoint deployed without
classifier-free guidance): the U-Net's batch range is not doubled, the setting is in the manifest and in the export's
key, int8 calibrates at that guidance, and the drop-in pipelines refuse, before any work, a call the engines cannot
serve. On the tiny built-ins (random:tiny, random:tiny-xl)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from diffaccel.optimize.artifact.errors import PipelineArgumentError, ShapeError
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.artifact.specs import ComponentSpec

from .helpers import FAST, assert_one_line_error, build_over, psnr, run_cli

TXT2IMG = dict(components=("text_encoder", "unet", "vae_decoder"), **FAST)


def unet_batch(out) -> tuple:
    m = Manifest.load(out)
    axis = ComponentSpec.from_dict("unet", m.components["unet"]["spec"]).axes["batch"]
    return axis.min, axis.max


def test_guidance_config_follows_the_build_and_refuses_a_mismatch():
    from diffaccel.optimize import OptimizeConfig
    from diffaccel.optimize.config import QuantConfig

    assert OptimizeConfig().resolved(7.5).quant.guidance_scale == 7.5   # an SD source: int8 builds keep their keys
    off = OptimizeConfig(guidance="off")
    assert (off.guidance, off.quant.guidance_scale, off.classifier_free) == (0.0, 0.0, False)
    assert OptimizeConfig(guidance=1).classifier_free is False and OptimizeConfig(guidance=1.5).classifier_free
    assert OptimizeConfig(guidance=5, quant=QuantConfig(guidance_scale=0)).quant.guidance_scale == 0
    with pytest.raises(ValueError, match="calibration guidance 7.5 runs classifier-free guidance"):
        OptimizeConfig(guidance=0, quant=QuantConfig(guidance_scale=7.5))
    for bad in ("-1", "nan", "strong"):
        with pytest.raises(ValueError, match="give a scale >= 0"):
            OptimizeConfig(guidance=bad)


def test_bad_guidance_is_one_line_before_any_work(capsys, tmp_path):
    code, _, err = run_cli(capsys, "optimize", "random:tiny", "-o", tmp_path / "x", "--guidance", "lots")
    assert_one_line_error(code, err, "bad guidance 'lots'", "off")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def off(tiny_ort_ts, tmp_path_factory):
    """random:tiny built for guidance 0 over the session's CFG artifact: the export and the engines run again."""
    from diffaccel.optimize import OptimizeConfig

    out = tmp_path_factory.mktemp("guidance") / "tiny-off"
    build_over(tiny_ort_ts, out, OptimizeConfig(guidance=0, **TXT2IMG), must_run=("export", "engine"))
    return out


def test_guidance_off_build_has_an_undoubled_unet_and_matches_diffusers(off, tiny_ort_ts, tiny_pipe):
    from diffaccel.engines import AcceleratedStableDiffusionPipeline

    m = Manifest.load(off)
    assert m["optimize_config"]["guidance"] == 0 and m["shapes"]["batch"] == [1, 4]
    assert unet_batch(off) == (1, 4) and unet_batch(tiny_ort_ts) == (1, 8)     # not doubled / doubled
    acc = AcceleratedStableDiffusionPipeline.from_pretrained(off, spin=False)
    acc.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=0.0, output_type="np")
    a = tiny_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    b = acc(**kw, generator=torch.Generator().manual_seed(0)).images
    assert psnr(a, b) >= 40, psnr(a, b)


def test_drop_in_refuses_guidance_and_batches_the_engines_cannot_serve_before_any_work(off, monkeypatch):
    from diffaccel.engines import AcceleratedStableDiffusionImg2ImgPipeline, AcceleratedStableDiffusionPipeline

    acc = AcceleratedStableDiffusionPipeline.from_pretrained(off, spin=False)
    calls = []
    monkeypatch.setattr(acc.text_encoder, "engine", lambda **x: calls.append(x))   # any work would show here
    with pytest.raises(PipelineArgumentError, match=r"guidance_scale=7.5 needs classifier-free guidance.*"
                                                    r"--guidance 0\).*guidance_scale <= 1"):
        acc("a red circle", num_inference_steps=2)                                  # diffusers' default: 7.5
    with pytest.raises(PipelineArgumentError, match="guidance_scale=2"):
        acc("a red circle", num_inference_steps=2, guidance_scale=2.0)
    vae = acc.vae.spec
    monkeypatch.setattr(acc.vae, "spec", dataclasses.replace(vae, axes={**vae.axes, "batch": dataclasses.replace(
        vae.axes["batch"], min=2, opt=2)}))                                             # as if built with --batch 2-4
    with pytest.raises(ShapeError, match="1 image.s. per call cannot be served.*start at batch 2"):
        acc("a red circle", num_inference_steps=2, guidance_scale=0.0)
    assert calls == []
    img2img = AcceleratedStableDiffusionImg2ImgPipeline(**acc.components)
    img2img.manifest = acc.manifest
    with pytest.raises(PipelineArgumentError, match="guidance_scale=7.5"):
        img2img("a red circle", image=torch.rand(1, 3, 64, 64), num_inference_steps=2)
    assert calls == []


def test_rebuild_with_the_other_guidance_reruns_the_export_and_scales_above_one_share_it(off, tmp_path):
    from diffaccel.optimize import OptimizeConfig

    m = build_over(off, tmp_path / "cfg", OptimizeConfig(guidance=7.5, **TXT2IMG), must_run=("export", "engine"))
    assert unet_batch(tmp_path / "cfg") == (1, 8) and m["optimize_config"]["guidance"] == 7.5
    build_over(tmp_path / "cfg", tmp_path / "cfg5", OptimizeConfig(guidance=5, **TXT2IMG), must_run=())
    stages = Manifest.load(tmp_path / "cfg5").stages
    assert stages["export"]["key"] == m.stages["export"]["key"]      # fp32 engines are the same for any guidance > 1


def test_sdxl_drop_in_refuses_guidance_on_a_guidance_off_build(artifacts, monkeypatch):
    """The SDXL pipelines run the same check (their artifact built for guidance 0: patched, not rebuilt)."""
    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline

    out = artifacts("random:tiny-xl", "onnxruntime", **FAST)
    acc = AcceleratedStableDiffusionXLPipeline.from_pretrained(out, spin=False)
    monkeypatch.setitem(acc.manifest.data["optimize_config"], "guidance", 0.0)   # in memory; the files stay
    calls = []
    monkeypatch.setattr(acc.text_encoder, "engine", lambda **x: calls.append(x))
    with pytest.raises(PipelineArgumentError, match="guidance_scale=5 needs classifier-free guidance"):
        acc("a red circle", num_inference_steps=2)                                  # SDXL's default: 5.0
    assert calls == []


def test_sdxl_int8_guidance_off_calibrates_one_half_at_turbo_steps(capsys, tmp_path):
    """``--guidance off --calib-steps 2``: the U-Net (text_embeds, time_ids included) is calibrated at guidance 0,
    batch 1 per sample (no unconditional half), at the deployment's step count; the manifest says so."""
    out = tmp_path / "xl-int8-off"
    code, stdout, err = run_cli(capsys, "optimize", "random:tiny-xl", "-o", out, "--precision", "int8",
                                "--components", "unet", "--guidance", "off", "--calib-size", "2", "--calib-steps",
                                "2", "--exporter", "torchscript", "--batch", "1-2")
    assert code == 0, err
    m = Manifest.load(out)
    assert m["optimize_config"]["guidance"] == 0 and m.stages["quantize"]["config"]["quant"]["guidance_scale"] == 0
    assert unet_batch(out) == (1, 2)
    kept = torch.load(out / "unet" / "quantized" / "validation_inputs.pt", weights_only=True)
    assert all(s["sample"].shape[0] == 1 and {"text_embeds", "time_ids"} <= set(s) for s in kept)
    assert m.components["unet"]["validation"]["passed"]
    code, stdout, _ = run_cli(capsys, "info", out)
    assert "guidance   0: built for guidance <= 1 only" in stdout
    assert json.loads((out / "manifest.json").read_text())["optimize_config"]["quant"]["guidance_scale"] == 0
    assert np.isfinite(kept[0]["sample"].numpy()).all()
