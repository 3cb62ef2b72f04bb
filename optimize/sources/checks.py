"""What can be checked of a source on disk before loading any weights: a diffusers folder's completeness and
pipeline class, the component folders its ``model_index.json`` asks for, the content hash of those, and a
single-file checkpoint's type and integrity. Each failure is a :class:`SourceError` that says what to do.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from diffaccel.optimize.artifact.errors import SourceError, one_line
from diffaccel.optimize.artifact.files import file_sha256, tree_sha256
from diffaccel.optimize.families import supported_pipelines

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")       # a U-Net pipeline's folders
OPTIONAL = ("text_encoder_2", "tokenizer_2")    # required where model_index.json lists them (SDXL)
NOT_FOLDERS = ("image_encoder", "feature_extractor", "safety_checker")   # listed by some pipelines, never built


def parts(index: dict) -> tuple:
    """The component folders a pipeline with this model_index.json needs: the usual ones except those it sets to
    null (the SDXL refiner has no first text encoder), plus the optional ones it lists.

    >>> parts({"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder_2": [None, None]})
    ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')
    >>> parts({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["x", "y"]})[-2:]
    ('text_encoder_2', 'tokenizer_2')
    >>> parts({"text_encoder": [None, None], "tokenizer": [None, None], "text_encoder_2": ["t", "C"],
    ...         "tokenizer_2": ["t", "T"]})
    ('unet', 'vae', 'scheduler', 'text_encoder_2', 'tokenizer_2')
    >>> parts({"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    ...         "text_encoder_3": [None, None], "scheduler": ["diffusers", "X"], "_class_name": "P"})
    ('transformer', 'vae', 'scheduler')
    """
    def listed(c):
        return isinstance(index.get(c), (list, tuple)) and any(index[c])

    def nulled(c):
        return c in index and not listed(c)

    if listed("transformer"):     # a diffusion transformer's pipeline (SD3, FLUX): every part it lists
        return tuple(c for c in index if not c.startswith("_") and listed(c) and c not in NOT_FOLDERS)
    return tuple(c for c in REQUIRED if not nulled(c)) + tuple(c for c in OPTIONAL if listed(c))


def check_folder(path: Path) -> None:
    """Refuse a folder that is not a complete diffusers pipeline of a supported family, naming what to do."""
    index = path / "model_index.json"
    if not index.is_file():
        raise SourceError(f"{path} has no model_index.json; give a diffusers-format pipeline folder "
                          "(model_index.json plus unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    try:
        info = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{index} is not valid JSON ({e}); restore it from the original checkpoint") from None
    cls = info.get("_class_name", "?")
    if cls not in supported_pipelines():
        raise SourceError(f"unsupported architecture: {path} is a {cls}; diffaccel supports these diffusers "
                          f"pipelines: {', '.join(supported_pipelines())}")
    missing = [c for c in parts(info) if not (path / c).is_dir() or not any((path / c).iterdir())]
    if missing:
        raise SourceError(f"{path} is missing component folder(s) {', '.join(missing)}; copy the complete "
                          "pipeline (model_index.json lists what it needs)")


def folder_hash(path: Path) -> str:
    """The content hash of a pipeline folder: its model_index.json and the component folders it needs (not the
    path, nor anything else in the folder)."""
    import hashlib

    h = hashlib.sha256(file_sha256(path / "model_index.json").encode())
    for comp in parts(json.loads((path / "model_index.json").read_text())):
        h.update(f"{comp}:{tree_sha256(path / comp)}".encode())
    return h.hexdigest()


def check_safetensors(path: Path) -> None:
    """Cheap integrity check of a .safetensors file: a parseable header whose tensors fit the file exactly."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not a valid safetensors file ({one_line(e)[:80]}); "
                          "download or copy it again") from None
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "corrupt (trailing bytes)"
        raise SourceError(f"{path} is {state}: header promises {8 + n + end} bytes, file has {size}; "
                          "download or copy it again")


def check_single_file(path: Path, trust_pickle: bool, config: "str | None") -> None:
    """Refuse a single-file checkpoint of an unknown type, a pickle one unless trusted, a damaged .safetensors
    file, and a ``config`` folder (``--config``) that is not a complete diffusers pipeline."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise SourceError(f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; convert it "
                              "to .safetensors, or pass --trust-pickle if you trust its origin")
    elif suffix != ".safetensors":
        raise SourceError(f"{path}: unknown checkpoint type {suffix or '(no suffix)'}; give a .safetensors file or "
                          "a diffusers folder")
    else:
        check_safetensors(path)
    if config is not None:
        check_folder(Path(config))
