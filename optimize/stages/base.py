"""The stage contract: the context every stage sees, what a stage returns, and the base class.

A stage declares the settings that determine its outputs (its key chains them with the stage before it, see
:mod:`~diffaccel.optimize.artifact.keys`) and returns a :class:`StageResult`: the files it wrote and, per component,
a :class:`ComponentOutcome` (the model it wrote, its parity report, the tolerance later checks use, saved validation
inputs, decisions). ``optimize()`` records results in the manifest; later stages read them back through the context.

>>> r = StageResult()
>>> r.add("transformer", ComponentOutcome(model="transformer/quantized/model.onnx", facts={"decision": "int8"}))
>>> r.outputs(), r.records()
({'transformer': 'transformer/quantized/model.onnx'}, {'transformer': {'decision': 'int8'}})
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from diffaccel.optimize.artifact.keys import stage_key
from diffaccel.optimize.artifact.manifest import Manifest, file_entry
from diffaccel.optimize.memory import PeakWatch, release_memory

if TYPE_CHECKING:        # annotations only: optimize() (api) builds the Context, so importing it here would loop
    from diffaccel.optimize.api import OptimizeConfig
    from diffaccel.optimize.sources import Source

log = logging.getLogger(__name__)


class Reporter:
    """Progress events from library code; the default logs them. The CLI passes one that draws progress bars."""

    def stage_start(self, name: str, items: list) -> None:
        log.info("stage %s: %s", name, ", ".join(items) if items else "")

    def item(self, stage: str, item: str) -> None:
        log.info("stage %s: %s", stage, item)

    def item_done(self, stage: str, item: str, seconds: float, peak_bytes: int = 0) -> None:
        log.info("stage %s: %s done in %.1fs (peak RSS %.2f GB)", stage, item, seconds, peak_bytes / 1e9)

    def stage_end(self, name: str, seconds: float, skipped: bool, reason: str = "", peak_bytes: int = 0,
                  anon_bytes: int = 0) -> None:
        log.info("stage %s %s (%.1fs, peak RSS %.2f GB, anonymous %.2f GB)", name,
                 f"skipped: {reason}" if skipped else "done", seconds, peak_bytes / 1e9, anon_bytes / 1e9)


# ---- what a stage returns --------------------------------------------------------------------------------------
@dataclasses.dataclass
class ComponentOutcome:
    """What one stage did to one component."""

    model: "str | None" = None              # the ONNX model it wrote (path under the artifact) for later stages
    validation: "dict | None" = None        # its parity report
    tolerance: "dict | None" = None         # the parity tolerance the component's final engine is held to
    validation_inputs: "str | None" = None  # realistic inputs it saved (path) to check later engines on
    facts: dict = dataclasses.field(default_factory=dict)   # decisions and measurements (method, reason, ...)

    def record(self) -> dict:
        fields = {"validation": self.validation, "tolerance": self.tolerance,
                  "validation_inputs": self.validation_inputs}
        return {**self.facts, **{k: v for k, v in fields.items() if v is not None}}


@dataclasses.dataclass
class StageResult:
    files: list = dataclasses.field(default_factory=list)        # Paths under the work dir
    components: dict = dataclasses.field(default_factory=dict)   # component -> ComponentOutcome

    def add(self, comp: str, outcome: "ComponentOutcome | None" = None, files=()) -> None:
        if outcome is not None:
            self.components[comp] = outcome
        self.files += list(files)

    def outputs(self) -> dict:
        return {c: o.model for c, o in self.components.items() if o.model}

    def records(self) -> dict:
        return {c: rec for c, o in self.components.items() if (rec := o.record())}


# ---- what a stage sees ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    source: Source
    config: OptimizeConfig
    root: Path                       # the work directory (renamed to OUT at the end)
    manifest: Manifest
    reporter: Reporter
    family: "ModuleType | None" = None   # the model family module (None: detected from the loaded pipeline)
    plan: "list[Stage]" = dataclasses.field(default_factory=list)
    _pipe: "object | None" = None    # the diffusers pipeline, loaded on first use (see ``pipe``)
    item_peaks: "dict[str, dict[str, int]]" = dataclasses.field(default_factory=dict)  # stage -> item -> peak RSS

    def __post_init__(self):
        if self.family is None:   # configs unreadable without loading (a single-file checkpoint without --config)
            from diffaccel.optimize.families import configs_of, detect

            self.family = detect(configs_of(self.pipe), self.source.spec)
        if getattr(self.config, "step_cache", None) is not None:     # the U-Net built as DeepCache's three parts
            self.family = step_cache_family(self.family, self.source, self.config.step_cache, lambda: self.pipe)

    @property
    def pipe(self):
        if self._pipe is None:
            t0 = time.perf_counter()
            self.reporter.stage_start("load", [])
            self._pipe = self.source.load()
            self.reporter.stage_end("load", time.perf_counter() - t0, False)
        return self._pipe

    def models(self, names) -> dict:
        """The named torch models: the loaded pipeline's when there is one, else read alone from the source where it
        can (a diffusers folder or a recipe), so that a stage holds one component's weights and not the pipeline's
        (SDXL's is 14 GB in fp32)."""
        if self._pipe is not None or not self.source.loads_models_alone:
            return {n: getattr(self.pipe, n) for n in names}
        t0 = time.perf_counter()
        models = self.source.load_models(names)
        log.info("read %s alone in %.1fs", ", ".join(names), time.perf_counter() - t0)
        return models

    def release_pipe(self) -> None:
        """Free the PyTorch pipeline (GBs for real checkpoints) before a memory-hungry step; reloaded on demand."""
        self._pipe = None
        release_memory()

    @property
    def geometry(self):
        geo = self.manifest.get("pipeline", {}).get("geometry")
        if geo is None:
            geo = dataclasses.asdict(self.family.ModelGeometry.from_pipeline(self.pipe))
            self.manifest.data.setdefault("pipeline", {})["geometry"] = geo
        return self.family.ModelGeometry(**geo)

    @property
    def denoiser(self) -> str:
        """The denoiser's component name in this family (``unet`` or ``transformer``)."""
        return self.family.DENOISER

    @property
    def components(self) -> tuple:
        from diffaccel.optimize.families import components_of

        return components_of(self.family, self.config.components)

    @property
    def recorded_components(self) -> tuple:
        """The manifest's components: those built, plus what a last stage records over them (the denoiser of a
        ``--step-cache`` build, over its parts)."""
        return self.components + tuple(getattr(self.family, "COMPOSED", ()))

    @property
    def specs(self) -> dict:
        geo = self.geometry
        if not getattr(self.config, "classifier_free", True):   # built for guidance <= 1: the U-Net batch is not
            geo = dataclasses.replace(geo, guidance_doubles_batch=False)   # doubled (optimize --guidance)
        return self.family.specs(geo, self.config.shapes)

    # ---- what earlier stages recorded ------------------------------------------------------------------------
    def info_of(self, stage: str, comp: str) -> dict:
        """What an earlier stage recorded about ``comp`` (e.g. the export's parity, the quantizer's decision)."""
        return self.manifest.stages.get(stage, {}).get("components", {}).get(comp, {})

    def latest_model(self, comp: str, before: str) -> Path:
        """The newest ONNX model of ``comp`` written by a stage of the plan that runs before stage ``before``."""
        names = [s.name for s in self.plan]
        for name in reversed(names[: names.index(before)]):
            out = self.manifest.stages.get(name, {}).get("outputs", {}).get(comp)
            if out:
                return self.root / out
        raise RuntimeError(f"no model of {comp} before stage {before}")

    def tolerance(self, component: str) -> dict:
        """Parity tolerance of the final engine: the spec's for fp32; a precision stage may record a wider one."""
        for stage in self.plan:
            tol = self.info_of(stage.name, component).get("tolerance")
            if tol:
                return dict(tol)
        return {}

    def validation_samples(self, comp: str) -> "list | None":
        """Realistic inputs saved by a precision stage (quantized engines are checked on these, not on noise)."""
        import torch

        for stage in self.plan:
            rel = self.info_of(stage.name, comp).get("validation_inputs")
            if rel:
                return torch.load(self.root / rel, weights_only=True)
        return None

    # ---- helpers every stage uses ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, stage: str, comp: str):
        """Report the start and (on success) the time and peak RSS of one item of a stage (peaks in ``item_peaks``;
        measured without resetting anything, see :mod:`diffaccel.optimize.memory`)."""
        t0 = time.perf_counter()
        self.reporter.item(stage, comp)
        with PeakWatch() as peak:
            yield
        self.item_peaks.setdefault(stage, {})[comp] = peak.peak_bytes
        self.reporter.item_done(stage, comp, time.perf_counter() - t0, peak_bytes=peak.peak_bytes)

    def parity_advice(self, component: str) -> str:
        return ("Try keeping this component in fp32 (--precision fp32), another --opset, or a smaller shape range."
                if str(self.config.precision) != "fp32" else
                "Try --exporter torchscript or another --opset; if it persists, report the model.")

    def check_against_torch(self, comp: str, engine, *, module=None, reference=None, final: bool = True,
                            **overrides) -> dict:
        """Parity of ``engine`` (named tensors in and out) with the PyTorch component: ``reference`` (e.g. a
        :class:`~diffaccel.optimize.export.parity.RecordedReference`), else ``module`` (a torch module with the spec's
        signature), else the outputs earlier stages recorded, falling back to the loaded pipeline's module for inputs
        nobody recorded. By default the final engine's check, on the tolerance and realistic inputs that earlier
        stages recorded; ``overrides`` (atol, rtol, kind, samples, advice) replace those."""
        from diffaccel.optimize.export.parity import check_parity, named_outputs

        spec = self.specs[comp]
        if reference is None:
            reference = (self.recorded_reference(comp) if module is None else
                         (lambda **x: named_outputs(module, spec, x)))
        kw = {**self.tolerance(comp), "samples": self.validation_samples(comp),
              "advice": self.parity_advice(comp)} if final else {}
        kw.update(overrides)
        return check_parity(spec, reference, engine, **kw)

    def torch_reference(self, comp: str):
        """The PyTorch component as a parity reference (named inputs -> named outputs); loads the pipeline."""
        from diffaccel.optimize.export.parity import named_outputs

        spec = self.specs[comp]
        module = self.family.export_module(comp, self.pipe)
        return lambda **x: named_outputs(module, spec, x)

    def recorded_reference(self, comp: str):
        """Every output of the PyTorch component that earlier stages recorded (``reference`` files), answering other
        inputs by loading the pipeline."""
        from diffaccel.optimize.export.parity import RecordedReference

        ref = RecordedReference(fallback=lambda **x: self.torch_reference(comp)(**x))
        for stage in self.plan:
            rel = self.info_of(stage.name, comp).get("reference")
            if rel and (self.root / rel).is_file():
                ref = ref.merged(RecordedReference.load(self.root / rel))
        return ref

    def record_component(self, comp: str, *, backend: str, engine: str, files: list, validation: dict,
                         **extra) -> None:
        """Write the component's manifest entry afresh: the engine, its files and parity, plus the facts that
        earlier stages of this plan recorded about it."""
        entry = {"backend": backend, "precision": str(self.config.precision), "engine": engine,
                 "family": self.family.NAME, "config": f"{comp}/config.json", "spec": self.specs[comp].to_dict(),
                 "files": record_files(self.root, files), "validation": validation, **extra}
        for stage in self.plan:
            if stage.name != "engine" and self.info_of(stage.name, comp):
                entry[stage.name] = self.info_of(stage.name, comp)
        self.manifest.components[comp] = entry


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

    def run(self, ctx: Context) -> StageResult:
        """Do the work; return the files written (Paths under ctx.root) and what it did per component."""
        raise NotImplementedError

    def key(self, ctx: Context, upstream: str) -> str:
        return stage_key(self.name, self.settings(ctx), upstream)


def step_cache_family(family, source, branch: int, pipe):
    """``family`` with its U-Net split at ``branch`` (:class:`~diffaccel.optimize.families.unet_split.StepCacheFamily`),
    the U-Net's config read from the source's files, else from the loaded pipeline (``pipe()``)."""
    from diffaccel.optimize.families import configs_of
    from diffaccel.optimize.families.common import with_defaults
    from diffaccel.optimize.families.unet_split import StepCacheFamily

    configs = source.configs() or configs_of(pipe())
    den = family.DENOISER
    config = with_defaults((configs.get(den) or {}).get("_class_name") or "UNet2DConditionModel", configs.get(den))
    return StepCacheFamily(family, config, branch)


def record_files(root: Path, paths: list) -> list:
    return [file_entry(root, Path(p)) for p in paths]
