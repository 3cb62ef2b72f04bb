"""The optimum-intel peer and the microbench's per-variant processes.

Always run: an absent peer is a skipped row with the install command (eval and microbench), the instrument times
another runtime's model parts through their ``forward``, the microbench times each variant in its own process over
two passes in opposite orders. Only with the ``openvino-peer`` extra and optimum-intel installed: the peer exported
by optimum-intel from random:tiny matches PyTorch, and its U-Net is timed inside ``diffaccel eval``."""
import pytest

from diffaccel.eval.harness import peers_optimum
from diffaccel.optimize.artifact.errors import BackendUnavailableError


def _peer_reason() -> "str | None":
    try:
        peers_optimum.optimum_intel()
    except BackendUnavailableError as e:
        return str(e)
    return None


PEER_ABSENT = _peer_reason()
needs_peer = pytest.mark.skipif(PEER_ABSENT is not None, reason=f"optimum-intel peer absent: {PEER_ABSENT}")


def test_an_absent_peer_is_a_skipped_row_with_the_install_command(monkeypatch):
    from diffaccel.eval.harness.runner import RunPlan, run_variant
    from diffaccel.eval.harness.variants import PEERS, Variant
    from diffaccel.optimize.stages.base import Reporter

    def absent():
        raise BackendUnavailableError(f"optimum-intel is not usable here (No module named 'optimum'); install the "
                                      f"peer with: {peers_optimum.INSTALL}")

    monkeypatch.setattr(peers_optimum, "optimum_intel", absent)
    assert {"optimum-intel-fp32", "optimum-intel-bf16", "optimum-intel-int8"} <= set(PEERS)
    rp = RunPlan(["a red circle"], (0,), (2,), (1,), 64, 64, 2.0, 0, 1, "cpu")
    variant = Variant("optimum-intel-int8", "peer", lambda: object(), PEERS["optimum-intel-int8"], {"device": "cpu"})
    run = run_variant(variant, rp, Reporter())
    assert run.row["status"] == "skipped" and "openvino-peer" in run.row["error"] and not run.outputs
    # the same exception from an artifact is an error, not a skip
    broken = Variant("openvino-bf16", "artifact", absent, None, {"device": "cpu"})
    with pytest.raises(BackendUnavailableError):
        run_variant(broken, rp, Reporter())


def test_instrument_times_another_runtimes_model_parts_through_forward():
    from diffaccel.eval.harness.instrument import instrument
    from diffaccel.eval.harness.timing import Clock

    class Part:                       # optimum-intel's OVModelUnet: not a torch Module, no engine, a forward
        config = {"in_channels": 4}

        def forward(self, sample):
            return sample + 1

        def __call__(self, *args, **kwargs):
            return self.forward(*args, **kwargs)

    pipe = type("Pipe", (), {})()
    pipe.unet, pipe.text_encoder = Part(), Part()
    with instrument(pipe, Clock()) as timings:
        assert pipe.unet(1) == 2 and pipe.unet(2) == 3 and pipe.text_encoder(0) == 1
    assert len(timings.samples("denoiser")) == 2 and len(timings.samples("text_encoder")) == 1
    assert "forward" not in vars(pipe.unet)          # restored


def test_microbench_runs_each_variant_in_its_own_process_over_two_passes(tmp_path, monkeypatch):
    """The orchestration, with a stand-in child (tests/microbench_stand_in.py): fast, and each row names its pids."""
    from pathlib import Path

    from diffaccel.eval.harness.isolated import format_isolated, run_isolated
    from diffaccel.eval.harness.microbench import StepBenchConfig
    from diffaccel.optimize.sources import resolve_source

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("STAND_IN_DIR", str(tmp_path))
    cfg = StepBenchConfig(src="random:tiny", variants=("slow/fp32", "fast/int8", "peer/int8"), repeat=3)
    assert cfg.isolation == "process" and cfg.passes == 2          # the default
    result = run_isolated(cfg, list(cfg.variants), ["fast/int8", "peer/int8"], "tests.microbench_stand_in",
                          resolve_source("random:tiny"))
    assert result["passes"] == [["slow/fp32", "fast/int8"], ["fast/int8", "slow/fp32"]]
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["peer/int8"] == {"variant": "peer/int8", "skipped": "not installed here"}
    slow, fast = rows["slow/fp32"], rows["fast/int8"]
    assert slow["pass_medians"] == [0.04, 0.08] and fast["pass_medians"] == [0.01, 0.02]
    assert slow["stats"]["median_of_medians"] == pytest.approx(0.06) and fast["speedup_vs_first"] == pytest.approx(4)
    assert fast["pass_speedups"] == pytest.approx([4, 4]) and fast["build_seconds"] == 0.5
    pids = [p for r in (slow, fast) for p in r["pids"]]
    assert len(set(pids)) == 4 and slow["own_pid"] == slow["pids"][0]   # one process per variant and pass
    table = format_isolated(result)
    assert "pass 2: fast/int8, slow/fp32" in table and "AMX: " in table and "peer/int8" in table
    assert "60.00" in table and "4.00 / 4.00" in table
    # the stand-in's two passes are 2x apart: the headline ratio is withheld and the note says why
    assert slow["unstable"] == fast["unstable"] == ["pass medians 2.0x apart"] and "4.00x" not in table
    assert "unstable  4.00 / 4.00" in table and "slow/fp32: pass medians 2.0x apart" in table


def test_a_microbench_child_times_one_variant_and_skips_an_absent_peer(tmp_path, monkeypatch):
    import json

    from diffaccel.eval.harness import bench_variants
    from diffaccel.eval.harness.microbench import StepBenchConfig, main

    cfg = json.dumps({"src": "random:tiny", "height": 64, "width": 64, "warmup": 1, "repeat": 3,
                      "work": str(tmp_path)})
    assert main([cfg, "torch/fp32", str(tmp_path / "t.json")]) == 0
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["variant"] == "torch/fp32" and len(record["samples"]) == 3 and min(record["samples"]) > 0

    def absent(*_a, **_k):
        raise BackendUnavailableError("optimum-intel is not usable here (No module named 'optimum')")

    monkeypatch.setattr(bench_variants, "peer", absent)
    assert main([cfg, "optimum-intel/int8", str(tmp_path / "p.json"), "--build-only"]) == 0
    assert "not usable" in json.loads((tmp_path / "p.json").read_text())["skipped"]
    assert main([cfg, "onnxruntime/int4", str(tmp_path / "x.json")]) == 2        # a real error is not a skip
    assert not (tmp_path / "x.json").exists() and StepBenchConfig().isolation == "process"


def test_microbench_refuses_bad_settings():
    from diffaccel.eval.harness.microbench import StepBenchConfig, parse_variant
    from diffaccel.optimize.artifact.errors import DiffaccelError
    from diffaccel.optimize.config import QuantConfig

    with pytest.raises(ValueError, match="isolation 'threads'.*process, interleaved"):
        StepBenchConfig(isolation="threads")
    with pytest.raises(ValueError, match="passes 0"):
        StepBenchConfig(passes=0)
    with pytest.raises(DiffaccelError, match="no exporter"):
        parse_variant("optimum-intel/int8@torchscript")
    with pytest.raises(DiffaccelError, match=r"bad variant option 'int4-scores'.*\+int8-scores"):
        parse_variant("openvino/int8+int4-scores")
    with pytest.raises(DiffaccelError, match="int8 variants take"):
        parse_variant("openvino/bf16+int8-scores")
    with pytest.raises(DiffaccelError, match="diffaccel's own int8 builds"):
        parse_variant("optimum-intel/int8+int8-scores")
    with pytest.raises(ValueError, match="attention scores 'int4' must be float or int8"):
        QuantConfig(attention_scores="int4")


@pytest.mark.parametrize("src", ["random:tiny", "tinyshapes"])
def test_engine_processes_make_the_same_inputs_without_loading_weights(src):
    from diffaccel.eval.harness.bench_variants import denoiser_spec, make_inputs
    from diffaccel.eval.harness.microbench import StepBenchConfig
    from diffaccel.optimize.sources import resolve_source

    source, cfg = resolve_source(src), StepBenchConfig(src=src, height=64, width=64)
    (fam, from_configs), (_, from_pipe) = denoiser_spec(source, cfg), denoiser_spec(source, cfg, source.load())
    assert from_configs.to_dict() == from_pipe.to_dict() and fam.DENOISER in from_configs.name
    a, b = make_inputs(from_configs, cfg), make_inputs(from_pipe, cfg)
    assert list(a) == [t.name for t in from_configs.inputs] and all((a[k] == b[k]).all() for k in a)


@needs_peer
@pytest.mark.slow
def test_the_peer_exports_the_same_source_with_optimum_intel(tmp_path):
    import torch

    from diffaccel.eval.harness.bench_variants import prepare_variant
    from diffaccel.eval.harness.microbench import StepBenchConfig
    from diffaccel.optimize.sources import resolve_source

    source = resolve_source("random:tiny")
    cfg = StepBenchConfig(src="random:tiny", height=64, width=64, work=str(tmp_path))
    run, inputs, facts = prepare_variant(cfg, source, ("optimum-intel", "fp32", None))
    assert facts["ov_config"]["INFERENCE_PRECISION_HINT"] == "f32" and "optimum-intel" in facts["versions"]
    assert (tmp_path / "random_tiny-optimum-intel-float" / "unet" / "openvino_model.xml").is_file()
    pipe = source.load()
    with torch.inference_mode():
        want = pipe.unet(inputs["sample"], inputs["timestep"][0], inputs["encoder_hidden_states"]).sample
    got = run(inputs)[0]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-3), (got - want).abs().max()


@needs_peer
@pytest.mark.slow
def test_eval_times_the_peers_unet_per_step(tmp_path):
    from diffaccel.eval.harness.evaluate import EvalConfig, evaluate

    config = EvalConfig(prompts=("a red circle",), seeds=(0,), steps=(3,), batch_sizes=(1,), repeat=1, warmup=0,
                        height=64, width=64, peers=("optimum-intel-fp32",), adherence=False)
    report = evaluate([], baseline="random:tiny", config=config, out_dir=tmp_path / "r")
    row = {v["name"]: v for v in report["variants"]}["optimum-intel-fp32"]
    assert row["status"] == "ok", row["error"]
    assert row["latency"]["denoiser_step"]["n"] == 3                    # one timed U-Net call per step
    assert row["quality"]["aggregate"]["psnr_mean"] > 30             # the same weights as the baseline

