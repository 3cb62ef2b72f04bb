"""Measure one variant: load, warm up, generate every prompt x seed at every step count, then time batches.

Every variant goes through the same code with the same :class:`~diffaccel.eval.harness.timing.Clock`: the same initial
latents (drawn in fp32 from ``torch.Generator().manual_seed(seed)`` and cast to the variant's dtype), the same
scheduler (a fresh copy of the baseline's), the same prompts; the final latents are captured with
``callback_on_step_end``, so one call gives both the image and its latents.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time

import numpy as np

from diffaccel.optimize.artifact.errors import BackendUnavailableError, DiffaccelError, one_line

from diffaccel.eval.harness.instrument import MemoryMonitor, instrument
from diffaccel.eval.harness.timing import Clock, LatencyStats
from diffaccel.eval.harness.variants import use_scheduler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunPlan:
    """Resolved settings shared by every variant. ``scheduler`` is set from the baseline when it loads."""

    prompts: list
    seeds: tuple
    steps: tuple                 # ascending; the largest is the headline
    batch_sizes: tuple
    height: "int | None"
    width: "int | None"
    guidance_scale: float
    warmup: int
    repeat: int
    device: str
    scheduler_cls: "type | None" = None
    scheduler: "object | None" = None

    @property
    def top(self) -> int:
        return max(self.steps)


@dataclasses.dataclass
class Run:
    row: dict
    outputs: dict = dataclasses.field(default_factory=dict)   # (steps, prompt, seed) -> (image, latents)


def stats(samples) -> "dict | None":
    return LatencyStats.from_samples(samples).to_dict() if len(samples) else None


def _denoiser_of(pipe) -> str:
    from diffaccel.optimize.families import denoiser_of

    return denoiser_of(pipe)


def initial_noise(pipe, seeds: list, size: tuple):
    """The starting latents of every variant, the same float32 noise per seed (image i from ``seeds[i]``, as
    diffusers draws it from one generator per image), in the pipeline's layout: (1, latent channels, h, w) per image,
    packed into 2x2 patches where the pipeline packs (FLUX); cast to the denoiser's dtype."""
    import torch

    from diffaccel.optimize.families import denoiser_of

    c, f = pipe.vae.config.latent_channels, pipe.vae_scale_factor
    packs = hasattr(pipe, "_pack_latents")
    h, w = (2 * (n // (2 * f)) for n in size) if packs else (n // f for n in size)
    noise = torch.cat([torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(s)) for s in seeds])
    if packs:
        noise = pipe._pack_latents(noise, len(seeds), c, h, w)
    return noise.to(getattr(pipe, denoiser_of(pipe)).dtype)


def generate(pipe, rp: RunPlan, prompts: list, seeds: list, steps: int, size: tuple):
    """(images float NHWC in [0, 1], final latents) for one pipeline call."""
    import torch

    latents = initial_noise(pipe, seeds, size)
    captured = {}

    def on_step_end(_pipe, _i, _t, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=rp.guidance_scale, height=size[0],
               width=size[1], latents=latents, generator=[torch.Generator().manual_seed(s) for s in seeds],
               output_type="np", callback_on_step_end=on_step_end)
    return np.asarray(out.images, dtype=np.float32), captured["latents"].float().cpu().numpy()


def _call(pipe, rp, clock, timings, prompts, seeds, steps, size) -> tuple:
    timings.clear()
    with clock.span() as span:
        images, latents = generate(pipe, rp, prompts, seeds, steps, size)
    totals = timings.totals()
    record = {"e2e": span.seconds, "denoiser": timings.samples("denoiser"), "text_encoder": totals["text_encoder"],
              "vae_decode": totals["vae_decode"]}
    return images, latents, record


def _latency(calls: list, steps: int) -> dict:
    from diffaccel.eval.harness.stability import problems

    e2e = [c["e2e"] for c in calls]
    te, vae = [c["text_encoder"] for c in calls], [c["vae_decode"] for c in calls]
    denoiser_total = [sum(c["denoiser"]) for c in calls]
    other = [e - t - u - v for e, t, u, v in zip(e2e, te, denoiser_total, vae)]
    loop = [e - t - v for e, t, v in zip(e2e, te, vae)]
    samples = [s for c in calls for s in c["denoiser"]]
    return {"denoiser_step": stats(samples), "denoiser_step_samples": samples, "text_encoder": stats(te),
            "vae_decode": stats(vae), "other": stats(other), "end_to_end": stats(e2e),
            "steps_per_second": steps / float(np.mean(loop)),
            "unstable": problems({"denoiser_step": stats(samples), "end_to_end": stats(e2e)}, "step"),
            "breakdown": {"text_encoder": float(np.mean(te)), "denoiser": float(np.mean(denoiser_total)),
                          "vae_decode": float(np.mean(vae)), "other": float(np.mean(other))}}


def _load(variant, rp: RunPlan) -> tuple:
    t0 = time.perf_counter()
    pipe = variant.load()
    t1 = time.perf_counter()
    if variant.prepare is not None:
        pipe = variant.prepare(pipe, rp.device)
    t2 = time.perf_counter()
    pipe.set_progress_bar_config(disable=True)
    if rp.scheduler is None:     # the baseline: its scheduler (or --scheduler's class on its config) is the reference
        cls = rp.scheduler_cls or type(pipe.scheduler)
        rp.scheduler = cls.from_config(pipe.scheduler.config)
    use_scheduler(pipe, rp.scheduler)
    return pipe, {"load_seconds": t1 - t0, "prepare_seconds": t2 - t1}


def native_size(pipe) -> int:
    """The side in pixels diffusers' ``__call__`` uses by default (a drop-in's ``native_size``; the same rule for a
    diffusers pipeline: its ``default_sample_size``, else the denoiser's ``sample_size``, times the VAE's factor)."""
    from diffaccel.optimize.families import denoiser_of

    if hasattr(pipe, "native_size"):
        return pipe.native_size
    size = getattr(pipe, "default_sample_size", None) or getattr(pipe, denoiser_of(pipe)).config.sample_size
    return int(size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor


def _measure(pipe, rp: RunPlan, reporter, name: str, row: dict) -> dict:
    """Warm up, then every prompt x seed at every step count (batch 1), then each batch size; fills ``row``."""
    native = native_size(pipe)
    size = (rp.height or native, rp.width or native)
    clock = Clock(str(pipe.device))
    row.update(size=list(size), clock=clock.name, sweep=[])
    outputs = {}
    with instrument(pipe, clock) as timings:
        reporter.item(name, "warm-up")
        t0 = time.perf_counter()
        for i in range(rp.warmup):
            _call(pipe, rp, clock, timings, rp.prompts[:1], rp.seeds[:1], rp.top, size)
            if i == 0:
                row["setup"]["first_call_seconds"] = time.perf_counter() - t0
        reporter.item_done(name, "warm-up", time.perf_counter() - t0)
        for steps in sorted(rp.steps, reverse=True):
            t0 = time.perf_counter()
            reporter.item(name, f"{steps} steps")
            calls = _images_at(pipe, rp, clock, timings, steps, size, outputs)
            if steps == rp.top:
                row["latency"] = _latency(calls, steps)
            row["sweep"].insert(0, {"steps": steps, **_call_summary(calls, images=1)})
            reporter.item_done(name, f"{steps} steps", time.perf_counter() - t0)
        row["throughput"] = [_throughput(pipe, rp, clock, timings, b, size, reporter, name) for b in rp.batch_sizes]
    return outputs


def _images_at(pipe, rp: RunPlan, clock, timings, steps: int, size, outputs: dict) -> list:
    """Every prompt x seed at ``steps`` (batch 1) into ``outputs``; returns the per-call time records."""
    calls = []
    for p, prompt in enumerate(rp.prompts):
        for seed in rp.seeds:
            images, latents, rec = _call(pipe, rp, clock, timings, [prompt], [seed], steps, size)
            outputs[(steps, p, seed)] = (images[0], latents[0])
            calls.append(rec)
    return calls


def _throughput(pipe, rp, clock, timings, batch: int, size, reporter, name) -> dict:
    t0 = time.perf_counter()
    reporter.item(name, f"batch {batch}")
    prompts = [rp.prompts[i % len(rp.prompts)] for i in range(batch)]
    seeds = [rp.seeds[0] + i for i in range(batch)]
    _call(pipe, rp, clock, timings, prompts, seeds, rp.top, size)       # warm-up for this batch shape
    recs = [_call(pipe, rp, clock, timings, prompts, seeds, rp.top, size)[2] for _ in range(rp.repeat)]
    reporter.item_done(name, f"batch {batch}", time.perf_counter() - t0)
    return {"batch_size": batch, **_call_summary(recs, images=batch)}


def _call_summary(calls: list, images: int) -> dict:
    """End-to-end latency, images per second and U-Net step p50 of timed calls that made ``images`` images each."""
    e2e = [c["e2e"] for c in calls]
    return {"end_to_end": stats(e2e), "images_per_second": images / float(np.mean(e2e)),
            "denoiser_step_p50": float(np.median([s for c in calls for s in c["denoiser"]]))}


def preimport() -> None:
    """Import the libraries every variant needs, so no variant's load time includes Python imports."""
    import diffusers  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from diffaccel.engines.pipelines import sd as pipelines  # noqa: F401
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass


def run_variant(variant, rp: RunPlan, reporter) -> Run:
    """Measure ``variant``. A failing peer or artifact gives a row with status "failed" and the reason (a peer whose
    optional extra is absent: "skipped"); a failing baseline (nothing to compare with) raises."""
    items = ["load", "warm-up"] + [f"{s} steps" for s in sorted(rp.steps, reverse=True)] + \
            [f"batch {b}" for b in rp.batch_sizes]
    reporter.stage_start(variant.name, items)
    row = {"name": variant.name, "kind": variant.kind, "status": "ok", "error": None, "info": variant.info,
           "setup": {"load_seconds": None, "prepare_seconds": None, "first_call_seconds": None}}
    t_all = time.perf_counter()
    pipe = None
    try:
        with MemoryMonitor(variant.info.get("device", rp.device)) as mem:
            reporter.item(variant.name, "load")
            pipe, setup = _load(variant, rp)
            row["setup"].update(setup)
            row["pipeline"] = type(pipe).__name__      # the family's diffusers pipeline or its drop-in
            row["denoiser"] = _denoiser_of(pipe)
            mem.mark_loaded()
            reporter.item_done(variant.name, "load", setup["load_seconds"] + setup["prepare_seconds"])
            outputs = _measure(pipe, rp, reporter, variant.name, row)
        row["memory"] = mem.result()
    except Exception as e:  # noqa: BLE001 - a peer that cannot run here is a finding, not a crash
        if variant.kind == "peer" and isinstance(e, BackendUnavailableError):   # e.g. its optional extra is absent
            row.update(status="skipped", error=one_line(e)[:300])
            reporter.stage_end(variant.name, time.perf_counter() - t_all, True, f"skipped: {row['error']}")
            return Run(row)
        if variant.kind == "baseline" or isinstance(e, DiffaccelError):
            raise
        log.warning("variant %s failed", variant.name, exc_info=True)
        row.update(status="failed", error=f"{type(e).__name__}: {one_line(e)[:300]}")
        reporter.stage_end(variant.name, time.perf_counter() - t_all, True, f"failed: {row['error']}")
        return Run(row)
    finally:
        del pipe
        gc.collect()
    reporter.stage_end(variant.name, time.perf_counter() - t_all, False)
    return Run(row, outputs)
