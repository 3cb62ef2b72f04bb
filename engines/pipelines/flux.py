"""Drop-in FLUX.1 pipelines backed by diffaccel engines.

They inherit diffusers' ``FluxPipeline`` / ``FluxImg2ImgPipeline`` and swap in engine-backed components (the CLIP text
encoder, the T5 encoder, the transformer, the VAE), so diffusers' own ``__call__`` runs unchanged: latent packing, the
rotary position ids, dynamic shifting (``mu`` from the image's token count), [dev]'s guidance embedding and true CFG
(``true_cfg_scale`` with a negative prompt: a second call of the same batch). The transformer's stand-in unpacks the
latents for the engine (which packs them and makes the ids itself) and packs its answer back. Sizes are checked as
diffusers will use them (rounded down to multiples of 16 pixels, as it does with a warning); calls the engines cannot
serve fail before any work, naming why (a size outside the engines' range, IP-Adapter images, ControlNets, LoRA
scales, position ids other than text-to-image's).

>>> pipe = AcceleratedFluxPipeline.from_pretrained("out/flux-schnell")                       # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=4, guidance_scale=0.0).images[0].save("x.png")  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect

from diffusers import FluxImg2ImgPipeline, FluxPipeline

from diffaccel.optimize.artifact.errors import PipelineArgumentError

from diffaccel.engines.pipelines.accelerated import _Accelerated, bound_call
from diffaccel.engines.pipelines.base import (
    REFUSED, denoiser_shim_of, engine_loader, load_scheduler, load_tokenizer, t5_encoder_shim, text_encoder_shim,
    vae_shim)

FLUX_COMPONENTS = ("scheduler", "tokenizer", "tokenizer_2")
FLUX_REFUSED = {**REFUSED, "text_encoder_2": REFUSED["text_encoder"],
                "custom_pipeline": "the drop-in pipelines are diffusers' Flux(Img2Img)Pipeline"}


def load_flux_components(root, manifest, provider=None, threads=None, **engine_options) -> dict:
    """Engine-backed CLIP and T5 encoders, transformer and VAE, plus both tokenizers and the scheduler."""
    engine = engine_loader(root, manifest, ("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
                           provider, threads, **engine_options)
    return {"text_encoder": text_encoder_shim(root, manifest, engine, "text_encoder"),
            "text_encoder_2": t5_encoder_shim(root, manifest, engine, "text_encoder_2"),
            "transformer": denoiser_shim_of(root, manifest, engine), "vae": vae_shim(root, manifest, engine),
            "tokenizer": load_tokenizer(root, "tokenizer"), "tokenizer_2": load_tokenizer(root, "tokenizer_2"),
            "scheduler": load_scheduler(root)}


class _AcceleratedFlux(_Accelerated):
    _ACCEPTED = FLUX_COMPONENTS
    _REFUSED = FLUX_REFUSED
    _TOKENIZERS = ("tokenizer", "tokenizer_2")
    _DEFAULTS = {"image_encoder": None, "feature_extractor": None}

    @classmethod
    def _load_components(cls, root, manifest, **options) -> dict:
        return load_flux_components(root, manifest, **options)

    def _refuse_unservable(self, arguments: dict) -> None:
        """Before any work: the size diffusers will use (rounded down to its multiple), the batch, and what exported
        engines cannot compute."""
        step = self.vae_scale_factor * 2
        size = [(arguments.get(a) or self.native_size) // step * step for a in ("height", "width")]
        self._check_size(*size, encode=arguments.get("image") is not None)
        self._check_call(arguments)
        for name in ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                     "negative_ip_adapter_image_embeds"):
            if arguments.get(name) is not None:
                raise PipelineArgumentError(f"{name}: IP-Adapter images are not supported by exported transformers")
        scale = (arguments.get("joint_attention_kwargs") or {}).get("scale")
        if scale not in (None, 1.0):
            raise PipelineArgumentError(f"joint_attention_kwargs scale={scale}: LoRA scales are not supported by "
                                        "exported transformers; fuse LoRA weights before diffaccel optimize")


_FLUX_CALL = inspect.signature(FluxPipeline.__call__)
_FLUX_IMG2IMG_CALL = inspect.signature(FluxImg2ImgPipeline.__call__)


class AcceleratedFluxPipeline(_AcceleratedFlux, FluxPipeline):
    """``FluxPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(FluxPipeline.__call__)   # diffusers' signature and docs; body unchanged
    def __call__(self, *args, **kwargs):
        self._refuse_unservable(bound_call(_FLUX_CALL, self, *args, **kwargs))
        return super().__call__(*args, **kwargs)


class AcceleratedFluxImg2ImgPipeline(_AcceleratedFlux, FluxImg2ImgPipeline):
    """``FluxImg2ImgPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(FluxImg2ImgPipeline.__call__)
    def __call__(self, *args, **kwargs):
        self._refuse_unservable(bound_call(_FLUX_IMG2IMG_CALL, self, *args, **kwargs))
        return super().__call__(*args, **kwargs)
