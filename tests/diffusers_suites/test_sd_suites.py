"""diffusers' own fast tests of StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (with an inpainting U-Net and with a regular one, diffusers' "simple inpaint"), run
against the drop-ins. The memory and IP-Adapter classes of the same files test torch offloading and image
projections, which an engine has none of.

The tests named below fail for diffusers' own pipeline offline too (``DIFFACCEL_SUITES_REFERENCE=1``): they compare
with pixel slices recorded with the hub's tokenizer, or load a checkpoint from the hub.
"""
import pytest

from diffaccel.engines.pipelines.sd import (
    AcceleratedStableDiffusionImg2ImgPipeline, AcceleratedStableDiffusionInpaintPipeline,
    AcceleratedStableDiffusionPipeline)

from . import harness
from .harness import OFFLINE_HUB, OFFLINE_SLICE, SD, engine_suite

pytestmark = pytest.mark.slow
t2i = harness.upstream("pipelines.stable_diffusion.test_stable_diffusion")
i2i = harness.upstream("pipelines.stable_diffusion.test_stable_diffusion_img2img")
inpaint = harness.upstream("pipelines.stable_diffusion.test_stable_diffusion_inpaint")

T2I_OFFLINE = {
    **dict.fromkeys(("test_stable_diffusion_ddim", "test_stable_diffusion_ddim_factor_8", "test_stable_diffusion_pndm",
                     "test_stable_diffusion_k_lms", "test_stable_diffusion_k_euler_ancestral",
                     "test_stable_diffusion_k_euler", "test_stable_diffusion_negative_prompt"), OFFLINE_SLICE),
    "test_stable_diffusion_long_prompt": "counts the truncated tokens of a long prompt as the hub tokenizer splits "
                                         "it; the offline tokenizer splits it otherwise (diffusers' own pipeline "
                                         "fails it here too)",
    **dict.fromkeys(("test_stable_diffusion_no_safety_checker", "test_pipeline_accept_tuple_type_unet_sample_size"),
                    OFFLINE_HUB),
}
I2I_OFFLINE = dict.fromkeys(("test_stable_diffusion_img2img_default_case", "test_stable_diffusion_img2img_default_case_lcm",
                             "test_stable_diffusion_img2img_default_case_lcm_custom_timesteps",
                             "test_stable_diffusion_img2img_negative_prompt",
                             "test_stable_diffusion_img2img_multiple_init_images", "test_stable_diffusion_img2img_k_lms",
                             "test_stable_diffusion_img2img_tiny_autoencoder"), OFFLINE_SLICE)
INPAINT_OFFLINE = dict.fromkeys(("test_stable_diffusion_inpaint", "test_stable_diffusion_inpaint_euler"), OFFLINE_SLICE)

TestStableDiffusionPipeline = engine_suite(t2i.TestStableDiffusionPipeline, AcceleratedStableDiffusionPipeline, SD,
                                           T2I_OFFLINE)
TestStableDiffusionImg2ImgPipeline = engine_suite(i2i.TestStableDiffusionImg2ImgPipeline,
                                                  AcceleratedStableDiffusionImg2ImgPipeline, SD, I2I_OFFLINE)
TestStableDiffusionInpaintPipeline = engine_suite(inpaint.TestStableDiffusionInpaintPipeline,
                                                  AcceleratedStableDiffusionInpaintPipeline, SD, INPAINT_OFFLINE)
TestStableDiffusionSimpleInpaintPipeline = engine_suite(inpaint.TestStableDiffusionSimpleInpaintPipeline,
                                                        AcceleratedStableDiffusionInpaintPipeline, SD, INPAINT_OFFLINE)
