"""Drop-in diffusers pipelines backed by diffaccel engines.

They inherit diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` and swap in engine-backed
components, so diffusers' own ``__call__`` (same signature; schedulers, guidance, callbacks, output types) runs
unchanged. Calls the engines cannot serve fail before any work: sizes outside their range, fewer images than their
batch range starts at, and guidance_scale > 1 on an artifact built for guidance <= 1 (``optimize --guidance 0``).

>>> pipe = AcceleratedStableDiffusionPipeline.from_pretrained("out/tiny")          # doctest: +SKIP
>>> pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=20).images[0].save("x.png")          # doctest: +SKIP
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import shutil
from pathlib import Path

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from diffaccel.optimize.artifact.errors import ArtifactError, PipelineArgumentError, ShapeError
from diffaccel.optimize.artifact.files import fresh_dir, given_config_text
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.artifact.specs import ComponentSpec

from diffaccel.engines.base import load_engine
from diffaccel.engines.pipelines.shims import TextEncoderShim, UNetShim, VaeShim

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
REFUSED = {**dict.fromkeys(("unet", "vae", "text_encoder"), "the artifact's engines replace it; run diffaccel "
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


def vae_shim(root, manifest: Manifest, engine) -> VaeShim:
    comps = manifest.components
    dec, dec_spec = engine("vae_decoder")
    enc, enc_spec = engine("vae_encoder") if "vae_encoder" in comps else (None, None)
    return VaeShim(dec, dec_spec, _frozen_config(Path(root) / comps["vae_decoder"]["config"]), enc, enc_spec)


def unet_shim(root, manifest: Manifest, engine) -> UNetShim:
    return UNetShim(*engine("unet"), _frozen_config(Path(root) / manifest.components["unet"]["config"]))


def load_scheduler(root):
    import diffusers

    path = Path(root) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    log.info("Loaded scheduler as %s from %s", type(scheduler).__name__, path)
    return scheduler


def load_tokenizer(root, name: str = "tokenizer"):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(Path(root) / name))
    log.info("Loaded %s as %s from %s", name, type(tokenizer).__name__, Path(root) / name)
    return tokenizer


def load_components(root, manifest: Manifest, provider=None, threads=None, **engine_options) -> dict:
    """Engine-backed ``unet``, ``vae``, ``text_encoder`` plus the artifact's tokenizer and scheduler; logs each at
    INFO, as diffusers does."""
    engine = engine_loader(root, manifest, ("text_encoder", "unet", "vae_decoder"), provider, threads,
                           **engine_options)
    return {"text_encoder": text_encoder_shim(root, manifest, engine, "text_encoder"),
            "unet": unet_shim(root, manifest, engine), "vae": vae_shim(root, manifest, engine),
            "tokenizer": load_tokenizer(root), "scheduler": load_scheduler(root)}


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
    _ACCEPTED = COMPONENTS          # from_pretrained's component keywords
    _REFUSED = REFUSED
    _TOKENIZERS = ("tokenizer",)
    _DEFAULTS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @classmethod
    def _load_components(cls, root, manifest, **options) -> dict:
        return load_components(root, manifest, **options)

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
    def _execution_device(self):
        return self.unet.device

    @property
    def device(self):
        return self.unet.device

    @property
    def built_guidance(self) -> float:
        """The guidance scale the artifact was built for (``diffaccel optimize --guidance``; 7.5 by default)."""
        return self.manifest.built_guidance if self.manifest else 7.5

    @property
    def guidance_limit(self) -> "float | None":
        """The largest guidance_scale the engines serve where the U-Net was built without the classifier-free batch
        (``optimize --guidance`` <= 1), else None: the manifest's one rule
        (:attr:`~diffaccel.optimize.artifact.manifest.Manifest.guidance_limit`), while the U-Net is the engine's."""
        if self.manifest is None or not isinstance(self.unet, UNetShim):
            return None
        return self.manifest.guidance_limit

    def _check_call(self, arguments: dict) -> None:
        """Fail before any work on a call the engines cannot serve: classifier-free guidance on a U-Net built for
        guidance <= 1, or fewer images than the engines' batch range starts at (more are run in chunks).
        ``arguments``: the bound call, defaults applied."""
        guidance = arguments.get("guidance_scale")
        unet = self.unet
        if guidance is not None and guidance > 1 and self.guidance_limit is not None:
            raise PipelineArgumentError(
                f"guidance_scale={guidance:g} needs classifier-free guidance, but this artifact's U-Net was built for "
                f"guidance <= 1 only (diffaccel optimize --guidance {self.built_guidance:g}); call with "
                f"guidance_scale <= 1 (SDXL-Turbo: 0.0), or rebuild with --guidance {guidance:g} to serve it")
        images = _image_batch(arguments)
        low = max((c.spec.axes["batch"].min for c in (unet, self.vae) if isinstance(c, (UNetShim, VaeShim))),
                  default=1)
        if images is not None and images < low:
            raise ShapeError(f"{images} image(s) per call cannot be served by this artifact: its engines start at "
                             f"batch {low}; pass more prompts, or rebuild with diffaccel optimize --batch {images}-N")

    def _check_size(self, height, width, encode: bool = False) -> None:
        """Fail before any work when the engines cannot serve height x width (pixels), whole or, with VAE tiling
        on, in tiles (``encode``: the image is also VAE-encoded)."""
        scale = self.vae_scale_factor
        spec = self.unet.spec
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


_CALL = inspect.signature(StableDiffusionPipeline.__call__)
_IMG2IMG_CALL = inspect.signature(StableDiffusionImg2ImgPipeline.__call__)


class AcceleratedStableDiffusionPipeline(_Accelerated, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(StableDiffusionPipeline.__call__)   # diffusers' signature and docs; body unchanged
    def __call__(self, *args, **kwargs):
        self._check_call(bound_call(_CALL, self, *args, **kwargs))
        return super().__call__(*args, **kwargs)

    def check_inputs(self, prompt, height, width, *args, **kwargs):
        self._check_size(height, width)
        return super().check_inputs(prompt, height, width, *args, **kwargs)


class AcceleratedStableDiffusionImg2ImgPipeline(_Accelerated, StableDiffusionImg2ImgPipeline):
    """``StableDiffusionImg2ImgPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    @functools.wraps(StableDiffusionImg2ImgPipeline.__call__)   # diffusers' signature and docs; body unchanged
    def __call__(self, *args, **kwargs):
        arguments = bound_call(_IMG2IMG_CALL, self, *args, **kwargs)
        height, width, encode = _image_size(arguments.get("image"), self.vae_scale_factor,
                                            self.vae.config.get("latent_channels", 4))
        self._check_size(height, width, encode)
        self._check_call(arguments)
        return super().__call__(*args, **kwargs)


class AcceleratedStableDiffusionInpaintPipeline(_Accelerated, StableDiffusionInpaintPipeline):
    """``StableDiffusionInpaintPipeline`` running on diffaccel engines (an inpainting U-Net: 9 input channels);
    called exactly like diffusers'."""

    _CALL = inspect.signature(StableDiffusionInpaintPipeline.__call__)

    @functools.wraps(StableDiffusionInpaintPipeline.__call__)
    def __call__(self, *args, **kwargs):
        arguments = bound_call(self._CALL, self, *args, **kwargs)
        size = self.unet.config.sample_size * self.vae_scale_factor       # diffusers' default, not the image's
        self._check_size(arguments.get("height") or size, arguments.get("width") or size, encode=True)
        self._check_call(arguments)
        return super().__call__(*args, **kwargs)


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
