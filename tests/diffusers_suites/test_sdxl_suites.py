"""diffusers' own fast tests of StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline (base layout with aesthetic
scores, and the refiner without a first text encoder) and StableDiffusionXLInpaintPipeline (a regular 4-channel
U-Net, diffusers' "base model as inpainter", and the refiner layout), run against the drop-ins.

The tests named below fail for diffusers' own pipeline offline too (``DIFFACCEL_SUITES_REFERENCE=1``): they compare
with pixel slices recorded with the hub's tokenizer.
"""
import pytest

from diffaccel.engines.pipelines.sdxl import (
    AcceleratedStableDiffusionXLImg2ImgPipeline, AcceleratedStableDiffusionXLInpaintPipeline,
    AcceleratedStableDiffusionXLPipeline)

from . import harness
from .harness import OFFLINE_SLICE, SDXL, engine_suite

pytestmark = pytest.mark.slow
t2i = harness.upstream("pipelines.stable_diffusion_xl.test_stable_diffusion_xl")
i2i = harness.upstream("pipelines.stable_diffusion_xl.test_stable_diffusion_xl_img2img")
inpaint = harness.upstream("pipelines.stable_diffusion_xl.test_stable_diffusion_xl_inpaint")

StableDiffusionXLPipelineFastTests = engine_suite(t2i.StableDiffusionXLPipelineFastTests,
                                                  AcceleratedStableDiffusionXLPipeline, SDXL,
                                                  {"test_stable_diffusion_xl_euler": OFFLINE_SLICE})
StableDiffusionXLImg2ImgPipelineFastTests = engine_suite(i2i.StableDiffusionXLImg2ImgPipelineFastTests,
                                                         AcceleratedStableDiffusionXLImg2ImgPipeline, SDXL)
StableDiffusionXLImg2ImgRefinerOnlyPipelineFastTests = engine_suite(
    i2i.StableDiffusionXLImg2ImgRefinerOnlyPipelineFastTests, AcceleratedStableDiffusionXLImg2ImgPipeline, SDXL,
    {"test_stable_diffusion_xl_img2img_euler": OFFLINE_SLICE})
StableDiffusionXLInpaintPipelineFastTests = engine_suite(
    inpaint.StableDiffusionXLInpaintPipelineFastTests, AcceleratedStableDiffusionXLInpaintPipeline, SDXL,
    dict.fromkeys(("test_stable_diffusion_xl_inpaint_euler", "test_stable_diffusion_xl_refiner"), OFFLINE_SLICE))
