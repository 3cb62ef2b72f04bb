"""The Stable Diffusion 1.x/2.x family: detection, component specs, torch export wrappers with exactly the specs'
named inputs and outputs (used by export, validation and the torch backend), and the calibration capture.
LCM-distilled U-Nets (``time_cond_proj_dim``) get a ``timestep_cond`` input and an undoubled batch.

>>> COMPONENTS
('text_encoder', 'unet', 'vae_decoder', 'vae_encoder')
>>> mismatches({"unet": {"in_channels": 9}, "vae": {"latent_channels": 4}})
['in_channels=9 (an inpainting U-Net: latents, mask and masked-image latents)']
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from diffaccel.optimize.artifact.specs import AxisRange, ComponentSpec, TensorSpec
from diffaccel.optimize.families.common import (  # noqa: F401  (check_pixel_range, inpainting_inputs...: the surface)
    GeometryBase, capture_with, check_pixel_range, in_channels_problem, inpainting_inputs, max_length,
    meta_weight_bytes, pipeline_configs, pixel_axis, text_config, with_defaults)

NAME = "sd"
TITLE = "Stable Diffusion 1.x/2.x"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",      # diffusers pipelines it covers
             "StableDiffusionInpaintPipeline")
PIPELINE_CLASS = "StableDiffusionPipeline"                                    # what sources load
DROP_INS = ("diffaccel.engines.pipelines.sd:AcceleratedStableDiffusionPipeline",
            "diffaccel.engines.pipelines.sd:AcceleratedStableDiffusionImg2ImgPipeline",
            "diffaccel.engines.pipelines.sd:AcceleratedStableDiffusionInpaintPipeline")   # a 4-channel U-Net
#                                                        inpaints as diffusers does: the mask blended in per step
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
DENOISER = "unet"                                                             # the denoiser's role, diffusers' name
TEXT_ENCODERS = ("text_encoder",)
SOURCE_MODEL = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
TOKENIZERS = ("tokenizer",)
LOAD_KWARGS = {"safety_checker": None, "requires_safety_checker": False}   # diffusers' loading keywords
EXPORTERS = ("dynamo", "torchscript")
# what int8 keeps in float (module-path regexes): what costs quality and gains no speed (--keep-fp32 adds more)
KEEP_FLOAT = {
    r"^time_embedding(\.|$)": "the timestep MLP is tiny and its error reaches every block",
    r"\.time_emb_proj$": "per-block timestep projections act on one vector per image: nothing to gain",
    r"^conv_in$": "the first conv sees raw latents (4 channels: no int8 speed-up)",
    r"^conv_out$": "the last conv's error is the model's output error",
}


# ----------------------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------------------
def mismatches(configs: dict) -> list:
    """What in ``configs`` (see :func:`diffaccel.optimize.families.detect`) this family cannot export; [] = fits."""
    return problems(configs, inpaint=False)


def problems(configs: dict, inpaint: bool, pipelines: tuple = PIPELINES) -> list:
    """What in ``configs`` differs from SD 1.x/2.x (``inpaint``: its inpainting U-Nets)."""
    problems = []
    unet, vae = configs.get("unet"), configs.get("vae") or {}
    pipeline = configs.get("pipeline")
    if pipeline and pipeline not in pipelines:
        problems.append(f"pipeline is {pipeline}, not one of {', '.join(pipelines)}")
    unet_class = (unet or configs.get("transformer") or {}).get("_class_name", "UNet2DConditionModel")
    if unet is None or unet_class != "UNet2DConditionModel":
        problems.append(f"denoiser is {unet_class}, not UNet2DConditionModel")
    else:
        if unet.get("addition_embed_type"):
            problems.append(f"addition_embed_type={unet['addition_embed_type']} (SD 1.x/2.x U-Nets have no added "
                            "embedding)")
        problems += in_channels_problem(unet, vae, inpaint)
    if configs.get("text_encoder_2"):
        problems.append("has a text_encoder_2 (a second text encoder, as SDXL)")
    vae_class = vae.get("_class_name", "AutoencoderKL")
    if vae_class != "AutoencoderKL":
        problems.append(f"vae is {vae_class}, not AutoencoderKL (the exporter needs its latent distribution; "
                        "replace the VAE with an AutoencoderKL)")
    return problems


@dataclasses.dataclass(frozen=True)
class ModelGeometry(GeometryBase):
    """What the specs need to know about a loaded pipeline (read from its configs, JSON-able)."""

    vocab_size: int
    max_length: int
    text_hidden: int
    latent_channels: int
    unet_in_channels: int
    cross_attention_dim: int
    vae_scale_factor: int
    latent_multiple: int      # the U-Net needs latent sizes divisible by this (2 ** number of downsamplers)
    default_size: int         # the model's native image size in pixels
    num_train_timesteps: int
    guidance_doubles_batch: bool = True   # classifier-free guidance runs both halves in one U-Net batch (a build
    #                                       for guidance <= 1 sets it False)
    timestep_cond_dim: int = 0            # LCM-distilled U-Nets: width of the guidance embedding (0: none)

    @classmethod
    def from_configs(cls, configs: dict) -> "ModelGeometry":
        """From the configs alone (:func:`~diffaccel.optimize.families.detect`'s, plus ``max_length``, the tokenizer's,
        and ``scheduler`` where known): what a benchmark builds inputs from without loading weights."""
        te = text_config(configs, "text_encoder")
        return cls(vocab_size=int(te["vocab_size"]), max_length=max_length(configs, te),
                   text_hidden=int(te["hidden_size"]), **denoiser_geometry(configs))


def denoiser_geometry(configs: dict) -> dict:
    """The geometry fields the U-Net, the VAE and the scheduler decide (every U-Net family's ``ModelGeometry`` has
    them), from the configs."""
    unet = with_defaults("UNet2DConditionModel", configs.get("unet"))
    vae = with_defaults("AutoencoderKL", configs.get("vae"))
    vae_scale, latent_multiple = size_factors(unet, vae)
    sample = unet["sample_size"] if isinstance(unet["sample_size"], int) else unet["sample_size"][0]
    train = (configs.get("scheduler") or {}).get("num_train_timesteps") or 1000
    return dict(latent_channels=int(vae["latent_channels"]), unet_in_channels=int(unet["in_channels"]),
                cross_attention_dim=int(unet["cross_attention_dim"]), vae_scale_factor=vae_scale,
                latent_multiple=latent_multiple, default_size=int(sample) * vae_scale, num_train_timesteps=int(train),
                guidance_doubles_batch=unet.get("time_cond_proj_dim") is None,
                timestep_cond_dim=int(unet.get("time_cond_proj_dim") or 0))


def latent_opt_size(configs: dict, shapes) -> tuple:
    """(height, width) of the U-Net's typical (opt) latent for a :class:`ShapeRange`, from the configs alone (what
    calibration runs at; the pre-flight memory check sizes the int8 build by it)."""
    unet, vae = configs["unet"], configs["vae"]
    scale, multiple = size_factors(unet, vae)
    sample = unet.get("sample_size") or 64
    sample = sample if isinstance(sample, int) else sample[0]
    geo = ModelGeometry(vocab_size=1, max_length=1, text_hidden=1, latent_channels=1, unet_in_channels=1,
                        cross_attention_dim=1, vae_scale_factor=scale, latent_multiple=multiple,
                        default_size=int(sample) * scale, num_train_timesteps=1)
    return pixel_axis(shapes.height, geo, "height").opt, pixel_axis(shapes.width, geo, "width").opt


def attention_bytes(configs: dict, latent_h: int, latent_w: int, batch: int = 2) -> int:
    """fp32 bytes of the largest attention-score tensor of one U-Net step (batch x heads x tokens^2 at the first
    attention level): what an unfused ONNX graph holds, two or three at a time, beside its weights. From the config
    alone; SD 1.5 at 512x512 with CFG (batch 2): 8 heads x 4096^2 tokens -> 1.07 GB; SDXL at 1024x1024 (attention
    starts a level down): 10 heads x 4096^2 -> 1.34 GB.

    >>> round(attention_bytes({"unet": {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    ...                                  "attention_head_dim": 8}}, 64, 64) / 1e9, 2)
    1.07
    """
    unet = configs["unet"]
    types = list(unet.get("down_block_types") or ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])   # diffusers'
    # defaults, which configs written in code may leave out
    level = next((i for i, t in enumerate(types) if "Attn" in t), None)
    if level is None:
        return 0
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    heads = heads[level] if isinstance(heads, (list, tuple)) else heads
    tokens = (latent_h >> level) * (latent_w >> level)
    return int(batch * heads * tokens * tokens * 4)


def size_factors(denoiser_config, vae_config) -> tuple:
    """(VAE scale factor, latent multiple the U-Net needs) from the U-Net and VAE configs (dicts or diffusers
    FrozenDicts), with diffusers' defaults where a key is absent (AutoencoderKL: one block; UNet2DConditionModel:
    four down blocks).

    >>> size_factors({"down_block_types": ["A", "B", "C"]}, {"block_out_channels": [16, 32, 64]})
    (4, 4)
    >>> size_factors({}, {"block_out_channels": [128, 256, 512, 512]})   # SD 1.x/2.x
    (8, 8)
    >>> size_factors({}, {})
    (1, 8)
    """
    vae_blocks = len(vae_config.get("block_out_channels") or (64,))
    unet_blocks = len(denoiser_config.get("down_block_types") or (0,) * 4)
    return 2 ** (vae_blocks - 1), 2 ** (unet_blocks - 1)


def specs(geo: ModelGeometry, shapes) -> dict:
    """The four component specs of a Stable Diffusion 1.x/2.x pipeline for an image :class:`ShapeRange`."""
    bmin, bmax = shapes.batch
    bopt = min(max(1, bmin), bmax)
    lat_h = pixel_axis(shapes.height, geo, "height")
    lat_w = pixel_axis(shapes.width, geo, "width")
    images = AxisRange(bmin, bopt, bmax)
    # classifier-free guidance doubles the U-Net batch; batch 1 without guidance is also served. LCM-distilled
    # U-Nets (a timestep_cond input: the guidance embedding) never run classifier-free guidance in diffusers, and a
    # build for guidance <= 1 (optimize --guidance 0: SDXL-Turbo) has it off (see Context.specs)
    k = 2 if geo.guidance_doubles_batch else 1
    unet_batch = AxisRange(1, k * bopt, k * bmax)
    lcm = (TensorSpec("timestep_cond", ("batch", geo.timestep_cond_dim)),) if geo.timestep_cond_dim else ()
    lat = {"height": lat_h, "width": lat_w}
    L, D, C = geo.max_length, geo.text_hidden, geo.latent_channels
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", ("batch", L), "int64", "tokens", geo.vocab_size),),
            outputs=(TensorSpec("last_hidden_state", ("batch", L, D)), TensorSpec("pooler_output", ("batch", D))),
            axes={"batch": AxisRange(1, bopt, 2 * bmax)}, atol=2e-3, rtol=1e-3),
        "unet": ComponentSpec(
            "unet",
            inputs=(TensorSpec("sample", ("batch", geo.unet_in_channels, "height", "width")),
                    TensorSpec("timestep", ("batch",), "float32", "timestep", geo.num_train_timesteps),
                    TensorSpec("encoder_hidden_states", ("batch", L, geo.cross_attention_dim)), *lcm),
            outputs=(TensorSpec("out_sample", ("batch", C, "height", "width")),),
            axes={"batch": unet_batch, **lat}, atol=2e-3, rtol=2e-3),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latent_sample", ("batch", C, "height", "width")),),
            outputs=(TensorSpec("sample", ("batch", 3, f"{geo.vae_scale_factor}*height",
                                           f"{geo.vae_scale_factor}*width")),),
            axes={"batch": images, **lat}, atol=5e-3, rtol=2e-3),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            inputs=(TensorSpec("sample", ("batch", 3, f"{geo.vae_scale_factor}*height",
                                          f"{geo.vae_scale_factor}*width")),),
            outputs=(TensorSpec("latent_parameters", ("batch", 2 * C, "height", "width")),),
            axes={"batch": images, **lat}, atol=5e-3, rtol=2e-3),
    }


# ----------------------------------------------------------------------------------------------------------
# torch modules with exactly the spec's named inputs and outputs (used by export, validation and the torch backend)
# ----------------------------------------------------------------------------------------------------------
def export_module(component: str, pipe_or_models: Any):
    """Wrap the diffusers/transformers model(s) of ``component`` as an nn.Module with the spec's signature."""
    import torch

    get = (lambda n: pipe_or_models[n]) if isinstance(pipe_or_models, dict) else (
        lambda n: getattr(pipe_or_models, n))

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = get("text_encoder")

        def forward(self, input_ids):
            out = self.model(input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = get("unet")

        def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
            return self.model(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                              return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = get("vae")

        def forward(self, latent_sample):
            return self.model.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = get("vae")

        def forward(self, sample):
            return self.model.encode(sample, return_dict=True).latent_dist.parameters

    table: dict[str, Callable] = {"text_encoder": TextEncoder, "unet": UNet,
                                  "vae_decoder": VaeDecoder, "vae_encoder": VaeEncoder}
    return table[component]().eval()


def weight_bytes(configs: dict) -> dict:
    """fp32 weight bytes of each model, from its config alone (built on PyTorch's meta device: no memory, no
    weights): what the pre-flight memory check sizes a build by. A model whose config is missing counts 0."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return meta_weight_bytes(configs, {"unet": UNet2DConditionModel.from_config, "vae": AutoencoderKL.from_config,
                                       "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c))})


def assets(pipe) -> dict:
    """What the assets stage writes besides the engines: tokenizers, per-component configs, pipeline facts."""
    return {"tokenizers": {n: getattr(pipe, n) for n in TOKENIZERS},
            "configs": {"text_encoder": pipe.text_encoder.config.to_dict(), "unet": dict(pipe.unet.config),
                        "vae_decoder": dict(pipe.vae.config), "vae_encoder": dict(pipe.vae.config)},
            "pipeline": {"text_encoder_class": type(pipe.text_encoder).__name__}}


# ----------------------------------------------------------------------------------------------------------
# calibration capture: the U-Net's inputs at every denoising step of real sampling
# ----------------------------------------------------------------------------------------------------------
def capture_denoiser_inputs(pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int, height: int,
                        width: int, call_kwargs: "dict | None" = None) -> list:
    """Run ``pipe`` once per prompt and return the U-Net's inputs at every step, as dicts of CPU tensors named
    ``sample``, ``timestep`` (one per batch row) and ``encoder_hidden_states`` (``call_kwargs``: more arguments of
    the pipeline call, e.g. an inpainting image and mask)."""
    return capture_with(pipe, prompts, steps=steps, guidance_scale=guidance_scale, seed=seed,
                        call_kwargs={"height": height, "width": width, **(call_kwargs or {})})


sd_specs = specs   # the name the tests and tools know
