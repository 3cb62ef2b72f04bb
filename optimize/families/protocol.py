"""The family contract: what a model-family module declares, as one typed protocol.

A family module (``sd``, ``sdxl``, ``sd3``, ``flux``, ...) is an implementation of :class:`Family`; the registry in
:mod:`diffaccel.optimize.families` holds modules that satisfy it (``tests/test_families.py`` checks every member and
signature, and a type checker can too: modules implement protocols structurally). Components have **roles**: the
denoiser (``DENOISER``: diffusers' own attribute name, ``"unet"`` for U-Nets, ``"transformer"`` for diffusion
transformers), the text encoders (``TEXT_ENCODERS``), and the VAE's decoder and encoder (``vae_decoder``,
``vae_encoder``). Code outside ``families/`` asks a family (or an artifact's manifest) for the denoiser's name and
never spells it.

A family's ``configs`` (what detection, size checks and the memory estimate read without loading weights) are
keyed by diffusers' component names: ``{"pipeline": class name or None, "unet" or "transformer": config, "vae":
..., "text_encoder": ..., ...}``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable



@runtime_checkable
class Geometry(Protocol):
    """What a family's specs need to know of a loaded pipeline (a frozen, JSON-able dataclass)."""

    vae_scale_factor: int
    latent_multiple: int
    default_size: int
    guidance_doubles_batch: bool

    @classmethod
    def from_pipeline(cls, pipe) -> "Geometry": ...


class Family(Protocol):
    """One model family: detection from the configs, component specs, torch export wrappers, calibration capture,
    the diffusers pipelines it covers and its drop-in classes."""

    NAME: str                       # registry key, recorded in the manifest
    TITLE: str                      # for messages
    PIPELINES: tuple                # diffusers pipeline class names it covers
    PIPELINE_CLASS: str             # the one sources load
    DROP_INS: tuple                 # "module:Class" per task (text-to-image, image-to-image, inpainting) or None
    COMPONENTS: tuple               # what a build makes, in build order
    DENOISER: str                   # the denoiser's component (and diffusers attribute) name
    TEXT_ENCODERS: tuple            # the text encoders' component names
    SOURCE_MODEL: dict              # component -> the diffusers model it is exported from (vae_decoder -> vae)
    TOKENIZERS: tuple               # the tokenizers an artifact keeps
    LOAD_KWARGS: dict               # diffusers' loading keywords for its pipeline class
    KEEP_FLOAT: dict                # int8: module-path regexes of the denoiser kept in float -> why
    EXPORTERS: tuple                # the ONNX exporters that give a correct graph (dynamo, torchscript)
    ModelGeometry: type             # a Geometry

    def mismatches(self, configs: dict) -> list: ...

    def specs(self, geo, shapes) -> dict: ...

    def export_module(self, component: str, pipe_or_models: Any): ...

    def weight_bytes(self, configs: dict) -> dict: ...

    def assets(self, pipe) -> dict: ...

    def capture_denoiser_inputs(self, pipe, prompts: list, *, steps: int, guidance_scale: float, seed: int,
                                height: int, width: int) -> list: ...

    def size_factors(self, denoiser_config, vae_config) -> tuple: ...

    def check_pixel_range(self, rng, multiple: int, what: str) -> None: ...

    def latent_opt_size(self, configs: dict, shapes) -> tuple: ...

    def attention_bytes(self, configs: dict, latent_h: int, latent_w: int, batch: int = 2) -> int: ...


MEMBERS = tuple(n for n in Family.__annotations__) + tuple(
    n for n, v in vars(Family).items() if callable(v) and not n.startswith("_"))


def problems(module) -> list:
    """What ``module`` lacks of :class:`Family` (a member missing, a function whose parameters differ): [] when it
    implements the protocol."""
    import inspect

    out = [f"{module.__name__} has no {name}" for name in MEMBERS if not hasattr(module, name)]
    for name, want in vars(Family).items():
        if not callable(want) or name.startswith("_") or not hasattr(module, name):
            continue
        expected = [p for p in inspect.signature(want).parameters if p != "self"]
        got = list(inspect.signature(getattr(module, name)).parameters)
        if got[:len(expected)] != expected or any(
                inspect.signature(getattr(module, name)).parameters[p].default is inspect.Parameter.empty
                for p in got[len(expected):]):
            out.append(f"{module.__name__}.{name}{inspect.signature(getattr(module, name))} does not take "
                       f"({', '.join(expected)})")
    if hasattr(module, "DENOISER") and module.DENOISER not in getattr(module, "COMPONENTS", ()):
        out.append(f"{module.__name__}.DENOISER {module.DENOISER!r} is not one of its COMPONENTS")
    geo = getattr(module, "ModelGeometry", None)
    if geo is not None and not hasattr(geo, "from_pipeline"):
        out.append(f"{module.__name__}.ModelGeometry has no from_pipeline")
    return out
