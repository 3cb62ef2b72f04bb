"""tinyshapes-xl: the tinyshapes world trained in the SDXL architecture (tools/train_tinyshapes.py --family xl).

The training recipe must condition the U-Net exactly as diffusers' StableDiffusionXLPipeline does at inference
(checked on an untrained model, so it holds before any weights exist); the shipped weights load offline, are small,
have the recipe's architecture and the SDXL family diffaccel derives from the configs, and run."""
import numpy as np
import pytest
import torch

from diffaccel.optimize.sources.builtins import ASSETS, BUILTINS
from tests.test_tinyshapes_model import _train_module, assert_recipe, shipped_index

MODEL = ASSETS / "tinyshapes-xl"
shipped = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"no weights at {MODEL}")
PROMPT = "a small red circle at the top left on a white background"


def _pipeline(models: dict):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    train = _train_module()
    return StableDiffusionXLPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                                     text_encoder_2=models["text_encoder_2"], tokenizer=models["tokenizer"],
                                     tokenizer_2=models["tokenizer"], unet=models["unet"],
                                     scheduler=DDIMScheduler(**train.SCHEDULER_CONFIG),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def test_training_conditions_the_unet_as_the_sdxl_pipeline_does():
    """Text states, pooled embeddings and time ids of a caption, and zeros for a dropped caption, are what
    StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids give at inference (the default 64x64 size)."""
    train = _train_module()
    models = train.build_models(train.TrainConfig(family="xl"))
    pipe = _pipeline(models)
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True)
        tok = pipe.tokenizer
        ids = tok([PROMPT, ""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        ours = train.condition(models, ids, torch.tensor([False, True]))
        size = pipe.default_sample_size * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert size == 64
    torch.testing.assert_close(ours["encoder_hidden_states"][:1], pos)
    torch.testing.assert_close(ours["added_cond_kwargs"]["text_embeds"][:1], pooled)
    torch.testing.assert_close(ours["added_cond_kwargs"]["time_ids"][:1], time_ids)
    assert pos.abs().sum() > 0 and not neg.any() and not neg_pooled.any()        # force_zeros_for_empty_prompt
    assert not ours["encoder_hidden_states"][1].any() and not ours["added_cond_kwargs"]["text_embeds"][1].any()
    # the recipe's widths are what the U-Net's inputs need: states 32 + 64 wide, pooled 48 + 6 time ids x 8
    assert pos.shape[-1] == models["unet"].config.cross_attention_dim == 96
    assert pooled.shape[-1] + 6 * 8 == models["unet"].config.projection_class_embeddings_input_dim


@pytest.fixture(scope="module")
def pipe():
    pipe = BUILTINS["tinyshapes-xl"]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@shipped
def test_files_are_safetensors_small_and_sdxl():
    index = shipped_index(MODEL)
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True


@shipped
def test_family_is_derived_from_the_configs(pipe):
    """diffaccel reads tinyshapes-xl as SDXL with the widths its configs give (not SDXL base's 2048/1280)."""
    from diffaccel.optimize.families import configs_of, detect

    fam = detect(configs_of(pipe), "tinyshapes-xl")
    geo = fam.ModelGeometry.from_pipeline(pipe)
    assert fam.NAME == "sdxl"
    assert (geo.time_ids, geo.pooled_dim, geo.cross_attention_dim) == (6, 48, 96)
    assert (geo.text_hidden, geo.text_hidden_2) == (32, 64)


@shipped
def test_shipped_weights_have_the_training_recipes_architecture(pipe):
    train = _train_module()
    assert_recipe(((train.UNET_CONFIG_XL, pipe.unet.config), (train.VAE_CONFIG, pipe.vae.config),
                   (train.TEXT_CONFIG_XL, pipe.text_encoder.config),
                   (train.TEXT_CONFIG_XL_2, pipe.text_encoder_2.config)))


@shipped
def test_two_step_generation_runs(pipe):
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
               output_type="np")
    image = out.images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and 0.0 <= image.min() <= image.max() <= 1.0
