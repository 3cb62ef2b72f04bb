"""The ONNX Runtime engine stage: offline graph optimization for the chosen execution provider (attention fused into
ONNX Runtime's ``MultiHeadAttention`` on the CPU), saved so sessions load fast, then parity with PyTorch."""
from __future__ import annotations

from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.export.onnx_export import onnx_files
from diffaccel.optimize.stages.base import Stage, StageResult
from diffaccel.optimize.stages.export import FUSING_LEVELS


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
        return {"provider": c.provider, "graph_level": c.graph_level, "precision": str(c.precision),
                "fuse_attention": fuses_attention(c)}

    def run(self, ctx):
        from diffaccel.engines.backends.onnxruntime import OrtEngine, check_provider, session_options
        from diffaccel.optimize.export.attention import fused_graph
        from diffaccel.optimize.quant.weight_only import entry_precision

        import onnxruntime as ort

        result = StageResult()
        ort_name = check_provider(ctx.config.provider)
        for comp in ctx.components:
            src = ctx.latest_model(comp, self.name)
            with ctx.timed(self.name, comp), fresh_dir(ctx.root / comp / "engine") as d:
                external = len(onnx_files(src)) > 1
                # build-time sessions keep the weights in their mapped files (prepacking makes anonymous copies;
                # the saved engine is the same without it, and sessions that serve prepack as usual)
                so = session_options(ctx.config.threads, ctx.config.graph_level, d / "model.onnx",
                                     "model.onnx.data" if external else None, prepack=False)
                graph, fused = fused_graph(src) if fuses_attention(ctx.config) else (None, 0)
                if graph:       # the fused graph; its weights stay where the source's are
                    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                str(src.parent))
                ort.InferenceSession(graph or str(src), so, providers=[ort_name])
                del graph
                engine = OrtEngine(d / "model.onnx", provider=ctx.config.provider, threads=ctx.config.threads,
                                   arena=False, prepack=False)
                report = ctx.check_against_torch(comp, engine)   # on what earlier stages recorded
                del engine
                written = [p.name for p in onnx_files(d / "model.onnx")]
            engine_files = [ctx.root / comp / "engine" / n for n in written]
            result.add(comp, files=engine_files)
            ctx.record_component(comp, backend="onnxruntime", provider=ctx.config.provider,
                                 engine=f"{comp}/engine/model.onnx", files=engine_files, validation=report,
                                 fused_attention=fused, **entry_precision(ctx.config.precision, comp))
        return result


def fuses_attention(config) -> bool:
    """Whether the engine stage fuses exported attention into ONNX Runtime's MultiHeadAttention (its CPU kernel's
    tiled attention never holds the score matrix; see optimize/export/attention.py). CPU only: that is where it is
    verified; ``--graph-level basic`` (or disable) keeps the graph as exported."""
    return config.provider == "cpu" and config.graph_level in FUSING_LEVELS

