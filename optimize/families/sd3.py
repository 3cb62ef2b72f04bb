"""The Stable Diffusion 3 / 3.5 family (``SD3Transformer2DModel``: SD3-medium, SD3.5-medium with its dual-attention
layers and qk RMS-norm, SD3.5-large and large-turbo), detected from the configs: two CLIP text encoders with
projections (their penultimate hidden states side by side, their pooled embeddings concatenated), the T5 encoder
``text_encoder_3`` (:mod:`~diffaccel.optimize.families.sd3_no_t5` is the same family without it, as diffusers allows),
the 16-channel VAE with its shift and scaling factors, and ``FlowMatchEulerDiscreteScheduler``.

The transformer's engine takes ``hidden_states`` (latents), ``timestep`` (sigma x 1000, one float per row),
``encoder_hidden_states`` (CLIP then T5 tokens: 77 + any ``max_sequence_length`` up to 512) and
``pooled_projections``; classifier-free guidance doubles its batch as for U-Nets. Latent
sides are capped by the transformer's position table (``pos_embed_max_size`` x patch). Skip-layer guidance (a third
call that removes blocks) cannot be an engine input: the drop-ins refuse ``skip_guidance_layers`` in one line.

>>> COMPONENTS
('text_encoder', 'text_encoder_2', 'text_encoder_3', 'transformer', 'vae_decoder', 'vae_encoder')
>>> mismatches({"transformer": {"_class_name": "SD3Transformer2DModel"}, "vae": {}, "text_encoder": {},
...             "text_encoder_2": {}})
['no text_encoder_3 (the T5 encoder; without it the model is the sd3-no-t5 family)']
"""
from __future__ import annotations

import dataclasses
from typing import Any

from diffaccel.optimize.artifact.errors import ShapeError
from diffaccel.optimize.artifact.specs import AxisRange, ComponentSpec, TensorSpec
from diffaccel.optimize.families import sd
from diffaccel.optimize.families.common import (  # noqa: F401  (T5_MAX, check_pixel_range...: the family surface)
    T5_MAX, GeometryBase, capture_transformer, check_pixel_range, clip_spec, max_length, meta_weight_bytes,
    pipeline_configs, pixel_axis, t5_axis, t5_spec, text_config, vae_problem, with_defaults)

NAME = "sd3"
TITLE = "Stable Diffusion 3/3.5"
PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
PIPELINE_CLASS = "StableDiffusion3Pipeline"
DROP_INS = ("diffaccel.engines.pipelines.sd3:AcceleratedStableDiffusion3Pipeline",
            "diffaccel.engines.pipelines.sd3:AcceleratedStableDiffusion3Img2ImgPipeline")
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder")
DENOISER = "transformer"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
SOURCE_MODEL = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3",
                "transformer": "transformer", "vae_decoder": "vae", "vae_encoder": "vae"}
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
LOAD_KWARGS: dict = {}
EXPORTERS = ("dynamo", "torchscript")
T5_LENGTH = 256                      # diffusers' max_sequence_length default for SD3
# what int8 keeps in float (module-path regexes; --keep-fp32 adds more): the adaLN modulations act on one vector per
# image (nothing to gain, and their error shifts and scales every token), as do the timestep/pooled-text embeddings;
# the patch embedding sees raw latents; the final projection's error is the model's output error
KEEP_FLOAT = {
    r"^time_text_embed(\.|$)": "timestep and pooled-text embeddings: one vector per image",
    r"\.norm1(_context)?\.linear$": "adaLN modulation: one vector per image scales and shifts every token",
    r"^norm_out\.linear$": "the final adaLN modulation: one vector per image",
    r"^pos_embed\.proj$": "the patch embedding sees raw latents (few channels: no int8 speed-up)",
    r"^proj_out$": "the final projection's error is the model's output error",
}


# ----------------------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------------------
def mismatches(configs: dict) -> list:
    """What in ``configs`` (see :func:`diffaccel.optimize.families.detect`) differs from SD3 with its T5 encoder."""
    return problems(configs, t5=True)


def problems(configs: dict, t5: bool) -> list:
    """What differs from SD3 / SD3.5 (``t5``: with the T5 encoder, else without)."""
    out = []
    pipeline = configs.get("pipeline")
    if pipeline and pipeline not in PIPELINES:
        out.append(f"pipeline is {pipeline}, not one of {', '.join(PIPELINES)}")
    den = configs.get("transformer") or configs.get("unet") or {}
    kind = den.get("_class_name", "UNet2DConditionModel" if configs.get("unet") else "missing")
    if kind != "SD3Transformer2DModel":
        out.append(f"denoiser is {kind}, not SD3Transformer2DModel")
    for name in ("text_encoder", "text_encoder_2"):
        if configs.get(name) is None:
            out.append(f"no {name} (SD3 has two CLIP text encoders with projections)")
    if t5 and configs.get("text_encoder_3") is None:
        out.append("no text_encoder_3 (the T5 encoder; without it the model is the sd3-no-t5 family)")
    if not t5 and configs.get("text_encoder_3") is not None:
        out.append("has a text_encoder_3 (the T5 encoder: the sd3 family)")
    return out + vae_problem(configs)


@dataclasses.dataclass(frozen=True)
class ModelGeometry(GeometryBase):
    """What the specs need to know about an SD3 pipeline (read from its configs, JSON-able)."""

    vocab_size: int
    vocab_size_2: int
    vocab_size_3: int                # 0: no T5 encoder
    max_length: int                  # CLIP tokens (77)
    t5_length: int                   # T5 tokens after them: the typical max_sequence_length (serves 1-512)
    text_hidden: int
    text_hidden_2: int
    t5_hidden: int                   # 0: no T5 encoder
    text_projection: int
    text_projection_2: int
    joint_attention_dim: int
    latent_channels: int
    in_channels: int
    vae_scale_factor: int
    latent_multiple: int             # the patch size: latent sides are multiples of it
    default_size: int
    max_latent: int                  # the position table's side x patch: the largest latent side it covers
    num_train_timesteps: int = 1000
    guidance_doubles_batch: bool = True

    @property
    def pooled_dim(self) -> int:
        return self.text_projection + self.text_projection_2

    @classmethod
    def from_configs(cls, configs: dict) -> "ModelGeometry":
        te, te2 = text_config(configs, "text_encoder"), text_config(configs, "text_encoder_2")
        t5 = with_defaults("T5Config", configs["text_encoder_3"]) if configs.get("text_encoder_3") is not None \
            else None
        tr = with_defaults("SD3Transformer2DModel", configs.get("transformer"))
        vae = with_defaults("AutoencoderKL", configs.get("vae"))
        scale, patch = size_factors(tr, vae)
        train = (configs.get("scheduler") or {}).get("num_train_timesteps") or 1000
        return cls(vocab_size=int(te["vocab_size"]), vocab_size_2=int(te2["vocab_size"]),
                   vocab_size_3=int(t5["vocab_size"]) if t5 else 0, max_length=max_length(configs, te),
                   t5_length=int(configs.get("t5_length") or T5_LENGTH), text_hidden=int(te["hidden_size"]),
                   text_hidden_2=int(te2["hidden_size"]), t5_hidden=int(t5["d_model"]) if t5 else 0,
                   text_projection=int(te["projection_dim"]), text_projection_2=int(te2["projection_dim"]),
                   joint_attention_dim=int(tr["joint_attention_dim"]), latent_channels=int(vae["latent_channels"]),
                   in_channels=int(tr["in_channels"]), vae_scale_factor=scale, latent_multiple=patch,
                   default_size=int(tr["sample_size"]) * scale,
                   max_latent=int(tr["pos_embed_max_size"] or tr["sample_size"]) * patch,
                   num_train_timesteps=int(train))


# ----------------------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------------------
def size_factors(denoiser_config, vae_config) -> tuple:
    """(VAE scale factor, the patch size: latent sides are multiples of it).

    >>> size_factors({"patch_size": 2}, {"block_out_channels": [128, 256, 512, 512]})
    (8, 2)
    """
    return 2 ** (len(vae_config.get("block_out_channels") or (64,)) - 1), int(denoiser_config.get("patch_size") or 2)


def latent_opt_size(configs: dict, shapes) -> tuple:
    """(height, width) of the typical latent for a :class:`ShapeRange`, from the configs alone."""
    geo = ModelGeometry.from_configs(configs)
    return pixel_axis(shapes.height, geo, "height").opt, pixel_axis(shapes.width, geo, "width").opt


def attention_bytes(configs: dict, latent_h: int, latent_w: int, batch: int = 2) -> int:
    """fp32 bytes of one joint attention's score matrix (batch x heads x (image + text tokens)^2): what an unfused
    graph holds. SD3.5-medium at 1024x1024 with CFG: 2 x 24 x (4096 + 333)^2 x 4 = 3.77 GB."""
    tr = configs.get("transformer") or {}
    patch = int(tr.get("patch_size") or 2)
    tokens = (latent_h // patch) * (latent_w // patch) + 77 + T5_LENGTH
    return int(batch * int(tr.get("num_attention_heads") or 24) * tokens * tokens * 4)


def _latent_axes(geo: ModelGeometry, shapes) -> dict:
    axes = {a: pixel_axis(getattr(shapes, a), geo, a) for a in ("height", "width")}
    for a, r in axes.items():
        if r.max > geo.max_latent:
            top = geo.max_latent * geo.vae_scale_factor
            raise ShapeError(f"{a} up to {r.max * geo.vae_scale_factor} px is more than this transformer's position "
                             f"table covers ({top} px); build for --{a} up to {top}")
    return axes


# ----------------------------------------------------------------------------------------------------------
# specs
# ----------------------------------------------------------------------------------------------------------
def specs(geo: ModelGeometry, shapes) -> dict:
    """The component specs of an SD3 pipeline for an image :class:`ShapeRange` (no ``text_encoder_3`` where the
    geometry has no T5 encoder)."""
    bmin, bmax = shapes.batch
    bopt = min(max(1, bmin), bmax)
    lat = _latent_axes(geo, shapes)
    text = AxisRange(1, bopt, 2 * bmax)
    k = 2 if geo.guidance_doubles_batch else 1
    C, t5 = geo.latent_channels, t5_axis(geo.t5_length)
    context = AxisRange(geo.max_length + t5.min, geo.max_length + t5.opt, geo.max_length + t5.max)   # CLIP + T5
    vae = sd.specs(sd.ModelGeometry(
        vocab_size=1, max_length=1, text_hidden=1, latent_channels=C, unet_in_channels=C, cross_attention_dim=1,
        vae_scale_factor=geo.vae_scale_factor, latent_multiple=geo.latent_multiple, default_size=geo.default_size,
        num_train_timesteps=geo.num_train_timesteps), shapes)
    out = {
        "text_encoder": clip_spec("text_encoder", geo.vocab_size, geo.max_length, geo.text_hidden,
                                  geo.text_projection, text),
        "text_encoder_2": clip_spec("text_encoder_2", geo.vocab_size_2, geo.max_length, geo.text_hidden_2,
                                    geo.text_projection_2, text),
        "text_encoder_3": t5_spec("text_encoder_3", geo.vocab_size_3, geo.t5_length, geo.t5_hidden, text),
        "transformer": ComponentSpec(
            "transformer",
            inputs=(TensorSpec("hidden_states", ("batch", geo.in_channels, "height", "width")),
                    TensorSpec("timestep", ("batch",), "float32", "timestep", geo.num_train_timesteps),
                    TensorSpec("encoder_hidden_states", ("batch", "context", geo.joint_attention_dim)),
                    TensorSpec("pooled_projections", ("batch", geo.pooled_dim))),
            outputs=(TensorSpec("out_hidden_states", ("batch", C, "height", "width")),),
            axes={"batch": AxisRange(1, k * bopt, k * bmax), "context": context, **lat}, atol=2e-3, rtol=2e-3),
        "vae_decoder": vae["vae_decoder"], "vae_encoder": vae["vae_encoder"],
    }
    if not geo.t5_hidden:
        del out["text_encoder_3"]
    return out


# ----------------------------------------------------------------------------------------------------------
# torch modules with exactly the spec's named inputs and outputs
# ----------------------------------------------------------------------------------------------------------
def export_module(component: str, pipe_or_models: Any):
    """Wrap the model(s) of ``component`` as an nn.Module with the spec's signature."""
    import torch

    if component in ("vae_decoder", "vae_encoder"):
        return sd.export_module(component, pipe_or_models)
    get = (lambda n: pipe_or_models[n]) if isinstance(pipe_or_models, dict) else (
        lambda n: getattr(pipe_or_models, n))

    class ClipWithProjection(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.model = get(name)

        def forward(self, input_ids):
            out = self.model(input_ids, output_hidden_states=True, return_dict=True)
            return out.text_embeds, out.last_hidden_state, out.hidden_states[-2]

    class T5(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = get("text_encoder_3")

        def forward(self, input_ids):
            return self.model(input_ids, return_dict=True).last_hidden_state

    class Transformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = get("transformer")

        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
            return self.model(hidden_states=hidden_states, timestep=timestep,
                              encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                              return_dict=False)[0]

    if component == "transformer":
        return Transformer().eval()
    return (T5() if component == "text_encoder_3" else ClipWithProjection(component)).eval()


def weight_bytes(configs: dict) -> dict:
    """fp32 bytes of each model's parameters and buffers (the position table is a buffer) from its config alone,
    on PyTorch's meta device."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    return meta_weight_bytes(configs, {
        "transformer": SD3Transformer2DModel.from_config, "vae": AutoencoderKL.from_config,
        "text_encoder": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
        "text_encoder_3": lambda c: T5EncoderModel(T5Config(**c))}, buffers=True)


def assets(pipe) -> dict:
    """What the assets stage writes besides the engines: tokenizers, per-component configs, pipeline facts."""
    encoders = {n: getattr(pipe, n) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None}
    return {"tokenizers": {n: getattr(pipe, n) for n in TOKENIZERS if getattr(pipe, n, None) is not None},
            "configs": {**{n: m.config.to_dict() for n, m in encoders.items()},
                        "transformer": dict(pipe.transformer.config), "vae_decoder": dict(pipe.vae.config),
                        "vae_encoder": dict(pipe.vae.config)},
            "pipeline": {f"{n}_class": type(m).__name__ for n, m in encoders.items()}}


# ----------------------------------------------------------------------------------------------------------
# calibration capture: the transformer's inputs at every flow-matching step, both guidance halves
# ----------------------------------------------------------------------------------------------------------
def capture_denoiser_inputs(pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int, height: int,
                            width: int, call_kwargs: "dict | None" = None) -> list:
    """Run ``pipe`` once per prompt and return the transformer's inputs at every step (both classifier-free
    guidance halves in each batch), as fp32 CPU tensors named as the spec's inputs."""
    return capture_transformer(pipe, prompts, ("hidden_states", "timestep", "encoder_hidden_states",
                                               "pooled_projections"), steps=steps, guidance_scale=guidance_scale,
                               seed=seed, call_kwargs={"height": height, "width": width, **(call_kwargs or {})})
