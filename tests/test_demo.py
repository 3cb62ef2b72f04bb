"""``diffaccel demo`` (the README's main command) end to end, on random:tiny with the smallest settings."""
import json

import pytest

from diffaccel.optimize.cli import main
from diffaccel.optimize.artifact.errors import DiffaccelError


def test_demo_builds_fp32_and_int8_and_reports(tmp_path, capsys):
    argv = ["demo", "--src", "random:tiny", "-o", str(tmp_path / "demo"), "--steps", "2", "--seeds", "0",
            "--peers", "", "--batch-sizes", "1", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
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
