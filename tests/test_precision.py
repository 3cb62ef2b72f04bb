"""int8 (calibrated on the pipeline), fp16 conversion and its guards, torch bf16 — on the tiny model."""

import contextlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffaccel.engines import AcceleratedStableDiffusionPipeline
from diffaccel.optimize import OptimizeConfig, optimize
from diffaccel.optimize.config import QuantConfig
from diffaccel.optimize.artifact.errors import BackendUnavailableError, DiffaccelError, ParityError
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.artifact.files import file_sha256

from .helpers import FAST, QUICK, build_over, psnr


@pytest.fixture(scope="module")
def int8(tiny_int8):
    return tiny_int8


@pytest.fixture(scope="module")
def unet_samples(tiny_pipe):
    """The U-Net's inputs at both steps of one guided 64x64 generation (what calibration captures)."""
    from diffaccel.optimize.families.sd import capture_denoiser_inputs

    return capture_denoiser_inputs(tiny_pipe, ["a star"], steps=2, guidance_scale=7.5, seed=0, height=64, width=64)


def test_int8_manifest_records_calibration_and_decisions(int8):
    m = Manifest.load(int8)
    m.verify()
    unet = m.components["unet"]
    q = unet["quantize"]
    assert unet["precision"] == "int8" and q["method"] == "static-qdq-u8s8"
    assert q["calibration_samples"] == QUICK["calib_size"] * QUICK["calib_steps"]
    assert q["quantized_nodes"] > 20
    assert set(q["default_keep_fp32"]) >= {r"^conv_in$", r"^conv_out$", r"^time_embedding(\.|$)"}
    assert unet["validation"]["kind"] == "l2" and unet["validation"]["inputs"] == "captured pipeline inputs"
    for comp in ("text_encoder", "vae_decoder", "vae_encoder"):      # float by default: a setting, not a timing
        d = m.components[comp]["quantize"]
        assert d["decision"] == "fp32" and d["method"] == "none" and "QuantConfig.dynamic_int8" in d["reason"]
        assert not {"speedup", "fp32_ms", "int8_ms"} & set(d) and m.components[comp]["precision"] == "int8"


def test_default_float_layers_are_not_quantized(int8):
    """The documented defaults: time embedding, per-block time projections, first and last conv stay float; the
    rest of the Convs and MatMuls get int8 weights."""
    import onnx

    from diffaccel.optimize.quant.ort_static import node_scope

    model = onnx.load(str(int8 / "unet/quantized/model.onnx"))
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    int8_weight = {n.name: produced_by.get(n.input[1]) == "DequantizeLinear"
                   for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}
    scope = {n.name: node_scope(n) for n in model.graph.node}
    kept = set(Manifest.load(int8).components["unet"]["quantize"]["kept_float"])
    for prefix in ("conv_in", "conv_out", "time_embedding"):
        nodes = [n for n in int8_weight if scope[n] == prefix or scope[n].startswith(prefix + ".")]
        assert nodes and all(not int8_weight[n] and n in kept for n in nodes), prefix
    assert sum(int8_weight.values()) >= 20     # everything else with weights is int8


def test_calibration_captures_every_step_with_guidance(tiny_pipe):
    from diffaccel.optimize.families.sd import capture_denoiser_inputs

    kw = dict(steps=3, seed=0, height=64, width=64)
    samples = capture_denoiser_inputs(tiny_pipe, ["a red circle", "a blue star"], guidance_scale=7.5, **kw)
    assert len(samples) == 2 * 3
    for s in samples:   # classifier-free guidance: the U-Net sees the unconditional and the conditional half
        assert s["sample"].shape[0] == s["encoder_hidden_states"].shape[0] == s["timestep"].shape[0] == 2
        assert not torch.equal(s["encoder_hidden_states"][0], s["encoder_hidden_states"][1])
    assert len({float(s["timestep"][0]) for s in samples[:3]}) == 3          # every denoising step
    assert torch.equal(samples[0]["encoder_hidden_states"][0], samples[3]["encoder_hidden_states"][0])  # uncond
    no_cfg = capture_denoiser_inputs(tiny_pipe, ["a red circle"], guidance_scale=1.0, **kw)
    assert len(no_cfg) == 3 and no_cfg[0]["sample"].shape[0] == 1


@pytest.mark.parametrize("method", ["percentile", pytest.param("entropy", marks=pytest.mark.slow)])
def test_histogram_calibration_methods(tmp_path, method, tiny_int8_unet):
    """Percentile and entropy calibration build, are reproducible (a fresh build and a rebuild over the min-max
    artifact give the same bytes), and give other ranges than min-max."""
    import onnx
    from onnx import numpy_helper

    def scales(path):
        m = onnx.load(str(path))
        inits = {i.name: i for i in m.graph.initializer}
        return sorted(float(numpy_helper.to_array(inits[n.input[1]]).max()) for n in m.graph.node
                      if n.op_type == "QuantizeLinear" and n.input[1] in inits and "weight" not in n.input[0])

    config = OptimizeConfig(precision="int8", components=("unet",), quant=QuantConfig(method=method, **QUICK), **FAST)
    minmax = tiny_int8_unet           # the same build with the default calibration
    optimize("random:tiny", tmp_path / "a", config)
    build_over(minmax, tmp_path / "b", config)      # the export is minmax's; calibration and quantization run again
    runs = []
    for name in ("a", "b"):
        runs.append(tmp_path / name / "unet/quantized/model.onnx")
        assert Manifest.load(tmp_path / name).components["unet"]["quantize"]["calibration"] == method
    assert Manifest.load(minmax).components["unet"]["quantize"]["calibration"] == "minmax"
    runs.append(minmax / "unet/quantized/model.onnx")
    assert file_sha256(runs[0]) == file_sha256(runs[1])
    assert scales(runs[0]) and scales(runs[0]) != scales(runs[2])


def test_int8_is_byte_identical_for_the_same_config(int8, tiny_int8_unet, tmp_path):
    unet_only = dict(components=("unet",), **FAST)    # the U-Net is what calibration touches
    again = tiny_int8_unet                            # a second build, U-Net only, same QuantConfig
    for rel in ("unet/quantized/model.onnx", "unet/engine/model.onnx"):
        assert file_sha256(int8 / rel) == file_sha256(again / rel), rel
    other = tmp_path / "other-seed"
    build_over(again, other, OptimizeConfig(precision="int8", quant=QuantConfig(calib_seed=5, **QUICK), **unet_only))
    assert file_sha256(int8 / "unet/quantized/model.onnx") != file_sha256(other / "unet/quantized/model.onnx")


@contextlib.contextmanager
def busy_cpus():
    """Every core kept busy by another process while the block runs: a shared build machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _built_files(root) -> dict:
    """{path: sha256} of every file the quantize and engine stages wrote, read from disk."""
    m = Manifest.load(root)
    return {f["path"]: file_sha256(root / f["path"]) for stage in ("quantize", "engine")
            for f in m.stages[stage]["files"]}


@pytest.mark.slow
def test_int8_is_the_same_bytes_on_a_busy_machine(int8, tiny_ort_ts, tmp_path):
    """The int8 build of every component run again while other processes keep every core busy (over the fp32
    artifact of the same export: quantize and engine run in full) writes the same files, byte for byte: nothing in
    an artifact depends on how fast the machine was (the text encoder's int8 used to be chosen by timing it)."""
    config = OptimizeConfig(precision="int8", quant=QuantConfig(**QUICK), **FAST)     # tiny_int8's config
    with busy_cpus():
        busy = build_over(tiny_ort_ts, tmp_path / "busy", config)
    quiet = Manifest.load(int8)
    assert set(busy.components) == set(quiet.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    files = _built_files(int8)
    assert any(p.startswith("text_encoder/") for p in files) and any(p.startswith("unet/quantized/") for p in files)
    assert _built_files(tmp_path / "busy") == files


def test_dynamic_int8_is_a_setting(tiny_ort_ts, tmp_path):
    """QuantConfig.dynamic_int8 names the components given dynamic int8 MatMuls; the rest stay float. Built again
    beside busy cores, the same bytes."""
    import onnx

    config = OptimizeConfig(precision="int8", components=("text_encoder", "vae_decoder"), **FAST,
                            quant=QuantConfig(dynamic_int8="text_encoder", **QUICK))
    assert config.quant.dynamic_int8 == ("text_encoder",)
    m = build_over(tiny_ort_ts, tmp_path / "a", config)
    te, vae = m.components["text_encoder"], m.components["vae_decoder"]
    assert te["quantize"]["method"] == "dynamic-int8-matmul" and te["validation"]["passed"]
    assert vae["quantize"]["decision"] == "fp32" and vae["validation"]["passed"]

    def ops(entry):
        return {n.op_type for n in onnx.load(str(tmp_path / "a" / entry["engine"])).graph.node}

    assert "MatMulInteger" in ops(te) or "DynamicQuantizeMatMul" in ops(te)
    assert not {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"} & ops(vae)
    with busy_cpus():
        build_over(tiny_ort_ts, tmp_path / "b", config)
    assert _built_files(tmp_path / "b") == _built_files(tmp_path / "a")
    for bad in ("unet", "vae"):
        with pytest.raises(DiffaccelError, match="not a component it applies to; choose from: text_encoder"):
            optimize("random:tiny", tmp_path / "c", OptimizeConfig(
                precision="int8", quant=QuantConfig(dynamic_int8=(bad,)), **FAST))
    assert not (tmp_path / "c").exists()


def test_int8_pipeline_runs_and_stays_close(int8, tiny_ort_ts):
    kw = dict(prompt="a red circle", num_inference_steps=4, output_type="np")
    fp32 = AcceleratedStableDiffusionPipeline.from_pretrained(tiny_ort_ts)
    q = AcceleratedStableDiffusionPipeline.from_pretrained(int8)
    a = fp32(generator=torch.Generator().manual_seed(0), **kw).images
    b = q(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.isfinite(b).all() and psnr(a, b) > 20


def test_keep_fp32_pattern_and_smoothquant(tmp_path, tiny_int8_unet):
    import onnx

    out = tmp_path / "kept"
    q = QuantConfig(keep_fp32=(r"^down_blocks\.0\.",), smoothquant=0.5, **QUICK)
    m = build_over(tiny_int8_unet, out, OptimizeConfig(precision="int8", quant=q, components=("unet",), **FAST))
    info = m.components["unet"]["quantize"]
    assert info["smoothquant"]["balanced_layernorms"] > 0
    model = onnx.load(str(out / "unet/quantized/model.onnx"))
    from diffaccel.optimize.quant.ort_static import node_scope

    convs = [n for n in model.graph.node if n.op_type == "Conv" and node_scope(n).startswith("down_blocks.0.")]
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    assert convs and all(produced_by.get(c.input[1]) != "DequantizeLinear" for c in convs)


def test_smoothquant_preserves_the_float_function(tmp_path, tiny_ort_ts, unet_samples):
    import onnxruntime as ort

    from diffaccel.optimize.quant.smoothquant import smooth

    src, samples = tiny_ort_ts / "unet" / "export" / "model.onnx", unet_samples
    info = smooth(src, tmp_path / "s.onnx", samples, 0.8, external=False)
    feed = {k: v.numpy() for k, v in samples[-1].items()}
    a = ort.InferenceSession(str(src)).run(None, feed)[0]
    b = ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, feed)[0]
    assert info["balanced_matmuls"] > 0 and np.abs(a - b).max() < 1e-4


def test_bad_calibration_prompts(tmp_path, tiny_int8_unet):
    """A missing or empty prompts file is refused before any stage starts (the int8 stages' preflight; the prompts
    are first read after the export): a fresh build leaves no OUT, a rebuild leaves the old OUT as it was."""
    from diffaccel.optimize.stages.base import Reporter

    class Started(Reporter):
        def __init__(self):
            self.names = []

        def stage_start(self, name, items):
            self.names.append(name)

    started = Started()
    unet_only = dict(precision="int8", components=("unet",), **FAST)
    with pytest.raises(DiffaccelError, match="does not exist"):
        optimize("random:tiny", tmp_path / "x", OptimizeConfig(
            quant=QuantConfig(calib_prompts=str(tmp_path / "nope.txt"), **QUICK), **unet_only), reporter=started)
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    with pytest.raises(DiffaccelError, match="latin1.txt cannot be read .*UTF-8"):
        optimize("random:tiny", tmp_path / "x", OptimizeConfig(
            quant=QuantConfig(calib_prompts=str(tmp_path / "latin1.txt"), **QUICK), **unet_only), reporter=started)
    (tmp_path / "latin1.txt").unlink()
    (tmp_path / "empty.txt").write_text("\n\n")
    old = tmp_path / "y"
    shutil.copytree(tiny_int8_unet, old)
    with pytest.raises(DiffaccelError, match="holds no prompts"):
        optimize("random:tiny", old, OptimizeConfig(
            quant=QuantConfig(calib_prompts=str(tmp_path / "empty.txt"), **QUICK), **unet_only), reporter=started)
    assert started.names == []                  # refused before any stage (no export, no pipeline load)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "y"]      # no OUT, no work folder left
    assert (old / "manifest.json").read_bytes() == (tiny_int8_unet / "manifest.json").read_bytes()
    Manifest.load(old).verify()


def test_fp16_conversion_runs_and_guards(tmp_path, tiny_ort_ts, tiny_pipe):
    from diffaccel.engines.backends.onnxruntime import OrtEngine
    from diffaccel.optimize.export.parity import check_parity
    from diffaccel.optimize.artifact.specs import tolerance
    from diffaccel.optimize.stages.fp16 import convert_fp16
    FP16_TOLERANCE = tolerance("fp16")
    from diffaccel.optimize.families.sd import export_module
    from diffaccel.optimize.artifact.specs import ComponentSpec

    art = tiny_ort_ts
    convert_fp16(art / "unet/export/model.onnx", tmp_path / "unet16.onnx")
    spec = ComponentSpec.from_dict("unet", Manifest.load(art).components["unet"]["spec"])
    module = export_module("unet", tiny_pipe)
    ref = lambda **x: {"out_sample": module(*(x[t.name] for t in spec.inputs))}  # noqa: E731
    report = check_parity(spec, ref, OrtEngine(tmp_path / "unet16.onnx"), **FP16_TOLERANCE)
    assert report["passed"]
    nan = lambda **x: {"out_sample": torch.full_like(x["sample"], float("nan"))}  # noqa: E731
    with pytest.raises(ParityError, match="non-finite values"):
        check_parity(spec, ref, nan, **FP16_TOLERANCE)
    black = lambda **x: {"out_sample": torch.full_like(x["sample"], -1.0)}  # noqa: E731
    with pytest.raises(ParityError, match="black image"):
        check_parity(spec, ref, black, kind="l2", rtol=10.0)


def test_fp16_on_cpu_is_refused_before_writing(tmp_path):
    with pytest.raises(BackendUnavailableError, match="GPU providers"):
        optimize("random:tiny", tmp_path / "f16", OptimizeConfig(precision="fp16", **FAST))
    assert not any(tmp_path.iterdir())


def test_torch_bf16(artifacts, tiny_pipe):
    out = artifacts("random:tiny", "torch", "bf16")
    m = Manifest.load(out)
    assert all(c["precision"] == "bf16" and c["validation"]["passed"] for c in m.components.values())
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(out)
    kw = dict(prompt="a red circle", num_inference_steps=4, output_type="np")
    a = tiny_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert psnr(a, b) > 25


def test_unsupported_pair_lists_supported():
    with pytest.raises(ValueError) as e:
        OptimizeConfig(backend="onnxruntime", precision="bf16")
    msg = str(e.value)
    assert "precision bf16 is not supported on backend onnxruntime" in msg and "\n" not in msg
    assert "onnxruntime/int8" in msg and "torch/bf16" in msg and "onnxruntime/bf16" not in msg


def _fed_by_dequantize(model_path) -> dict:
    """{node name: whether any of its inputs comes out of a DequantizeLinear} for the Convs/MatMuls/Gemms."""
    import onnx

    model = onnx.load(str(model_path))
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name: any(produced_by.get(i) == "DequantizeLinear" for i in n.input)
            for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}


@pytest.mark.slow
def test_quality_target_keeps_sensitive_layers_in_float(tmp_path, tiny_int8_unet):
    """End to end: the default int8 U-Net misses the target, so the search keeps 2, 4, ... of the least robust
    nodes in float until real images reach it, and the artifact holds that model (those nodes float in it)."""
    target = 35.0
    q = QuantConfig(quality_target=target, **QUICK)
    m = build_over(tiny_int8_unet, tmp_path / "qt", OptimizeConfig(precision="int8", quant=q, components=("unet",),
                                                                  **FAST))
    result = m.components["unet"]["quantize"]["quality_target"]
    trail = result["trail"]
    assert trail[0]["kept_float_extra"] == 0 and trail[0]["psnr"] < target, \
        f"the default int8 model already reaches {target} dB, so no search ran: raise the target ({trail[0]})"
    assert [r["kept_float_extra"] for r in trail[1:]] == [2 ** (i + 1) for i in range(len(trail) - 1)]
    assert all(r["psnr"] < target for r in trail[:-1]) and trail[-1]["psnr"] >= target
    assert result["reached"] and result["target_psnr"] == target
    extra = result["extra_kept_float"]
    assert len(set(extra)) == len(extra) == trail[-1]["kept_float_extra"] >= 2
    default = _fed_by_dequantize(tiny_int8_unet / "unet/quantized/model.onnx")   # same build, no target
    chosen = _fed_by_dequantize(tmp_path / "qt/unet/quantized/model.onnx")
    assert all(default[n] for n in extra) and not any(chosen[n] for n in extra)
    assert sum(chosen.values()) == sum(default.values()) - len(extra)   # nothing else changed
    m.verify()


def test_quality_target_search_returns_the_least_robust_nodes_to_float(int8, unet_samples, tmp_path):
    """meet_target ranks nodes by measured activation SQNR and doubles how many it keeps in float (2, 4, ...) until
    the judge's PSNR reaches the target; here a judge that gains 3 dB per float node needs 4."""
    import math

    from diffaccel.optimize.quant.quality_target import activation_sqnr, meet_target

    model = int8 / "unet" / "quantized" / "model.onnx"
    asked, kept = [], {model: 0}

    def quantize(extra):                 # a distinct candidate per call: the judge must be shown each one
        asked.append(extra)
        kept[tmp_path / f"candidate-{len(extra)}.onnx"] = len(extra)
        return tmp_path / f"candidate-{len(extra)}.onnx"

    class Judge:
        def psnr(self, path, threads=None):
            return 25.0 + 3 * kept[path]

    result = meet_target(quantize, Judge(), model, unet_samples, 36.0)
    assert [len(a) for a in asked] == [2, 4] and [r["psnr"] for r in result["trail"]] == [25.0, 31.0, 37.0]
    assert result["model"] == tmp_path / "candidate-4.onnx"
    ranking = sorted(activation_sqnr(model, unet_samples[:4]).items(), key=lambda kv: kv[1])
    assert result["reached"] and result["extra_kept_float"] == [name for name, _ in ranking[:4]]
    quantized = _fed_by_dequantize(model)
    assert len(ranking) > 4 and all(quantized[name] and db > 0 for name, db in ranking)   # quantized nodes only
    assert math.isfinite(ranking[0][1]) and ranking[0][1] < ranking[4][1]   # the nodes differ in robustness


def test_unreachable_quality_target_says_what_to_try(int8, unet_samples):
    from diffaccel.optimize.quant.quality_target import activation_sqnr, meet_target

    class Stubborn:                      # a judge whose images never get better
        def psnr(self, path, threads=None):
            return 20.0

    model = int8 / "unet" / "quantized" / "model.onnx"
    asked = []
    with pytest.raises(DiffaccelError, match="not reachable: the best was 20.00 dB.*lower the target"):
        meet_target(lambda extra: asked.append(extra) or model, Stubborn(), model, unet_samples, 30.0)
    ranking = activation_sqnr(model, unet_samples[:4])
    # it never asks for a candidate with every node in float (that is the fp32 model, which quantize refuses)
    assert asked and max(len(a) for a in asked) == len(ranking) - 1


@pytest.mark.slow
def test_attention_scores_int8_quantizes_the_qk_matmuls_and_nothing_else(tmp_path, tiny_int8_unet):
    """--attention-scores int8 puts Q/DQ on attention's QK^T MatMuls (kept float by default), leaves every other
    quantization decision as it was, keys the quantize stage apart from the default build, and records it."""
    import onnx

    from diffaccel.optimize.quant.ort_static import attention_score_matmuls

    m = build_over(tiny_int8_unet, tmp_path / "s8", OptimizeConfig(
        precision="int8", components=("unet",), quant=QuantConfig(attention_scores="int8", **QUICK), **FAST),
        must_run=("quantize",))
    default = _fed_by_dequantize(tiny_int8_unet / "unet/quantized/model.onnx")
    scores8 = _fed_by_dequantize(tmp_path / "s8/unet/quantized/model.onnx")
    qk = attention_score_matmuls(onnx.load(str(tiny_int8_unet / "unet/quantized/model.onnx")))
    assert qk and not any(default[n] for n in qk) and all(scores8[n] for n in qk)
    assert {n for n in default if n not in qk and default[n] != scores8[n]} == set()
    q = m.components["unet"]["quantize"]
    assert q["attention_scores_kept_float"] == 0 and m.components["unet"]["validation"]["passed"]
    assert m.stages["quantize"]["config"]["attention_scores"] == "int8"
    assert "attention_scores" not in Manifest.load(tiny_int8_unet).stages["quantize"]["config"]


def test_int8_weights_follow_the_cpu_rule_and_the_model_holds_them(tiny_int8_unet, monkeypatch, caplog):
    """Without VNNI/AMX, x86 int8 kernels saturate 8-bit weight products: auto picks 7-bit weights there (recorded,
    keyed) and the quantized model's weights really fit 7 bits; with VNNI it keeps 8 and the keys builds had."""
    import logging

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from diffaccel.engines.backends import cpu
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.config import QuantConfig
    from diffaccel.optimize.quant.ort_static import weight_bits

    entry = Manifest.load(tiny_int8_unet).components["unet"]
    bits = entry["quantize"]["weight_bits"]
    assert bits == (7 if cpu.int8_saturates() else 8), entry["quantize"]["weight_bits_reason"]
    model = onnx.load(str(tiny_int8_unet / "unet" / "quantized" / "model.onnx"))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 2 ** (bits - 1)
    for saturates, want in ((True, 7), (False, 8)):
        monkeypatch.setattr(cpu, "int8_saturates", lambda s=saturates: s)
        assert weight_bits(QuantConfig())[0] == want
    assert weight_bits(QuantConfig(int8_weights="8bit"))[0] == 8
    monkeypatch.setattr(cpu, "int8_saturates", lambda: True)
    with caplog.at_level(logging.WARNING):
        cpu.warn_if_saturating("unet", {**entry, "quantize": {**entry["quantize"], "weight_bits": 8}},
                               logging.getLogger("t"))
    assert "--int8-weights 7bit" in caplog.text
