"""What this CPU's int8 kernels do: x86 CPUs without VNNI (or AMX) multiply uint8 activations by int8 weights with an
instruction (``vpmaddubsw``) that adds pairs of products into 16 bits and *saturates* when they overflow; ONNX Runtime's
and OpenVINO's int8 kernels both use it there. With 7-bit weights (ONNX Runtime's ``reduce_range``) no pair can
overflow, so a model quantized that way computes the same on every x86 CPU; with 8-bit weights it is exact only where
VNNI/AMX accumulate in 32 bits (OpenVINO's "saturation issue", docs.openvino.ai pot_saturation_issue).

>>> isinstance(int8_saturates(), bool)
True
"""
from __future__ import annotations

import platform

EXACT_INT8 = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni")    # /proc/cpuinfo flags: 32-bit int8 dot products


def cpu_flags() -> set:
    """The CPU's feature flags (Linux), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_saturates() -> bool:
    """True on an x86 CPU whose int8 kernels saturate 8-bit weight products (no VNNI, no AMX)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_flags()
    return bool(flags) and not (flags & set(EXACT_INT8))


def warn_if_saturating(component: str, entry: dict, log) -> None:
    """Log once per load when ``entry`` (a manifest component) holds 8-bit int8 weights and this CPU's int8 kernels
    saturate them: its outputs drift from the parity the build checked on another CPU."""
    quant = entry.get("quantize") or {}
    if entry.get("precision") == "int8" and quant.get("weight_bits", 8) == 8 and "method" in quant \
            and quant["method"].startswith(("static", "dynamic")) and int8_saturates():
        log.warning("%s holds 8-bit int8 weights, which this CPU (no VNNI/AMX) saturates: expect larger errors than "
                    "the build measured; rebuild on this machine or with diffaccel optimize --int8-weights 7bit",
                    component)
