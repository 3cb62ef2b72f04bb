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
