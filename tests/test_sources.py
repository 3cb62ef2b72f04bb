import json
import shutil

import pytest

from diffaccel.optimize.artifact.errors import SourceError
from diffaccel.optimize.families import configs_of, detect
from diffaccel.optimize.sources import resolve_source


def test_builtins_resolve_without_download():
    for name in ("random:tiny", "random:sd15", "random:sd21"):
        src = resolve_source(name)
        assert src.kind == "builtin" and len(src.sha256) == 64
    assert resolve_source("random:sd15").sha256 != resolve_source("random:sd21").sha256


def test_unknown_builtin_lists_known():
    with pytest.raises(SourceError, match="built-ins are: random:sd15, random:sd21, random:sd35-medium, random:sdxl"):
        resolve_source("random:sd4")


def test_random_builtin_is_deterministic():
    from diffaccel.optimize.sources.builtins import BUILTINS

    a, b = BUILTINS["random:tiny"](), BUILTINS["random:tiny"]()
    for (k, v), (_, w) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert (v == w).all(), k


def test_folder_hash_is_content_not_path(tiny_folder, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_folder, copy)
    a, b = resolve_source(str(tiny_folder)), resolve_source(str(copy))
    assert a.kind == "folder" and a.sha256 == b.sha256
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert resolve_source(str(copy)).sha256 != a.sha256


def test_folder_loads_and_matches_builtin(tiny_folder, tiny_pipe):
    pipe = resolve_source(str(tiny_folder)).load()
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    a, b = pipe.unet.state_dict(), tiny_pipe.unet.state_dict()
    assert all((a[k] == b[k]).all() for k in a)


def test_nonexistent_path():
    with pytest.raises(SourceError, match="no such file or folder"):
        resolve_source("./does/not/exist")


def test_folder_missing_component(tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(SourceError, match="missing component folder.*vae"):
        resolve_source(str(broken))


def test_folder_without_model_index(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(SourceError, match="no model_index.json"):
        resolve_source(str(tmp_path / "x"))


def test_unsupported_architecture_by_class(tiny_folder, tmp_path):
    other = tmp_path / "sdxl"
    shutil.copytree(tiny_folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionUpscalePipeline"        # (SDXL pipelines have a family now)
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match="unsupported architecture.*StableDiffusionUpscalePipeline"):
        resolve_source(str(other))


def test_unsupported_architecture_by_unet_config(tiny_pipe):
    from diffusers import UNet2DConditionModel

    class Fake:
        unet = UNet2DConditionModel(**{**tiny_pipe.unet.config, "in_channels": 7})   # (9 is inpainting now)
        vae = tiny_pipe.vae
    with pytest.raises(SourceError, match="in_channels=7"):
        detect(configs_of(Fake()), "seven channels")


def test_truncated_and_corrupt_safetensors(tiny_folder, tmp_path):
    good = (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(SourceError, match="truncated"):
        resolve_source(str(trunc))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SourceError, match="not a valid safetensors"):
        resolve_source(str(corrupt))


def test_pickle_needs_trust(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04")
    with pytest.raises(SourceError, match="--trust-pickle"):
        resolve_source(str(ckpt))
    assert resolve_source(str(ckpt), trust_pickle=True).kind == "single_file"


def test_single_file_without_config_says_what_to_do(tiny_folder, tmp_path):
    # a valid safetensors file that is not a full SD checkpoint: loading fails with advice, not a traceback
    f = tmp_path / "unet.safetensors"
    shutil.copyfile(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors", f)
    src = resolve_source(str(f))
    with pytest.raises(SourceError, match="cannot load"):
        src.load()


def test_unknown_suffix(tmp_path):
    f = tmp_path / "weights.onnx"
    f.write_bytes(b"x")
    with pytest.raises(SourceError, match="unknown checkpoint type .onnx"):
        resolve_source(str(f))
