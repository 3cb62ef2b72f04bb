"""Step caching on the engines: DeepCache for U-Nets built with ``diffaccel optimize --step-cache``.

The drop-in's U-Net takes diffusers' cache switches (``CacheMixin``'s names): ``pipe.unet.enable_cache(
DeepCacheConfig(interval=3))``, ``pipe.unet.disable_cache()``, ``pipe.unet.is_cache_enabled``. With a cache on, step 0
of a pipeline call and every ``interval``-th step after it run the whole U-Net (head -> deep -> tail) and keep the deep
part's output; the steps between run head -> tail on what was kept. A new call starts afresh: it is recognised by
new text conditioning (diffusers' pipelines make ``encoder_hidden_states`` once per call and pass the same tensor
every step), another latent shape (batch, size), or a timestep that does not go down (a new schedule starting; a
second-order scheduler's repeated timestep counts too, so such schedulers cache less). Nothing is reused across calls.

>>> parse_cache("deepcache:interval=5")
DeepCacheConfig(interval=5, branch=0)
>>> parse_cache("off") is None
True
>>> cache_suffix("out/ts@cache=deepcache:interval=3"), cache_suffix("out/ts")
(('out/ts', 'deepcache:interval=3'), ('out/ts', None))
>>> DeepCacheConfig(interval=5).spec, DeepCacheConfig(interval=3, branch=4).spec
('deepcache:interval=5', 'deepcache:interval=3,branch=4')
>>> parse_cache("fora:interval=2")
Traceback (most recent call last):
...
diffaccel.optimize.artifact.errors.DiffaccelError: bad --cache 'fora:interval=2': write deepcache[:interval=N][,branch=B] (e.g. deepcache:interval=3) or off; transformer caches (FORA, FirstBlockCache) are not built yet
"""
from __future__ import annotations

import dataclasses

from diffaccel.optimize.artifact.errors import DiffaccelError, PipelineArgumentError

CACHE_HELP = ("step cache of an artifact built with optimize --step-cache: deepcache[:interval=N][,branch=B] "
              "(e.g. deepcache:interval=3; interval 1 = every step whole) or off (default)")
SUFFIX = "@cache="                  # OUT@cache=SPEC: one artifact with one cache setting (eval, serve)


@dataclasses.dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache (Ma et al., 2023) on a split U-Net: the deep part's output is recomputed every ``interval`` steps
    and reused between; ``branch``: where the U-Net was split (DeepCache's ``cache_branch_id``; must be the one the
    artifact was built with, ``optimize --step-cache BRANCH``)."""

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"DeepCacheConfig interval {self.interval!r} must be an integer >= 1 (1: no caching)")
        if not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"DeepCacheConfig branch {self.branch!r} must be an integer >= 0")

    @property
    def spec(self) -> str:
        """The ``--cache`` text that gives this config back (what reports and served model names show)."""
        return f"deepcache:interval={self.interval}" + (f",branch={self.branch}" if self.branch else "")


def parse_cache(text: "str | None") -> "DeepCacheConfig | None":
    """A ``--cache`` value: ``deepcache[:interval=N][,branch=B]``, or ``off``/``none`` (None)."""
    if text is None or str(text).strip().lower() in ("off", "none", ""):
        return None
    method, _, rest = str(text).strip().partition(":")
    try:
        if method.lower() != "deepcache":
            raise ValueError
        pairs = dict(p.split("=", 1) for p in rest.replace(" ", "").split(",") if p)
        if set(pairs) - {"interval", "branch"}:
            raise ValueError
        return DeepCacheConfig(**{k: int(v) for k, v in pairs.items()})
    except ValueError:
        raise DiffaccelError(f"bad --cache {text!r}: write deepcache[:interval=N][,branch=B] (e.g. "
                             "deepcache:interval=3) or off; transformer caches (FORA, FirstBlockCache) are not built "
                             "yet") from None


def cache_suffix(text) -> tuple:
    """``OUT@cache=SPEC`` -> (OUT, SPEC); a plain ``OUT`` -> (OUT, None)."""
    path, found, spec = str(text).rpartition(SUFFIX)
    return (path, spec) if found else (str(text), None)


def built_split(manifest) -> "dict | None":
    """The ``step_cache`` record of the artifact's split denoiser (``optimize --step-cache``), or None."""
    return next((e["step_cache"] for e in manifest.components.values() if e.get("step_cache")), None)


def check_default(default: "str | None", manifests, what: str = "artifacts") -> None:
    """Refuse in one line a command-wide ``--cache`` (``default``) when none of ``manifests`` was built with
    ``--step-cache`` (only those take a cache)."""
    if parse_cache(default) is not None and not any(built_split(m) for m in manifests):
        raise DiffaccelError(f"--cache {default}: none of the {what} was built with --step-cache (only those take a "
                             "cache); rebuild one with diffaccel optimize SRC -o OUT --step-cache")


def cache_for(path, manifest, given: "str | None", default: "str | None" = None) -> "DeepCacheConfig | None":
    """The cache one artifact runs with: its own ``@cache=SPEC`` (``given``; ``off`` for none), else ``default``
    (a command's ``--cache``) where the artifact was built with ``--step-cache`` (others run whole). A cache the
    artifact cannot run is refused here, in one line, before anything loads."""
    config = parse_cache(given if given is not None else default)
    split = built_split(manifest)
    if config is None or (given is None and split is None):
        return None
    if split is None:
        raise DiffaccelError(f"{path}@cache={given}: {path} was built without --step-cache, so it has no part to "
                             "cache; rebuild it with diffaccel optimize SRC -o OUT --step-cache (U-Nets only)")
    if config.branch != int(split["branch"]):
        raise DiffaccelError(f"--cache {config.spec}: {path} was split at branch {split['branch']}; pass "
                             f"branch={split['branch']} or rebuild with diffaccel optimize --step-cache {config.branch}")
    return config


class StepCache:
    """One U-Net's DeepCache state across the steps of a pipeline call, over a split engine."""

    def __init__(self, engine, config: DeepCacheConfig):
        if not isinstance(config, DeepCacheConfig):
            raise PipelineArgumentError(f"this U-Net takes a DeepCacheConfig, not a {type(config).__name__}; "
                                        "e.g. enable_cache(DeepCacheConfig(interval=3))")
        branch = getattr(engine, "branch", None)
        if branch is None:
            raise PipelineArgumentError("this artifact's denoiser was built without --step-cache, so it has no part "
                                        "to cache; rebuild it with diffaccel optimize SRC -o OUT --step-cache "
                                        "(U-Nets only)")
        if config.branch != branch:
            raise PipelineArgumentError(f"DeepCacheConfig(branch={config.branch}) does not match this artifact's "
                                        f"split, built at branch {branch}; pass branch={branch} or rebuild with "
                                        f"diffaccel optimize --step-cache {config.branch}")
        self.engine, self.config = engine, config
        self.reset()

    def reset(self) -> None:
        self.feature, self.step, self._text, self._shape, self._t = None, 0, None, None, None

    def __call__(self, inputs: dict) -> dict:
        """The step's outputs, whole or cached (see the module's notes)."""
        t = float(inputs["timestep"].max())
        text, shape = inputs["encoder_hidden_states"], tuple(inputs["sample"].shape)
        if text is not self._text or shape != self._shape or self._t is None or t >= self._t:
            self.reset()
        self._text, self._shape, self._t = text, shape, t    # the text tensor is held: its id cannot be reused
        full = self.feature is None or self.step % self.config.interval == 0
        self.step += 1
        if full:
            out, self.feature = self.engine.full(inputs)
            return out
        return self.engine.shallow(inputs, self.feature)
