"""What a build costs the host: each stage's peak RSS and time, in the manifest, the stage summary and `info`."""
import subprocess
import sys

from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.cli.progress import format_info
from diffaccel.optimize.stages.resources import StagePeak, peak_rss_bytes, reset_peak


def test_stage_peak_sees_a_block_and_resets_between_blocks():
    with StagePeak() as big:
        block = bytearray(200 << 20)
        block[:: 4096] = b"x" * len(block[:: 4096])     # touch every page
        del block
    with StagePeak() as small:
        pass
    assert big.peak_bytes >= 200 << 20
    if big.method == "stage":      # Linux: the second block's peak forgets the first's
        assert small.peak_bytes < big.peak_bytes - (150 << 20)
    assert reset_peak() in (True, False) and peak_rss_bytes() > 0


def test_every_stage_records_its_peak_and_time(tiny_ort_ts):
    m = Manifest.load(tiny_ort_ts)
    assert m.stages
    for name, stage in m.stages.items():
        assert stage["peak_rss_bytes"] > 50e6, name            # at least the Python + torch process
        assert stage["peak_rss_scope"] in ("stage", "process") and stage["seconds"] >= 0
    info = format_info(m)
    for name, stage in m.stages.items():
        assert f"{stage['peak_rss_bytes'] / 1e9:.2f} GB" in info


def test_cli_stage_summary_prints_peak_rss(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "diffaccel.optimize.cli", "optimize", "random:tiny", "-o", str(out),
                           "--components", "text_encoder", "--exporter", "torchscript"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "peak RSS" in proc.stderr and "export: done in" in proc.stderr


# ---- pre-flight: refuse a build that cannot fit, before any work (simulated limits; nothing exhausts memory) ----
def test_estimate_grows_with_the_model_and_names_the_stage():
    from diffaccel.optimize.stages.resources import estimate_peak

    small, _ = estimate_peak(["assets", "export", "engine"], total=4e6, largest=3e6)
    fp32, stage32 = estimate_peak(["assets", "export", "engine"], total=4.3e9, largest=3.4e9)
    int8, stage8 = estimate_peak(["assets", "export", "quantize", "engine"], total=4.3e9, largest=3.4e9)
    assert small < fp32 < int8 and stage8 == "quantize" and stage32 in ("export", "engine")


def test_low_limit_refuses_before_any_work(tmp_path):
    import pytest

    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.artifact.errors import MemoryBudgetError

    with pytest.raises(MemoryBudgetError) as err:
        optimize("random:tiny", tmp_path / "o", OptimizeConfig(precision="int8", memory_limit=200_000_000))
    msg = str(err.value)
    assert "\n" not in msg and "needs about" in msg and "--memory-limit gives 0.2 GB" in msg
    assert "--calib-size" in msg and "--no-memory-check" in msg
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


def test_cli_refusal_is_one_line_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffaccel.optimize.cli", "optimize", "random:tiny", "-o",
                           str(tmp_path / "o"), "--memory-limit", "100M"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "memory" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "diffaccel.optimize.cli", "optimize", "random:tiny", "-o",
                          str(tmp_path / "o"), "--memory-limit", "lots"], capture_output=True, text=True)
    assert bad.returncode == 2 and "write it like 16G" in bad.stderr


def test_manifest_records_the_estimate(tiny_ort_ts):
    est = Manifest.load(tiny_ort_ts).get("memory_estimate")
    assert est["estimated_peak_bytes"] > 0 and est["available_bytes"] > est["estimated_peak_bytes"]
