"""What SD 2.x U-Net configs add to export (linear projections, upcast attention, per-block head counts,
v-prediction), and the parity failure message that lists every failing output."""
import pytest
import torch

from diffaccel.engines import AcceleratedStableDiffusionPipeline
from diffaccel.optimize import OptimizeConfig, optimize
from diffaccel.optimize.sources.builtins import RECIPES, _assemble
from diffaccel.optimize.families.sd import ModelGeometry, sd_specs
from diffaccel.optimize.config import ShapeRange
from diffaccel.optimize.artifact.errors import ParityError
from diffaccel.optimize.export.parity import check_parity

from .helpers import psnr


@pytest.fixture(scope="module")
def sd2_style(tmp_path_factory):
    """random:tiny with SD 2.x's U-Net options and a v-prediction scheduler, saved as a diffusers folder."""
    r = RECIPES["random:tiny"]
    unet = {**r["unet"], "use_linear_projection": True, "upcast_attention": True, "attention_head_dim": (2, 8)}
    sched = {**r["scheduler"], "prediction_type": "v_prediction"}
    pipe = _assemble(unet, r["vae"], r["text"], sched, seed=5)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sd2") / "src"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe, folder


@pytest.mark.slow
def test_sd2_options_export_and_match_diffusers(sd2_style, tmp_path):
    pipe, folder = sd2_style
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.upcast_attention
    out = tmp_path / "art"
    # the default exporter, for what text-to-image needs (the VAE encoder is random:tiny's, exported in test_contract)
    m = optimize(str(folder), out, OptimizeConfig(shapes=ShapeRange.parse(batch="1-2"),
                                                  components=("text_encoder", "unet", "vae_decoder")))
    assert all(c["validation"]["passed"] for c in m.components.values())
    acc = AcceleratedStableDiffusionPipeline.from_pretrained(out)
    acc.set_progress_bar_config(disable=True)
    assert acc.scheduler.config.prediction_type == "v_prediction"
    kw = dict(prompt=["a red circle", "a blue star"], num_inference_steps=5, guidance_scale=4.0, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(2), **kw).images
    got = acc(generator=torch.Generator().manual_seed(2), **kw).images
    assert got.shape == ref.shape == (2, 64, 64, 3)
    assert psnr(ref, got) >= 40


def test_parity_failure_lists_every_output_at_every_shape(tiny_pipe):
    spec = sd_specs(ModelGeometry.from_pipeline(tiny_pipe), ShapeRange())["text_encoder"]

    def reference(input_ids):
        return {"last_hidden_state": torch.zeros(input_ids.shape[0], 77, 32), "pooler_output": torch.ones(
            input_ids.shape[0], 32)}

    def candidate(input_ids):   # one output far off, the other just past the tolerance
        ref = reference(input_ids)
        return {"last_hidden_state": ref["last_hidden_state"] + 0.5,
                "pooler_output": ref["pooler_output"] * (1 + 3 * spec.rtol) + spec.atol}

    with pytest.raises(ParityError) as e:
        check_parity(spec, reference, candidate, advice="Try --exporter torchscript.")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("text_encoder does not match PyTorch: ")
    points = [spec.opt_values(), spec.alt_values()]
    assert points[0] != points[1]
    for values in points:
        shape = "x".join(str(v) for v in values.values())
        assert f"last_hidden_state@{shape}: max abs 0.5, rel inf" in msg
        assert f"pooler_output@{shape}: max abs" in msg
    assert msg.count("> tol") == 4 and msg.endswith("Try --exporter torchscript.")
    ok = check_parity(spec, reference, reference)
    assert ok["passed"] and len(ok["points"]) == 2
