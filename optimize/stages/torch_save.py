"""The torch backend's stage: save each model (safetensors) in the precision it will run in, and check parity."""
from __future__ import annotations

from diffaccel.optimize.export.parity import check_parity
from diffaccel.optimize.families.sd import SOURCE_MODEL, export_module
from diffaccel.optimize.stages.onnx_export import _named, _timed
from diffaccel.optimize.stages.base import Stage
from diffaccel.optimize.artifact.files import fresh_dir


LOW_PRECISION_TOLERANCE = {"kind": "l2", "rtol": 0.1, "atol": 0.0}


class TorchSaveStage(Stage):
    name = "engine"

    def settings(self, ctx):
        return {"precision": str(ctx.config.precision), "source": ctx.source.sha256}

    def run(self, ctx):
        from diffaccel.engines.backends import torch as torch_backend

        files = []
        saved = {}
        for comp in ctx.components:
            model_name = SOURCE_MODEL[comp]
            model = getattr(ctx.pipe, model_name)
            entry = {"model_class": type(model).__name__, "precision": str(ctx.config.precision),
                     "engine": f"{model_name}/engine", "spec": ctx.specs[comp].to_dict()}
            with _timed(ctx, self.name, comp):
                if model_name not in saved:
                    with fresh_dir(ctx.root / model_name / "engine") as d:
                        model.save_pretrained(str(d), safe_serialization=True)
                    saved[model_name] = sorted(p for p in (ctx.root / model_name / "engine").rglob("*")
                                               if p.is_file())
                engine = torch_backend.load(ctx.root, comp, entry)
                spec = ctx.specs[comp]
                module = export_module(comp, ctx.pipe)
                tol = ctx.tolerance(comp) or (LOW_PRECISION_TOLERANCE if str(ctx.config.precision) != "fp32" else {})
                report = check_parity(spec, lambda **x: _named(module, spec, x), engine, **tol,
                                      advice=ctx.parity_advice(comp))
            ctx.record_component(comp, backend="torch", engine=entry["engine"], files=saved[model_name],
                                 validation=report, model_class=entry["model_class"])
            files += saved[model_name]
        return sorted(set(files))


def _register():
    from diffaccel.optimize.stages.plans import register_plan
    from diffaccel.optimize.stages.assets import AssetsStage

    register_plan("torch", "fp32", [AssetsStage, TorchSaveStage], "PyTorch eager reference")


_register()
