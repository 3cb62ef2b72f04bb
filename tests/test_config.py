import pytest

from diffaccel.optimize import OptimizeConfig
from diffaccel.optimize.artifact.keys import stable_hash as config_hash
from diffaccel.optimize.config import Backend, Precision, ShapeRange


def test_enums_are_strings():
    assert Precision.INT8 == "int8" and str(Backend.TORCH) == "torch"


@pytest.mark.parametrize("kw,match", [
    ({"backend": "coreml"}, "unknown backend 'coreml'; choose one of: onnxruntime, torch, tensorrt, openvino"),
    ({"precision": "int4"}, "unknown precision 'int4'"),
    ({"provider": "rocm"}, "unknown provider 'rocm'"),
    ({"graph_level": "max"}, "unknown graph level"),
])
def test_bad_values_name_the_allowed_ones(kw, match):
    with pytest.raises(ValueError, match=match):
        OptimizeConfig(**kw)


def test_unsupported_pair_lists_supported_pairs():
    with pytest.raises(ValueError, match="supported backend/precision pairs: .*onnxruntime/fp32"):
        OptimizeConfig(backend="torch", precision="fp8")


def test_shape_range_parse():
    assert ShapeRange.parse("2", "256-512", None) == ShapeRange(batch=(2, 2), height=(256, 512), width=None)
    with pytest.raises(ValueError, match="bad batch"):
        ShapeRange.parse("a-b")
    with pytest.raises(ValueError, match="min <= max"):
        ShapeRange.parse("4-2")


def test_config_hash_is_stable_and_sensitive():
    a = OptimizeConfig()
    assert config_hash(a) == config_hash(OptimizeConfig())
    assert config_hash(a) != config_hash(OptimizeConfig(opset=17))
