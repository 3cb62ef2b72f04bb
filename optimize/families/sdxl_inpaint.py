"""Stable Diffusion XL inpainting: base SDXL with a U-Net of ``2 * latent_channels + 1`` input channels, detected
from ``in_channels``. Specs, export wrappers and weights are base SDXL's; calibration inpaints a seeded image under
a fixed mask with diffusers' ``StableDiffusionXLInpaintPipeline``.

>>> unet = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "cross_attention_dim": 2048,
...         "projection_class_embeddings_input_dim": 2816, "in_channels": 9}
>>> mismatches({"unet": unet, "vae": {}, "text_encoder": {"hidden_size": 768},
...             "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280}})
[]
"""
from __future__ import annotations

from diffaccel.optimize.families import sdxl
from diffaccel.optimize.families.common import inpainting_inputs
from diffaccel.optimize.families.sdxl import (  # noqa: F401  (the family surface, shared with base SDXL)
    COMPONENTS, DENOISER, EXPORTERS, KEEP_FLOAT, LOAD_KWARGS, SOURCE_MODEL, TEXT_ENCODERS, TOKENIZERS, ModelGeometry,
    assets, check_pixel_range, export_module, attention_bytes, latent_opt_size, size_factors, specs, weight_bytes)

NAME = "sdxl-inpaint"
TITLE = "Stable Diffusion XL inpainting"
PIPELINES = ("StableDiffusionXLInpaintPipeline", "StableDiffusionXLPipeline")
PIPELINE_CLASS = "StableDiffusionXLInpaintPipeline"
DROP_INS = (None, None, "diffaccel.engines.pipelines.sdxl:AcceleratedStableDiffusionXLInpaintPipeline")


def mismatches(configs: dict) -> list:
    """What in ``configs`` (see :func:`diffaccel.optimize.families.detect`) differs from an SDXL inpainting model."""
    return sdxl.problems(configs, refiner=False, inpaint=True, pipelines=PIPELINES)


def capture_denoiser_inputs(pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int, height: int,
                        width: int) -> list:
    """The U-Net's inputs (9-channel ``sample`` included) at every step of inpainting a seeded image."""
    from diffusers import StableDiffusionXLInpaintPipeline

    if not isinstance(pipe, StableDiffusionXLInpaintPipeline):
        pipe = StableDiffusionXLInpaintPipeline(**pipe.components)
    return sdxl.capture_denoiser_inputs(pipe, prompts, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                    height=height, width=width, call_kwargs=inpainting_inputs(height, width, seed))
