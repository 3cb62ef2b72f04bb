"""Calibration data captured from the real pipeline: the U-Net's inputs at every denoising step.

Diffusion U-Nets see very different activations early (pure noise) and late (nearly clean latents) in sampling, and
classifier-free guidance doubles every batch with an unconditional half. Calibrating on random tensors or on one
timestep misses both; we run the pipeline itself, with the configured guidance, and record what the U-Net receives.
Everything is seeded: the same QuantConfig on the same source gives the same tensors.
"""
from __future__ import annotations

import logging


log = logging.getLogger(__name__)


def load_prompts(quant, source_spec: str = "") -> list:
    """The calibration prompts of a :class:`QuantConfig` (see :func:`~diffaccel.optimize.sources.prompts.calibration_prompts`)."""
    from diffaccel.optimize.sources.prompts import calibration_prompts

    return calibration_prompts(source_spec, quant.calib_size, quant.calib_seed, quant.calib_prompts)


def capture_unet_inputs(pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int, height: int,
                        width: int) -> list:
    """Run ``pipe`` once per prompt and return the U-Net's inputs at every step, as dicts of CPU tensors named
    ``sample``, ``timestep`` (one per batch row) and ``encoder_hidden_states``."""
    import torch

    captured = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(sample.shape[0]).clone()
        captured.append({"sample": sample.detach().float().cpu().clone(), "timestep": t,
                         "encoder_hidden_states": ehs.detach().float().cpu().clone()})

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    was_disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    try:
        for i, prompt in enumerate(prompts):
            log.info("calibration prompt %d/%d: %s", i + 1, len(prompts), prompt)
            with torch.no_grad():
                pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                     generator=torch.Generator().manual_seed(seed + i), output_type="latent")
    finally:
        handle.remove()
        pipe.set_progress_bar_config(disable=was_disabled)
    return captured
