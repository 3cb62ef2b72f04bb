"""Per-component timing and peak memory of a running pipeline, without copying diffusers' ``__call__``.

:func:`instrument` times the text encoders, each denoiser call (U-Net or transformer, one per denoising step)
and the VAE decode of any diffusers pipeline with the same :class:`~diffaccel.eval.harness.timing.Clock`: PyTorch
modules through forward pre/post hooks (which run outside ``torch.compile``'s graph), engine-backed shims by
wrapping their ``engine`` callables, other runtimes' model parts (optimum-intel's) by wrapping their ``forward``, the VAE by wrapping
``decode``/``encode``. Everything is restored on exit, also after an exception.
:class:`MemoryMonitor` samples the process RSS in a thread (and, on GPU, reads the allocator peak and NVML).

>>> from diffaccel.eval.harness.timing import Clock
>>> class Model:
...     def decode(self, z): return z
>>> pipe = type("Pipe", (), {"vae": Model()})()
>>> with instrument(pipe, Clock()) as timings:
...     _ = pipe.vae.decode(1)
>>> [c for c, _ in timings.records], "decode" in vars(pipe.vae)
(['vae_decode'], False)
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading

from diffaccel.optimize.artifact.roles import DENOISERS, TEXT_ENCODERS

log = logging.getLogger(__name__)
COMPONENTS = ("text_encoder", "denoiser", "vae_decode", "vae_encode")


@dataclasses.dataclass
class Timings:
    """(component, seconds) for every instrumented call since the last :meth:`clear`."""

    records: list = dataclasses.field(default_factory=list)

    def clear(self) -> None:
        self.records.clear()

    def samples(self, component: str) -> list:
        return [s for c, s in self.records if c == component]

    def totals(self) -> dict:
        out = {c: 0.0 for c in COMPONENTS}
        for c, s in self.records:
            out[c] += s
        return out


def _is_module(obj) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, torch.nn.Module)


class _Patches:
    """Instance-attribute replacements and hook handles, undone in reverse order."""

    def __init__(self):
        self.undo: list = []

    def replace(self, obj, name: str, value) -> None:
        had = name in vars(obj)
        original = vars(obj).get(name)
        setattr(obj, name, value)
        self.undo.append(lambda: setattr(obj, name, original) if had else delattr(obj, name))

    def hook(self, handle) -> None:
        self.undo.append(handle.remove)

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()


class _Timed:
    """Calls ``fn`` under the clock; every other attribute (an engine's ``device``, ``input_names``...) is the
    wrapped object's."""

    def __init__(self, fn, component: str, clock, timings: Timings):
        self._fn, self._component, self._clock, self._timings = fn, component, clock, timings

    def __call__(self, *args, **kwargs):
        with self._clock.span() as s:
            out = self._fn(*args, **kwargs)
        self._timings.records.append((self._component, s.seconds))
        return out

    def __getattr__(self, name):
        return getattr(self._fn, name)


def _hook_module(module, component: str, clock, timings: Timings, patches: _Patches) -> None:
    spans: list = []

    def pre(_module, _args):
        span = clock.span()
        span.__enter__()
        spans.append(span)

    def post(_module, _args, _out):
        span = spans.pop()
        span.__exit__(None, None, None)
        timings.records.append((component, span.seconds))

    patches.hook(module.register_forward_pre_hook(pre))
    patches.hook(module.register_forward_hook(post))


def _targets(pipe) -> list:
    """(component, object, attribute or None for module hooks) for what this pipeline has."""
    out = []
    parts = [("text_encoder", name) for name in TEXT_ENCODERS] + [("denoiser", name) for name in DENOISERS]
    for component, attr in parts:
        obj = getattr(pipe, attr, None)
        if obj is None:
            continue
        if hasattr(obj, "engine") and not _is_module(obj):    # a step cache calls the engine's parts: time the step
            out.append((component, obj, "_cache" if getattr(obj, "is_cache_enabled", False) else "engine"))
        elif _is_module(obj):
            out.append((component, obj, None))
        elif callable(getattr(obj, "forward", None)):     # another runtime's model part (optimum-intel's OpenVINO)
            out.append((component, obj, "forward"))
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        shim = hasattr(vae, "engine") and not _is_module(vae)
        out.append(("vae_decode", vae, "engine" if shim else "decode"))
        if not shim:
            out.append(("vae_encode", vae, "encode"))
        elif getattr(vae, "encoder", None) is not None:
            out.append(("vae_encode", vae, "encoder"))
    return [t for t in out if t[2] is None or hasattr(t[1], t[2])]


@contextlib.contextmanager
def instrument(pipe, clock):
    """Time every component call of ``pipe`` with ``clock`` while the block runs; yields :class:`Timings`."""
    timings, patches = Timings(), _Patches()
    try:
        for component, obj, attr in _targets(pipe):
            if attr is None:
                _hook_module(obj, component, clock, timings, patches)
            else:
                patches.replace(obj, attr, _Timed(getattr(obj, attr), component, clock, timings))
        yield timings
    finally:
        patches.restore()


# ---- memory ------------------------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


def _peak_rss() -> "int | None":
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class MemoryMonitor:
    """Peak process RSS while the block runs: the kernel's exact peak mark where it can be reset (Linux), else
    sampled every ``interval`` s in a thread. On a GPU also the torch allocator peak and, with nvidia-ml-py
    installed, the device's peak used memory (NVML, sampled; counts every library). ``result()`` is in MB."""

    def __init__(self, device: str = "cpu", interval: float = 0.01):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.gpu = str(device).startswith("cuda") and _cuda_available()
        self.peak_rss = self.rss_start = self.process.memory_info().rss
        self.rss_loaded = None
        self.nvml_peak, self._nvml, self._kernel_peak = None, None, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._kernel_peak:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            if self._nvml is not None:
                self.nvml_peak = max(self.nvml_peak or 0, self._nvml_used())

    def _nvml_used(self) -> int:
        import pynvml

        return pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used

    def mark_loaded(self) -> None:
        self.rss_loaded = self.process.memory_info().rss

    def __enter__(self):
        self._kernel_peak = _reset_peak_rss()
        if self.gpu:
            self._start_gpu()
        if not self._kernel_peak or self._nvml is not None:
            self._thread.start()
        return self

    def _start_gpu(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception as e:  # nvidia-ml-py missing or NVML unusable: report the allocator peak only
            log.debug("NVML unavailable: %s", e)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        rss = self.process.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss, (_peak_rss() or 0) if self._kernel_peak else 0)

    def result(self) -> dict:
        mb = lambda n: None if n is None else round(n / 2**20, 1)  # noqa: E731
        out = {"rss_before_mb": mb(self.rss_start), "rss_after_load_mb": mb(self.rss_loaded),
               "peak_rss_mb": mb(self.peak_rss), "peak_rss_method": "kernel peak mark (VmHWM)" if self._kernel_peak
               else f"sampled every {self.interval * 1e3:.0f} ms", "gpu_allocator_peak_mb": None,
               "gpu_nvml_peak_mb": None}
        if self.gpu:
            import torch

            out["gpu_allocator_peak_mb"] = mb(torch.cuda.max_memory_allocated())
            out["gpu_nvml_peak_mb"] = mb(self.nvml_peak)
        return out


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA setup must not break a CPU measurement
        return False
