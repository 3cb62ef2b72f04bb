"""What a build costs the host: each stage's peak RSS and time, in the manifest, the stage summary and `info`."""
import pytest

from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.cli.progress import format_info
from diffaccel.optimize.memory import PeakWatch, current_rss_bytes, high_water_mark_bytes

from .helpers import assert_one_line_error, run_cli

MB = 1 << 20


def test_peak_watch_sees_a_block_and_nested_blocks_without_resetting_the_process_peak():
    import time

    import numpy as np

    with PeakWatch() as stage:
        with PeakWatch() as big:
            block = np.ones(200 * MB, dtype=np.uint8)         # touched: resident
            time.sleep(0.2)                                   # the sampler's turn (a freed spike may precede it)
            del block
        with PeakWatch() as small:
            pass
    assert big.peak_bytes >= current_rss_bytes() + 150 * MB and big.method
    assert small.peak_bytes < big.peak_bytes - 150 * MB      # each block its own peak ...
    assert stage.peak_bytes >= big.peak_bytes                 # ... and the enclosing one covers both
    assert high_water_mark_bytes() >= big.peak_bytes          # the process's own peak is intact
    assert stage.record()["peak_rss_bytes"] == stage.peak_bytes


def test_a_build_keeps_the_process_peak_and_records_each_stages(tmp_path):
    """In a fresh process: a build's own peak is its high-water mark, exactly; after a larger spike, a second build
    leaves the process's high-water mark (what /usr/bin/time -v and getrusage report) where the spike put it, and
    still records every stage's and item's own peak."""
    import json
    import subprocess
    import sys

    code = """if True:
        import json, resource, sys
        from diffaccel.optimize import OptimizeConfig, optimize
        from diffaccel.optimize.memory import high_water_mark_bytes
        cfg = OptimizeConfig(components=("text_encoder",), exporter="torchscript")
        out = {}
        for name in ("quiet", "after-spike"):
            if name == "after-spike":
                spike = bytearray(high_water_mark_bytes() + (1 << 30))   # 1 GiB above anything held so far
                spike[::4096] = b"x" * len(spike[::4096])
                del spike
            before = high_water_mark_bytes()
            m = optimize("random:tiny", sys.argv[1] + "/" + name, cfg)
            out[name] = {"before": before, "hwm": high_water_mark_bytes(),
                         "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                         "stages": {k: v for k, v in m.stages.items()}}
        print(json.dumps(out))
    """
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    builds = json.loads(run.stdout.strip().splitlines()[-1])
    for name, b in builds.items():
        peaks = {k: v["peak_rss_bytes"] for k, v in b["stages"].items()}
        assert set(peaks) == {"assets", "export", "engine"} and min(peaks.values()) > 50e6, (name, peaks)
        assert all(b["hwm"] >= p for p in peaks.values()), (name, b["hwm"], peaks)
        # the kernel's counters are approximate (per-CPU batches): a later reading may dip a few hundred KB
        assert all(b["maxrss"] >= p - (1 << 20) for p in peaks.values()), (name, b["maxrss"], peaks)
        for stage in ("export", "engine"):
            items = b["stages"][stage]["component_peak_rss_bytes"]
            assert set(items) == {"text_encoder"} and 50e6 < items["text_encoder"] <= peaks[stage], (name, stage)
        assert all(v["peak_rss_scope"] == "stage" and v["peak_rss_method"] for v in b["stages"].values())
    quiet, spiked = builds["quiet"], builds["after-spike"]
    assert max(quiet["stages"].values(), key=lambda v: v["peak_rss_bytes"])["peak_rss_method"] == "high-water mark"
    assert max(v["peak_rss_bytes"] for v in quiet["stages"].values()) >= 0.97 * quiet["hwm"]   # the build's peak
    assert spiked["hwm"] >= spiked["before"] > quiet["hwm"] + 0.9 * (1 << 30)   # not reset by the second build
    assert spiked["maxrss"] >= spiked["before"] - (1 << 20)
    assert all(v["peak_rss_bytes"] < spiked["before"] for v in spiked["stages"].values())   # each stage its own


def test_every_stage_records_its_peak_and_time(tiny_ort_ts):
    m = Manifest.load(tiny_ort_ts)
    assert m.stages
    for name, stage in m.stages.items():
        assert stage["peak_rss_bytes"] > 50e6, name            # at least the Python + torch process
        assert stage["peak_rss_scope"] == "stage" and stage["seconds"] >= 0
        assert stage["peak_rss_method"] in ("high-water mark", "sampled every 20 ms"), name
    info = format_info(m)
    for name, stage in m.stages.items():
        assert f"{stage['peak_rss_bytes'] / 1e9:.2f} GB" in info


def test_cli_stage_summary_prints_peak_rss(tmp_path, capsys):
    # in this process (the `python -m diffaccel.optimize.cli` entry point is test_cli's)
    code, _, err = run_cli(capsys, "optimize", "random:tiny", "-o", tmp_path / "o", "--components", "text_encoder",
                           "--exporter", "torchscript")
    assert code == 0, err[-2000:]
    assert "peak RSS" in err and "export: done in" in err


# ---- pre-flight: refuse a build that cannot fit, before any work (simulated limits; nothing exhausts memory) ----
def test_estimate_grows_with_the_model_and_names_the_stage():
    from diffaccel.optimize.stages.resources import estimate_peak

    small, _ = estimate_peak(["assets", "export", "engine"], total=4e6, largest=3e6)
    fp32, stage32 = estimate_peak(["assets", "export", "engine"], total=4.3e9, largest=3.4e9)
    int8, stage8 = estimate_peak(["assets", "export", "quantize", "engine"], total=4.3e9, largest=3.4e9)
    bigger = estimate_peak(["assets", "export", "engine"], total=4.3e9, largest=3.4e9, attention=4e9)[0]
    assert small < fp32 <= int8 < bigger and stage32 in ("export", "engine")
    # SD 1.5 within the memory issue's bound (1.6 x largest + 1.5 GB)
    assert int8 <= 1.6 * 3.4e9 + 1.5e9 + 0.5e9


def test_low_limit_refuses_before_any_work(tmp_path):
    import pytest

    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.artifact.errors import MemoryBudgetError

    with pytest.raises(MemoryBudgetError) as err:
        optimize("random:tiny", tmp_path / "o", OptimizeConfig(precision="int8", memory_limit=200_000_000))
    msg = str(err.value)
    assert "\n" not in msg and "needs about" in msg and "--memory-limit gives 0.2 GB" in msg
    assert "--height/--width" in msg and "--no-memory-check" in msg
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_machine_limit_is_read_and_the_check_can_be_turned_off(tmp_path, monkeypatch):
    import dataclasses

    import pytest

    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.artifact.errors import MemoryBudgetError
    from diffaccel.optimize.stages import resources

    monkeypatch.setattr(resources, "available_memory", lambda: (300_000_000, "available system memory"))
    cfg = OptimizeConfig(components=("text_encoder",), exporter="torchscript")
    with pytest.raises(MemoryBudgetError, match="available system memory gives 0.3 GB"):
        optimize("random:tiny", tmp_path / "o", cfg)

    m = optimize("random:tiny", tmp_path / "o", dataclasses.replace(cfg, memory_check=False))
    assert m.get("memory_estimate") is None and (tmp_path / "o" / "manifest.json").is_file()


def test_cli_refusal_is_one_line_with_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "optimize", "random:tiny", "-o", tmp_path / "o", "--memory-limit", "100M")
    assert_one_line_error(code, err, "memory")
    code, _, err = run_cli(capsys, "optimize", "random:tiny", "-o", tmp_path / "o", "--memory-limit", "lots")
    assert code == 2 and "write it like 16G" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_manifest_records_the_estimate(tiny_ort_ts):
    est = Manifest.load(tiny_ort_ts).get("memory_estimate")
    assert est["estimated_peak_bytes"] > 0 and est["available_bytes"] > est["estimated_peak_bytes"]


# ---- one copy of a model's weights at a time -------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded_build(tmp_path_factory):
    """One fp32 build of random:tiny (legacy exporter, every component) that records the stages it starts and the
    models it reads alone: (manifest, stage names, Source.load_models calls)."""
    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.sources import Source
    from diffaccel.optimize.stages.base import Reporter

    events, asked = [], []

    class Recorder(Reporter):
        def stage_start(self, name, items):
            events.append(name)

    real = Source.load_models
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Source, "load_models", lambda self, names: asked.append(tuple(names)) or real(self, names))
        m = optimize("random:tiny", tmp_path_factory.mktemp("recorded") / "o", OptimizeConfig(exporter="torchscript"),
                     reporter=Recorder())
    return m, events, asked


def test_later_stages_check_engines_without_reloading_the_pipeline(recorded_build):
    """The export records PyTorch's outputs on the parity inputs; the engine stage checks against them, so an fp32
    build loads the torch pipeline once (assets/export), never again for the engine's parity."""
    m, events, _ = recorded_build
    assert events.count("load") == 1, events
    assert events.index("load") < events.index("engine")
    for comp, entry in m.components.items():
        assert entry["validation"]["passed"], comp
        ref = m.stages["export"]["components"][comp]["reference"]
        assert (m.root / ref).is_file() and any(f["path"] == ref for f in m.stages["export"]["files"])
    assert set(m.stages["export"]["component_peak_rss_bytes"]) == set(m.components)


def test_recorded_reference_answers_the_same_parity_inputs_and_catches_a_wrong_engine(tiny_ort_ts):
    import pytest
    import torch

    from diffaccel.engines.backends.onnxruntime import OrtEngine
    from diffaccel.optimize.artifact.errors import ParityError
    from diffaccel.optimize.export.parity import RecordedReference, check_parity

    m = Manifest.load(tiny_ort_ts)
    from diffaccel.optimize.artifact.specs import ComponentSpec

    spec = ComponentSpec.from_dict("vae_decoder", m.components["vae_decoder"]["spec"])
    ref = RecordedReference.load(tiny_ort_ts / m.stages["export"]["components"]["vae_decoder"]["reference"])
    assert ref.covers(spec)
    engine = OrtEngine(tiny_ort_ts / m.components["vae_decoder"]["engine"])
    assert check_parity(spec, ref, engine)["passed"]
    with pytest.raises(ParityError):
        check_parity(spec, ref, lambda **x: {k: v + 0.5 for k, v in engine(**x).items()})
    assert not ref.covers(spec, seed=99)          # other inputs are not answered from the recording
    with pytest.raises(KeyError):
        ref(**spec.random_inputs(torch.Generator().manual_seed(99), **spec.opt_values()))


def test_gathered_external_data_is_one_aligned_file_that_runs(tiny_ort_ts, tmp_path):
    """Loose external weight files (the legacy exporter writes one per tensor above 2 GB) are streamed into one
    aligned file beside the model (never loaded whole), and the model still runs the same."""
    import onnx
    import torch
    from onnx.external_data_helper import _get_all_tensors

    from diffaccel.engines.backends.onnxruntime import OrtEngine
    from diffaccel.optimize.artifact.specs import ComponentSpec
    from diffaccel.optimize.export import onnx_export

    m = Manifest.load(tiny_ort_ts)
    src = tiny_ort_ts / m.stages["export"]["outputs"]["text_encoder"]
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(raw), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(raw.parent.iterdir())) > 10          # one file per tensor
    dst = tmp_path / "out" / "model.onnx"
    dst.parent.mkdir()
    onnx_export.gather_external_data(raw, dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    model = onnx.load(str(dst), load_external_data=False)
    ext = [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(ext) > 10
    assert all({e.key: e.value for e in t.external_data}["location"] == "model.onnx.data" for t in ext)
    assert all(int({e.key: e.value for e in t.external_data}["offset"]) % onnx_export.ALIGNMENT == 0 for t in ext)
    spec = ComponentSpec.from_dict("text_encoder", m.components["text_encoder"]["spec"])
    inputs = spec.random_inputs(torch.Generator().manual_seed(0), **spec.opt_values())
    want, got = OrtEngine(src)(**inputs), OrtEngine(dst)(**inputs)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_ranges_collected_one_sample_at_a_time_equal_the_all_at_once_call(tiny_ort_ts, tmp_path):
    """Min-max ranges merged per sample (bounded memory, whatever the calibration size) are ORT's own all-at-once
    ranges, so the int8 model is unchanged."""
    import torch
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, load_tensors_data

    from diffaccel.optimize.artifact.specs import ComponentSpec
    from diffaccel.optimize.quant.calibration import CalibrationReader, write_range_cache
    from diffaccel.optimize.quant.ort_static import QUANT_OPS

    m = Manifest.load(tiny_ort_ts)
    src = tiny_ort_ts / m.stages["export"]["outputs"]["unet"]
    spec = ComponentSpec.from_dict("unet", m.components["unet"]["spec"])
    gen = torch.Generator().manual_seed(0)
    samples = [spec.random_inputs(gen, **spec.opt_values()) for _ in range(4)]
    write_range_cache(src, samples, QUANT_OPS, tmp_path / "ours.json", external=False)
    ours = load_tensors_data(tmp_path / "ours.json").data
    calibrator = create_calibrator(src, list(QUANT_OPS), augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(CalibrationReader(samples))
    theirs = calibrator.compute_data().data
    assert set(ours) == set(theirs) and len(ours) > 10
    for name, td in theirs.items():
        lo, hi = td.range_value
        mine = ours[name].range_value
        assert mine[0].tobytes() == lo.tobytes() and mine[1].tobytes() == hi.tobytes(), name


def test_export_lets_go_of_the_torch_weights(tiny_pipe, tmp_path):
    """onnxscript's rewrite rules keep the last graph they matched (and the torch weights in its initializers);
    the export clears them, so a component's weights are freed once the stage drops its module."""
    import gc
    import weakref

    import torch

    from diffaccel.optimize.config import Exporter, ShapeRange
    from diffaccel.optimize.export.onnx_export import export_onnx
    from diffaccel.optimize.families import sd

    spec = sd.specs(sd.ModelGeometry.from_pipeline(tiny_pipe), ShapeRange())["vae_decoder"]
    module = sd.export_module("vae_decoder", tiny_pipe)
    weight = torch.nn.Parameter(tiny_pipe.vae.post_quant_conv.weight.detach().clone())
    alive = weakref.ref(weight)
    original = tiny_pipe.vae.post_quant_conv.weight
    tiny_pipe.vae.post_quant_conv.weight = weight         # a tensor only this test and the export can hold
    try:
        export_onnx(spec, module, tmp_path / "model.onnx", exporter=Exporter.DYNAMO)
    finally:
        tiny_pipe.vae.post_quant_conv.weight = original
    del module, weight
    gc.collect()
    assert alive() is None


# ---- one component's weights at a time: models read alone -------------------------------------------------------
@pytest.mark.parametrize("name", ["random:tiny", "random:tiny-xl"])
def test_a_recipes_models_alone_have_the_pipelines_weights(name):
    import torch

    from diffaccel.optimize.sources.builtins import BUILTINS, random_models

    pipe = BUILTINS[name]()
    for model in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if name.endswith("xl") else ()):
        alone = random_models(name, [model])
        assert list(alone) == [model]
        want, got = getattr(pipe, model).state_dict(), alone[model].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), model


def test_a_folders_models_are_read_alone(tiny_pipe, tmp_path):
    import torch

    from diffaccel.optimize.sources import resolve_source

    tiny_pipe.save_pretrained(tmp_path / "sd")
    src = resolve_source(str(tmp_path / "sd"))
    assert src.loads_models_alone
    models = src.load_models(["vae"])
    assert list(models) == ["vae"] and not models["vae"].training
    want = tiny_pipe.vae.state_dict()
    assert all(torch.equal(want[k], v) for k, v in models["vae"].state_dict().items())
    (tmp_path / "sd" / "unet" / "config.json").write_text("{")
    with pytest.raises(Exception, match="cannot load unet of"):
        src.load_models(["unet"])


def test_export_reads_each_component_alone(recorded_build):
    """With a source that can, the export stage reads one model per component and never holds the pipeline."""
    _, _, asked = recorded_build
    assert sorted(asked) == [("text_encoder",), ("unet",), ("vae",), ("vae",)]


def test_reading_models_alone_and_fused_attention_lower_the_estimate():
    """random:sd15 measured 5.31 GB (export) and 5.43 GB (engine) with both; the estimate follows the build."""
    from diffaccel.optimize.stages.resources import estimate_peak

    stages = ["assets", "export", "engine"]
    before, _ = estimate_peak(stages, 4.26e9, 3.44e9)
    after, stage = estimate_peak(stages, 4.26e9, 3.44e9, alone=True, fused=True)
    assert after < before and stage in ("export", "engine") and abs(after - 5.43e9) < 0.3e9
    # SDXL (13.9 GB pipeline, 10.3 GB U-Net, 1.34 GB scores at 1024x1024; measured 14.37 GB in assets, 13.9 GB in
    # the U-Net items of export and engine): the pipeline in assets is the peak
    need, stage = estimate_peak(stages, 13.9e9, 10.3e9, attention=1.34e9, latent_area=128 * 128, alone=True, fused=True)
    assert stage == "assets" and need < 18e9
    later, _ = estimate_peak(["export", "engine"], 13.9e9, 10.3e9, attention=1.34e9, latent_area=128 * 128,
                             alone=True, fused=True)
    assert abs(later - 13.9e9) < 0.6e9
