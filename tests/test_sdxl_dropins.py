"""What diffusers' own SD/SDXL fast suites (tests/diffusers_suites, slow tier) found the drop-ins lacking, each kept
fast here on the tiny built-ins: a regular U-Net inpaints (diffusers' "base model as inpainter"), base SDXL's layout
with aesthetic scores (5 time ids and both text encoders) builds and refines, a pipeline made without a U-Net encodes
prompts, from_pretrained logs where diffusers logs, the stand-ins answer set_default_attn_processor, FreeU is
refused in one line, and a refiner without requires_aesthetics_score is still the refiner."""
import logging

import pytest
import torch

from diffaccel.optimize.artifact.errors import PipelineArgumentError
from diffaccel.optimize.families import configs_of, detect, family
from diffaccel.optimize.families.common import inpainting_inputs

from .helpers import FAST, psnr

SDXL = "random:tiny-xl"
PROMPTS = ["a red circle on the left", "a large blue square at the top"]


@pytest.fixture(scope="module")
def xl_ort(artifacts):
    return artifacts(SDXL, "onnxruntime", **FAST)


def _reference(name: str):
    from diffaccel.optimize.sources.builtins import BUILTINS

    pipe = BUILTINS[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("xl", [False, True])
def test_a_regular_unet_inpaints_as_diffusers_base_model_as_inpainter(xl, artifacts):
    """An SD or SDXL artifact with a 4-channel U-Net serves inpainting (diffusers blends the mask in at each step),
    from pipeline_class and from_pretrained alike, with diffusers' images."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    from diffaccel.engines import AcceleratedStableDiffusionInpaintPipeline, AcceleratedStableDiffusionXLInpaintPipeline
    from diffaccel.engines.pipelines import pipeline_class

    out = artifacts(SDXL if xl else "random:tiny", "onnxruntime", **FAST)
    cls = AcceleratedStableDiffusionXLInpaintPipeline if xl else AcceleratedStableDiffusionInpaintPipeline
    assert pipeline_class(out, "inpainting") is cls
    acc = cls.from_pretrained(out, spin=False)
    acc.set_progress_bar_config(disable=True)
    ref = (StableDiffusionXLInpaintPipeline if xl else StableDiffusionInpaintPipeline)(
        **_reference(SDXL if xl else "random:tiny").components)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS[:1], **{**inpainting_inputs(64, 64, 4), "strength": 0.7}, height=64, width=64,
              num_inference_steps=3, guidance_scale=5.0, output_type="np")
    a = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    b = acc(**kw, generator=torch.Generator().manual_seed(0)).images
    assert psnr(a, b) >= 40, psnr(a, b)


def _aesthetic_base():
    """tiny-xl with 5 time ids x 8 + 32 = 72 added-embedding inputs and both text encoders, as diffusers' SDXL
    img2img test has it, in StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from diffaccel.optimize.sources.builtins import RECIPES, _assemble_xl

    r = RECIPES[SDXL]
    base = _assemble_xl({**r["unet"], "projection_class_embeddings_input_dim": 72}, r["vae"], r["text"],
                        r["text_2"], r["scheduler"], seed=5)
    pipe = StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_base_layout_with_aesthetic_scores_builds_and_refines_as_diffusers(tmp_path):
    from diffaccel.engines import AcceleratedStableDiffusionXLImg2ImgPipeline
    from diffaccel.optimize import OptimizeConfig, optimize

    ref = _aesthetic_base()
    assert detect(configs_of(ref), "x").NAME == "sdxl"
    ref.save_pretrained(str(tmp_path / "src"))
    m = optimize(str(tmp_path / "src"), tmp_path / "out", OptimizeConfig(**FAST))
    assert "text_encoder" in m.components and m.components["unet"]["spec"]["inputs"][4]["dims"] == ["batch", 5]
    assert m["pipeline"]["requires_aesthetics_score"] is True       # loaded as StableDiffusionXLPipeline: no such
    acc = AcceleratedStableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "out", spin=False)  # setting
    acc.set_progress_bar_config(disable=True)
    assert acc.config.requires_aesthetics_score is True
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt=PROMPTS[:1], image=image, strength=0.6, num_inference_steps=4, guidance_scale=5.0,
              aesthetic_score=3.0, output_type="np")
    a = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    b = acc(**kw, generator=torch.Generator().manual_seed(0)).images
    assert psnr(a, b) >= 40, psnr(a, b)


def test_the_refiner_is_the_refiner_without_requires_aesthetics_score_and_inpaints():
    """requires_aesthetics_score is the pipeline's setting, not the model's layout (diffusers builds either; its
    call names the setting when the U-Net wants the other): 5 time ids without a first text encoder is the refiner
    either way, and its 4-channel U-Net also inpaints."""
    from diffaccel.optimize.sources.builtins import RECIPES, _assemble_xl

    r = RECIPES[SDXL]
    unet = {**r["unet"], "projection_class_embeddings_input_dim": 72, "cross_attention_dim": 32}
    configs = configs_of(_assemble_xl(unet, r["vae"], None, r["text_2"], r["scheduler"], seed=11))
    for setting in (True, False):
        for pipeline in ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"):
            fam = detect({**configs, "requires_aesthetics_score": setting, "pipeline": pipeline}, "x")
            assert fam.NAME == "sdxl-refiner"
    assert fam.DROP_INS[2].endswith(":AcceleratedStableDiffusionXLInpaintPipeline")
    assert family("sdxl").DROP_INS[2].endswith(":AcceleratedStableDiffusionXLInpaintPipeline")


def test_a_pipeline_made_without_a_unet_encodes_prompts(xl_ort):
    """diffusers' encode_prompt in isolation: the text encoders alone, every other component None."""
    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline

    acc = AcceleratedStableDiffusionXLPipeline.from_pretrained(xl_ort, spin=False)
    alone = AcceleratedStableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None, **{n: getattr(acc, n) for n in (
            "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")})
    embeds = alone.encode_prompt("a red circle", device=None, do_classifier_free_guidance=True)
    full = acc.encode_prompt("a red circle", device=None, do_classifier_free_guidance=True)
    assert all(torch.equal(x, y) for x, y in zip(embeds, full))


def test_from_pretrained_logs_each_component_where_diffusers_does(xl_ort, caplog):
    """diffusers' save/load test reads every required component's name from its pipeline logger."""
    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            pipe = AcceleratedStableDiffusionXLPipeline.from_pretrained(xl_ort, spin=False)
    finally:
        logger.removeHandler(caplog.handler)
    for name in pipe.components:
        if name not in pipe._optional_components:
            assert name in caplog.text, name


def test_stand_ins_answer_set_default_attn_processor_and_freeu_is_refused(xl_ort):
    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline

    acc = AcceleratedStableDiffusionXLPipeline.from_pretrained(xl_ort, spin=False)
    for component in (acc.unet, acc.vae, acc.text_encoder_2):
        assert component.set_default_attn_processor() is None        # nothing to switch in an engine
    with pytest.raises(PipelineArgumentError, match="FreeU .* fixed when the engine was built"):
        acc.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    acc.disable_freeu()


def test_a_torch_unet_set_in_the_engines_place_is_not_held_to_their_sizes(xl_ort):
    """diffusers' height/width test swaps in a torch U-Net with a larger sample_size: it runs what diffusers runs."""
    from diffusers import UNet2DConditionModel

    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline
    from diffaccel.optimize.artifact.errors import ShapeError

    acc = AcceleratedStableDiffusionXLPipeline.from_pretrained(xl_ort, spin=False)
    with pytest.raises(ShapeError, match="height=4096"):
        acc._check_size(4096, 64)
    acc.unet = UNet2DConditionModel.from_config(dict(acc.unet.config))
    acc._check_size(4096, 64)
