"""int8 for ONNX Runtime: static QDQ quantization of the U-Net, calibrated on the real pipeline's inputs; the text
encoder and VAE are quantized only where a measurement says it pays.

Defaults keep in float what costs quality and gains no speed (each family's ``KEEP_FLOAT``, documented there: a U-Net's
timestep MLP and first and last convs, a diffusion transformer's adaLN modulation and final projection); users add
patterns with ``--keep-fp32`` (matched against each node's module path, e.g. ``down_blocks.0.resnets.0.conv1``).
Everything is seeded; the same QuantConfig on the same source gives a byte-identical model.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

from diffaccel.optimize.artifact.files import TMP_PREFIX
from diffaccel.optimize.quant.calibration import CalibrationReader, write_range_cache
from diffaccel.optimize.quant.entropy import ENTROPY_BINS
from diffaccel.optimize.artifact.errors import DiffaccelError


QUANT_OPS = ("Conv", "MatMul", "Gemm")
ALGORITHM_VERSION = 5      # part of the quantize stage's key: bump when what a config produces changes (5: the
#                            keep-float patterns match dynamo exports, whose module paths pre-processing used to lose)


def node_scope(node) -> str:
    """The torch module path a node came from (``down_blocks.0.resnets.0.conv1``), for both exporters."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            path = scopes[-2] if len(scopes) > 1 else scopes[-1]
            return re.sub(r"^model\.?", "", path)
    parts = [p for p in node.name.split("/") if p]          # legacy: /model/down_blocks.0/resnets.0/conv1/Conv
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts[:-1]) if len(parts) > 1 else node.name


def excluded_nodes(model, patterns) -> list:
    regexes = [re.compile(p) for p in patterns]
    return sorted(n.name for n in model.graph.node
                  if n.op_type in QUANT_OPS and any(r.search(node_scope(n)) for r in regexes))


def attention_score_matmuls(model, depth: int = 3) -> list:
    """MatMuls whose output reaches a Softmax through at most ``depth`` elementwise ops (the QK^T of attention).

    Kept in float on purpose: with their outputs quantized, ONNX Runtime fuses DequantizeLinear -> Softmax ->
    QuantizeLinear into QLinearSoftmax, which on the SD 1.5 U-Net (256x256, one thread) took 200 ms per step against
    87 ms for the float Softmax; keeping these MatMuls float made the whole int8 U-Net 2.68x fp32 instead of 2.19x
    at the same error (reproduce: diffaccel microbench --variants onnxruntime/int8,onnxruntime/int8+int8-scores).
    """
    consumers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reaches_softmax(node) -> bool:
        frontier = list(node.output)
        for _ in range(depth):
            nxt = []
            for t in frontier:
                for c in consumers.get(t, []):
                    if c.op_type == "Softmax":
                        return True
                    if c.op_type in ("Mul", "Add", "Div", "Where", "Cast"):
                        nxt += list(c.output)
            frontier = nxt
        return False

    return sorted(n.name for n in model.graph.node if n.op_type == "MatMul" and reaches_softmax(n))


def _method(quant):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[str(quant.method)]


def preprocess(src: Path, dst: Path, *, external: bool) -> Path:
    """ONNX Runtime's recommended pre-processing (ONNX shape inference and graph clean-up), so the quantizer sees
    tensor shapes and fused patterns. Symbolic shape inference is skipped: it gives up on exported U-Nets anyway,
    doubles peak memory (14 GB instead of 7 GB on SD 1.5) and dumps debug files into the working directory.

    Models with external data go through the same steps as ``quant_pre_process`` (ORT's basic graph optimizations,
    then ONNX shape inference on the file) without ever loading their weights into Python: its final load-and-save
    held two copies of SD 1.5's U-Net (7.0 GB peak); here the optimized weights file is renamed into place."""
    if not external:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(src), str(dst), skip_optimization=False, skip_symbolic_shape=True)
        return dst
    import os

    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import _get_all_tensors
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=TMP_PREFIX + "pre-") as tmp:
        optimized, inferred = Path(tmp) / "optimized.onnx", Path(tmp) / "inferred.onnx"
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(optimized)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.enable_cpu_mem_arena = False
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        onnx.shape_inference.infer_shapes_path(str(optimized), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
        add_pre_process_metadata(model)
        data_name = dst.name + ".data"
        for t in _get_all_tensors(model):
            for e in t.external_data:
                if e.key == "location":
                    e.value = data_name
        os.replace(Path(tmp) / "optimized.onnx.data", dst.with_name(data_name))
        onnx.save_model(model, str(dst))
    return dst


def weight_bits(quant) -> "tuple[int, str]":
    """(bits, why) of the int8 weights: ``--int8-weights`` 8bit or 7bit as given; ``auto`` is a rule on the build
    machine's CPU, never a timing: 7 where its int8 kernels saturate 8-bit weight products (x86 without VNNI/AMX,
    see :mod:`diffaccel.engines.backends.cpu`), else 8.

    >>> from diffaccel.optimize.config import QuantConfig
    >>> weight_bits(QuantConfig(int8_weights="7bit"))
    (7, 'set: --int8-weights 7bit')
    """
    from diffaccel.engines.backends.cpu import int8_saturates

    if quant.int8_weights != "auto":
        return int(quant.int8_weights[0]), f"set: --int8-weights {quant.int8_weights}"
    if int8_saturates():
        return 7, "auto: this CPU has no VNNI/AMX, so 8-bit weight products would saturate in its int8 kernels"
    return 8, "auto: this CPU accumulates int8 products in 32 bits (VNNI/AMX)"


def quantize_static_qdq(src: Path, dst: Path, samples: list, quant, *, external: bool, keep_float: dict,
                        scoped: "Path | None" = None, extra_exclude: tuple = (), cache: "Path | None" = None,
                        float_attention_scores: bool = True, progress=None) -> dict:
    """QDQ int8 (uint8 activations, int8 per-channel weights: the U8S8 layout ORT recommends), the weights in 7 bits
    where :func:`weight_bits` says the kernels would saturate 8. ``keep_float`` and ``--keep-fp32`` patterns are
    matched against module paths read from ``scoped`` (the exported model: ORT's pre-processing, which made ``src``,
    drops the nodes' metadata but keeps their names)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    names = {n.name for n in model.graph.node}
    patterns = tuple(keep_float) + tuple(quant.keep_fp32)
    kept = excluded_nodes(onnx.load(str(scoped), load_external_data=False) if scoped else model, patterns)
    scores = attention_score_matmuls(model) if float_attention_scores else []
    exclude = sorted((set(kept) & names) | set(scores) | set(extra_exclude))
    quantized = [n.name for n in model.graph.node if n.op_type in QUANT_OPS and n.name not in set(exclude)]
    if not quantized:
        raise DiffaccelError("every Conv/MatMul/Gemm of the denoiser is excluded by --keep-fp32; loosen the pattern")
    bits, why = weight_bits(quant)
    # (not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it discards collected ranges instead of merging them)
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": quant.percentile}
    with tempfile.TemporaryDirectory(prefix="diffaccel-calib-", dir=Path(dst).parent) as tmp:
        cache = Path(cache) if cache else Path(tmp) / "calibration.json"
        if not cache.is_file():      # ranges collected one sample at a time (memory: see calibration.collect)
            if str(quant.method) == "entropy":     # ORT's own entropy path is min-max: see entropy
                from diffaccel.optimize.quant.entropy import write_entropy_cache

                write_entropy_cache(src, samples, QUANT_OPS, cache, external=external, skip_nodes=exclude)
            else:
                write_range_cache(src, samples, QUANT_OPS, cache, method=str(quant.method),
                                  percentile=quant.percentile, external=external, skip_nodes=exclude,
                                  progress=progress)
        quantize_static(str(src), str(dst), CalibrationReader(samples), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANT_OPS), per_channel=quant.per_channel, reduce_range=bits == 7,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        use_external_data_format=external, calibrate_method=_method(quant), extra_options=extra,
                        calibration_cache_path=str(cache))
    return {"method": "static-qdq-u8s8", "calibration": str(quant.method), "per_channel": quant.per_channel,
            "weight_bits": bits, "weight_bits_reason": why,
            **({"entropy_bins": ENTROPY_BINS} if str(quant.method) == "entropy" else {}),
            "calibration_samples": len(samples), "kept_float": exclude, "quantized_nodes": len(quantized),
            "attention_scores_kept_float": len(scores),
            "default_keep_fp32": dict(keep_float), "user_keep_fp32": list(quant.keep_fp32)}
