"""Weight-only precisions (--precision w8a16 | w4a16): NNCF's data-free weight compression on OpenVINO, MatMulNBits on
ONNX Runtime, of the denoiser and text encoders; the VAE float, what each layer got recorded, and images near the fp32
engine's."""
import numpy as np
import pytest

from .helpers import psnr

pytest.importorskip("openvino")
pytest.importorskip("nncf")


def _images(out):
    import torch

    from diffaccel.engines.pipelines import pipeline_class

    pipe = pipeline_class(out).from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(["a red circle", "a blue square"], num_inference_steps=4, height=64, width=64,
                           output_type="np", generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images)


@pytest.mark.parametrize("backend, precision, kind, floor", [   # OpenVINO's w8a16 in the slow tier (its own fp32 build)
    pytest.param("openvino", "w8a16", "int8", 30.0, marks=pytest.mark.slow), ("openvino", "w4a16", "int4", 20.0),
    ("onnxruntime", "w4a16", "int4", 20.0)])
def test_weight_only_builds_record_each_layers_weights_and_stay_near_fp32(artifacts, backend, precision, kind,
                                                                          floor):
    from diffaccel.optimize.artifact.manifest import Manifest

    out = artifacts("random:tiny", backend, precision, exporter="torchscript")
    m = Manifest.load(out)
    for comp in ("unet", "text_encoder"):
        entry = m.components[comp]
        layers = {"int4": 0, "int8": 0, "float": 0, **entry["weights"]["layers"]}
        quantized = layers["int4"] + layers["int8"]
        share = 0.9 if backend == "openvino" else 0.4        # ORT: MatMuls only, convolutions stay float
        assert entry["precision"] == precision and layers[kind] > 0 and quantized >= share * sum(layers.values()), \
            layers
        assert entry["validation"]["passed"]
    assert m.components["unet"]["weights"]["group_size"] == (128 if precision == "w4a16" or backend == "onnxruntime"
                                                             else None)
    for comp in ("vae_decoder", "vae_encoder"):            # the VAE stays float
        assert "layers" not in (m.components[comp].get("weights") or {})
        assert m.components[comp]["precision"] in ("fp32", "bf16")
    fp32 = artifacts("random:tiny", "onnxruntime", "fp32", exporter="torchscript")    # tiny_ort_ts: shared
    got = psnr(_images(out), _images(fp32))
    assert floor <= got < 100, got                           # compressed: near fp32, not identical
    size = sum(f["bytes"] for f in m.components["unet"]["files"])
    full = sum(f["bytes"] for f in Manifest.load(fp32).components["unet"]["files"])
    limit = {"openvino": 0.45 if precision == "w8a16" else 0.4, "onnxruntime": 0.9}[backend]   # ORT: convs fp32
    assert size < limit * full, (size, full)


def test_weight_only_is_offered_where_it_is_built_and_refused_elsewhere(capsys, tmp_path):
    from .helpers import assert_one_line_error, run_cli

    code, out, _ = run_cli(capsys, "optimize", "--help")
    assert "w8a16" in out and "w4a16" in out
    code, _, err = run_cli(capsys, "optimize", "random:tiny", "-o", tmp_path / "o", "--backend", "tensorrt",
                           "--precision", "w4a16")
    assert_one_line_error(code, err, "precision w4a16 is not supported on backend tensorrt", "openvino/w4a16",
                          "onnxruntime/w4a16")


def test_a_model_past_the_external_data_threshold_is_written_with_external_weights(tiny_ort_ts, tmp_path,
                                                                                   monkeypatch):
    """Models above 2 GB (SD 1.5's U-Net) cannot be serialized inline: the compressed model goes to external data
    there (the threshold lowered to 0 here to take that path on a tiny model)."""
    import onnxruntime as ort

    from diffaccel.optimize.export import onnx_export
    from diffaccel.optimize.quant.weight_only import compress_onnx

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    facts = compress_onnx(tiny_ort_ts / "unet" / "export" / "model.onnx", tmp_path / "model.onnx", "w4a16")
    assert (tmp_path / "model.onnx.data").stat().st_size > 0 and facts["layers"]["int4"] > 0
    ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
