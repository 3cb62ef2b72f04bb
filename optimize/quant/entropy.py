"""Entropy (KL-divergence) calibration with enough histogram bins to mean something.

ONNX Runtime's ``quantize_static(calibrate_method=Entropy)`` builds its histograms with 128 bins and searches
thresholds over 128 quantized bins, so the only candidate is the full range: the result is byte-identical to
min-max (measured on random:tiny with onnxruntime 1.32; ``tests/test_precision.py`` guards it). Here ORT's own
histogram collector runs with TensorRT's 2048 bins, the KL threshold search (TensorRT's method, with MXNet's
handling of the window's last bins and 255 levels for the two-sided window) is vectorized, and the ranges reach
``quantize_static`` through its calibration cache.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> data = np.concatenate([rng.normal(0, 1, 100_000), [40.0]])       # one far outlier
>>> hist, edges = np.histogram(data, 2048, range=(-40, 40))
>>> lo, hi = kl_threshold(hist, edges, data.min(), data.max())
>>> bool(hi < 10), bool(lo > -10)                                     # min-max would give 40
(True, True)
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ENTROPY_BINS = 2048          # TensorRT's histogram size for KL calibration
QUANTIZED_BINS = 255         # levels of an 8-bit quantizer over the two-sided window (MXNet's choice for int8)


def _smooth(p: np.ndarray, eps: float = 1e-4) -> "np.ndarray | None":
    zeros = p == 0
    n_nonzero = p.size - int(zeros.sum())
    if n_nonzero == 0:
        return None
    return p + eps * zeros - (eps * zeros.sum() / n_nonzero) * ~zeros


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = _smooth(p), _smooth(q)
    if p is None or q is None or (q <= 0).any() or (p <= 0).any():
        return float("inf")
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def kl_threshold(hist, edges, lowest, highest, quantized_bins: int = QUANTIZED_BINS) -> tuple:
    """The symmetric clipping range (clamped to the observed min/max) whose ``quantized_bins``-level quantization
    of the histogram loses the least information (KL divergence), as in TensorRT's entropy calibration. ``hist``
    is centred on zero (ORT's collector bins [-max|x|, max|x|])."""
    hist = np.asarray(hist, dtype=np.float64)
    n, zero, half = hist.size, hist.size // 2, quantized_bins // 2
    best, best_kl = (edges[0], edges[-1]), float("inf")
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, n)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += hist[:start].sum()
        p[-1] += hist[end:].sum()
        merged = sliced.size // quantized_bins
        used = merged * quantized_bins
        q_bins = sliced[:used].reshape(quantized_bins, merged).sum(1)
        q_bins[-1] += sliced[used:].sum()          # the last quantized bin stretches to the window's end
        nonzero = (p != 0)
        counts = nonzero[:used].reshape(quantized_bins, merged).sum(1)
        counts[-1] += nonzero[used:].sum()
        level = np.divide(q_bins, counts, out=np.zeros_like(q_bins), where=counts > 0)
        q = np.empty_like(p)
        q[:used] = np.repeat(level, merged)
        q[used:] = level[-1]
        q[~nonzero] = 0
        kl = _kl(p, q)
        if kl < best_kl:
            best, best_kl = (edges[start], edges[end]), kl
    lo, hi = max(best[0], lowest), min(best[1], highest)
    return np.asarray(lo, dtype=np.float32), np.asarray(hi, dtype=np.float32)


def write_entropy_cache(src: Path, samples: list, op_types, cache: Path, *, external: bool,
                        num_bins: int = ENTROPY_BINS, skip_nodes=(), threads: "int | None" = None) -> None:
    """Collect ``num_bins``-bin histograms of every tensor ``quantize_static`` calibrates, pick KL thresholds and
    save them as ORT's calibration cache at ``cache`` (read back by ``quantize_static(calibration_cache_path=)``)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    from diffaccel.optimize.quant.calibration import collect

    with collect(src, samples, op_types, method="entropy", num_bins=num_bins, external=external,
                 skip_nodes=skip_nodes, threads=threads, scratch=Path(cache).parent) as calibrator:
        histograms = dict(calibrator.collector.histogram_dict)
    ranges = {}
    for name, (hist, edges, lowest, highest, *_rest) in histograms.items():
        lo, hi = kl_threshold(hist, edges, lowest, highest)
        ranges[name] = (lo, hi, hist, edges)
    log.info("entropy calibration: %d tensors, %d bins", len(ranges), num_bins)
    save_tensors_data(TensorsData(CalibrationMethod.Entropy, ranges), cache, smooth_quant=False)
