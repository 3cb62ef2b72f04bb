"""The Stable Diffusion XL refiner family: SDXL's image-to-image refiner, detected from its configs as base SDXL
is, by what differs: 5 time ids (original size, crop top-left and an aesthetic score; the pipeline's
``requires_aesthetics_score``), no first text encoder (the U-Net cross-attends to ``text_encoder_2``'s penultimate
hidden state alone). Specs, export wrappers and the calibration capture are base SDXL's
(:mod:`~diffaccel.optimize.families.sdxl`) without the first text encoder.

>>> COMPONENTS
('text_encoder_2', 'unet', 'vae_decoder', 'vae_encoder')
>>> unet = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "cross_attention_dim": 1280,
...         "projection_class_embeddings_input_dim": 2560}
>>> mismatches({"unet": unet, "vae": {}, "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280}})
[]
"""
from __future__ import annotations

from diffaccel.optimize.families import sdxl
from diffaccel.optimize.families.sdxl import (  # noqa: F401  (the family surface, shared with base SDXL)
    ModelGeometry, assets, capture_denoiser_inputs, check_pixel_range, export_module, attention_bytes,
    latent_opt_size, size_factors, weight_bytes)

NAME = "sdxl-refiner"
TITLE = "Stable Diffusion XL refiner"
PIPELINES = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
PIPELINE_CLASS = "StableDiffusionXLImg2ImgPipeline"
DROP_INS = (None,    # no text-to-image: the refiner refines images (or inpaints them, its 4-channel U-Net as
            #          diffusers' "base model as inpainter")
            "diffaccel.engines.pipelines.sdxl:AcceleratedStableDiffusionXLImg2ImgPipeline",
            "diffaccel.engines.pipelines.sdxl:AcceleratedStableDiffusionXLInpaintPipeline")
COMPONENTS = ("text_encoder_2", "unet", "vae_decoder", "vae_encoder")
DENOISER = "unet"
TEXT_ENCODERS = ("text_encoder_2",)
SOURCE_MODEL = {c: sdxl.SOURCE_MODEL[c] for c in COMPONENTS}
TOKENIZERS = ("tokenizer_2",)
LOAD_KWARGS = sdxl.LOAD_KWARGS
KEEP_FLOAT = sdxl.KEEP_FLOAT
EXPORTERS = sdxl.EXPORTERS


def mismatches(configs: dict) -> list:
    """What in ``configs`` (see :func:`diffaccel.optimize.families.detect`) differs from the SDXL refiner."""
    return sdxl.problems(configs, refiner=True, pipelines=PIPELINES)


def specs(geo: ModelGeometry, shapes) -> dict:
    """Base SDXL's specs without the first text encoder."""
    return {c: s for c, s in sdxl.specs(geo, shapes).items() if c in COMPONENTS}
