"""Transformer denoisers (#27): SD3 / SD3.5 and FLUX.1 built from tiny recipes made in code, their drop-ins against
diffusers' own pipelines on the same weights and seeds (fp32: PSNR >= 40 dB), what they refuse, and int8.

random:tiny-sd3 is SD3.5-style (patch 2, a dual-attention block, qk RMS-norm) with a tiny T5; random:tiny-flux is
FLUX.1-dev-style (guidance embedding, dynamic shifting), random:tiny-flux-schnell schnell's layout.
"""
import numpy as np
import pytest
import torch

from diffaccel.optimize.artifact.errors import DiffaccelError, PipelineArgumentError, ShapeError
from diffaccel.optimize.config import ShapeRange

from .helpers import FAST, QUICK, psnr

SHAPES = ShapeRange.parse("1-2", "32-96", "32-96")
PROMPT = "a red circle on a blue background"


def _images(pipe, seed=1, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**{"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np",
                   "generator": torch.Generator().manual_seed(seed), **kw}).images


@pytest.fixture(scope="module")
def sd3(artifacts):
    return artifacts("random:tiny-sd3", "onnxruntime", shapes=SHAPES, **FAST)


@pytest.fixture(scope="module")
def flux(artifacts):
    return artifacts("random:tiny-flux", "onnxruntime", shapes=SHAPES)      # FLUX exports with dynamo (see below)


def _pair(artifact, src, task="text-to-image"):
    """(diffusers' pipeline, the drop-in) for ``task`` on the same weights."""
    import diffusers

    from diffaccel.engines.pipelines import pipeline_class
    from diffaccel.optimize.sources import resolve_source

    ref = resolve_source(src).load()
    acc = pipeline_class(artifact, task).from_pretrained(artifact)
    if task == "image-to-image":
        base = next(c for c in type(acc).__mro__ if c.__module__.startswith("diffusers."))
        ref = getattr(diffusers, base.__name__)(**ref.components)
    return ref, acc


def test_sd3_drop_in_matches_diffusers(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref, acc = _pair(sd3, "random:tiny-sd3")
    assert type(acc).__name__ == "AcceleratedStableDiffusion3Pipeline"
    cases = [dict(), dict(height=48, width=80), dict(num_images_per_prompt=2), dict(max_sequence_length=40),
             dict(guidance_scale=1.0)]
    for kw in cases:
        assert psnr(_images(ref, **kw), _images(acc, **kw)) >= 40, kw
    for pipe in (ref, acc):                                  # another flow-matching setting: shift 1 instead of 3
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    assert psnr(_images(ref), _images(acc)) >= 40
    ref.text_encoder_3 = acc.text_encoder_3 = None           # SD3 without T5: zeros where its tokens go
    assert psnr(_images(ref), _images(acc)) >= 40


def test_sd3_img2img_drop_in_matches_diffusers(sd3):
    ref, acc = _pair(sd3, "random:tiny-sd3", "image-to-image")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert type(acc).__name__ == "AcceleratedStableDiffusion3Img2ImgPipeline"
    assert psnr(_images(ref, image=image, strength=0.7), _images(acc, image=image, strength=0.7)) >= 40


def test_sd3_refuses_what_engines_cannot_compute_before_any_work(sd3):
    from diffaccel.engines.pipelines import pipeline_class

    acc = pipeline_class(sd3).from_pretrained(sd3)
    calls = []
    acc.transformer.engine = lambda **x: calls.append(x)
    for kw, match in ((dict(skip_guidance_layers=[1]), "skip-layer guidance"), (dict(clip_skip=1), "clip_skip"),
                      (dict(joint_attention_kwargs={"scale": 0.5}), "LoRA scales")):
        with pytest.raises(PipelineArgumentError, match=match):
            _images(acc, **kw)
    with pytest.raises(ShapeError, match="height=128"):
        _images(acc, height=128)
    assert calls == []


@pytest.mark.slow                 # the FLUX artifact (dynamo export) is the suite's costliest fixture
def test_flux_drop_in_matches_diffusers_with_dynamic_shifting_and_true_cfg(flux):
    ref, acc = _pair(flux, "random:tiny-flux")
    assert type(acc).__name__ == "AcceleratedFluxPipeline" and ref.scheduler.config.use_dynamic_shifting
    cases = [dict(height=64, width=64), dict(height=48, width=80), dict(height=64, width=64, num_images_per_prompt=2),
             dict(height=64, width=64, max_sequence_length=48),
             dict(height=64, width=64, negative_prompt="a blue star", true_cfg_scale=2.0)]
    for kw in cases:
        assert psnr(_images(ref, **kw), _images(acc, **kw)) >= 40, kw


@pytest.mark.slow                 # the FLUX artifact (dynamo export) is the suite's costliest fixture
def test_flux_img2img_drop_in_matches_diffusers(flux):
    ref, acc = _pair(flux, "random:tiny-flux", "image-to-image")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    kw = dict(image=image, strength=0.7, height=64, width=64)
    assert psnr(_images(ref, **kw), _images(acc, **kw)) >= 40


@pytest.mark.slow
def test_flux_schnell_drop_in_matches_diffusers(artifacts):
    schnell = artifacts("random:tiny-flux-schnell", "onnxruntime", shapes=SHAPES)
    ref, acc = _pair(schnell, "random:tiny-flux-schnell")
    assert not ref.transformer.config.guidance_embeds and not ref.scheduler.config.use_dynamic_shifting
    kw = dict(height=64, width=64, guidance_scale=0.0)
    assert psnr(_images(ref, **kw), _images(acc, **kw)) >= 40


def test_flux_stand_in_refuses_other_position_ids_and_packs_exactly():
    from diffaccel.engines.pipelines.denoisers import FluxTransformerShim
    from diffaccel.optimize.families.flux import pack, unpack

    x = torch.randn(2, 4, 6, 10)
    assert torch.equal(unpack(pack(x), 6, 10), x)
    ids = torch.tensor([[0.0, r, c] for r in range(3) for c in range(5)])
    assert FluxTransformerShim._grid(ids, torch.zeros(7, 3), 15, 7) == (3, 5)
    with pytest.raises(DiffaccelError, match="not text-to-image's"):
        FluxTransformerShim._grid(ids + torch.tensor([1.0, 0, 0]), torch.zeros(7, 3), 15, 7)   # Kontext-style


def test_flux_with_the_torchscript_exporter_says_to_use_dynamo(tmp_path, capsys):
    from .helpers import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "optimize", "random:tiny-flux", "-o", tmp_path / "x", "--exporter", "torchscript",
                           "--components", "transformer", "--height", "32-64", "--width", "32-64")
    assert_one_line_error(code, err, "torchscript", "--exporter dynamo")


def test_int8_transformer_keeps_its_modulation_and_output_in_float(artifacts):
    """SD3's int8 transformer: calibrated on every flow-matching step (both guidance halves), the adaLN modulation,
    the embeddings, the patch embedding and the final projection kept float by the family's rules (recorded), and
    within parity of PyTorch."""
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.config import QuantConfig
    from diffaccel.optimize.families import sd3

    out = artifacts("random:tiny-sd3", "onnxruntime", "int8", shapes=SHAPES, quant=QuantConfig(**QUICK), **FAST)
    entry = Manifest.load(out).components["transformer"]
    q = entry["quantize"]
    assert q["default_keep_fp32"] == sd3.KEEP_FLOAT and entry["validation"]["passed"]
    assert q["calibration_samples"] == QUICK["calib_size"] * QUICK["calib_steps"]
    assert len(q["kept_float"]) >= 5 and q["quantized_nodes"] > len(q["kept_float"])
    kept = torch.load(out / "transformer" / "quantized" / "validation_inputs.pt", weights_only=True)
    assert kept[0]["hidden_states"].shape[0] == 2                 # both classifier-free guidance halves


@pytest.mark.slow                 # the FLUX artifact (dynamo export) is the suite's costliest fixture
def test_serving_a_flow_matching_model_checks_its_schedules_and_refuses_diffusion_schedulers(sd3, flux):
    """The server's schedule check drives flow-matching schedulers as the pipelines do (no scale_model_input, a mu
    under dynamic shifting), and refuses a diffusion scheduler on a flow-matching model (it would run, wrongly)."""
    from diffaccel.engines.pipelines.schedulers import served
    from diffaccel.engines.serving.config import ServeConfig
    from diffaccel.engines.serving.models import RequestError, load_models, resolve
    from diffaccel.engines.serving.schemas import JobInput

    models, schedulers, cfg = load_models([sd3, flux]), served(), ServeConfig()
    sd3_name, flux_name = list(models)
    for name, scheduler in ((sd3_name, None), (sd3_name, "flow-euler"), (sd3_name, "flow-heun"), (flux_name, None),
                            (flux_name, "flow-euler")):
        work = resolve(JobInput(prompt="x", steps=3, model=name, scheduler=scheduler), models, schedulers, cfg)
        assert work["steps"] == 3 and work["guidance_scale"] == models[name].default_guidance
    with pytest.raises(RequestError, match="flow-heun cannot run 3 step.*mu"):    # FLUX's pipeline would fail alike
        resolve(JobInput(prompt="x", steps=3, model=flux_name, scheduler="flow-heun"), models, schedulers, cfg)
    with pytest.raises(RequestError, match="flow matching .* allowed: default, flow-euler, flow-heun"):
        resolve(JobInput(prompt="x", scheduler="ddim", model=next(iter(models))), models, schedulers, cfg)
    assert {m.default_guidance for m in models.values()} == {7.0, 3.5}     # diffusers' SD3 and FLUX defaults
