"""The pre-flight disk check: a build refuses, before writing anything, what the disk under OUT cannot hold."""
import collections
import shutil

import pytest

from .helpers import assert_one_line_error, run_cli

Usage = collections.namedtuple("Usage", "total used free")


def test_a_disk_too_small_for_the_build_is_refused_before_anything_is_written(capsys, tmp_path, monkeypatch):
    from diffaccel.optimize.stages import resources

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 1000))
    code, _, err = run_cli(capsys, "optimize", "random:tiny", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "this build writes about", "GB (4 component(s), every stage's copy of the "
                          "weights) but", "0.0 GB free; build fewer --components at a time")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))
    # what it would have written: every component's export and engine, in fp32, plus the margin
    need = resources.estimate_disk(["assets", "export", "engine"], {"unet": 100.0, "vae_decoder": 10.0}, "unet")
    assert need == int(2 * 110 * resources.DISK_MARGIN)


def test_the_manifest_records_the_disk_estimate_and_it_covers_what_was_written(tiny_ort_ts):
    from diffaccel.optimize.artifact.manifest import Manifest

    est = Manifest.load(tiny_ort_ts).data["disk_estimate"]
    written = sum(p.stat().st_size for p in tiny_ort_ts.rglob("*") if p.is_file())
    weights = sum(p.stat().st_size for p in tiny_ort_ts.rglob("*.onnx*"))
    assert est["where"] and est["free_bytes"] > 0 and weights <= est["estimated_bytes"] <= 4 * written, (est, written)


@pytest.mark.parametrize("stages, factor", [(["assets", "export", "quantize", "engine"], 1.5),
                                            (["assets", "export", "fp16", "engine"], 2.0)])
def test_the_estimate_follows_the_precision_each_stage_writes(stages, factor):
    from diffaccel.optimize.stages.resources import DISK_MARGIN, estimate_disk

    assert estimate_disk(stages, {"unet": 1000.0}, "unet") == int(1000 * factor * DISK_MARGIN)
