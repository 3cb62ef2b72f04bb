"""Drop-in SDXL pipelines backed by diffaccel engines.

They inherit diffusers' ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` and swap in
engine-backed components (two text encoders, the U-Net with its ``text_embeds``/``time_ids`` inputs, the VAE), so
diffusers' own ``__call__`` (same signature) runs unchanged: its time ids, ``force_zeros_for_empty_prompt`` (as the
source pipeline had it), guidance and schedulers. The invisible watermark is off. Calls the engines cannot serve
fail before any work, naming why (a size outside the engines' range, guidance_scale > 1 on a build for guidance <= 1
such as SDXL-Turbo's, ``clip_skip``, IP-Adapter images, LoRA scales).

>>> pipe = AcceleratedStableDiffusionXLPipeline.from_pretrained("out/sdxl")                 # doctest: +SKIP
>>> pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)     # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=20).images[0].save("x.png")                  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect

from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

from diffaccel.optimize.artifact.errors import PipelineArgumentError
from diffaccel.engines.pipelines.accelerated import _Accelerated, _image_size, bound_call
from diffaccel.engines.pipelines.base import (
    REFUSED, denoiser_shim_of, engine_loader, load_scheduler, load_tokenizer, text_encoder_shim, vae_shim)
from diffaccel.engines.pipelines.shims import CLIP_SKIP

XL_COMPONENTS = ("scheduler", "tokenizer", "tokenizer_2", "force_zeros_for_empty_prompt", "add_watermarker")
XL_REFUSED = {**REFUSED, "text_encoder_2": REFUSED["text_encoder"],
              "custom_pipeline": "the drop-in pipelines are diffusers' StableDiffusionXL(Img2Img)Pipeline"}


def load_xl_components(root, manifest, provider=None, threads=None, **engine_options) -> dict:
    """Engine-backed ``text_encoder``, ``text_encoder_2``, ``unet``, ``vae`` plus both tokenizers and the scheduler
    (no ``text_encoder``/``tokenizer`` for the refiner, whose family has none)."""
    refiner = manifest.get("pipeline", {}).get("family") == "sdxl-refiner"
    first = () if refiner else ("text_encoder",)
    engine = engine_loader(root, manifest, (*first, "text_encoder_2", "unet", "vae_decoder"), provider, threads,
                           **engine_options)
    return {"text_encoder": None if refiner else text_encoder_shim(root, manifest, engine, "text_encoder"),
            "text_encoder_2": text_encoder_shim(root, manifest, engine, "text_encoder_2"),
            "unet": denoiser_shim_of(root, manifest, engine), "vae": vae_shim(root, manifest, engine),
            "tokenizer": None if refiner else load_tokenizer(root, "tokenizer"),
            "tokenizer_2": load_tokenizer(root, "tokenizer_2"), "scheduler": load_scheduler(root)}


class _AcceleratedXL(_Accelerated):
    _ACCEPTED = XL_COMPONENTS
    _REFUSED = XL_REFUSED
    _TOKENIZERS = ("tokenizer", "tokenizer_2")
    _DEFAULTS = {"image_encoder": None, "feature_extractor": None, "add_watermarker": False}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, provider=None, threads=None, verify=True, **kwargs):
        """Load an artifact made by ``diffaccel optimize`` from an SDXL checkpoint; keywords as
        :meth:`AcceleratedStableDiffusionPipeline.from_pretrained`, plus ``tokenizer_2=`` and
        ``force_zeros_for_empty_prompt=`` (default: the source pipeline's). The watermark stays off:
        ``add_watermarker=True`` is refused."""
        if kwargs.get("add_watermarker"):
            raise PipelineArgumentError("add_watermarker=True: the drop-in pipelines never watermark (images are "
                                        "compared pixel for pixel with diffusers'); apply a watermark afterwards")
        return super().from_pretrained(pretrained_model_name_or_path, provider, threads, verify, **kwargs)

    @classmethod
    def _load_components(cls, root, manifest, **options) -> dict:
        parts = load_xl_components(root, manifest, **options)
        facts = manifest.get("pipeline", {})
        out = {**parts, "force_zeros_for_empty_prompt": facts.get("force_zeros_for_empty_prompt", True)}
        if "requires_aesthetics_score" in cls._DEFAULTS:
            out["requires_aesthetics_score"] = bool(facts.get("requires_aesthetics_score", False))
        return out

    def _refuse_unservable(self, arguments: dict, height, width, encode: bool = False) -> None:
        """Before any work: sizes outside the engines' range, guidance or batches the U-Net was not built for, and
        what exported engines cannot compute."""
        self._check_size(height, width, encode)
        self._check_call(arguments)
        if arguments.get("clip_skip") is not None:
            raise PipelineArgumentError(CLIP_SKIP)
        if arguments.get("ip_adapter_image") is not None or arguments.get("ip_adapter_image_embeds") is not None:
            raise PipelineArgumentError("IP-Adapter images are not supported by exported U-Nets (they take no "
                                        "image_embeds input)")
        scale = (arguments.get("cross_attention_kwargs") or {}).get("scale")
        if scale not in (None, 1.0):
            raise PipelineArgumentError(f"cross_attention_kwargs scale={scale}: LoRA scales are not supported by "
                                        "exported U-Nets; fuse LoRA weights before diffaccel optimize")

    def _default_size(self, height, width) -> tuple:
        size = self.default_sample_size * self.vae_scale_factor
        return height or size, width or size


_XL_CALL = inspect.signature(StableDiffusionXLPipeline.__call__)
_XL_IMG2IMG_CALL = inspect.signature(StableDiffusionXLImg2ImgPipeline.__call__)


class AcceleratedStableDiffusionXLPipeline(_AcceleratedXL, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(StableDiffusionXLPipeline.__call__)   # diffusers' signature and docs; body unchanged
    def __call__(self, *args, **kwargs):
        arguments = bound_call(_XL_CALL, self, *args, **kwargs)
        self._refuse_unservable(arguments, *self._default_size(arguments.get("height"), arguments.get("width")))
        return super().__call__(*args, **kwargs)


class AcceleratedStableDiffusionXLImg2ImgPipeline(_AcceleratedXL, StableDiffusionXLImg2ImgPipeline):
    """``StableDiffusionXLImg2ImgPipeline`` running on diffaccel engines (base SDXL or the refiner artifact);
    called exactly like diffusers'."""

    _DEFAULTS = {**_AcceleratedXL._DEFAULTS, "requires_aesthetics_score": False}
    _ACCEPTED = XL_COMPONENTS + ("requires_aesthetics_score",)

    @functools.wraps(StableDiffusionXLImg2ImgPipeline.__call__)
    def __call__(self, *args, **kwargs):
        arguments = bound_call(_XL_IMG2IMG_CALL, self, *args, **kwargs)
        height, width, encode = _image_size(arguments.get("image"), self.vae_scale_factor,
                                            self.vae.config.get("latent_channels", 4))
        self._refuse_unservable(arguments, height, width, encode)
        return super().__call__(*args, **kwargs)


class AcceleratedStableDiffusionXLInpaintPipeline(_AcceleratedXL, StableDiffusionXLInpaintPipeline):
    """``StableDiffusionXLInpaintPipeline`` running on diffaccel engines (an inpainting U-Net of 9 input channels,
    or a regular base or refiner U-Net, diffusers' "base model as inpainter"); called exactly like diffusers'."""

    _DEFAULTS = {**_AcceleratedXL._DEFAULTS, "requires_aesthetics_score": False}
    _ACCEPTED = XL_COMPONENTS + ("requires_aesthetics_score",)
    _CALL = inspect.signature(StableDiffusionXLInpaintPipeline.__call__)

    @functools.wraps(StableDiffusionXLInpaintPipeline.__call__)
    def __call__(self, *args, **kwargs):
        arguments = bound_call(self._CALL, self, *args, **kwargs)
        size = self.unet.config.sample_size * self.vae_scale_factor       # diffusers' default, not the image's
        self._refuse_unservable(arguments, arguments.get("height") or size, arguments.get("width") or size, True)
        return super().__call__(*args, **kwargs)
