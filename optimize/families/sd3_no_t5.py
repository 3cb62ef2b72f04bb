"""Stable Diffusion 3/3.5 without its T5 encoder (``text_encoder_3=None``, as diffusers allows: the transformer then
gets zeros where the T5 tokens go): SD3's family (:mod:`~diffaccel.optimize.families.sd3`) minus ``text_encoder_3``,
detected by its absence. The trained transformer twin ``tinyshapes-sd3`` is one.

>>> COMPONENTS
('text_encoder', 'text_encoder_2', 'transformer', 'vae_decoder', 'vae_encoder')
"""
from __future__ import annotations

from diffaccel.optimize.families import sd3
from diffaccel.optimize.families.sd3 import (  # noqa: F401  (the family surface, shared with SD3)
    DENOISER, DROP_INS, EXPORTERS, KEEP_FLOAT, LOAD_KWARGS, PIPELINE_CLASS, PIPELINES, ModelGeometry, assets,
    attention_bytes, capture_denoiser_inputs, check_pixel_range, export_module, latent_opt_size, size_factors, specs,
    weight_bytes)

NAME = "sd3-no-t5"
TITLE = "Stable Diffusion 3/3.5 without T5"
COMPONENTS = tuple(c for c in sd3.COMPONENTS if c != "text_encoder_3")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SOURCE_MODEL = {c: sd3.SOURCE_MODEL[c] for c in COMPONENTS}
TOKENIZERS = ("tokenizer", "tokenizer_2")


def mismatches(configs: dict) -> list:
    """What in ``configs`` (see :func:`diffaccel.optimize.families.detect`) differs from SD3 without T5."""
    return sd3.problems(configs, t5=False)
