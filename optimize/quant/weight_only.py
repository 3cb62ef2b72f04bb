"""Weight-only quantization (``--precision w8a16 | w4a16``): int8 or int4 weights, activations and compute in 16 bits
(bf16 where the CPU has it), no calibration — what fits models whose weights are the problem (a 12B transformer is
48 GB in fp32, 12 GB in int8, 6 GB in int4).

On ONNX Runtime it is its ``MatMulNBits`` (``onnxruntime.quantization.matmul_nbits_quantizer``): every MatMul with a
constant weight gets 8- or 4-bit asymmetric weights in blocks of :data:`GROUP_SIZE` input channels; convolutions and
the activation-by-activation MatMuls of attention stay fp32, and on the CPU provider, which has no bf16 kernels, so
does the compute (recorded). On OpenVINO it is NNCF's data-free weight compression (``nncf.compress_weights``) of the converted IR: ``w8a16``
asymmetric int8 per output channel; ``w4a16`` asymmetric int4 in groups of :data:`GROUP_SIZE` input channels (a layer
whose channels the group does not divide gets the largest power of two that does, at least 16; NNCF keeps the
embeddings and the last layer at int8, its "backup" mode). The denoiser and the text encoders are compressed; the VAE
stays float (small, and its pixels are the image). What each layer got is counted from the compressed graph and
recorded in the manifest.

>>> compresses("w4a16", "unet"), compresses("w4a16", "vae_decoder"), compresses("fp32", "unet")
(True, False, False)
>>> weight_kind("u4"), weight_kind("i8"), weight_kind("f32")
('int4', 'int8', 'float')
"""
from __future__ import annotations

import contextlib
import io
import logging

from diffaccel.optimize.artifact.errors import BackendUnavailableError

GROUP_SIZE = 128
MIN_GROUP_SIZE = 16
FLOAT_COMPONENTS = ("vae_decoder", "vae_encoder")
PRECISIONS = ("w8a16", "w4a16")
_WEIGHTED = ("MatMul", "Convolution", "GroupConvolution", "Gather")


def compresses(precision: str, component: str) -> bool:
    return str(precision) in PRECISIONS and component not in FLOAT_COMPONENTS


def entry_precision(precision: str, component: str, compute: str = "fp32") -> dict:
    """The ``precision`` a component's manifest entry records in a weight-only build: the weight-only one where its
    weights were compressed, else the float ``compute`` it runs in (the VAE); {} for other builds (the plan's).

    >>> entry_precision("w4a16", "unet"), entry_precision("w4a16", "vae_decoder", "bf16")
    ({'precision': 'w4a16'}, {'precision': 'bf16'})
    >>> entry_precision("int8", "unet")
    {}
    """
    if str(precision) not in PRECISIONS:
        return {}
    return {"precision": str(precision) if compresses(precision, component) else compute}


def weight_kind(element_type: str) -> str:
    t = str(element_type).lower()
    return "int4" if t in ("u4", "i4", "nf4") else "int8" if t in ("u8", "i8") else "float"


def _nncf():
    try:
        import nncf
    except ImportError:
        raise BackendUnavailableError("weight-only precisions need NNCF, which is not installed; "
                                      'pip install -e ".[openvino]" adds it') from None
    return nncf


def compress_openvino(model, precision: str) -> tuple:
    """(compressed ov.Model, facts for the manifest) for ``precision`` (w8a16 | w4a16)."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    if precision == "w8a16":
        settings = {"mode": nncf.CompressWeightsMode.INT8_ASYM}
    else:
        settings = {"mode": nncf.CompressWeightsMode.INT4_ASYM, "group_size": GROUP_SIZE, "ratio": 1.0,
                    "advanced_parameters": AdvancedCompressionParameters(
                        group_size_fallback_mode=GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=MIN_GROUP_SIZE)}
    with _quiet():
        compressed = nncf.compress_weights(model, **settings)
    facts = {"method": "nncf.compress_weights (data-free)", "nncf": nncf.__version__,
             "mode": str(settings["mode"].value), "group_size": settings.get("group_size"),
             "ratio": settings.get("ratio"), "layers": layer_kinds(compressed)}
    return compressed, facts


@contextlib.contextmanager
def _quiet(library: str = "nncf"):
    """A library's tables, progress bars and INFO lines off for one call (the build prints its own progress);
    restored after."""
    logger = logging.getLogger(library)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def layer_kinds(model) -> dict:
    """``{"int4": n, "int8": n, "float": n}``: the weight kind of each MatMul/Convolution/Gather whose weight is a
    constant (followed back through its decompression: Convert, Subtract, Multiply, Reshape)."""
    counts = {"int4": 0, "int8": 0, "float": 0}
    for op in model.get_ops():
        if op.get_type_name() not in _WEIGHTED:
            continue
        node = op.input_value(0 if op.get_type_name() == "Gather" else 1).get_node()
        for _ in range(6):
            if node.get_type_name() == "Constant" or node.get_input_size() == 0:
                break
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant":
            counts[weight_kind(node.get_element_type().get_type_name())] += 1
    return counts


def compress_onnx(src, dst, precision: str) -> dict:
    """Write ``src`` (an ONNX model) to ``dst`` with its constant-weight MatMuls as ``MatMulNBits`` (8 or 4 bits,
    blocks of :data:`GROUP_SIZE`); returns the facts for the manifest."""
    import collections

    import onnx
    import onnxruntime
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from diffaccel.optimize.export.onnx_export import EXTERNAL_DATA_THRESHOLD

    bits = 8 if precision == "w8a16" else 4
    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=GROUP_SIZE, is_symmetric=False)
    with _quiet("onnxruntime"):
        quantizer.process()
    out = quantizer.model.model
    ops = collections.Counter(n.op_type for n in out.graph.node)
    # (the proto's own ByteSize() cannot be asked past protobuf's 2 GB: the weights' bytes decide)
    big = sum(len(t.raw_data) for t in out.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(out, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)
    return {"method": "onnxruntime MatMulNBits (data-free)", "onnxruntime": onnxruntime.__version__, "bits": bits,
            "group_size": GROUP_SIZE, "symmetric": False, "compute": "fp32 (the CPU provider has no bf16 kernels)",
            "layers": {f"int{bits}": ops["MatMulNBits"], "float": ops["Conv"] + ops["Gemm"]},
            "note": "convolutions and attention's activation MatMuls stay fp32"}
