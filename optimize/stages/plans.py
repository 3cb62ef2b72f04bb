"""The plan table: which stages build which (backend, precision) pair.

Adding a backend or precision = its stage module(s) and rows here; ``optimize()`` does not change. Stage classes are
named as ``module:Class`` and imported only when a plan runs, so nothing here imports a GPU library.

>>> from diffaccel.optimize.config import Backend, Precision
>>> (Backend.ONNXRUNTIME, Precision.FP32) in plans()
True
>>> [s.name for s in stages_for("onnxruntime", "int8")]
['assets', 'export', 'quantize', 'engine']
"""
from __future__ import annotations

import importlib

_S = "diffaccel.optimize.stages."
STAGES = {  # stage name in the plan table -> "module:Class"
    "assets": _S + "assets:AssetsStage",
    "export": _S + "onnx_export:ExportStage",
    "ort_engine": _S + "onnx_export:OrtEngineStage",
    "int8": _S + "int8:QuantizeStage",
    "fp16": _S + "fp16:Fp16Stage",
    "torch_save": _S + "torch_save:TorchSaveStage",
    "modelopt": "diffaccel.optimize.quant.modelopt:ModeloptQuantStage",
    "autocast": _S + "tensorrt:AutoCastStage",
    "trt_engine": _S + "tensorrt:TensorRTBuildStage",
    "ov_engine": _S + "openvino:OpenVinoEngineStage",
}

_TRT_QUANT = ("Model Optimizer {} Q/DQ U-Net calibrated on the pipeline, fp16 elsewhere, strongly typed TensorRT "
              "engines")
PLANS = {  # (backend, precision) -> (stages, note)
    ("onnxruntime", "fp32"): (("assets", "export", "ort_engine"),
                              "ONNX export, ORT graph optimization for the chosen provider"),
    ("onnxruntime", "int8"): (("assets", "export", "int8", "ort_engine"),
                              "static QDQ int8 U-Net calibrated on the pipeline; dynamic int8 elsewhere only where it "
                              "pays"),
    ("onnxruntime", "fp16"): (("assets", "export", "fp16", "ort_engine"),
                              "fp16 for the CUDA/TensorRT providers; VAE fp32; NaN/black guard"),
    ("torch", "fp32"): (("assets", "torch_save"), "PyTorch eager reference"),
    ("torch", "bf16"): (("assets", "torch_save"), "PyTorch eager in bfloat16 (fp32 I/O)"),
    ("tensorrt", "fp32"): (("assets", "export", "trt_engine"),
                           "ONNX export, strongly typed fp32 TensorRT engines (TF32 off)"),
    ("tensorrt", "fp16"): (("assets", "export", "autocast", "trt_engine"),
                           "ONNX export, Model Optimizer AutoCast to fp16, strongly typed TensorRT engines"),
    ("tensorrt", "int8"): (("assets", "export", "modelopt", "autocast", "trt_engine"), _TRT_QUANT.format("int8")),
    ("tensorrt", "fp8"): (("assets", "export", "modelopt", "autocast", "trt_engine"), _TRT_QUANT.format("fp8")),
    ("openvino", "fp32"): (("assets", "export", "ov_engine"), "ONNX export, OpenVINO IR compiled for the CPU in f32"),
    ("openvino", "bf16"): (("assets", "export", "ov_engine"),
                           "ONNX export, OpenVINO IR compiled for the CPU in bf16 (CPUs with AVX512_BF16 or AMX)"),
    ("openvino", "int8"): (("assets", "export", "int8", "ov_engine"),
                           "diffaccel's calibrated int8 Q/DQ U-Net compiled by OpenVINO, float parts in bf16 where the "
                           "CPU has it"),
}


def plans() -> dict:
    """{(Backend, Precision): {"stages": [stage names], "note": str}}."""
    from diffaccel.optimize.config import Backend, Precision

    return {(Backend(b), Precision(p)): {"stages": list(s), "note": n} for (b, p), (s, n) in PLANS.items()}


def stage_class(name: str):
    module, _, cls = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def stages_for(backend, precision) -> list:
    """The stage classes of a plan, in order (imported now)."""
    return [stage_class(n) for n in PLANS[(str(backend), str(precision))][0]]


def supported_pairs() -> str:
    return ", ".join(f"{b}/{p}" for b, p in PLANS)
