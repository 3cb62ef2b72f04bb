"""Built-in sources that need no download.

``random:tiny``  a tiny Stable Diffusion pipeline (seconds to export), for tests and smoke runs;
``random:sd15``  the real SD 1.5 architecture with random weights, for speed measurements;
``random:sd21``  the real SD 2.1 (768-v) architecture with random weights (v-prediction, linear projections,
                 per-block head counts, upcast attention);
``random:sdxl``  the real SDXL base 1.0 architecture with random weights (two text encoders, 6 time ids; its U-Net
                 alone is 10 GB in fp32: build it only on a machine that holds that);
``random:tiny-xl`` a tiny SDXL pipeline (diffusers' own SDXL test configuration), for tests and smoke runs;
``tinyshapes``   a small trained text-to-image model shipped with diffaccel (see ``diffaccel.optimize.assets``);
``tinyshapes-xl`` the same world trained in the SDXL architecture (two text encoders, pooled embeddings, time ids);
``tinyshapes-sd3`` the same world trained in the SD3 architecture (an MMDiT transformer, two CLIPs, no T5).

Random weights are drawn from a fixed seed, so the same name always gives the same pipeline on the same torch.
Recipes whose fp32 weights pass 1 GB (``random:sd15`` and up) are written to the cache tensor by tensor and read
back memory-mapped (:mod:`~diffaccel.optimize.sources.on_disk`), never made whole in memory.

>>> sorted(BUILTINS)[:5]
['random:sd15', 'random:sd21', 'random:sd35-medium', 'random:sdxl', 'random:tiny']

The diffusion-transformer recipes (SD3, FLUX) are in :mod:`~diffaccel.optimize.sources.dit_recipes`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from diffaccel.optimize.sources import dit_recipes
from diffaccel.optimize.sources.seeded import made as _made, seeded as _seeded

BUILTINS: dict[str, Callable] = {}
RECIPE_VERSION = 3          # bump when a random:* recipe (or its tokenizer) changes, so its source hash changes
# (3: recipes above on_disk.ON_DISK_BYTES are drawn tensor by tensor to disk, with other values than in memory)
ASSETS = Path(__file__).resolve().parents[1] / "assets"   # optimize/assets


def builtin(name: str):
    def register(fn):
        BUILTINS[name] = fn
        return fn
    return register


def _assemble(unet_kw: dict, vae_kw: dict, text_kw: dict, sched: dict, seed: int, words=None, only=None):
    """A Stable Diffusion pipeline; with ``only`` (model names), just those models in a dict -- each drawn from its
    own seed, so alone it has the weights it has in the pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffaccel.optimize.sources.tokenizer import DEFAULT_WORDS, word_tokenizer

    tokenizer = word_tokenizer(words or DEFAULT_WORDS, max_length=text_kw.get("max_position_embeddings", 77))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    models = _made({
        "unet": lambda: _seeded(seed, lambda: UNet2DConditionModel(**unet_kw).eval()),
        "vae": lambda: _seeded(seed + 1, lambda: AutoencoderKL(**vae_kw).eval()),
        "text_encoder": lambda: _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**text_kw, **ids)).eval()),
    }, only)
    if only is not None:
        return models
    sched = dict(sched)
    cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[sched.pop("_class_name")]
    return StableDiffusionPipeline(**models, tokenizer=tokenizer, scheduler=cls.from_config(sched),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _assemble_xl(unet_kw: dict, vae_kw: dict, text_kw: "dict | None", text2_kw: dict, sched: dict, seed: int,
                 only=None):
    """An SDXL pipeline: both text encoders share the built-in word list; tokenizer_2 pads with "!" as SDXL's
    does, so the two pad differently. ``text_kw=None`` makes the refiner (an img2img pipeline without the first
    text encoder, with requires_aesthetics_score). ``only``: just those models, as for :func:`_assemble`."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffaccel.optimize.sources.tokenizer import DEFAULT_WORDS, word_tokenizer

    length = text2_kw.get("max_position_embeddings", 77)
    tokenizer, tokenizer_2 = word_tokenizer(DEFAULT_WORDS, length), word_tokenizer(DEFAULT_WORDS, length, "!")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    makers = {
        "unet": lambda: _seeded(seed, lambda: UNet2DConditionModel(**unet_kw).eval()),
        "vae": lambda: _seeded(seed + 1, lambda: AutoencoderKL(**vae_kw).eval()),
        "text_encoder_2": lambda: _seeded(seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            **text2_kw, **{**ids, "pad_token_id": tokenizer_2.pad_token_id})).eval()),
    }
    if text_kw is not None:
        makers["text_encoder"] = lambda: _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**text_kw,
                                                                                                **ids)).eval())
    models = _made(makers, only)
    if only is not None:
        return models
    sched = dict(sched)
    scheduler = getattr(diffusers, sched.pop("_class_name")).from_config(sched)
    if text_kw is None:
        return StableDiffusionXLImg2ImgPipeline(
            **models, text_encoder=None, tokenizer=None, tokenizer_2=tokenizer_2, scheduler=scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionXLPipeline(**models, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


_SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                     steps_offset=1, clip_sample=False, set_alpha_to_one=False)
_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)

RECIPES = {
    "random:tiny": dict(
        seed=0,
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=(2, 4), norm_num_groups=16),
        vae=dict(block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=1, norm_num_groups=8, sample_size=64),
        text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77, vocab_size=1000, projection_dim=32),
        scheduler={"_class_name": "DDIMScheduler", **_SD_SCHEDULER}),
    "random:sd15": dict(
        seed=15,
        unet=dict(cross_attention_dim=768, sample_size=64),
        vae=_SD_VAE,
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"),
        scheduler={"_class_name": "PNDMScheduler", **_SD_SCHEDULER, "skip_prk_steps": True}),
    "random:sd21": dict(
        seed=21,
        unet=dict(cross_attention_dim=1024, sample_size=96, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, upcast_attention=True),
        vae={**_SD_VAE, "sample_size": 768},
        text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                  max_position_embeddings=77, vocab_size=49408, projection_dim=512, hidden_act="gelu"),
        scheduler={"_class_name": "DDIMScheduler", **_SD_SCHEDULER, "prediction_type": "v_prediction"}),
    "random:sdxl": dict(   # stabilityai/stable-diffusion-xl-base-1.0's configs
        seed=30,
        unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                    max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu"),
        scheduler={"_class_name": "EulerDiscreteScheduler", **_SD_SCHEDULER, "timestep_spacing": "leading",
                   "interpolation_type": "linear", "use_karras_sigmas": False}),
    "random:tiny-xl": dict(   # diffusers' SDXL pipeline test configuration (tests/pipelines/stable_diffusion_xl)
        seed=0,
        unet=dict(block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                  cross_attention_dim=64, norm_num_groups=1),
        vae=dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 sample_size=128),
        text=dict(hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                  num_hidden_layers=5, max_position_embeddings=77, vocab_size=1000, hidden_act="gelu",
                  projection_dim=32),
        text_2=dict(hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                    num_hidden_layers=5, max_position_embeddings=77, vocab_size=1000, hidden_act="gelu",
                    projection_dim=32),
        scheduler={"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "steps_offset": 1, "beta_schedule": "scaled_linear", "timestep_spacing": "leading"}),
}


def _random(name: str, only=None):
    """A recipe's pipeline (or, with ``only``, those models): made in memory, or for recipes whose weights pass
    :data:`~diffaccel.optimize.sources.on_disk.ON_DISK_BYTES`, written to the cache tensor by tensor and read back
    memory-mapped (:mod:`~diffaccel.optimize.sources.on_disk`)."""
    from diffaccel.optimize.sources import on_disk

    def skeleton():
        return _in_memory(name)

    if on_disk.is_large(name, skeleton):
        from diffaccel.optimize.sources.folders import load_recipe_folder

        return load_recipe_folder(name, on_disk.materialize(name, skeleton, builtin_hash(name)), only)
    return _in_memory(name, only)


def _in_memory(name: str, only=None):
    if name in dit_recipes.RECIPES:
        return dit_recipes.assemble(name, only=only)
    r = RECIPES[name]
    if "text_2" in r:
        return _assemble_xl(r["unet"], r["vae"], r["text"], r["text_2"], r["scheduler"], r["seed"], only=only)
    return _assemble(r["unet"], r["vae"], r["text"], r["scheduler"], r["seed"], only=only)


def random_models(name: str, names) -> dict:
    """Only the named models of a ``random:*`` recipe, with the weights they have in its pipeline (each model has
    its own seed): what a build loads one component at a time."""
    return _random(name, only=set(names))


for _name in (*RECIPES, *dit_recipes.RECIPES):
    builtin(_name)(lambda _n=_name: _random(_n))


@builtin("tinyshapes")
def _tinyshapes():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(ASSETS / "tinyshapes"), safety_checker=None, requires_safety_checker=False, local_files_only=True)


@builtin("tinyshapes-xl")
def _tinyshapes_xl():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(ASSETS / "tinyshapes-xl"), add_watermarker=False,
                                                     local_files_only=True)


@builtin("tinyshapes-sd3")
def _tinyshapes_sd3():
    from diffusers import StableDiffusion3Pipeline

    # trained without T5: diffusers' rule for SD3 without it is to say so when loading
    return StableDiffusion3Pipeline.from_pretrained(str(ASSETS / "tinyshapes-sd3"), text_encoder_3=None,
                                                    tokenizer_3=None, local_files_only=True)


# The trained built-ins of the tinyshapes world (docs/tinyshapes.md): their prompts are its captions, their
# calibration draws its training scenes and the adherence checker can score their images.
TINYSHAPES = ("tinyshapes", "tinyshapes-xl", "tinyshapes-sd3")


# Classifier-free guidance a trained built-in is meant to run at (diffusers' 7.5 otherwise). tinyshapes: 2.0 gave
# the best prompt adherence on seeds kept apart from its benchmark's (docs/tinyshapes.md); higher guidance pulls a
# shape toward the one its color was trained with.
# tinyshapes-sd3: 3.0 on the same kind of sweep (1.5 to 7 on seeds 2 and 3).
RECOMMENDED_GUIDANCE = {"tinyshapes": 2.0, "tinyshapes-xl": 3.0, "tinyshapes-sd3": 3.0}
DEFAULT_GUIDANCE = 7.5


def recommended_guidance(source: str) -> float:
    """The guidance scale ``diffaccel demo`` and ``diffaccel generate`` use for built-in ``source`` when none is
    given.

    >>> recommended_guidance("tinyshapes"), recommended_guidance("random:tiny")
    (2.0, 7.5)
    """
    return RECOMMENDED_GUIDANCE.get(source, DEFAULT_GUIDANCE)


def builtin_hash(name: str) -> str:
    """Content hash of a built-in: the recipe (random weights) or the shipped files (trained weights)."""
    import torch

    if is_recipe(name):
        text = json.dumps({"name": name, "recipe": RECIPES.get(name) or dit_recipes.RECIPES[name],
                           "version": RECIPE_VERSION,
                           "torch": torch.__version__.split("+")[0]}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()
    from diffaccel.optimize.artifact.files import tree_sha256

    return tree_sha256(ASSETS / name)


def builtin_location(name: str) -> str:
    return f"builtin recipe {name} v{RECIPE_VERSION}" if is_recipe(name) else str(ASSETS / name)


def is_recipe(name: str) -> bool:
    """Whether built-in ``name`` is made in code from a seed (``random:*``), not shipped trained weights."""
    return name in RECIPES or name in dit_recipes.RECIPES
