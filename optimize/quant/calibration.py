"""Calibration data captured from the real pipeline: the U-Net's inputs at every denoising step.

Diffusion U-Nets see very different activations early (pure noise) and late (nearly clean latents) in sampling, and
classifier-free guidance doubles every batch with an unconditional half. Calibrating on random tensors or on one
timestep misses both; we run the pipeline itself, with the configured guidance, and record what the U-Net receives
(each model family knows how: ``family.capture_unet_inputs``). Everything is seeded: the same QuantConfig on the same
source gives the same tensors.
"""
from __future__ import annotations


def calibration_prompts(ctx) -> list:
    """The calibration prompts of the build's :class:`QuantConfig` (see
    :func:`~diffaccel.optimize.sources.prompts.calibration_prompts`)."""
    from diffaccel.optimize.sources.prompts import calibration_prompts as prompts

    q = ctx.config.quant
    return prompts(ctx.source.spec, q.calib_size, q.calib_seed, q.calib_prompts)


def calibration_size(ctx) -> tuple:
    """(height, width) in pixels calibration runs at: the U-Net spec's typical (opt) latent size."""
    opt, scale = ctx.specs["unet"].opt_values(), ctx.geometry.vae_scale_factor
    return opt["height"] * scale, opt["width"] * scale


def calibration_samples(ctx) -> tuple:
    """(prompts, the U-Net's inputs at every step of sampling each prompt with the configured guidance)."""
    q, (height, width) = ctx.config.quant, calibration_size(ctx)
    prompts = calibration_prompts(ctx)
    samples = ctx.family.capture_unet_inputs(ctx.pipe, prompts, steps=q.calib_steps, guidance_scale=q.guidance_scale,
                                             seed=q.calib_seed, height=height, width=width)
    return prompts, samples


class CalibrationReader:
    """ONNX Runtime CalibrationDataReader over captured U-Net inputs (numpy, fixed order)."""

    def __init__(self, samples: list):
        self.samples = samples
        self.i = 0

    def get_next(self):
        if self.i >= len(self.samples):
            return None
        s = self.samples[self.i]
        self.i += 1
        return {k: v.numpy() for k, v in s.items()}

    def rewind(self):
        self.i = 0
