"""Calibration data captured from the real pipeline: the U-Net's inputs at every denoising step.

Diffusion U-Nets see very different activations early (pure noise) and late (nearly clean latents) in sampling, and
classifier-free guidance doubles every batch with an unconditional half. Calibrating on random tensors or on one
timestep misses both; we run the pipeline itself, with the configured guidance, and record what the U-Net receives
(each model family knows how: ``family.capture_denoiser_inputs``). Everything is seeded: the same QuantConfig on the same
source gives the same tensors.
"""
from __future__ import annotations

import contextlib


def calibration_prompts(ctx) -> list:
    """The calibration prompts of the build's :class:`QuantConfig` (see
    :func:`~diffaccel.optimize.sources.prompts.calibration_prompts`)."""
    from diffaccel.optimize.sources.prompts import calibration_prompts as prompts

    q = ctx.config.quant
    return prompts(ctx.source.spec, q.calib_size, q.calib_seed, q.calib_prompts)


def check_prompts_file(quant) -> None:
    """Refuse a ``calib_prompts`` file that is missing, empty or unreadable, before any work (stages' preflight):
    the prompts are first needed after the export, and a bad file should fail in a second, not after it."""
    if not quant.calib_prompts:
        return
    from diffaccel.optimize.artifact.errors import DiffaccelError
    from diffaccel.optimize.sources.prompts import read_prompts

    try:
        read_prompts(quant.calib_prompts)
    except (OSError, UnicodeDecodeError) as e:
        raise DiffaccelError(f"prompts file {quant.calib_prompts} cannot be read ({e}); give a UTF-8 text file "
                             "with one prompt per line") from None


def calibration_size(ctx) -> tuple:
    """(height, width) in pixels calibration runs at: the U-Net spec's typical (opt) latent size."""
    opt, scale = ctx.specs[ctx.denoiser].opt_values(), ctx.geometry.vae_scale_factor
    return opt["height"] * scale, opt["width"] * scale


def calibration_samples(ctx) -> tuple:
    """(prompts, the U-Net's inputs at every step of sampling each prompt with the configured guidance)."""
    q, (height, width) = ctx.config.quant, calibration_size(ctx)
    prompts = calibration_prompts(ctx)
    samples = ctx.family.capture_denoiser_inputs(ctx.pipe, prompts, steps=q.calib_steps, guidance_scale=q.guidance_scale,
                                             seed=q.calib_seed, height=height, width=width)
    return prompts, samples


class CalibrationReader:
    """ONNX Runtime CalibrationDataReader over captured U-Net inputs (numpy, fixed order)."""

    def __init__(self, samples: list):
        self.samples = samples
        self.i = 0

    def get_next(self):
        if self.i >= len(self.samples):
            return None
        s = self.samples[self.i]
        self.i += 1
        return {k: v.numpy() for k, v in s.items()}

    def rewind(self):
        self.i = 0


def write_range_cache(src, samples: list, op_types, cache, *, method: str = "minmax", percentile: float = 99.999,
                      external: bool, skip_nodes=(), threads: "int | None" = None, progress=None) -> None:
    """Calibrate ``src`` on ``samples`` with ONNX Runtime's own calibrator for ``method`` (see :func:`collect`) and
    save the ranges as its calibration cache: ``quantize_static(calibration_cache_path=)`` reads it back, so the
    quantized model is the one ORT's all-in-one call makes from the same ranges. ``progress(i, n)`` is called
    before each sample and once after the last (i = n)."""
    from pathlib import Path

    from onnxruntime.quantization.calibrate import save_tensors_data

    with collect(src, samples, op_types, method=method, percentile=percentile, external=external,
                 skip_nodes=skip_nodes, threads=threads, scratch=Path(cache).parent, progress=progress) as calibrator:
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, cache, smooth_quant=False)


@contextlib.contextmanager
def collect(src, samples: list, op_types, *, method: str, external: bool, percentile: float = 99.999,
            num_bins: "int | None" = None, skip_nodes=(), threads: "int | None" = None, scratch=None, progress=None):
    """ONNX Runtime's own calibrator for ``method`` (``minmax``, ``percentile``, ``entropy``) after it has seen every
    sample; its statistics are read inside the ``with`` block.

    Driven here rather than inside ``quantize_static`` to bound memory: the calibrator's copy of the weights goes
    before its session is made (the session maps the weights file), the session runs without an arena, and samples
    go in one at a time with the statistics merged after each, so the calibration size does not drive memory. For
    min-max, merging is exact (min of mins: the ranges equal those of ORT's all-at-once call); histogram methods
    re-bin as their range grows, as ORT does across batches. Histogram methods hold the full tensors of one sample,
    so they skip the tensors only ``skip_nodes`` (nodes left in float) touch, such as attention scores (1 GB each at
    512x512 on SD 1.5).
    """
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from diffaccel.optimize.memory import release_memory

    with tempfile.TemporaryDirectory(prefix="diffaccel-calib-", dir=scratch) as tmp:
        augmented = str(Path(tmp) / "augmented.onnx")
        calibrator = _calibrator(method, Path(src), list(op_types), set(skip_nodes), percentile, num_bins,
                                 augmented_model_path=augmented, use_external_data_format=external)
        calibrator.augment_graph()
        calibrator.model = None          # its weights were written out with the augmented graph
        release_memory()
        calibrator.infer_session = ort.InferenceSession(augmented, _session_options(threads),
                                                        providers=["CPUExecutionProvider"])
        for i, s in enumerate(samples):
            if progress is not None:
                progress(i, len(samples))
            calibrator.collect_data(CalibrationReader([s]))
        if progress is not None:
            progress(len(samples), len(samples))
        try:
            yield calibrator
        finally:
            calibrator.infer_session = None
            del calibrator
            release_memory()


def _calibrator(method: str, src, op_types: list, skip: set, percentile: float, num_bins, **common):
    """ONNX Runtime's calibrator object for ``method``."""
    from onnxruntime.quantization import calibrate as cal

    if method == "minmax":
        return cal.MinMaxCalibrater(src, op_types, symmetric=False, **common)
    if method == "percentile":
        return _skipping(cal.PercentileCalibrater, skip)(src, op_types, symmetric=True, num_bins=num_bins or 2048,
                                                         percentile=percentile, **common)
    if method == "entropy":
        return _skipping(cal.EntropyCalibrater, skip)(src, op_types, symmetric=False, num_bins=num_bins or 128,
                                                      **common)
    raise ValueError(f"unknown calibration method {method!r}; choose one of: minmax, percentile, entropy")


def _session_options(threads: "int | None"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # as ORT's calibrators do
    so.enable_cpu_mem_arena = False
    # ORT's default order runs the added ReduceMin/ReduceMax branches late, keeping every activation they read
    # alive: 19.5 GB for one SD 1.5 U-Net sample at 512x512 against 5.5 GB in priority order (same kernels, same
    # values)
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    return so


def _skipping(cls, skip: set):
    """``cls`` (an ORT histogram calibrator) that does not calibrate tensors only ``skip`` nodes touch."""
    if not skip:
        return cls

    class Skipping(cls):
        def select_tensors_to_calibrate(self, model):
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            needed = {t for n in model.graph.node if n.name not in skip for t in (*n.input, *n.output)}
            return {t for t in tensors if t in needed}, value_infos

    return Skipping
