"""The Stable Diffusion XL family (base, Turbo and LCM-distilled U-Nets): detection from the configs, component specs, torch export
wrappers with exactly the specs' named inputs and outputs, and the calibration capture.

Nothing is hard-coded from the published SDXL checkpoints: the number of time ids is what the U-Net's added
embedding takes besides the pooled text embedding, ``(projection_class_embeddings_input_dim - pooled width) /
addition_time_embed_dim``, the pooled width is ``text_encoder_2``'s ``projection_dim``, and the cross-attention width
must be the two text encoders' hidden sizes side by side (diffusers concatenates their penultimate hidden states).
An LCM-distilled U-Net (``time_cond_proj_dim`` set) gets a ``timestep_cond`` input (the guidance-scale embedding:
exporting it without would silently drop the guidance) and no doubled batch (diffusers runs no classifier-free
guidance for it). The refiner (5 time ids: sizes and an aesthetic score, no first text encoder) is the family
:mod:`~diffaccel.optimize.families.sdxl_refiner`, built from the same pieces.

>>> COMPONENTS
('text_encoder', 'text_encoder_2', 'unet', 'vae_decoder', 'vae_encoder')
>>> unet = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "cross_attention_dim": 2048,
...         "projection_class_embeddings_input_dim": 2816}
>>> te, te2 = {"hidden_size": 768}, {"hidden_size": 1280, "projection_dim": 1280}
>>> time_id_count(unet, te2)
6
>>> mismatches({"unet": unet, "vae": {}, "text_encoder": te, "text_encoder_2": te2})
[]
>>> mismatches({"unet": {**unet, "addition_embed_type": "image"}, "vae": {}, "text_encoder": te,
...             "text_encoder_2": te2})
['addition_embed_type=image (SDXL conditions on text_time: pooled text embeddings and time ids)']
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from diffaccel.optimize.artifact.specs import AxisRange, ComponentSpec, TensorSpec
from diffaccel.optimize.families import sd
from diffaccel.optimize.families.common import (
    capture_with, in_channels_problem, max_length, meta_weight_bytes, pipeline_configs, text_config, with_defaults)
from diffaccel.optimize.families.sd import check_pixel_range, attention_bytes, latent_opt_size, size_factors  # noqa: F401 (surface)

NAME = "sdxl"
TITLE = "Stable Diffusion XL"
PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
PIPELINE_CLASS = "StableDiffusionXLPipeline"
DROP_INS = ("diffaccel.engines.pipelines.sdxl:AcceleratedStableDiffusionXLPipeline",
            "diffaccel.engines.pipelines.sdxl:AcceleratedStableDiffusionXLImg2ImgPipeline",
            "diffaccel.engines.pipelines.sdxl:AcceleratedStableDiffusionXLInpaintPipeline")   # diffusers' "base
#                                                        model as inpainter": a 4-channel U-Net, the mask per step
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
DENOISER = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SOURCE_MODEL = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
                "vae_decoder": "vae", "vae_encoder": "vae"}
TOKENIZERS = ("tokenizer", "tokenizer_2")
LOAD_KWARGS = {"add_watermarker": False}     # diffusers' loading keywords: the invisible watermark stays off
KEEP_FLOAT = sd.KEEP_FLOAT                   # what int8 keeps in float: SD's U-Net rules
EXPORTERS = sd.EXPORTERS
BASE_TIME_IDS = 6                            # original size, crop top-left, target size (each (h, w))
REFINER_TIME_IDS = 5                         # original size, crop top-left, aesthetic score


# ----------------------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------------------
def time_id_count(unet: dict, text_encoder_2: dict) -> "int | None":
    """How many time ids the U-Net's added embedding takes, from the configs (None where they cannot say)."""
    total = unet.get("projection_class_embeddings_input_dim")
    per = unet.get("addition_time_embed_dim")
    pooled = (text_encoder_2 or {}).get("projection_dim")
    if not (total and per and pooled) or (total - pooled) % per:
        return None
    return (total - pooled) // per


def mismatches(configs: dict) -> list:
    """What in ``configs`` (see :func:`diffaccel.optimize.families.detect`) this family cannot export; [] = fits."""
    return problems(configs, refiner=False)


def problems(configs: dict, refiner: bool, inpaint: bool = False, pipelines: tuple = PIPELINES) -> list:
    """What in ``configs`` differs from base SDXL (``refiner=False``), the SDXL refiner, or (``inpaint``) their
    inpainting U-Nets."""
    problems = []
    unet, vae = configs.get("unet") or {}, configs.get("vae") or {}
    te, te2 = configs.get("text_encoder"), configs.get("text_encoder_2")
    pipeline = configs.get("pipeline")
    if pipeline and pipeline not in pipelines:
        problems.append(f"pipeline is {pipeline}, not one of {', '.join(pipelines)}")
    unet_class = (unet or configs.get("transformer") or {}).get("_class_name", "UNet2DConditionModel")
    if not configs.get("unet") or unet_class != "UNet2DConditionModel":
        problems.append(f"denoiser is {unet_class}, not UNet2DConditionModel")
    kind = unet.get("addition_embed_type")
    if kind != "text_time":
        problems.append(f"addition_embed_type={kind} (SDXL conditions on text_time: pooled text embeddings and "
                        "time ids)")
    if te2 is None:
        problems.append("no text_encoder_2 (SDXL's second text encoder, a CLIPTextModelWithProjection)")
    elif kind == "text_time":
        problems += _conditioning_problems(unet, te, te2, configs, refiner)
    problems += in_channels_problem(unet, vae, inpaint)
    vae_class = vae.get("_class_name", "AutoencoderKL")
    if vae_class != "AutoencoderKL":
        problems.append(f"vae is {vae_class}, not AutoencoderKL")
    return problems


def _conditioning_problems(unet: dict, te, te2: dict, configs: dict, refiner: bool) -> list:
    n = time_id_count(unet, te2)
    if n is None:
        return [f"projection_class_embeddings_input_dim={unet.get('projection_class_embeddings_input_dim')} is not "
                f"text_encoder_2's projection_dim ({te2.get('projection_dim')}) plus a whole number of "
                f"addition_time_embed_dim ({unet.get('addition_time_embed_dim')})"]
    # the U-Net's time ids and the text encoders decide the layout; requires_aesthetics_score is a pipeline setting
    # (diffusers builds either way, and its call names the setting when it does not match the U-Net)
    fits = (te is None and n == REFINER_TIME_IDS) if refiner else (
        te is not None and n in (BASE_TIME_IDS, REFINER_TIME_IDS))
    if not fits:
        want = ("the refiner has 5 time ids (sizes and an aesthetic score) and no first text encoder" if refiner else
                "base SDXL has two text encoders and 6 time ids (sizes), or 5 (sizes and an aesthetic score, for "
                "image-to-image); 5 time ids without a first text encoder is the refiner")
        return [f"{n} time ids, {'no' if te is None else 'a'} first text encoder ({want})"]
    widths = (0 if te is None else te.get("hidden_size", 512)) + te2.get("hidden_size", 512)
    if unet.get("cross_attention_dim") != widths:
        return [f"cross_attention_dim={unet.get('cross_attention_dim')} is not the text encoders' hidden sizes "
                f"side by side ({widths})"]
    return []


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelGeometry(sd.ModelGeometry):
    """What the specs need to know about a loaded SDXL pipeline (read from its configs, JSON-able): Stable
    Diffusion's, with the first text encoder's fields 0 where there is none (the refiner), plus the second encoder's
    and the added conditioning."""

    vocab_size_2: int
    text_hidden_2: int
    pooled_dim: int           # text_encoder_2's projection: the U-Net's text_embeds
    time_ids: int             # 6 (base, Turbo)

    @classmethod
    def from_pipeline(cls, pipe) -> "ModelGeometry":
        configs = pipeline_configs(pipe)
        configs["max_length"] = int(pipe.tokenizer_2.model_max_length)
        return cls.from_configs(configs)

    @classmethod
    def from_configs(cls, configs: dict) -> "ModelGeometry":
        """From the configs alone (see :meth:`diffaccel.optimize.families.sd.ModelGeometry.from_configs`)."""
        te2 = text_config(configs, "text_encoder_2")
        te = text_config(configs, "text_encoder") if configs.get("text_encoder") else None   # None: the refiner
        unet = with_defaults("UNet2DConditionModel", configs.get("unet"))
        return cls(
            vocab_size=int(te["vocab_size"]) if te else 0, vocab_size_2=int(te2["vocab_size"]),
            max_length=max_length(configs, te2), text_hidden=int(te["hidden_size"]) if te else 0,
            text_hidden_2=int(te2["hidden_size"]), pooled_dim=int(te2["projection_dim"]),
            time_ids=int(time_id_count(unet, te2)), **sd.denoiser_geometry(configs))


def specs(geo: ModelGeometry, shapes) -> dict:
    """The component specs of an SDXL pipeline for an image :class:`ShapeRange` (no ``text_encoder`` where the
    geometry has none: the refiner).

    The U-Net's batch range doubles the image batch where classifier-free guidance runs both halves in one call
    (and serves batch 1 upward, so guidance <= 1 runs too; not for LCM U-Nets, which never double it, nor for builds
    for guidance <= 1 such as SDXL-Turbo's, ``optimize --guidance 0``); its
    ``time_ids`` hold pixel sizes, drawn as integers up to 4x the native size for validation."""
    bmin, bmax = shapes.batch
    bopt = min(max(1, bmin), bmax)
    base = sd.specs(sd.ModelGeometry(
        vocab_size=max(1, geo.vocab_size), max_length=geo.max_length, text_hidden=max(1, geo.text_hidden),
        latent_channels=geo.latent_channels, unet_in_channels=geo.unet_in_channels,
        cross_attention_dim=geo.cross_attention_dim, vae_scale_factor=geo.vae_scale_factor,
        latent_multiple=geo.latent_multiple, default_size=geo.default_size,
        num_train_timesteps=geo.num_train_timesteps), shapes)
    L, k = geo.max_length, 2 if geo.guidance_doubles_batch else 1
    text_batch = {"batch": AxisRange(1, bopt, 2 * bmax)}
    lat = {a: base["unet"].axes[a] for a in ("height", "width")}
    penultimate = "penultimate_hidden_state"
    out = {
        "text_encoder": ComponentSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", ("batch", L), "int64", "tokens", geo.vocab_size),),
            outputs=(TensorSpec("last_hidden_state", ("batch", L, geo.text_hidden)),
                     TensorSpec("pooler_output", ("batch", geo.text_hidden)),
                     TensorSpec(penultimate, ("batch", L, geo.text_hidden))),
            axes=text_batch, atol=2e-3, rtol=1e-3),
        "text_encoder_2": ComponentSpec(
            "text_encoder_2",
            inputs=(TensorSpec("input_ids", ("batch", L), "int64", "tokens", geo.vocab_size_2),),
            outputs=(TensorSpec("text_embeds", ("batch", geo.pooled_dim)),
                     TensorSpec("last_hidden_state", ("batch", L, geo.text_hidden_2)),
                     TensorSpec(penultimate, ("batch", L, geo.text_hidden_2))),
            axes=text_batch, atol=2e-3, rtol=1e-3),
        "unet": ComponentSpec(
            "unet",
            inputs=(*base["unet"].inputs,
                    TensorSpec("text_embeds", ("batch", geo.pooled_dim)),
                    TensorSpec("time_ids", ("batch", geo.time_ids), "float32", "timestep", 4 * geo.default_size),
                    *((TensorSpec("timestep_cond", ("batch", geo.timestep_cond_dim)),) if geo.timestep_cond_dim
                      else ())),
            outputs=base["unet"].outputs,
            axes={"batch": AxisRange(1, k * bopt, k * bmax), **lat}, atol=2e-3, rtol=2e-3),
        "vae_decoder": base["vae_decoder"],
        "vae_encoder": base["vae_encoder"],
    }
    if not geo.text_hidden:
        del out["text_encoder"]
    return out


# ----------------------------------------------------------------------------------------------------------
# torch modules with exactly the spec's named inputs and outputs
# ----------------------------------------------------------------------------------------------------------
def export_module(component: str, pipe_or_models: Any):
    """Wrap the model(s) of ``component`` as an nn.Module with the spec's signature. The text encoders return the
    penultimate hidden state (what SDXL conditions on) as an output of their own, computed here, not found by name
    in the exporter's graph."""
    import torch

    if component in ("vae_decoder", "vae_encoder"):
        return sd.export_module(component, pipe_or_models)
    get = (lambda n: pipe_or_models[n]) if isinstance(pipe_or_models, dict) else (
        lambda n: getattr(pipe_or_models, n))

    class TextEncoder(torch.nn.Module):          # CLIPTextModel
        def __init__(self):
            super().__init__()
            self.model = get("text_encoder")

        def forward(self, input_ids):
            out = self.model(input_ids, output_hidden_states=True, return_dict=True)
            return out.last_hidden_state, out.pooler_output, out.hidden_states[-2]

    class TextEncoder2(torch.nn.Module):         # CLIPTextModelWithProjection
        def __init__(self):
            super().__init__()
            self.model = get("text_encoder_2")

        def forward(self, input_ids):
            out = self.model(input_ids, output_hidden_states=True, return_dict=True)
            return out.text_embeds, out.last_hidden_state, out.hidden_states[-2]

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = get("unet")

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.model(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                              added_cond_kwargs=added, return_dict=False)[0]

    table = {"text_encoder": TextEncoder, "text_encoder_2": TextEncoder2, "unet": UNet}
    return table[component]().eval()


def weight_bytes(configs: dict) -> dict:
    """fp32 weight bytes of each model from its config alone (PyTorch's meta device; see
    :func:`diffaccel.optimize.families.sd.weight_bytes`)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return {**sd.weight_bytes(configs), **meta_weight_bytes(
        configs, {"text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))})}


def assets(pipe) -> dict:
    """What the assets stage writes besides the engines: tokenizers, per-component configs, pipeline facts."""
    encoders = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n) is not None}
    # loaded as StableDiffusionXLPipeline (no such setting), a U-Net's 5 time ids hold an aesthetic score
    ids = time_id_count(dict(pipe.unet.config), pipe.text_encoder_2.config.to_dict())
    return {"tokenizers": {n: getattr(pipe, n) for n in TOKENIZERS if getattr(pipe, n) is not None},
            "configs": {**{n: m.config.to_dict() for n, m in encoders.items()},
                        "unet": dict(pipe.unet.config), "vae_decoder": dict(pipe.vae.config),
                        "vae_encoder": dict(pipe.vae.config)},
            "pipeline": {**{f"{n}_class": type(m).__name__ for n, m in encoders.items()},
                         "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
                         "requires_aesthetics_score": bool(pipe.config.get("requires_aesthetics_score", ids == 5))}}


# ----------------------------------------------------------------------------------------------------------
# calibration capture
# ----------------------------------------------------------------------------------------------------------
def capture_denoiser_inputs(pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int, height: int,
                        width: int, call_kwargs: "dict | None" = None) -> list:
    """Run ``pipe`` once per prompt and return the U-Net's inputs at every step, as dicts of CPU tensors named as
    the U-Net spec's inputs (``sample``, ``timestep`` one per batch row, ``encoder_hidden_states``, ``text_embeds``,
    ``time_ids``, and ``timestep_cond`` for LCM U-Nets). An image-to-image pipeline (the refiner) refines a seeded
    random image at diffusers' default strength, with enough steps that ``steps`` of them run."""
    import math

    import torch

    extra, size = dict(call_kwargs or {}), {"height": height, "width": width}
    if not extra and "image" in inspect.signature(type(pipe).__call__).parameters:   # img2img, the refiner
        strength, size = 0.3, {}
        extra = {"strength": strength, "image": torch.rand(1, 3, height, width,
                                                          generator=torch.Generator().manual_seed(seed))}
        steps = math.ceil(steps / strength)

    return capture_with(pipe, prompts, steps=steps, guidance_scale=guidance_scale, seed=seed,
                        call_kwargs={**size, **extra}, added=("text_embeds", "time_ids"))
