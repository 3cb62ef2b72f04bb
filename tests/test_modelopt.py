"""Model Optimizer for the TensorRT plans, on the CPU: recipe mapping always; real int8 fake-quant calibration of the
tiny U-Net, Q/DQ ONNX export checked with ONNX Runtime, and AutoCast fp16 where nvidia-modelopt is installed
(it installs on CPU: see docs/tensorrt.md). The TensorRT build itself is covered by tests/test_tensorrt.py -m gpu."""
import importlib.util

import pytest

from diffaccel.optimize.config import QuantConfig
from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.quant.modelopt import KEEP_FLOAT, recipe_for, recipe_hash

from .helpers import FAST

HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None
needs_modelopt = pytest.mark.skipif(not HAS_MODELOPT, reason="nvidia-modelopt is not installed (on CPU: pip "
                                    "install 'nvidia-modelopt>=0.47' onnx-graphsurgeon polygraphy onnxconverter-common "
                                    "onnxslim ml_dtypes lief cppimport; see docs/tensorrt.md)")


def test_recipes_follow_the_quant_config():
    int8 = recipe_for("int8", QuantConfig())
    assert (int8.algorithm, int8.alpha, int8.quantize_convs, int8.per_channel) == ("max", None, True, True)
    assert int8.keep_float == KEEP_FLOAT
    sq = recipe_for("int8", QuantConfig(smoothquant=0.8, per_channel=False, keep_fp32=("mid_block",)))
    assert (sq.algorithm, sq.alpha, sq.per_channel, sq.keep_float[-1]) == ("smoothquant", 0.8, False, "mid_block")
    fp8 = recipe_for("fp8", QuantConfig())
    assert fp8.quantize_convs is False and fp8.algorithm == "max"


def test_settings_this_path_cannot_honour_are_refused_in_one_line():
    for quant, needle in ((QuantConfig(method="percentile"), "--calib-method minmax"),
                          (QuantConfig(quality_target=30.0), "--quality-target"),
                          (QuantConfig(attention_scores="int8"), "--attention-scores is a choice of the onnxruntime"),):
        with pytest.raises(DiffaccelError, match=needle):
            recipe_for("int8", quant)
    with pytest.raises(DiffaccelError, match="--smoothquant applies to int8"):
        recipe_for("fp8", QuantConfig(smoothquant=0.5))
    with pytest.raises(ValueError):
        recipe_for("fp16", QuantConfig())


def test_recipe_hash_covers_recipe_and_calibration():
    base = recipe_hash(recipe_for("int8", QuantConfig()), QuantConfig())
    assert base == recipe_hash(recipe_for("int8", QuantConfig()), QuantConfig())
    assert base != recipe_hash(recipe_for("fp8", QuantConfig()), QuantConfig())
    assert base != recipe_hash(recipe_for("int8", QuantConfig()), QuantConfig(calib_steps=4))
    assert base != recipe_hash(recipe_for("int8", QuantConfig(keep_fp32=("up_blocks",))), QuantConfig())


@needs_modelopt
def test_builtin_configs_are_copied_not_modified():
    import modelopt.torch.quantization as mtq

    from diffaccel.optimize.quant.modelopt import modelopt_config

    before = repr(mtq.INT8_DEFAULT_CFG)
    cfg = modelopt_config(mtq, recipe_for("int8", QuantConfig(per_channel=False)))
    assert repr(mtq.INT8_DEFAULT_CFG) == before and repr(cfg) != before
    sq = modelopt_config(mtq, recipe_for("int8", QuantConfig(smoothquant=0.7)))
    assert sq["algorithm"] == {"method": "smoothquant", "alpha": 0.7}


@pytest.fixture(scope="module")
def int8_tiny(tmp_path_factory):
    """random:tiny's U-Net quantized to int8 on CPU (2 prompts x 3 steps of calibration), exported with Q/DQ."""
    if not HAS_MODELOPT:
        pytest.skip(needs_modelopt.kwargs["reason"])
    import copy

    import torch

    from diffaccel.optimize.sources.builtins import BUILTINS
    from diffaccel.optimize.families.sd import capture_denoiser_inputs
    from diffaccel.optimize.config import ShapeRange
    from diffaccel.optimize.quant.modelopt import export_qdq, quantize_denoiser
    from diffaccel.optimize.families.sd import ModelGeometry, export_module, sd_specs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # for this build only: restored below, so later tests keep every core
    try:
        pipe = BUILTINS["random:tiny"]()
        pipe.set_progress_bar_config(disable=True)
        calib = capture_denoiser_inputs(pipe, ["a red circle", "a blue square"], steps=3, guidance_scale=7.5,
                                        seed=0, height=64, width=64)
        recipe = recipe_for("int8", QuantConfig())
        unet = copy.deepcopy(pipe.unet)
        spec = sd_specs(ModelGeometry.from_pipeline(pipe), ShapeRange())["unet"]
        module = export_module("unet", {"unet": unet})
        quantize_denoiser(unet, recipe, calib, module, tuple(t.name for t in spec.inputs))
        path = tmp_path_factory.mktemp("qdq") / "model.onnx"
        export_qdq(module, spec, path, opset=18)
    finally:
        torch.set_num_threads(threads)
    return dict(pipe=pipe, calib=calib, recipe=recipe, unet=unet, spec=spec, module=module, path=path)


@needs_modelopt
def test_documented_layers_stay_float_and_the_rest_is_calibrated(int8_tiny):
    unet = int8_tiny["unet"]
    assert not unet.conv_in.input_quantizer.is_enabled and not unet.conv_out.weight_quantizer.is_enabled
    assert not unet.time_embedding.linear_1.input_quantizer.is_enabled
    conv = unet.down_blocks[0].resnets[0].conv1
    assert conv.input_quantizer.is_enabled and conv.weight_quantizer.is_enabled
    assert float(conv.input_quantizer.amax) > 0


@needs_modelopt
def test_qdq_onnx_runs_on_ort_cpu_and_matches_fake_quant(int8_tiny):
    import collections

    import onnx

    from diffaccel.optimize.quant.modelopt import validate_qdq
    from diffaccel.optimize.families.sd import export_module

    ops = collections.Counter(n.op_type for n in onnx.load(str(int8_tiny["path"])).graph.node)
    assert ops["QuantizeLinear"] > 50 and ops["QuantizeLinear"] == ops["DequantizeLinear"]
    calib = int8_tiny["calib"]
    report = validate_qdq(int8_tiny["spec"], int8_tiny["module"], export_module("unet", int8_tiny["pipe"]),
                          int8_tiny["path"], [calib[0], calib[-1]], int8_tiny["recipe"])
    assert report["passed"] and report["kind"] == "l2"
    drift = report["vs_fp32_rel_l2"]
    assert all(0.0 < d < 0.3 for d in drift), drift        # quantized (not identical to fp32), yet close


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The int8 TensorRT plan up to (not including) the engine build, executed for real on CPU through the
    orchestrator: (tmp folder, Context). The exporter is not under test here (legacy exporter)."""
    if not HAS_MODELOPT:
        pytest.skip(needs_modelopt.kwargs["reason"])
    import torch

    from diffaccel.optimize.api import OptimizeConfig
    from diffaccel.optimize.stages.runner import run_stages
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.stages.modelopt_quantize import ModeloptQuantStage
    from diffaccel.optimize.sources import resolve_source
    from diffaccel.optimize.stages.export import ExportStage
    from diffaccel.optimize.stages.autocast import AutoCastStage
    from diffaccel.optimize.stages.base import Context, Reporter
    from diffaccel.optimize.stages.assets import AssetsStage

    root = tmp_path_factory.mktemp("staged")
    src = resolve_source("random:tiny")
    cfg = OptimizeConfig(backend="tensorrt", precision="int8", components=("unet", "text_encoder"),
                         quant=QuantConfig(calib_size=2, calib_steps=2), **FAST)
    ctx = Context(source=src, config=cfg, root=root, manifest=Manifest.new(root, src.to_dict()), reporter=Reporter())
    ctx.plan = [AssetsStage(), ExportStage(), ModeloptQuantStage(), AutoCastStage()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # as int8_tiny, and as this build ran before (int8_tiny's setting leaked into it):
    try:                         # two threads spent 134.6 CPU-s on it on the busy 2-core machine, one 48 when idle
        run_stages(ctx)
    finally:
        torch.set_num_threads(threads)
    return root, ctx


@pytest.mark.slow
@needs_modelopt
def test_autocast_makes_fp16_weights_with_fp32_io(staged):
    """AutoCast of the Q/DQ U-Net (the fp16 stage's output over the quantize stage's, in the staged build)."""
    import onnx
    import torch

    from diffaccel.engines.backends.onnxruntime import OrtEngine
    from diffaccel.optimize.export.parity import check_parity

    root, ctx = staged
    spec = ctx.specs["unet"]
    src, written = root / "unet" / "quantize" / "model.onnx", root / "unet" / "fp16" / "model.onnx"
    model = onnx.load(str(written))
    fp16 = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    assert fp16 > 20
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    assert sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear") > 50
    sample = torch.load(root / "unet" / "quantize" / "validation_inputs.pt")[1]    # a captured pipeline input
    ref, got = OrtEngine(src, "cpu", level="basic"), OrtEngine(written, "cpu", level="basic")
    report = check_parity(spec, ref, got, samples=[sample], kind="l2", rtol=0.1, atol=0.0)
    assert report["passed"]
    assert got(**sample)["out_sample"].dtype == torch.float32


@pytest.mark.slow
@needs_modelopt
def test_quantize_and_fp16_stages_run_through_the_orchestrator(staged):
    """The int8 TensorRT plan up to (not including) the engine build, executed for real on CPU."""
    import onnx

    root, ctx = staged
    quant = ctx.info_of("quantize", "unet")
    assert quant["method"] == "modelopt" and len(quant["recipe_hash"]) == 16 and quant["validation"]["passed"]
    assert ctx.tolerance("unet")["rtol"] == 0.3 and len(ctx.validation_samples("unet")) == 3
    for comp in ("unet", "text_encoder"):
        fp16 = ctx.info_of("fp16", comp)
        assert fp16["decision"] == "fp16" and fp16["validation"]["passed"], fp16
        model = onnx.load(str(root / comp / "fp16" / "model.onnx"))
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert ctx.manifest.stages["fp16"]["outputs"]["unet"] == "unet/fp16/model.onnx"
    assert ctx.tolerance("text_encoder") == {"kind": "l2", "rtol": 0.05, "atol": 0.0}
