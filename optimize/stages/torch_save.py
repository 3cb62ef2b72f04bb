"""The torch backend's stage: save each model (safetensors) in the precision it will run in, and check parity."""
from __future__ import annotations

from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.stages.base import Stage, StageResult


class TorchSaveStage(Stage):
    name = "engine"

    def settings(self, ctx):
        return {"precision": str(ctx.config.precision), "source": ctx.source.sha256}

    def run(self, ctx):
        from diffaccel.engines.backends import torch as torch_backend

        result, saved = StageResult(), {}
        low = {} if str(ctx.config.precision) == "fp32" else tolerance(str(ctx.config.precision))
        for comp in ctx.components:
            model_name = ctx.family.SOURCE_MODEL[comp]
            model = getattr(ctx.pipe, model_name)
            entry = {"model_class": type(model).__name__, "precision": str(ctx.config.precision),
                     "engine": f"{model_name}/engine", "spec": ctx.specs[comp].to_dict(), "family": ctx.family.NAME}
            with ctx.timed(self.name, comp):
                if model_name not in saved:
                    with fresh_dir(ctx.root / model_name / "engine") as d:
                        model.save_pretrained(str(d), safe_serialization=True)
                    saved[model_name] = sorted(p for p in (ctx.root / model_name / "engine").rglob("*")
                                               if p.is_file())
                engine = torch_backend.load(ctx.root, comp, entry)
                report = ctx.check_against_torch(comp, engine, **(ctx.tolerance(comp) or low))
            ctx.record_component(comp, backend="torch", engine=entry["engine"], files=saved[model_name],
                                 validation=report, model_class=entry["model_class"])
            result.add(comp, files=[f for f in saved[model_name] if f not in result.files])
        return result
