"""``optimize()``: one call per stage, a work directory that becomes OUT only when complete.

>>> cfg = OptimizeConfig(backend="onnxruntime", precision="fp32")
>>> cfg.backend, cfg.precision
(<Backend.ONNXRUNTIME: 'onnxruntime'>, <Precision.FP32: 'fp32'>)
>>> OptimizeConfig(precision="int4")
Traceback (most recent call last):
...
ValueError: unknown precision 'int4'; choose one of: fp32, fp16, bf16, int8, fp8, w8a16, w4a16
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from diffaccel.optimize.config import (Backend, Exporter, Precision, QuantConfig, ShapeRange, TensorRTConfig,
                                       check_guidance)
from diffaccel.optimize.artifact.errors import ArtifactError, DiffaccelError
from diffaccel.optimize.artifact.files import recover_dir, replace_dir, sweep_scratch
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.families import COMPONENTS, components_of, detect
from diffaccel.optimize.sources import Source, resolve_source
from diffaccel.optimize.stages.base import Context, Reporter
from diffaccel.optimize.stages.plans import extra_stages, plans, stages_for, supported_pairs
from diffaccel.optimize.stages.resources import check_disk, check_memory
from diffaccel.optimize.stages.runner import plan_is_current, run_stages as _run_stages   # patched in tests

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """What to build. Validated on construction; every field is recorded in the manifest."""

    backend: Backend = Backend.ONNXRUNTIME
    precision: Precision = Precision.FP32
    provider: str = "cpu"                 # ONNX Runtime execution provider: cpu | cuda | tensorrt
    shapes: ShapeRange = ShapeRange()
    exporter: Exporter = Exporter.DYNAMO
    opset: int = 18
    graph_level: str = "extended"         # offline ORT graph optimization saved into the engine
    threads: "int | None" = None          # ORT intra-op threads (None: one per physical core)
    components: tuple = COMPONENTS        # a subset builds only those engines (e.g. for a U-Net benchmark)
    quant: QuantConfig = QuantConfig()    # int8 calibration and quantization settings
    tensorrt: TensorRTConfig = TensorRTConfig()
    seed: int = 0
    memory_limit: "int | None" = None     # bytes the build may use (None: what the machine has available)
    memory_check: bool = True             # refuse, before any work, a build whose estimated peak does not fit
    guidance: "float | None" = None       # the guidance scale deployed (None: the source's, see default_guidance):
    #                                       <= 1 builds the denoiser without the doubled classifier-free batch
    #                                       (SDXL-Turbo: 0); int8 calibrates at it (see quant)
    step_cache: "int | None" = None       # DeepCache branch: the U-Net exported as head/deep/tail graphs (None: whole)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        set_("backend", Backend.parse(self.backend, "backend"))
        set_("precision", Precision.parse(self.precision, "precision"))
        set_("exporter", Exporter.parse(self.exporter, "exporter"))
        if (self.backend, self.precision) not in plans():
            ok = supported_pairs()
            raise ValueError(f"precision {self.precision} is not supported on backend {self.backend}; "
                             f"supported backend/precision pairs: {ok}")
        unknown = sorted(set(self.components) - set(COMPONENTS))
        if unknown or not self.components:
            raise ValueError(f"unknown component(s) {', '.join(unknown) or '(none)'}; choose from: "
                             f"{', '.join(COMPONENTS)}")
        set_("components", tuple(c for c in COMPONENTS if c in self.components))
        if self.provider not in ("cpu", "cuda", "tensorrt"):
            raise ValueError(f"unknown provider {self.provider!r}; choose one of: cpu, cuda, tensorrt")
        if self.graph_level not in ("disable", "basic", "extended", "all"):
            raise ValueError(f"unknown graph level {self.graph_level!r}; choose one of: disable, basic, extended, all")
        if not 14 <= int(self.opset) <= 23:
            raise ValueError(f"opset {self.opset} is out of range; choose 14-23 (18 is the default)")
        if self.step_cache is not None:
            from diffaccel.optimize.stages.step_cache import check_config

            check_config(self)
        if self.guidance is None:       # resolved by optimize() from the source (see resolved())
            return
        set_("guidance", check_guidance(self.guidance))
        calib = self.quant.guidance_scale
        if calib is None:
            set_("quant", dataclasses.replace(self.quant, guidance_scale=self.guidance))
        elif calib > 1 >= self.guidance:
            raise ValueError(f"calibration guidance {calib:g} runs classifier-free guidance, but guidance "
                             f"{self.guidance:g} builds the U-Net without it; calibrate at the guidance you deploy")

    def resolved(self, guidance: float) -> "OptimizeConfig":
        """This config with ``guidance`` where none was given: what is built, recorded and keyed."""
        return self if self.guidance is not None else dataclasses.replace(self, guidance=guidance)

    @property
    def classifier_free(self) -> bool:
        """Whether the U-Net serves classifier-free guidance (both halves in one batch): guidance > 1. A U-Net with a
        guidance embedding (LCM) never does, whatever the guidance (see the families' ``guidance_doubles_batch``)."""
        return self.guidance > 1

    def to_dict(self) -> dict:
        return json_ready(dataclasses.asdict(self))


def json_ready(d):
    import json

    return json.loads(json.dumps(d, default=str))


def optimize(src: "str | Source", out, config: OptimizeConfig = OptimizeConfig(), *, force: bool = False,
             reporter: "Reporter | None" = None, trust_pickle: bool = False,
             single_file_config: "str | None" = None) -> Manifest:
    """Build an artifact directory ``out`` from checkpoint ``src``. Finished stages with unchanged settings are
    skipped; OUT only appears (or changes) when every stage has succeeded.

    >>> m = optimize("random:tiny", tmp / "tiny", OptimizeConfig())      # doctest: +SKIP
    >>> m.components["unet"]["validation"]["passed"]                     # doctest: +SKIP
    True
    """
    reporter = reporter or Reporter()
    source = src if isinstance(src, Source) else resolve_source(
        src, trust_pickle=trust_pickle, single_file_config=single_file_config)
    out = Path(out)
    configs = source.configs()          # read once (JSON files): detection, size checks, memory estimate
    family = _check_before_loading(source, configs, config)
    config = config.resolved(default_guidance(source, family))
    stage_classes = stages_for(config.backend, config.precision) + extra_stages(config)
    for cls in stage_classes:
        cls.preflight(config)
    weights = _source_weights(configs, family, config)
    memory = _check_memory(source, configs, family, config, stage_classes, weights)
    if not force:
        done = _current_artifact(out, source, config, family, stage_classes, reporter)
        if done is not None:
            return done
    disk = None if weights is None else check_disk([s.name for s in stage_classes], weights[1], family.DENOISER, out)
    work, fresh = _prepare_workdir(out, source, force)
    try:
        manifest = _open_manifest(work, source, config)
        manifest.data["memory_estimate"] = memory
        manifest.data["disk_estimate"] = disk
        ctx = Context(source=source, config=config, root=work, manifest=manifest, reporter=reporter, family=family)
        ctx.plan = [cls() for cls in stage_classes]
        _run_stages(ctx)
        manifest.data["status"] = "complete"
        manifest.save()
    except DiffaccelError:
        shutil.rmtree(work, ignore_errors=True)   # OUT (if any) is untouched; nothing half-written is left
        raise
    replace_dir(work, out)
    return Manifest.load(out)


def default_guidance(source: Source, family) -> float:
    """The one guidance rule: a trained built-in's recommended scale (tinyshapes 2, tinyshapes-xl and -sd3 3), else the
    default of the family's diffusers pipeline (SD 7.5, SDXL 5.0, SD3 7.0, FLUX.1 3.5; 7.5 where the family is only
    known after loading). The build records it; every command then runs at it unless told otherwise."""
    from diffaccel.optimize.families import pipeline_guidance
    from diffaccel.optimize.sources.builtins import RECOMMENDED_GUIDANCE

    if source.kind == "builtin" and source.spec in RECOMMENDED_GUIDANCE:
        return RECOMMENDED_GUIDANCE[source.spec]
    return pipeline_guidance(family) if family is not None else 7.5


def _check_before_loading(source: Source, configs: "dict | None", config: OptimizeConfig):
    """The model family, and refusals of an unsupported model and of image-size ranges it cannot serve, before
    loading it (where its configs can be read without the weights; else None: the family is told after loading)."""
    if configs is None:
        return None
    family = detect(configs, source.spec)
    components_of(family, config.components)        # refuses components the family has not
    if str(config.exporter) not in family.EXPORTERS:
        raise DiffaccelError(f"{family.TITLE} exports correctly with --exporter {' or '.join(family.EXPORTERS)} only, "
                             f"not {config.exporter}; use --exporter {family.EXPORTERS[0]}")
    scale, latent_multiple = family.size_factors(configs[family.DENOISER], configs["vae"])
    for what in ("height", "width"):
        rng = getattr(config.shapes, what)
        if rng is not None:
            family.check_pixel_range(rng, scale * latent_multiple, what)
    return family


def _source_weights(configs: "dict | None", family, config: OptimizeConfig) -> "tuple | None":
    """(fp32 weight bytes of the whole pipeline, {component built: its model's bytes}) from the configs alone (PyTorch's
    meta device), for both pre-flight checks; None where they do not run (``--no-memory-check``, or configs that only
    loading can tell)."""
    if not config.memory_check or configs is None or family is None:
        return None
    weights = family.weight_bytes(configs)
    return sum(weights.values()), {c: weights.get(family.SOURCE_MODEL[c], 0)
                                   for c in components_of(family, config.components)}


def _check_memory(source: Source, configs: "dict | None", family, config: OptimizeConfig,
                  stage_classes, weights: "tuple | None") -> "dict | None":
    """The pre-flight memory check (see :func:`~diffaccel.optimize.stages.resources.check_memory`) on
    :func:`_source_weights`' numbers."""
    if weights is None:
        return None
    total, built = weights
    h, w = family.latent_opt_size(configs, config.shapes)
    attention = family.attention_bytes(configs, h, w) if hasattr(family, "attention_bytes") else 0
    from diffaccel.optimize.stages.ort_engine import fuses_attention

    return check_memory([s.name for s in stage_classes], total, max(built.values(), default=0), attention,
                        config.memory_limit, latent_area=h * w, alone=source.loads_models_alone,
                        fused=fuses_attention(config), mapped=source.maps_weights)


def _current_artifact(out: Path, source: Source, config: OptimizeConfig, family, stage_classes,
                      reporter: Reporter) -> "Manifest | None":
    """The complete artifact at ``out`` when this build has nothing to do there: same source and config, every
    stage of the plan current (keys and files), nothing to drop. A re-run then reads and copies nothing: the work
    copy of an SDXL artifact holds its ONNX weights twice over (20 GB), since onnx refuses hard-linked weights."""
    if family is None or not (out / "manifest.json").is_file():
        return None
    try:
        manifest = Manifest.load(out)
    except ArtifactError:
        return None
    if (manifest.get("status") != "complete" or manifest.source.get("sha256") != source.sha256
            or manifest.get("optimize_config") != config.to_dict()):
        return None
    ctx = Context(source=source, config=config, root=out, manifest=manifest, reporter=reporter, family=family)
    ctx.plan = [cls() for cls in stage_classes]
    if not plan_is_current(ctx):
        return None
    for stage in ctx.plan:
        reporter.stage_end(stage.name, 0.0, True, "up to date")
    log.info("%s is up to date; nothing to build", out)
    return Manifest.load(out)


def _open_manifest(work: Path, source: Source, config: OptimizeConfig) -> Manifest:
    if (work / "manifest.json").is_file():
        manifest = Manifest.load(work)
    else:
        manifest = Manifest.new(work, source.to_dict())
    manifest.data.update({"status": "building", "backend": str(config.backend), "precision": str(config.precision),
                          "provider": config.provider if config.backend == Backend.ONNXRUNTIME else None,
                          "shapes": config.shapes.to_dict(), "optimize_config": config.to_dict(),
                          "source": source.to_dict()})
    from diffaccel.optimize.artifact.manifest import tool_versions

    manifest.data["tools"] = tool_versions()
    manifest.save()
    return manifest


# ---- the work directory ------------------------------------------------------------------------------------------
def _partial_of(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _prepare_workdir(out: Path, source: Source, force: bool) -> tuple:
    """Return (work dir, fresh?). OUT is never modified in place: an existing OUT is hard-linked into the work dir,
    stages replace files rather than rewrite them, and the work dir is swapped in at the end."""
    partial = _partial_of(out)
    recover_dir(out)
    if out.exists() and not (out / "manifest.json").is_file():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise ArtifactError(f"{out} exists and is not a diffaccel artifact; choose another -o or remove it")
    if out.exists():
        other = Manifest.load(out).source
        if other.get("sha256") != source.sha256 and not force:
            raise ArtifactError(f"{out} holds an artifact of another source ({other.get('spec')}); pass --force to "
                                "replace it, or choose another -o")
    if partial.exists():
        try:
            same = Manifest.load(partial).source.get("sha256") == source.sha256
        except ArtifactError:
            same = False
        if same and not force:
            log.info("resuming interrupted work in %s", partial)
            sweep_scratch(partial)
            return partial, False
        shutil.rmtree(partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not force:
        shutil.copytree(out, partial, copy_function=_link_or_copy)
        return partial, False
    partial.mkdir()
    return partial, True


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link (cheap; stages replace files, never write through them), except ONNX external-data files: onnx
    refuses to read a weights file with several hard links (its guard against hard-link attacks)."""
    if src.endswith(".data"):
        shutil.copy2(src, dst)
    else:
        os.link(src, dst)
