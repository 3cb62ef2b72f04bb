"""What several model families are made of: configs with the libraries' defaults filled in, the image-size rules
(pixel ranges to latent axes), the text encoders' specs that SD3 and FLUX.1 share, the meta-device weight count and
the calibration hooks that capture a denoiser's inputs while its diffusers pipeline samples. Each family module
imports what it uses and keeps the names of the family protocol
(:class:`~diffaccel.optimize.families.protocol.Family`) on itself.

>>> max_length({"max_length": None}, {"max_position_embeddings": 77})
77
>>> t5_axis(256)
AxisRange(min=1, opt=256, max=512, multiple=1)
"""
from __future__ import annotations

import logging

from diffaccel.optimize.artifact.errors import ShapeError
from diffaccel.optimize.artifact.specs import AxisRange, ComponentSpec, TensorSpec

log = logging.getLogger(__name__)

T5_MAX = 512                         # the most diffusers' SD3 and FLUX pipelines take


# ----------------------------------------------------------------------------------------------------------
# configs and what they allow
# ----------------------------------------------------------------------------------------------------------
def vae_problem(configs: dict) -> list:
    """The transformer families' VAE check: diffusers' ``AutoencoderKL`` (its latent distribution is exported)."""
    vae = (configs.get("vae") or {}).get("_class_name", "AutoencoderKL")
    return [] if vae == "AutoencoderKL" else [f"vae is {vae}, not AutoencoderKL"]


class GeometryBase:
    """What every family's frozen ``ModelGeometry`` dataclass shares: built from a loaded pipeline through its
    configs, and the pixel multiple a size must keep (VAE scale x latent multiple)."""

    vae_scale_factor: int
    latent_multiple: int

    @property
    def pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.latent_multiple

    @classmethod
    def from_pipeline(cls, pipe):
        return cls.from_configs(pipeline_configs(pipe))


def in_channels_problem(unet: dict, vae: dict, inpaint: bool) -> list:
    """A U-Net's input channels against the VAE's latents: equal, or ``2 * latents + 1`` for inpainting U-Nets
    (noisy latents, the mask, the masked image's latents)."""
    n, c = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if n == (2 * c + 1 if inpaint else c):
        return []
    if n == 2 * c + 1:
        return [f"in_channels={n} (an inpainting U-Net: latents, mask and masked-image latents)"]
    return [f"in_channels={n} (the VAE has {c} latent channels{'; inpainting needs ' + str(2 * c + 1) if inpaint else ''})"]


def pipeline_configs(pipe) -> dict:
    """A loaded pipeline's configs as a family's ``ModelGeometry.from_configs`` reads them (the tokenizer's length and
    the scheduler's included)."""
    from diffaccel.optimize.families import configs_of

    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    return {**configs_of(pipe), "scheduler": dict(pipe.scheduler.config),
            "max_length": None if tokenizer is None else int(tokenizer.model_max_length)}


def with_defaults(model_class: str, config: "dict | None") -> dict:
    """``config`` (a diffusers or transformers model config as a dict, possibly leaving defaults out) with the class's
    defaults filled in, as the library would on loading."""
    import inspect

    import diffusers
    import transformers

    config = dict(config or {})
    cls = getattr(diffusers, model_class, None)
    if cls is not None:
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    else:
        defaults = getattr(transformers, model_class)().to_dict()
    return {**defaults, **{k: v for k, v in config.items() if v is not None or k not in defaults}}


def text_config(configs: dict, name: str) -> dict:
    return with_defaults("CLIPTextConfig", configs.get(name))


def max_length(configs: dict, text: dict) -> int:
    return int(configs.get("max_length") or text.get("max_position_embeddings", 77))


def meta_weight_bytes(configs: dict, makers: dict, buffers: bool = False) -> dict:
    """fp32 bytes of each model ``makers[name](config)`` builds from ``configs[name]`` (its ``_`` keys left out), on
    PyTorch's meta device: no memory, no weights. ``buffers``: their bytes count too (a transformer's position table
    is one). A model whose config is missing counts 0."""
    import torch

    out = {}
    with torch.device("meta"):
        for name, make in makers.items():
            cfg = configs.get(name)
            model = make({k: v for k, v in cfg.items() if not k.startswith("_")}) if cfg else None
            tensors = (*model.parameters(), *(model.buffers() if buffers else ())) if model else ()
            out[name] = sum(t.numel() * 4 for t in tensors) if model else 0
    return out


# ----------------------------------------------------------------------------------------------------------
# image sizes
# ----------------------------------------------------------------------------------------------------------
def check_pixel_range(rng, multiple: int, what: str) -> None:
    """Refuse an image-size range (lo, hi) that is not made of multiples of ``multiple``.

    >>> check_pixel_range((64, 128), 16, "height")
    >>> check_pixel_range((64, 72), 16, "height")
    Traceback (most recent call last):
    ...
    diffaccel.optimize.artifact.errors.ShapeError: height range 64-72 is not a multiple of 16: this model's U-Net needs image sizes divisible by 16; try 64-64
    """
    lo, hi = rng
    if lo % multiple or hi % multiple:
        raise ShapeError(f"{what} range {lo}-{hi} is not a multiple of {multiple}: this model's U-Net needs image "
                         f"sizes divisible by {multiple}; try {max(multiple, lo // multiple * multiple)}-"
                         f"{max(multiple, hi // multiple * multiple)}")


def pixel_axis(rng, geo, what: str) -> AxisRange:
    """Latent-space axis range from a pixel range (None = around the model's native size); ``geo``: a family's
    ``ModelGeometry`` (its ``pixel_multiple``, ``default_size``, ``vae_scale_factor``, ``latent_multiple``)."""
    m = geo.pixel_multiple
    if rng is None:
        lo, hi = max(m, (geo.default_size // 2) // m * m), (geo.default_size * 3 // 2) // m * m
    else:
        lo, hi = rng
        check_pixel_range(rng, m, what)
    opt = min(max(geo.default_size, lo), hi) // m * m
    s = geo.vae_scale_factor
    return AxisRange(lo // s, max(opt, lo) // s, hi // s, geo.latent_multiple)


# ----------------------------------------------------------------------------------------------------------
# text encoders' specs (SD3, FLUX.1)
# ----------------------------------------------------------------------------------------------------------
def clip_spec(name: str, vocab: int, length: int, hidden: int, projection: int, batch: AxisRange) -> ComponentSpec:
    """A CLIP text encoder with projection: pooled ``text_embeds``, the last and the penultimate hidden states."""
    return ComponentSpec(
        name, inputs=(TensorSpec("input_ids", ("batch", length), "int64", "tokens", vocab),),
        outputs=(TensorSpec("text_embeds", ("batch", projection)),
                 TensorSpec("last_hidden_state", ("batch", length, hidden)),
                 TensorSpec("penultimate_hidden_state", ("batch", length, hidden))),
        axes={"batch": batch}, atol=2e-3, rtol=1e-3)


def t5_axis(typical: int) -> AxisRange:
    """T5 token counts served: any ``max_sequence_length`` diffusers takes (1-512), ``typical`` the opt shape."""
    return AxisRange(1, typical, max(typical, T5_MAX))


def t5_spec(name: str, vocab: int, length: int, hidden: int, batch: AxisRange) -> ComponentSpec:
    """The T5 encoder: token ids (any count up to 512) to its last hidden state (kept in fp32 or bf16: T5 overflows
    in fp16)."""
    return ComponentSpec(name, inputs=(TensorSpec("input_ids", ("batch", "text"), "int64", "tokens", vocab),),
                         outputs=(TensorSpec("last_hidden_state", ("batch", "text", hidden)),),
                         axes={"batch": batch, "text": t5_axis(length)}, atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------------------------------------
# calibration capture: the denoiser's inputs at every step of real sampling
# ----------------------------------------------------------------------------------------------------------
def capture_with(pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int, call_kwargs: dict,
                 added: tuple = ()) -> list:
    """The U-Net's inputs at every step of ``pipe(prompt, **call_kwargs)`` for each prompt (seeded ``seed + i``):
    ``sample``, ``timestep`` (one per batch row), ``encoder_hidden_states``, the ``added_cond_kwargs`` named in
    ``added`` (SDXL's ``text_embeds``, ``time_ids``) and, for LCM U-Nets, ``timestep_cond``; fp32 CPU tensors."""
    import torch

    captured = []

    def hook(module, args, kwargs):
        given = {**dict(zip(("sample", "timestep", "encoder_hidden_states"), args)), **kwargs}
        sample, cond = given["sample"], given.get("added_cond_kwargs") or {}
        t = torch.as_tensor(given["timestep"], dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        record = {"sample": sample, "timestep": t, "encoder_hidden_states": given["encoder_hidden_states"],
                  **{k: cond[k] for k in added}}
        if given.get("timestep_cond") is not None:           # LCM U-Nets: the guidance embedding
            record["timestep_cond"] = given["timestep_cond"]
        captured.append({k: v.detach().float().cpu().clone() for k, v in record.items()})

    _sample_hooked(pipe, pipe.unet, hook, prompts, steps=steps, guidance_scale=guidance_scale, seed=seed,
                   call_kwargs=call_kwargs)
    return captured


def capture_transformer(pipe, prompts: list, names: tuple, *, steps: int, guidance_scale: float, seed: int,
                        call_kwargs: dict, prepare=None) -> list:
    """The transformer's keyword inputs ``names`` at every call of ``pipe(prompt, **call_kwargs)`` (seeded
    ``seed + i``; ``prepare(record)`` may reshape one), skipping calls that remove blocks (skip-layer guidance)."""
    import torch

    captured = []

    def hook(module, args, kwargs):
        if kwargs.get("skip_layers") is not None:
            return
        record = {n: kwargs[n] for n in names if kwargs.get(n) is not None}
        record["timestep"] = torch.as_tensor(record["timestep"], dtype=torch.float32).reshape(-1).expand(
            next(iter(record.values())).shape[0])
        record = prepare(record) if prepare is not None else record
        captured.append({k: v.detach().float().cpu().clone() for k, v in record.items()})

    _sample_hooked(pipe, pipe.transformer, hook, prompts, steps=steps, guidance_scale=guidance_scale, seed=seed,
                   call_kwargs=call_kwargs)
    return captured


def _sample_hooked(pipe, denoiser, hook, prompts: list, *, steps: int, guidance_scale: float, seed: int,
                   call_kwargs: dict) -> None:
    """Sample ``pipe(prompt)`` to latents once per prompt (seeded ``seed + i``, progress bar off) with ``hook`` as
    the denoiser's forward pre-hook (with keywords); the hook and the progress bar are restored after."""
    import torch

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    was_disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    try:
        for i, prompt in enumerate(prompts):
            log.info("calibration prompt %d/%d: %s", i + 1, len(prompts), prompt)
            with torch.no_grad():
                pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=torch.Generator().manual_seed(seed + i), output_type="latent", **call_kwargs)
    finally:
        handle.remove()
        pipe.set_progress_bar_config(disable=was_disabled)


def inpainting_inputs(height: int, width: int, seed: int) -> dict:
    """What calibration inpaints: a seeded random image and a mask over its middle half (1 = repaint), at
    strength 1 (every step runs; SDXL's inpainting default is just below)."""
    import torch

    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
    return {"image": torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed)),
            "mask_image": mask, "strength": 1.0}
