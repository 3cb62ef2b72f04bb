"""The OpenVINO backend: explicit inference precision, bf16 only where the CPU has it, diffaccel's own int8 Q/DQ
compiled by OpenVINO, a compiled-model cache keyed by OpenVINO version, CPU and precision."""
import pytest

pytest.importorskip("openvino", reason="openvino is not installed (diffaccel[openvino])")

from diffaccel.engines import AcceleratedStableDiffusionPipeline  # noqa: E402
from diffaccel.engines.backends import openvino as ov_backend  # noqa: E402
from diffaccel.optimize import OptimizeConfig, optimize  # noqa: E402
from diffaccel.optimize.artifact.errors import BackendUnavailableError  # noqa: E402
from diffaccel.optimize.artifact.manifest import Manifest  # noqa: E402
from diffaccel.optimize.config import QuantConfig  # noqa: E402

from .helpers import FAST, QUICK, build_over, psnr  # noqa: E402


def test_bf16_is_refused_where_the_cpu_has_none(tmp_path, monkeypatch):
    monkeypatch.setattr(ov_backend, "capabilities", lambda: ("FP32", "INT8"))
    with pytest.raises(BackendUnavailableError, match="no bf16 support in OpenVINO.*--precision fp32"):
        optimize("random:tiny", tmp_path / "o", OptimizeConfig(backend="openvino", precision="bf16", **FAST))
    assert not (tmp_path / "o").exists()


def test_fp32_runs_in_f32_with_a_keyed_cache(tiny_ov):
    out = tiny_ov
    m = Manifest.load(out)
    for name, c in m.components.items():
        assert c["backend"] == "openvino" and c["openvino"]["inference_precision"] == "f32", name
        assert c["engine"].endswith("model.xml") and c["validation"]["passed"]
        assert c["openvino"]["cache_key"] == ov_backend.cache_key("f32")
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(out)
    assert (out / "unet" / "ov_cache" / ov_backend.cache_key("f32")).is_dir()
    assert pipe.unet.engine.precision == "f32"


def test_int8_compiles_our_calibrated_qdq_unet(tiny_int8_unet, tmp_path):
    """Built over the session's ONNX Runtime int8 U-Net (the same export and quantization settings): its calibrated
    Q/DQ model is what OpenVINO compiles here, and only the OpenVINO engine stage runs."""
    out = tmp_path / "ov-int8"
    build_over(tiny_int8_unet, out, OptimizeConfig(backend="openvino", precision="int8", components=("unet",),
                                                   quant=QuantConfig(**QUICK), **FAST), must_run=("engine",))
    unet = Manifest.load(out).components["unet"]
    assert unet["quantize"]["calibration"] == "minmax" and unet["validation"]["passed"]
    xml = (out / "unet" / "engine" / "model.xml").read_text()
    assert xml.count('type="FakeQuantize"') >= 20       # the Q/DQ pairs of diffaccel's calibration, kept by OpenVINO
    caps = ov_backend.capabilities()
    assert unet["openvino"]["inference_precision"] == ("bf16" if "BF16" in caps else "f32")


def test_openvino_images_match_onnxruntime(tiny_ort_ts, tiny_ov):
    import torch

    images = []
    for art in (tiny_ort_ts, tiny_ov):                  # the same ONNX export, two runtimes
        pipe = AcceleratedStableDiffusionPipeline.from_pretrained(art)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("a red circle", num_inference_steps=4, height=64, width=64, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images)
    assert psnr(images[0], images[1]) >= 40


@pytest.mark.slow
def test_quality_target_judges_candidates_on_openvino(tiny_int8_unet, tmp_path, monkeypatch):
    """--quality-target with --backend openvino: every candidate is judged by images made with the OpenVINO engine
    it will be deployed as (OpenVINO's int8 kernels, bf16 for the float rest where the CPU has it), not by ONNX
    Runtime, and the model that reached the target is the one OpenVINO compiles."""
    from diffaccel.engines.backends import openvino as backend

    judged = []

    class Spy(backend.OvEngine):
        def __init__(self, path, precision="f32", *a, **kw):
            judged.append((str(path), precision))
            super().__init__(path, precision, *a, **kw)

    monkeypatch.setattr(backend, "OvEngine", Spy)
    target = 35.0
    out = tmp_path / "ov-qt"
    m = build_over(tiny_int8_unet, out, OptimizeConfig(backend="openvino", precision="int8", components=("unet",),
                                                       quant=QuantConfig(quality_target=target, **QUICK), **FAST))
    unet = m.components["unet"]
    result = unet["quantize"]["quality_target"]
    precision = unet["openvino"]["inference_precision"]
    assert result["judged_on"] == f"openvino {precision}" and result["reached"]
    assert result["trail"][0]["psnr"] < target <= result["trail"][-1]["psnr"], result["trail"]
    candidates = [p for p, prec in judged if p.endswith("model.onnx")]
    assert len(candidates) == len(result["trail"]) and all(prec == precision for _, prec in judged)
    default_fq = (tiny_int8_unet / "unet" / "quantized" / "model.onnx").read_bytes().count(b"QuantizeLinear")
    chosen_fq = (out / "unet" / "quantized" / "model.onnx").read_bytes().count(b"QuantizeLinear")
    assert chosen_fq < default_fq                      # the extra float nodes lost their Q/DQ pairs
    assert unet["validation"]["passed"]
