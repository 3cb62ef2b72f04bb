"""Model Optimizer (nvidia-modelopt) for the TensorRT plans: int8/fp8 Q/DQ U-Nets, and fp16 ONNX via AutoCast.

:func:`quantize_denoiser` quantizes a copy of the PyTorch denoiser (U-Net or transformer) with ``mtq.quantize``, calibrated by a forward loop
over the U-Net inputs that the real pipeline produces (:func:`~diffaccel.optimize.quant.calibration.capture_denoiser_inputs`,
the same capture as the ONNX Runtime int8 path), keeps in float what Model Optimizer's diffusers example keeps
(time and conditioning embeddings, ``conv_in``/``conv_out``, skip convolutions), then :func:`export_qdq` exports ONNX
with Q/DQ nodes for a strongly typed TensorRT build (the ``quantize`` stage of the TensorRT int8/fp8 plans,
:class:`~diffaccel.optimize.stages.modelopt_quantize.ModeloptQuantStage`). int8 quantizes convolutions and linear
layers; fp8 quantizes linear layers only (attention and feed-forward; convolutions stay fp16). The export uses the
TorchScript exporter: torch.export cannot trace Model Optimizer's quantizers (a data-dependent branch).

:func:`autocast_fp16` converts an ONNX model to fp16 with ``modelopt.onnx.autocast`` (fp32 where the reference run
shows values beyond fp16's range), keeping fp32 inputs and outputs; the ``fp16`` stage of the TensorRT plans
(:class:`~diffaccel.optimize.stages.autocast.AutoCastStage`) runs it and checks the result with ONNX Runtime on CPU.

>>> from diffaccel.optimize.config import QuantConfig
>>> recipe_for("int8", QuantConfig()).algorithm
'max'
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import re
import tempfile
from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError, DiffaccelError
from diffaccel.optimize.artifact.keys import stable_hash
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.config import QuantConfig
from diffaccel.optimize.export.parity import check_parity, named_outputs

# what Model Optimizer's diffusers example (examples/diffusers/quantization, filter_func_default) keeps in float
KEEP_FLOAT = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding")


@dataclasses.dataclass(frozen=True)
class ModeloptRecipe:
    precision: str                  # int8 | fp8
    algorithm: str                  # max | smoothquant
    alpha: "float | None" = None    # SmoothQuant strength
    per_channel: bool = True        # per-output-channel weight scales
    keep_float: tuple = KEEP_FLOAT  # module-name regexes whose quantizers are disabled
    quantize_convs: bool = True


def recipe_for(precision, quant: QuantConfig) -> ModeloptRecipe:
    """The Model Optimizer recipe for ``precision``; raises a one-line error for settings this path cannot honour."""
    precision = str(precision)
    if precision not in ("int8", "fp8"):
        raise ValueError(f"Model Optimizer quantization is for int8 or fp8, not {precision}")
    if str(quant.method) != "minmax":
        raise DiffaccelError(f"--calib-method {quant.method} is not available with --backend tensorrt (Model "
                             "Optimizer calibrates with minmax, optionally --smoothquant); use --calib-method minmax")
    if quant.quality_target is not None:
        raise DiffaccelError("--quality-target is implemented by the onnxruntime and openvino int8 paths; drop it "
                             "with --backend tensorrt, or add layers to keep in float with --keep-fp32")
    if quant.attention_scores is not None:
        raise DiffaccelError("--attention-scores is a choice of the onnxruntime and openvino int8 paths; drop it with "
                             "--backend tensorrt (Model Optimizer's recipe decides attention quantization)")
    if quant.dynamic_int8:
        raise DiffaccelError("dynamic int8 for other components is a choice of the onnxruntime and openvino int8 "
                             "paths; drop it with --backend tensorrt (its other components are fp16)")
    if precision == "fp8" and quant.smoothquant is not None:
        raise DiffaccelError("--smoothquant applies to int8; drop it with --precision fp8")
    return ModeloptRecipe(precision=precision, algorithm="smoothquant" if quant.smoothquant is not None else "max",
                          alpha=quant.smoothquant, per_channel=quant.per_channel,
                          keep_float=KEEP_FLOAT + tuple(quant.keep_fp32), quantize_convs=precision == "int8")


def recipe_hash(recipe: ModeloptRecipe, quant: QuantConfig) -> str:
    """What determines the quantized U-Net: the recipe and the calibration settings (the engine cache key uses it)."""
    calib = {k: getattr(quant, k) for k in ("calib_prompts", "calib_size", "calib_steps", "calib_seed",
                                            "guidance_scale")}
    if quant.calib_prompts:
        from diffaccel.optimize.artifact.files import file_sha256

        calib["calib_prompts"] = file_sha256(quant.calib_prompts)
    return stable_hash({"recipe": recipe, "calibration": calib})


def _set_entry(quant_cfg, pattern: str, **attrs):
    """Add/override one quantizer entry in either config format (ordered list of entries, or the older dict)."""
    if isinstance(quant_cfg, list):
        quant_cfg.append({"quantizer_name": pattern, **attrs})
    else:
        quant_cfg[pattern] = {**quant_cfg.get(pattern, {}), **attrs}


def modelopt_config(mtq, recipe: ModeloptRecipe) -> dict:
    """A copy of Model Optimizer's built-in config for the recipe (INT8_DEFAULT/INT8_SMOOTHQUANT/FP8_DEFAULT)."""
    if recipe.precision == "fp8":
        cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    elif recipe.algorithm == "smoothquant":
        cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
        cfg["algorithm"] = {"method": "smoothquant", "alpha": recipe.alpha}
    else:
        cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    if not recipe.per_channel:
        entry = {"cfg": {"num_bits": 8, "axis": None}} if isinstance(cfg["quant_cfg"], list) else {"axis": None}
        _set_entry(cfg["quant_cfg"], "*weight_quantizer", **entry)
    return cfg


def float_filter(model, recipe: ModeloptRecipe):
    """``quantizer name -> bool``: True for quantizers to disable (kept layers; convolutions for fp8)."""
    import torch

    pattern = re.compile(".*(" + "|".join(recipe.keep_float) + ").*")
    convs = set() if recipe.quantize_convs else {
        n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))}
    return lambda name: bool(pattern.match(name)) or name.rpartition(".")[0] in convs


def quantize_denoiser(model, recipe: ModeloptRecipe, calib: list, wrapper, names: tuple, device: str = "cpu"):
    """Quantize ``model`` (the denoiser) in place with Model Optimizer, calibrated on ``calib`` (its captured
    inputs, by name): each sample runs through ``wrapper`` (the family's export module around ``model``, taking the
    spec's inputs ``names`` in order)."""
    import modelopt.torch.quantization as mtq
    import torch

    model = model.to(device).eval()
    wrapper = wrapper.to(device).eval()

    def forward_loop(_):
        for d in calib:
            wrapper(*(d[n].to(device) for n in names if n in d))

    with torch.no_grad():
        mtq.quantize(model, modelopt_config(mtq, recipe), forward_loop=forward_loop)
    mtq.disable_quantizer(model, float_filter(model, recipe))
    return model.to("cpu")


def export_qdq(module, spec, dst: Path, opset: int) -> list:
    """ONNX with Q/DQ nodes from a quantized module (TorchScript exporter; see the module docstring)."""
    from diffaccel.optimize.config import Exporter
    from diffaccel.optimize.export.onnx_export import export_onnx

    return export_onnx(spec, module, dst, exporter=Exporter.TORCHSCRIPT, opset=opset)


def require_modelopt(what: str):
    try:
        import modelopt  # noqa: F401
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(f"{what} needs NVIDIA Model Optimizer (nvidia-modelopt), which is not "
                                      "installed; install diffaccel[gpu]") from None


def modelopt_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        return "unknown"


def validate_qdq(spec, fake_quant, fp32, path: Path, samples: list, recipe: ModeloptRecipe) -> dict:
    """ONNX Runtime (CPU) on the Q/DQ model against Model Optimizer's fake-quant PyTorch, on captured pipeline inputs;
    also records how far it is from fp32. fp8 graphs use TensorRT-only ops and are checked on the engine instead."""
    if recipe.precision == "fp8":
        return {"skipped": "ONNX Runtime cannot run TensorRT fp8 Q/DQ ops; checked on the engine after the build"}
    from diffaccel.engines.backends.onnxruntime import OrtEngine

    engine = OrtEngine(path, provider="cpu", level="basic")
    report = check_parity(spec, lambda **x: named_outputs(fake_quant, spec, x), engine, samples=samples,
                          **tolerance("qdq-vs-fake-quant"),
                          advice="Keep more layers in float with --keep-fp32, or use --precision fp16.")
    drift = check_parity(spec, lambda **x: named_outputs(fp32, spec, x), engine, samples=samples, kind="l2", rtol=math.inf,
                         atol=0.0)
    report["vs_fp32_rel_l2"] = [p["outputs"]["out_sample"]["rel_l2"] for p in drift["points"]]
    return report


# ---- fp16 via AutoCast ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_modelopt(level=logging.WARNING):
    loggers = [logging.getLogger(n) for n in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(level)
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def has_trt_ops(path: Path) -> bool:
    import onnx

    return any(n.domain == "trt" for n in onnx.load(str(path), load_external_data=False).graph.node)


def autocast_fp16(src: Path, dst: Path, spec, samples: "list | None" = None, seed: int = 0) -> list:
    """fp16 copy of ``src`` with fp32 inputs/outputs. AutoCast's range check runs ``src`` on ``samples`` (captured
    pipeline inputs) or, without them, on the spec's random inputs at two shapes. Graphs with TensorRT-only ops
    (fp8 Q/DQ) are converted without a reference run."""
    import numpy as np
    import torch
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.autocast.convert import convert_to_f16

    with _quiet_modelopt(), tempfile.TemporaryDirectory(prefix="autocast-") as tmp:
        if has_trt_ops(src):
            import onnx

            model = convert_to_f16(onnx.load(str(src)), keep_io_types=True)
        else:
            gen = torch.Generator().manual_seed(seed)
            feeds = samples or [spec.random_inputs(gen, **v) for v in (spec.opt_values(), spec.alt_values())]
            for i, feed in enumerate(feeds):
                np.savez(Path(tmp) / f"{i}.npz", **{k: v.numpy() for k, v in feed.items()})
            model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16", keep_io_types=True,
                                               calibration_data=tmp, providers=["cpu"])
    return save_onnx(model, dst)


def save_onnx(model, dst: Path) -> list:
    import onnx

    from diffaccel.optimize.export.onnx_export import EXTERNAL_DATA_THRESHOLD

    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(dst))
        return [dst]
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return [dst, dst.with_name(dst.name + ".data")]
