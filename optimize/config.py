"""Closed sets (str Enums) and small frozen configs shared by every stage.

>>> Precision("int8") is Precision.INT8
True
>>> ShapeRange.parse(batch="1-4", height="256-512", width="512").height
(256, 512)
"""
from __future__ import annotations

import dataclasses
import enum


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
    OPENVINO = "openvino"


class Precision(_StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"
    W8A16 = "w8a16"              # weight-only: int8 weights, 16-bit (bf16) compute where the CPU has it
    W4A16 = "w4a16"              # weight-only: int4 weights in groups, 16-bit (bf16) compute


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


def check_guidance(value, what: str = "guidance") -> float:
    """A classifier-free guidance scale as a float: finite and >= 0 (``off`` is 0).

    >>> check_guidance("off"), check_guidance(7.5)
    (0.0, 7.5)
    >>> check_guidance("-1")
    Traceback (most recent call last):
    ...
    ValueError: bad guidance '-1': give a scale >= 0, e.g. 7.5 (off = 0: no classifier-free guidance)
    """
    try:
        scale = 0.0 if str(value).strip().lower() == "off" else float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if not 0.0 <= scale < float("inf"):
        raise ValueError(f"bad {what} {value!r}: give a scale >= 0, e.g. 7.5 (off = 0: no classifier-free guidance)")
    return scale


class CalibMethod(_StrEnum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """int8 quantization with calibration data captured from the real pipeline (see diffaccel.optimize.quant.ort_static).

    The same QuantConfig on the same source gives a byte-identical model."""

    calib_prompts: "str | None" = None   # a text file, one prompt per line (None: the shipped default prompts)
    calib_size: int = 8                  # prompts used
    calib_steps: int = 8                 # denoising steps captured per prompt
    calib_seed: int = 0
    guidance_scale: "float | None" = None  # guidance sampled at (None: the build's, OptimizeConfig.guidance)
    method: CalibMethod = CalibMethod.MINMAX
    percentile: float = 99.999
    per_channel: bool = True
    smoothquant: "float | None" = None   # SmoothQuant alpha (0..1) or None for off
    keep_fp32: tuple = ()                # node-name regexes kept in float (added to the documented defaults)
    quality_target: "float | None" = None  # PSNR (dB) the int8 U-Net must keep on calibration prompts
    attention_scores: "str | None" = None  # "float" | "int8": attention's QK^T MatMuls (None: the backend's default)
    int8_weights: str = "auto"           # "8bit" | "7bit" | "auto": 7-bit where this CPU's int8 saturates (no VNNI/AMX)
    dynamic_int8: tuple = ()             # components besides the U-Net given dynamic int8 MatMuls (): all float

    def __post_init__(self):
        object.__setattr__(self, "method", CalibMethod.parse(self.method, "calibration method"))
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))
        dynamic = self.dynamic_int8.split(",") if isinstance(self.dynamic_int8, str) else self.dynamic_int8
        object.__setattr__(self, "dynamic_int8", tuple(sorted({c.strip() for c in dynamic if c.strip()})))
        if self.calib_size < 1 or self.calib_steps < 1:
            raise ValueError("calib-size and calib-steps must be >= 1")
        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", check_guidance(self.guidance_scale, "calibration guidance"))
        if not 90.0 <= self.percentile < 100.0:
            raise ValueError(f"percentile {self.percentile} must be in [90, 100)")
        if self.attention_scores not in (None, "float", "int8"):
            raise ValueError(f"attention scores {self.attention_scores!r} must be float or int8")
        if self.int8_weights not in ("auto", "8bit", "7bit"):
            raise ValueError(f"int8 weights {self.int8_weights!r} must be auto, 8bit or 7bit")
        if self.smoothquant is not None and not 0.0 <= self.smoothquant <= 1.0:
            raise ValueError(f"smoothquant alpha {self.smoothquant} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class TensorRTConfig:
    """TensorRT builder settings (see diffaccel.optimize.stages.tensorrt)."""

    opt_level: int = 3                   # builder optimization level 0-5
    workspace_gb: "float | None" = None  # memory pool limit for tactics (None: TensorRT's default)
    timing_cache: "str | None" = None    # persisted timing cache file (None: ~/.cache/diffaccel/trt-timing.cache)
    static_shapes: bool = False          # build for the opt shapes only (enables CUDA graphs)
    cuda_graph: bool = False             # capture CUDA graphs at run time (static shapes only)

    def __post_init__(self):
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"TensorRT optimization level {self.opt_level} must be 0-5")
        if self.cuda_graph and not self.static_shapes:
            raise ValueError("CUDA graphs need static shapes: pass --static-shapes with --cuda-graph")
