"""What is evaluated: the baseline, the peers a user would try instead, and diffaccel artifacts.

Each :class:`Variant` knows how to load its pipeline (timed as *load*) and how to prepare it (a dtype cast or
``torch.compile``, timed as *prepare*). The baseline is the diffusers pipeline of the source's family at fp32 eager
(``StableDiffusionXLPipeline`` for SDXL, its invisible watermark off) with the artifacts' LoRAs fused at their
scales (:func:`baseline_loras`); peers are built from a fresh copy of it; artifacts load as their family's drop-in
pipeline (:func:`~diffaccel.engines.pipelines.pipeline_class`). Peers are a
plain registry: ``PEERS[name](pipe, device) -> pipe`` (a row with a ``source`` keyword also gets the Source). The
optimum-intel rows (its own OpenVINO pipeline, ``peers_optimum``) need the ``openvino-peer`` extra; where it is
absent their rows are skipped with the reason.

>>> sorted(PEERS)
['optimum-intel-bf16', 'optimum-intel-fp32', 'optimum-intel-int8', 'torch-bf16', 'torch-compile', 'torch-fp16']
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from pathlib import Path
from typing import Callable

from diffaccel.optimize.artifact.errors import DiffaccelError

log = logging.getLogger(__name__)

BASELINE = "torch-fp32"


def _cast(dtype_name: str):
    def prepare(pipe, device):
        import torch

        return pipe.to(device=device, dtype=getattr(torch, dtype_name))
    return prepare


def _compile(pipe, device):
    """The denoiser (U-Net or transformer) under ``torch.compile`` (default mode), as diffusers' docs show;
    compilation happens on the first calls, so it shows up in the warm-up time."""
    import torch

    from diffaccel.optimize.families import denoiser_of

    pipe = pipe.to(device)
    name = denoiser_of(pipe)
    setattr(pipe, name, torch.compile(getattr(pipe, name)))
    return pipe


def _optimum(precision: str):
    def prepare(pipe, device, source=None):
        from diffaccel.eval.harness.peers_optimum import prepare as optimum_prepare

        return optimum_prepare(precision)(pipe, device, source)
    return prepare


PEERS: "dict[str, Callable]" = {
    "torch-bf16": _cast("bfloat16"),
    "torch-fp16": _cast("float16"),
    "torch-compile": _compile,
    **{f"optimum-intel-{p}": _optimum(p) for p in ("fp32", "bf16", "int8")},
}


@dataclasses.dataclass
class Variant:
    name: str
    kind: str                       # baseline | peer | artifact
    load: Callable                  # () -> pipeline
    prepare: "Callable | None"      # (pipeline, device) -> pipeline
    info: dict = dataclasses.field(default_factory=dict)


def load_manifests(artifacts) -> list:
    """(path, Manifest) per artifact (``OUT`` or ``OUT@cache=SPEC``), each complete and unmodified (one-line errors
    otherwise)."""
    from diffaccel.engines.pipelines.cache import cache_suffix
    from diffaccel.optimize.artifact.manifest import Manifest

    out = []
    for a in artifacts:
        path = Path(cache_suffix(a)[0])
        m = Manifest.load(path)
        m.verify()
        out.append((path, m))
    return out


def artifact_caches(artifacts, manifests, default: "str | None") -> list:
    """The step cache each artifact runs with (:func:`~diffaccel.engines.pipelines.cache.cache_for`): its own
    ``@cache=SPEC``, else ``default`` (``--cache``) where it was built with ``--step-cache``; refused in one line
    when ``default`` is given and no artifact can take it."""
    from diffaccel.engines.pipelines.cache import cache_for, cache_suffix, check_default

    check_default(default, [m for _, m in manifests])
    caches = [cache_for(path, m, cache_suffix(a)[1], default) for a, (path, m) in zip(artifacts, manifests)]
    seen = [(path.resolve(), c) for (path, _), c in zip(manifests, caches)]
    twice = next((f"{p}" + (f"@cache={c.spec}" if c else "") for k, (p, c) in enumerate(seen) if (p, c) in seen[:k]),
                 None)
    if twice:
        raise DiffaccelError(f"{twice} is listed twice with the same cache; give each artifact once per setting")
    return caches


def baseline_spec(manifests, baseline: "str | None") -> str:
    """The baseline SRC: the given one, else the source recorded in the first artifact's manifest."""
    if baseline is not None:
        return str(baseline)
    if not manifests:
        raise DiffaccelError("nothing to compare: give artifact directories, or --baseline SRC (with --peers)")
    src = manifests[0][1].source
    return src["spec"] if src.get("kind") in ("builtin", "hub") else src.get("location", src["spec"])


def baseline_loras(manifests) -> list:
    """The LoRAs (``FILE:SCALE``, in fusing order) the first artifact was built with: the baseline gets them fused
    too, or it would be another model than the one the engines run. Their files must still be where the build
    read them (their hashes are checked against the artifact's by :func:`check_sources`)."""
    if not manifests:
        return []
    path, m = manifests[0]
    loras = m.source.get("loras") or []
    missing = [x["path"] for x in loras if not Path(x["path"]).is_file()]
    if missing:
        raise DiffaccelError(f"{path} was built with LoRA {missing[0]}, which is no longer there; the baseline needs "
                             "it fused to be the same model: put the file back (same content)")
    return [f"{x['path']}:{x['scale']!r}" for x in loras]


def check_guidance(manifests, guidance: float) -> None:
    """Refuse, before any work, classifier-free guidance for artifacts built for guidance <= 1 (their drop-in would
    refuse each call)."""
    bad = [str(path) for path, m in manifests if guidance > 1 and m.guidance_limit is not None]
    if bad:
        raise DiffaccelError(f"--guidance {guidance:g}: {', '.join(bad)} built for guidance <= 1 (diffaccel optimize "
                             "--guidance); evaluate at the guidance they serve, e.g. --guidance 0")


def default_guidance(manifests) -> float:
    """Evaluation's guidance when none is given: the one the first artifact was built for (every command's rule:
    :attr:`~diffaccel.optimize.artifact.manifest.Manifest.built_guidance`); artifacts built for others are run at
    it too, with a warning (their images are compared on the same prompts, seeds and guidance)."""
    if not manifests:
        return 7.5
    guidance = manifests[0][1].built_guidance
    others = sorted({m.built_guidance for _, m in manifests} - {guidance})
    if others:
        log.warning("the artifacts were built for guidance %g and %s; all run at %g (pass --guidance to choose)",
                    guidance, ", ".join(f"{g:g}" for g in others), guidance)
    return guidance


def check_sources(manifests, source, allow_different: bool) -> None:
    """Refuse artifacts built from other weights than the baseline's: their images are not comparable."""
    bad = [f"{path} (built from {m.source.get('spec')})" for path, m in manifests
           if m.source.get("sha256") != source.sha256]
    if bad and not allow_different:
        raise DiffaccelError(f"{', '.join(bad)} not built from the baseline {source.spec} (source hashes differ); "
                             "pass the right --baseline, or --allow-different-source to compare anyway")


def _artifact_names(manifests, caches) -> list:
    names = [f"{m['backend']}-{m['precision']}" + (f"@{c.spec}" if c else "") for (_, m), c in zip(manifests, caches)]
    return [f"{n}:{p.name}" if names.count(n) > 1 else n for n, (p, _) in zip(names, manifests)]


def plan(source, manifests, peers, device="cpu", provider=None, threads=None, caches=None) -> list:
    """The variants in run order: baseline, peers, artifacts (``caches``: each one's step cache, from
    :func:`artifact_caches`; None: none). ``info["device"]`` is where each one runs."""
    caches = caches or [None] * len(manifests)
    variants = [Variant(BASELINE, "baseline", source.load, lambda pipe, dev: pipe.to(dev),
                        {"source": source.to_dict(), "backend": "torch", "precision": "fp32", "device": device})]
    for name in peers:
        prepare = PEERS[name]
        if "source" in inspect.signature(prepare).parameters:     # rows that export the source itself
            prepare = functools.partial(prepare, source=source)
        variants.append(Variant(name, "peer", source.load, prepare, {"source": source.to_dict(), "device": device}))
    for name, (path, m), cache in zip(_artifact_names(manifests, caches), manifests, caches):
        prov = provider or m.get("provider")
        gpu = m["backend"] == "tensorrt" or prov in ("cuda", "tensorrt")
        variants.append(Variant(name, "artifact", _artifact_loader(path, provider, threads, cache), None, {
            "artifact": str(path), "backend": m["backend"], "precision": m["precision"], "provider": prov,
            "cache": cache.spec if cache else None,
            "device": "cuda" if gpu else "cpu", "source": m.source,
            "components": {c: e.get("precision") for c, e in m.components.items()}}))
    return variants


def _artifact_loader(path: Path, provider, threads, cache=None):
    def load():
        from diffaccel.engines.pipelines import pipeline_class

        pipe = pipeline_class(path).from_pretrained(path, provider=provider, threads=threads)
        if cache is not None:
            pipe.denoiser.enable_cache(cache)   # DeepCache on the split U-Net (docs/step-cache.md)
        return pipe
    return load


def use_scheduler(pipe, reference) -> None:
    """Give ``pipe`` a fresh scheduler of the reference's class and config, so every variant denoises alike."""
    pipe.scheduler = type(reference).from_config(reference.config)
