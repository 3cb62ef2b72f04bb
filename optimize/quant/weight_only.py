"""Weight-only quantization (``--precision w8a16 | w4a16``): int8 or int4 weights, activations and compute in 16 bits
(bf16 where the CPU has it), no calibration — what fits models whose weights are the problem (a 12B transformer is
48 GB in fp32, 12 GB in int8, 6 GB in int4).

On OpenVINO it is NNCF's data-free weight compression (``nncf.compress_weights``) of the converted IR: ``w8a16``
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
def _quiet():
    """NNCF's tables and progress bars off for one call (the build prints its own progress); restored after."""
    logger = logging.getLogger("nncf")
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
