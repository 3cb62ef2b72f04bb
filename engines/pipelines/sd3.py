"""Drop-in Stable Diffusion 3 / 3.5 pipelines backed by diffaccel engines.

They inherit diffusers' ``StableDiffusion3Pipeline`` / ``StableDiffusion3Img2ImgPipeline`` and swap in engine-backed
components (two CLIP text encoders, the T5 encoder when the artifact has one, the transformer, the VAE), so
diffusers' own ``__call__`` runs unchanged: its prompt embedding (zeros for T5 without ``text_encoder_3``, as
diffusers does), classifier-free guidance, flow-matching schedulers and their shift. Calls the engines cannot serve
fail before any work, naming why: a size outside the engines' range, skip-layer guidance (it removes transformer
blocks per call), ``clip_skip`` (the text engines return two hidden states), IP-Adapter images, LoRA scales.

>>> pipe = AcceleratedStableDiffusion3Pipeline.from_pretrained("out/sd3")          # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=28, guidance_scale=7).images[0].save("x.png")  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path

from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

from diffaccel.optimize.artifact.errors import PipelineArgumentError

from diffaccel.engines.pipelines.accelerated import _Accelerated, bound_call
from diffaccel.engines.pipelines.base import (
    REFUSED, denoiser_shim_of, engine_loader, load_scheduler, load_tokenizer, t5_encoder_shim, text_encoder_shim,
    vae_shim)
from diffaccel.engines.pipelines.shims import CLIP_SKIP

SD3_COMPONENTS = ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3")
SD3_REFUSED = {**REFUSED, **dict.fromkeys(("text_encoder_2", "text_encoder_3"), REFUSED["text_encoder"]),
               "custom_pipeline": "the drop-in pipelines are diffusers' StableDiffusion3(Img2Img)Pipeline"}


def load_sd3_components(root, manifest, provider=None, threads=None, **engine_options) -> dict:
    """Engine-backed text encoders (``text_encoder_3`` None where the artifact has no T5 engine, which diffusers
    then replaces by zeros), transformer and VAE, plus the tokenizers and the scheduler."""
    engine = engine_loader(root, manifest, ("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
                           provider, threads, **engine_options)
    t5 = "text_encoder_3" in manifest.components
    return {"text_encoder": text_encoder_shim(root, manifest, engine, "text_encoder"),
            "text_encoder_2": text_encoder_shim(root, manifest, engine, "text_encoder_2"),
            "text_encoder_3": t5_encoder_shim(root, manifest, engine, "text_encoder_3") if t5 else None,
            "transformer": denoiser_shim_of(root, manifest, engine), "vae": vae_shim(root, manifest, engine),
            "tokenizer": load_tokenizer(root, "tokenizer"), "tokenizer_2": load_tokenizer(root, "tokenizer_2"),
            "tokenizer_3": load_tokenizer(root, "tokenizer_3") if (Path(root) / "tokenizer_3").is_dir() else None,
            "scheduler": load_scheduler(root)}


class _AcceleratedSD3(_Accelerated):
    _ACCEPTED = SD3_COMPONENTS
    _REFUSED = SD3_REFUSED
    _TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
    _DEFAULTS = {"image_encoder": None, "feature_extractor": None}

    @classmethod
    def _load_components(cls, root, manifest, **options) -> dict:
        return load_sd3_components(root, manifest, **options)

    def _refuse_unservable(self, arguments: dict) -> None:
        """Before any work: sizes outside the engines' range, guidance or batches the transformer was not built
        for, and what exported engines cannot compute."""
        size = self.native_size
        self._check_size(arguments.get("height") or size, arguments.get("width") or size,
                         encode=arguments.get("image") is not None)
        self._check_call(arguments)
        if arguments.get("skip_guidance_layers"):
            raise PipelineArgumentError("skip_guidance_layers (skip-layer guidance) removes transformer blocks in a "
                                        "third call per step, which an exported transformer cannot; call without it")
        if arguments.get("clip_skip") is not None:
            raise PipelineArgumentError(CLIP_SKIP)
        if arguments.get("ip_adapter_image") is not None or arguments.get("ip_adapter_image_embeds") is not None:
            raise PipelineArgumentError("IP-Adapter images are not supported by exported transformers")
        scale = (arguments.get("joint_attention_kwargs") or {}).get("scale")
        if scale not in (None, 1.0):
            raise PipelineArgumentError(f"joint_attention_kwargs scale={scale}: LoRA scales are not supported by "
                                        "exported transformers; fuse LoRA weights before diffaccel optimize")


_SD3_CALL = inspect.signature(StableDiffusion3Pipeline.__call__)
_SD3_IMG2IMG_CALL = inspect.signature(StableDiffusion3Img2ImgPipeline.__call__)


class AcceleratedStableDiffusion3Pipeline(_AcceleratedSD3, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(StableDiffusion3Pipeline.__call__)   # diffusers' signature and docs; body unchanged
    def __call__(self, *args, **kwargs):
        self._refuse_unservable(bound_call(_SD3_CALL, self, *args, **kwargs))
        return super().__call__(*args, **kwargs)


class AcceleratedStableDiffusion3Img2ImgPipeline(_AcceleratedSD3, StableDiffusion3Img2ImgPipeline):
    """``StableDiffusion3Img2ImgPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(StableDiffusion3Img2ImgPipeline.__call__)
    def __call__(self, *args, **kwargs):
        self._refuse_unservable(bound_call(_SD3_IMG2IMG_CALL, self, *args, **kwargs))
        return super().__call__(*args, **kwargs)
