"""A description of the machine a measurement ran on, recorded with every result."""
from __future__ import annotations

import os
import platform


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
    return {"model": model, "logical_cores": os.cpu_count(), "flags": [f for f in wanted if f in flags],
            "amx": "amx_tile" in flags}


def gpu_info() -> "dict | None":
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        p = torch.cuda.get_device_properties(0)
        return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 2**30, 1)}
    except Exception:  # a broken CUDA setup must not break a CPU measurement
        return None


def host_info() -> dict:
    import torch

    from diffaccel.optimize.artifact.manifest import tool_versions

    info = {"cpu": cpu_info(), "gpu": gpu_info(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "os": platform.platform(), "tools": tool_versions()}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def describe_cpu(info: dict) -> str:
    """The CPU line a speed measurement is printed with: model, cores, ISA flags and whether it has AMX.

    >>> describe_cpu({"cpu": {"model": "AMD EPYC", "logical_cores": 2, "flags": ["avx512f", "avx512_bf16"]}})
    'AMD EPYC, 2 logical cores; ISA: avx512f, avx512_bf16; AMX: no'
    """
    cpu = info["cpu"]
    amx = cpu.get("amx", "amx_tile" in cpu["flags"])
    return (f"{cpu['model']}, {cpu['logical_cores']} logical cores; ISA: {', '.join(cpu['flags']) or 'no AVX2'}; "
            f"AMX: {'yes' if amx else 'no'}")


def describe(info: dict) -> str:
    cpu = info["cpu"]
    gpu = info.get("gpu")
    text = f"{cpu['model']} ({cpu['logical_cores']} logical cores; {', '.join(cpu['flags']) or 'no AVX-512'})"
    if gpu:
        text += f"; GPU {gpu['name']} (sm {gpu['compute_capability']})"
    return text + f"; torch threads {info['torch_threads']}"
