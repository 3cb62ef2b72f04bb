"""What every drop-in pipeline shares: loading an artifact's engines and assets, the keywords ``from_pretrained``
accepts, ignores or refuses, saving, and the checks that fail a call before any work when the engines cannot serve
it. Written against the components' roles (the artifact's manifest names its denoiser, ``unet`` or ``transformer``),
so each family's drop-in module (:mod:`.sd`, :mod:`.sdxl`, :mod:`.sd3`, :mod:`.flux`) adds only what its
diffusers pipeline needs.
"""
from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path

from diffaccel.optimize.artifact.errors import ArtifactError, PipelineArgumentError, ShapeError
from diffaccel.optimize.artifact.files import fresh_dir, given_config_text
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.artifact.specs import ComponentSpec
from diffaccel.optimize.artifact.roles import DENOISERS

from diffaccel.engines.base import load_engine
from diffaccel.engines.pipelines.denoisers import DenoiserShim, denoiser_shim
from diffaccel.engines.pipelines.shims import T5EncoderShim, TextEncoderShim, VaeShim

log = logging.getLogger(__name__)

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
        log.info("Loaded %s as %s engine (%s, %s) from %s", name, entry["backend"], entry.get("precision", "fp32"),
                 eng.device, root / entry["engine"])
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
    log.info("Loaded scheduler as %s from %s", type(scheduler).__name__, path)
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
    log.info("Loaded %s as %s from %s", name, type(tokenizer).__name__, path)
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


class _Accelerated:
    """What both drop-in pipelines add to their diffusers parent: loading from an artifact, saving one, shape checks
    before any work, the execution device of the engines, and diffusers' pipeline-level VAE slicing/tiling switches."""

    artifact: "Path | None" = None
    manifest: "Manifest | None" = None
    _artifact_tokenizers: dict = {}
    _ACCEPTED = COMPONENTS          # from_pretrained's component keywords (a family's drop-ins set theirs)
    _REFUSED = REFUSED
    _TOKENIZERS = ("tokenizer",)
    _DEFAULTS: dict = {}            # constructor arguments the engines make moot (safety checker, watermark...)

    @classmethod
    def _load_components(cls, root, manifest, **options) -> dict:
        """The family's engine-backed models, tokenizers and scheduler (each drop-in module defines it)."""
        raise NotImplementedError
    @classmethod
    def _check_family(cls, root, manifest) -> None:
        """Refuse, before loading any engine, an artifact whose family this class does not serve (an SDXL artifact
        in the SD pipeline, an inpainting U-Net in the text-to-image one...), naming the class that does."""
        from diffaccel.optimize.families import family

        fam = family(manifest.get("pipeline", {}).get("family", "sd"))
        mine = {f"{c.__module__}:{c.__name__}" for c in cls.__mro__}
        if not mine & set(fam.DROP_INS):
            names = [d.rpartition(":")[2] for d in fam.DROP_INS if d]
            raise ArtifactError(f"{root} holds a {fam.TITLE} artifact, which {cls.__name__} cannot run; load it "
                                f"with {' or '.join(names)}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, provider: "str | None" = None,
                        threads: "int | None" = None, verify: bool = True, **kwargs):
        """Load an artifact made by ``diffaccel optimize``.

        ``provider`` picks the ONNX Runtime execution provider (cpu | cuda | tensorrt; default: the one the artifact
        was built for); ``threads`` its intra-op threads. As in diffusers, ``scheduler=``, ``tokenizer=`` (and
        ``safety_checker=``, ``feature_extractor=``) replace the artifact's; ``spin``, ``device``, ``compile``,
        ``cuda_graph``, ``shared_memory`` go to the backend. diffusers' loading keywords that mean nothing for
        engines (``torch_dtype``, ``variant``, ``device_map``...) are ignored with a warning; any other keyword is a
        :class:`PipelineArgumentError`."""
        given, engine_options = split_kwargs(kwargs, cls._ACCEPTED, cls._REFUSED)
        root = Path(pretrained_model_name_or_path)
        manifest = Manifest.load(root)
        cls._check_family(root, manifest)
        if verify:
            manifest.verify()
        parts = cls._load_components(root, manifest, provider=provider, threads=threads, **engine_options)
        for name in ("scheduler", *cls._TOKENIZERS):
            if name in given:
                log.info("Using the %s passed to from_pretrained (%s)", name, type(given[name]).__name__)
        pipe = cls(**{**cls._DEFAULTS, **parts, **given})
        pipe.artifact, pipe.manifest = root, manifest
        pipe._artifact_tokenizers = {n: parts[n] for n in cls._TOKENIZERS}
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """Copy the artifact (engines unchanged, so their sha256 still verifies) with the current scheduler and
        tokenizer."""
        if self.artifact is None:
            raise ArtifactError("this pipeline was not loaded from an artifact; use diffaccel optimize to make one")
        dst = Path(save_directory)
        if dst.exists() and any(dst.iterdir()):
            raise ArtifactError(f"{dst} is not empty; choose a new directory")
        with fresh_dir(dst) as tmp:
            shutil.copytree(self.artifact, tmp, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)
            shutil.rmtree(tmp / "scheduler")
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(given_config_text(self.scheduler))
            for name, original in self._artifact_tokenizers.items():
                if getattr(self, name) is not original:
                    shutil.rmtree(tmp / name)
                    getattr(self, name).save_pretrained(str(tmp / name))

    def enable_vae_slicing(self):
        """diffusers' former pipeline-level switch (its pipelines now leave it to the VAE): ``vae.enable_slicing()``."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self):
        """diffusers' former pipeline-level switch (its pipelines now leave it to the VAE): ``vae.enable_tiling()``."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        self.vae.disable_tiling()

    @property
    def denoiser(self):
        """The denoiser this pipeline runs (its ``unet`` or ``transformer``)."""
        from diffaccel.optimize.families import denoiser_of

        return getattr(self, self.manifest.denoiser if self.manifest is not None else denoiser_of(self))

    @property
    def native_size(self) -> int:
        """The image side in pixels diffusers' ``__call__`` uses when no height or width is given."""
        size = getattr(self, "default_sample_size", None) or self.denoiser.config.sample_size
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    @property
    def _execution_device(self):
        return self.denoiser.device

    @property
    def device(self):
        return self.denoiser.device

    @property
    def built_guidance(self) -> float:
        """The guidance scale the artifact was built for (``diffaccel optimize --guidance``; 7.5 by default)."""
        return self.manifest.built_guidance if self.manifest else 7.5

    @property
    def guidance_limit(self) -> "float | None":
        """The largest guidance_scale the engines serve where the U-Net was built without the classifier-free batch
        (``optimize --guidance`` <= 1), else None: the manifest's one rule
        (:attr:`~diffaccel.optimize.artifact.manifest.Manifest.guidance_limit`), while the U-Net is the engine's."""
        if self.manifest is None or not isinstance(self.denoiser, DenoiserShim):
            return None
        return self.manifest.guidance_limit

    def _check_call(self, arguments: dict) -> None:
        """Fail before any work on a call the engines cannot serve: classifier-free guidance on a U-Net built for
        guidance <= 1, or fewer images than the engines' batch range starts at (more are run in chunks).
        ``arguments``: the bound call, defaults applied."""
        guidance = arguments.get("guidance_scale")
        denoiser = self.denoiser
        if guidance is not None and guidance > 1 and self.guidance_limit is not None:
            raise PipelineArgumentError(
                f"guidance_scale={guidance:g} needs classifier-free guidance, but this artifact's U-Net was built for "
                f"guidance <= 1 only (diffaccel optimize --guidance {self.built_guidance:g}); call with "
                f"guidance_scale <= 1 (SDXL-Turbo: 0.0), or rebuild with --guidance {guidance:g} to serve it")
        images = _image_batch(arguments)
        low = max((c.spec.axes["batch"].min for c in (denoiser, self.vae) if isinstance(c, (DenoiserShim, VaeShim))),
                  default=1)
        if images is not None and images < low:
            raise ShapeError(f"{images} image(s) per call cannot be served by this artifact: its engines start at "
                             f"batch {low}; pass more prompts, or rebuild with diffaccel optimize --batch {images}-N")

    def _check_size(self, height, width, encode: bool = False) -> None:
        """Fail before any work when the engines cannot serve height x width (pixels), whole or, with VAE tiling
        on, in tiles (``encode``: the image is also VAE-encoded)."""
        scale = self.vae_scale_factor
        spec = self.denoiser.spec
        h, w = spec.axes["height"], spec.axes["width"]
        bad = [f"{name}={v}" for name, v, r in (("height", height, h), ("width", width, w))
               if v is not None and (v % (scale * r.multiple) or not r.allows(v // scale))]
        if bad:
            raise ShapeError(
                f"{' and '.join(bad)} cannot be served by this artifact: height must be {h.min * scale}-"
                f"{h.max * scale} and width {w.min * scale}-{w.max * scale}, in multiples of {scale * h.multiple}; "
                "rebuild with diffaccel optimize --height/--width for other sizes")
        vae = self.vae
        if height is None or width is None or not isinstance(vae, VaeShim) or not vae.use_tiling:
            return
        problem = vae.tile_problem(vae.tile_sizes(height, width), vae.spec, "decoder") or (
            encode and vae.encoder is not None and
            vae.tile_problem(vae.tile_sizes(height, width, encode=True), vae.encoder_spec, "encoder"))
        if problem:
            raise ShapeError(f"with VAE tiling on, {height}x{width} is cut into {problem}; call "
                             "pipe.vae.disable_tiling() (the engines decode this size whole) or pick another size")

def bound_call(signature: inspect.Signature, *args, **kwargs) -> dict:
    """The arguments of a pipeline call by name, diffusers' defaults filled in (what the checks read)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _image_batch(arguments: dict) -> "int | None":
    """Images one call makes, as diffusers counts them: prompts (or prompt embeddings) x num_images_per_prompt."""
    prompt, embeds = arguments.get("prompt"), arguments.get("prompt_embeds")
    n = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, (list, tuple)) else (
        embeds.shape[0] if getattr(embeds, "ndim", 0) >= 1 else None)
    return None if n is None else n * (arguments.get("num_images_per_prompt") or 1)

def _image_size(image, scale: int, latent_channels: int):
    """(height, width, encoded) of what diffusers' img2img makes of ``image`` (or of the first of a list): PIL
    images, numpy ...HWC arrays and torch ...CHW tensors are floored to multiples of ``scale`` pixels and
    VAE-encoded; 4-D tensors with ``latent_channels`` channels are latents, used as they are. (None, None, True) if
    unknown."""
    import PIL.Image
    import torch

    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    if isinstance(image, PIL.Image.Image):
        w, h = image.size
    elif isinstance(image, torch.Tensor) and image.ndim >= 2:
        if image.ndim == 4 and image.shape[1] == latent_channels:
            return image.shape[2] * scale, image.shape[3] * scale, False
        h, w = image.shape[-2:]
    elif getattr(image, "ndim", 0) >= 3:  # numpy
        h, w = image.shape[-3], image.shape[-2]
    else:
        return None, None, True
    return h - h % scale, w - w % scale, True

