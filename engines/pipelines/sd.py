"""Drop-in diffusers pipelines backed by diffaccel engines.

They inherit diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` and swap in engine-backed
components, so diffusers' own ``__call__`` (same signature; schedulers, guidance, callbacks, output types) runs
unchanged. Calls the engines cannot serve fail before any work: sizes outside their range, fewer images than their
batch range starts at, and guidance_scale > 1 on an artifact built for guidance <= 1 (``optimize --guidance 0``).

>>> pipe = AcceleratedStableDiffusionPipeline.from_pretrained("out/tiny")          # doctest: +SKIP
>>> pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=20).images[0].save("x.png")          # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from diffaccel.optimize.artifact.manifest import Manifest

from diffaccel.engines.pipelines.accelerated import _Accelerated, _image_size, bound_call
from diffaccel.engines.pipelines.base import (  # noqa: F401  (COMPONENTS, REFUSED...: the SD family's keywords)
    COMPONENTS, ENGINE_OPTIONS, IGNORED, REFUSED, denoiser_shim_of, engine_loader, load_scheduler, load_tokenizer,
    split_kwargs, text_encoder_shim, vae_shim)


def load_components(root, manifest: Manifest, provider=None, threads=None, **engine_options) -> dict:
    """Engine-backed ``unet``, ``vae``, ``text_encoder`` plus the artifact's tokenizer and scheduler; logs each at
    INFO, as diffusers does."""
    engine = engine_loader(root, manifest, ("text_encoder", "unet", "vae_decoder"), provider, threads,
                           **engine_options)
    return {"text_encoder": text_encoder_shim(root, manifest, engine, "text_encoder"),
            "unet": denoiser_shim_of(root, manifest, engine), "vae": vae_shim(root, manifest, engine),
            "tokenizer": load_tokenizer(root), "scheduler": load_scheduler(root)}


class _AcceleratedSD(_Accelerated):
    """What SD's drop-ins load, accept and leave out (no safety checker: engines run the model alone)."""

    _DEFAULTS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @classmethod
    def _load_components(cls, root, manifest, **options) -> dict:
        return load_components(root, manifest, **options)


_CALL = inspect.signature(StableDiffusionPipeline.__call__)
_IMG2IMG_CALL = inspect.signature(StableDiffusionImg2ImgPipeline.__call__)


class AcceleratedStableDiffusionPipeline(_AcceleratedSD, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(StableDiffusionPipeline.__call__)   # diffusers' signature and docs; body unchanged
    def __call__(self, *args, **kwargs):
        self._check_call(bound_call(_CALL, self, *args, **kwargs))
        return super().__call__(*args, **kwargs)

    def check_inputs(self, prompt, height, width, *args, **kwargs):
        self._check_size(height, width)
        return super().check_inputs(prompt, height, width, *args, **kwargs)


class AcceleratedStableDiffusionImg2ImgPipeline(_AcceleratedSD, StableDiffusionImg2ImgPipeline):
    """``StableDiffusionImg2ImgPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(StableDiffusionImg2ImgPipeline.__call__)   # diffusers' signature and docs; body unchanged
    def __call__(self, *args, **kwargs):
        arguments = bound_call(_IMG2IMG_CALL, self, *args, **kwargs)
        height, width, encode = _image_size(arguments.get("image"), self.vae_scale_factor,
                                            self.vae.config.get("latent_channels", 4))
        self._check_size(height, width, encode)
        self._check_call(arguments)
        return super().__call__(*args, **kwargs)


class AcceleratedStableDiffusionInpaintPipeline(_AcceleratedSD, StableDiffusionInpaintPipeline):
    """``StableDiffusionInpaintPipeline`` running on diffaccel engines (an inpainting U-Net of 9 input channels, or a
    regular one, whose latents diffusers blends with the masked image's at each step); called exactly like
    diffusers'."""

    _CALL = inspect.signature(StableDiffusionInpaintPipeline.__call__)

    @functools.wraps(StableDiffusionInpaintPipeline.__call__)
    def __call__(self, *args, **kwargs):
        arguments = bound_call(self._CALL, self, *args, **kwargs)
        size = self.unet.config.sample_size * self.vae_scale_factor       # diffusers' default, not the image's
        self._check_size(arguments.get("height") or size, arguments.get("width") or size, encode=True)
        self._check_call(arguments)
        return super().__call__(*args, **kwargs)

