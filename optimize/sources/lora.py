"""LoRA files fused into a source's weights before anything is exported or calibrated (``optimize --lora FILE[:SCALE]``).

A :class:`Lora` is checked and hashed when the source is resolved (file, safetensors header, scale) and its layers are
tried, shapes included, on a weightless copy of the model built from the configs (:func:`check_loras`), so bad input
fails before any work; :func:`fuse_loras` runs in :meth:`Source.load`: each file is parsed by diffusers' own ``lora_state_dict``
(the diffusers and kohya formats ``load_lora_weights`` accepts), injected with peft, merged into the base weights at
its scale and unwrapped, so the exported modules are plain ``nn.Linear``/``nn.Conv2d`` again. Every adapter layer of
every file must land on a layer of the model and be merged, else the build stops naming the file.

>>> Lora.parse("style.safetensors:0.8", check=False).scale, Lora.parse("style.safetensors", check=False).scale
(0.8, 1.0)
>>> Lora.parse("style.safetensors:strong", check=False)
Traceback (most recent call last):
...
diffaccel.optimize.artifact.errors.SourceError: --lora style.safetensors:strong: scale 'strong' is not a number; write FILE or FILE:SCALE, e.g. style.safetensors:0.8
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import warnings
from pathlib import Path

from diffaccel.optimize.artifact.errors import SourceError, one_line

PREFIXES = ("unet", "text_encoder", "text_encoder_2")          # the components a LoRA file can adapt


@dataclasses.dataclass(frozen=True)
class Lora:
    path: str        # resolved path of the .safetensors file
    scale: float     # the strength it is fused at (diffusers' fuse_lora(lora_scale=...))
    sha256: str      # content hash: a different file or scale is a different build

    @classmethod
    def parse(cls, spec: "str | Lora", *, check: bool = True) -> "Lora":
        """``FILE`` or ``FILE:SCALE`` (scale 1 by default). With ``check``, the file must exist and be named
        ``.safetensors`` (:func:`~diffaccel.optimize.sources.resolve_source` also checks its header)."""
        if isinstance(spec, Lora):
            return spec
        spec = str(spec)
        path, sep, tail = spec.rpartition(":")
        if not sep or "/" in tail or "\\" in tail or Path(spec).is_file():
            path, tail = spec, None
        scale = 1.0 if tail is None else _scale(tail, spec)
        if not check:
            return cls(path, scale, "")
        file = Path(path).expanduser()
        if not file.is_file():
            raise SourceError(f"--lora {spec}: no such file {path}; give a LoRA .safetensors file (FILE or FILE:SCALE)")
        if file.suffix.lower() != ".safetensors":
            raise SourceError(f"--lora {spec}: {file.name} is not a .safetensors file; diffaccel fuses LoRAs in the "
                              "diffusers or kohya safetensors formats (convert pickle files first)")
        from diffaccel.optimize.artifact.files import file_sha256

        return cls(str(file.resolve()), scale, file_sha256(file))

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "scale": self.scale}


def _scale(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise SourceError(f"--lora {spec}: scale {text!r} is not a number; write FILE or FILE:SCALE, "
                          "e.g. style.safetensors:0.8")
    return value


def with_loras(base_sha256: str, loras: tuple) -> str:
    """The source hash of base weights with LoRAs fused (each file's hash and scale, in order)."""
    if not loras:
        return base_sha256
    text = json.dumps({"base": base_sha256, "loras": [[x.sha256, repr(float(x.scale))] for x in loras]})
    return hashlib.sha256(text.encode()).hexdigest()


def check_loras(loras: tuple, configs: "dict | None", spec: str, pipeline_class: str) -> None:
    """Before any work: peft is installed, and every file's layers land, with their shapes, on a weightless copy of
    the model built from its configs (meta device), so a LoRA for another family or size is refused in one line
    before anything is written. Where the configs cannot be read without loading, loading checks the same."""
    if loras and importlib.util.find_spec("peft") is None:
        raise SourceError("--lora needs peft (diffusers' LoRA loader): pip install 'diffaccel[lora]'")
    if not loras or configs is None:
        return
    import diffusers

    skeleton = _skeleton(configs)
    for i, lora in enumerate(loras):
        _guarded(lora, lambda: _inject(skeleton, getattr(diffusers, pipeline_class), lora, f"check_{i}"))


def _skeleton(configs: dict) -> dict:
    """The adaptable models of a source, built from its configs on the meta device (no memory, no weights)."""
    import torch
    import transformers
    from diffusers import UNet2DConditionModel

    default = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    out = {c: None for c in PREFIXES}
    with _quiet(), torch.device("meta"):
        out["unet"] = UNet2DConditionModel.from_config(configs["unet"])
        for comp in ("text_encoder", "text_encoder_2"):
            if configs.get(comp):
                cls = getattr(transformers, (configs[comp].get("architectures") or [default[comp]])[0])
                out[comp] = cls(transformers.CLIPTextConfig.from_dict(configs[comp]))
    return out


@contextlib.contextmanager
def _quiet():
    """diffusers logs a failed adapter load at error level before raising; the raised error is what we report."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _guarded(lora: Lora, fn) -> None:
    try:
        with _quiet():
            fn()
    except SourceError:
        raise
    except Exception as e:  # diffusers/peft raise ValueError, RuntimeError (shapes), KeyError...
        raise SourceError(f"--lora {lora.path}: cannot fuse it into this model ({one_line(e)[:240]}); is it "
                          "a LoRA for this model family?") from e


# ---- fusing (at load time) -----------------------------------------------------------------------------------
def fuse_loras(pipe, loras: tuple) -> None:
    """Merge each LoRA into ``pipe``'s U-Net and text encoders at its scale, in order; refuse (naming the file) a file
    with layers the model has not, of other shapes, or left unmerged."""
    import torch

    for i, lora in enumerate(loras):
        with torch.no_grad():
            _guarded(lora, lambda: _fuse_one(pipe, lora, f"diffaccel_lora_{i}"))


def _fuse_one(pipe, lora: Lora, adapter: str) -> None:
    models = {c: getattr(pipe, c, None) for c in PREFIXES}
    for comp in _inject(models, type(pipe), lora, adapter):
        _merge_and_unwrap(models[comp], comp, lora, adapter)


def _inject(models: dict, pipeline_cls, lora: Lora, adapter: str) -> list:
    """Add ``lora``'s layers to ``models`` as peft adapter ``adapter``; the components it adapts. Refuses components
    the pipeline has not, layers that match no layer of the model, and layers of other shapes (torch raises)."""
    state, alphas, metadata = pipeline_cls.lora_state_dict(lora.path, return_lora_metadata=True)
    parts = {c: {k: v for k, v in state.items() if k.startswith(c + ".")} for c in PREFIXES}
    stray = [k for k in state if not any(k.startswith(c + ".") for c in PREFIXES)]
    absent = [c for c in PREFIXES if parts[c] and models.get(c) is None]
    if stray or absent:
        what = f"components {', '.join(absent)}" if absent else f"weights it cannot place (e.g. {stray[0]})"
        raise SourceError(f"--lora {lora.path}: it has {what}, which this {pipeline_cls.__name__} has not "
                          "(a LoRA for another model family?)")
    from peft.tuners.tuners_utils import BaseTunerLayer

    done = []
    for comp, part in ((c, p) for c, p in parts.items() if p):
        model = models[comp]
        if comp == "unet":
            pipeline_cls.load_lora_into_unet(part, network_alphas=alphas, unet=model, adapter_name=adapter,
                                             metadata=metadata)
        else:
            _inject_text_encoder(model, comp, part, alphas, metadata, adapter)
        carrying = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in m.lora_A)
        if carrying != _modules(part):
            raise SourceError(f"--lora {lora.path}: only {carrying} of its {_modules(part)} {comp} layers match a "
                              "layer of this model (a LoRA for another model family?)")
        done.append(comp)
    return done


def _inject_text_encoder(model, prefix: str, part: dict, alphas, metadata, adapter: str) -> None:
    """What diffusers' ``load_lora_into_text_encoder`` does, with peft directly (transformers' own adapter loader
    asks for a newer peft than the registry has)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    strip = lambda d: {k.removeprefix(f"{prefix}."): v for k, v in (d or {}).items()  # noqa: E731
                       if k.startswith(f"{prefix}.")}
    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(strip(part)))
    if not hasattr(model, "text_model"):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    rank = {k: v.shape[1] for k, v in sd.items() if k.endswith("lora_B.weight")}
    kwargs = strip(metadata) or get_peft_kwargs(rank, network_alpha_dict=strip(alphas), peft_state_dict=sd,
                                                  is_unet=False)
    inject_adapter_in_model(LoraConfig(**kwargs), model, adapter_name=adapter)
    result = set_peft_model_state_dict(model, sd, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise SourceError(f"{prefix} has no layer for {len(unexpected)} of the file's weights (e.g. {unexpected[0]})")


def _modules(part: dict) -> int:
    """How many layers a state dict adapts: one down (lora_A) matrix each, in any of diffusers' key formats.

    >>> _modules({"a.lora_A.weight": 0, "a.lora_B.weight": 0, "b.to_k_lora.down.weight": 0, "b.to_k_lora.up.weight": 0})
    2
    """
    return sum(1 for k in part if ".lora_A." in k or k.endswith("down.weight"))


def _merge_and_unwrap(model, comp: str, lora: Lora, adapter: str) -> None:
    """Scale, merge and replace every adapter layer by its base layer; refuse if anything adapter-like is left."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in [m for m in model.modules() if isinstance(m, BaseTunerLayer)]:
        if lora.scale != 1.0:
            m.scale_layer(lora.scale)
        m.merge(safe_merge=True, adapter_names=[adapter])
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    left = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    left += [n for n, _ in model.named_parameters() if "lora_" in n]
    if left:
        raise SourceError(f"--lora {lora.path}: {len(left)} adapter layer(s) of {comp} were left unfused "
                          f"(e.g. {left[0]}); diffaccel exports only fused weights")
