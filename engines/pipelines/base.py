"""What every drop-in pipeline loads: an artifact's engines (as the shims diffusers' ``__call__`` drives), its
scheduler and tokenizers, and the keywords ``from_pretrained`` accepts, ignores or refuses. Written against the
components' roles (the artifact's manifest names its denoiser, ``unet`` or ``transformer``), so each family's drop-in
module (:mod:`.sd`, :mod:`.sdxl`, :mod:`.sd3`, :mod:`.flux`) adds only what its diffusers pipeline needs; the mixin
they inherit (loading, saving and the checks before a call) is :mod:`.accelerated`. What it loads is logged at INFO
where diffusers' ``from_pretrained`` logs it (the logger ``diffusers.pipelines.pipeline_utils``: shown by
``diffusers.logging.set_verbosity_info()``, as diffusers' own loading messages); warnings go to this module's logger.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from diffaccel.optimize.artifact.errors import ArtifactError, PipelineArgumentError
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.artifact.specs import ComponentSpec
from diffaccel.optimize.artifact.roles import DENOISERS

from diffaccel.engines.base import load_engine
from diffaccel.engines.pipelines.denoisers import DenoiserShim, denoiser_shim
from diffaccel.engines.pipelines.shims import T5EncoderShim, TextEncoderShim, VaeShim

log = logging.getLogger(__name__)
loaded_log = logging.getLogger("diffusers.pipelines.pipeline_utils")    # where diffusers logs what it loaded

# from_pretrained's keywords besides provider/threads/verify. Components diffusers lets you pass that we honour:
COMPONENTS = ("scheduler", "tokenizer", "safety_checker", "feature_extractor", "requires_safety_checker")
# options passed on to the backend's load() (onnxruntime: spin; torch: device, compile; tensorrt: device,
# cuda_graph, shared_memory; openvino: hint)
ENGINE_OPTIONS = ("spin", "device", "compile", "cuda_graph", "shared_memory", "hint")
# diffusers' from_pretrained keywords that mean nothing for engines: accepted with a warning that says why
_FIXED = "engine precision and files were fixed when the artifact was built (diffaccel optimize --precision)"
_LOCAL = "an artifact is a local directory, nothing is downloaded"
_PLACED = "engines are loaded and placed by their runtime (choose it with provider=)"
IGNORED = {**dict.fromkeys(("torch_dtype", "dtype", "variant", "use_safetensors", "use_onnx", "use_flashpack",
                            "disable_mmap"), _FIXED),
           **dict.fromkeys(("local_files_only", "cache_dir", "force_download", "proxies", "token", "revision",
                            "resume_download", "trust_remote_code"), _LOCAL),
           **dict.fromkeys(("low_cpu_mem_usage", "device_map", "max_memory", "offload_folder",
                            "offload_state_dict"), _PLACED)}
# diffusers' keywords that cannot be honoured: refused, saying what to do instead
REFUSED = {**dict.fromkeys((*DENOISERS, "vae", "text_encoder"), "the artifact's engines replace it; run diffaccel "
                                                                "optimize on a checkpoint that has this component"),
           "image_encoder": "IP-Adapter image embeddings are not supported by exported U-Nets",
           "quantization_config": "quantize when building: diffaccel optimize --precision int8",
           "custom_pipeline": "the drop-in pipelines are diffusers' StableDiffusion(Img2Img)Pipeline"}




def _frozen_config(path: Path):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(json.loads(path.read_text()))


def engine_loader(root, manifest: Manifest, required: tuple, provider=None, threads=None, **engine_options):
    """A function ``engine(name) -> (engine, spec)`` over the artifact's components (logged at INFO, as diffusers
    logs what it loads). Refuses an artifact without the ``required`` components."""
    root = Path(root)
    comps = manifest.components
    missing = [c for c in required if c not in comps]
    if missing:
        raise ArtifactError(f"{root} has no engine for {', '.join(missing)}; rebuild with diffaccel optimize")

    def engine(name):
        entry = comps[name]
        opts = dict(engine_options, threads=threads)
        if entry["backend"] == "onnxruntime":
            opts["provider"] = provider
        eng = load_engine(entry["backend"], root, name, entry, **opts)
        loaded_log.info("Loaded %s as %s engine (%s, %s) from %s", name, entry["backend"],
                        entry.get("precision", "fp32"), eng.device, root / entry["engine"])
        return eng, ComponentSpec.from_dict(name, entry["spec"])

    return engine


def text_encoder_shim(root, manifest: Manifest, engine, name: str) -> TextEncoderShim:
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(**json.loads((Path(root) / manifest.components[name]["config"]).read_text()))
    return TextEncoderShim(*engine(name), cfg)


def t5_encoder_shim(root, manifest: Manifest, engine, name: str) -> T5EncoderShim:
    from transformers import T5Config

    cfg = T5Config(**json.loads((Path(root) / manifest.components[name]["config"]).read_text()))
    return T5EncoderShim(*engine(name), cfg)


def vae_shim(root, manifest: Manifest, engine) -> VaeShim:
    comps = manifest.components
    dec, dec_spec = engine("vae_decoder")
    enc, enc_spec = engine("vae_encoder") if "vae_encoder" in comps else (None, None)
    return VaeShim(dec, dec_spec, _frozen_config(Path(root) / comps["vae_decoder"]["config"]), enc, enc_spec)

def denoiser_shim_of(root, manifest: Manifest, engine) -> DenoiserShim:
    """The engine-backed denoiser (U-Net or transformer) of the artifact, with its config."""
    name = manifest.denoiser
    return denoiser_shim(manifest.denoiser_class, *engine(name),
                         _frozen_config(Path(root) / manifest.components[name]["config"]))


def load_scheduler(root):
    import diffusers

    path = Path(root) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    loaded_log.info("Loaded scheduler as %s from %s", type(scheduler).__name__, path)
    return scheduler


TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")


def load_tokenizer(root, name: str = "tokenizer"):
    """The tokenizer saved in ``root/name``, of the class its ``tokenizer_config.json`` names (CLIP's, or T5's for
    SD3's and FLUX's T5 encoder)."""
    import transformers

    path = Path(root) / name
    try:
        kind = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class") or "CLIPTokenizer"
    except (OSError, ValueError):
        kind = "CLIPTokenizer"
    if kind not in TOKENIZER_CLASSES:
        raise ArtifactError(f"{path} holds a {kind} tokenizer; the drop-ins load {', '.join(TOKENIZER_CLASSES)}")
    tokenizer = getattr(transformers, kind).from_pretrained(str(path))
    loaded_log.info("Loaded %s as %s from %s", name, type(tokenizer).__name__, path)
    return tokenizer


def split_kwargs(kwargs: dict, accepted: tuple = COMPONENTS, refused: "dict | None" = None) -> "tuple[dict, dict]":
    """``from_pretrained``'s extra keywords as (components to use, engine options). Warns once about diffusers'
    keywords that mean nothing for engines; refuses the others, and unknown ones, naming those accepted.

    >>> split_kwargs({"spin": False, "scheduler": "S"})
    ({'scheduler': 'S'}, {'spin': False})
    >>> split_kwargs({"threds": 2})
    Traceback (most recent call last):
    ...
    diffaccel.optimize.artifact.errors.PipelineArgumentError: from_pretrained got unknown keyword(s) threds;
    it accepts provider, threads, verify, scheduler, tokenizer, ... (and ignores diffusers' cache_dir, ...)
    """
    refused = refused or REFUSED
    bad = [f"{k}= ({refused[k]})" for k in kwargs if k in refused]
    if bad:
        raise PipelineArgumentError(f"from_pretrained cannot take {'; '.join(bad)}")
    unknown = [k for k in kwargs if k not in (*accepted, *ENGINE_OPTIONS, *IGNORED)]
    if unknown:
        raise PipelineArgumentError(
            f"from_pretrained got unknown keyword(s) {', '.join(unknown)}; it accepts provider, threads, verify, "
            f"{', '.join(accepted + ENGINE_OPTIONS)} (and ignores diffusers' {', '.join(sorted(IGNORED))})")
    for k in ("scheduler", "tokenizer", "tokenizer_2"):
        if k in kwargs and kwargs[k] is None:
            raise PipelineArgumentError(f"{k}=None leaves the pipeline without a {k}; omit it to use the artifact's")
    ignored = {}
    for k, v in kwargs.items():
        if k in IGNORED and v is not None:
            ignored.setdefault(IGNORED[k], []).append(f"{k}=")
    if ignored:
        log.warning("from_pretrained ignores %s", "; ".join(f"{', '.join(ks)} ({why})" for why, ks in ignored.items()))
    return ({k: v for k, v in kwargs.items() if k in accepted},
            {k: v for k, v in kwargs.items() if k in ENGINE_OPTIONS})


def log_passed(given: dict, names: tuple) -> None:
    """Log at INFO, beside what was loaded, each of ``names`` that ``from_pretrained`` was given in place of the
    artifact's."""
    for name in names:
        if name in given:
            loaded_log.info("Using the %s passed to from_pretrained (%s)", name, type(given[name]).__name__)
