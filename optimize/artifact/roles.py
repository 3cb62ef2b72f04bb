"""The roles an artifact's components play, by the names diffusers gives them: what the manifest, the engines and
the families agree on (a family says which of these its components are, :mod:`diffaccel.optimize.families.protocol`).

>>> DENOISERS
('unet', 'transformer')
"""
from __future__ import annotations

DENOISERS = ("unet", "transformer")          # a U-Net (SD, SDXL) or a diffusion transformer (SD3, FLUX)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
VAE_PARTS = ("vae_decoder", "vae_encoder")
GUIDANCE_INPUTS = ("timestep_cond", "guidance")   # denoiser inputs that carry the guidance scale itself
LABELS = {"unet": "U-Net", "transformer": "transformer"}


def label(denoiser: "str | None") -> str:
    """The denoiser's name for people (tables, plots): ``U-Net`` or ``transformer``; "denoiser" when unknown.

    >>> label("unet"), label("transformer"), label(None)
    ('U-Net', 'transformer', 'denoiser')
    """
    return LABELS.get(denoiser, "denoiser")
