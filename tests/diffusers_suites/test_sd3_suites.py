"""diffusers' own fast tests of StableDiffusion3Pipeline and StableDiffusion3Img2ImgPipeline, run against the drop-ins."""
import pytest

from diffaccel.engines.pipelines.sd3 import AcceleratedStableDiffusion3Img2ImgPipeline, AcceleratedStableDiffusion3Pipeline

from . import harness
from .harness import NOT_FOR_ENGINES, SD3, Offline, engine_backed, skips

pytestmark = pytest.mark.slow
t2i = harness.upstream("pipelines.stable_diffusion_3.test_pipeline_stable_diffusion_3")
i2i = harness.upstream("pipelines.stable_diffusion_3.test_pipeline_stable_diffusion_3_img2img")


class TestStableDiffusion3(Offline, t2i.StableDiffusion3PipelineFastTests):
    pipeline_class = engine_backed(AcceleratedStableDiffusion3Pipeline, SD3)
    locals().update(skips(NOT_FOR_ENGINES))


class TestStableDiffusion3Img2Img(Offline, i2i.StableDiffusion3Img2ImgPipelineFastTests):
    pipeline_class = engine_backed(AcceleratedStableDiffusion3Img2ImgPipeline, SD3)
    locals().update(skips(NOT_FOR_ENGINES))
