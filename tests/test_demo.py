"""``diffaccel demo`` (the README's main command) end to end, on random:tiny with the smallest settings."""
import json

from diffaccel.optimize.cli import main


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
