"""The one lookup from what a user calls a scheduler to its diffusers class (the drop-in pipelines', the CLI's and the
server's: :func:`served` is the table of names requests may use).

A name is a diffusers scheduler class name in any case (``EulerDiscreteScheduler``, ``eulerdiscretescheduler``) or a
short alias (``ddim``, ``euler``, ``euler-a``, ``dpm++``, ``lcm``, ...). Give the pipeline a fresh one on its own
config: ``pipe.scheduler = scheduler_class("euler").from_config(pipe.scheduler.config)``.

>>> scheduler_class("ddim").__name__, scheduler_class("eulerdiscretescheduler").__name__
('DDIMScheduler', 'EulerDiscreteScheduler')
>>> scheduler_class("FooScheduler")
Traceback (most recent call last):
...
diffaccel.optimize.artifact.errors.DiffaccelError: unknown scheduler 'FooScheduler'; choose an alias (ddim, ...
"""
from __future__ import annotations

from diffaccel.optimize.artifact.errors import DiffaccelError

ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",     # flow-matching models (SD3, FLUX)
    "flow-heun": "FlowMatchHeunDiscreteScheduler",
}


def _stable_diffusion_schedulers() -> list:
    """The class names diffusers declares interchangeable for Stable Diffusion (the list shown on a typo)."""
    try:
        from diffusers.schedulers import KarrasDiffusionSchedulers
    except ImportError:
        return sorted(set(ALIASES.values()))
    return [s.name for s in KarrasDiffusionSchedulers]


def scheduler_class(name: str):
    """The diffusers scheduler class for ``name`` (a class name in any case, or an alias in :data:`ALIASES`).

    Unknown names raise a one-line :class:`DiffaccelError` listing the aliases and the Stable Diffusion schedulers.
    """
    import diffusers

    key = str(name).strip().lower()
    classes = {n.lower(): n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax")}
    found = ALIASES.get(key) or classes.get(key)
    cls = getattr(diffusers, found, None) if found else None
    if not isinstance(cls, type) or not hasattr(cls, "from_config"):
        raise DiffaccelError(f"unknown scheduler {name!r}; choose an alias ({', '.join(ALIASES)}) or a diffusers "
                             f"scheduler class (any case), e.g. {', '.join(_stable_diffusion_schedulers())}")
    return cls


def served() -> dict:
    """The scheduler names a server's requests may use: the aliases, each to its class (``"default"`` is the
    artifact's own scheduler and is not in the table)."""
    return {alias: scheduler_class(alias) for alias in ALIASES}
