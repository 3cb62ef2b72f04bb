"""The plan table: which stages build which (backend, precision) pair.

A stage has one name, used alike as its class's ``Stage.name``, in the plan table, as its key in the manifest's
``stages`` and in progress output: ``assets``, ``export``, ``quantize``, ``weights``, ``fp16``, ``engine``. A name is a role in the
build; a backend may fill it with its own class (``IMPLEMENTATIONS``), and a plan holds each name at most once, so the
manifest of an artifact names each stage once. Where two backends' classes fill one role they record different
settings (the stage key), so one never passes for the other when a build changes backend in the same OUT; where
they share a class (ONNX Runtime's and OpenVINO's int8 ``quantize``), the work is shared too.

Adding a backend or precision = its stage module(s), rows in ``IMPLEMENTATIONS`` and ``PLANS``; ``optimize()`` does
not change. Classes are named as ``module:Class`` and imported only when a plan runs, so nothing here imports a GPU
library.

>>> from diffaccel.optimize.config import Backend, Precision
>>> (Backend.ONNXRUNTIME, Precision.FP32) in plans()
True
>>> [s.name for s in stages_for("onnxruntime", "int8")]
['assets', 'export', 'quantize', 'engine']
>>> stage_class("engine", "openvino").__name__
'OpenVinoEngineStage'
"""
from __future__ import annotations

import importlib

STAGE_NAMES = ("assets", "export", "quantize", "weights", "fp16", "engine", "step_cache")   # the order stages run in
ANY = "*"
_S = "diffaccel.optimize.stages."
IMPLEMENTATIONS = {  # stage name -> {backend (ANY: every backend): "module:Class"}
    "assets": {ANY: _S + "assets:AssetsStage"},
    "export": {ANY: _S + "export:ExportStage"},
    "quantize": {"onnxruntime": _S + "int8:QuantizeStage", "openvino": _S + "int8:QuantizeStage",
                 "tensorrt": _S + "modelopt_quantize:ModeloptQuantStage"},
    "weights": {"onnxruntime": _S + "weight_only:WeightOnlyStage"},      # OpenVINO compresses in its engine stage
    "fp16": {"onnxruntime": _S + "fp16:Fp16Stage", "tensorrt": _S + "autocast:AutoCastStage"},
    "engine": {"onnxruntime": _S + "ort_engine:OrtEngineStage", "tensorrt": _S + "tensorrt:TensorRTBuildStage",
               "openvino": _S + "openvino:OpenVinoEngineStage", "torch": _S + "torch_save:TorchSaveStage"},
    "step_cache": {ANY: _S + "step_cache:StepCacheStage"},     # only with optimize --step-cache (extra_stages)
}

_TRT_QUANT = ("Model Optimizer {} Q/DQ U-Net calibrated on the pipeline, fp16 elsewhere, strongly typed TensorRT "
              "engines")
PLANS = {  # (backend, precision) -> (stage names, note)
    ("onnxruntime", "fp32"): (("assets", "export", "engine"),
                              "ONNX export, ORT graph optimization for the chosen provider"),
    ("onnxruntime", "int8"): (("assets", "export", "quantize", "engine"),
                              "static QDQ int8 U-Net calibrated on the pipeline; other components float unless "
                              "QuantConfig.dynamic_int8 names them"),
    ("onnxruntime", "w8a16"): (("assets", "export", "weights", "engine"),
                               "int8 weights in blocks of 128 (ORT MatMulNBits, no calibration) for every constant-weight "
                               "MatMul of the denoiser and text encoders; convolutions, VAE and compute fp32 on the CPU"),
    ("onnxruntime", "w4a16"): (("assets", "export", "weights", "engine"),
                               "int4 weights in blocks of 128 (ORT MatMulNBits) for every constant-weight MatMul of the "
                               "denoiser and text encoders; convolutions, VAE and compute fp32 on the CPU"),
    ("onnxruntime", "fp16"): (("assets", "export", "fp16", "engine"),
                              "fp16 for the CUDA/TensorRT providers; VAE fp32; NaN/black guard"),
    ("torch", "fp32"): (("assets", "engine"), "PyTorch eager reference"),
    ("torch", "bf16"): (("assets", "engine"), "PyTorch eager in bfloat16 (fp32 I/O)"),
    ("tensorrt", "fp32"): (("assets", "export", "engine"),
                           "ONNX export, strongly typed fp32 TensorRT engines (TF32 off)"),
    ("tensorrt", "fp16"): (("assets", "export", "fp16", "engine"),
                           "ONNX export, Model Optimizer AutoCast to fp16, strongly typed TensorRT engines"),
    ("tensorrt", "int8"): (("assets", "export", "quantize", "fp16", "engine"), _TRT_QUANT.format("int8")),
    ("tensorrt", "fp8"): (("assets", "export", "quantize", "fp16", "engine"), _TRT_QUANT.format("fp8")),
    ("openvino", "fp32"): (("assets", "export", "engine"), "ONNX export, OpenVINO IR compiled for the CPU in f32"),
    ("openvino", "bf16"): (("assets", "export", "engine"),
                           "ONNX export, OpenVINO IR compiled for the CPU in bf16 (CPUs with AVX512_BF16 or AMX)"),
    ("openvino", "w8a16"): (("assets", "export", "engine"),
                            "int8 weights per output channel (NNCF weight compression, no calibration) in the denoiser "
                            "and text encoders, bf16 compute where the CPU has it; VAE float"),
    ("openvino", "w4a16"): (("assets", "export", "engine"),
                            "int4 weights in groups of 128 (NNCF; layers it keeps at int8 recorded) in the denoiser and "
                            "text encoders, bf16 compute where the CPU has it; VAE float"),
    ("openvino", "int8"): (("assets", "export", "quantize", "engine"),
                           "diffaccel's calibrated int8 Q/DQ U-Net compiled by OpenVINO, float parts in bf16 where the "
                           "CPU has it"),
}


def plans() -> dict:
    """{(Backend, Precision): {"stages": [stage names], "note": str}}."""
    from diffaccel.optimize.config import Backend, Precision

    return {(Backend(b), Precision(p)): {"stages": list(s), "note": n} for (b, p), (s, n) in PLANS.items()}


def stage_class(name: str, backend) -> type:
    """The class that fills stage ``name`` for ``backend`` (imported now)."""
    impls = IMPLEMENTATIONS.get(name)
    if impls is None:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(IMPLEMENTATIONS)}")
    ref = impls.get(str(backend), impls.get(ANY))
    if ref is None:
        raise ValueError(f"no {name} stage for backend {backend}; backends with one: {', '.join(impls)}")
    module, _, cls = ref.partition(":")
    return getattr(importlib.import_module(module), cls)


def stages_for(backend, precision) -> list:
    """The stage classes of a plan, in order (imported now)."""
    key = (str(backend), str(precision))
    if key not in PLANS:
        raise ValueError(f"no plan for {key[0]}/{key[1]}; supported backend/precision pairs: {supported_pairs()}")
    return [stage_class(name, key[0]) for name in PLANS[key][0]]


def supported_pairs() -> str:
    return ", ".join(f"{b}/{p}" for b, p in PLANS)


def extra_stages(config) -> list:
    """Stages a setting adds after a plan's: ``step_cache`` (checks and records the split U-Net) with
    ``--step-cache``."""
    return [stage_class("step_cache", config.backend)] if getattr(config, "step_cache", None) is not None else []
