"""Stage skipping, invalidation, source protection and atomicity of optimize()."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from diffaccel.optimize import OptimizeConfig, optimize
from diffaccel.optimize.artifact.errors import ArtifactError
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.stages.ort_engine import OrtEngineStage
from diffaccel.optimize.stages.base import Reporter

from .helpers import FAST   # the exporter is not under test here; the legacy one is 15x faster on tiny

UNET = dict(components=("unet",), **FAST)   # fresh builds of one component: the stages are the same as for four


class Recorder(Reporter):
    def __init__(self):
        self.ran, self.skipped = [], []

    def stage_start(self, name, items):
        if name != "load":              # loading the source is a step of whichever stage needs it
            self.ran.append(name)

    def stage_end(self, name, seconds, skipped, reason="", **_):
        if skipped:
            self.skipped.append(name)


@pytest.fixture(scope="module")
def built(tiny_ort_ts):
    """optimize("random:tiny", OUT, OptimizeConfig(**FAST)), shared by the session: tests change copies of it."""
    return tiny_ort_ts


def _copy(src, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(src, dst)
    return dst


def test_same_config_skips_every_stage(built, tmp_path):
    out, rec = _copy(built, tmp_path), Recorder()
    optimize("random:tiny", out, OptimizeConfig(**FAST), reporter=rec)
    assert rec.ran == [] and rec.skipped == ["assets", "export", "engine"]


def test_changed_setting_redoes_only_what_it_affects(built, tmp_path):
    out, rec = _copy(built, tmp_path), Recorder()
    before = Manifest.load(out).stages["export"]["completed"]
    m = optimize("random:tiny", out, OptimizeConfig(graph_level="basic", **FAST), reporter=rec)
    assert rec.skipped == ["assets", "export"] and rec.ran == ["engine"]
    assert m.stages["export"]["completed"] == before and m.stages["engine"]["config"]["graph_level"] == "basic"
    rec = Recorder()
    optimize("random:tiny", out, OptimizeConfig(opset=17, graph_level="basic", **FAST), reporter=rec)
    assert rec.skipped == ["assets"] and rec.ran[-2:] == ["export", "engine"]
    m = Manifest.load(out)
    m.verify()


def test_one_name_per_stage_in_code_plan_and_manifest(built):
    """A stage's name is its class's ``name``, its name in the plan table and its key in the manifest; every plan
    runs the named roles in one order, each at most once."""
    from diffaccel.optimize.stages.plans import IMPLEMENTATIONS, PLANS, STAGE_NAMES, stage_class, stages_for

    assert set(IMPLEMENTATIONS) == set(STAGE_NAMES)
    for (backend, precision), (names, _) in PLANS.items():
        assert [cls.name for cls in stages_for(backend, precision)] == list(names), (backend, precision)
        assert list(names) == sorted(names, key=STAGE_NAMES.index) and len(set(names)) == len(names)
    assert stage_class("engine", "openvino") is not stage_class("engine", "onnxruntime")
    assert stage_class("quantize", "openvino") is stage_class("quantize", "onnxruntime")   # shared work
    with pytest.raises(ValueError, match="unknown stage 'int8'; known: assets, export, quantize, weights, fp16, engine"):
        stage_class("int8", "onnxruntime")
    with pytest.raises(ValueError, match="no fp16 stage for backend openvino"):
        stage_class("fp16", "openvino")
    m = Manifest.load(built)
    assert list(m.stages) == list(PLANS[(m["backend"], m["precision"])][0])


def test_stages_under_names_this_version_does_not_know_are_dropped(built, tmp_path):
    """An artifact whose manifest holds stages under other names (an older version's, a plan since removed) is
    rebuilt: those stages and their files are dropped, the rest is redone or kept by its key."""
    out, rec = _copy(built, tmp_path), Recorder()
    m = Manifest.load(out)
    (out / "old").mkdir()
    (out / "old" / "x.onnx").write_bytes(b"old")
    m.stages["ort_engine"] = {**m.stages["engine"], "files": [{"path": "old/x.onnx", "bytes": 3, "sha256": "0" * 64}]}
    m.stages["int8"] = dict(m.stages["export"], files=[])
    m.save()
    m = optimize("random:tiny", out, OptimizeConfig(**FAST), reporter=rec)
    assert list(m.stages) == ["assets", "export", "engine"] and rec.ran == []      # nothing else to redo
    assert not (out / "old" / "x.onnx").exists()
    m.verify()


def test_other_source_is_refused_unless_forced(built, tmp_path, tiny_folder):
    out = _copy(built, tmp_path)
    with pytest.raises(ArtifactError, match="another source.*--force"):
        optimize(str(tiny_folder), out, OptimizeConfig(**FAST))
    Manifest.load(out).verify()                      # untouched
    m = optimize(str(tiny_folder), out, OptimizeConfig(**UNET), force=True)
    assert m.source["kind"] == "folder"


def test_interrupt_leaves_no_loadable_out_and_resumes(tmp_path, monkeypatch):
    out, calls = tmp_path / "fresh", []
    original = OrtEngineStage.run

    def interrupted(self, ctx):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(OrtEngineStage, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize("random:tiny", out, OptimizeConfig(**UNET))
    assert not out.exists() and calls == [1]
    monkeypatch.setattr(OrtEngineStage, "run", original)
    rec = Recorder()
    optimize("random:tiny", out, OptimizeConfig(**UNET), reporter=rec)
    assert rec.skipped == ["assets", "export"] and rec.ran == ["engine"]
    Manifest.load(out).verify()


def test_interrupted_rebuild_keeps_the_old_out_intact(built, tmp_path, monkeypatch):
    out = _copy(built, tmp_path)
    monkeypatch.setattr(OrtEngineStage, "run", lambda self, ctx: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        optimize("random:tiny", out, OptimizeConfig(graph_level="all", **FAST))
    m = Manifest.load(out)
    m.verify()                                        # hard links were never written through
    assert m.stages["engine"]["config"]["graph_level"] == "extended"


@pytest.mark.slow
def test_kill_9_never_leaves_a_complete_looking_out(tmp_path):
    out = tmp_path / "killed"
    partial = tmp_path / ".killed.partial"
    cmd = [sys.executable, "-m", "diffaccel.optimize.cli", "optimize", "random:tiny", "-o", str(out),
           "--exporter", "torchscript", "--components", "unet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (partial / "manifest.json").is_file() and "assets" in json.loads(
                (partial / "manifest.json").read_text())["stages"]:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(ArtifactError):
        Manifest.load(out)
    rec = Recorder()
    optimize("random:tiny", out, OptimizeConfig(**UNET), reporter=rec)
    assert "assets" in rec.skipped
    Manifest.load(out).verify()


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    from diffaccel.optimize.artifact.errors import ParityError

    def fail(self, ctx):
        raise ParityError("unet does not match")

    monkeypatch.setattr(OrtEngineStage, "run", fail)
    with pytest.raises(ParityError):
        optimize("random:tiny", tmp_path / "x", OptimizeConfig(**UNET))     # fails after the export wrote its files
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rebuild_of_a_model_with_external_weights(tmp_path, monkeypatch):
    """Models over 2 GB keep weights in model.onnx.data; a rebuild must still read them (onnx refuses hard-linked
    external data). Forced here on the tiny model by lowering the threshold."""
    import diffaccel.optimize.export.onnx_export as export

    from diffaccel.optimize.config import QuantConfig

    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "big"
    q = dict(calib_size=1, calib_steps=2)
    optimize("random:tiny", out, OptimizeConfig(precision="int8", components=("unet",), quant=QuantConfig(**q),
                                                **FAST))
    assert (out / "unet" / "export" / "model.onnx.data").is_file()
    m = optimize("random:tiny", out, OptimizeConfig(precision="int8", components=("unet",),
                                                    quant=QuantConfig(calib_seed=1, **q), **FAST))
    m.verify()
    assert (out / "unet" / "export" / "model.onnx.data").stat().st_nlink == 1
