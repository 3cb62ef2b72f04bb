"""Single-file (.safetensors, original LDM layout) checkpoints load offline with a diffusers config folder."""
import pytest
import torch
from safetensors.torch import save_file

from diffaccel.optimize.artifact.errors import SourceError
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.sources import resolve_source

from .helpers import run_cli
from .ldm_format import pipeline_to_ldm, tiny_sd1_pipeline


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    pipe = tiny_sd1_pipeline()
    pipe.save_pretrained(str(root / "config"))
    save_file(pipeline_to_ldm(pipe), str(root / "model.safetensors"))
    return pipe, root / "model.safetensors", root / "config"


def test_loads_with_the_same_weights(single_file):
    pipe, path, config = single_file
    src = resolve_source(str(path), single_file_config=str(config))
    assert src.kind == "single_file" and len(src.sha256) == 64
    loaded = src.load()
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        missing = [k for k in a if k not in b]
        assert not missing, (name, missing[:5])
        bad = [k for k in a if not torch.equal(a[k], b[k].reshape(a[k].shape))]
        assert not bad, (name, bad[:5])


def test_cli_optimizes_a_single_file(single_file, tmp_path, capsys):
    _, path, config = single_file
    code, _, err = run_cli(capsys, "optimize", path, "--config", config, "-o", tmp_path / "out",
                           "--exporter", "torchscript", "--components", "unet")
    assert code == 0, err
    m = Manifest.load(tmp_path / "out")
    assert m.source["kind"] == "single_file" and m.components["unet"]["validation"]["passed"]


def test_config_folder_is_checked(single_file, tmp_path):
    _, path, _ = single_file
    with pytest.raises(SourceError, match="no model_index.json"):
        resolve_source(str(path), single_file_config=str(tmp_path))
