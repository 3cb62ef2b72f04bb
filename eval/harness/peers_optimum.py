"""The peer a user on an Intel CPU would pick instead of diffaccel: Hugging Face optimum-intel's own pipeline for the
source's diffusers class (``OVStableDiffusionPipeline``, ``OVStableDiffusionXLPipeline``,
``OVStableDiffusion3Pipeline``, ``OVFluxPipeline``...), exported from the same source and measured through
optimum-intel itself.

Precisions, as a user configures them (optimum-intel's documented knobs, nothing re-implemented):

- ``fp32``: ``ov_config={"INFERENCE_PRECISION_HINT": "f32"}`` (OpenVINO would pick bf16 by itself on AMX CPUs);
- ``bf16``: ``INFERENCE_PRECISION_HINT: bf16``, refused where OpenVINO's CPU plugin has no BF16;
- ``int8``: optimum-intel's hybrid quantization, ``OVWeightQuantizationConfig(bits=8, quant_method="hybrid",
  dataset=PROMPTS)``: int8 weights for MatMul/embedding layers and int8 weights + activations (NNCF post-training
  quantization) for the rest of the U-Net, calibrated by running its pipeline on **our** calibration prompts (the
  same ones diffaccel's int8 uses; nothing is downloaded); text encoder and VAE get int8 weights. The float parts
  run in bf16 where the CPU has it, f32 elsewhere (the rule diffaccel's own OpenVINO int8 follows).

Every precision compiles with ``PERFORMANCE_HINT: LATENCY`` (optimum-intel's default) on dynamic shapes, like
diffaccel's OpenVINO engines. Installed from the ``openvino-peer`` extra plus optimum-intel itself (see
:data:`INSTALL`); where it is absent, :func:`optimum_intel` raises a one-line BackendUnavailableError and the peer's
row is skipped with that reason.

>>> build_kind("bf16"), build_kind("int8")
('float', 'int8')
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError, DiffaccelError, one_line

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "int8")
CALIB_PROMPTS, CALIB_SEED = 8, 0     # diffaccel's QuantConfig defaults: the peer calibrates on the same prompts
INSTALL = ('pip install -e ".[cpu,openvino,openvino-peer]" && pip install --no-deps "optimum-intel==2.2.0" '
           '"optimum==2.3.0"')


def optimum_intel():
    """The ``optimum.intel`` package once its diffusion pipelines import here, or a one-line reason why not."""
    try:
        import optimum.intel

        optimum.intel.OVDiffusionPipeline, optimum.intel.OVWeightQuantizationConfig   # noqa: B018 (lazy imports)
    except Exception as e:  # noqa: BLE001 - ImportError, or a transformers/diffusers version it cannot import with
        raise BackendUnavailableError(f"optimum-intel is not usable here ({one_line(e)[:160]}); install the peer "
                                      f"with: {INSTALL}") from None
    return optimum.intel


def pipeline_class(folder: Path):
    """optimum-intel's class for the diffusers pipeline saved in ``folder`` (``OV`` + its ``_class_name``)."""
    name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "StableDiffusionPipeline")
    cls = getattr(optimum_intel(), f"OV{name}", None)
    if cls is None:
        raise BackendUnavailableError(f"optimum-intel {versions().get('optimum-intel')} has no OV{name}: the peer "
                                      f"cannot run this model")
    return cls


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("optimum-intel", "optimum", "nncf", "openvino", "transformers", "diffusers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_kind(precision: str) -> str:
    """fp32 and bf16 share one export (the precision is a compile-time hint); int8 is its own model."""
    if precision not in PRECISIONS:
        raise DiffaccelError(f"unknown optimum-intel precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return "int8" if precision == "int8" else "float"


def ov_config(precision: str) -> dict:
    from diffaccel.engines.backends.openvino import capabilities
    from diffaccel.optimize.stages.openvino import inference_precision

    caps = capabilities()
    if precision == "bf16" and "BF16" not in caps:
        raise BackendUnavailableError(f"this CPU has no bf16 in OpenVINO (capabilities: {', '.join(caps)}): the "
                                      "optimum-intel bf16 peer cannot run here")
    return {"INFERENCE_PRECISION_HINT": inference_precision(precision, caps), "PERFORMANCE_HINT": "LATENCY"}


def source_folder(source, pipe, scratch: Path) -> Path:
    """A diffusers folder holding the source: its own folder where it has one, else ``pipe`` saved to ``scratch``."""
    if source is not None and (Path(source.location) / "model_index.json").is_file():
        return Path(source.location)
    if not (scratch / "model_index.json").is_file():
        pipe = pipe if pipe is not None else source.load()
        tmp = scratch.with_name(scratch.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        tmp.replace(scratch)
    return scratch


def build(folder: Path, precision: str, out: Path, source_spec: str) -> dict:
    """Export ``folder`` with optimum-intel (hybrid int8 for ``int8``) and save its pipeline to ``out``; returns
    the facts written to ``out/diffaccel_peer.json``."""
    from diffaccel.optimize.sources.prompts import calibration_prompts

    weight_config = optimum_intel().OVWeightQuantizationConfig
    pipeline_cls = pipeline_class(folder)
    # float kinds keep float weights: left to itself optimum-intel compresses the weights of a model over 1B
    # parameters to int8, which is its int8 kind, not bf16
    kwargs = {"load_in_8bit": False}
    facts = {"peer": "optimum-intel", "kind": build_kind(precision), "versions": versions(),
             "pipeline": pipeline_cls.__name__}
    if build_kind(precision) == "int8":
        prompts = calibration_prompts(source_spec, CALIB_PROMPTS, CALIB_SEED)
        kwargs = {"quantization_config": weight_config(bits=8, quant_method="hybrid", dataset=prompts)}
        facts["quantization"] = {"quant_method": "hybrid", "bits": 8, "calibration_prompts": len(prompts),
                                 "num_samples": "optimum-intel default (200 U-Net calls)"}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = pipeline_cls.from_pretrained(str(folder), export=True, compile=False, **kwargs)
    pipe.save_pretrained(tmp)
    del pipe
    (tmp / "diffaccel_peer.json").write_text(json.dumps(facts, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return facts


def load(out: Path, precision: str):
    """optimum-intel's pipeline from ``out``, compiled at ``precision``."""
    pipe = pipeline_class(out).from_pretrained(str(out), ov_config=ov_config(precision), compile=False)
    pipe.compile()
    return pipe


def cached(work: Path, source, precision: str, pipe=None) -> Path:
    """The exported peer under ``work`` for ``source`` (built when missing or built by other versions)."""
    optimum_intel()                                   # a missing extra fails here, before any export
    stem = source.spec.replace(":", "_").replace("/", "_")
    out = Path(work) / f"{stem}-optimum-intel-{build_kind(precision)}"
    facts_path = out / "diffaccel_peer.json"
    want = {"source_sha256": source.sha256, "versions": versions()}
    if facts_path.is_file():
        facts = json.loads(facts_path.read_text())
        if all(facts.get(k) == v for k, v in want.items()):
            return out
    folder = source_folder(source, pipe, Path(work) / f"{stem}-{source.sha256[:12]}-diffusers")
    facts = build(folder, precision, out, source.spec)
    facts_path.write_text(json.dumps({**facts, **want}, indent=2))
    return out


def prepare(precision: str):
    """A ``PEERS`` row for ``diffaccel eval``: export the loaded source with optimum-intel (into a temporary folder
    that lives as long as the pipeline) and compile it at ``precision``."""
    def run(pipe, device, source=None):
        if str(device) != "cpu":
            raise BackendUnavailableError("the optimum-intel peer runs on the CPU only (OpenVINO's CPU plugin)")
        optimum_intel()
        tmp = tempfile.TemporaryDirectory(prefix="diffaccel-optimum-")
        root = Path(tmp.name)
        folder = source_folder(source, pipe, root / "source")
        build(folder, precision, root / "peer", source.spec if source is not None else "")
        peer = load(root / "peer", precision)
        peer._diffaccel_tmp = tmp                     # removed with the pipeline
        return peer
    return run


def denoiser_runner(pipe, inputs: dict):
    """One denoiser step through optimum-intel's own model call (its pipeline's ``unet`` or ``transformer``), on the
    microbench's inputs. Its U-Net pipelines feed the timestep as one value for the whole batch (the exported input
    is ``[1]``, int64): so do we; its transformers take one float per row, as ours."""
    import torch

    from diffaccel.optimize.families import denoiser_of

    model = getattr(pipe, denoiser_of(pipe))
    feed = dict(inputs)
    if "sample" in feed:                                  # U-Net inputs (sample, timestep, encoder_hidden_states)
        feed["timestep"] = feed["timestep"][:1].to(torch.int64)

    def run(_inputs):
        return model(**feed)
    return run
