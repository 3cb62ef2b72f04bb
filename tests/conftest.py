"""Shared fixtures: tiny artifacts built once per session, fully offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """The diffusers reference pipeline of random:tiny (fp32 PyTorch)."""
    from diffaccel.optimize.sources.builtins import BUILTINS

    pipe = BUILTINS["random:tiny"]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Build-on-demand cache of artifacts keyed by (source, backend, precision)."""
    from diffaccel.optimize import OptimizeConfig, optimize

    root = tmp_path_factory.mktemp("artifacts")
    cache = {}

    def get(src="random:tiny", backend="onnxruntime", precision="fp32", **kw):
        key = (src, backend, precision, tuple(sorted(kw.items())))
        if key not in cache:
            out = root / f"{src.replace(':', '_')}-{backend}-{precision}-{len(cache)}"
            optimize(src, out, OptimizeConfig(backend=backend, precision=precision, **kw))
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_ort(artifacts):
    return artifacts("random:tiny", "onnxruntime")


def psnr(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="session")
def tiny_folder(tiny_pipe, tmp_path_factory):
    """random:tiny saved as a diffusers-format folder."""
    path = tmp_path_factory.mktemp("src") / "tiny-sd"
    tiny_pipe.save_pretrained(str(path), safe_serialization=True)
    return path
