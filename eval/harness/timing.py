"""One timing wrapper for every variant: the same clock, the same warm-up, the same statistics.

CPU work is timed with ``time.perf_counter``; CUDA work with CUDA events after a synchronize, so asynchronous kernel
launches are not mistaken for finished work. Warm-up calls are excluded from the statistics.

>>> stats = LatencyStats.from_samples([0.010, 0.012, 0.011, 0.030])
>>> round(stats.p50 * 1000, 1), round(stats.min * 1000, 1)
(11.5, 10.0)
"""
from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Seconds. ``p50/p90/p99`` are linear-interpolated percentiles of the timed samples."""

    n: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def from_samples(cls, samples) -> "LatencyStats":
        import numpy as np

        a = np.asarray(list(samples), dtype=np.float64)
        if a.size == 0:
            raise ValueError("no timing samples")
        return cls(n=int(a.size), mean=float(a.mean()), std=float(a.std()), min=float(a.min()),
                   p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                   p99=float(np.percentile(a, 99)), max=float(a.max()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Clock:
    """Elapsed-time measurement for one device. ``with clock.span() as s: ...; s.seconds``."""

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")

    def span(self):
        return _CudaSpan() if self.cuda else _CpuSpan()

    @property
    def name(self) -> str:
        return "cuda-events" if self.cuda else "perf_counter"


class _CpuSpan:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


class _CudaSpan:
    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.start.record()
        return self

    def __exit__(self, *exc):
        import torch

        self.end.record()
        torch.cuda.synchronize()
        self.seconds = self.start.elapsed_time(self.end) / 1000.0


def measure(fn, *, warmup: int = 2, repeat: int = 10, device: str = "cpu") -> tuple:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeat`` times timed. Returns (LatencyStats, samples)."""
    clock = Clock(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        with clock.span() as s:
            fn()
        samples.append(s.seconds)
    return LatencyStats.from_samples(samples), samples
