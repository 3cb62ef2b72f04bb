"""The artifacts a server serves, and the check that turns a request into work the engines can do (or a 4xx).

A request is *resolved* once, when it is accepted: the model, size, steps, guidance, scheduler and seed are filled
in and stored with the job, so a job re-run after a crash does exactly the same work. Two jobs can share an engine
call when their :func:`batch_key` is equal (same model, size, steps, scheduler and guidance, and both with or both
without a negative prompt: SDXL's unconditional half is zeros without one, an encoded prompt with one).
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError

log = logging.getLogger(__name__)


class RequestError(DiffaccelError):
    """A request the engines cannot serve: the server answers ``status`` (4xx) with this one-line message."""

    def __init__(self, message: str, param: "str | None" = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclasses.dataclass
class ServedModel:
    name: str
    path: Path
    pipe: object
    default_guidance: float
    base_scheduler_config: object = None    # each engine call starts from a fresh scheduler made from this
    max_guidance: "float | None" = None     # a U-Net built for guidance <= 1 (optimize --guidance 0): no CFG
    default_scheduler: "type | None" = None  # the artifact's scheduler class ("default"; the pipe's changes per call)
    _schedules: dict = dataclasses.field(default_factory=dict)   # (scheduler, steps) -> why it cannot run, or ""

    def schedule_problem(self, name: str, cls, steps: int) -> str:
        """Why scheduler ``cls`` (requested as ``name``) cannot take ``steps`` denoising steps on this model ("" if it
        can), found by running its schedule on a 1-pixel latent: cheap, and it fails exactly where the real call
        would (PNDM's warm-up needs more steps than 1-3, for instance). Cached per (name, steps)."""
        key = (name, steps)
        if key not in self._schedules:
            self._schedules[key] = dry_run_problem(cls or self.default_scheduler, self.base_scheduler_config, steps)
        return self._schedules[key]

    @property
    def scale(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def train_steps(self) -> int:
        """Most inference steps a scheduler takes: one less than the training steps (with a steps offset, DDIM's
        last timestep would fall off the end at as many steps as training had)."""
        return int(getattr(self.base_scheduler_config, "num_train_timesteps", None) or 1000) - 1

    @property
    def native(self) -> "tuple[int, int]":
        """(height, width) a request without a size gets: the model's native size where the engines serve it, else
        their typical (opt) size, the one they were built around."""
        s = self.pipe.native_size
        if self.allows(s, s):
            return s, s
        a, scale = self.pipe.denoiser.spec.axes, self.scale
        return a["height"].opt * scale, a["width"].opt * scale

    def size_text(self) -> str:
        a, s = self.pipe.denoiser.spec.axes, self.scale
        h, w = a["height"], a["width"]
        return (f"width {w.min * s}-{w.max * s} and height {h.min * s}-{h.max * s} in multiples of "
                f"{s * w.multiple}")

    def allows(self, height: int, width: int) -> bool:
        a, s = self.pipe.denoiser.spec.axes, self.scale
        return all(v % (s * r.multiple) == 0 and r.allows(v // s)
                   for v, r in ((height, a["height"]), (width, a["width"])))


def load_models(paths, threads=None, provider=None) -> dict:
    """name -> :class:`ServedModel` for each artifact folder (named by the folder; a repeated name gets ``-2``...),
    loaded as its family's drop-in (SD, SDXL, ...). A model's default guidance is the one it was built for
    (:attr:`~diffaccel.optimize.artifact.manifest.Manifest.built_guidance`: a built-in's recommended one, or
    ``optimize --guidance``), as every command uses; one built for guidance <= 1 serves no more. ``OUT@cache=SPEC``
    serves the artifact with that step cache on (checked by :func:`cache_paths`), named ``FOLDER@SPEC``: the cache
    lives in the model's U-Net and every batch of it runs with it, so it is the deployment's, never a request's."""
    from diffaccel.engines.pipelines import pipeline_class
    from diffaccel.engines.pipelines.cache import cache_suffix, parse_cache

    models = {}
    for p in paths:
        text, spec = cache_suffix(p)
        path, cache = Path(text), parse_cache(spec)
        pipe = pipeline_class(path).from_pretrained(path, provider=provider, threads=threads)
        pipe.set_progress_bar_config(disable=True)
        if cache is not None:
            pipe.denoiser.enable_cache(cache)
        first = path.resolve().name + (f"@{cache.spec}" if cache else "")
        name, k = first, 2
        while name in models:
            name, k = f"{first}-{k}", k + 1
        g, most = pipe.manifest.built_guidance, pipe.manifest.guidance_limit
        models[name] = ServedModel(name, path, pipe, float(g), pipe.scheduler.config, most, type(pipe.scheduler))
        log.info("serving %s (%s) from %s (default guidance %g)", name, type(pipe).__name__, path, g)
    return models


def cache_paths(artifacts, default: "str | None") -> list:
    """``OUT`` or ``OUT@cache=SPEC`` per served artifact, with ``default`` (``serve --cache``) applied to those built
    with ``--step-cache`` that name none; a cache an artifact cannot run is refused in one line, before loading."""
    from diffaccel.engines.pipelines.cache import cache_for, cache_suffix, check_default
    from diffaccel.optimize.artifact.manifest import Manifest

    out, manifests = [], []
    for a in artifacts:
        path, given = cache_suffix(a)
        manifests.append(Manifest.load(path))       # a missing or foreign folder fails here, in one line
        cache = cache_for(path, manifests[-1], given, default)
        out.append(f"{path}@cache={cache.spec}" if cache else path)
    check_default(default, manifests, "served artifacts")
    return out


def dry_run_problem(cls, config, steps: int) -> str:
    """Run a scheduler's whole schedule on a zero 1x1 latent, as the pipelines drive it (``scale_model_input`` where
    it has one; a flow-matching schedule with dynamic shifting gets a ``mu``, as SD3's and FLUX's pipelines pass):
    '' if it completes, else the error (one line)."""
    import torch

    try:
        scheduler = cls.from_config(config)
        shifting = {"mu": 1.0} if scheduler.config.get("use_dynamic_shifting") else {}
        scheduler.set_timesteps(steps, **shifting)
        x = torch.zeros(1, 4, 1, 1)
        scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
        for t in scheduler.timesteps:
            x = scheduler.step(torch.zeros_like(x), t, scale(x, t), return_dict=False)[0]
    except Exception as e:          # whatever the scheduler raises is the reason it cannot serve these steps
        return " ".join(f"{type(e).__name__}: {e}".split())[:200]
    return ""


def _flow_matching(cls) -> bool:
    """Whether a scheduler class drives flow-matching models (SD3, FLUX: velocity, sigmas) rather than diffusion
    ones: the two kinds cannot stand in for each other, though either builds from the other's config."""
    return cls is not None and cls.__name__.startswith("FlowMatch")


def _one_of(what: str, value, allowed) -> RequestError:
    return RequestError(f"unknown {what} {str(value)[:80]!r}; allowed: {', '.join(allowed)}", what)


def resolve(body, models: dict, schedulers: dict, cfg) -> dict:
    """The work of one request (a :class:`~diffaccel.engines.serving.schemas.JobInput`), every default filled in,
    or a :class:`RequestError` naming what is wrong and the allowed values."""
    if body.model is not None and body.model not in models:
        raise _one_of("model", body.model, models)
    model = models[body.model] if body.model is not None else next(iter(models.values()))
    if len(body.prompt) > cfg.max_prompt_chars or len(body.negative_prompt or "") > cfg.max_prompt_chars:
        raise RequestError(f"prompt has more than {cfg.max_prompt_chars} characters; shorten it", "prompt")
    if body.n > cfg.max_images:
        raise RequestError(f"n={body.n} is more than this server makes per request; allowed: 1-{cfg.max_images}",
                           "n")
    height, width = body.dimensions() or model.native
    if not model.allows(height, width):
        raise RequestError(f"size {width}x{height} cannot be served by model {model.name}: allowed {model.size_text()}"
                           f" (WIDTHxHEIGHT)", "size")
    steps = cfg.default_steps if body.steps is None else body.steps
    most = min(cfg.max_steps, model.train_steps)
    if steps > most:
        raise RequestError(f"steps={steps} is more than this server runs; allowed: 1-{most}", "steps")
    scheduler = "default" if body.scheduler is None else body.scheduler.strip().lower()
    if scheduler != "default" and scheduler not in schedulers:
        raise _one_of("scheduler", body.scheduler, ["default", *schedulers])
    flow = _flow_matching(model.default_scheduler)
    if scheduler != "default" and _flow_matching(schedulers[scheduler]) != flow:
        allowed = ["default", *(n for n, c in schedulers.items() if _flow_matching(c) == flow)]
        raise RequestError(f"scheduler {scheduler} cannot drive model {model.name}, which denoises by "
                           f"{'flow matching' if flow else 'diffusion'} ({model.default_scheduler.__name__}); "
                           f"allowed: {', '.join(allowed)}", "scheduler")
    problem = model.schedule_problem(scheduler, schedulers.get(scheduler), steps)
    if problem:
        raise RequestError(f"scheduler {scheduler} cannot run {steps} step(s) on model {model.name} ({problem}); "
                           "ask for more steps or another scheduler", "steps")
    guidance = float(model.default_guidance if body.guidance_scale is None else body.guidance_scale)
    if model.max_guidance is not None and guidance > 1:
        raise RequestError(f"guidance_scale={guidance:g} needs classifier-free guidance, which model {model.name} was "
                           f"built without; allowed: 0-1", "guidance_scale")
    return {"model": model.name, "prompt": body.prompt, "negative_prompt": body.negative_prompt, "n": body.n,
            "height": height, "width": width, "steps": steps, "scheduler": scheduler,
            "guidance_scale": guidance,
            "seed": secrets.randbelow(2**31) if body.seed is None else body.seed}


def batch_key(work: dict) -> tuple:
    """Jobs with equal keys can share one engine call and each still get the image it would get alone."""
    return (work["model"], work["height"], work["width"], work["steps"], work["scheduler"], work["guidance_scale"],
            bool(work["negative_prompt"]))
