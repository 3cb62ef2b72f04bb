"""The FLUX.1 family (``FluxTransformer2DModel``: [dev] with its guidance embedding, [schnell] without), detected from
the configs: a CLIP text encoder (its pooled output), the T5 encoder ``text_encoder_2`` (its token embeddings), the
16-channel VAE with its shift and scaling factors, ``FlowMatchEulerDiscreteScheduler`` (dynamic shifting for dev).

The transformer's engine takes the latents **unpacked**, ``hidden_states (batch, channels, height, width)``: it packs
the 2x2 patches and makes the rotary position ids (``img_ids`` over the latent grid, zero ``txt_ids``) inside the
graph, so its spec has the batch/height/width axes every family has and any size in range needs no other input; the
drop-in's stand-in unpacks what the pipeline packed. ``timestep`` is the pipeline's sigma in [0, 1] (the graph scales
it), ``guidance`` an input of [dev] engines only, ``encoder_hidden_states`` any T5 length 1-512. The batch is never
doubled: FLUX.1 is guidance-distilled, and diffusers' true CFG (``true_cfg_scale`` with a negative prompt) is a second
call of the same batch. The rotary tables are computed in float32 in the graph (diffusers uses float64 on CPUs, which
TensorRT cannot run; the difference is below 1e-5).

>>> COMPONENTS
('text_encoder', 'text_encoder_2', 'transformer', 'vae_decoder', 'vae_encoder')
>>> size_factors({"patch_size": 1}, {"block_out_channels": [128, 256, 512, 512]})
(8, 2)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from diffaccel.optimize.artifact.specs import AxisRange, ComponentSpec, TensorSpec
from diffaccel.optimize.families import sd, sd3
from diffaccel.optimize.families.common import (  # noqa: F401  (check_pixel_range: the family surface)
    GeometryBase, capture_transformer, check_pixel_range, max_length, meta_weight_bytes, pipeline_configs,
    pixel_axis, t5_axis, t5_spec, text_config, vae_problem, with_defaults)

NAME = "flux"
TITLE = "FLUX.1"
PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline")
PIPELINE_CLASS = "FluxPipeline"
DROP_INS = ("diffaccel.engines.pipelines.flux:AcceleratedFluxPipeline",
            "diffaccel.engines.pipelines.flux:AcceleratedFluxImg2ImgPipeline")
COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder")
DENOISER = "transformer"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SOURCE_MODEL = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "transformer": "transformer",
                "vae_decoder": "vae", "vae_encoder": "vae"}
TOKENIZERS = ("tokenizer", "tokenizer_2")
LOAD_KWARGS: dict = {}
# torchscript has no ONNX form for torch.nn.RMSNorm (the q/k norms) and freezes the rotary embedding's reshape
EXPORTERS = ("dynamo",)
T5_LENGTH = 512                      # diffusers' max_sequence_length default for FLUX (schnell is often run at 256)
# what int8 keeps in float: SD3's reasons (sd3.KEEP_FLOAT), with FLUX's names (x_embedder: the patch embedding;
# single blocks' modulation is norm.linear)
KEEP_FLOAT = {
    r"^time_text_embed(\.|$)": "timestep, guidance and pooled-text embeddings: one vector per image",
    r"\.norm1(_context)?\.linear$|^single_transformer_blocks\.\d+\.norm\.linear$":
        "adaLN modulation: one vector per image scales and shifts every token",
    r"^norm_out\.linear$": "the final adaLN modulation: one vector per image",
    r"^x_embedder$": "the patch embedding sees raw latents (few channels: no int8 speed-up)",
    r"^proj_out$": "the final projection's error is the model's output error",
}
DEFAULT_SAMPLE = 128                 # FluxPipeline.default_sample_size: 1024 px with FLUX.1's VAE


def mismatches(configs: dict) -> list:
    """What in ``configs`` (see :func:`diffaccel.optimize.families.detect`) differs from FLUX.1."""
    out = []
    pipeline = configs.get("pipeline")
    if pipeline and pipeline not in PIPELINES:
        out.append(f"pipeline is {pipeline}, not one of {', '.join(PIPELINES)}")
    den = configs.get("transformer") or configs.get("unet") or {}
    kind = den.get("_class_name", "UNet2DConditionModel" if configs.get("unet") else "missing")
    if kind != "FluxTransformer2DModel":
        out.append(f"denoiser is {kind}, not FluxTransformer2DModel")
    if configs.get("text_encoder") is None:
        out.append("no text_encoder (FLUX.1's CLIP text encoder: its pooled output)")
    if configs.get("text_encoder_2") is None:
        out.append("no text_encoder_2 (FLUX.1's T5 encoder)")
    return out + vae_problem(configs)


@dataclasses.dataclass(frozen=True)
class ModelGeometry(GeometryBase):
    """What the specs need to know about a FLUX.1 pipeline (read from its configs, JSON-able)."""

    vocab_size: int
    vocab_size_2: int
    max_length: int                  # CLIP tokens (77)
    t5_length: int                   # the typical T5 length (serves 1-512)
    text_hidden: int
    t5_hidden: int
    pooled_dim: int
    joint_attention_dim: int
    latent_channels: int             # the VAE's: the transformer's in_channels / 4 (2x2 patches)
    guidance_embeds: bool            # [dev]: the guidance scale is an input
    vae_scale_factor: int
    latent_multiple: int             # 2: latents are packed in 2x2 patches
    default_size: int
    num_train_timesteps: int = 1000
    guidance_doubles_batch: bool = False

    @classmethod
    def from_configs(cls, configs: dict) -> "ModelGeometry":
        te = text_config(configs, "text_encoder")
        t5 = with_defaults("T5Config", configs.get("text_encoder_2"))
        tr = with_defaults("FluxTransformer2DModel", configs.get("transformer"))
        vae = with_defaults("AutoencoderKL", configs.get("vae"))
        scale, multiple = size_factors(tr, vae)
        return cls(vocab_size=int(te["vocab_size"]), vocab_size_2=int(t5["vocab_size"]),
                   max_length=max_length(configs, te), t5_length=int(configs.get("t5_length") or T5_LENGTH),
                   text_hidden=int(te["hidden_size"]), t5_hidden=int(t5["d_model"]),
                   pooled_dim=int(tr["pooled_projection_dim"]), joint_attention_dim=int(tr["joint_attention_dim"]),
                   latent_channels=int(tr["in_channels"]) // 4, guidance_embeds=bool(tr["guidance_embeds"]),
                   vae_scale_factor=scale, latent_multiple=multiple, default_size=DEFAULT_SAMPLE * scale)


def size_factors(denoiser_config, vae_config) -> tuple:
    """(VAE scale factor, 2: latent sides are multiples of 2, the packed patch)."""
    return 2 ** (len(vae_config.get("block_out_channels") or (64,)) - 1), 2


def latent_opt_size(configs: dict, shapes) -> tuple:
    geo = ModelGeometry.from_configs(configs)
    return pixel_axis(shapes.height, geo, "height").opt, pixel_axis(shapes.width, geo, "width").opt


def attention_bytes(configs: dict, latent_h: int, latent_w: int, batch: int = 1) -> int:
    """fp32 bytes of one attention's score matrix (batch x heads x (image + text tokens)^2): FLUX.1 at 1024x1024 with
    512 T5 tokens: 24 x 4608^2 x 4 = 2.04 GB."""
    tr = configs.get("transformer") or {}
    tokens = (latent_h // 2) * (latent_w // 2) + T5_LENGTH
    return int(batch * int(tr.get("num_attention_heads") or 24) * tokens * tokens * 4)


def specs(geo: ModelGeometry, shapes) -> dict:
    """The component specs of a FLUX.1 pipeline for an image :class:`ShapeRange`."""
    bmin, bmax = shapes.batch
    bopt = min(max(1, bmin), bmax)
    lat = {a: pixel_axis(getattr(shapes, a), geo, a) for a in ("height", "width")}
    text, C = AxisRange(1, bopt, bmax), geo.latent_channels
    vae = sd.specs(sd.ModelGeometry(
        vocab_size=1, max_length=1, text_hidden=1, latent_channels=C, unet_in_channels=C, cross_attention_dim=1,
        vae_scale_factor=geo.vae_scale_factor, latent_multiple=geo.latent_multiple, default_size=geo.default_size,
        num_train_timesteps=geo.num_train_timesteps), shapes)
    clip = sd.specs(sd.ModelGeometry(
        vocab_size=geo.vocab_size, max_length=geo.max_length, text_hidden=geo.text_hidden, latent_channels=C,
        unet_in_channels=C, cross_attention_dim=1, vae_scale_factor=geo.vae_scale_factor,
        latent_multiple=geo.latent_multiple, default_size=geo.default_size, num_train_timesteps=1), shapes)
    guidance = (TensorSpec("guidance", ("batch",), "float32", "uniform", 10),) if geo.guidance_embeds else ()
    return {
        "text_encoder": dataclasses.replace(clip["text_encoder"], axes={"batch": text}),
        "text_encoder_2": t5_spec("text_encoder_2", geo.vocab_size_2, geo.t5_length, geo.t5_hidden, text),
        "transformer": ComponentSpec(
            "transformer",
            inputs=(TensorSpec("hidden_states", ("batch", C, "height", "width")),
                    TensorSpec("timestep", ("batch",), "float32", "uniform", 1),
                    *guidance,
                    TensorSpec("encoder_hidden_states", ("batch", "text", geo.joint_attention_dim)),
                    TensorSpec("pooled_projections", ("batch", geo.pooled_dim))),
            outputs=(TensorSpec("out_hidden_states", ("batch", C, "height", "width")),),
            axes={"batch": AxisRange(1, bopt, bmax), "text": t5_axis(geo.t5_length), **lat},
            atol=2e-3, rtol=2e-3),
        "vae_decoder": vae["vae_decoder"], "vae_encoder": vae["vae_encoder"],
    }


def pack(latents):
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, height: int, width: int):
    """(B, H/2 * W/2, 4C) -> (B, C, H, W) for latent sides ``height`` x ``width``."""
    b, _, c4 = tokens.shape
    return tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, c4 // 4, height, width)


def export_module(component: str, pipe_or_models: Any):
    """Wrap the model(s) of ``component`` as an nn.Module with the spec's signature (the transformer: unpacked
    latents in and out, ids made in the graph, float32 rotary tables)."""
    import torch

    if component in ("vae_decoder", "vae_encoder", "text_encoder"):
        return sd.export_module(component, pipe_or_models)
    if component == "text_encoder_2":
        return sd3.export_module("text_encoder_3", {"text_encoder_3": _get(pipe_or_models, "text_encoder_2")})
    model = float32_rope(_get(pipe_or_models, "transformer"))

    class Transformer(torch.nn.Module):          # FLUX.1 [schnell]: no guidance input
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
            return self.run(hidden_states, timestep, None, encoder_hidden_states, pooled_projections)

        def run(self, hidden_states, timestep, guidance, encoder_hidden_states, pooled_projections):
            b, c, h, w = hidden_states.shape
            rows = torch.arange(h // 2, dtype=torch.float32)[:, None].expand(h // 2, w // 2)
            cols = torch.arange(w // 2, dtype=torch.float32)[None, :].expand(h // 2, w // 2)
            img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
            txt_ids = encoder_hidden_states.new_zeros(encoder_hidden_states.shape[1], 3)
            out = self.model(hidden_states=pack(hidden_states), timestep=timestep, guidance=guidance,
                             pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                             txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            return unpack(out, h, w)

    class GuidedTransformer(Transformer):        # FLUX.1 [dev]: the guidance scale is an input
        def forward(self, hidden_states, timestep, guidance, encoder_hidden_states, pooled_projections):
            return self.run(hidden_states, timestep, guidance, encoder_hidden_states, pooled_projections)

    guided = bool(getattr(model.config, "guidance_embeds", False))
    return (GuidedTransformer() if guided else Transformer()).eval()


def _get(pipe_or_models, name: str):
    return pipe_or_models[name] if isinstance(pipe_or_models, dict) else getattr(pipe_or_models, name)


def float32_rope(model):
    """``model`` with its rotary position embedding computed in float32 (a shallow copy: the weights are shared, the
    original keeps diffusers' float64 tables)."""
    import copy

    import torch

    class Float32Rope(torch.nn.Module):
        def __init__(self, rope):
            super().__init__()
            self.theta, self.axes_dim = rope.theta, rope.axes_dim

        def forward(self, ids):
            from diffusers.models.embeddings import get_1d_rotary_pos_embed

            parts = [get_1d_rotary_pos_embed(d, ids.float()[:, i], theta=self.theta, repeat_interleave_real=True,
                                             use_real=True, freqs_dtype=torch.float32)
                     for i, d in enumerate(self.axes_dim)]
            return torch.cat([c for c, _ in parts], dim=-1), torch.cat([s for _, s in parts], dim=-1)

    twin = copy.copy(model)
    twin._modules = dict(model._modules)
    twin.pos_embed = Float32Rope(model.pos_embed)
    return twin


def weight_bytes(configs: dict) -> dict:
    """fp32 bytes of each model's parameters and buffers from its config alone, on PyTorch's meta device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    return meta_weight_bytes(configs, {
        "transformer": FluxTransformer2DModel.from_config, "vae": AutoencoderKL.from_config,
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "text_encoder_2": lambda c: T5EncoderModel(T5Config(**c))}, buffers=True)


def assets(pipe) -> dict:
    """What the assets stage writes besides the engines: tokenizers, per-component configs, pipeline facts."""
    encoders = {n: getattr(pipe, n) for n in TEXT_ENCODERS}
    return {"tokenizers": {n: getattr(pipe, n) for n in TOKENIZERS},
            "configs": {**{n: m.config.to_dict() for n, m in encoders.items()},
                        "transformer": dict(pipe.transformer.config), "vae_decoder": dict(pipe.vae.config),
                        "vae_encoder": dict(pipe.vae.config)},
            "pipeline": {f"{n}_class": type(m).__name__ for n, m in encoders.items()}}


def capture_denoiser_inputs(pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int, height: int,
                            width: int, call_kwargs: "dict | None" = None) -> list:
    """The transformer's inputs at every flow-matching step of ``pipe(prompt)``, as the engine takes them: the
    packed latents unpacked over the grid ``img_ids`` spans, the pipeline's sigma, [dev]'s guidance."""
    names = ("hidden_states", "timestep", "guidance", "encoder_hidden_states", "pooled_projections", "img_ids")

    def prepare(record):
        ids = record.pop("img_ids")
        ids = ids[0] if ids.ndim == 3 else ids
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        record["hidden_states"] = unpack(record["hidden_states"], 2 * rows, 2 * cols)
        return record

    return capture_transformer(pipe, prompts, names, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                   call_kwargs={"height": height, "width": width, **(call_kwargs or {})},
                                   prepare=prepare)
