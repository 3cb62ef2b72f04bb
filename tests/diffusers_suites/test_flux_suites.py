"""diffusers' own fast tests of FluxPipeline and FluxImg2ImgPipeline, run against the drop-ins.

Of test_pipeline_flux.py's classes, the pipeline's own (``TestFluxPipeline``) and img2img's run here. The others test
what hooks or rewrites torch modules, which an engine has none of: IP-Adapter image projections, memory and group
offloading, the step caches (pyramid attention broadcast, FasterCache, first-block, TaylorSeer, MagCache) and LoRA
loading (diffaccel fuses LoRAs at build time: docs/lora.md).
"""
import pytest

from diffaccel.engines.pipelines.flux import AcceleratedFluxImg2ImgPipeline, AcceleratedFluxPipeline

from . import harness
from .harness import FLUX, engine_suite

pytestmark = pytest.mark.slow
t2i = harness.upstream("pipelines.flux.test_pipeline_flux")
i2i = harness.upstream("pipelines.flux.test_pipeline_flux_img2img")


TestFluxPipeline = engine_suite(t2i.TestFluxPipeline, AcceleratedFluxPipeline, FLUX)
TestFluxImg2Img = engine_suite(i2i.FluxImg2ImgPipelineFastTests, AcceleratedFluxImg2ImgPipeline, FLUX)
