"""Recipes written to disk tensor by tensor (optimize/sources/on_disk.py): the path full-size ``random:*`` recipes take,
exercised on ``random:tiny`` with the size threshold at zero."""
import hashlib
import weakref

import pytest
import torch

from diffaccel.optimize.artifact.errors import SourceError
from diffaccel.optimize.sources import on_disk, resolve_source


@pytest.fixture
def on_disk_tiny(tmp_path, monkeypatch):
    """random:tiny takes the on-disk path, its cache in tmp_path."""
    monkeypatch.setattr(on_disk, "ON_DISK_BYTES", 0)
    monkeypatch.setattr(on_disk, "_SIZES", {})
    monkeypatch.setenv(on_disk.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "recipes"


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_a_recipe_on_disk_is_a_diffusers_folder_that_loads_and_runs(on_disk_tiny):
    from diffaccel.optimize.families import configs_of, detect

    pipe = resolve_source("random:tiny").load()
    folders = list(on_disk_tiny.iterdir())
    assert [f.name.split("-")[0] for f in folders] == ["tiny"] and (folders[0] / "model_index.json").is_file()
    assert sorted(_digests(folders[0])) == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model."
                                            "safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert detect(configs_of(pipe), "random:tiny").NAME == "sd"
    norm = pipe.unet.conv_norm_out
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))
    w = pipe.unet.conv_in.weight
    assert 0 < w.abs().max() <= 1 / (4 * 3 * 3) ** 0.5 and w.std() > 0.05      # uniform in +-1/sqrt(fan_in)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()
    # a build reads one model at a time from the same folder: the same weights
    alone = resolve_source("random:tiny").load_models(["unet"])["unet"]
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), pipe.unet.state_dict().values()))


def test_the_same_recipe_gives_the_same_bytes_and_the_cache_is_reused(on_disk_tiny, tmp_path, monkeypatch):
    resolve_source("random:tiny").load_models(["vae"])
    first = _digests(next(on_disk_tiny.iterdir()))
    mtimes = {p: p.stat().st_mtime_ns for p in on_disk_tiny.rglob("*.safetensors")}
    resolve_source("random:tiny").load_models(["unet"])
    assert {p: p.stat().st_mtime_ns for p in on_disk_tiny.rglob("*.safetensors")} == mtimes   # not rewritten
    monkeypatch.setenv(on_disk.CACHE_ENV, str(tmp_path / "other"))
    resolve_source("random:tiny").load_models(["vae"])
    assert _digests(next((tmp_path / "other" / "recipes").iterdir())) == first


def test_weights_are_written_one_tensor_at_a_time(tmp_path, monkeypatch):
    """No tensor drawn for the file is alive when the next is drawn: the writer holds one at a time."""
    from diffusers import UNet2DConditionModel

    from diffaccel.optimize.sources.builtins import RECIPES

    alive, draw = [], on_disk.draw

    def tracked(*args):
        assert all(ref() is None for ref in alive), "an earlier tensor is still held"
        out = draw(*args)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(on_disk, "draw", tracked)
    with on_disk.meta_parameters():
        unet = UNet2DConditionModel(**RECIPES["random:tiny"]["unet"])
    assert all(p.is_meta for p in unet.parameters())
    size = on_disk.write_weights(unet, tmp_path / "w.safetensors", seed=1)
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "w.safetensors")
    assert len(alive) == len(loaded) == len(unet.state_dict()) and size == (tmp_path / "w.safetensors").stat().st_size
    assert all(tuple(loaded[n].shape) == tuple(p.shape) for n, p in unet.named_parameters())


def test_a_cache_without_room_is_refused_in_one_line_and_nothing_is_left(on_disk_tiny, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    with pytest.raises(SourceError, match=r"random:tiny needs 0\.0 GB on disk .* has 0\.0 GB free; free space there "
                                          r"or set DIFFACCEL_CACHE to a larger disk"):
        resolve_source("random:tiny").load()
    assert not on_disk_tiny.exists() or not any(on_disk_tiny.iterdir())


def test_an_interrupted_write_leaves_no_folder(on_disk_tiny, monkeypatch):
    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(on_disk, "write_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        resolve_source("random:tiny").load_models(["unet"])
    assert not any(on_disk_tiny.iterdir())


def test_mapped_file_pages_are_told_apart_from_anonymous_ones(tmp_path):
    """What a build's records split: reading a mapped file (weights from safetensors or external data) raises the
    resident memory but not its anonymous part; a copy raises both."""
    import mmap

    from diffaccel.optimize.memory import PeakWatch, current_memory

    blob = tmp_path / "blob"
    blob.write_bytes(b"\1" * (64 << 20))
    rss0, anon0 = current_memory()
    with open(blob, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096       # every page touched
        rss1, anon1 = current_memory()
        with PeakWatch() as w:
            copy = bytearray(m)
        del copy
    assert rss1 - rss0 >= 60 << 20 and anon1 - anon0 < 16 << 20, (rss1 - rss0, anon1 - anon0)
    assert w.anon_peak_bytes - anon1 >= 60 << 20 and w.record()["peak_anon_bytes"] == w.anon_peak_bytes


def test_the_source_says_when_its_weights_are_mapped_and_the_estimate_counts_the_anonymous_rest(
        on_disk_tiny, tiny_pipe, tmp_path, monkeypatch):
    from diffaccel.optimize.stages.resources import estimate_peak

    assert resolve_source("random:tiny").maps_weights                       # a recipe written to disk
    tiny_pipe.save_pretrained(tmp_path / "fp32")
    assert resolve_source(str(tmp_path / "fp32")).maps_weights              # fp32 safetensors: mapped
    tiny_pipe.to(torch.float16).save_pretrained(tmp_path / "fp16")
    tiny_pipe.to(torch.float32)
    assert not resolve_source(str(tmp_path / "fp16")).maps_weights         # cast into memory when loaded in fp32
    monkeypatch.setattr(on_disk, "ON_DISK_BYTES", 1 << 40)
    monkeypatch.setattr(on_disk, "_SIZES", {})
    assert not resolve_source("random:tiny").maps_weights                   # made in memory
    stages = ["assets", "export", "engine"]       # measured anonymous peaks (docs/memory.md): the estimate covers them
    sd15, _ = estimate_peak(stages, 4.26e9, 3.44e9, alone=True, fused=True, mapped=True)
    assert 4.18e9 <= sd15 <= 4.18e9 + 1e9
    held, _ = estimate_peak(stages, 13.9e9, 10.3e9, 1.34e9, 128 * 128, alone=True, fused=True)
    sdxl, _ = estimate_peak(stages, 13.9e9, 10.3e9, 1.34e9, 128 * 128, alone=True, fused=True, mapped=True)
    assert 7.93e9 <= sdxl < held - 1.5e9
