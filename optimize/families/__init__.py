"""Model families: one file each (detection from the configs, component specs, export wrappers, calibration capture,
the diffusers pipelines it covers and its drop-in classes), plus this registry.

Adding a family = one module implementing :class:`~diffaccel.optimize.families.protocol.Family` (its components by
role: the denoiser, ``unet`` or ``transformer``; the text encoders; the VAE's decoder and encoder) and a row in
``FAMILIES``.
Detection asks every family what in the configs it does not support; the one with nothing to object wins, and when
none fits the error names the nearest family and what differs.

>>> detect({"unet": {"cross_attention_dim": 768}, "vae": {}}, "x").NAME
'sd'
>>> detect({"unet": {"in_channels": 5}, "vae": {}}, "odd")
Traceback (most recent call last):
...
diffaccel.optimize.artifact.errors.SourceError: unsupported architecture in odd: nearest family is Stable Diffusion 1.x/2.x (sd), which differs in: in_channels=5 (the VAE has 4 latent channels); supported families: sd, sdxl, sdxl-refiner, sd-inpaint, sdxl-inpaint, sd3, sd3-no-t5, flux
"""
from __future__ import annotations

import importlib

from diffaccel.optimize.artifact.errors import SourceError
from diffaccel.optimize.artifact.roles import DENOISERS, TEXT_ENCODERS   # a family's DENOISER is one of DENOISERS

FAMILIES = {  # name -> module, imported on first use
    "sd": "diffaccel.optimize.families.sd",
    "sdxl": "diffaccel.optimize.families.sdxl",
    "sdxl-refiner": "diffaccel.optimize.families.sdxl_refiner",
    "sd-inpaint": "diffaccel.optimize.families.sd_inpaint",
    "sdxl-inpaint": "diffaccel.optimize.families.sdxl_inpaint",
    "sd3": "diffaccel.optimize.families.sd3",
    "sd3-no-t5": "diffaccel.optimize.families.sd3_no_t5",
    "flux": "diffaccel.optimize.families.flux",
}
# every component some family builds, in build order (what OptimizeConfig's components are checked against; a
# build keeps those its family has, see :func:`components_of`)
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder")


def family(name: str):
    """The family module registered as ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def detect(configs: dict, spec: str):
    """The family whose ``mismatches(configs)`` is empty. ``configs``: ``{"pipeline": model_index class name or
    None, "unet" or "transformer": config dict, "vae": config dict, "text_encoder": ..., "text_encoder_2": ...,
    "text_encoder_3": ... (where present)}`` (``_class_name`` inside each, diffusers' defaults if absent)."""
    found = {name: family(name).mismatches(configs) for name in FAMILIES}
    for name, problems in found.items():
        if not problems:
            return family(name)
    nearest = min(found, key=lambda n: len(found[n]))
    raise SourceError(f"unsupported architecture in {spec}: nearest family is {family(nearest).TITLE} ({nearest}), "
                      f"which differs in: {'; '.join(found[nearest])}; supported families: {', '.join(FAMILIES)}")


def configs_of(pipe) -> dict:
    """The ``configs`` of :func:`detect` read from a loaded diffusers pipeline."""
    def cfg(model):
        config = getattr(model, "config", None) or {}
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)   # transformers' or diffusers'
        return {**config, "_class_name": type(model).__name__}

    out = {"pipeline": type(pipe).__name__, "vae": cfg(getattr(pipe, "vae", None))}
    for name in (*DENOISERS, *TEXT_ENCODERS):
        if getattr(pipe, name, None) is not None:
            out[name] = cfg(getattr(pipe, name))
    if not any(d in out for d in DENOISERS):
        out["unet"] = cfg(None)
    if "requires_aesthetics_score" in (getattr(pipe, "config", None) or {}):
        out["requires_aesthetics_score"] = bool(pipe.config.requires_aesthetics_score)
    return out


def components_of(fam, requested: tuple) -> tuple:
    """The components a build of family ``fam`` makes: those of ``requested`` (every known component by default)
    that the family has. Asking only for components it lacks is refused.

    >>> components_of(family("sd"), COMPONENTS)
    ('text_encoder', 'unet', 'vae_decoder', 'vae_encoder')
    >>> components_of(family("sd"), ("text_encoder_2",))
    Traceback (most recent call last):
    ...
    diffaccel.optimize.artifact.errors.SourceError: Stable Diffusion 1.x/2.x (sd) has no component text_encoder_2; it has: text_encoder, unet, vae_decoder, vae_encoder
    """
    requested = tuple(requested)
    if requested == COMPONENTS:
        return tuple(fam.COMPONENTS)
    parts = getattr(fam, "parts", None)      # an optimize --step-cache family builds its denoiser as these parts
    if parts:
        requested = tuple(p for c in requested for p in (parts.values() if c == fam.DENOISER else (c,)))
    missing = [c for c in requested if c not in fam.COMPONENTS]
    if missing:
        raise SourceError(f"{fam.TITLE} ({fam.NAME}) has no component {', '.join(missing)}; it has: "
                         f"{', '.join(fam.COMPONENTS)}")
    return tuple(c for c in fam.COMPONENTS if c in requested)


def supported_pipelines() -> tuple:
    """Every diffusers pipeline class name some family covers."""
    return tuple(p for name in FAMILIES for p in family(name).PIPELINES)


def denoiser_config(configs: dict) -> dict:
    """The denoiser's config in ``configs`` (a U-Net's or a transformer's), {} where there is none."""
    return next((configs[d] for d in DENOISERS if configs.get(d)), {})


def denoiser_of(pipe) -> str:
    """The attribute name of a loaded pipeline's denoiser (a diffusers pipeline's or a drop-in's): ``unet`` or
    ``transformer``."""
    for name in DENOISERS:
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has no denoiser ({' or '.join(DENOISERS)})")


def pipeline_guidance(fam) -> float:
    """The ``guidance_scale`` default of the family's diffusers pipeline (what its users get without asking)."""
    import inspect

    import diffusers

    call = getattr(diffusers, fam.PIPELINE_CLASS).__call__
    return float(inspect.signature(call).parameters["guidance_scale"].default)
