"""Reading a diffusers folder: its configs without the weights, one model, or the whole pipeline of its family.

Shared by folder and hub sources and by the ``random:*`` recipes written to disk
(:mod:`~diffaccel.optimize.sources.on_disk`), which are read back as folders.
"""
from __future__ import annotations

import json
from pathlib import Path

from diffaccel.optimize.artifact.roles import DENOISERS, TEXT_ENCODERS
from diffaccel.optimize.sources.checks import parts

MODELS = (*DENOISERS, "vae", *TEXT_ENCODERS)    # whose configs detection reads


def folder_configs(folder) -> "dict | None":
    """``{"pipeline", <model>: config...}`` read from ``folder``'s JSON files (None when they cannot be read:
    loading will say what is wrong)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
        out = {"pipeline": index.get("_class_name"),
               **{c: json.loads((Path(folder) / c / "config.json").read_text()) for c in MODELS if c in parts(index)}}
    except (OSError, json.JSONDecodeError):
        return None
    if "requires_aesthetics_score" in index:
        out["requires_aesthetics_score"] = bool(index["requires_aesthetics_score"])
    return out


def load_pipeline(folder, family):
    """The diffusers pipeline of ``family`` in ``folder`` (fp32, local files only, the family's loading keywords)."""
    import diffusers
    import torch

    return getattr(diffusers, family.PIPELINE_CLASS).from_pretrained(
        str(folder), torch_dtype=torch.float32, local_files_only=True, **family.LOAD_KWARGS)


def load_model(folder: Path, name: str):
    """One model of a diffusers folder, by the class its model_index.json names."""
    import importlib

    import torch

    library, cls = json.loads((Path(folder) / "model_index.json").read_text())[name]
    model = getattr(importlib.import_module(library), cls).from_pretrained(
        folder, subfolder=name, torch_dtype=torch.float32, local_files_only=True)
    return model.eval()


def load_recipe_folder(name: str, folder: Path, only=None):
    """Recipe ``name`` written to ``folder``: the pipeline, or with ``only`` just those models."""
    from diffaccel.optimize.families import detect

    if only is not None:
        return {n: load_model(folder, n) for n in only}
    return load_pipeline(folder, detect(folder_configs(folder), name))


def maps_fp32(folder, names) -> bool:
    """Whether each named model of ``folder`` stores its weights as fp32 safetensors, which diffusers and
    transformers map rather than read: loading them in fp32 leaves the weights as file-backed pages (another dtype is
    cast into anonymous memory, a pickle file is read into it)."""
    import struct

    for name in names:
        files = sorted((Path(folder) / name).glob("*.safetensors"))
        if not files:
            return False
        try:
            with open(files[0], "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError):
            return False
        if any(v.get("dtype") != "F32" for k, v in header.items() if k != "__metadata__"):
            return False
    return True
