"""The tensorrt backend. CPU tests cover everything up to the builder: profiles, the precision -> build mapping, the
cache key and its manifest entry, the mismatch error, refusals without TensorRT, and that importing diffaccel never
imports tensorrt. GPU tests (``pytest -m gpu``) build, load, check parity and time engines; they skip here."""
import importlib.util
import subprocess
import sys

import pytest

from diffaccel.optimize.config import ShapeRange
from diffaccel.optimize.artifact.errors import ArtifactError, BackendUnavailableError
from diffaccel.optimize.families.sd import ModelGeometry, sd_specs
from diffaccel.engines.backends.tensorrt_env import (BuildLog, TrtEnvironment, check_engine_compatible,
                                                     default_timing_cache, engine_cache_key, engine_identity,
                                                     key_of_identity, ort_trt_cache_dir)
from diffaccel.optimize.stages.tensorrt_build import build_flags, format_build_error, rebuild_command, trt_profile

from .conftest import psnr

GEO = ModelGeometry(vocab_size=1000, max_length=77, text_hidden=32, latent_channels=4, unet_in_channels=4,
                    cross_attention_dim=32, vae_scale_factor=8, latent_multiple=8, default_size=512,
                    num_train_timesteps=1000)
ENV = TrtEnvironment(tensorrt="10.13.0.35", gpu="NVIDIA L4", compute_capability="8.9")


def _has_trt_gpu() -> bool:
    import torch

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


HAS_TRT_GPU = _has_trt_gpu()
needs_trt = pytest.mark.skipif(not HAS_TRT_GPU, reason="needs an NVIDIA GPU with CUDA and the tensorrt package "
                               "(pip install diffaccel[gpu]); see docs/tensorrt.md")
no_trt = pytest.mark.skipif(HAS_TRT_GPU, reason="checks the refusal on machines without TensorRT/CUDA")


def _unet(batch="1-4", height="256-768", width="512"):
    return sd_specs(GEO, ShapeRange.parse(batch, height, width))["unet"]


# ---- profiles and build flags ------------------------------------------------------------------------------------
def test_dynamic_profile_is_the_specs_min_opt_max():
    spec = _unet()
    prof = trt_profile(spec)
    assert list(prof) == ["sample", "timestep", "encoder_hidden_states"]
    assert prof["sample"] == ((1, 4, 32, 64), (2, 4, 64, 64), (8, 4, 96, 64))
    assert prof["timestep"] == ((1,), (2,), (8,))
    assert prof["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (8, 77, 32))


def test_static_profile_builds_the_opt_shape_only():
    prof = trt_profile(_unet(), static=True)
    for lo, opt, hi in prof.values():
        assert lo == opt == hi
    assert prof["sample"][1] == (2, 4, 64, 64)
    vae = trt_profile(sd_specs(GEO, ShapeRange.parse("2", "512", "512"))["vae_decoder"], static=True)
    assert vae["latent_sample"] == ((2, 4, 64, 64),) * 3


def test_every_precision_builds_strongly_typed_without_precision_flags():
    for precision in ("fp32", "fp16", "int8", "fp8"):
        flags = build_flags(precision)
        assert flags.network == ("STRONGLY_TYPED",)
        assert not {"FP16", "INT8", "FP8", "BF16"} & set(flags.clear), precision
    assert build_flags("fp32").clear == ("TF32",)          # an fp32 engine is a reference: no TF32 matmuls
    assert build_flags("fp16").clear == () and build_flags("int8").min_sm is None
    assert build_flags("fp8").min_sm == (8, 9)
    with pytest.raises(ValueError, match="fp32, fp16, int8, fp8"):
        build_flags("int4")


# ---- cache key and manifest entry --------------------------------------------------------------------------------
def test_cache_key_changes_with_each_input_and_only_then():
    prof = trt_profile(_unet())
    base = dict(source_sha256="a" * 64, component="unet", precision="fp16", quant_hash=None, profile=prof, env=ENV)
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**dict(base, profile={k: tuple(v) for k, v in prof.items()}))
    variants = {
        "source": dict(base, source_sha256="b" * 64),
        "component": dict(base, component="vae_decoder"),
        "precision": dict(base, precision="int8"),
        "quant": dict(base, quant_hash="0123456789abcdef"),
        "profile": dict(base, profile=trt_profile(_unet(height="512"))),
        "static": dict(base, profile=trt_profile(_unet(), static=True)),
        "tensorrt": dict(base, env=TrtEnvironment("10.14.1.48", ENV.gpu, ENV.compute_capability)),
        "gpu": dict(base, env=TrtEnvironment(ENV.tensorrt, "NVIDIA RTX 4090", ENV.compute_capability)),
        "sm": dict(base, env=TrtEnvironment(ENV.tensorrt, ENV.gpu, "9.0")),
    }
    keys = {name: engine_cache_key(**kw) for name, kw in variants.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys), keys


def _entry(env=ENV, precision="fp16"):
    ident = engine_identity("a" * 64, "unet", precision, None, trt_profile(_unet()), env)
    return {"cache_key": key_of_identity(ident), "identity": ident,
            "rebuild": rebuild_command("random:tiny", precision, {"batch": (1, 4), "height": None, "width": None})}


def test_engine_for_this_gpu_and_tensorrt_loads():
    check_engine_compatible("unet", _entry(), ENV, "out/sd")


def test_mismatched_gpu_or_tensorrt_fails_with_one_line_that_says_how_to_rebuild():
    here = TrtEnvironment(tensorrt="10.14.1.48", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    with pytest.raises(ArtifactError) as e:
        check_engine_compatible("unet", _entry(), here, "out/sd")
    msg = str(e.value)
    assert "\n" not in msg
    assert "built for NVIDIA L4 (sm_89) with TensorRT 10.13.0.35" in msg
    assert "this machine has NVIDIA H100 80GB HBM3 (sm_90) with TensorRT 10.14.1.48" in msg
    assert msg.endswith("rebuild with: diffaccel optimize random:tiny -o out/sd --backend tensorrt --precision fp16 "
                        "--batch 1-4 --force")


def test_backend_load_checks_the_gpu_before_reading_the_plan(monkeypatch, tmp_path):
    """engines.tensorrt_backend.load() refuses an engine from another GPU before touching the plan or CUDA."""
    from diffaccel.engines.backends import tensorrt as tensorrt_backend
    from diffaccel.engines.backends import tensorrt_env as trt_cache

    here = TrtEnvironment(tensorrt="10.13.0.35", gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    monkeypatch.setattr(trt_cache, "probe_environment", lambda device=0: here)
    entry = {"engine": "unet/engine/model.plan", "tensorrt": _entry()}    # the plan file does not even exist
    with pytest.raises(ArtifactError) as e:
        tensorrt_backend.load(tmp_path, "unet", entry, device="cpu")
    assert "built for NVIDIA L4 (sm_89)" in str(e.value) and "NVIDIA A100-SXM4-80GB (sm_80)" in str(e.value)
    with pytest.raises(ArtifactError, match="no TensorRT build record"):
        tensorrt_backend.load(tmp_path, "unet", {"engine": "x"}, device="cpu")


def test_ort_trt_cache_key_asks_nvml_when_torch_sees_no_gpu(monkeypatch):
    """onnxruntime-gpu beside a CPU build of torch: the EP cache key still names the GPU (from NVML)."""
    import types

    import torch

    from diffaccel.engines.backends import tensorrt_env as trt_cache

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpus = {("index", 0): (b"NVIDIA L4", (8, 9)), ("index", 1): (b"NVIDIA H100", (9, 0)),
            ("uuid", "GPU-1234"): ("NVIDIA A100", (8, 0))}
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                                 nvmlDeviceGetHandleByIndex=lambda i: ("index", i),
                                 nvmlDeviceGetHandleByUUID=lambda u: ("uuid", u),
                                 nvmlDeviceGetName=lambda h: gpus[h][0],
                                 nvmlDeviceGetCudaComputeCapability=lambda h: gpus[h][1])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = trt_cache.probe_environment_lenient(0)
    assert (env.gpu, env.compute_capability) == ("NVIDIA L4", "8.9")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")                # CUDA's device 0 is the second GPU
    assert trt_cache.probe_environment_lenient(0).gpu == "NVIDIA H100"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234,0")
    assert trt_cache.probe_environment_lenient(0).gpu == "NVIDIA A100"
    assert trt_cache.probe_environment_lenient(1).gpu == "NVIDIA L4"
    monkeypatch.setitem(sys.modules, "pynvml", None)          # not installed
    env = trt_cache.probe_environment_lenient(0)
    assert (env.gpu, env.compute_capability) == ("unknown", "0.0")


def test_edited_manifest_entry_is_refused():
    entry = _entry()
    entry["identity"]["compute_capability"] = "9.0"       # claims another GPU without rebuilding
    with pytest.raises(ArtifactError, match="does not match its cache key"):
        check_engine_compatible("unet", entry, TrtEnvironment(ENV.tensorrt, ENV.gpu, "9.0"), "out/sd")


def test_rebuild_command_names_every_shape_setting():
    cmd = rebuild_command("sd.safetensors", "int8", {"batch": (1, 1), "height": (512, 768), "width": (512, 512)},
                          static=True, components=("unet",))
    assert cmd == ("diffaccel optimize sd.safetensors -o {out} --backend tensorrt --precision int8 --batch 1 "
                   "--height 512-768 --width 512 --static-shapes --components unet --force")


def test_default_timing_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_timing_cache() == tmp_path / "diffaccel" / "trt-timing.cache"


# ---- build log and errors ----------------------------------------------------------------------------------------
def test_build_error_is_one_line_with_the_first_parser_error_and_the_log_path(tmp_path):
    sink = BuildLog()
    sink.add("INFO", "parsing")
    sink.add("ERROR", "ModelImporter.cpp:949: While parsing node number 12 [Resize]:\nunsupported mode")
    path = sink.save(tmp_path / "unet.build.log")
    assert path.read_text().splitlines() == ["[INFO] parsing", "[ERROR] ModelImporter.cpp:949: While parsing node "
                                             "number 12 [Resize]:", "unsupported mode"]
    msg = format_build_error("unet", sink, ["Resize: unsupported mode at node /up/Resize (Resize)", "second"], path)
    assert "\n" not in msg and "ONNX parser rejected the model: Resize: unsupported mode" in msg
    assert "(and 1 more)" in msg and str(path) in msg and "--opt-level 2" in msg
    builder = format_build_error("vae_decoder", sink, [], path)
    assert "the builder failed: ModelImporter.cpp:949: While parsing node number 12 [Resize]: unsupported" in builder
    assert "returned no engine" in format_build_error("unet", BuildLog(), [], path)


# ---- ONNX Runtime TensorRT EP: same key ----------------------------------------------------------------------------
def test_ort_tensorrt_ep_cache_is_keyed_and_profiled(tmp_path):
    from diffaccel.engines.backends.onnxruntime import provider_options
    from diffaccel.optimize.artifact.manifest import Manifest

    Manifest.new(tmp_path, source={"spec": "random:tiny", "sha256": "c" * 64}).save()
    entry = {"spec": _unet().to_dict(), "precision": "fp32", "backend": "onnxruntime", "provider": "tensorrt"}
    here = ort_trt_cache_dir(tmp_path, "unet", entry, ENV)
    key = engine_cache_key("c" * 64, "unet", "fp32", None, _unet().profile(), ENV)
    assert here == tmp_path / "unet" / "trt_cache" / key
    other_gpu = ort_trt_cache_dir(tmp_path, "unet", entry, TrtEnvironment(ENV.tensorrt, "NVIDIA A10", "8.6"))
    assert other_gpu != here
    opts = provider_options("TensorrtExecutionProvider", cache_dir=here, profile=_unet().profile())
    assert opts["trt_engine_cache_path"] == str(here) and opts["trt_timing_cache_path"] == str(here)
    assert opts["trt_profile_min_shapes"] == "sample:1x4x32x64,timestep:1,encoder_hidden_states:1x77x32"
    assert opts["trt_profile_max_shapes"] == "sample:8x4x96x64,timestep:8,encoder_hidden_states:8x77x32"
    assert provider_options("CUDAExecutionProvider") == {"device_id": 0}


# ---- no TensorRT here: clean refusals, lazy imports ----------------------------------------------------------------
def test_importing_diffaccel_never_imports_tensorrt_or_modelopt():
    code = ("import sys, diffaccel.engines, diffaccel.optimize\n"
            "from diffaccel.optimize.stages.plans import plans\n"
            "plans()\n"
            "import diffaccel.engines.backends.tensorrt, diffaccel.optimize.stages.tensorrt\n"
            "import diffaccel.optimize.quant.modelopt, diffaccel.engines.backends.tensorrt_env\n"
            "import diffaccel.optimize.stages.autocast, diffaccel.optimize.stages.modelopt_quantize\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'modelopt', 'pycuda', 'cuda'))\n"
            "assert not bad, bad\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_tensorrt_plans_are_registered():
    from diffaccel.optimize.api import OptimizeConfig
    from diffaccel.optimize.stages.plans import stages_for

    names = {p: [s.name for s in stages_for(OptimizeConfig(backend="tensorrt", precision=p).backend, p)]
             for p in ("fp32", "fp16", "int8", "fp8")}
    assert names["fp32"] == ["assets", "export", "engine"]
    assert names["fp16"] == ["assets", "export", "fp16", "engine"]
    assert names["int8"] == names["fp8"] == ["assets", "export", "quantize", "fp16", "engine"]


@no_trt
def test_preflight_refuses_without_tensorrt_or_cuda():
    from diffaccel.optimize.api import OptimizeConfig
    from diffaccel.optimize.stages.plans import stages_for

    for precision in ("fp32", "fp16", "int8"):
        cfg = OptimizeConfig(backend="tensorrt", precision=precision)
        with pytest.raises(BackendUnavailableError, match="TensorRT|CUDA") as e:
            for cls in stages_for(cfg.backend, cfg.precision):
                cls.preflight(cfg)
        assert "\n" not in str(e.value)


@no_trt
def test_cli_tensorrt_fails_in_one_line_and_writes_nothing(capsys, tmp_path):
    from diffaccel.optimize.cli import main

    code = main(["optimize", "random:tiny", "-o", str(tmp_path / "X"), "--backend", "tensorrt"])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("diffaccel: error: "), err
    assert "TensorRT" in lines[0] or "CUDA" in lines[0]
    assert list(tmp_path.iterdir()) == []


@no_trt
def test_loading_a_tensorrt_engine_here_fails_in_one_line(tmp_path):
    from diffaccel.engines import load_engine

    with pytest.raises(BackendUnavailableError) as e:
        load_engine("tensorrt", tmp_path, "unet", {"engine": "unet/engine/model.plan", "tensorrt": _entry()})
    assert "\n" not in str(e.value)


def test_tensorrt_dtypes_map_to_torch():
    from diffaccel.engines.backends.tensorrt import torch_dtype_name
    from diffaccel.optimize.artifact.errors import DiffaccelError

    assert [torch_dtype_name(n) for n in ("FLOAT", "HALF", "BF16", "INT32", "INT64", "BOOL")] == [
        "float32", "float16", "bfloat16", "int32", "int64", "bool"]
    assert torch_dtype_name("DataType.INT8") == "int8"
    with pytest.raises(DiffaccelError, match="FP8"):
        torch_dtype_name("FP8")


# ---- GPU + TensorRT ------------------------------------------------------------------------------------------------
def _src() -> str:
    from diffaccel.optimize.sources.builtins import ASSETS

    return "tinyshapes" if (ASSETS / "tinyshapes" / "model_index.json").is_file() else "random:tiny"


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_match_torch_on_fresh_inputs(artifacts, precision):
    import torch

    from diffaccel.engines import load_engine
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.export.parity import compare
    from diffaccel.optimize.sources import resolve_source
    from diffaccel.optimize.families.sd import export_module
    from diffaccel.optimize.artifact.specs import ComponentSpec

    out = artifacts(_src(), "tensorrt", precision)
    m = Manifest.load(out)
    m.verify()
    pipe = resolve_source(_src()).load()
    for name, entry in m.components.items():
        assert entry["backend"] == "tensorrt" and len(entry["tensorrt"]["cache_key"]) == 32
        assert (out / entry["tensorrt"]["build_log"]).is_file()
        spec = ComponentSpec.from_dict(name, entry["spec"])
        engine = load_engine("tensorrt", out, name, entry)
        inputs = spec.random_inputs(torch.Generator().manual_seed(5), **spec.alt_values())
        with torch.no_grad():
            ref = export_module(name, pipe)(*(inputs[t.name] for t in spec.inputs))
        ref = dict(zip([t.name for t in spec.outputs], ref if isinstance(ref, tuple) else (ref,)))
        got = engine(**inputs)
        assert all(t.is_cuda for t in got.values())
        tol = {"atol": spec.atol, "rtol": spec.rtol} if precision == "fp32" else {"atol": 0.0, "rtol": 0.05}
        stats = compare(ref, got, **tol, kind="max" if precision == "fp32" else "l2")
        assert all(s["passed"] for s in stats.values()), (name, stats)


@pytest.mark.gpu
@needs_trt
def test_fp16_pipeline_keeps_35db_psnr_against_fp32(artifacts):
    import torch

    from diffaccel.engines import AcceleratedStableDiffusionPipeline
    from diffaccel.optimize.sources import resolve_source

    ref_pipe = resolve_source(_src()).load()
    ref_pipe.set_progress_bar_config(disable=True)
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(artifacts(_src(), "tensorrt", "fp16"))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle on a blue background", num_inference_steps=20, output_type="np")
    ref = ref_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert got.shape == ref.shape
    assert psnr(ref, got) >= 35.0


@pytest.mark.gpu
@needs_trt
def test_int8_engine_pipeline_runs_and_records_its_quantization(artifacts):
    import numpy as np
    import torch

    from diffaccel.engines import AcceleratedStableDiffusionPipeline
    from diffaccel.optimize.artifact.manifest import Manifest

    out = artifacts(_src(), "tensorrt", "int8")
    unet = Manifest.load(out).components["unet"]
    assert unet["quantize"]["method"] == "modelopt" and unet["tensorrt"]["identity"]["quant_config_hash"]
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a green triangle", num_inference_steps=10, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(img).all() and img.std() > 0.01


@pytest.mark.gpu
@needs_trt
def test_cuda_graph_replay_matches_direct_execution(artifacts):
    import torch

    from diffaccel.engines import load_engine
    from diffaccel.optimize.config import TensorRTConfig
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.artifact.specs import ComponentSpec

    out = artifacts("random:tiny", "tensorrt", "fp16", components=("unet",), shapes=ShapeRange.parse("1", "64", "64"),
                    tensorrt=TensorRTConfig(static_shapes=True, cuda_graph=True))
    entry = Manifest.load(out).components["unet"]
    spec = ComponentSpec.from_dict("unet", entry["spec"])
    graph, plain = load_engine("tensorrt", out, "unet", entry), load_engine("tensorrt", out, "unet", entry,
                                                                             cuda_graph=False)
    for seed in (1, 2):
        x = {k: v.cuda() for k, v in spec.random_inputs(torch.Generator().manual_seed(seed),
                                                         **spec.opt_values()).items()}
        assert torch.equal(graph(**x)["out_sample"], plain(**x)["out_sample"])


@pytest.mark.gpu
@needs_trt
def test_denoiser_step_latency_tensorrt_fp16_vs_torch_fp16_eager(artifacts, capsys):
    """A benchmark, not a timed assertion: prints per-step latency of both, measured side by side."""
    import torch

    from diffaccel.engines import load_engine
    from diffaccel.eval.harness.timing import measure
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.sources import resolve_source
    from diffaccel.optimize.families.sd import export_module
    from diffaccel.optimize.artifact.specs import ComponentSpec

    out = artifacts(_src(), "tensorrt", "fp16", components=("unet",))
    entry = Manifest.load(out).components["unet"]
    spec = ComponentSpec.from_dict("unet", entry["spec"])
    x = {k: v.cuda() for k, v in spec.random_inputs(torch.Generator().manual_seed(0), **spec.opt_values()).items()}
    eager = export_module("unet", resolve_source(_src()).load()).to("cuda", torch.float16)
    trt = load_engine("tensorrt", out, "unet", entry)

    def torch_step():
        with torch.inference_mode():
            return eager(x["sample"].half(), x["timestep"].half(), x["encoder_hidden_states"].half())

    t_torch, _ = measure(torch_step, warmup=3, repeat=20, device="cuda")
    t_trt, _ = measure(lambda: trt(**x), warmup=3, repeat=20, device="cuda")
    with capsys.disabled():
        print(f"\nU-Net step {spec.opt_values()}: torch fp16 eager p50 {t_torch.p50 * 1e3:.2f} ms, TensorRT fp16 "
              f"p50 {t_trt.p50 * 1e3:.2f} ms ({t_torch.p50 / t_trt.p50:.2f}x)")
    assert t_trt.n == t_torch.n == 20


# ---- the TensorRT API surface we call, against the installed bindings (no GPU needed) ----------------------------
# Every attribute the build (optimize/stages/tensorrt_build.py), the runtime (engines/backends/tensorrt.py) and the
# logger (engines/backends/tensorrt_env.py) use. Runs wherever `import tensorrt` works (the bindings import without a GPU);
# CI has no tensorrt and skips it. Keep this list in step with those files.
TRT_API = {
    "Builder": ("create_network", "create_builder_config", "create_optimization_profile",
                "build_serialized_network"),
    "IBuilderConfig": ("builder_optimization_level", "set_memory_pool_limit", "clear_flag",
                       "add_optimization_profile", "create_timing_cache", "set_timing_cache", "get_timing_cache"),
    "OnnxParser": ("parse_from_file", "num_errors", "get_error"),
    "IOptimizationProfile": ("set_shape",),
    "ITimingCache": ("serialize",),
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                    "device_memory_size_v2", "create_execution_context"),
    "IExecutionContext": ("set_device_memory", "set_input_shape", "set_tensor_address", "get_tensor_shape",
                          "execute_async_v3"),
    "ParserError": ("desc", "node_name", "node_operator"),
    "ILogger": ("log",),
    "Dims": (),
}
TRT_ENUMS = {"MemoryPoolType": ("WORKSPACE",), "TensorIOMode": ("INPUT", "OUTPUT"),
             "ExecutionContextAllocationStrategy": ("USER_MANAGED",)}


def test_tensorrt_api_surface_exists_in_the_installed_bindings():
    trt = pytest.importorskip("tensorrt", reason="the tensorrt bindings are not installed (pip install tensorrt)")
    missing = [f"{cls}.{attr}" if attr else cls for cls, attrs in TRT_API.items()
               for attr in (attrs or ("",)) if not hasattr(trt, cls) or (attr and not hasattr(getattr(trt, cls), attr))]
    missing += [f"{enum}.{m}" for enum, members in TRT_ENUMS.items() for m in members
                if not hasattr(getattr(trt, enum, None), m)]
    assert not missing, f"TensorRT {trt.__version__} lacks {missing}"
    from diffaccel.engines.backends.tensorrt import torch_dtype_name

    for dtype in ("FLOAT", "HALF", "INT32", "INT64", "BOOL"):     # what our engines' I/O tensors can be
        assert torch_dtype_name(getattr(trt.DataType, dtype))
    for flag in ("TF32",):                                         # cleared for fp32 builds (hasattr-guarded)
        assert hasattr(trt.BuilderFlag, flag), flag


def test_api_list_covers_every_tensorrt_name_the_code_uses():
    """Keeps TRT_API honest: every ``trt.Name`` in the TensorRT glue is listed above (checked without tensorrt)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    used = set()
    for rel in ("optimize/stages/tensorrt_build.py", "engines/backends/tensorrt_env.py", "engines/backends/tensorrt.py"):
        used |= set(re.findall(r"\btrt\.([A-Za-z_]\w*)", (root / rel).read_text()))
    listed = set(TRT_API) | set(TRT_ENUMS) | {"__version__", "DataType", "BuilderFlag", "NetworkDefinitionCreationFlag"}
    assert used and used <= listed, sorted(used - listed)
