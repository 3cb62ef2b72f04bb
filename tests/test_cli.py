"""Bad input: a one-line error naming what is wrong and what to do, exit code 2, no traceback, nothing written."""
import json
import shutil
import subprocess
import sys

import pytest

from .helpers import assert_one_line_error
from .helpers import run_cli as run


def test_nonexistent_path(capsys, tmp_path):
    code, _, err = run(capsys, "optimize", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "no such file or folder")
    assert list(tmp_path.iterdir()) == []


def test_folder_missing_a_component(capsys, tmp_path, tiny_folder):
    src = tmp_path / "src"
    shutil.copytree(tiny_folder, src)
    shutil.rmtree(src / "text_encoder")
    code, _, err = run(capsys, "optimize", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "missing component folder(s) text_encoder")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(capsys, tmp_path, tiny_folder):
    f = tmp_path / "model.safetensors"
    f.write_bytes((tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000])
    code, _, err = run(capsys, "optimize", str(f), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "truncated", "again")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors(capsys, tmp_path, tiny_folder):
    f = tmp_path / "model.safetensors"
    f.write_bytes((tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() + b"junk")
    code, _, err = run(capsys, "optimize", str(f), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "corrupt", "again")
    assert not (tmp_path / "out").exists()
    f.write_bytes(b"\xff" * 64)
    code, _, err = run(capsys, "optimize", str(f), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "not a valid safetensors file")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(capsys, tmp_path, tiny_folder):
    src = tmp_path / "src"
    shutil.copytree(tiny_folder, src)
    idx = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**idx, "_class_name": "FluxPipeline"}))
    code, _, err = run(capsys, "optimize", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "unsupported architecture", "FluxPipeline")
    assert not (tmp_path / "out").exists()


def test_unsupported_unet_is_refused_before_loading(capsys, tmp_path, tiny_folder):
    """An SDXL-style U-Net config is refused from its config.json alone: no progress lines, nothing written."""
    src = tmp_path / "src"
    shutil.copytree(tiny_folder, src)
    cfg = json.loads((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    code, _, err = run(capsys, "optimize", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "unsupported architecture", "addition_embed_type=text_time")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_pickle_without_trust_flag(capsys, tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x04N.")
    code, _, err = run(capsys, "optimize", str(tmp_path / "m.ckpt"), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "pickle", "--trust-pickle")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--backend", "coreml", "choose one of: onnxruntime, torch, tensorrt, openvino"),
    ("--precision", "int3", "choose one of: fp32, fp16, bf16, int8, fp8, w8a16, w4a16"),
    ("--height", "100", "multiples of 8"),
    ("--width", "abc", "bad width"),
    # a multiple of 8 but not of random:tiny's 16 (VAE factor 8 x one U-Net downsampler): refused from the configs,
    # before the model is loaded (a single stderr line proves no stage started)
    ("--height", "64-72", "multiple of 16"),
])
def test_bad_options(capsys, tmp_path, flag, value, needle):
    code, _, err = run(capsys, "optimize", "random:tiny", "-o", str(tmp_path / "out"), flag, value)
    assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_missing_execution_provider_fails_before_export(capsys, tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    code, _, err = run(capsys, "optimize", "random:tiny", "-o", str(tmp_path / "out"), "--provider", "cuda")
    assert_one_line_error(code, err, "execution provider cuda", "not available", "--provider cpu")
    assert list(tmp_path.iterdir()) == []


def test_out_holding_another_source(capsys, tmp_path, tiny_ort, tiny_folder):
    out = tmp_path / "art"
    shutil.copytree(tiny_ort, out)
    code, _, err = run(capsys, "optimize", str(tiny_folder), "-o", str(out))
    assert_one_line_error(code, err, "another source (random:tiny)", "--force")
    assert (out / "manifest.json").read_bytes() == (tiny_ort / "manifest.json").read_bytes()


def test_modified_engine_is_refused(capsys, tmp_path, tiny_ort):
    out = tmp_path / "art"
    shutil.copytree(tiny_ort, out)
    engine = out / "unet" / "engine" / "model.onnx"
    data = bytearray(engine.read_bytes())
    data[-10] ^= 0xFF
    engine.write_bytes(bytes(data))
    code, _, err = run(capsys, "generate", str(out), "a circle", "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "unet/engine/model.onnx (sha256 mismatch)", "--force")
    assert not (tmp_path / "x.png").exists()


def test_bad_generate_size(capsys, tmp_path, tiny_ort):
    code, _, err = run(capsys, "generate", str(tiny_ort), "a circle", "--height", "72", "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "height=72", "height must be 32-96")


def test_generate_and_info(capsys, tmp_path, tiny_ort):
    code, out, _ = run(capsys, "generate", str(tiny_ort), "a red circle", "--steps", "3", "--num-images", "2",
                       "--scheduler", "EulerDiscreteScheduler", "-o", str(tmp_path / "img.png"))
    assert code == 0 and (tmp_path / "img-0.png").is_file() and (tmp_path / "img-1.png").is_file()
    assert "(guidance 7.5)" in out                       # random:tiny has no recommended guidance
    code, out, _ = run(capsys, "generate", str(tiny_ort), "a red circle", "--steps", "2", "--guidance", "3",
                       "-o", str(tmp_path / "g3.png"))
    assert code == 0 and "(guidance 3)" in out and (tmp_path / "g3.png").is_file()
    code, out, _ = run(capsys, "info", str(tiny_ort), "--verify")
    assert code == 0 and "unet" in out and "verified" in out and "onnxruntime" in out


def test_real_console_script_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffaccel.optimize.cli", "optimize", str(tmp_path / "missing"),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file or folder" in proc.stderr
    help_ = subprocess.run([sys.executable, "-m", "diffaccel.optimize.cli", "optimize", "--help"],
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "--precision" in help_.stdout and "Built-in sources" in help_.stdout


def test_full_disk_is_one_line_not_a_traceback(capsys, tmp_path, monkeypatch):
    """A build that runs out of disk (an SDXL U-Net writes tens of GB) ends with one line saying so and what to do;
    other OSErrors are not dressed up as a full disk."""
    import errno

    import diffaccel.optimize.api as api

    def full(ctx):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "unet" / "model.onnx.data"))

    monkeypatch.setattr(api, "_run_stages", full)
    code, _, err = run(capsys, "optimize", "random:tiny", "-o", tmp_path / "o")
    assert_one_line_error(code, err, "no space left", "model.onnx.data", "df -h", "same command again")

    def other(ctx):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(api, "_run_stages", other)
    with pytest.raises(PermissionError):
        run(capsys, "optimize", "random:tiny", "-o", tmp_path / "o2")
