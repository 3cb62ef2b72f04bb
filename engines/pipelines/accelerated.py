"""The mixin every drop-in pipeline inherits before its diffusers parent (:class:`_Accelerated`): loading from an
artifact, saving one, the engines' execution device, diffusers' pipeline-level VAE slicing/tiling switches, and the
checks that fail a call before any work when the engines cannot serve it. What it loads with, and the keywords
``from_pretrained`` takes, are :mod:`.base`'s.
"""
from __future__ import annotations

import inspect
import shutil
from pathlib import Path

from diffaccel.optimize.artifact.errors import ArtifactError, PipelineArgumentError, ShapeError
from diffaccel.optimize.artifact.files import fresh_dir, given_config_text
from diffaccel.optimize.artifact.manifest import Manifest

from diffaccel.engines.pipelines.base import COMPONENTS, REFUSED, log_passed, split_kwargs
from diffaccel.engines.pipelines.denoisers import DenoiserShim
from diffaccel.engines.pipelines.shims import VaeShim


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
        log_passed(given, ("scheduler", *cls._TOKENIZERS))
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

    def enable_freeu(self, s1, s2, b1, b2):
        """diffusers' FreeU rescales features inside the U-Net's up blocks, which an engine fixed when it was built:
        refused, saying so (not an AttributeError of the stand-in)."""
        raise PipelineArgumentError("FreeU rescales features inside the U-Net's up blocks, which were fixed when the "
                                    "engine was built; call the pipeline without enable_freeu()")

    def disable_freeu(self):
        """FreeU is never on in an engine: nothing to disable."""

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
        return self.device

    @property
    def device(self):
        """The engines' device: the denoiser's, or the first engine-backed component's in a pipeline made without
        one (diffusers' ``encode_prompt`` in isolation passes only the text encoders), else the CPU."""
        import torch

        for model in (getattr(self, n, None) for n in ("unet", "transformer", "text_encoder", "text_encoder_2",
                                                          "text_encoder_3", "vae")):
            if model is not None and hasattr(model, "device"):
                return model.device
        return torch.device("cpu")

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
        denoiser = self.denoiser          # a torch U-Net set in the engine's place runs what diffusers' runs
        spec = denoiser.spec if isinstance(denoiser, DenoiserShim) else None
        h, w = (spec.axes["height"], spec.axes["width"]) if spec else (None, None)
        bad = [f"{name}={v}" for name, v, r in (("height", height, h), ("width", width, w))
               if r is not None and v is not None and (v % (scale * r.multiple) or not r.allows(v // scale))]
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
