"""Re-running `optimize` on an artifact that is already up to date copies nothing (its work copy of an SDXL
artifact would hold 20 GB of ONNX weights) and leaves it as it was; a changed setting still rebuilds."""
import shutil

import pytest

from diffaccel.optimize import OptimizeConfig, optimize
from diffaccel.optimize.artifact.manifest import Manifest

from .helpers import FAST


@pytest.fixture
def unet_only(tmp_path):
    cfg = OptimizeConfig(components=("unet",), **FAST)
    return tmp_path / "a", cfg, optimize("random:tiny", tmp_path / "a", cfg)


def test_up_to_date_rerun_copies_nothing(unet_only, monkeypatch):
    out, cfg, first = unet_only
    before = (out / "manifest.json").read_bytes()

    def no_copy(*a, **k):
        raise AssertionError("an up-to-date re-run copied the artifact")

    monkeypatch.setattr("diffaccel.optimize.api.shutil.copytree", no_copy)
    again = optimize("random:tiny", out, cfg)
    assert (out / "manifest.json").read_bytes() == before
    assert again.components["unet"]["engine"] == first.components["unet"]["engine"]
    assert not (out.parent / f".{out.name}.partial").exists()


def test_changed_setting_or_damaged_file_still_rebuilds(unet_only, monkeypatch):
    out, cfg, first = unet_only
    copies = []
    real = shutil.copytree
    def counting(src, dst, *a, **k):          # shutil.copytree recurses through itself: count the artifact copies
        copies.extend([dst] if str(dst).endswith(".partial") else [])
        return real(src, dst, *a, **k)

    monkeypatch.setattr("diffaccel.optimize.api.shutil.copytree", counting)
    optimize("random:tiny", out, OptimizeConfig(components=("unet",), graph_level="basic", **FAST))
    assert len(copies) == 1 and Manifest.load(out).get("optimize_config")["graph_level"] == "basic"
    engine = out / Manifest.load(out).components["unet"]["engine"]
    engine.write_bytes(engine.read_bytes()[:100])             # a damaged engine file is not "up to date"
    optimize("random:tiny", out, OptimizeConfig(components=("unet",), graph_level="basic", **FAST))
    assert len(copies) == 2 and engine.stat().st_size > 100
