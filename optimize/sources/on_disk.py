"""Full-size ``random:*`` recipes written straight to disk, tensor by tensor, and read back memory-mapped.

A recipe whose fp32 weights pass :data:`ON_DISK_BYTES` (``random:sd15`` and up) is never made in memory: its pipeline
is assembled with every parameter on PyTorch's meta device (no storage; buffers stay real), and each model's weights
are generated one tensor at a time from a seed — the recipe's hash, the model's name and the tensor's name — and
streamed into one ``.safetensors`` file per model (the header first, from the shapes; then each tensor as it is
drawn). The result is an ordinary diffusers folder in the cache (``$DIFFACCEL_CACHE/recipes``, default
``~/.cache/diffaccel/recipes``), written to a temporary name and renamed when complete, then loaded as any folder
source is: diffusers and transformers map safetensors files, so the weights are file-backed pages the kernel can
drop and re-read, never anonymous memory the build must hold (SD 1.5's U-Net read this way: 0.33 GB anonymous after
loading, 3.49 GB file-backed after a forward; made in memory it was 3.4 GB anonymous).

Values follow PyTorch's default initialisation in distribution (linear and convolution weights and biases uniform in
±1/sqrt(fan_in), normalisation scales 1 and shifts 0, embeddings N(0, 0.02)), not in value: a recipe's on-disk
weights differ from the in-memory ones of the same architecture, and the same name always gives the same bytes.

>>> kinds = init_kinds(_tiny_linear())
>>> kinds["0.weight"], kinds["0.bias"], kinds["1.weight"]
(('uniform', 8), ('uniform', 8), ('ones', 0))
>>> header_bytes([("a", (2, 3), "F32")])[8:].rstrip()
b'{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}'
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

from diffaccel.optimize.artifact.errors import SourceError

log = logging.getLogger(__name__)
ON_DISK_BYTES = 1 << 30          # fp32 weights above which a recipe is written to disk instead of made in memory
CACHE_ENV = "DIFFACCEL_CACHE"
_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.int64": "I64"}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffaccel") / "recipes"


@contextlib.contextmanager
def meta_parameters():
    """While active, every parameter a module registers lives on the meta device (no storage); buffers are real, so
    the position ids and tables models compute in ``__init__`` keep their values."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def init_kinds(model) -> dict:
    """``{parameter name: (kind, fan_in)}``: how each parameter is drawn, from the module that owns it."""
    import torch

    out = {}
    for prefix, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and weight is not None:
                out[name] = ("uniform", math.prod(weight.shape[1:]))
            elif isinstance(module, torch.nn.Embedding):
                out[name] = ("normal", 0)
            elif "norm" in type(module).__name__.lower() or "norm" in prefix.rsplit(".", 1)[-1].lower():
                out[name] = ("ones" if pname == "weight" else "zeros", 0)
            else:
                out[name] = ("normal", 0)
    return out


def draw(seed: int, name: str, shape, kind: str, fan_in: int):
    """One tensor's values, from ``seed`` and its name alone (the order tensors are drawn in does not matter)."""
    import torch

    if kind in ("ones", "zeros"):
        return (torch.ones if kind == "ones" else torch.zeros)(shape)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    if kind == "uniform":
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        return torch.rand(shape, generator=g).mul_(2 * bound).sub_(bound)
    return torch.randn(shape, generator=g).mul_(0.02)


def header_bytes(entries: list) -> bytes:
    """A safetensors header for ``[(name, shape, dtype code)]`` laid out back to back, padded to 8 bytes."""
    offset, header = 0, {}
    for name, shape, dtype in entries:
        size = math.prod(shape) * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_weights(model, path: Path, seed: int) -> int:
    """Stream ``model``'s weights into ``path`` (safetensors): meta parameters drawn by :func:`draw`, real buffers as
    they are, one tensor in memory at a time. Returns the bytes written."""
    import torch

    kinds = init_kinds(model)
    state = dict(model.named_parameters())
    state.update((n, b) for n, b in model.named_buffers() if n in model.state_dict())   # persistent ones
    entries = [(n, tuple(t.shape), _DTYPES[str(t.dtype)]) for n, t in state.items()]
    with open(path, "wb") as out:
        out.write(header_bytes(entries))
        for name, t in state.items():
            value = draw(seed, name, tuple(t.shape), *kinds.get(name, ("normal", 0))) if t.is_meta else t
            out.write(value.to(t.dtype).contiguous().view(torch.uint8).numpy().tobytes())   # bf16 has no numpy
            del value
    return path.stat().st_size


def weight_bytes(pipe) -> int:
    """fp32 bytes of every model in a (meta) pipeline."""
    import torch

    return sum(p.numel() * 4 for m in pipe.components.values() if isinstance(m, torch.nn.Module)
               for p in m.parameters())


def write_folder(pipe, folder: Path, seed: int) -> None:
    """``pipe`` (parameters on the meta device) as a diffusers folder: model_index.json, each scheduler's and
    tokenizer's files, each model's config and streamed weights."""
    import torch

    folder.mkdir(parents=True)
    pipe.save_config(str(folder))
    for name, part in pipe.components.items():
        if part is None or isinstance(part, bool):
            continue
        sub = folder / name
        if not isinstance(part, torch.nn.Module):
            part.save_pretrained(str(sub))              # tokenizer, scheduler
            continue
        sub.mkdir()
        if hasattr(part, "save_config"):                # a diffusers model
            part.save_config(str(sub))
            weights = sub / "diffusion_pytorch_model.safetensors"
        else:                                           # a transformers model
            part.config.save_pretrained(str(sub))
            weights = sub / "model.safetensors"
        log.info("writing %s's weights to %s", name, weights)
        write_weights(part, weights, seed + zlib.crc32(name.encode()))


def materialize(name: str, skeleton, digest: str) -> Path:
    """The cached folder of recipe ``name`` (written first if missing): ``skeleton()`` assembles its pipeline,
    ``digest`` (the recipe's hash) names the folder and seeds the weights. Refuses in one line when the cache's disk
    cannot hold it."""
    folder = cache_root() / f"{name.split(':', 1)[-1]}-{digest[:12]}"
    if (folder / "model_index.json").is_file():
        return folder
    with meta_parameters():
        pipe = skeleton()
    need = weight_bytes(pipe)
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < need + (1 << 30):
        raise SourceError(f"{name} needs {need / 1e9:.1f} GB on disk for its weights and {folder.parent} has "
                          f"{free / 1e9:.1f} GB free; free space there or set {CACHE_ENV} to a larger disk")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("writing %s (%.1f GB of fp32 weights) to %s, one tensor at a time", name, need / 1e9, folder)
    try:
        write_folder(pipe, tmp, int(digest[:12], 16))
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_SIZES: dict = {}          # recipe name -> fp32 weight bytes


def is_large(name: str, skeleton) -> bool:
    """Whether recipe ``name``'s fp32 weights pass :data:`ON_DISK_BYTES` (read once from its meta skeleton)."""
    if name not in _SIZES:
        with meta_parameters():
            _SIZES[name] = weight_bytes(skeleton())
    return _SIZES[name] > ON_DISK_BYTES


def _tiny_linear():
    import torch

    with meta_parameters():
        return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
