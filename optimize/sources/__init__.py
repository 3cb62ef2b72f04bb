"""Resolve what the user calls SRC into a :class:`Source`: a kind, a location, a content hash and a loader.

SRC may be a built-in name (``random:tiny``, ``tinyshapes``...), a diffusers-format folder, a single-file
checkpoint (``.safetensors``; pickle files only with ``trust_pickle=True``) or a hub id, with LoRA files fused into it
(``loras=["style.safetensors:0.8"]``, see :mod:`~diffaccel.optimize.sources.lora`). Every check that can fail on
bad input without loading the weights runs here (the folder and file checks are
:mod:`~diffaccel.optimize.sources.checks`), before anything is written.

>>> src = resolve_source("random:tiny")
>>> src.kind, len(src.sha256)
('builtin', 64)
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from diffaccel.optimize.artifact.errors import SourceError, one_line
from diffaccel.optimize.artifact.files import file_sha256
from diffaccel.optimize.families import configs_of, detect, family
from diffaccel.optimize.sources import dit_recipes
from diffaccel.optimize.sources.checks import check_folder, check_safetensors, check_single_file, folder_hash
from diffaccel.optimize.sources.folders import (  # noqa: F401
    MODELS, folder_configs, load_model, load_pipeline, maps_fp32)
from diffaccel.optimize.sources.builtins import (BUILTINS, RECIPES, TINYSHAPES, builtin_hash, builtin_location,
                                                is_recipe, random_models)
from diffaccel.optimize.sources.lora import Lora, check_loras, fuse_loras, with_loras

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Source:
    spec: str                 # what the user typed
    kind: str                 # builtin | folder | single_file | hub
    location: str             # resolved path (or recipe name)
    sha256: str               # content hash, independent of the path (LoRA files and scales included)
    single_file_config: "str | None" = None
    loras: tuple = ()         # Lora files fused into the weights on load, in order

    def to_dict(self) -> dict:
        out = {"spec": self.spec, "kind": self.kind, "location": self.location, "sha256": self.sha256}
        return {**out, "loras": [x.to_dict() for x in self.loras]} if self.loras else out

    def configs(self) -> "dict | None":
        """``{"pipeline", "unet", "vae", "text_encoder"}``: the pipeline class and the models' configs, read without loading any
        weights (None where only loading can tell: a single-file checkpoint without ``--config``). Lets the family
        be detected and size checks run before any work (see :func:`diffaccel.optimize.families.detect`)."""
        if self.kind == "builtin" and self.spec in dit_recipes.RECIPES:
            return dit_recipes.configs(self.spec)
        if self.kind == "builtin" and self.spec in RECIPES:
            r = RECIPES[self.spec]
            out = {"pipeline": None, "unet": r["unet"], "vae": r["vae"], "text_encoder": r["text"]}
            return {**out, "text_encoder_2": r["text_2"]} if "text_2" in r else out
        folder = self.single_file_config if self.kind == "single_file" else self.location
        return None if folder is None else folder_configs(folder)

    def load(self):
        """The diffusers pipeline (fp32, CPU, eval mode) behind this source, of its family's pipeline class."""
        import torch

        with torch.no_grad():
            try:
                pipe = _LOADERS[self.kind](self)
            except SourceError:
                raise
            except Exception as e:  # diffusers/transformers raise many kinds; show the first line, say what to do
                raise SourceError(f"cannot load {self.spec}: {one_line(e)[:300]}") from e
        detect(configs_of(pipe), self.spec)
        fuse_loras(pipe, self.loras)
        return pipe

    @property
    def loads_models_alone(self) -> bool:
        """Whether :meth:`load_models` reads just the models asked for (a diffusers folder or a ``random:*`` recipe
        without LoRAs) rather than the whole pipeline: what lets a build hold one component's weights at a time."""
        if self.loras:
            return False     # a LoRA is fused through the pipeline's loader, into several models at once
        return (self.kind == "builtin" and is_recipe(self.spec)) or self.kind in ("folder", "hub")

    @property
    def maps_weights(self) -> bool:
        """Whether the models are read memory-mapped (fp32 safetensors of a folder, or a recipe written to disk), so
        their weights are file-backed pages rather than anonymous memory the build holds."""
        from diffaccel.optimize.sources import on_disk
        from diffaccel.optimize.sources.builtins import _in_memory

        if self.loras:
            return False
        if self.kind == "builtin":
            return is_recipe(self.spec) and on_disk.is_large(self.spec, lambda: _in_memory(self.spec))
        configs = self.configs() or {}
        names = [n for n in MODELS if n in configs]
        return self.kind in ("folder", "hub") and bool(names) and maps_fp32(self.location, names)

    def load_models(self, names) -> dict:
        """``{name: model}`` for the named models ("unet", "vae", "text_encoder", "text_encoder_2"), fp32, CPU, eval
        mode, with the weights :meth:`load` gives them; only those are read where :attr:`loads_models_alone`."""
        import torch

        names = tuple(names)
        if not self.loads_models_alone:
            pipe = self.load()
            return {n: getattr(pipe, n) for n in names}
        with torch.no_grad():
            try:
                if self.kind == "builtin":
                    return random_models(self.spec, names)
                return {n: load_model(Path(self.location), n) for n in names}
            except SourceError:
                raise
            except Exception as e:
                raise SourceError(f"cannot load {', '.join(names)} of {self.spec}: {one_line(e)[:300]}") from e


def resolve_source(spec: str, *, trust_pickle: bool = False, single_file_config: "str | None" = None,
                   loras=()) -> Source:
    """Check SRC (and each LoRA, ``FILE`` or ``FILE:SCALE``) and hash its content. Raises :class:`SourceError` with a
    one-line, actionable message.

    >>> resolve_source("random:tiny", loras=["missing.safetensors:0.5"])
    Traceback (most recent call last):
    ...
    diffaccel.optimize.artifact.errors.SourceError: --lora missing.safetensors:0.5: no such file missing.safetensors; give a LoRA .safetensors file (FILE or FILE:SCALE)
    """
    loras = tuple(Lora.parse(x) for x in loras)
    for lora in loras:
        check_safetensors(Path(lora.path))
    base = _resolve(str(spec), trust_pickle, single_file_config)
    if not loras:
        return base
    configs = base.configs()
    check_loras(loras, configs, base.spec, detect(configs, base.spec).PIPELINE_CLASS if configs else "")
    return dataclasses.replace(base, sha256=with_loras(base.sha256, loras), loras=loras)


def _resolve(spec: str, trust_pickle: bool, single_file_config: "str | None") -> Source:
    if spec in BUILTINS:
        if spec in TINYSHAPES and not Path(builtin_location(spec), "model_index.json").is_file():
            raise SourceError(f"the {spec} weights are not installed with this copy of diffaccel; "
                              "reinstall diffaccel or train them with tools/train_tinyshapes.py")
        return Source(spec, "builtin", builtin_location(spec), builtin_hash(spec))
    if spec.startswith("random:"):
        raise SourceError(f"unknown built-in {spec!r}; built-ins are: {', '.join(sorted(BUILTINS))}")
    path = Path(spec).expanduser()
    if path.is_dir():
        check_folder(path)
        return Source(spec, "folder", str(path.resolve()), folder_hash(path))
    if path.is_file():
        return _single_file(path, spec, trust_pickle, single_file_config)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return _hub(spec)
    raise SourceError(f"{spec}: no such file or folder; give a diffusers folder, a .safetensors checkpoint, a hub "
                      f"id or a built-in ({', '.join(sorted(BUILTINS))})")


# ----------------------------------------------------------------------------------------------------------
def _single_file(path: Path, spec: str, trust_pickle: bool, config: "str | None") -> Source:
    check_single_file(path, trust_pickle, config)
    return Source(spec, "single_file", str(path.resolve()), file_sha256(path), config)


def _hub(repo_id: str) -> Source:
    try:
        from diffusers import DiffusionPipeline

        folder = DiffusionPipeline.download(repo_id)
    except Exception as e:
        raise SourceError(f"cannot fetch hub id {repo_id} ({one_line(e)[:160]}); check the id and the network, or "
                          "give a local diffusers folder") from None
    folder = Path(folder)
    check_folder(folder)
    return Source(repo_id, "hub", str(folder), folder_hash(folder))


# ----------------------------------------------------------------------------------------------------------
def _load_builtin(src: Source):
    return BUILTINS[src.spec]()


def _load_folder(src: Source):
    return load_pipeline(src.location, _family(src))


def _load_single_file(src: Source):
    import torch

    kwargs = dict(torch_dtype=torch.float32, **_family(src).LOAD_KWARGS)
    if src.single_file_config:
        kwargs.update(config=src.single_file_config, local_files_only=True)
    try:
        return _pipeline_class(src).from_single_file(src.location, **kwargs)
    except OSError as e:
        if not src.single_file_config:
            raise SourceError(f"cannot load {src.spec} without its diffusers configuration ({one_line(e)[:120]}); "
                              "pass --config DIR (a diffusers folder of the same architecture) or run online") from e
        raise


def _family(src: Source):
    """The source's family (Stable Diffusion where the configs cannot be read without loading)."""
    configs = src.configs()
    return detect(configs, src.spec) if configs else family("sd")


def _pipeline_class(src: Source):
    """The diffusers pipeline class of the source's family."""
    import diffusers

    return getattr(diffusers, _family(src).PIPELINE_CLASS)


_LOADERS = {"builtin": _load_builtin, "folder": _load_folder, "hub": _load_folder, "single_file": _load_single_file}
