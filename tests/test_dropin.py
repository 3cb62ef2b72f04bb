"""The drop-in pipelines behave as diffusers' own: same call signatures, same scheduler swaps, diffusers' keywords
to from_pretrained, VAE slicing/tiling, and INFO logs of what was loaded.

One artifact is built for the module, from random:tiny saved as a diffusers folder whose scheduler_config.json omits
``timestep_spacing`` (as SD 1.5's on the hub does). It is exported with the TorchScript exporter, which builds it in a
fraction of the dynamo exporter's time; nothing tested here depends on the exporter.
"""
import inspect
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline)

from diffaccel.engines import AcceleratedStableDiffusionImg2ImgPipeline, AcceleratedStableDiffusionPipeline
from diffaccel.optimize.artifact.errors import DiffaccelError, ShapeError

from .conftest import psnr

LOGGER = "diffaccel.engines.pipelines.base"


@pytest.fixture(scope="module")
def folder(tiny_pipe, tmp_path_factory):
    """random:tiny as a diffusers folder whose scheduler config omits timestep_spacing."""
    path = tmp_path_factory.mktemp("dropin") / "tiny-sd"
    tiny_pipe.save_pretrained(str(path), safe_serialization=True)
    cfg_path = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["timestep_spacing"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="module")
def artifact(folder, tmp_path_factory):
    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.config import ShapeRange

    out = tmp_path_factory.mktemp("dropin-artifact") / "tiny-ort"
    optimize(str(folder), out, OptimizeConfig(exporter="torchscript", shapes=ShapeRange.parse("1-2", "32-96", "32-96")))
    return out


@pytest.fixture(scope="module")
def ref(folder):
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def acc(artifact):
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(artifact)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kw):
    args = dict(prompt="a red circle", num_inference_steps=4, output_type="np", guidance_scale=5.0)
    return pipe(generator=torch.Generator().manual_seed(5), **{**args, **kw}).images


# ---- 1. diffusers' __call__ signature, sizes checked before any work ---------------------------------------------
@pytest.mark.parametrize("ours,theirs", [(AcceleratedStableDiffusionPipeline, StableDiffusionPipeline),
                                         (AcceleratedStableDiffusionImg2ImgPipeline, StableDiffusionImg2ImgPipeline)])
def test_call_signature_is_diffusers(ours, theirs):
    assert inspect.signature(ours.__call__) == inspect.signature(theirs.__call__)


def test_img2img_checks_size_before_any_work(acc):
    i2i = AcceleratedStableDiffusionImg2ImgPipeline(**acc.components)
    calls = []
    acc.text_encoder.engine, original = (lambda **x: calls.append(1)), acc.text_encoder.engine
    try:
        with pytest.raises(ShapeError, match="height=200 cannot be served"):
            i2i("x", torch.rand(1, 3, 200, 64), num_inference_steps=2)            # positional, as diffusers allows
        with pytest.raises(ShapeError, match="width=200 cannot be served"):
            i2i(prompt="x", image=torch.rand(1, 3, 64, 200), num_inference_steps=2)
    finally:
        acc.text_encoder.engine = original
    assert calls == []


def test_img2img_takes_latents_and_odd_sizes_as_diffusers_does(acc, ref):
    i2i = AcceleratedStableDiffusionImg2ImgPipeline(**acc.components)
    ref_i2i = StableDiffusionImg2ImgPipeline(**ref.components)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))   # 64 px, not an 8 px image
    image = np.random.default_rng(0).random((1, 70, 64, 3), dtype=np.float32)     # diffusers crops to 64 x 64
    for img in (latents, image):
        a = _run(ref_i2i, image=img, strength=0.6)
        b = _run(i2i, image=img, strength=0.6)
        assert a.shape == b.shape == (1, 64, 64, 3) and psnr(a, b) >= 40


# ---- 2. the source's scheduler config, so scheduler swaps match diffusers' ----------------------------------------
def test_artifact_keeps_the_source_scheduler_config(folder, artifact):
    name = "scheduler/scheduler_config.json"
    assert (artifact / name).read_bytes() == (folder / name).read_bytes()


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_scheduler_swap_matches_diffusers(acc, ref, scheduler):
    before = acc.scheduler, ref.scheduler
    try:
        for pipe in (acc, ref):
            pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
            pipe.scheduler.set_timesteps(10)
        assert acc.scheduler.timesteps.tolist() == ref.scheduler.timesteps.tolist()
        assert psnr(_run(ref), _run(acc)) >= 40
    finally:
        acc.scheduler, ref.scheduler = before


# ---- 3. diffusers' from_pretrained keywords ------------------------------------------------------------------------
def test_from_pretrained_honours_scheduler_and_tokenizer(artifact, ref, tmp_path):
    sched = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(artifact, scheduler=sched, tokenizer=ref.tokenizer)
    assert pipe.scheduler is sched and pipe.tokenizer is ref.tokenizer
    pipe.save_pretrained(tmp_path / "copy")                                       # and saves them
    again = AcceleratedStableDiffusionPipeline.from_pretrained(tmp_path / "copy")
    plain = lambda cfg: {k: set(v) if k == "_use_default_values" else v for k, v in cfg.items()}  # noqa: E731
    assert plain(again.scheduler.config) == plain(sched.config)
    assert again.tokenizer.get_vocab() == ref.tokenizer.get_vocab()


def test_from_pretrained_warns_once_about_keywords_meaningless_for_engines(artifact, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        AcceleratedStableDiffusionPipeline.from_pretrained(artifact, torch_dtype=torch.float16, variant="fp16",
                                                           local_files_only=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert len(warnings) == 1
    assert all(k in warnings[0] for k in ("torch_dtype=", "variant=", "local_files_only=", "--precision"))


@pytest.mark.parametrize("kw,match", [(dict(threds=2), r"unknown keyword\(s\) threds; it accepts provider, threads"),
                                      (dict(unet=object()), r"unet= \(the artifact's engines replace it"),
                                      (dict(scheduler=None), "scheduler=None")])
def test_from_pretrained_refuses_other_keywords(artifact, kw, match):
    with pytest.raises(TypeError, match=match) as err:
        AcceleratedStableDiffusionPipeline.from_pretrained(artifact, **kw)
    assert isinstance(err.value, DiffaccelError) and "\n" not in str(err.value)


# ---- 4. VAE slicing and tiling -------------------------------------------------------------------------------------
def test_vae_slicing_gives_the_same_images(acc):
    kw = dict(prompt=["a red circle", "a blue star"], num_inference_steps=3)
    whole = _run(acc, **kw)
    batches = []
    acc.vae.engine, original = (lambda **x: batches.append(x["latent_sample"].shape[0]) or original(**x)), \
        acc.vae.engine
    try:
        acc.enable_vae_slicing()                     # diffusers' pipeline-level switch: pipe.vae.enable_slicing()
        assert acc.vae.use_slicing
        sliced = _run(acc, **kw)
    finally:
        acc.vae.engine = original
        acc.vae.disable_slicing()
    assert batches == [1, 1] and not acc.vae.use_slicing
    assert sliced.shape == (2, 64, 64, 3) and psnr(whole, sliced) >= 60


def test_vae_tiling_matches_diffusers(acc, ref):
    z = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(1))     # 96 px: tiles of 64 and 48 px
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    acc.vae.enable_tiling()
    ref.vae.enable_tiling()
    try:
        with torch.no_grad():
            assert psnr(ref.vae.decode(z).sample / 2, acc.vae.decode(z).sample / 2) >= 40
            a, b = ref.vae.encode(x).latent_dist.mean, acc.vae.encode(x).latent_dist.mean
        torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)
    finally:
        acc.vae.disable_tiling()
        ref.vae.disable_tiling()


def test_vae_tiling_refused_when_engines_cannot_serve_the_tiles(acc):
    vae = acc.vae
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 128, 16                   # engines serve 32-96 px
    try:
        with pytest.raises(ShapeError, match=r"tiles of 128 pixels, .* serves 32-96 x 32-96 pixels .* rebuild"):
            acc.enable_vae_tiling()
        assert not vae.use_tiling
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


# ---- 5. what from_pretrained loaded, logged at INFO ----------------------------------------------------------------
def test_from_pretrained_logs_what_it_loaded(artifact, caplog):
    """Under diffusers' pipeline logger, where diffusers logs what its from_pretrained loaded (its own save/load
    test reads each component's name there); that logger does not propagate to the root."""
    from diffaccel.optimize.artifact.manifest import Manifest

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            AcceleratedStableDiffusionPipeline.from_pretrained(artifact)
    finally:
        logger.removeHandler(caplog.handler)
    text = caplog.text
    for name, entry in Manifest.load(artifact).components.items():
        assert f"Loaded {name} as onnxruntime engine (fp32, cpu) from {artifact / entry['engine']}" in text
    assert f"Loaded scheduler as DDIMScheduler from {artifact / 'scheduler' / 'scheduler_config.json'}" in text
    assert "Loaded tokenizer as CLIPTokenizer" in text
