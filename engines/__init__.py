"""diffaccel.engines: engines behind one protocol, and drop-in diffusers pipelines that run on them.

>>> from diffaccel.engines import AcceleratedStableDiffusionPipeline                # doctest: +SKIP
>>> pipe = AcceleratedStableDiffusionPipeline.from_pretrained("engines/sd-ort")    # doctest: +SKIP
>>> image = pipe("a red circle", num_inference_steps=20).images[0]                 # doctest: +SKIP
"""
from __future__ import annotations

__all__ = ["AcceleratedStableDiffusionPipeline", "AcceleratedStableDiffusionImg2ImgPipeline",
           "AcceleratedStableDiffusionXLPipeline", "AcceleratedStableDiffusionXLImg2ImgPipeline",
           "AcceleratedStableDiffusionInpaintPipeline", "AcceleratedStableDiffusionXLInpaintPipeline",
           "AcceleratedStableDiffusion3Pipeline", "AcceleratedStableDiffusion3Img2ImgPipeline",
           "AcceleratedFluxPipeline", "AcceleratedFluxImg2ImgPipeline", "load_engine",
           "BACKENDS", "Engine", "DeepCacheConfig"]

_LAZY = {"AcceleratedStableDiffusionPipeline": ".pipelines.sd", "AcceleratedStableDiffusionImg2ImgPipeline": ".pipelines.sd",
         "AcceleratedStableDiffusionXLPipeline": ".pipelines.sdxl",
         "AcceleratedStableDiffusionXLImg2ImgPipeline": ".pipelines.sdxl",
         "AcceleratedStableDiffusionInpaintPipeline": ".pipelines.sd",
         "AcceleratedStableDiffusionXLInpaintPipeline": ".pipelines.sdxl",
         "AcceleratedStableDiffusion3Pipeline": ".pipelines.sd3",
         "AcceleratedStableDiffusion3Img2ImgPipeline": ".pipelines.sd3",
         "AcceleratedFluxPipeline": ".pipelines.flux", "AcceleratedFluxImg2ImgPipeline": ".pipelines.flux",
         "load_engine": ".base", "BACKENDS": ".base", "Engine": ".base", "DeepCacheConfig": ".pipelines.cache"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
