"""Runs diffusers' own fast pipeline tests against diffaccel's drop-ins.

diffusers' test files are not part of this repository (nor of its wheel): point ``DIFFACCEL_DIFFUSERS_TESTS`` at the
``tests/`` folder of a diffusers checkout (``git clone https://github.com/huggingface/diffusers``; the run in the
closing note of #27 used commit 58eb52c0803e) and the suites import its files as they are, as the package
``diffusers_upstream_tests``; without it they skip, saying so. Three adaptations, all from outside those files:

1. **Offline components.** Their ``get_dummy_components()`` builds every model in code from a fixed seed, but loads
   the tokenizers and the T5 config from the hub (``hf-internal-testing/tiny-random-clip`` / ``-t5``).
   :func:`offline_hub` answers exactly those three calls with our offline equivalents (``word_tokenizer``,
   ``t5_tokenizer``, and T5's tiny config spelled out as diffusers' own allegro test spells it) and refuses any
   other hub id, so their seeds, configs and model construction run as written.
2. **Engine-backed pipelines.** The suite's ``pipeline_class`` becomes :func:`engine_backed` (the drop-in): built
   from PyTorch components, it saves them as a diffusers folder, builds an artifact from it with ``optimize()``
   (fp32, onnxruntime, the family's exporter and a shape range covering the sizes the tests use; once per distinct
   component set, keyed by the weights' hashes), and constructs the drop-in with the artifact's engine-backed
   models in their place. Tokenizers, schedulers and ``None`` are passed through as given. A pipeline made with only
   some models (``encode_prompt`` in isolation passes the others as ``None``) gets the artifact of the full dummy
   set those models came from.
3. **Named skips.** :func:`skip` replaces a test that cannot apply to engines by a skipped one whose reason says
   why; the suites keep each list next to the class.

The artifacts live in a session folder (``conftest.py``); set ``DIFFACCEL_SUITES_CACHE`` to a folder to keep them
between runs while iterating (stale once the library's export code changes: delete the folder then).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

UPSTREAM = "diffusers_upstream_tests"
TESTS_ENV = "DIFFACCEL_DIFFUSERS_TESTS"
T5_HUB, CLIP_HUB = "hf-internal-testing/tiny-random-t5", "hf-internal-testing/tiny-random-clip"
ROOT: "Path | None" = None                 # where artifacts are built (conftest sets a session folder)


# ---- importing diffusers' test files --------------------------------------------------------------------------
def _not_loaded(*_, **__):
    raise RuntimeError("this upstream helper is not loaded (IP-Adapter / LoRA tests only, which are skipped)")


def tests_folder() -> Path:
    """The diffusers ``tests/`` folder named by ``DIFFACCEL_DIFFUSERS_TESTS``; skips the calling module without it."""
    folder = os.environ.get(TESTS_ENV)
    if not folder or not (Path(folder) / "testing_utils.py").is_file():
        pytest.skip(f"diffusers' own test files are not here: set {TESTS_ENV} to a diffusers checkout's tests/ "
                    "folder (tests/diffusers_suites/harness.py)", allow_module_level=True)
    return Path(folder)


def upstream(module: str):
    """``<diffusers tests>/<module>`` imported as a module of the package ``diffusers_upstream_tests`` (so its
    relative imports work), after registering stand-ins for the helpers it imports only for IP-Adapter and LoRA
    tests (they pull in the ``parameterized`` package; every test that would call them is skipped)."""
    if UPSTREAM not in sys.modules:
        package = types.ModuleType(UPSTREAM)
        package.__path__ = [str(tests_folder())]
        sys.modules[UPSTREAM] = package
    stubs = {"models.transformers.test_models_transformer_flux": ("create_flux_ip_adapter_state_dict",),
             "models.unets.test_models_unet_2d_condition": ("create_ip_adapter_state_dict",
                                                            "create_ip_adapter_faceid_state_dict"),
             "models.testing_utils.lora": ("check_if_lora_correctly_set",)}
    for name, functions in stubs.items():
        parts = name.split(".")
        for i in range(2, len(parts) + 1):          # models.transformers, then the module itself
            full = f"{UPSTREAM}.{'.'.join(parts[:i])}"
            if full not in sys.modules:
                stub = types.ModuleType(full)
                stub.__path__ = []                  # a package, so the next part can be imported from it
                sys.modules[full] = stub
        for f in functions:
            setattr(sys.modules[f"{UPSTREAM}.{name}"], f, _not_loaded)
    return importlib.import_module(f"{UPSTREAM}.{module}")


# ---- 1. offline components ------------------------------------------------------------------------------------
def tiny_t5_config():
    """hf-internal-testing/tiny-random-t5's model config, in code (the numbers diffusers' allegro test spells out,
    with this model's d_model 32 and 5 layers: SD3's and FLUX's dummy transformers take 32-wide T5 states)."""
    from transformers import T5Config

    return T5Config(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
                    relative_attention_num_buckets=8)


@contextlib.contextmanager
def offline_hub():
    """While active, the three hub loads in diffusers' dummy components return offline equivalents; any other hub
    id is refused (nothing is downloaded)."""
    from transformers import AutoConfig, AutoTokenizer, CLIPTokenizer

    from diffaccel.optimize.sources.tokenizer import t5_tokenizer, word_tokenizer

    def answer(known):
        def load(name, *args, **kwargs):
            if name not in known:
                raise OSError(f"{name} would be downloaded; the suites run offline (known: {', '.join(known)})")
            return known[name]()
        return staticmethod(load)

    with mock.patch.object(AutoConfig, "from_pretrained", answer({T5_HUB: tiny_t5_config})), \
            mock.patch.object(AutoTokenizer, "from_pretrained", answer({T5_HUB: t5_tokenizer})), \
            mock.patch.object(CLIPTokenizer, "from_pretrained", answer({CLIP_HUB: word_tokenizer})):
        yield


class Offline:
    """Mixed in before an upstream test class: its dummy components are built with :func:`offline_hub` and
    recorded (:func:`record`)."""

    def get_dummy_components(self, *args, **kwargs):
        with offline_hub():
            return record(super().get_dummy_components(*args, **kwargs))


# ---- 2. engine-backed pipelines -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    """What the harness needs to build one family's artifacts from dummy components."""

    source: str                 # the diffusers pipeline class the components are saved with (by default: the
    #                             drop-in's own diffusers parent is used where the suite names one, see engine_backed)
    models: tuple               # the model components an artifact replaces by engines
    tokenizers: tuple
    build: dict                 # OptimizeConfig fields besides fp32 / onnxruntime
    optional: tuple = ()        # models / tokenizers a dummy set may leave out (None): SDXL's refiner layout


def _shapes(batch, height, width):
    from diffaccel.optimize.config import ShapeRange

    return ShapeRange.parse(batch, height, width)


# SD3's dummy images are 32 x 32 (VAE scale 1, patch 1); torchscript keeps its build short. FLUX's tests use 8 to
# 72 x 57 (-> 56) pixels and export with dynamo (its only exporter). Up to 4 images a call (2 prompts x 2 each).
SD3 = Family("StableDiffusion3Pipeline", ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"),
             ("tokenizer", "tokenizer_2", "tokenizer_3"), dict(exporter="torchscript", shapes=("1-4", "16-64", "16-64")))
FLUX = Family("FluxPipeline", ("text_encoder", "text_encoder_2", "transformer", "vae"), ("tokenizer", "tokenizer_2"),
              dict(exporter="dynamo", shapes=("1-4", "8-72", "8-72")))
# SD's dummy U-Net samples 32 latents (VAE scale 2: 64 pixels); its tests also ask for 96 and 136 pixels, img2img
# and inpainting for 32 to 64. SDXL's are 64 pixels (img2img 32). Up to 4 images a call, doubled by guidance.
SD = Family("StableDiffusionPipeline", ("text_encoder", "unet", "vae"), ("tokenizer",),
            dict(exporter="torchscript", shapes=("1-4", "16-136", "16-136")))
SDXL = Family("StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2", "unet", "vae"),
              ("tokenizer", "tokenizer_2"), dict(exporter="torchscript", shapes=("1-4", "16-128", "16-128")),
              optional=("text_encoder", "tokenizer"))

_recorded: dict = {}            # fingerprint of a dummy model -> the full dummy component set it came from
_artifacts: dict = {}           # (family source, fingerprints) -> artifact folder
_parts: dict = {}               # artifact folder -> its loaded drop-in components (copied per pipeline)


def fingerprint(module) -> str:
    """sha256 of a model's class, config and weights."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def record(components: dict) -> dict:
    """Remember a dummy component set, so a pipeline built from some of its models finds the rest."""
    for v in components.values():
        if isinstance(v, torch.nn.Module):
            _recorded.setdefault(fingerprint(v), components)
    return components


def _full_set(family: Family, given: dict) -> dict:
    models = {k: v for k, v in given.items() if isinstance(v, torch.nn.Module)}
    base = next((_recorded[fingerprint(m)] for m in models.values() if fingerprint(m) in _recorded), {})
    full = {k: v for k, v in {**base, **{k: v for k, v in given.items() if v is not None}}.items()
            if k in (*family.models, *family.tokenizers, "scheduler")}
    left_out = {k for k in family.optional if (base or given).get(k, 0) is None}    # the dummy set has it as None
    missing = [k for k in (*family.models, *family.tokenizers) if full.get(k) is None and k not in left_out]
    if missing:
        raise ValueError(f"cannot build an artifact without {', '.join(missing)} (not in the dummy set either)")
    return full


def _settings(source, given: dict) -> dict:
    """The pipeline settings ``given`` passes to the source class (``requires_aesthetics_score``...): plain values
    its constructor takes besides the components."""
    import inspect

    takes = inspect.signature(source.__init__).parameters
    return {k: v for k, v in given.items() if k in takes and isinstance(v, (bool, int, float, str))}


def _left_out(source, parts: dict) -> dict:
    """None for each component the source class requires that ``parts`` lacks (SD's safety checker and feature
    extractor: the engines run the model alone)."""
    import inspect

    takes = inspect.signature(source.__init__).parameters.items()
    return {k: None for k, p in takes if k not in (*parts, "self", "scheduler") and p.default is p.empty
            and p.kind is p.POSITIONAL_OR_KEYWORD}


def artifact_for(family: Family, given: dict, source: "str | None" = None) -> Path:
    """The artifact built from the full component set ``given`` belongs to (built on first use), saved with the
    diffusers pipeline class ``source`` (the family's by default) and the settings ``given`` has for it."""
    import diffusers

    from diffaccel.optimize import OptimizeConfig, optimize

    full = _full_set(family, given)
    source = source or family.source
    settings = _settings(getattr(diffusers, source), given)
    scheduler = full.get("scheduler") or diffusers.FlowMatchEulerDiscreteScheduler()
    models = tuple(k for k in family.models if full.get(k) is not None)
    key = (source, tuple(fingerprint(full[k]) for k in models), json.dumps(settings, sort_keys=True),
           json.dumps(dict(scheduler.config), sort_keys=True, default=str))
    if key not in _artifacts:
        root = Path(os.environ.get("DIFFACCEL_SUITES_CACHE") or ROOT or tempfile.mkdtemp(prefix="diffaccel-suites-"))
        out = root / hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        if not (out / "manifest.json").is_file():
            src = root / f"{out.name}-src"
            parts = {k: full.get(k) for k in (*family.models, *family.tokenizers)}
            cls = getattr(diffusers, source)
            pipe = cls(**parts, **_left_out(cls, parts), **settings, scheduler=scheduler)
            pipe.save_pretrained(str(src))
            build = dict(family.build, shapes=_shapes(*family.build["shapes"]))
            optimize(str(src), out, OptimizeConfig(backend="onnxruntime", precision="fp32", **build))
        _artifacts[key] = out
    return _artifacts[key]


def _engine_parts(drop_in, artifact: Path) -> dict:
    """The drop-in's engine-backed models of ``artifact``, loaded once and copied per pipeline (each pipeline gets
    its own shim, e.g. its own VAE tiling switch, over the shared engines)."""
    from diffaccel.optimize.artifact.manifest import Manifest

    if artifact not in _parts:
        _parts[artifact] = drop_in._load_components(artifact, Manifest.load(artifact))
    return {k: copy.copy(v) for k, v in _parts[artifact].items()}


class _EngineBacked:
    """Built from PyTorch components, swaps each model for its engine-backed stand-in; built by ``from_pretrained``
    (engine-backed components already), it is the drop-in unchanged."""

    _family: Family
    _source: "str | None" = None

    def __init__(self, **components):
        artifact = None
        if any(isinstance(v, torch.nn.Module) for k, v in components.items() if k in self._family.models):
            artifact = artifact_for(self._family, components, self._source)
            parts = _engine_parts(self, artifact)
            # a model the artifact has no engine for (an IP-Adapter image encoder) is left out, as from_pretrained
            # refuses it: IP-Adapter embeddings cannot enter an exported U-Net
            components = {k: parts.get(k) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
        super().__init__(**components)
        if artifact is not None:                # as if loaded from the artifact: save_pretrained copies it
            from diffaccel.optimize.artifact.manifest import Manifest

            self.artifact, self.manifest = artifact, Manifest.load(artifact)
            self._artifact_tokenizers = {n: getattr(self, n, None) for n in self._TOKENIZERS}


def engine_backed(drop_in, family: Family):
    """``drop_in`` (a diffaccel drop-in class) constructible from diffusers' PyTorch components. Its ``__init__``
    shows diffusers' signature, from which diffusers reads the pipeline's component names."""
    import diffusers.pipelines

    # diffusers' source parser (test_encode_prompt_works_in_isolation) finds a pipeline class by name in
    # diffusers.pipelines, to read the encode_prompt it runs: the drop-in's is diffusers' own, inherited
    setattr(diffusers.pipelines, drop_in.__name__, drop_in)

    @functools.wraps(drop_in.__init__)
    def __init__(self, **components):
        _EngineBacked.__init__(self, **components)

    source = next(c.__name__ for c in drop_in.__mro__ if c.__module__.startswith("diffusers."))
    return type(drop_in.__name__, (_EngineBacked, drop_in), {"_family": family, "_source": source,
                                                             "__init__": __init__,
                                                             "__module__": drop_in.__module__,
                                                             "__qualname__": drop_in.__qualname__})


# Why a test cannot apply to engines (each was run against the SD3 drop-ins and failed for this reason,
# 2026-12-08).
NOT_FOR_ENGINES = {
    "test_inference": "its expected pixel slice was recorded with hf-internal-testing/tiny-random-clip's tokenizer, "
                      "which the offline run replaces: diffusers' own PyTorch pipeline fails it here too; "
                      "tests/test_transformers.py compares the drop-in with diffusers' pipeline on the same weights",
    "test_to_dtype": "engines keep the precision they were built in; .to(dtype) changes nothing",
    "test_layerwise_casting_inference": "layerwise casting hooks torch modules; an engine has none",
    "test_fused_qkv_projections": "fusing QKV rewrites torch modules; the exported graph's attention is fused by "
                                  "the build (docs/optimize.md)",
    "test_loading_with_incorrect_variants_raises_error": "weight variants (fp16 files) are a torch checkpoint's; an "
                                                         "artifact has one set of engines",
    "test_serialization_with_variants": "weight variants are a torch checkpoint's; an artifact has one set of engines",
    "test_skip_guidance_layers": "skip-layer guidance runs the transformer without some blocks, which an exported "
                                 "transformer cannot: the drop-in refuses it in one line (tests/test_transformers.py)",
    # SD and SDXL (run against their drop-ins 2026-12-09)
    **dict.fromkeys(("test_freeu", "test_freeu_enabled", "test_freeu_disabled"),
                    "FreeU rescales the U-Net's up-block features inside the network, which an exported U-Net "
                    "fixed at build time; pipe.enable_freeu() is refused in one line (tests/test_sdxl_dropins.py)"),
    "test_StableDiffusionMixin_component": "asserts the VAE and U-Net are diffusers' torch classes (AutoencoderKL, "
                                           "UNet2DConditionModel); the drop-in's are engine-backed stand-ins with "
                                           "the same configs",
    "test_multi_vae": "swaps in an AsymmetricAutoencoderKL / AutoencoderTiny: the engines export AutoencoderKL only "
                      "and the build refuses other VAEs, naming the class",
    **dict.fromkeys(("test_ip_adapter", "test_ip_adapter_cfg", "test_ip_adapter_faceid", "test_ip_adapter_masks"),
                    "IP-Adapter image embeddings enter the U-Net's attention, and an exported U-Net takes no "
                    "image_embeds input: the drop-ins refuse ip_adapter_image in one line"),
}
# What diffusers' own pipeline fails offline too (DIFFACCEL_SUITES_REFERENCE=1 runs it): the suites name these per
# test, next to each class.
OFFLINE_SLICE = ("its expected pixel slice was recorded with hf-internal-testing/tiny-random-clip's tokenizer, "
                 "which the offline run replaces: diffusers' own pipeline fails it here too; the drop-ins are "
                 "compared with diffusers' pipelines on the same weights in tests/test_sdxl.py, tests/test_dropin.py")
OFFLINE_HUB = "loads a checkpoint from the hub; the suites run offline (diffusers' own pipeline fails it here too)"


# ---- 3. named skips -------------------------------------------------------------------------------------------
def skip(reason: str):
    """A test that is skipped with ``reason`` (put in place of an upstream test that cannot apply to engines)."""
    @pytest.mark.skip(reason=reason)
    def test(self):
        pass
    return test


def skips(reasons: dict) -> dict:
    """Class attributes replacing each named test by a skipped one: ``{test name: reason}`` -> ``{name: test}``."""
    return {name: skip(reason) for name, reason in reasons.items()}


REFERENCE_ENV = "DIFFACCEL_SUITES_REFERENCE"


def engine_suite(upstream_class, drop_in, family: Family, reasons: "dict | None" = None):
    """``upstream_class`` (a diffusers fast-test class) run against ``drop_in``: dummy components built offline,
    its pipeline class engine-backed, and the tests that cannot apply to engines skipped with their reasons
    (:data:`NOT_FOR_ENGINES` and the suite's own ``reasons``). With ``DIFFACCEL_SUITES_REFERENCE=1`` the suite runs
    diffusers' own pipeline offline instead, skipping nothing: what fails there fails for the offline tokenizer,
    not for the engines."""
    if os.environ.get(REFERENCE_ENV):
        return type(upstream_class.__name__, (Offline, upstream_class), {})
    return type(upstream_class.__name__, (Offline, upstream_class),
                {"pipeline_class": engine_backed(drop_in, family), **skips({**NOT_FOR_ENGINES, **(reasons or {})})})

