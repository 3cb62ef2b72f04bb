"""Running a plan: each stage keyed by its settings and the keys upstream of it, skipped when current, recorded in the
manifest when run (settings, key, files, time, peak memory, per-component outcomes).

Stages an earlier run made with another plan (old stage names included) are dropped with their files, so a rebuild
redoes or drops what it does not recognise, and never fails on it.
"""
from __future__ import annotations

import time

from diffaccel.optimize.artifact.keys import source_key
from diffaccel.optimize.memory import PeakWatch, release_memory
from diffaccel.optimize.stages.base import Context, record_files


def drop_foreign_stages(ctx: Context) -> None:
    """Forget (and delete the files of) stages an earlier run made with another plan, e.g. int8 -> fp32."""
    names = {s.name for s in ctx.plan}
    for name in [n for n in ctx.manifest.stages if n not in names]:
        for f in ctx.manifest.stages[name].get("files", []):
            (ctx.root / f["path"]).unlink(missing_ok=True)
        del ctx.manifest.stages[name]
    for comp in [c for c in ctx.manifest.components if c not in ctx.recorded_components]:
        del ctx.manifest.components[comp]


def keyed_plan(ctx: Context):
    """(stage, key) along the plan, each key folding in the keys upstream of it; lazily, so a stage's key is taken
    after the stages before it have run (its settings may read what they recorded)."""
    upstream = source_key(ctx.source.sha256)
    for stage in ctx.plan:
        upstream = stage.key(ctx, upstream)
        yield stage, upstream


def run_stages(ctx: Context) -> None:
    """Run every stage of ``ctx.plan`` that is not current, recording each one's settings, key, files, time, peak
    memory and per-component outcomes in the manifest (saved after each stage)."""
    drop_foreign_stages(ctx)
    for stage, key in keyed_plan(ctx):
        if ctx.manifest.stage_is_current(stage.name, key):
            ctx.reporter.stage_end(stage.name, 0.0, True, "up to date")
            continue
        ctx.manifest.invalidate_from([s.name for s in ctx.plan[ctx.plan.index(stage):]])
        ctx.manifest.save()
        ctx.reporter.stage_start(stage.name, list(ctx.components) if stage.name != "assets" else [])
        t0 = time.perf_counter()
        with PeakWatch() as peak:
            result = stage.run(ctx)
            release_memory()       # what the stage let go of, before the next one starts
        seconds = time.perf_counter() - t0
        ctx.manifest.record_stage(stage.name, stage.settings(ctx), key, seconds, record_files(ctx.root, result.files))
        record = ctx.manifest.stages[stage.name]
        record.update(peak.record())
        if ctx.item_peaks.get(stage.name):
            record["component_peak_rss_bytes"] = dict(ctx.item_peaks[stage.name])
        if result.outputs():
            record["outputs"] = result.outputs()
        if result.records():
            record["components"] = result.records()
        ctx.manifest.save()
        ctx.reporter.stage_end(stage.name, seconds, False, peak_bytes=peak.peak_bytes, anon_bytes=peak.anon_peak_bytes)


def plan_is_current(ctx: Context) -> bool:
    """Whether the artifact at ``ctx.root`` holds exactly the plan's stages and components, every stage current."""
    manifest = ctx.manifest
    if set(manifest.stages) - {s.name for s in ctx.plan} or set(manifest.components) - set(ctx.recorded_components):
        return False
    return all(manifest.stage_is_current(stage.name, key) for stage, key in keyed_plan(ctx))
