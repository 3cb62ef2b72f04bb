"""What a build costs the host: each stage's peak resident memory (recorded in the manifest beside its time), and
the pre-flight check that refuses, before any work, a build whose estimated peak the machine cannot hold.

Linux keeps a process's peak RSS (``VmHWM``) and lets the process reset it (``/proc/self/clear_refs``, "5"), so the
peak of one stage is read without sampling threads. Elsewhere the process-lifetime peak is recorded instead, and the
record says so.

>>> with StagePeak() as p:
...     block = bytearray(64 << 20)          # touch 64 MiB
>>> p.peak_bytes >= 64 << 20, p.method in ("stage", "process")
(True, True)
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm(field: str) -> "int | None":
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak` (Linux), else since the process started."""
    hwm = _vm("VmHWM")
    if hwm is not None:
        return hwm
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc keeps them otherwise: after the U-Net's
    export the process stayed GBs above what it used). Call after letting go of a model."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc (macOS, musl): nothing to do
        pass


class StagePeak:
    """Measures the peak RSS of the block it wraps (``method`` "stage"), or the process's peak where the OS cannot
    reset it ("process")."""

    def __enter__(self):
        self.method = "stage" if reset_peak() else "process"
        self.peak_bytes = 0
        return self

    def __exit__(self, *exc):
        self.peak_bytes = peak_rss_bytes()
        return False

    def record(self) -> dict:
        return {"peak_rss_bytes": self.peak_bytes, "peak_rss_scope": self.method}


# ---- the pre-flight check: refuse a build the machine cannot hold, before any work ----------------------------------
GB = 1e9
BASE_BYTES = 0.5 * GB      # Python, torch, ONNX Runtime and their libraries (random:sd15's assets stage: 4.74 GB
                           # with its 4.26 GB pipeline loaded)

# Peak RSS of a stage beyond BASE_BYTES, in fp32 weight bytes: (of the whole pipeline, of its largest component
# built). A stage missing here holds the pipeline only. Export and engine stages also hold activations of the shape
# they trace and check at (the spec's opt latent size), so their factor grows with that area: fitted on the SD 1.5
# architecture (random:sd15, 3.44 GB U-Net, 4.26 GB pipeline; 2-core AMD EPYC, 24 GB; docs/memory.md): 17.70 GB
# (export) and 17.55 GB (engine) at the default 512x512 (latent 64x64), and 4.2 GB above the loaded pipeline for the
# U-Net alone at 256x256 (latent 32x32).
REFERENCE_LATENT_AREA = 64 * 64
STAGE_FACTORS = {
    "export": (1.0, (0.4, 3.4)),       # (whole pipeline, (largest: fixed part, part per reference latent area))
    "engine": (1.0, (0.4, 3.4)),
    "quantize": (1.0, (4.95, 0.0)),
}
# Today's int8 quantizer (ONNX Runtime's quantize_static) keeps every activation of every calibration sample, so its
# peak also grows with the calibration volume (samples x latent height x latent width). Anchors: 21.8 GB at the
# default 64 samples at 256x256 (latent 32x32, the reference volume below) and killed above 24.2 GB at 512x512
# (4x the volume); QUANTIZE_PER_VOLUME is the smallest slope that puts the second one above 24.2 GB (a lower bound).
REFERENCE_CALIB_VOLUME = 64 * 32 * 32
QUANTIZE_PER_VOLUME = 0.8 * GB


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


def estimate_peak(stage_names, total: int, largest: int, calib_volume: int = 0,
                  latent_area: int = REFERENCE_LATENT_AREA) -> tuple:
    """(estimated peak RSS in bytes, the stage it happens in) of a build from its stages' names, the fp32 weight
    bytes of the whole pipeline (``total``) and of the largest component it builds (``largest``), the opt latent area
    (height x width) it exports at, and for int8 the calibration volume (samples x latent height x latent width).

    >>> need, stage = estimate_peak(["assets", "export", "quantize", "engine"], 4.26e9, 3.44e9, 64 * 64 * 64)
    >>> stage, round(need / 1e9, 1)
    ('quantize', 24.2)
    >>> round(estimate_peak(["assets", "export", "engine"], 4.26e9, 3.44e9)[0] / 1e9, 1)
    17.8
    """
    best = (BASE_BYTES, "")
    for name in stage_names:
        whole, (fixed, per_area) = STAGE_FACTORS.get(name, (1.0, (0.0, 0.0)))
        need = BASE_BYTES + whole * total + (fixed + per_area * latent_area / REFERENCE_LATENT_AREA) * largest
        if name == "quantize":
            need += QUANTIZE_PER_VOLUME * max(0.0, calib_volume / REFERENCE_CALIB_VOLUME - 1)
        best = max(best, (need, name))
    return best


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


def check_memory(stage_names, total: int, largest: int, calib_volume: int = 0, limit: "int | None" = None,
                 latent_area: int = REFERENCE_LATENT_AREA) -> dict:
    """Refuse (one line: needed, available, what lowers it) a build whose estimated peak exceeds what this machine
    (or ``limit``) gives; else return the estimate for the manifest."""
    from diffaccel.optimize.artifact.errors import MemoryBudgetError

    need, stage = estimate_peak(stage_names, total, largest, calib_volume, latent_area)
    at_least = "at least " if stage == "quantize" and calib_volume > REFERENCE_CALIB_VOLUME else "about "
    have, where = available_memory()
    if limit is not None and limit < have:
        have, where = limit, "--memory-limit"
    if need > have:
        lower = ("--calib-size/--calib-steps (fewer calibration samples), " if stage == "quantize" else "")
        raise MemoryBudgetError(
            f"this build needs {at_least}{need / GB:.1f} GB of memory (its {stage or 'load'} stage, largest component "
            f"{largest / GB:.1f} GB in fp32) but {where} gives {have / GB:.1f} GB; lower it "
            f"with {lower}--components (one at a time), or close other programs; --no-memory-check builds anyway")
    return {"estimated_peak_bytes": int(need), "stage": stage, "available_bytes": int(have), "limit": where}
