"""Closed sets (str Enums) and small frozen configs shared by every stage.

>>> Precision("int8") is Precision.INT8
True
>>> ShapeRange.parse(batch="1-4", height="256-512", width="512").height
(256, 512)
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:  # "int8", not "Precision.INT8"
        return self.value

    @classmethod
    def parse(cls, value: "str | _StrEnum", what: str):
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown {what} {value!r}; choose one of: {allowed}") from None


class Backend(_StrEnum):
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TENSORRT = "tensorrt"


class Precision(_StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"


class Exporter(_StrEnum):
    DYNAMO = "dynamo"            # torch.export-based exporter (torch.onnx.export(dynamo=True))
    TORCHSCRIPT = "torchscript"  # legacy tracing exporter (torch.onnx.export(dynamo=False))


def _parse_range(text: "str | int | tuple[int, int] | None", what: str) -> "tuple[int, int] | None":
    if text is None:
        return None
    if isinstance(text, tuple):
        lo, hi = text
    elif isinstance(text, int):
        lo = hi = text
    else:
        parts = str(text).replace(":", "-").split("-")
        try:
            nums = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise ValueError(f"bad {what} {text!r}: give a number (512) or a range (256-768)") from None
        if len(nums) not in (1, 2):
            raise ValueError(f"bad {what} {text!r}: give a number (512) or a range (256-768)")
        lo, hi = nums[0], nums[-1]
    if lo < 1 or hi < lo:
        raise ValueError(f"bad {what} range {lo}-{hi}: need 1 <= min <= max")
    return (int(lo), int(hi))


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    """The image batch and pixel sizes an artifact must serve. ``None`` means "the model's default"."""

    batch: tuple[int, int] = (1, 4)
    height: "tuple[int, int] | None" = None
    width: "tuple[int, int] | None" = None

    def __post_init__(self):
        for name in ("height", "width"):
            rng = getattr(self, name)
            if rng is not None and (rng[0] % 8 or rng[1] % 8):
                raise ValueError(f"bad {name} range {rng[0]}-{rng[1]}: image sizes must be multiples of 8")

    @classmethod
    def parse(cls, batch=None, height=None, width=None) -> "ShapeRange":
        return cls(
            batch=_parse_range(batch, "batch") or (1, 4),
            height=_parse_range(height, "height"),
            width=_parse_range(width, "width"),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_hash(obj: Any) -> str:
    """A stable short hash of a JSON-able config (dataclasses and enums included)."""
    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, enum.Enum):
            return o.value
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        return str(o)

    text = json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
