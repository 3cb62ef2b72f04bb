"""The drop-in pipelines against diffusers' own, across schedulers, batch sizes and resolutions."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline)

from diffaccel.engines import AcceleratedStableDiffusionImg2ImgPipeline, AcceleratedStableDiffusionPipeline
from diffaccel.optimize.artifact.errors import ShapeError

from .helpers import psnr


@pytest.fixture(scope="module")
def acc(tiny_ort):
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(tiny_ort)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("batch,size", [(1, 64), (2, 96)])
def test_same_images_as_diffusers(acc, tiny_pipe, scheduler, batch, size):
    acc.scheduler = scheduler.from_config(tiny_pipe.scheduler.config)
    ref_sched = tiny_pipe.scheduler
    tiny_pipe.scheduler = scheduler.from_config(ref_sched.config)
    try:
        kw = dict(prompt=["a red circle", "a blue star"][:batch], negative_prompt=["green"] * batch,
                  num_inference_steps=6, height=size, width=size, guidance_scale=5.0, output_type="np")
        ref = tiny_pipe(generator=torch.Generator().manual_seed(7), **kw).images
        got = acc(generator=torch.Generator().manual_seed(7), **kw).images
    finally:
        tiny_pipe.scheduler = ref_sched
    assert got.shape == (batch, size, size, 3)
    assert psnr(ref, got) >= 40


def test_call_arguments_pass_through(acc, tiny_pipe):
    seen = []

    def on_step(pipe, i, t, kwargs):
        seen.append(i)
        return kwargs

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = tiny_pipe.encode_prompt("a star", "cpu", 1, False)[0]
    out = acc(prompt_embeds=embeds.repeat(2, 1, 1), num_inference_steps=3, latents=latents, guidance_scale=1.0,
              callback_on_step_end=on_step, output_type="pt")
    assert seen == [0, 1, 2] and out.images.shape == (2, 3, 64, 64)
    many = acc("a circle", num_images_per_prompt=3, num_inference_steps=2, output_type="latent")
    assert many.images.shape == (3, 4, 8, 8)


def test_batch_larger_than_engine_max_is_chunked(acc):
    out = acc(["a circle"] * 5, num_inference_steps=2, output_type="np")   # engines serve batch <= 4
    assert out.images.shape == (5, 64, 64, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize("h,w", [(100, 64), (64, 60), (128, 64), (16, 64)])
def test_bad_sizes_fail_before_any_work(acc, h, w):
    calls = []
    acc.text_encoder.engine, original = (lambda **x: calls.append(1)), acc.text_encoder.engine
    try:
        with pytest.raises(ShapeError, match=r"height must be 32-96 and width 32-96, in multiples of 16"):
            acc("a circle", height=h, width=w, num_inference_steps=2)
    finally:
        acc.text_encoder.engine = original
    assert calls == []


def test_img2img_matches_diffusers(tiny_ort, tiny_pipe):
    acc = AcceleratedStableDiffusionImg2ImgPipeline.from_pretrained(tiny_ort)
    ref = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    for p in (acc, ref):
        p.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a green triangle", image=image, strength=0.6, num_inference_steps=5, output_type="np")
    a = ref(generator=torch.Generator().manual_seed(2), **kw).images
    b = acc(generator=torch.Generator().manual_seed(2), **kw).images
    assert psnr(a, b) >= 40
    with pytest.raises(ShapeError):
        acc(prompt="x", image=torch.rand(1, 3, 200, 64), num_inference_steps=2)
