"""One contract for every backend that runs here: build -> load -> parity with torch -> manifest round-trip."""
import importlib.util
import json

import pytest
import torch

from diffaccel.engines import AcceleratedStableDiffusionPipeline, load_engine
from diffaccel.optimize.artifact.manifest import Manifest
from diffaccel.optimize.export.parity import compare
from diffaccel.optimize.families.sd import export_module
from diffaccel.optimize.artifact.specs import ComponentSpec

from .helpers import psnr

BACKENDS = ["onnxruntime", "torch",
            pytest.param("openvino", marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                                              reason="openvino is not installed (diffaccel[openvino])"))]


def _built(request, backend):
    """The session's fp32 artifact of random:tiny for ``backend``. openvino compiles the same ONNX export as
    onnxruntime: its artifact is conftest's ``tiny_ov``, the engine stage run over a copy of the legacy exporter's
    ONNX Runtime build (the default exporter is covered by the onnxruntime case)."""
    if backend == "openvino":
        return request.getfixturevalue("tiny_ov")
    return request.getfixturevalue("artifacts")("random:tiny", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifest_records_what_was_built(request, backend):
    out = _built(request, backend)
    m = Manifest.load(out)
    assert m.complete and m["backend"] == backend and m["precision"] == "fp32"
    assert m.source["spec"] == "random:tiny" and len(m.source["sha256"]) == 64
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, c in m.components.items():
        assert c["validation"]["passed"] and len(c["validation"]["points"]) == 2, name
        assert all(len(f["sha256"]) == 64 and (out / f["path"]).is_file() for f in c["files"])
        assert c["spec"]["axes"]["batch"]["max"] >= 4
    for stage in m.stages.values():
        assert len(stage["key"]) == 16 and stage["seconds"] >= 0
    assert {"torch", "diffusers", "onnx"} <= set(m["tools"])
    m.verify()


@pytest.mark.parametrize("backend", BACKENDS)
def test_engines_match_torch_on_fresh_inputs(request, tiny_pipe, backend):
    out = _built(request, backend)
    m = Manifest.load(out)
    gen = torch.Generator().manual_seed(99)
    for name, entry in m.components.items():
        spec = ComponentSpec.from_dict(name, entry["spec"])
        engine = load_engine(backend, out, name, entry)
        inputs = spec.random_inputs(gen, **spec.alt_values())
        module = export_module(name, tiny_pipe)
        with torch.no_grad():
            ref = module(*(inputs[t.name] for t in spec.inputs))
        ref = dict(zip([t.name for t in spec.outputs], ref if isinstance(ref, tuple) else (ref,)))
        stats = compare(ref, engine(**inputs), atol=spec.atol, rtol=spec.rtol)
        assert all(s["passed"] for s in stats.values()), (name, stats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_images_match_diffusers(request, tiny_pipe, backend):
    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(_built(request, backend))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=4, output_type="np")
    ref = tiny_pipe(generator=torch.Generator().manual_seed(3), **kw).images
    got = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    assert got.shape == ref.shape == (1, 64, 64, 3)
    assert psnr(ref, got) >= 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_pretrained_round_trips(request, tmp_path, backend):
    from diffusers import EulerDiscreteScheduler

    pipe = AcceleratedStableDiffusionPipeline.from_pretrained(_built(request, backend))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "copy")
    again = AcceleratedStableDiffusionPipeline.from_pretrained(tmp_path / "copy")
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler).__name__ == "EulerDiscreteScheduler"
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text())["source"]["spec"] == "random:tiny"
    kw = dict(prompt="a blue square", num_inference_steps=3, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    b = again(generator=torch.Generator().manual_seed(1), **kw).images
    assert (a == b).all()
