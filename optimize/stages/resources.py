"""What a build may cost the host: the pre-flight check that refuses, before any work, a build whose estimated peak
resident memory the machine cannot hold. (Each stage's measured peak is recorded beside its time by ``optimize()``;
see :mod:`diffaccel.optimize.memory`.)
"""
from __future__ import annotations

from pathlib import Path

# ---- the pre-flight check: refuse a build the machine cannot hold, before any work ----------------------------------
GB = 1e9
BASE_BYTES = 0.5 * GB      # Python, torch, ONNX Runtime and their libraries (random:sd15's assets stage: 4.74 GB
                           # with its 4.26 GB pipeline loaded)

# What a stage holds at its peak, beyond BASE_BYTES. A build holds one copy of a model's weights at a time: the
# export reads each component's model alone where the source allows (a diffusers folder or a recipe; otherwise it
# holds the pipeline and lets it go before the largest component), later stages check engines against PyTorch
# outputs the export recorded, calibration statistics are merged one sample at a time. So peaks are the whole
# pipeline while it is loaded (assets, calibration capture), or one component's weights beside the activations of
# one step. Activations are measured in attention-score tensors (``family.attention_bytes``: the largest score
# tensor at the opt size with CFG): an unfused ONNX graph materialises several, ONNX Runtime's fused CPU attention
# (the engine, and the export check at the opt point) none, leaving the other feature maps; the VAE's
# full-resolution feature maps grow with the latent area. Fitted on the SD 1.5 architecture (random:sd15: 4.26 GB
# pipeline, 3.44 GB U-Net, 1.07 GB attention scores at 512x512; 2-core AMD EPYC, 24 GB; docs/memory.md).
REFERENCE_LATENT_AREA = 64 * 64
SMALL_ITEM_BYTES = 2.6 * GB        # export/check of a VAE or text encoder beside the pipeline, at the reference area
SMALL_ALONE_BYTES = 2.6 * GB       # the same, read alone (VAE decoder with BASE_BYTES: 3.0 GB; SDXL's at 4x the area 11.0)
CAPTURE_BYTES = 1.0 * GB           # PyTorch sampling calibration prompts beside the pipeline (fp32, SDPA)
ACTIVATION_FACTORS = {             # attention-score tensors' worth of activations one ONNX Runtime step holds
    "export": 3.2,                 # unoptimized, unfused graph at the opt point
    "engine": 3.2,
    "quantize": 2.85,              # calibration session (priority order: one sample's live tensors; 6.98 GB)
}
# Attention fused (ONNX Runtime's CPU kernel; the export check's opt point): what is left grows with the weights
# (the exporter's and the graph optimizer's working copies) and with the feature maps. Fitted on random:sd15
# (U-Net items: export 5.31, engine 5.43 GB) and random:sdxl (13.9 GB both; 10.3 GB U-Net, 1.34 GB scores).
FUSED_WEIGHT_SHARE, FUSED_ATTENTION_FACTOR = 0.22, 0.65
QUANTIZER_FACTOR = 1.35            # quantize_static: the float model loaded plus its int8 weights, x largest
# Weights mapped from disk (fp32 safetensors, recipes written to disk; build sessions without pre-packing): file-backed
# pages the kernel can drop, so what the machine must hold is the anonymous rest. In assets and export the weight
# terms shrink to MAPPED_WEIGHT_SHARE (working copies the exporter still makes); the engine stage's graph optimizer
# rewrites weights into new (anonymous) tensors, so there they shrink less. Activations stay. Fitted on SD 1.5 fp32
# from an fp32 folder (anonymous peaks: export 2.44 GB, engine 4.18 GB) and SDXL fp32 from random:sdxl (whole build
# 7.93 GB, the VAE decoder's export); the SDXL estimate stays about 3 GB above what it measured.
MAPPED_WEIGHT_SHARE = 0.3
MAPPED_ENGINE_SHARE = 0.87


def _stage_need(name: str, total: float, largest: float, attention: float, area_ratio: float, alone: bool = False,
                fused: bool = False, mapped: bool = False) -> float:
    if mapped and name in ("assets", "export", "engine"):
        share = MAPPED_ENGINE_SHARE if name == "engine" else MAPPED_WEIGHT_SHARE
        total, largest = share * total, share * largest
    if fused and name in ("export", "engine"):
        act = FUSED_WEIGHT_SHARE * largest + FUSED_ATTENTION_FACTOR * attention
    else:
        act = ACTIVATION_FACTORS.get(name, ACTIVATION_FACTORS["engine"]) * attention
    if name == "assets":
        return total
    if name == "export":
        if alone:
            return max(SMALL_ALONE_BYTES * area_ratio, largest + act)
        return max(total + SMALL_ITEM_BYTES * area_ratio, largest + act)
    if name == "quantize":
        return max(total + CAPTURE_BYTES * area_ratio, largest + act, QUANTIZER_FACTOR * largest)
    if name == "engine":
        return largest + act
    return total + largest + act           # stages not measured yet: the pipeline beside a checked engine


def available_memory() -> tuple:
    """(bytes this process can still use, where that limit comes from): the smaller of the memory the kernel reports
    available and what the cgroup (container) limit leaves."""
    import psutil

    avail, where = psutil.virtual_memory().available, "available system memory"
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) - usage < avail:
            avail, where = int(limit) - usage, f"the container's memory limit ({int(limit) / GB:.1f} GB)"
    return avail, where


def estimate_peak(stage_names, total: int, largest: int, attention: int = 1_073_741_824,
                  latent_area: int = REFERENCE_LATENT_AREA, alone: bool = False, fused: bool = False,
                  mapped: bool = False) -> tuple:
    """(estimated peak RSS in bytes, the stage it happens in) of a build from its stages' names, the fp32 weight
    bytes of the whole pipeline (``total``) and of the largest component it builds (``largest``), the largest
    attention-score tensor at the opt size (``attention``, see the family's ``attention_bytes``) and the opt latent
    area (height x width); ``alone``: the source's models can be read one at a time; ``fused``: the ONNX Runtime
    engine fuses attention (CPU); ``mapped``: the weights are read memory-mapped (the estimate is then of the
    anonymous memory, what the machine must hold). The calibration size does not enter: statistics are merged one
    sample at a time.

    >>> need, stage = estimate_peak(["assets", "export", "quantize", "engine"], 4.26e9, 3.44e9)
    >>> stage, round(need / 1e9, 1)
    ('export', 7.4)
    >>> need, stage = estimate_peak(["assets", "export", "engine"], 4.26e9, 3.44e9, alone=True, fused=True)
    >>> stage, round(need / 1e9, 1)
    ('export', 5.4)
    """
    best = (BASE_BYTES, "")
    for name in stage_names:
        need = BASE_BYTES + _stage_need(name, total, largest, attention, latent_area / REFERENCE_LATENT_AREA,
                                        alone, fused, mapped)
        best = max(best, (need, name))
    return best


# ---- the pre-flight disk check: what the build will write, against the free space where it writes ----------------
DISK_MARGIN = 1.1                  # the graphs, references and manifests beside the weights, and rounding
_WRITES = {"export": 1.0, "quantize": 0.25, "weights": 1.0, "fp16": 0.5}   # weight bytes written per fp32 byte
# ("weights", weight-only MatMulNBits: at most the fp32 size, since convolutions stay fp32)


def estimate_disk(stage_names, weights: dict, denoiser: str) -> int:
    """Bytes a build writes into its OUT folder: per component (``weights``: fp32 weight bytes), a copy of its
    weights for each stage that writes one, at the precision it has by then (the export in fp32; ``quantize``
    writes the denoiser in int8; ``fp16`` every component in half precision; the engine at the current one).

    >>> round(estimate_disk(["assets", "export", "quantize", "engine"], {"unet": 10e9, "vae_decoder": 1e9},
    ...                     "unet") / 1e9, 1)
    18.7
    """
    total = 0.0
    for comp, w in weights.items():
        factor, written = 1.0, 0.0
        for name in stage_names:
            if name == "quantize" and comp != denoiser:
                continue
            if name in _WRITES:
                factor = _WRITES[name]
                written += factor
            elif name == "engine":
                written += factor
        total += w * written
    return int(total * DISK_MARGIN)


def check_disk(stage_names, weights: dict, denoiser: str, out: Path) -> dict:
    """Refuse in one line (needed, free, where, what lowers it) a build whose files the disk under ``out`` cannot
    hold; else return the estimate for the manifest."""
    import shutil

    from diffaccel.optimize.artifact.errors import MemoryBudgetError

    need = estimate_disk(stage_names, weights, denoiser)
    where = next(p for p in (Path(out).resolve(), *Path(out).resolve().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise MemoryBudgetError(
            f"this build writes about {need / GB:.1f} GB ({len(weights)} component(s), every stage's copy of the "
            f"weights) but {where} has {free / GB:.1f} GB free; build fewer --components at a time, write OUT on a "
            f"larger disk, or free space there; --no-memory-check builds anyway")
    return {"estimated_bytes": need, "free_bytes": int(free), "where": str(where)}


def parse_size(text) -> int:
    """Bytes from ``"16G"``, ``"512M"``, ``"2.5GB"`` or a plain number of bytes.

    >>> parse_size("16G"), parse_size("512M"), parse_size(1000)
    (16000000000, 512000000, 1000)
    """
    t = str(text).strip().upper().removesuffix("B")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        value = -1
    if value <= 0:
        raise ValueError(f"memory size {text!r} is not a size; write it like 16G or 512M")
    return int(value)


def check_memory(stage_names, total: int, largest: int, attention: int = 1_073_741_824,
                 limit: "int | None" = None, latent_area: int = REFERENCE_LATENT_AREA, alone: bool = False,
                 fused: bool = False, mapped: bool = False) -> dict:
    """Refuse (one line: needed, available, what lowers it) a build whose estimated peak exceeds what this machine
    (or ``limit``) gives; else return the estimate for the manifest."""
    from diffaccel.optimize.artifact.errors import MemoryBudgetError

    need, stage = estimate_peak(stage_names, total, largest, attention, latent_area, alone, fused, mapped)
    have, where = available_memory()
    if limit is not None and limit < have:
        have, where = limit, "--memory-limit"
    if need > have:
        raise MemoryBudgetError(
            f"this build needs about {need / GB:.1f} GB of memory (its {stage or 'load'} stage, largest component "
            f"{largest / GB:.1f} GB in fp32) but {where} gives {have / GB:.1f} GB; lower it with --height/--width "
            f"(a smaller typical size: activations), --components (one at a time), or close other programs; "
            f"--no-memory-check builds anyway")
    return {"estimated_peak_bytes": int(need), "stage": stage, "available_bytes": int(have), "limit": where,
            "weights": "mapped (the estimate is of anonymous memory)" if mapped else "loaded"}
