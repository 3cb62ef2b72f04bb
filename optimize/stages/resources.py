"""What a build costs the host: each stage's peak resident memory (recorded in the manifest beside its time).

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
