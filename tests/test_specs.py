import pytest

from diffaccel.optimize.config import ShapeRange
from diffaccel.optimize.artifact.errors import ShapeError
from diffaccel.optimize.families.sd import ModelGeometry, sd_specs
from diffaccel.optimize.artifact.specs import AxisRange, ComponentSpec, TensorSpec

GEO = ModelGeometry(vocab_size=1000, max_length=77, text_hidden=32, latent_channels=4, unet_in_channels=4,
                    cross_attention_dim=32, vae_scale_factor=8, latent_multiple=8, default_size=512,
                    num_train_timesteps=1000)


def test_sd_specs_derive_latent_ranges_from_pixels():
    specs = sd_specs(GEO, ShapeRange.parse(batch="1-4", height="256-768", width="512"))
    unet = specs["unet"]
    assert (unet.axes["height"].min, unet.axes["height"].opt, unet.axes["height"].max) == (32, 64, 96)
    assert (unet.axes["width"].min, unet.axes["width"].max) == (64, 64)
    assert unet.axes["height"].multiple == 8
    # classifier-free guidance doubles the U-Net batch
    assert (unet.axes["batch"].min, unet.axes["batch"].max) == (1, 8)
    assert specs["vae_decoder"].shape_of("sample", batch=2, height=64, width=64) == (2, 3, 512, 512)
    assert specs["vae_encoder"].shape_of("latent_parameters", batch=1, height=32, width=40) == (1, 8, 32, 40)


def test_default_range_is_around_native_size():
    unet = sd_specs(GEO, ShapeRange())["unet"]
    assert (unet.axes["height"].min * 8, unet.axes["height"].max * 8) == (256, 768)


def test_pixel_range_must_fit_the_unet_multiple():
    with pytest.raises(ShapeError, match="multiple of 64"):
        sd_specs(GEO, ShapeRange.parse(height="264-512"))
    with pytest.raises(ValueError, match="multiples of 8"):
        ShapeRange.parse(height="100")


def test_profile_and_check_and_axis_values():
    spec = sd_specs(GEO, ShapeRange.parse(batch="1-2", height="512", width="512"))["unet"]
    lo, opt, hi = spec.profile()["sample"]
    assert lo == (1, 4, 64, 64) and opt == (2, 4, 64, 64) and hi == (4, 4, 64, 64)
    with pytest.raises(ShapeError) as e:
        spec.check(batch=5, height=60)
    assert "batch=5" in str(e.value) and "height=60" in str(e.value)
    assert spec.axis_values({"sample": (2, 4, 64, 64)}) == {"batch": 2, "height": 64, "width": 64}


def test_dynamic_axes_and_shapes_cover_every_dynamic_dim():
    spec = sd_specs(GEO, ShapeRange())["vae_encoder"]
    axes = spec.dynamic_axes()
    assert axes["sample"] == {0: "batch", 2: "8xheight", 3: "8xwidth"}
    shapes = spec.dynamic_shapes()
    assert set(shapes["sample"]) == {0, 2, 3}


def test_alt_values_differ_and_are_allowed():
    spec = sd_specs(GEO, ShapeRange())["unet"]
    alt = spec.alt_values()
    assert alt != spec.opt_values()
    for k, v in alt.items():
        assert spec.axes[k].allows(v)


def test_spec_round_trips_through_dict():
    spec = ComponentSpec("toy", inputs=(TensorSpec("x", ("batch", 3)),), outputs=(TensorSpec("y", ("batch",)),),
                         axes={"batch": AxisRange(1, 2, 4)}, atol=0.1)
    again = ComponentSpec.from_dict("toy", spec.to_dict())
    assert again == spec


def test_axis_range_validates():
    with pytest.raises(ValueError):
        AxisRange(4, 2, 8)
    with pytest.raises(ValueError):
        AxisRange(2, 4, 9, multiple=2)
