"""The ``step_cache`` stage of an ``optimize --step-cache`` build: after the engine stage has built the U-Net's three
parts (``unet_head``, ``unet_deep``, ``unet_tail``, see :mod:`diffaccel.optimize.families.unet_split`), it runs the
whole step through them (head -> deep -> tail) against the PyTorch U-Net, and records the U-Net's manifest entry over
them: its spec, that parity, and the split (method, branch, graph names). Loading that entry gives an engine that
runs the three graphs in turn (:mod:`diffaccel.engines.split`), so every command runs a split artifact unchanged.

int8 is refused: its calibration captures the U-Net's inputs, and the parts' inputs (res samples, the cached feature)
would need a capture of their own per part; no plan does that yet.
"""
from __future__ import annotations

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.stages.base import Stage, StageResult

REFUSED = {"int8": "int8 calibrates the whole U-Net's inputs, not each part's",
           "fp8": "fp8 calibrates the whole U-Net's inputs, not each part's"}


def check_config(config) -> None:
    """Refuse, in one line, a ``--step-cache`` build no plan makes: int8/fp8 (calibration captures the whole U-Net's
    inputs) and the torch backend (it saves diffusers models, not graphs)."""
    if int(config.step_cache) < 0:
        raise ValueError(f"--step-cache branch {config.step_cache} must be >= 0 (0 caches the most)")
    why = REFUSED.get(str(config.precision)) or (
        "the torch backend saves whole diffusers models" if str(config.backend) == "torch" else None)
    if why:
        raise ValueError(f"--step-cache cannot be built with --backend {config.backend} --precision "
                         f"{config.precision} ({why}); use fp32 or bf16 (openvino), fp32 or fp16 (onnxruntime)")


class StepCacheStage(Stage):
    name = "step_cache"

    def settings(self, ctx):
        return {"split": ctx.family.split.record(ctx.denoiser)}

    def run(self, ctx):
        from diffaccel.engines.base import load_engine
        from diffaccel.engines.split import SplitEngine

        den, record = ctx.denoiser, ctx.family.split.record(ctx.denoiser)
        missing = [c for c in record["graphs"].values() if c not in ctx.manifest.components]
        if missing:
            raise DiffaccelError(f"the step cache needs engines for {', '.join(missing)}; build every component "
                                 "(leave --components out) or its whole denoiser (--components "
                                 f"{den})")
        head = ctx.manifest.components[record["graphs"]["head"]]
        with ctx.timed(self.name, den):
            engine = SplitEngine.from_components(ctx.root, ctx.manifest.components, record, ctx.specs[den],
                                                 load_engine, threads=ctx.config.threads)
            module = ctx.family.base.export_module(den, ctx.models([ctx.family.SOURCE_MODEL[den]]))
            low = {} if str(ctx.config.precision) == "fp32" else tolerance(str(ctx.config.precision))
            report = ctx.check_against_torch(den, engine, module=module, final=False,
                                             advice="rebuild without --step-cache, or report the model", **low)
            del engine, module
        extra = {k: head[k] for k in ("provider", "openvino") if k in head}
        ctx.record_component(den, backend=head["backend"], engine=head["engine"], files=[], validation=report,
                             step_cache=record, **extra)
        return StageResult()
