"""``diffaccel demo`` (the README's main command) end to end, on random:tiny with the smallest settings."""
import json
import re
import shutil

import pytest

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.artifact.manifest import Manifest

from .helpers import run_cli


@pytest.mark.slow
def test_demo_builds_fp32_and_int8_and_reports(tmp_path, capsys, tiny_ort):
    """The engines folder starts with the session's random:tiny ONNX Runtime fp32 artifact under both of the demo's
    names: the demo's fp32 step would build exactly that (same source, exporter, opset and shapes; threads do not
    change the files), so the demo re-runs over it as documented (finished stages are skipped) instead of exporting
    random:tiny with dynamo twice more. The int8 step still calibrates, quantizes and builds its engines here."""
    engines = tmp_path / "demo" / "engines"
    for precision in ("fp32", "int8"):
        shutil.copytree(tiny_ort, engines / f"random_tiny-onnxruntime-{precision}")
    code, out, err = run_cli(capsys, "demo", "--src", "random:tiny", "-o", tmp_path / "demo", "--steps", "2",
                             "--seeds", "0", "--peers", "", "--batch-sizes", "1", "--threads", "1")
    assert code == 0, err
    ends = [e for e in re.findall(r"^\s*(\w+): (skipped|done)", err.replace("\r", "\n"), re.M) if e[0] != "load"]
    assert ends == [("assets", "skipped"), ("export", "skipped"), ("engine", "skipped"),                  # fp32
                    ("assets", "skipped"), ("export", "skipped"), ("quantize", "done"), ("engine", "done")], err
    int8 = Manifest.load(engines / "random_tiny-onnxruntime-int8")
    int8.verify()
    assert int8["precision"] == "int8" and int8.components["unet"]["precision"] == "int8"
    report_dir = tmp_path / "demo" / "report"
    assert f"report: {report_dir / 'report.html'}" in out and "demo finished in" in out
    report = json.loads((report_dir / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["torch-fp32", "onnxruntime-fp32", "onnxruntime-int8"]
    assert all(v["status"] == "ok" for v in report["variants"])
    rows = {v["name"]: v for v in report["variants"]}
    assert rows["onnxruntime-fp32"]["quality"]["aggregate"]["psnr"] >= 40
    assert rows["onnxruntime-int8"]["latency"]["unet_step"]["p50"] > 0
    for name in names:                      # the summary table has one row per variant
        assert name in out
    assert report["config"]["guidance_scale"] == 7.5   # random:tiny has no recommended guidance


def test_demo_runs_tinyshapes_at_its_recommended_guidance_unless_told():
    """The demo evaluates at the built-in's recommended guidance (2.0 for tinyshapes), 7.5 for other sources, or at
    --guidance when given."""
    from diffaccel.eval.cli.demo import demo_configs
    from diffaccel.optimize.cli import build_parser

    def guidance(*argv):
        return demo_configs(build_parser().parse_args(["demo", *argv]))[1].guidance_scale

    assert guidance() == 2.0
    assert guidance("--src", "random:tiny") == 7.5
    assert guidance("--guidance", "5") == 5.0
    with pytest.raises(DiffaccelError, match="guidance"):
        guidance("--guidance", "-1")
