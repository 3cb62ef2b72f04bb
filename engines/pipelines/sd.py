"""Drop-in diffusers pipelines backed by diffaccel engines.

They inherit diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` and swap in engine-backed
components, so diffusers' own ``__call__`` (schedulers, guidance, callbacks, output types) runs unchanged.

>>> pipe = AcceleratedStableDiffusionPipeline.from_pretrained("out/tiny")          # doctest: +SKIP
>>> pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=20).images[0].save("x.png")          # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from diffaccel.optimize.artifact.errors import ArtifactError, ShapeError
from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.artifact.specs import ComponentSpec

from diffaccel.engines.base import load_engine
from diffaccel.engines.pipelines.shims import TextEncoderShim, UNetShim, VaeShim

log = logging.getLogger(__name__)


def _frozen_config(path: Path):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(json.loads(path.read_text()))


def load_components(root, manifest: Manifest, provider=None, threads=None, **engine_options) -> dict:
    """Engine-backed ``unet``, ``vae``, ``text_encoder`` plus the artifact's tokenizer and scheduler."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTokenizer

    root = Path(root)
    comps = manifest.components
    missing = [c for c in ("text_encoder", "unet", "vae_decoder") if c not in comps]
    if missing:
        raise ArtifactError(f"{root} has no engine for {', '.join(missing)}; rebuild with diffaccel optimize")

    def engine(name):
        entry = comps[name]
        opts = dict(engine_options, threads=threads)
        if entry["backend"] == "onnxruntime":
            opts["provider"] = provider
        return load_engine(entry["backend"], root, name, entry, **opts), ComponentSpec.from_dict(name, entry["spec"])

    te, te_spec = engine("text_encoder")
    unet, unet_spec = engine("unet")
    dec, dec_spec = engine("vae_decoder")
    enc, enc_spec = engine("vae_encoder") if "vae_encoder" in comps else (None, None)
    te_cfg = CLIPTextConfig(**json.loads((root / comps["text_encoder"]["config"]).read_text()))
    sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    return {
        "text_encoder": TextEncoderShim(te, te_spec, te_cfg),
        "unet": UNetShim(unet, unet_spec, _frozen_config(root / comps["unet"]["config"])),
        "vae": VaeShim(dec, dec_spec, _frozen_config(root / comps["vae_decoder"]["config"]), enc, enc_spec),
        "tokenizer": CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
        "scheduler": scheduler,
    }


class _Accelerated:
    """What both drop-in pipelines add to their diffusers parent: loading from an artifact, saving one, shape checks
    before any work, and the execution device of the engines."""

    artifact: "Path | None" = None
    manifest: "Manifest | None" = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, provider: "str | None" = None,
                        threads: "int | None" = None, verify: bool = True, **engine_options):
        """Load an artifact made by ``diffaccel optimize``. ``provider`` picks the ONNX Runtime execution provider
        (cpu | cuda | tensorrt; default: the one the artifact was built for)."""
        root = Path(pretrained_model_name_or_path)
        manifest = Manifest.load(root)
        if verify:
            manifest.verify()
        parts = load_components(root, manifest, provider=provider, threads=threads, **engine_options)
        pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.artifact, pipe.manifest = root, manifest
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """Copy the artifact (engines unchanged, so their sha256 still verifies) with the current scheduler."""
        if self.artifact is None:
            raise ArtifactError("this pipeline was not loaded from an artifact; use diffaccel optimize to make one")
        dst = Path(save_directory)
        if dst.exists() and any(dst.iterdir()):
            raise ArtifactError(f"{dst} is not empty; choose a new directory")
        with fresh_dir(dst) as tmp:
            shutil.copytree(self.artifact, tmp, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)
            shutil.rmtree(tmp / "scheduler")
            self.scheduler.save_config(str(tmp / "scheduler"))

    @property
    def _execution_device(self):
        return self.unet.device

    @property
    def device(self):
        return self.unet.device

    def _check_size(self, height, width) -> None:
        """Fail before any work when the engines cannot serve height x width (pixels)."""
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


class AcceleratedStableDiffusionPipeline(_Accelerated, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    def check_inputs(self, prompt, height, width, *args, **kwargs):
        self._check_size(height, width)
        return super().check_inputs(prompt, height, width, *args, **kwargs)


class AcceleratedStableDiffusionImg2ImgPipeline(_Accelerated, StableDiffusionImg2ImgPipeline):
    """``StableDiffusionImg2ImgPipeline`` running on diffaccel engines; called exactly like diffusers'."""

    def __call__(self, prompt=None, image=None, *args, **kwargs):
        height, width = _image_size(image)
        self._check_size(height, width)
        return super().__call__(prompt, image, *args, **kwargs)


def _image_size(image):
    """(height, width) in pixels of a PIL image, array or tensor (or the first of a list); (None, None) if unknown."""
    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    if hasattr(image, "size") and not callable(image.size):  # PIL
        w, h = image.size
        return h, w
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) < 2:
        return None, None
    if len(shape) == 4:
        return (shape[2], shape[3]) if shape[1] in (1, 3, 4) else (shape[1], shape[2])
    return (shape[1], shape[2]) if shape[0] in (1, 3, 4) else (shape[0], shape[1])
