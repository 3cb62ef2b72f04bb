"""The build process's memory: hand freed memory back to the OS, and measure the peak resident memory (RSS) of a block
of work without touching the process's own high-water mark.

The kernel keeps one high-water mark per process (``VmHWM``; ``getrusage``'s ``ru_maxrss``): what ``/usr/bin/time
-v``, ``getrusage`` and CI report. It is never reset here. A block's peak (:class:`PeakWatch`) is

- the high-water mark itself when the block raised it (the process never held as much before): exact, and so the
  peak of a whole build is always exact, and no stage's recorded peak exceeds the process's;
- otherwise the largest RSS a sampler thread read (``/proc/self/statm`` every :data:`SAMPLE_SECONDS`, only while a
  block is watched), or at the block's start and end: a lower bound, since a spike inside one C call that holds the
  GIL and frees its memory before returning is not seen.

A build runs no child processes, so the process's own RSS is the build's.

>>> with PeakWatch() as w:
...     block = bytearray(64 << 20)
...     block[::4096] = b"x" * len(block[::4096])       # touch every page
>>> w.peak_bytes >= 64 << 20 and w.peak_bytes <= high_water_mark_bytes()
True
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time

SAMPLE_SECONDS = 0.02
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """This process's resident memory now."""
    return current_memory()[0]


def current_memory() -> tuple:
    """(resident bytes, anonymous resident bytes) now: resident minus the file-backed and shared pages, which for a
    build are weights mapped from safetensors or ONNX external-data files (the kernel can drop and re-read those)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * _PAGE, (int(fields[1]) - int(fields[2])) * _PAGE
    except OSError:                          # not Linux
        import psutil

        info = psutil.Process().memory_info()
        return info.rss, info.rss - getattr(info, "shared", 0)


_hwm_read = 0     # the highest high-water mark read so far in this process


def high_water_mark_bytes() -> int:
    """The most resident memory this process has held (Linux ``VmHWM``, else ``ru_maxrss``). The kernel's RSS
    counters are approximate (per-CPU batches), so one reading can fall a few hundred KB below an earlier one; this
    returns the highest reading so far, so it never goes down."""
    global _hwm_read
    reading = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    reading = int(line.split()[1]) * 1024
    except OSError:
        pass
    if reading is None:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reading = ru if sys.platform == "darwin" else ru * 1024
    _hwm_read = max(_hwm_read, reading)
    return _hwm_read


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


class _Sampler:
    """One daemon thread per process, running only while some :class:`PeakWatch` is open."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watches: list = []
        self._thread: "threading.Thread | None" = None

    def add(self, watch: "PeakWatch") -> None:
        with self._lock:
            self._watches.append(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="diffaccel-rss-sampler", daemon=True)
                self._thread.start()

    def remove(self, watch: "PeakWatch") -> None:
        with self._lock:
            self._watches.remove(watch)

    def observe(self, reading: tuple) -> None:
        """Count one (RSS, anonymous) reading in every open watch (a block's reading is also its enclosing
        blocks')."""
        with self._lock:
            self._count(reading)

    def _count(self, reading: tuple) -> None:          # under the lock
        for w in self._watches:
            w.sampled, w.sampled_anon = max(w.sampled, reading[0]), max(w.sampled_anon, reading[1])

    def _run(self) -> None:
        while True:
            reading = current_memory()
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                self._count(reading)
            time.sleep(SAMPLE_SECONDS)

    def _after_fork(self) -> None:          # a forked child has no sampler thread, and its own high-water mark
        global _hwm_read
        self._lock, self._watches, self._thread = threading.Lock(), [], None
        _hwm_read = 0


_SAMPLER = _Sampler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SAMPLER._after_fork)


class PeakWatch:
    """The peak RSS of the block it wraps (``peak_bytes``; see the module docstring), and how it was measured
    (``method``). Watches nest: a stage's and each of its items' are measured alike."""

    peak_bytes: int = 0
    anon_peak_bytes: int = 0      # the largest anonymous RSS sampled (a lower bound, as sampled peaks are)
    method: str = ""

    def __enter__(self) -> "PeakWatch":
        self._hwm = high_water_mark_bytes()
        self.sampled = self.sampled_anon = 0
        _SAMPLER.add(self)
        _SAMPLER.observe(current_memory())
        return self

    def __exit__(self, *exc) -> bool:
        _SAMPLER.observe(current_memory())
        _SAMPLER.remove(self)
        hwm = high_water_mark_bytes()
        if hwm > self._hwm:
            self.peak_bytes, self.method = hwm, "high-water mark"
        else:
            # (no reading exceeds the mark but by the counters' approximation: capped, the two agree)
            self.peak_bytes, self.method = min(self.sampled, hwm), f"sampled every {SAMPLE_SECONDS * 1e3:.0f} ms"
        self.anon_peak_bytes = min(self.sampled_anon, self.peak_bytes)
        return False

    def record(self) -> dict:
        """The manifest's fields for a stage's peak (``peak_anon_bytes``: its anonymous part, sampled)."""
        return {"peak_rss_bytes": self.peak_bytes, "peak_anon_bytes": self.anon_peak_bytes, "peak_rss_scope": "stage",
                "peak_rss_method": self.method}
