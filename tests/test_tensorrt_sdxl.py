"""TensorRT profiles for the SDXL family's extra U-Net inputs, checked without TensorRT (the builds themselves need an
NVIDIA GPU: tests/test_tensorrt.py's gpu tests). The widths come from the geometry the configs give (SDXL base's
here), never from constants, so a refiner (5 time ids) or a guidance-off build (Turbo: no doubled batch) gets its
own profile and its own cache key."""
import dataclasses

from diffaccel.engines.backends.onnxruntime import provider_options
from diffaccel.engines.backends.tensorrt_env import TrtEnvironment, engine_cache_key
from diffaccel.optimize.config import ShapeRange
from diffaccel.optimize.families import sdxl
from diffaccel.optimize.stages.tensorrt_build import trt_profile

# SDXL base 1.0's numbers as its configs give them (CLIP ViT-L 768 + OpenCLIP bigG 1280 = 2048; pooled 1280)
BASE = sdxl.ModelGeometry(vocab_size=49408, vocab_size_2=49408, max_length=77, text_hidden=768, text_hidden_2=1280,
                          pooled_dim=1280, time_ids=6, latent_channels=4, unet_in_channels=4, cross_attention_dim=2048,
                          vae_scale_factor=8, latent_multiple=4, default_size=1024, num_train_timesteps=1000)
ENV = TrtEnvironment(tensorrt="10.13.0.35", gpu="NVIDIA L4", compute_capability="8.9")
SHAPES = ShapeRange.parse("1-2", "768-1024", "1024")


def _unet(geo=BASE, shapes=SHAPES):
    return sdxl.specs(geo, shapes)["unet"]


def test_unet_profile_has_the_added_conditioning_inputs_at_the_cfg_batch():
    prof = trt_profile(_unet())
    assert list(prof) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert prof["sample"] == ((1, 4, 96, 128), (2, 4, 128, 128), (4, 4, 128, 128))
    assert prof["encoder_hidden_states"] == ((1, 77, 2048), (2, 77, 2048), (4, 77, 2048))
    assert prof["text_embeds"] == ((1, 1280), (2, 1280), (4, 1280))
    assert prof["time_ids"] == ((1, 6), (2, 6), (4, 6))


def test_refiner_and_guidance_off_builds_get_their_own_profiles_and_keys():
    refiner = dataclasses.replace(BASE, time_ids=5, text_hidden=0, vocab_size=0, cross_attention_dim=1280)
    turbo = dataclasses.replace(BASE, guidance_doubles_batch=False)
    profiles = {"base": trt_profile(_unet()), "refiner": trt_profile(_unet(refiner)), "turbo": trt_profile(_unet(turbo))}
    assert profiles["refiner"]["time_ids"] == ((1, 5), (2, 5), (4, 5))
    assert profiles["refiner"]["encoder_hidden_states"][2] == (4, 77, 1280)
    assert profiles["turbo"]["sample"] == ((1, 4, 96, 128), (1, 4, 128, 128), (2, 4, 128, 128))
    assert profiles["turbo"]["text_embeds"][2] == (2, 1280)
    keys = {name: engine_cache_key("a" * 64, "unet", "fp16", None, prof, ENV) for name, prof in profiles.items()}
    assert len(set(keys.values())) == 3
    assert "text_encoder" not in sdxl.specs(refiner, SHAPES)        # the refiner has no first text encoder


def test_text_encoder_2_profile_and_the_ort_tensorrt_ep_shapes():
    te2 = trt_profile(sdxl.specs(BASE, SHAPES)["text_encoder_2"])
    assert te2 == {"input_ids": ((1, 77), (1, 77), (4, 77))}
    opts = provider_options("TensorrtExecutionProvider", cache_dir="/tmp/x", profile=_unet().profile())
    assert opts["trt_profile_max_shapes"] == ("sample:4x4x128x128,timestep:4,encoder_hidden_states:4x77x2048,"
                                              "text_embeds:4x1280,time_ids:4x6")
