"""Model families: one file each (detection from the configs, component specs, export wrappers, calibration capture,
the diffusers pipelines it covers and its drop-in classes), plus this registry.

Adding a family = one module with the same names as :mod:`diffaccel.optimize.families.sd` and a row in ``FAMILIES``.
Detection asks every family what in the configs it does not support; the one with nothing to object wins, and when
none fits the error names the nearest family and what differs.

>>> detect({"unet": {"cross_attention_dim": 768}, "vae": {}}, "x").NAME
'sd'
>>> detect({"unet": {"time_cond_proj_dim": 256}, "vae": {}}, "lcm")
Traceback (most recent call last):
...
diffaccel.optimize.artifact.errors.SourceError: unsupported architecture in lcm: nearest family is Stable Diffusion 1.x/2.x (sd), which differs in: time_cond_proj_dim=256 (LCM-distilled guidance embedding); supported families: sd
"""
from __future__ import annotations

import importlib

from diffaccel.optimize.artifact.errors import SourceError

FAMILIES = {  # name -> module, imported on first use
    "sd": "diffaccel.optimize.families.sd",
}


def family(name: str):
    """The family module registered as ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def detect(configs: dict, spec: str):
    """The family whose ``mismatches(configs)`` is empty. ``configs``: ``{"pipeline": model_index class name or
    None, "unet": config dict, "vae": config dict}`` (``_class_name`` inside each, diffusers' defaults if absent)."""
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
        return {**dict(getattr(model, "config", None) or {}), "_class_name": type(model).__name__}

    return {"pipeline": type(pipe).__name__, "unet": cfg(getattr(pipe, "unet", None)),
            "vae": cfg(getattr(pipe, "vae", None))}


def supported_pipelines() -> tuple:
    """Every diffusers pipeline class name some family covers."""
    return tuple(p for name in FAMILIES for p in family(name).PIPELINES)
