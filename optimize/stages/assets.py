"""The assets stage: tokenizer, scheduler and per-component configs, what the drop-in pipeline needs besides the
engines.

The scheduler config is kept as the source wrote it. diffusers fills every key a file omits with the scheduler
class's default and remembers which ones it filled (``_use_default_values``); ``from_config`` leaves those out when
it builds another scheduler class, which then uses *its own* defaults. A config saved with every default written out
would swap differently (SD 1.5's file omits ``timestep_spacing``: DPM-Solver built from it uses ``linspace``, built
from a filled-in PNDM config ``leading``), so the images would drift from diffusers' after a scheduler swap.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffaccel.optimize.artifact.files import atomic_write_text, fresh_dir, given_config_text
from diffaccel.optimize.stages.base import Stage, StageResult

SCHEDULER_FILE = "scheduler_config.json"


class AssetsStage(Stage):
    """Tokenizer, scheduler and per-component configs: what the drop-in pipeline needs besides the engines."""

    name = "assets"

    def settings(self, ctx):
        # "scheduler": artifacts made before the scheduler config was kept as written get it rewritten on resume
        return {"source": ctx.source.sha256, "scheduler": "as written by the source"}

    def run(self, ctx):
        pipe = ctx.pipe
        files = []
        assets = ctx.family.assets(pipe)      # tokenizers, per-component configs, pipeline facts
        for name, tokenizer in assets["tokenizers"].items():
            with fresh_dir(ctx.root / name) as d:
                tokenizer.save_pretrained(str(d))
        with fresh_dir(ctx.root / "scheduler") as d:
            (d / SCHEDULER_FILE).write_text(scheduler_config_text(pipe.scheduler, ctx.source))
        configs = assets["configs"]
        for comp, cfg in configs.items():
            cfg = {k: v for k, v in cfg.items() if k != "torch_dtype"}
            (ctx.root / comp).mkdir(parents=True, exist_ok=True)
            atomic_write_text(ctx.root / comp / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str))
        for sub in (*assets["tokenizers"], "scheduler"):
            files += sorted(p for p in (ctx.root / sub).rglob("*") if p.is_file())
        files += [ctx.root / c / "config.json" for c in configs]
        ctx.manifest.data.setdefault("pipeline", {}).update({
            "family": ctx.family.NAME,
            "denoiser": ctx.family.DENOISER,
            "denoiser_class": type(getattr(pipe, ctx.family.DENOISER)).__name__,
            "geometry": dataclasses.asdict(ctx.family.ModelGeometry.from_pipeline(pipe)),
            "scheduler": type(pipe.scheduler).__name__,
            "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
            **assets["pipeline"],
        })
        del pipe
        if ctx.source.loads_models_alone and any(s.name == "export" for s in ctx.plan):
            ctx.release_pipe()      # the export reads each model alone: the pipeline would only sit beside them
        return StageResult(files=files)


def scheduler_config_text(scheduler, source=None) -> str:
    """The scheduler config as the source wrote it: the source folder's file verbatim when there is one (a diffusers
    folder, a hub snapshot, a shipped built-in) and it names the class loaded, else only the keys the scheduler was
    given (built-ins made in code, single files).

    >>> from diffusers import DDIMScheduler
    >>> json.loads(scheduler_config_text(DDIMScheduler(beta_schedule="scaled_linear")))["beta_schedule"]
    'scaled_linear'
    >>> "timestep_spacing" in json.loads(scheduler_config_text(DDIMScheduler(beta_schedule="scaled_linear")))
    False
    """
    path = Path(source.location) / "scheduler" / SCHEDULER_FILE if source is not None else None
    if path is not None and path.is_file():
        text = path.read_text()
        if json.loads(text).get("_class_name") == type(scheduler).__name__:
            return text
    return given_config_text(scheduler)
