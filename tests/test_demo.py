"""``diffaccel demo`` (the README's main command): its variants, the OpenVINO skip, and end to end on random:tiny with
the smallest settings."""
import json
import re
import shutil
import sys

import pytest

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.artifact.manifest import Manifest

from .helpers import assert_one_line_error, run_cli


@pytest.mark.slow
def test_demo_builds_its_variants_and_reports_them_beside_a_peer(tmp_path, capsys, tiny_ort):
    """ONNX Runtime fp32 and OpenVINO int8 end to end, with the torch-bf16 peer (ONNX Runtime int8, the third default
    variant, is the same loop step with another config: left out to keep this test short). The engines folder starts
    with the session's random:tiny ONNX Runtime fp32 artifact under both of the demo's names: the demo's fp32 step
    would build exactly that (same source, exporter, opset and shapes; threads do not change the files; the export
    names no backend), so the demo re-runs over it as documented (finished stages are skipped) instead of exporting
    random:tiny with dynamo twice more. The int8 step still calibrates, quantizes and compiles its engines here."""
    pytest.importorskip("openvino", reason="openvino is not installed (diffaccel[openvino])")
    engines = tmp_path / "demo" / "engines"
    for name in ("onnxruntime-fp32", "openvino-int8"):
        shutil.copytree(tiny_ort, engines / f"random_tiny-{name}")
    code, out, err = run_cli(capsys, "demo", "--src", "random:tiny", "-o", tmp_path / "demo", "--steps", "2",
                             "--variants", "onnxruntime/fp32,openvino/int8",
                             "--seeds", "0", "--peers", "torch-bf16", "--batch-sizes", "1", "--threads", "1")
    assert code == 0, err
    ends = [e for e in re.findall(r"^\s*(\w+): (skipped|done)", err.replace("\r", "\n"), re.M) if e[0] != "load"]
    assert ends == [("assets", "skipped"), ("export", "skipped"), ("engine", "skipped"),                  # fp32
                    ("assets", "skipped"), ("export", "skipped"), ("quantize", "done"), ("engine", "done")], err
    ov = Manifest.load(engines / "random_tiny-openvino-int8")
    ov.verify()
    assert ov["backend"] == "openvino" and ov.components["unet"]["precision"] == "int8"
    report_dir = tmp_path / "demo" / "report"
    assert f"report: {report_dir / 'report.html'}" in out and "demo finished in" in out
    report = json.loads((report_dir / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["torch-fp32", "torch-bf16", "onnxruntime-fp32", "openvino-int8"]
    assert all(v["status"] == "ok" for v in report["variants"])
    rows = {v["name"]: v for v in report["variants"]}
    assert rows["onnxruntime-fp32"]["quality"]["aggregate"]["psnr"] >= 40
    table = out[out.index("variant "):out.index("vs peer: ")]
    for name in names:                      # the summary table has one row per variant, engines against the peer
        line = next(ln for ln in table.splitlines() if ln.startswith(name))
        peer = rows["torch-bf16"]["latency"]["denoiser_step"]["p50"] / rows[name]["latency"]["denoiser_step"]["p50"]
        shaky = rows["torch-bf16"]["latency"]["unstable"] or rows[name]["latency"]["unstable"]   # a busy machine
        want = ("unstable" if shaky else f"{peer:.2f}× torch-bf16") if rows[name]["kind"] == "artifact" else " —"
        assert line.endswith(want), line
    assert "vs peer: the fastest peer's U-Net step p50 (torch-bf16, " in out
    assert report["config"]["guidance_scale"] == 7.5   # random:tiny has no recommended guidance


def _configs(*argv):
    from diffaccel.eval.cli.demo import demo_configs
    from diffaccel.optimize.cli import build_parser

    return demo_configs(build_parser().parse_args(["demo", *argv]))[0]


def test_demo_variants_are_backend_precision_pairs():
    """--variants names each engine as BACKEND/PRECISION (default ONNX Runtime fp32 and int8, OpenVINO int8); every
    one becomes the OptimizeConfig optimize gets, with --threads."""
    default = _configs("--threads", "3")
    assert list(default) == ["onnxruntime/fp32", "onnxruntime/int8", "openvino/int8"]
    assert [(str(c.backend), str(c.precision), c.threads) for c in default.values()] == [
        ("onnxruntime", "fp32", 3), ("onnxruntime", "int8", 3), ("openvino", "int8", 3)]
    assert list(_configs("--variants", " OpenVINO/FP32 , onnxruntime/int8,")) == ["openvino/fp32", "onnxruntime/int8"]
    for bad in ("int8", "onnxruntime/fp9", "coreml/int8", "onnxruntime/", "/int8", "onnxruntime:int8"):
        with pytest.raises(DiffaccelError, match=f"bad --variants item '{bad}'.*supported: onnxruntime/fp32, "):
            _configs("--variants", bad)
    with pytest.raises(DiffaccelError, match="onnxruntime/int8 is given twice"):
        _configs("--variants", "onnxruntime/int8,ONNXRUNTIME/int8")
    with pytest.raises(DiffaccelError, match="bad --variants ','"):
        _configs("--variants", ",")


def test_demo_bad_variant_is_a_one_line_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "demo", "--variants", "onnxruntime/fp9", "-o", tmp_path / "demo")
    assert_one_line_error(code, err, "bad --variants item 'onnxruntime/fp9'", "openvino/int8")
    assert not (tmp_path / "demo").exists()


def test_demo_skips_openvino_when_it_is_not_installed(monkeypatch):
    """Without the openvino package the OpenVINO variants are skipped with one line saying how to install it; the
    others are built. With nothing left to build, the demo refuses in one line with every reason."""
    from diffaccel.eval.cli.demo import buildable

    monkeypatch.setitem(sys.modules, "openvino", None)          # `import openvino` fails as when not installed
    kept, skipped = buildable(_configs())
    assert list(kept) == ["onnxruntime/fp32", "onnxruntime/int8"]
    assert skipped == ['skip openvino/int8: openvino is not installed; pip install -e ".[openvino]" adds it']
    with pytest.raises(DiffaccelError, match=r"nothing to build: skip openvino/fp32: .*; skip openvino/int8: "):
        buildable(_configs("--variants", "openvino/fp32,openvino/int8"))


def test_demo_console_without_openvino(monkeypatch, capsys, tmp_path):
    """The demo's own steps with optimize and evaluate stood in for (the slow test below runs them for real): the
    skip line, one engine folder SRC-BACKEND-PRECISION per variant left, and the summary with its "vs peer" column."""
    import diffaccel.eval.harness.evaluate as harness

    from .test_report import synthetic_report, with_peers

    built = []
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr("diffaccel.optimize.optimize", lambda src, out, cfg, reporter: built.append((out, cfg)))
    monkeypatch.setattr(harness, "evaluate", lambda artifacts, src, cfg, out, reporter: with_peers(synthetic_report()))
    code, out, err = run_cli(capsys, "demo", "-o", tmp_path / "demo", "--threads", "1")
    assert code == 0, err
    skip = '== skip openvino/int8: openvino is not installed; pip install -e ".[openvino]" adds it'
    assert out.splitlines()[0] == skip
    assert [(p.name, str(c.backend), str(c.precision)) for p, c in built] == [
        ("tinyshapes-onnxruntime-fp32", "onnxruntime", "fp32"), ("tinyshapes-onnxruntime-int8", "onnxruntime", "int8")]
    assert all(p.parent == tmp_path / "demo" / "engines" for p, _ in built)
    assert "vs peer" in out and "2.50× reference" in out and "vs peer: the fastest peer's" in out
