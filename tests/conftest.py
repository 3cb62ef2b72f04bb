"""Shared fixtures: tiny artifacts built once per session, fully offline. Plain helpers live in tests/helpers.py.

Session artifacts are read-only: a test that changes an artifact copies it first (``shutil.copytree``). At the end
of the session every cached artifact is verified against its manifest, so a test that wrote into one fails there.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# one intra-op thread for PyTorch, here and in the CLI/server subprocesses the tests start (before torch is imported):
# the tiny models gain nothing from more, and a second thread spinning at each op's barrier on the shared 2-core
# machine cost CPU time and wall time alike (test_resume's first three tests side by side: 34.7 -> 21.4 CPU-s,
# 123 -> 93 s). Set OMP_NUM_THREADS to run them with more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import gc  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from .helpers import FAST, QUICK, psnr  # noqa: E402,F401  (psnr: test files import it from here too)


def pytest_collection_finish(session):
    """Move what collection imported (torch, diffusers, onnx, every test module: about a million objects) out of
    the cyclic garbage collector's sight. Builds call ``gc.collect()`` after each component and stage
    (``release_memory``), and each full collection otherwise walks all of it again (0.3-0.6 CPU-s a call here;
    test_resume's first three tests: 42.5 -> 32.7 CPU-s). Reference counting still frees everything; frozen objects
    are only never searched for cycles, and whatever a test creates is collected as before.

    Not when onnxscript's rewriter is already imported: the export finds its pattern matchers (which hold the last
    exported graph) with ``gc.get_objects()``, which does not list frozen objects (test_memory checks the export lets
    go of the weights). Collection does not import it today.
    """
    if "onnxscript.rewriter._matcher" in sys.modules:
        return
    gc.collect()
    gc.freeze()


# Test files that share an expensive session artifact run in one worker under pytest-xdist (`-n 2 --dist loadfile`,
# what CI runs): session fixtures are built once per worker, so splitting a set would build its artifact twice. Every
# other file is a work unit of its own (loadfile), so its module fixtures are built once too. (A scheduler, not
# xdist_group marks: --dist loadgroup renames node ids, which pytest 9 no longer lets it do, so the marks are ignored.)
XDIST_GROUPS = {
    "tiny_ort": ("test_attention_fusion", "test_cli", "test_demo", "test_pipeline"),      # the dynamo export
    "tiny_xl": ("test_guidance", "test_sdxl", "test_sdxl_dropins", "test_sdxl_tools", "test_serve_sdxl"),   # tiny-xl
    "tiny_int8": ("test_lora", "test_openvino", "test_precision"),                         # tiny_int8_unet
}
_GROUP_OF = {f"tests/{name}.py": group for group, names in XDIST_GROUPS.items() for name in names}


@pytest.hookimpl(optionalhook=True)     # an xdist hook: pytest without xdist never calls it
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFiles(LoadFileScheduling):
        def _split_scope(self, nodeid):
            path = super()._split_scope(nodeid)
            return _GROUP_OF.get(path, path)

    return GroupedFiles(config, log)


@pytest.fixture(scope="session")
def tiny_pipe():
    """The diffusers reference pipeline of random:tiny (fp32 PyTorch)."""
    from diffaccel.optimize.sources.builtins import BUILTINS

    pipe = BUILTINS["random:tiny"]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Build-on-demand cache of artifacts keyed by (source, backend, precision, other OptimizeConfig fields):
    ``artifacts("random:tiny", "onnxruntime", "int8", exporter="torchscript")`` builds once per session, and every
    later call with the same arguments returns the same folder. Treat it as read-only."""
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

    yield get
    from diffaccel.optimize.artifact.manifest import Manifest

    for out in cache.values():          # a test wrote into a shared artifact: copy it first instead
        Manifest.load(out).verify()


@pytest.fixture(scope="session")
def tiny_ort(artifacts):
    """random:tiny -> ONNX Runtime fp32 with the default (dynamo) exporter: what users get."""
    return artifacts("random:tiny", "onnxruntime")


@pytest.fixture(scope="session")
def tiny_ort_ts(artifacts):
    """random:tiny -> ONNX Runtime fp32 with the legacy exporter, for tests where the exporter is not under test."""
    return artifacts("random:tiny", "onnxruntime", **FAST)


@pytest.fixture(scope="session")
def tiny_ov(tiny_ort_ts, tmp_path_factory):
    """random:tiny -> OpenVINO fp32 with the legacy exporter. OpenVINO compiles the same ONNX export as
    ``tiny_ort_ts`` (the export stage's settings name no backend), so it is built over a copy of that artifact, as a
    user re-running ``diffaccel optimize --backend openvino`` into it would: only the engine stage runs
    (``build_over`` checks that it did)."""
    pytest.importorskip("openvino", reason="openvino is not installed (diffaccel[openvino])")
    from diffaccel.optimize import OptimizeConfig
    from diffaccel.optimize.artifact.manifest import Manifest

    from .helpers import build_over

    out = tmp_path_factory.mktemp("artifacts-ov") / "random_tiny-openvino-fp32"
    build_over(tiny_ort_ts, out, OptimizeConfig(backend="openvino", **FAST), must_run=("engine",))
    yield out
    Manifest.load(out).verify()         # a test wrote into it: copy it first instead


@pytest.fixture(scope="session")
def tiny_int8(artifacts):
    """random:tiny -> ONNX Runtime int8, every component, the smallest calibration (QUICK)."""
    from diffaccel.optimize.config import QuantConfig

    return artifacts("random:tiny", "onnxruntime", "int8", quant=QuantConfig(**QUICK), **FAST)


@pytest.fixture(scope="session")
def tiny_int8_unet(artifacts):
    """random:tiny -> ONNX Runtime int8, U-Net only, min-max calibration (QUICK)."""
    from diffaccel.optimize.config import QuantConfig

    return artifacts("random:tiny", "onnxruntime", "int8", components=("unet",), quant=QuantConfig(**QUICK), **FAST)


@pytest.fixture(scope="session")
def tiny_folder(tiny_pipe, tmp_path_factory):
    """random:tiny saved as a diffusers-format folder (read-only: copy it to change it)."""
    path = tmp_path_factory.mktemp("src") / "tiny-sd"
    tiny_pipe.save_pretrained(str(path), safe_serialization=True)
    return path
