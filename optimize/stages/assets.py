"""The assets stage: tokenizer, scheduler and per-component configs, what the drop-in pipeline needs besides the
engines."""
from __future__ import annotations

import dataclasses
import json

from diffaccel.optimize.artifact.files import atomic_write_text, fresh_dir
from diffaccel.optimize.families.sd import ModelGeometry
from diffaccel.optimize.stages.base import Stage


class AssetsStage(Stage):
    """Tokenizer, scheduler and per-component configs: what the drop-in pipeline needs besides the engines."""

    name = "assets"

    def settings(self, ctx):
        return {"source": ctx.source.sha256}

    def run(self, ctx):
        pipe = ctx.pipe
        files = []
        with fresh_dir(ctx.root / "tokenizer") as d:
            pipe.tokenizer.save_pretrained(str(d))
        with fresh_dir(ctx.root / "scheduler") as d:
            pipe.scheduler.save_config(str(d))
        configs = {"text_encoder": pipe.text_encoder.config.to_dict(), "unet": dict(pipe.unet.config),
                   "vae_decoder": dict(pipe.vae.config), "vae_encoder": dict(pipe.vae.config)}
        for comp, cfg in configs.items():
            cfg = {k: v for k, v in cfg.items() if k != "torch_dtype"}
            (ctx.root / comp).mkdir(parents=True, exist_ok=True)
            atomic_write_text(ctx.root / comp / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str))
        for sub in ("tokenizer", "scheduler"):
            files += sorted(p for p in (ctx.root / sub).rglob("*") if p.is_file())
        files += [ctx.root / c / "config.json" for c in configs]
        ctx.manifest.data.setdefault("pipeline", {}).update({
            "geometry": dataclasses.asdict(ModelGeometry.from_pipeline(pipe)),
            "scheduler": type(pipe.scheduler).__name__,
            "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
            "text_encoder_class": type(pipe.text_encoder).__name__,
        })
        return files
