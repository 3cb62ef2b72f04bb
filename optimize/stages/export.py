"""The export stage: every component to ONNX, each checked against PyTorch (whose outputs it records for later
stages' checks)."""
from __future__ import annotations

from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.export.onnx_export import export_onnx
from diffaccel.optimize.export.parity import named_outputs
from diffaccel.optimize.memory import release_memory
from diffaccel.optimize.stages.base import ComponentOutcome, Stage, StageResult

REFERENCE_FILE = "reference.pt"     # PyTorch's outputs on the parity inputs (see RecordedReference)

FUSING_LEVELS = ("extended", "all")     # --graph-level values at which exported attention is fused (CPU)
ADVICE_EXPORT = ("Try --exporter torchscript, another --opset, or a smaller --height/--width range; "
                 "report the model if it persists.")


class ExportStage(Stage):
    name = "export"

    def settings(self, ctx):
        c = ctx.config
        return {"source": ctx.source.sha256, "exporter": str(c.exporter), "opset": c.opset,
                "specs": {k: v.to_dict() for k, v in ctx.specs.items()}}

    def run(self, ctx):
        from diffaccel.optimize.export.onnx_export import param_bytes
        result = StageResult()
        alone = ctx.source.loads_models_alone
        if alone:
            # each component's model is read alone: the build holds one component's weights at a time
            ctx.release_pipe()
            order = list(ctx.components)
        else:
            # largest component last: the pipeline is let go before it, so the build holds one copy of its weights
            sizes = {c: param_bytes(ctx.family.export_module(c, ctx.pipe)) for c in ctx.components}
            order = sorted(ctx.components, key=lambda c: sizes[c])
        for comp in order:
            spec = ctx.specs[comp]
            module = ctx.family.export_module(comp, ctx.models([ctx.family.SOURCE_MODEL[comp]]) if alone else ctx.pipe)
            if not alone and comp == order[-1]:
                ctx.release_pipe()      # the other components' weights; later stages reload it if they need it
            with ctx.timed(self.name, comp), fresh_dir(ctx.root / comp / "export") as d:
                written = export_onnx(spec, module, d / "model.onnx", exporter=ctx.config.exporter,
                                      opset=ctx.config.opset, seed=ctx.config.seed)
                # PyTorch's outputs on the parity inputs, kept for this check and every later engine's
                reference = _record(spec, module)
                reference.save(d / REFERENCE_FILE)
                del module
                release_memory()        # the last component's torch weights go before its ONNX Runtime session
                engine = ExportCheck(d / "model.onnx", spec, ctx.config.threads,
                                     fuse=ctx.config.graph_level in FUSING_LEVELS)
                report = ctx.check_against_torch(comp, engine, reference=reference, final=False,
                                                 advice=ADVICE_EXPORT)
                report["fused_attention_at_opt"] = engine.fused
                del engine
                release_memory()
            files = [ctx.root / comp / "export" / p.name for p in written] + [ctx.root / comp / "export" /
                                                                               REFERENCE_FILE]
            result.add(comp, ComponentOutcome(model=f"{comp}/export/model.onnx", validation=report,
                                              facts={"reference": f"{comp}/export/{REFERENCE_FILE}"}), files=files)
        ctx.release_pipe()
        return result


class ExportCheck:
    """The exported graph as the export's parity check runs it, in ONNX Runtime on the CPU without graph
    optimizations (folding constants copies weights), one session at a time: at the spec's opt point with its
    attention fused as the CPU engine runs it (the unfused score matrices made SD 1.5's U-Net check the build's peak,
    7.4 GB, 3.5 GB of it activations at 512x512 with batch 2), at the other point exactly as exported, so the
    exporter's own attention is checked too. Without ``fuse``, or with nothing to fuse, both points run as exported."""

    def __init__(self, path, spec, threads, fuse: bool):
        self.path, self.spec, self.threads, self.fuse = path, spec, threads, fuse
        self.fused = 0
        self._engine, self._fused_engine = None, False

    def __call__(self, **inputs):
        from diffaccel.engines.backends.onnxruntime import OrtEngine
        from diffaccel.optimize.export.attention import fused_graph

        at_opt = self.spec.axis_values({k: tuple(v.shape) for k, v in inputs.items()}) == self.spec.opt_values()
        want = self.fuse and at_opt
        if self._engine is None or want != self._fused_engine:
            self._engine = None
            release_memory()
            graph, n = fused_graph(self.path) if want else (None, 0)
            self._engine = OrtEngine(graph or self.path, provider="cpu", level="disable", threads=self.threads,
                                     arena=False, external_data_dir=self.path.parent, prepack=False)
            self._fused_engine, self.fused = want, max(self.fused, n)
        return self._engine(**inputs)


def _record(spec, module):
    from diffaccel.optimize.export.parity import RecordedReference

    return RecordedReference.of(spec, lambda **x: named_outputs(module, spec, x))
