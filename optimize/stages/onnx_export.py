"""ONNX stages: export every component (validated against PyTorch), then build ONNX Runtime engines."""
from __future__ import annotations

import time
from pathlib import Path

from diffaccel.optimize.export.onnx_export import export_onnx, onnx_files
from diffaccel.optimize.export.parity import check_parity
from diffaccel.optimize.families.sd import export_module
from diffaccel.optimize.stages.base import Context, Stage
from diffaccel.optimize.artifact.files import fresh_dir

ADVICE_EXPORT = ("Try --exporter torchscript, another --opset, or a smaller --height/--width range; "
                 "report the model if it persists.")


def _timed(ctx: Context, stage: str, comp: str):
    class _T:
        def __enter__(self):
            self.t0 = time.perf_counter()
            ctx.reporter.item(stage, comp)

        def __exit__(self, *exc):
            if exc[0] is None:
                ctx.reporter.item_done(stage, comp, time.perf_counter() - self.t0)
    return _T()


def latest_model(ctx: Context, comp: str, before: str) -> Path:
    """The newest ONNX model of ``comp`` written by a stage that runs before ``before``."""
    names = [s.name for s in ctx.plan]
    for name in reversed(names[: names.index(before)]):
        out = ctx.manifest.stages.get(name, {}).get("outputs", {}).get(comp)
        if out:
            return ctx.root / out
    raise RuntimeError(f"no model of {comp} before stage {before}")


class ExportStage(Stage):
    name = "export"

    def settings(self, ctx):
        c = ctx.config
        return {"source": ctx.source.sha256, "exporter": str(c.exporter), "opset": c.opset,
                "specs": {k: v.to_dict() for k, v in ctx.specs.items()}}

    def run(self, ctx):
        from diffaccel.engines.backends.onnxruntime import OrtEngine

        files, outputs = [], {}
        for comp in ctx.components:
            spec = ctx.specs[comp]
            module = export_module(comp, ctx.pipe)
            with _timed(ctx, self.name, comp), fresh_dir(ctx.root / comp / "export") as d:
                written = export_onnx(spec, module, d / "model.onnx", exporter=ctx.config.exporter,
                                      opset=ctx.config.opset, seed=ctx.config.seed)
                engine = OrtEngine(d / "model.onnx", provider="cpu", level="basic", threads=ctx.config.threads)
                report = check_parity(spec, lambda **x: _named(module, spec, x), engine, advice=ADVICE_EXPORT)
                del engine
            ctx.stage_info[comp] = {"validation": report}
            files += [ctx.root / comp / "export" / p.name for p in written]
            outputs[comp] = f"{comp}/export/model.onnx"
        ctx.stage_outputs = outputs
        return files


def _named(module, spec, inputs: dict) -> dict:
    out = module(*(inputs[t.name] for t in spec.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o for t, o in zip(spec.outputs, out)}


class OrtEngineStage(Stage):
    """Offline graph optimization for the chosen execution provider, saved so sessions load fast; then parity of the
    saved engine with PyTorch, and the component entries of the manifest."""

    name = "engine"

    @classmethod
    def preflight(cls, config) -> None:
        from diffaccel.engines.backends.onnxruntime import check_provider

        check_provider(config.provider)   # --provider cuda on a machine without it fails before the export

    def settings(self, ctx):
        c = ctx.config
        return {"provider": c.provider, "graph_level": c.graph_level, "precision": str(c.precision)}

    def run(self, ctx):
        from diffaccel.engines.backends.onnxruntime import OrtEngine, check_provider, session_options

        import onnxruntime as ort

        files = []
        ort_name = check_provider(ctx.config.provider)
        for comp in ctx.components:
            src = latest_model(ctx, comp, self.name)
            spec = ctx.specs[comp]
            with _timed(ctx, self.name, comp), fresh_dir(ctx.root / comp / "engine") as d:
                external = len(onnx_files(src)) > 1
                so = session_options(ctx.config.threads, ctx.config.graph_level, d / "model.onnx",
                                     "model.onnx.data" if external else None)
                ort.InferenceSession(str(src), so, providers=[ort_name])
                engine = OrtEngine(d / "model.onnx", provider=ctx.config.provider, threads=ctx.config.threads)
                module = export_module(comp, ctx.pipe)
                report = check_parity(spec, lambda **x: _named(module, spec, x), engine, **ctx.tolerance(comp),
                                      samples=ctx.validation_samples(comp), advice=ctx.parity_advice(comp))
                del engine
                written = [p.name for p in onnx_files(d / "model.onnx")]
            engine_files = [ctx.root / comp / "engine" / n for n in written]
            files += engine_files
            ctx.record_component(comp, backend="onnxruntime", provider=ctx.config.provider,
                                 engine=f"{comp}/engine/model.onnx", files=engine_files, validation=report)
        return files


def _register():
    from diffaccel.optimize.stages.plans import register_plan
    from diffaccel.optimize.stages.assets import AssetsStage

    register_plan("onnxruntime", "fp32", [AssetsStage, ExportStage, OrtEngineStage],
                  "ONNX export, ORT graph optimization for the chosen provider")


_register()
