"""Stable Diffusion 1.x/2.x inpainting: SD's family with a U-Net of ``2 * latent_channels + 1`` input channels (the
noisy latents, the mask, the masked image's latents), detected from ``in_channels``. Specs, export wrappers and
weights are SD's (its U-Net spec already takes ``in_channels`` from the config); calibration inpaints a seeded image
under a fixed mask with diffusers' ``StableDiffusionInpaintPipeline``.

>>> mismatches({"unet": {"in_channels": 9}, "vae": {"latent_channels": 4}})
[]
>>> mismatches({"unet": {"in_channels": 4}, "vae": {"latent_channels": 4}})
['in_channels=4 (the VAE has 4 latent channels; inpainting needs 9)']
"""
from __future__ import annotations

from diffaccel.optimize.families import sd
from diffaccel.optimize.families.common import inpainting_inputs
from diffaccel.optimize.families.sd import (  # noqa: F401  (the family surface, shared with SD)
    COMPONENTS, DENOISER, EXPORTERS, KEEP_FLOAT, LOAD_KWARGS, SOURCE_MODEL, TEXT_ENCODERS, TOKENIZERS, ModelGeometry,
    assets, check_pixel_range, export_module, attention_bytes, latent_opt_size, size_factors, specs, weight_bytes)

NAME = "sd-inpaint"
TITLE = "Stable Diffusion 1.x/2.x inpainting"
PIPELINES = ("StableDiffusionInpaintPipeline", "StableDiffusionPipeline")
PIPELINE_CLASS = "StableDiffusionInpaintPipeline"
DROP_INS = (None, None, "diffaccel.engines.pipelines.sd:AcceleratedStableDiffusionInpaintPipeline")


def mismatches(configs: dict) -> list:
    """What in ``configs`` (see :func:`diffaccel.optimize.families.detect`) differs from an SD inpainting model."""
    return sd.problems(configs, inpaint=True, pipelines=PIPELINES)


def capture_denoiser_inputs(pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int, height: int,
                        width: int) -> list:
    """The U-Net's inputs (9-channel ``sample`` included) at every step of inpainting a seeded image."""
    from diffusers import StableDiffusionInpaintPipeline

    if not isinstance(pipe, StableDiffusionInpaintPipeline):
        pipe = StableDiffusionInpaintPipeline(**pipe.components)
    return sd.capture_denoiser_inputs(pipe, prompts, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                  height=height, width=width, call_kwargs=inpainting_inputs(height, width, seed))
