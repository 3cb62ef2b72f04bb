"""``diffaccel bench``: load an artifact's pipeline once, calibrate its batch service times, then run one load test
or a sweep of them (arrival rates x max batch x batch timeout) and assemble one JSON-able record.

>>> [label for label, _ in SweepConfig(rates=("0.5x", "2"), max_batches=(1, 4)).points(LoadConfig())]
['0.5x', '0.5x', '2', '2']
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import statistics
import time

from diffaccel.engines.serving.batching import BatchPolicy, Request
from diffaccel.eval.harness.runner import native_size
from diffaccel.eval.loadbench.report import choose_slo, summarize, table_row
from diffaccel.optimize.sources.prompts import default_prompts
from diffaccel.eval.loadbench.loop import LoadConfig, check_timeout_ms, parse_rate, serve

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
MAX_POINTS = 64
WORKLOAD = ("steps", "height", "width", "guidance")   # fixed for a benchmark; the load and the policy vary


def rate_label(cfg: LoadConfig) -> "str | None":
    return None if cfg.rate is None else f"{cfg.rate:g}x" if cfg.rate_relative else f"{cfg.rate:g}"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Axes to sweep (empty: keep the base config's value) and an optional p95 latency SLO in seconds."""

    rates: tuple = ()          # "2.5" requests/s or "1x" (a multiple of the measured batch-1 capacity)
    max_batches: tuple = ()
    timeouts_ms: tuple = ()
    slo_p95_s: "float | None" = None

    def __post_init__(self):
        for name in ("rates", "max_batches", "timeouts_ms"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for r in self.rates:
            parse_rate(r)
        for b in self.max_batches:
            BatchPolicy(b, 0.0)
        for t in self.timeouts_ms:
            check_timeout_ms(t)
        if self.slo_p95_s is not None and not (isinstance(self.slo_p95_s, (int, float)) and
                                               math.isfinite(self.slo_p95_s) and self.slo_p95_s > 0):
            raise ValueError(f"SLO p95 {self.slo_p95_s!r} s must be a number > 0")
        n = len(self.rates or "1") * len(self.max_batches or "1") * len(self.timeouts_ms or "1")
        if n > MAX_POINTS:
            raise ValueError(f"the sweep has {n} configurations; at most {MAX_POINTS} are allowed")

    def points(self, base: LoadConfig) -> list:
        """[(rate label, LoadConfig)] for every combination, rates outermost."""
        if self.rates and base.concurrency is not None:
            raise ValueError("a rate sweep needs Poisson arrivals: use --rate instead of --concurrency")
        rates = [parse_rate(r) for r in self.rates] or [(base.rate, base.rate_relative)]
        out = []
        for (rate, rel), b, t in itertools.product(rates, self.max_batches or [base.max_batch],
                                                   self.timeouts_ms or [base.timeout_ms]):
            cfg = dataclasses.replace(base, rate=rate, rate_relative=rel, max_batch=b, timeout_ms=t)
            out.append((rate_label(cfg), cfg))
        return out


class LoadBench:
    """The artifact's drop-in pipeline with a fixed workload (steps, size, guidance), ready to serve load tests."""

    def __init__(self, artifact, base: LoadConfig, prompts=(), provider=None, threads=None, cache=None):
        from diffaccel.engines.pipelines import pipeline_class

        self.pipe = pipeline_class(artifact).from_pretrained(artifact, provider=provider, threads=threads)
        if cache is not None:                 # a DeepCacheConfig: one batch is one call, so the cache is per batch
            self.pipe.denoiser.enable_cache(cache)
        self.pipe.set_progress_bar_config(disable=True)
        native = native_size(self.pipe)
        self.base = dataclasses.replace(base, height=base.height or native, width=base.width or native)
        self.prompts = tuple(prompts) or default_prompts(self.pipe.manifest.source.get("spec", ""))
        self.calibration: dict = {}

    def run_batch(self, batch: list) -> list:
        """One pipeline call for the whole batch; one generator per request, seeded by the request."""
        import torch

        c = self.base
        return self.pipe([r.prompt for r in batch], num_inference_steps=c.steps, height=c.height, width=c.width,
                         guidance_scale=c.guidance, generator=[torch.Generator().manual_seed(r.seed) for r in batch],
                         output_type="pil").images

    def calibrate(self, max_batch: int, repeats: int = 1) -> dict:
        """Service time (median of ``repeats``) of one batch of each size 1..max_batch, after warming up on the
        smallest and the largest batch."""
        def batch(n):
            return [Request(-1 - k, 0.0, self.prompts[k % len(self.prompts)], self.base.seed + 1_000_000 + k)
                    for k in range(n)]

        for n in sorted({1, max_batch}):
            self.run_batch(batch(n))
        for n in range(1, max_batch + 1):
            samples = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                self.run_batch(batch(n))
                samples.append(time.perf_counter() - t0)
            self.calibration[n] = statistics.median(samples)
            log.info("calibration: batch %d takes %.3f s", n, self.calibration[n])
        return self.calibration

    def run(self, cfg: LoadConfig, keep_images: bool = False) -> tuple:
        """One load test. Returns (run record with point, metrics, requests and batches; images by request id)."""
        changed = [k for k in WORKLOAD if getattr(cfg, k) not in (None, getattr(self.base, k))]
        if changed:
            raise ValueError(f"{', '.join(changed)} differ from the calibrated workload; make a new LoadBench")
        if cfg.max_batch not in self.calibration:
            self.calibrate(cfg.max_batch)
        rate = None if cfg.rate is None else cfg.rate / self.calibration[1] if cfg.rate_relative else cfg.rate
        raw = serve(self.run_batch, cfg, rate, self.prompts, keep_images)
        point = {"rate_label": rate_label(cfg), "rate_rps": rate, "concurrency": cfg.concurrency,
                 "max_batch": cfg.max_batch, "timeout_ms": cfg.timeout_ms}
        metrics = summarize(raw, self.calibration, point)
        return {"point": point, "metrics": metrics, "requests": raw["requests"], "batches": raw["batches"]}, \
            raw["images"]


def run_bench(artifact, base: LoadConfig, sweep: "SweepConfig | None" = None, prompts=(), provider=None,
              threads=None, calib_repeats: int = 3, on_run=None, cache=None) -> dict:
    """Calibrate, run every configuration of ``sweep`` (one run without it) and return the full record.
    ``on_run(index, total, run)`` is called after each run (for progress)."""
    from diffaccel.optimize.artifact.manifest import now

    from diffaccel.eval.harness.host import describe, host_info

    sweep = sweep or SweepConfig()
    points = sweep.points(base)
    bench = LoadBench(artifact, base, prompts, provider, threads, cache)
    bench.calibrate(max(cfg.max_batch for _, cfg in points), calib_repeats)
    runs = []
    for i, (_, cfg) in enumerate(points):
        run, _ = bench.run(cfg)
        runs.append(run)
        if on_run is not None:
            on_run(i, len(points), run)
    table = [table_row(r["point"], r["metrics"]) for r in runs]
    m, host = bench.pipe.manifest, host_info()
    return {"schema_version": SCHEMA_VERSION, "benchmark": "load", "created": now(), "artifact": str(artifact),
            "source": m.source.get("spec"),
            "engine": f"{m.get('backend')}/{m.get('precision')}" + (f"@cache={cache.spec}" if cache else ""),
            "engine_max_batch": (m.get("shapes") or {}).get("batch", [None, None])[1],
            "config": {**bench.base.to_dict(), "prompts": list(bench.prompts), "provider": provider,
                       "threads": threads, "calib_repeats": calib_repeats, "cache": cache.spec if cache else None},
            "sweep": dataclasses.asdict(sweep), "host": host, "host_text": describe(host),
            "calibration": [{"batch": b, "seconds": s, "images_per_min": b / s * 60}
                            for b, s in sorted(bench.calibration.items())],
            "table": table, "slo": choose_slo(table, sweep.slo_p95_s) if sweep.slo_p95_s else None, "runs": runs}
