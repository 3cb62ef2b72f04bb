"""The SDXL family: detection and refusals from configs, the export contract (text_embeds and time_ids reach the
U-Net; the text encoders' penultimate hidden state), and the drop-in pipelines against diffusers' own on the same
tiny weights and seeds (random:tiny-xl: diffusers' SDXL test configuration, built in code, offline tokenizers)."""
import inspect
import json

import numpy as np
import pytest
import torch

from diffaccel.optimize.artifact.errors import DiffaccelError, PipelineArgumentError, ShapeError, SourceError
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.families import COMPONENTS, components_of, configs_of, detect, family
from diffaccel.optimize.sources import resolve_source

from .helpers import FAST, QUICK, psnr

SDXL = "random:tiny-xl"
PROMPTS = ["a red circle on the left", "a large blue square at the top"]


@pytest.fixture(scope="module")
def xl_pipe():
    from diffaccel.optimize.sources.builtins import BUILTINS

    pipe = BUILTINS[SDXL]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl_ort(artifacts):
    return artifacts(SDXL, "onnxruntime", **FAST)


@pytest.fixture()
def acc(xl_ort):
    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline

    pipe = AcceleratedStableDiffusionXLPipeline.from_pretrained(xl_ort, spin=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _configs(**unet):
    base = resolve_source(SDXL).configs()
    return {**base, "unet": {**base["unet"], **unet}}


# ---- detection ----------------------------------------------------------------------------------------------
def test_sdxl_is_detected_from_its_configs_before_and_after_loading(xl_pipe):
    assert detect(resolve_source(SDXL).configs(), SDXL).NAME == "sdxl"
    assert detect(configs_of(xl_pipe), SDXL).NAME == "sdxl"
    geo = family("sdxl").ModelGeometry.from_pipeline(xl_pipe)
    # 80 = 6 time ids x addition_time_embed_dim 8 + text_encoder_2's projection 32: derived, not assumed
    assert (geo.time_ids, geo.pooled_dim, geo.cross_attention_dim) == (6, 32, 64)


def test_real_sdxl_architecture_is_detected_and_sized_from_configs_alone():
    """random:sdxl is never built here (its U-Net is 10 GB): detection and weights come from the configs."""
    configs = resolve_source("random:sdxl").configs()
    fam = detect(configs, "random:sdxl")
    assert fam.NAME == "sdxl" and fam.time_id_count(configs["unet"], configs["text_encoder_2"]) == 6
    gb = {k: v / 1e9 for k, v in fam.weight_bytes(configs).items()}
    assert 10.0 < gb["unet"] < 10.5 and 2.7 < gb["text_encoder_2"] < 2.9 and 0.45 < gb["text_encoder"] < 0.55


@pytest.mark.parametrize("unet, needle", [
    ({"addition_embed_type": "image"}, "addition_embed_type=image"),                 # Kandinsky-style
    ({"projection_class_embeddings_input_dim": 64}, "4 time ids, a first text encoder"),   # 5 and 6 are served
    ({"projection_class_embeddings_input_dim": 84}, "not text_encoder_2's projection_dim"),
    ({"cross_attention_dim": 48}, "cross_attention_dim=48"),
    ({"in_channels": 5}, "in_channels=5"),                                          # 9: sdxl-inpaint
])
def test_other_conditioning_is_refused_naming_the_nearest_family_and_what_differs(unet, needle):
    with pytest.raises(SourceError, match=r"nearest family is .*\((sd|sdxl)\), which differs in: .*" + needle):
        detect(_configs(**unet), "x")


def test_lcm_unet_is_sdxl_with_a_timestep_cond_input_and_no_doubled_batch():
    from diffaccel.optimize.config import ShapeRange

    fam = detect(_configs(time_cond_proj_dim=256), "lcm")
    geo = family("sdxl").ModelGeometry(**{**dict(vocab_size=1000, vocab_size_2=1000, max_length=77, text_hidden=32,
                                                 text_hidden_2=32, pooled_dim=32, time_ids=6, latent_channels=4,
                                                 unet_in_channels=4, cross_attention_dim=64, vae_scale_factor=2,
                                                 latent_multiple=2, default_size=64, num_train_timesteps=1000),
                                          "guidance_doubles_batch": False, "timestep_cond_dim": 256})
    unet = fam.specs(geo, ShapeRange(batch=(1, 3)))["unet"]
    assert unet.inputs[-1].name == "timestep_cond" and unet.axes["batch"].max == 3


def test_sd_configs_stay_sd_and_text_time_without_text_encoder_2_is_refused():
    sd = resolve_source("random:tiny").configs()
    assert detect(sd, "tiny").NAME == "sd"
    assert "no text_encoder_2 (SDXL's second text encoder" in family("sdxl").mismatches(sd)[-1]
    xl = {k: v for k, v in resolve_source(SDXL).configs().items() if k != "text_encoder_2"}
    with pytest.raises(SourceError, match="differs in: addition_embed_type=text_time"):
        detect(xl, "x")


def test_components_follow_the_family():
    assert components_of(family("sdxl"), COMPONENTS) == ("text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                         "vae_encoder")
    assert components_of(family("sd"), COMPONENTS) == ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    with pytest.raises(SourceError, match="has no component text_encoder_2"):
        components_of(family("sd"), ("unet", "text_encoder_2"))


def test_folder_source_reads_text_encoder_2_and_tokenizer_2(xl_pipe, tmp_path):
    path = tmp_path / "xl"
    xl_pipe.save_pretrained(str(path), safe_serialization=True)
    src = resolve_source(str(path))
    configs = src.configs()
    assert configs["pipeline"] == "StableDiffusionXLPipeline" and configs["text_encoder_2"]["projection_dim"] == 32
    assert detect(configs, str(path)).NAME == "sdxl"
    loaded = src.load()
    assert type(loaded).__name__ == "StableDiffusionXLPipeline" and loaded.watermark is None
    cfg = path / "text_encoder_2" / "config.json"          # the second text encoder is part of the content hash
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "layer_norm_eps": 1e-6}))
    assert resolve_source(str(path)).sha256 != src.sha256
    for f in (path / "tokenizer_2").iterdir():
        f.unlink()
    with pytest.raises(SourceError, match="missing component folder.*tokenizer_2"):
        resolve_source(str(path))


# ---- the export contract ------------------------------------------------------------------------------------
def test_text_encoder_wrappers_return_the_penultimate_hidden_state(xl_pipe):
    fam = family("sdxl")
    ids = torch.randint(0, 400, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last, pooled, penult = fam.export_module("text_encoder", xl_pipe)(ids)
        ref = xl_pipe.text_encoder(ids, output_hidden_states=True)
        embeds, last2, penult2 = fam.export_module("text_encoder_2", xl_pipe)(ids)
        ref2 = xl_pipe.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(penult, ref.hidden_states[-2])
    torch.testing.assert_close(penult2, ref2.hidden_states[-2])
    torch.testing.assert_close(embeds, ref2.text_embeds)
    assert not torch.allclose(penult, last) and not torch.allclose(penult2, last2)


def test_unet_engine_takes_text_embeds_and_time_ids(xl_ort):
    """The exported U-Net's extra inputs are live: changing either changes the output (a graph that dropped them
    would pass parity on the rest)."""
    from diffaccel.engines.base import load_engine
    from diffaccel.optimize.artifact.specs import ComponentSpec

    m = Manifest.load(xl_ort)
    entry = m.components["unet"]
    spec = ComponentSpec.from_dict("unet", entry["spec"])
    assert [t.name for t in spec.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert spec.axes["batch"].max == 2 * m["shapes"]["batch"][1]       # guidance doubles the U-Net batch
    engine = load_engine("onnxruntime", xl_ort, "unet", entry)
    x = spec.random_inputs(torch.Generator().manual_seed(0), **spec.opt_values())
    base = engine(**x)["out_sample"]
    for name, change in (("time_ids", lambda t: t + 64), ("text_embeds", lambda t: -t)):
        other = engine(**{**x, name: change(x[name])})["out_sample"]
        assert (other - base).abs().max() > 1e-3, name
    assert m.components["text_encoder_2"]["validation"]["passed"]
    assert (xl_ort / "tokenizer_2" / "tokenizer_config.json").is_file()
    assert m["pipeline"]["family"] == "sdxl" and m["pipeline"]["force_zeros_for_empty_prompt"] is True


# ---- the drop-in pipelines against diffusers ----------------------------------------------------------------
def _scheduler(pipe, name):
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    cfg = pipe.scheduler.config
    return {"euler": lambda: EulerDiscreteScheduler.from_config(cfg),
            "euler-a-trailing": lambda: EulerAncestralDiscreteScheduler.from_config(cfg, timestep_spacing="trailing"),
            "dpm++": lambda: DPMSolverMultistepScheduler.from_config(cfg)}[name]()


@pytest.mark.parametrize("scheduler", ["euler", "euler-a-trailing", "dpm++"])
@pytest.mark.parametrize("batch, size", [(1, 64), (2, 48)])
def test_fp32_images_match_diffusers(xl_pipe, acc, scheduler, batch, size):
    ref_sched = xl_pipe.scheduler
    xl_pipe.scheduler, acc.scheduler = _scheduler(xl_pipe, scheduler), _scheduler(acc, scheduler)
    kw = dict(prompt=PROMPTS[:batch], num_inference_steps=4, guidance_scale=5.0, height=size, width=size,
              output_type="np")
    try:
        ref = xl_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    finally:
        xl_pipe.scheduler = ref_sched
    got = acc(**kw, generator=torch.Generator().manual_seed(0)).images
    assert got.shape == (batch, size, size, 3)
    assert psnr(ref, got) >= 40, (scheduler, batch, size, psnr(ref, got))


def test_guidance_one_negative_prompt_and_time_ids_as_diffusers(xl_pipe, acc):
    """guidance <= 1 (one U-Net half), a negative prompt (force_zeros_for_empty_prompt's other branch) and
    non-default size conditioning all run as in diffusers, and each changes the image (the test can fail)."""
    runs = {"plain": dict(guidance_scale=5.0), "no-cfg": dict(guidance_scale=1.0),
            "negative": dict(guidance_scale=5.0, negative_prompt="a green star"),
            "sizes": dict(guidance_scale=5.0, original_size=(256, 256), crops_coords_top_left=(16, 0))}
    images = {}
    for name, extra in runs.items():
        kw = dict(prompt=PROMPTS[0], num_inference_steps=2, height=64, width=64, output_type="np", **extra)
        ref = xl_pipe(**kw, generator=torch.Generator().manual_seed(1)).images
        images[name] = acc(**kw, generator=torch.Generator().manual_seed(1)).images
        assert psnr(ref, images[name]) >= 40, name
    for name in ("no-cfg", "negative", "sizes"):
        assert np.abs(images[name] - images["plain"]).max() > 1e-3, name


def test_img2img_matches_diffusers(xl_pipe, xl_ort):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from diffaccel.engines import AcceleratedStableDiffusionXLImg2ImgPipeline

    ref = StableDiffusionXLImg2ImgPipeline(**xl_pipe.components)
    ref.set_progress_bar_config(disable=True)
    acc = AcceleratedStableDiffusionXLImg2ImgPipeline.from_pretrained(xl_ort, spin=False)
    acc.set_progress_bar_config(disable=True)
    assert inspect.signature(acc.__call__) == inspect.signature(ref.__call__)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt=PROMPTS[1], image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
              output_type="np")
    a = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    b = acc(**kw, generator=torch.Generator().manual_seed(0)).images
    assert psnr(a, b) >= 40, psnr(a, b)


def test_signature_watermark_and_refusals_before_any_work(xl_pipe, acc, xl_ort, monkeypatch):
    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline

    assert inspect.signature(acc.__call__) == inspect.signature(xl_pipe.__call__)
    assert acc.watermark is None and acc.config.force_zeros_for_empty_prompt is True
    assert acc.unet.add_embedding.linear_1.in_features == 80
    calls = []
    monkeypatch.setattr(acc.text_encoder, "engine", lambda **x: calls.append(x))   # any work would show here
    with pytest.raises(ShapeError, match="height=200"):
        acc("a red circle", height=200, width=64)
    with pytest.raises(PipelineArgumentError, match="clip_skip"):
        acc("a red circle", clip_skip=1)
    with pytest.raises(PipelineArgumentError, match="LoRA"):
        acc("a red circle", cross_attention_kwargs={"scale": 0.5})
    assert calls == []
    with pytest.raises(PipelineArgumentError, match="never watermark"):
        AcceleratedStableDiffusionXLPipeline.from_pretrained(xl_ort, add_watermarker=True)
    off = AcceleratedStableDiffusionXLPipeline.from_pretrained(xl_ort, force_zeros_for_empty_prompt=False)
    assert off.config.force_zeros_for_empty_prompt is False


def test_text_encoder_shim_refuses_other_hidden_layers(acc):
    out = acc.text_encoder(torch.zeros(1, 77, dtype=torch.int64), output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 77, 32)
    with pytest.raises(DiffaccelError, match="clip_skip"):
        out.hidden_states[-3]


# ---- int8 ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_int8_build_calibrates_on_the_extra_unet_inputs(artifacts, xl_pipe):
    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline
    from diffaccel.optimize.config import QuantConfig

    out = artifacts(SDXL, "onnxruntime", "int8", quant=QuantConfig(**QUICK), **FAST)
    m = Manifest.load(out)
    assert set(m.components) == set(family("sdxl").COMPONENTS)
    kept = torch.load(out / "unet" / "quantized" / "validation_inputs.pt", weights_only=True)
    assert {"text_embeds", "time_ids"} <= set(kept[0])
    assert kept[0]["time_ids"][0].tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]   # captured from real sampling
    pipe = AcceleratedStableDiffusionXLPipeline.from_pretrained(out, spin=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPTS[0], num_inference_steps=3, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_artifacts_name_their_drop_in_class(xl_ort):
    from diffaccel.engines.pipelines import pipeline_class

    assert pipeline_class(xl_ort).__name__ == "AcceleratedStableDiffusionXLPipeline"
    assert pipeline_class(xl_ort, "image-to-image").__name__ == "AcceleratedStableDiffusionXLImg2ImgPipeline"
    assert family("sd").DROP_INS[0].endswith(":AcceleratedStableDiffusionPipeline")
    with pytest.raises(ValueError, match="unknown task 'inpaint'"):
        pipeline_class(xl_ort, "inpaint")


# ---- LCM-distilled U-Nets -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sdxl", "sd"])
def lcm(request, tmp_path_factory):
    """diffusers' tiny SDXL test configuration (and random:tiny) with time_cond_proj_dim=256 (diffusers' LCM
    tests), as a folder, and its fp32 ONNX Runtime artifact."""
    from diffusers import LCMScheduler

    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.sources.builtins import RECIPES, _assemble, _assemble_xl

    if request.param == "sdxl":
        r = RECIPES[SDXL]
        pipe = _assemble_xl({**r["unet"], "time_cond_proj_dim": 256}, r["vae"], r["text"], r["text_2"],
                            r["scheduler"], seed=7)
    else:
        r = RECIPES["random:tiny"]
        pipe = _assemble({**r["unet"], "time_cond_proj_dim": 256}, r["vae"], r["text"], r["scheduler"], seed=7)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    root = tmp_path_factory.mktemp("lcm")
    pipe.save_pretrained(str(root / "src"), safe_serialization=True)
    optimize(str(root / "src"), root / "out", OptimizeConfig(**FAST))
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "out"


@pytest.mark.slow
def test_lcm_unet_exports_timestep_cond_and_matches_diffusers(lcm):
    from diffaccel.engines.base import load_engine
    from diffaccel.engines.pipelines import pipeline_class
    from diffaccel.optimize.artifact.specs import ComponentSpec

    ref, out = lcm
    m = Manifest.load(out)
    entry = m.components["unet"]
    spec = ComponentSpec.from_dict("unet", entry["spec"])
    assert spec.inputs[-1].name == "timestep_cond" and spec.inputs[-1].dims == ("batch", 256)
    assert spec.axes["batch"].max == m["shapes"]["batch"][1]            # no classifier-free guidance: not doubled
    engine = load_engine("onnxruntime", out, "unet", entry)
    x = spec.random_inputs(torch.Generator().manual_seed(0), **spec.opt_values())
    base = engine(**x)["out_sample"]
    assert (engine(**{**x, "timestep_cond": x["timestep_cond"] * 3})["out_sample"] - base).abs().max() > 1e-3
    acc = pipeline_class(out).from_pretrained(out, spin=False)
    acc.set_progress_bar_config(disable=True)
    assert type(acc.scheduler).__name__ == "LCMScheduler"              # the checkpoint's own scheduler
    images = {}
    for steps, guidance in ((1, 8.0), (4, 8.0), (4, 2.0)):
        kw = dict(prompt=PROMPTS[:2], num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                  output_type="np")
        a = ref(**kw, generator=torch.Generator().manual_seed(0)).images
        images[steps, guidance] = b = acc(**kw, generator=torch.Generator().manual_seed(0)).images
        assert psnr(a, b) >= 40, (steps, guidance, psnr(a, b))
    assert np.abs(images[4, 8.0] - images[4, 2.0]).max() > 1e-3        # the guidance embedding reaches the U-Net


# ---- the refiner --------------------------------------------------------------------------------------------
def _refiner():
    """diffusers' tiny SDXL img2img test configuration without the first text encoder and with aesthetic scores:
    5 time ids x 8 + 32 = 72 inputs to the added embedding, cross-attention 32 (text_encoder_2 alone)."""
    from diffaccel.optimize.sources.builtins import RECIPES, _assemble_xl

    r = RECIPES[SDXL]
    unet = {**r["unet"], "projection_class_embeddings_input_dim": 72, "cross_attention_dim": 32}
    pipe = _assemble_xl(unet, r["vae"], None, r["text_2"], r["scheduler"], seed=11)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_refiner_is_its_own_family_from_configs(tmp_path):
    pipe = _refiner()
    assert detect(configs_of(pipe), "refiner").NAME == "sdxl-refiner"
    pipe.save_pretrained(str(tmp_path / "r"), safe_serialization=True)
    src = resolve_source(str(tmp_path / "r"))                     # no text_encoder/ or tokenizer/ folder needed
    configs = src.configs()
    assert "text_encoder" not in configs and configs["requires_aesthetics_score"] is True
    assert detect(configs, "refiner").NAME == "sdxl-refiner"
    # requires_aesthetics_score is the pipeline's setting (diffusers builds either way), not what makes the refiner
    assert detect({**configs, "requires_aesthetics_score": False}, "x").NAME == "sdxl-refiner"
    with pytest.raises(SourceError, match=r"differs in: 6 time ids, no first text encoder \(base SDXL has two"):
        detect({**configs, "unet": {**configs["unet"], "projection_class_embeddings_input_dim": 80}}, "x")


@pytest.mark.slow
def test_refiner_img2img_matches_diffusers(tmp_path):
    from diffaccel.engines import AcceleratedStableDiffusionXLImg2ImgPipeline, AcceleratedStableDiffusionXLPipeline
    from diffaccel.engines.pipelines import pipeline_class
    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.config import QuantConfig

    ref = _refiner()
    ref.save_pretrained(str(tmp_path / "src"), safe_serialization=True)
    m = optimize(str(tmp_path / "src"), tmp_path / "out", OptimizeConfig(**FAST))
    assert set(m.components) == {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert [t["name"] for t in m.components["unet"]["spec"]["inputs"]][-1] == "time_ids"
    assert m.components["unet"]["spec"]["inputs"][-1]["dims"] == ["batch", 5]
    assert pipeline_class(tmp_path / "out", "image-to-image") is AcceleratedStableDiffusionXLImg2ImgPipeline
    with pytest.raises(ValueError, match="serves image-to-image, inpainting only, not text-to-image"):
        pipeline_class(tmp_path / "out")
    with pytest.raises(DiffaccelError, match="refiner"):
        AcceleratedStableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    acc = AcceleratedStableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "out", spin=False)
    acc.set_progress_bar_config(disable=True)
    assert acc.text_encoder is None and acc.config.requires_aesthetics_score is True
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    for score in (6.0, 2.5):
        kw = dict(prompt=PROMPTS, image=image, strength=0.5, num_inference_steps=6, guidance_scale=5.0,
                  aesthetic_score=score, output_type="np")
        a = ref(**kw, generator=torch.Generator().manual_seed(0)).images
        b = acc(**kw, generator=torch.Generator().manual_seed(0)).images
        assert psnr(a, b) >= 40, (score, psnr(a, b))
    m8 = optimize(str(tmp_path / "src"), tmp_path / "int8", OptimizeConfig(precision="int8", components=("unet",),
                                                                          quant=QuantConfig(**QUICK), **FAST))
    kept = torch.load(tmp_path / "int8" / "unet" / "quantized" / "validation_inputs.pt", weights_only=True)
    assert kept[0]["time_ids"].shape[1] == 5 and m8.components["unet"]["validation"]["passed"]


def test_random_sdxl_build_is_sized_before_loading(tmp_path):
    """The pre-flight memory check sizes an SDXL build from its configs (five components, the 10 GB U-Net the
    largest) and refuses in one line before any weights exist."""
    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.artifact.errors import MemoryBudgetError

    with pytest.raises(MemoryBudgetError, match=r"largest component 10\.3 GB in fp32\) but --memory-limit gives 4\.0"):
        optimize("random:sdxl", tmp_path / "out", OptimizeConfig(memory_limit=4 * 10**9))
    assert not (tmp_path / "out").exists()


# ---- inpainting (SD and SDXL U-Nets with 9 input channels) --------------------------------------------------
def _inpainting(xl: bool):
    """random:tiny / random:tiny-xl with 9-channel U-Nets, as diffusers' inpainting pipelines."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    from diffaccel.optimize.sources.builtins import RECIPES, _assemble, _assemble_xl

    if xl:
        r = RECIPES[SDXL]
        base = _assemble_xl({**r["unet"], "in_channels": 9}, r["vae"], r["text"], r["text_2"], r["scheduler"], seed=3)
        pipe = StableDiffusionXLInpaintPipeline(**base.components, add_watermarker=False)
    else:
        r = RECIPES["random:tiny"]
        base = _assemble({**r["unet"], "in_channels": 9}, r["vae"], r["text"], r["scheduler"], seed=3)
        pipe = StableDiffusionInpaintPipeline(**base.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("xl", [False, True])
def test_inpainting_is_detected_and_calibration_captures_nine_channels(xl):
    pipe = _inpainting(xl)
    fam = detect(configs_of(pipe), "inpaint")
    assert fam.NAME == ("sdxl-inpaint" if xl else "sd-inpaint")
    size = 64
    samples = fam.capture_denoiser_inputs(pipe, ["a red circle"], steps=2, guidance_scale=5.0, seed=0, height=size,
                                      width=size)
    assert len(samples) == 2 and samples[0]["sample"].shape[1] == 9
    assert ("time_ids" in samples[0]) == xl


@pytest.mark.slow
@pytest.mark.parametrize("xl", [False, True])
def test_inpainting_matches_diffusers(xl, tmp_path):
    from diffaccel.engines import AcceleratedStableDiffusionInpaintPipeline, AcceleratedStableDiffusionXLInpaintPipeline
    from diffaccel.engines.pipelines import pipeline_class
    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.families.sd import inpainting_inputs

    ref = _inpainting(xl)
    ref.save_pretrained(str(tmp_path / "src"), safe_serialization=True)
    m = optimize(str(tmp_path / "src"), tmp_path / "out", OptimizeConfig(**FAST))
    assert m.components["unet"]["spec"]["inputs"][0]["dims"][1] == 9
    cls = AcceleratedStableDiffusionXLInpaintPipeline if xl else AcceleratedStableDiffusionInpaintPipeline
    assert pipeline_class(tmp_path / "out", "inpainting") is cls
    with pytest.raises(ValueError, match="serves inpainting only"):
        pipeline_class(tmp_path / "out", "image-to-image")
    from diffaccel.engines import AcceleratedStableDiffusionPipeline, AcceleratedStableDiffusionXLPipeline

    text2img = AcceleratedStableDiffusionXLPipeline if xl else AcceleratedStableDiffusionPipeline
    with pytest.raises(DiffaccelError, match="cannot run; load it with " + cls.__name__):   # before any engine loads
        text2img.from_pretrained(tmp_path / "out")
    acc = cls.from_pretrained(tmp_path / "out", spin=False)
    acc.set_progress_bar_config(disable=True)
    assert inspect.signature(acc.__call__) == inspect.signature(ref.__call__)
    size = 64
    for batch, strength in ((1, 1.0), (2, 0.7)):
        kw = dict(prompt=PROMPTS[:batch], **{**inpainting_inputs(size, size, 4), "strength": strength}, height=size,
                  width=size, num_inference_steps=4, guidance_scale=5.0, output_type="np")
        a = ref(**kw, generator=torch.Generator().manual_seed(0)).images
        b = acc(**kw, generator=torch.Generator().manual_seed(0)).images
        assert psnr(a, b) >= 40, (xl, batch, psnr(a, b))


def test_tensorrt_profiles_and_cache_key_cover_the_extra_inputs():
    """TensorRT's optimization profile comes from the spec: the extra U-Net inputs get min/opt/max shapes, and the
    CFG-doubled batch range (vs an LCM U-Net's) changes the profile, hence the engine cache key."""
    from diffaccel.engines.backends.tensorrt_env import TrtEnvironment, engine_cache_key
    from diffaccel.optimize.config import ShapeRange
    from diffaccel.optimize.stages.tensorrt_build import trt_profile

    geo = dict(vocab_size=49408, vocab_size_2=49408, max_length=77, text_hidden=768, text_hidden_2=1280,
               pooled_dim=1280, time_ids=6, latent_channels=4, unet_in_channels=4, cross_attention_dim=2048,
               vae_scale_factor=8, latent_multiple=4, default_size=1024, num_train_timesteps=1000)
    fam = family("sdxl")
    shapes = ShapeRange.parse(batch="1-2", height="768-1024", width="1024")
    cfg = fam.specs(fam.ModelGeometry(**geo), shapes)["unet"]
    prof = trt_profile(cfg)
    assert prof["time_ids"] == ((1, 6), (2, 6), (4, 6)) and prof["text_embeds"] == ((1, 1280), (2, 1280), (4, 1280))
    assert prof["encoder_hidden_states"][2] == (4, 77, 2048) and prof["sample"][0] == (1, 4, 96, 128)
    assert trt_profile(cfg, static=True)["time_ids"] == ((2, 6),) * 3
    lcm = fam.specs(fam.ModelGeometry(**geo, guidance_doubles_batch=False, timestep_cond_dim=256), shapes)["unet"]
    assert trt_profile(lcm)["timestep_cond"] == ((1, 256), (1, 256), (2, 256))
    env = TrtEnvironment(tensorrt="10.13.0.35", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    assert engine_cache_key("ab" * 32, "unet", "fp16", None, cfg.profile(), env) != \
        engine_cache_key("ab" * 32, "unet", "fp16", None, lcm.profile(), env)
