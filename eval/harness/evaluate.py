"""``evaluate()``: latency and quality of every variant against the diffusers baseline, on the same seeds.

>>> EvalConfig(seeds=(0, 1), steps=(10, 20)).steps
(10, 20)
>>> EvalConfig(batch_sizes=(0,))
Traceback (most recent call last):
...
ValueError: bad batch size 0: batch sizes must be >= 1
"""
from __future__ import annotations

import contextlib
import dataclasses

from diffaccel.optimize.sources.prompts import default_prompts
from diffaccel.optimize.stages.base import Reporter

DEVICES = ("cpu", "cuda")


def _ints(values, what: str, low: int) -> tuple:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"bad {what} {values!r}: give integers") from None
    if not out:
        raise ValueError(f"no {what} given")
    for v in out:
        if v < low:
            raise ValueError(f"bad {what} {v}: {what}s must be >= {low}")
    return tuple(dict.fromkeys(out))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How to evaluate. Validated on construction; recorded in full in report.json."""

    prompts: tuple = ()                   # () = shipped defaults (optimize/data/prompts.txt; tinyshapes: its eval set)
    seeds: tuple = (0, 1)
    steps: tuple = (20,)                  # several = a steps sweep; the largest is the headline
    height: "int | None" = None           # None = the model's native size
    width: "int | None" = None
    batch_sizes: tuple = (1, 2, 4)        # throughput (images/s) for each
    scheduler: "str | None" = None        # a diffusers scheduler class name or alias; None = the baseline's
    guidance_scale: "float | None" = None  # None = the artifacts' own where built for guidance <= 1, else 7.5
    peers: tuple = ()                     # extra rows: torch-bf16, torch-fp16, torch-compile
    warmup: int = 1                       # untimed calls per variant before timing
    repeat: int = 3                       # timed calls per batch size
    device: str = "cpu"                   # where the PyTorch baseline and peers run: cpu | cuda
    provider: "str | None" = None         # ONNX Runtime provider for artifacts (None = the one built for)
    threads: "int | None" = None          # torch and ONNX Runtime intra-op threads (None = their defaults)
    clip_model: "str | None" = None       # local Hugging Face CLIP folder -> CLIP score
    inception: "str | None" = None        # local TorchScript Inception -> FID
    lpips: "str | None" = None            # local TorchScript LPIPS -> LPIPS
    adherence: "bool | None" = None       # None = on for the tinyshapes baseline
    allow_different_source: bool = False
    bench: tuple = ()                     # diffaccel bench output folders to link into the report
    cache: "str | None" = None            # --cache SPEC for every --step-cache artifact without its own @cache=

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)
        if any(not str(p).strip() for p in prompts):
            raise ValueError("empty prompt given; every prompt needs some text")
        set_("prompts", tuple(str(p) for p in prompts))
        set_("bench", tuple(str(b) for b in ((self.bench,) if isinstance(self.bench, str) else self.bench)))
        set_("seeds", _ints(self.seeds, "seed", 0))
        set_("steps", tuple(sorted(_ints(self.steps, "step count", 1))))
        set_("batch_sizes", tuple(sorted(_ints(self.batch_sizes, "batch size", 1))))
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (int(v) < 8 or int(v) % 8):
                raise ValueError(f"bad {name} {v}: image sizes must be positive multiples of 8")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.warmup < 0 or self.repeat < 1:
            raise ValueError(f"bad warmup {self.warmup} / repeat {self.repeat}: need warmup >= 0 and repeat >= 1")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"bad guidance scale {self.guidance_scale}: must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"bad threads {self.threads}: must be >= 1")
        from diffaccel.engines.pipelines.cache import parse_cache

        parse_cache(self.cache)             # a bad --cache fails here, in one line
        from diffaccel.eval.harness.variants import PEERS

        set_("peers", tuple(self.peers))
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from: {', '.join(sorted(PEERS))}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def torch_threads(n: "int | None"):
    """Set torch's intra-op threads for the block (restored afterwards)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(artifacts=(), baseline: "str | None" = None, config: EvalConfig = EvalConfig(),
             out_dir="eval-report", *, reporter: "Reporter | None" = None, trust_pickle: bool = False,
             single_file_config: "str | None" = None) -> dict:
    """Measure the baseline, the peers and each artifact; write report.json/.md/.html (and images) to ``out_dir``
    (atomically: a finished report or none). Returns the report as stored in report.json.

    >>> report = evaluate(["out/tiny"], config=EvalConfig(steps=(4,)), out_dir="report")   # doctest: +SKIP
    >>> report["variants"][1]["quality"]["aggregate"]["psnr"]                                # doctest: +SKIP
    48.1
    """
    from diffaccel.optimize.sources import resolve_source
    from diffaccel.engines.pipelines.schedulers import scheduler_class

    from diffaccel.eval.metrics import quality

    from diffaccel.eval.report import write as rep

    from diffaccel.eval.harness import variants as var
    from diffaccel.eval.harness.runner import RunPlan, preimport, run_variant

    reporter = reporter or Reporter()
    manifests = var.load_manifests(artifacts)
    caches = var.artifact_caches(artifacts, manifests, config.cache)
    source = resolve_source(var.baseline_spec(manifests, baseline), trust_pickle=trust_pickle,
                            single_file_config=single_file_config, loras=var.baseline_loras(manifests))
    var.check_sources(manifests, source, config.allow_different_source)
    guidance = var.default_guidance(manifests) if config.guidance_scale is None else config.guidance_scale
    var.check_guidance(manifests, guidance)
    prompts = list(config.prompts or default_prompts(source.spec))
    adherence_on, adherence_why = quality.adherence_enabled(config.adherence, source.spec, prompts)
    learned = quality.Learned(config.clip_model, config.inception, config.lpips)
    out = rep.check_out_dir(out_dir)
    from diffaccel.eval.report.benchlinks import bench_summaries

    benches = bench_summaries(config.bench, out)
    rp = RunPlan(prompts, config.seeds, config.steps, config.batch_sizes, config.height, config.width,
                 guidance, config.warmup, config.repeat, config.device,
                 scheduler_cls=scheduler_class(config.scheduler) if config.scheduler is not None else None)
    preimport()
    with torch_threads(config.threads):
        runs = [run_variant(v, rp, reporter)
                for v in var.plan(source, manifests, config.peers, config.device, config.provider, config.threads,
                                  caches)]
        report, images = assemble(config, source, rp, runs, learned, adherence_on, adherence_why)
    if benches:
        report["load_benchmarks"] = benches
    return rep.write_report(report, images, out)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _uint8(image):
    import numpy as np

    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def _score_run(run, base, rp, learned, adherence_on: bool) -> dict:
    """Add quality, adherence and sweep quality to ``run.row``; return {relative image path: uint8 image}."""
    from diffaccel.eval.metrics import quality

    row, keys = run.row, [(rp.top, p, s) for p in range(len(rp.prompts)) for s in rp.seeds]
    q = quality.headline_quality(run.outputs, base.outputs, keys, rp.prompts, learned, run is base)
    q["aggregate"]["reference"] = run is base
    images = {}
    for r, k in zip(q["per_image"], keys):
        r["image"] = f"images/{_slug(row['name'])}/p{k[1]}-seed{k[2]}.png"
        images[r["image"]] = _uint8(run.outputs[k][0])
    row["quality"] = q
    by_steps = {r["steps"]: r for r in row["sweep"]}
    for r in quality.sweep_quality(run.outputs, base.outputs, rp.steps, len(rp.prompts), rp.seeds):
        by_steps[r["steps"]].update(r)
    row["adherence"] = None
    if adherence_on:
        adh = quality.adherence_by_steps(run.outputs, rp.steps, rp.prompts, rp.seeds)
        row["adherence"] = adh[rp.top]
        for s, a in adh.items():
            by_steps[s]["adherence_all"] = a["splits"]["overall"]["all"]
        for r, a in zip(q["per_image"], adh[rp.top]["per_image"]):
            r["adherence"] = a
    b, me = base.row["latency"], row["latency"]
    row["speedup"] = {"denoiser_step_p50": b["denoiser_step"]["p50"] / me["denoiser_step"]["p50"],
                      "end_to_end_p50": b["end_to_end"]["p50"] / me["end_to_end"]["p50"]}
    return images


def assemble(config: EvalConfig, source, rp, runs: list, learned, adherence_on: bool, adherence_why: str):
    """The report dict (numbers with their config and environment) and the images to store with it."""
    from diffaccel.optimize.artifact.manifest import now

    from diffaccel.eval.harness.host import host_info
    from diffaccel.eval.report.write import SCHEMA_VERSION

    base, images = runs[0], {}
    for run in runs:
        if run.row["status"] == "ok":
            images.update(_score_run(run, base, rp, learned, adherence_on))
    resolved = {"prompts": list(rp.prompts), "height": base.row["size"][0], "width": base.row["size"][1],
                "scheduler": type(rp.scheduler).__name__, "headline_steps": rp.top, "guidance_scale": rp.guidance_scale}
    n_images = len(rp.prompts) * len(rp.seeds)
    report = {"schema_version": SCHEMA_VERSION, "kind": "diffaccel-eval", "created": now(),
              "config": {**config.to_dict(), **resolved},
              "baseline": {"variant": base.row["name"], "source": source.to_dict()},
              "denoiser": base.row.get("denoiser"),
              "host": host_info(), "clock": base.row["clock"],
              "metrics": {**learned.status(n_images), "adherence": adherence_why},
              "variants": [r.row for r in runs]}
    return report, images
