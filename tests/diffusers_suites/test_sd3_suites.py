"""diffusers' own fast tests of StableDiffusion3Pipeline and StableDiffusion3Img2ImgPipeline, run against the drop-ins."""
import pytest

from diffaccel.engines.pipelines.sd3 import AcceleratedStableDiffusion3Img2ImgPipeline, AcceleratedStableDiffusion3Pipeline

from . import harness
from .harness import SD3, engine_suite

pytestmark = pytest.mark.slow
t2i = harness.upstream("pipelines.stable_diffusion_3.test_pipeline_stable_diffusion_3")
i2i = harness.upstream("pipelines.stable_diffusion_3.test_pipeline_stable_diffusion_3_img2img")

TestStableDiffusion3 = engine_suite(t2i.StableDiffusion3PipelineFastTests, AcceleratedStableDiffusion3Pipeline, SD3)
TestStableDiffusion3Img2Img = engine_suite(i2i.StableDiffusion3Img2ImgPipelineFastTests,
                                           AcceleratedStableDiffusion3Img2ImgPipeline, SD3)
