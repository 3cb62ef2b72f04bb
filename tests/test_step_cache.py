"""Step caching in the engines (DeepCache on a U-Net split by ``optimize --step-cache``): the split equals the whole
U-Net, a cached step skips the deep graph, the interval and the reset between calls, the refusals, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from .conftest import FAST, psnr

STEPS = 7


@pytest.fixture(scope="module")
def split_art(artifacts):
    return artifacts("random:tiny", "onnxruntime", step_cache=0, **FAST)


@pytest.fixture(scope="module")
def whole_art(artifacts):
    return artifacts("random:tiny", "onnxruntime", **FAST)


def _pipe(path):
    from diffaccel.engines import AcceleratedStableDiffusionPipeline

    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def split_pipe(split_art):
    return _pipe(split_art)


def _images(pipe, seed=0, n=1, steps=STEPS, **kw):
    out = pipe(["a red circle"] * n, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               output_type="np", **kw)
    return np.asarray(out.images)


def _trace(engine):
    """Record, per U-Net call, whether the deep graph ran ("F": whole step) or not ("C": cached)."""
    trace = []
    full, shallow = engine.full, engine.shallow
    engine.full = lambda inputs: (trace.append("F"), full(inputs))[1]
    engine.shallow = lambda inputs, feature: (trace.append("C"), shallow(inputs, feature))[1]
    return trace


# ---- the build ---------------------------------------------------------------------------------------------------
def test_manifest_records_the_split(split_art):
    from diffaccel.optimize.artifact.manifest import Manifest

    m = Manifest.load(split_art)
    unet = m.components["unet"]
    assert unet["step_cache"] == {"method": "deepcache", "branch": 0, "block": 0, "layer": 0,
                                  "graphs": {"head": "unet_head", "deep": "unet_deep", "tail": "unet_tail"}}
    assert unet["validation"]["passed"] and unet["files"] == []
    assert {"unet_head", "unet_deep", "unet_tail"} <= set(m.components) and "step_cache" in m.stages
    m.verify()


def test_no_weight_is_stored_twice(split_art, whole_art):
    from diffaccel.optimize.artifact.manifest import Manifest

    def weights(art, names):
        import onnx

        total = 0
        for n in names:
            model = onnx.load(str(art / Manifest.load(art).components[n]["engine"]))
            total += sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) >= 2)
        return total

    parts = weights(split_art, ("unet_head", "unet_deep", "unet_tail"))
    assert parts == pytest.approx(weights(whole_art, ("unet",)), rel=0.01)


def test_split_equals_unsplit(split_pipe, whole_art):
    whole = _images(_pipe(whole_art), n=2)
    split = _images(split_pipe, n=2)
    assert psnr(whole, split) >= 40


@pytest.mark.parametrize("branch", [3])    # block 1, layer 1: the head has cross-attention, axes at half size
def test_other_branches_build_and_match(artifacts, branch, whole_art):
    art = artifacts("random:tiny", "onnxruntime", step_cache=branch, **FAST)
    pipe = _pipe(art)
    assert pipe.unet.engine.branch == branch
    assert psnr(_images(_pipe(whole_art)), _images(pipe)) >= 40


# ---- the cache ---------------------------------------------------------------------------------------------------
def test_cached_steps_skip_the_deep_graph(split_pipe):
    from diffaccel.engines import DeepCacheConfig

    engine = split_pipe.unet.engine
    split_pipe.unet.enable_cache(DeepCacheConfig(interval=3))
    engine.calls = dict.fromkeys(engine.calls, 0)
    _images(split_pipe, steps=10)
    assert engine.calls == {"head": 10, "deep": 4, "tail": 10}      # steps 0, 3, 6, 9 whole


@pytest.mark.parametrize("interval,pattern", [(1, "FFFFFFF"), (2, "FCFCFCF"), (3, "FCCFCCF"), (10, "FCCCCCC")])
def test_interval(split_pipe, interval, pattern):
    from diffaccel.engines import DeepCacheConfig

    split_pipe.unet.enable_cache(DeepCacheConfig(interval=interval))
    trace = _trace(split_pipe.unet.engine)
    _images(split_pipe)
    assert "".join(trace) == pattern


def test_interval_1_equals_cache_off_and_caching_changes_the_image(split_pipe):
    from diffaccel.engines import DeepCacheConfig

    off = _images(split_pipe)
    split_pipe.unet.enable_cache(DeepCacheConfig(interval=1))
    assert np.array_equal(_images(split_pipe), off)
    split_pipe.unet.enable_cache(DeepCacheConfig(interval=3))
    cached = _images(split_pipe)
    assert np.isfinite(cached).all() and not np.array_equal(cached, off)
    split_pipe.unet.disable_cache()
    assert not split_pipe.unet.is_cache_enabled and np.array_equal(_images(split_pipe), off)


def test_cache_resets_every_call_and_batch(split_pipe):
    from diffaccel.engines import DeepCacheConfig

    split_pipe.unet.enable_cache(DeepCacheConfig(interval=3))
    trace = _trace(split_pipe.unet.engine)
    first = _images(split_pipe)
    second = _images(split_pipe)
    assert np.array_equal(first, second) and "".join(trace) == "FCCFCCF" * 2
    trace.clear()
    _images(split_pipe, steps=2)
    _images(split_pipe, n=2, steps=2)
    assert "".join(trace) == "FC" * 2


def test_cache_resets_on_a_new_schedule_with_the_same_conditioning():
    """Reusing one ``encoder_hidden_states`` tensor (prompt_embeds passed in, no guidance) across calls: the new
    call is seen from the timestep going up, or repeating, and a feature is never reused across shapes."""
    from diffaccel.engines import DeepCacheConfig
    from diffaccel.engines.pipelines.cache import StepCache

    class Fake:
        branch = 0

        def __init__(self):
            self.log = []

        def full(self, inputs):
            self.log.append("F")
            return {"out_sample": inputs["sample"]}, inputs["sample"].shape

        def shallow(self, inputs, feature):
            assert feature == inputs["sample"].shape
            self.log.append("C")
            return {"out_sample": inputs["sample"]}

    engine, text = Fake(), torch.zeros(1, 3, 4)
    cache = StepCache(engine, DeepCacheConfig(interval=10))
    step = lambda t, b=1: cache({"sample": torch.zeros(b, 4, 8, 8), "timestep": torch.full((b,), float(t)),  # noqa: E731
                                 "encoder_hidden_states": text})
    for t in (900, 500, 100, 900, 500, 500, 100):
        step(t)
    step(50, b=2)
    assert "".join(engine.log) == "FCCFCFCF"


# ---- refusals ----------------------------------------------------------------------------------------------------
def test_refusals(split_pipe, whole_art):
    from diffaccel.engines import DeepCacheConfig
    from diffaccel.optimize import OptimizeConfig
    from diffaccel.optimize.artifact.errors import DiffaccelError, PipelineArgumentError
    from diffaccel.optimize.families.unet_split import Split

    with pytest.raises(PipelineArgumentError, match="built at branch 0; pass branch=0 or rebuild with diffaccel "
                                                    "optimize --step-cache 2"):
        split_pipe.unet.enable_cache(DeepCacheConfig(branch=2))
    with pytest.raises(PipelineArgumentError, match="built without --step-cache"):
        _pipe(whole_art).unet.enable_cache(DeepCacheConfig())
    with pytest.raises(PipelineArgumentError, match="takes a DeepCacheConfig, not a dict"):
        split_pipe.unet.enable_cache({"interval": 3})
    with pytest.raises(ValueError, match="interval 0 must be an integer >= 1"):
        DeepCacheConfig(interval=0)
    with pytest.raises(ValueError, match=r"--step-cache cannot be built with --backend onnxruntime --precision int8"):
        OptimizeConfig(precision="int8", step_cache=0)
    with pytest.raises(DiffaccelError, match="branch 4 is out of range: this U-Net has branches 0-3"):
        Split.of({"layers_per_block": 1, "down_block_types": ["A", "B"]}, 4)


def test_transformer_families_are_refused():
    from diffaccel.optimize.artifact.errors import DiffaccelError
    from diffaccel.optimize.families import family
    from diffaccel.optimize.families.unet_split import StepCacheFamily

    with pytest.raises(DiffaccelError, match="splits UNet2DConditionModel denoisers .* not built yet"):
        StepCacheFamily(family("sd3"), {"_class_name": "SD3Transformer2DModel"}, 0)


# ---- the CLI -----------------------------------------------------------------------------------------------------
def test_cli(split_art, whole_art, tmp_path, capsys):
    from diffaccel.optimize.cli import build_parser, main

    assert build_parser().parse_args(["optimize", "x", "-o", "y", "--step-cache"]).step_cache == 0
    assert build_parser().parse_args(["optimize", "x", "-o", "y", "--step-cache", "3"]).step_cache == 3
    out = tmp_path / "a.png"
    assert main(["generate", str(split_art), "a red circle", "--steps", "3", "--cache", "deepcache:interval=2",
                 "-o", str(out)]) == 0 and out.is_file()
    assert main(["generate", str(whole_art), "a red circle", "--steps", "3", "--cache", "deepcache"]) == 2
    assert "built without --step-cache" in capsys.readouterr().err
    assert main(["generate", str(split_art), "a red circle", "--cache", "deepcache:every=2"]) == 2
    assert "bad --cache 'deepcache:every=2'" in capsys.readouterr().err


# ---- --cache on eval, bench, serve; microbench refuses it; --components; info ----------------------------------
def test_eval_compares_cache_settings_of_one_artifact(split_art, tmp_path, capsys):
    import json

    from .helpers import run_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code, out, err = run_cli(capsys, "eval", split_art, f"{split_art}@cache=deepcache:interval=2",
                             f"{split_art}@cache=off", "--cache", "deepcache:interval=3", "--prompts", prompts,
                             "--seeds", "0", "--steps", "4", "--batch-sizes", "1", "--repeat", "1", "--warmup", "0",
                             "-o", tmp_path / "r")
    assert code == 0, err
    rows = {v["name"]: v for v in json.loads((tmp_path / "r" / "report.json").read_text())["variants"]}
    cached = {n: v["info"]["cache"] for n, v in rows.items() if v["kind"] == "artifact"}
    assert set(cached.values()) == {"deepcache:interval=2", "deepcache:interval=3", None}, cached
    assert "onnxruntime-fp32@deepcache:interval=2" in rows and "onnxruntime-fp32@deepcache:interval=2" in out
    for name in cached:      # every step is timed, cached ones too (the step cache, not the engine, is wrapped)
        assert rows[name]["latency"]["denoiser_step"]["n"] == 4, name
    psnr_of = {c: rows[n]["quality"]["aggregate"]["psnr_mean"] for n, c in cached.items()}
    assert psnr_of[None] > 100 > psnr_of["deepcache:interval=2"]


def test_eval_cache_refusals(split_art, whole_art, tmp_path, capsys):
    from diffaccel.engines.pipelines.cache import DeepCacheConfig
    from diffaccel.eval.harness.variants import artifact_caches, load_manifests

    from .helpers import assert_one_line_error, run_cli

    arts = [str(whole_art), str(split_art), f"{split_art}@cache=off"]
    assert artifact_caches(arts, load_manifests(arts), "deepcache:interval=5") == [None, DeepCacheConfig(5), None]
    for argv, needle in (([f"{whole_art}@cache=deepcache"], "built without --step-cache"),
                         ([whole_art, "--cache", "deepcache"], "none of the artifacts was built with --step-cache"),
                         ([split_art, "--cache", "deepcache:every=2"], "bad --cache 'deepcache:every=2'"),
                         ([f"{split_art}@cache=deepcache:branch=1"], "split at branch 0"),
                         ([split_art, f"{split_art}@cache=off"], "listed twice with the same cache")):
        assert_one_line_error(*run_cli(capsys, "eval", *argv, "-o", tmp_path / "r")[::2], needle)


def test_bench_cache(split_art, whole_art, tmp_path, capsys):
    import json

    from .helpers import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "bench", split_art, "--cache", "deepcache:interval=2", "--steps", "3",
                           "--requests", "2", "--max-batch", "1", "--calib-repeats", "1", "-o", tmp_path / "b")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["engine"] == \
        "onnxruntime/fp32@cache=deepcache:interval=2"
    assert_one_line_error(*run_cli(capsys, "bench", whole_art, "--cache", "deepcache", "-o", tmp_path / "c")[::2],
                          "built without --step-cache")
    assert_one_line_error(*run_cli(capsys, "bench", "--url", "http://127.0.0.1:9", "--cache", "deepcache",
                                   "-o", tmp_path / "d")[::2], "diffaccel serve OUT --cache SPEC")


def test_microbench_refuses_cache(capsys):
    from .helpers import assert_one_line_error, run_cli

    assert_one_line_error(*run_cli(capsys, "microbench", "random:tiny", "--cache", "deepcache")[::2],
                          "times one denoiser step", "OUT@cache=SPEC")


def test_serve_cache_is_per_deployment(split_art, whole_art, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from starlette.testclient import TestClient

    from diffaccel.engines.serving.app import create_app
    from diffaccel.engines.serving.models import cache_paths, load_models
    from diffaccel.optimize.artifact.errors import DiffaccelError

    from .serve_helpers import make_service

    cached = f"{split_art}@cache=deepcache:interval=3"
    assert cache_paths([str(whole_art), str(split_art)], "deepcache") == [str(whole_art), cached]
    assert cache_paths([str(split_art), f"{split_art}@cache=off"], "deepcache:interval=3") == [cached, str(split_art)]
    with pytest.raises(DiffaccelError, match="built without --step-cache"):
        cache_paths([f"{whole_art}@cache=deepcache"], None)
    with pytest.raises(DiffaccelError, match="none of the served artifacts"):
        cache_paths([str(whole_art)], "deepcache")
    models = load_models([str(split_art), cached])
    name = split_art.resolve().name
    assert list(models) == [name, f"{name}@deepcache:interval=3"]
    assert [m.pipe.unet.is_cache_enabled for m in models.values()] == [False, True]
    with TestClient(create_app(make_service(models, tmp_path / "jobs.sqlite"))) as client:
        ok = client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 3, "seed": 0,
                                                         "model": f"{name}@deepcache:interval=3"})
        assert ok.status_code == 200, ok.text
        r = client.post("/v1/images/generations", json={"prompt": "a red circle", "cache": "deepcache"})
        assert r.status_code == 400 and "per deployment, not per request" in r.json()["error"]["message"]


def test_components_unet_builds_the_split_parts():
    from diffaccel.optimize.families import components_of, family
    from diffaccel.optimize.families.unet_split import StepCacheFamily

    config = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": 2,
              "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    fam = StepCacheFamily(family("sd"), config, 0)
    assert components_of(fam, ("unet",)) == ("unet_head", "unet_deep", "unet_tail")
    assert components_of(fam, ("text_encoder", "unet")) == ("text_encoder", "unet_head", "unet_deep", "unet_tail")


def test_info_shows_the_split(split_art, capsys):
    from .helpers import run_cli

    code, out, _ = run_cli(capsys, "info", split_art)
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith(("unet", "  unet"))}
    assert code == 0 and "deepcache split at branch 0" in rows["unet"] and " 0.0 MB" not in rows["unet"]
    assert [k for k in rows if k != "unet"] == ["unet_head", "unet_deep", "unet_tail"]
    assert all(ln.startswith("  ") for k, ln in rows.items() if k != "unet")
