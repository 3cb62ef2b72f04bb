"""Stage machinery: the context every stage sees and the base class.

A stage declares the config that determines its outputs; its key is the hash of that config chained with the key of
the stage before it, so a changed setting redoes that stage and everything after it, and nothing before.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from diffaccel.optimize.config import config_hash
from diffaccel.optimize.artifact.manifest import Manifest, file_entry
from diffaccel.optimize.families.sd import ModelGeometry, sd_specs

log = logging.getLogger(__name__)


class Reporter:
    """Progress events from library code; the default logs them. The CLI passes one that draws progress bars."""

    def stage_start(self, name: str, items: list) -> None:
        log.info("stage %s: %s", name, ", ".join(items) if items else "")

    def item(self, stage: str, item: str) -> None:
        log.info("stage %s: %s", stage, item)

    def item_done(self, stage: str, item: str, seconds: float) -> None:
        log.info("stage %s: %s done in %.1fs", stage, item, seconds)

    def stage_end(self, name: str, seconds: float, skipped: bool, reason: str = "") -> None:
        log.info("stage %s %s (%.1fs)", name, f"skipped: {reason}" if skipped else "done", seconds)


@dataclasses.dataclass
class Context:
    source: "object"                 # diffaccel.optimize.sources.Source
    config: "object"                 # diffaccel.optimize.api.OptimizeConfig
    root: Path                       # the work directory (renamed to OUT at the end)
    manifest: Manifest
    reporter: Reporter
    plan: list = dataclasses.field(default_factory=list)
    stage_outputs: dict = dataclasses.field(default_factory=dict)   # set by a stage: {component: model path}
    stage_info: dict = dataclasses.field(default_factory=dict)      # set by a stage: {component: {facts}}
    _pipe: "object" = None

    @property
    def pipe(self):
        if self._pipe is None:
            t0 = time.perf_counter()
            self.reporter.stage_start("load", [])
            self._pipe = self.source.load()
            self.reporter.stage_end("load", time.perf_counter() - t0, False)
        return self._pipe

    def release_pipe(self) -> None:
        """Free the PyTorch pipeline (GBs for real checkpoints) before a memory-hungry step; reloaded on demand."""
        import gc

        self._pipe = None
        gc.collect()

    @property
    def geometry(self) -> ModelGeometry:
        geo = self.manifest.get("pipeline", {}).get("geometry")
        if geo is None:
            geo = dataclasses.asdict(ModelGeometry.from_pipeline(self.pipe))
            self.manifest.data.setdefault("pipeline", {})["geometry"] = geo
        return ModelGeometry(**geo)

    @property
    def components(self) -> tuple:
        return tuple(self.config.components)

    @property
    def specs(self) -> dict:
        return sd_specs(self.geometry, self.config.shapes)

    def tolerance(self, component: str) -> dict:
        """Parity tolerance of the final engine: the spec's for fp32; a precision stage may record a wider one."""
        for stage in self.plan:
            tol = self.info_of(stage.name, component).get("tolerance")
            if tol:
                return dict(tol)
        return {}

    def parity_advice(self, component: str) -> str:
        return ("Try keeping this component in fp32 (--precision fp32), another --opset, or a smaller shape range."
                if str(self.config.precision) != "fp32" else
                "Try --exporter torchscript or another --opset; if it persists, report the model.")

    def info_of(self, stage: str, comp: str) -> dict:
        """What an earlier stage recorded about ``comp`` (e.g. the export's parity, the quantizer's decision)."""
        return self.manifest.stages.get(stage, {}).get("components", {}).get(comp, {})

    def record_component(self, comp: str, *, backend: str, engine: str, files: list, validation: dict,
                         **extra) -> None:
        """Write the component's manifest entry afresh: the engine, its files and parity, plus the facts that
        earlier stages of this plan recorded about it."""
        entry = {"backend": backend, "precision": str(self.config.precision), "engine": engine,
                 "config": f"{comp}/config.json", "spec": self.specs[comp].to_dict(),
                 "files": record_files(self.root, files), "validation": validation, **extra}
        for stage in self.plan:
            if stage.name != "engine" and self.info_of(stage.name, comp):
                entry[stage.name] = self.info_of(stage.name, comp)
        self.manifest.components[comp] = entry

    def validation_samples(self, comp: str) -> "list | None":
        """Realistic inputs saved by a precision stage (quantized engines are checked on these, not on noise)."""
        import torch

        for stage in self.plan:
            rel = self.info_of(stage.name, comp).get("validation_inputs")
            if rel:
                return torch.load(self.root / rel, weights_only=True)
        return None


class Stage:
    """A named, skippable step. Subclasses set ``name`` and implement ``settings`` and ``run``."""

    name = "stage"

    @classmethod
    def preflight(cls, config) -> None:
        """Raise a DiffaccelError before anything is written if this machine cannot run the stage (missing
        library, no GPU...). Called by optimize() for every stage of the plan."""

    def settings(self, ctx: Context) -> dict:
        """Everything (besides upstream stages) that determines this stage's outputs."""
        return {}

    def run(self, ctx: Context) -> list:
        """Do the work; return the files written (Paths under ctx.root)."""
        raise NotImplementedError

    def key(self, ctx: Context, upstream: str) -> str:
        return config_hash({"stage": self.name, "settings": self.settings(ctx), "upstream": upstream})


def record_files(root: Path, paths: list) -> list:
    return [file_entry(root, Path(p)) for p in paths]
