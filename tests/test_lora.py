"""LoRA (``optimize --lora FILE[:SCALE]``): files built here in code (peft adapters with random, nonzero lora_B on the
tiny built-ins, saved with diffusers' own ``save_lora_weights``, or converted to kohya's format), fused before export,
compared with diffusers' ``load_lora_weights`` + ``fuse_lora`` on the same weights; refusals before any work."""
import dataclasses
import shutil

import pytest
import torch

from diffaccel.optimize.artifact.errors import ArtifactError, SourceError
from diffaccel.optimize.sources import resolve_source
from diffaccel.optimize.sources.builtins import BUILTINS

from .helpers import FAST, assert_one_line_error, psnr, run_cli

pytest.importorskip("peft", reason="LoRA needs peft: pip install -e '.[lora]'")

TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text": ["q_proj", "k_proj", "v_proj", "out_proj"]}
PROMPTS = ["a red circle on the left", "a large blue square at the top"]
# the engines text-to-image runs (a LoRA changes no VAE weights; the VAE encoder is only for image-to-image)
TXT2IMG = dict(components=("text_encoder", "unet", "vae_decoder"), **FAST)
TXT2IMG_XL = dict(components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"), **FAST)


def make_lora(src: str, path, seed=0, parts=("unet", "text_encoder", "text_encoder_2"), kohya=False):
    """A LoRA for built-in ``src`` saved to ``path``: rank 4, alpha 8, every lora_A and lora_B random (nonzero)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = BUILTINS[src]()
    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for comp in (c for c in parts if getattr(pipe, c, None) is not None):
            model = getattr(pipe, comp)
            cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=TARGETS["unet" if comp == "unet" else "text"])
            inject_adapter_in_model(cfg, model)
            layers[comp] = get_peft_model_state_dict(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        from safetensors.torch import save_file

        peft = {f"{c}.{'text_model.' if c != 'unet' else ''}{k}": v for c, sd in layers.items() for k, v in sd.items()}
        sd = convert_state_dict_to_kohya(peft)
        sd.update({k.replace(".lora_down.weight", ".alpha"): torch.tensor(8.0) for k in list(sd) if "lora_down" in k})
        save_file(sd, str(path))
        return path
    kw = {f"{c}_lora_layers": convert_state_dict_to_diffusers(sd) for c, sd in layers.items()}
    cls = type(pipe)
    cls.save_lora_weights(str(path.parent), weight_name=path.name, **kw)
    return path


def diffusers_fused(src: str, lora_path, scale: float):
    """The reference: diffusers' own pipeline with the LoRA loaded and fused at ``scale``. transformers 5.24's
    text-encoder adapter loader asks for peft >= 0.22, newer than the registry has; its version check is lifted for
    this reference only (diffaccel itself injects text-encoder adapters with peft directly)."""
    pipe = BUILTINS[src]()
    pipe.set_progress_bar_config(disable=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("transformers.integrations.peft.check_peft_version", lambda **kw: None)
        pipe.load_lora_weights(str(lora_path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    return pipe


def assert_same_weights(a, b, comps):
    for comp in comps:
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert sa.keys() == sb.keys(), comp
        worst = max((sa[k] - sb[k]).abs().max().item() for k in sa)
        assert worst <= 1e-6, (comp, worst)


def changed(pipe, src, comp) -> float:
    base = getattr(BUILTINS[src](), comp).state_dict()
    return max((v - base[k]).abs().max().item() for k, v in getattr(pipe, comp).state_dict().items())


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    return make_lora("random:tiny", tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.fixture(scope="module")
def lora_ort(sd_lora, tmp_path_factory):
    """random:tiny with the LoRA fused at 0.7 -> ONNX Runtime fp32, the components text-to-image runs."""
    from diffaccel.optimize import OptimizeConfig, optimize

    out = tmp_path_factory.mktemp("built") / "tiny-lora"
    optimize(resolve_source("random:tiny", loras=[f"{sd_lora}:0.7"]), out, OptimizeConfig(**TXT2IMG))
    return out


# ---- fusing ---------------------------------------------------------------------------------------------------
def test_fused_weights_equal_diffusers_fuse_lora(sd_lora):
    ours = resolve_source("random:tiny", loras=[f"{sd_lora}:0.7"]).load()
    assert_same_weights(ours, diffusers_fused("random:tiny", sd_lora, 0.7), ("unet", "text_encoder"))
    assert changed(ours, "random:tiny", "unet") > 1e-3 and changed(ours, "random:tiny", "text_encoder") > 1e-3
    from peft.tuners.tuners_utils import BaseTunerLayer   # plain modules again: nothing adapter-like is exported

    assert not any(isinstance(m, BaseTunerLayer) or "lora" in n for c in (ours.unet, ours.text_encoder)
                   for n, m in c.named_modules())


def test_kohya_format_fuses_as_diffusers_does(tmp_path):
    path = make_lora("random:tiny", tmp_path / "kohya.safetensors", seed=1, kohya=True)
    ours = resolve_source("random:tiny", loras=[f"{path}:0.5"]).load()
    assert_same_weights(ours, diffusers_fused("random:tiny", path, 0.5), ("unet", "text_encoder"))
    assert changed(ours, "random:tiny", "text_encoder") > 1e-3


def test_engine_images_match_diffusers_with_the_same_lora_fused(lora_ort, sd_lora):
    from diffaccel.engines import AcceleratedStableDiffusionPipeline
    from diffaccel.optimize.artifact.manifest import Manifest

    ref = diffusers_fused("random:tiny", sd_lora, 0.7)
    acc = AcceleratedStableDiffusionPipeline.from_pretrained(lora_ort, spin=False)
    acc.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    a = ref(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    b = acc(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    plain = BUILTINS["random:tiny"]()          # the LoRA changes the images: the comparison can fail
    plain.set_progress_bar_config(disable=True)
    c = plain(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    print(f"LoRA engine vs diffusers: {psnr(a, b):.1f} dB; vs the model without the LoRA: {psnr(c, b):.1f} dB")
    assert psnr(a, b) >= 40 and psnr(c, b) < psnr(a, b) - 20, (psnr(a, b), psnr(c, b))
    lora = Manifest.load(lora_ort).source["loras"][0]
    assert lora["scale"] == 0.7 and lora["sha256"] == resolve_source("random:tiny", loras=[sd_lora]).loras[0].sha256


def test_scale_changes_the_weights_and_the_source_key(sd_lora):
    from diffaccel.optimize.artifact.keys import source_key

    keys = {source_key(resolve_source("random:tiny", loras=loras).sha256)
            for loras in ([], [sd_lora], [f"{sd_lora}:1.0"], [f"{sd_lora}:0.5"], [f"{sd_lora}:0.5", sd_lora])}
    assert len(keys) == 4                        # FILE and FILE:1.0 are the same build
    half = resolve_source("random:tiny", loras=[f"{sd_lora}:0.5"]).load()
    full = resolve_source("random:tiny", loras=[sd_lora]).load()
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, half.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (half.unet(x, 10, ctx).sample - full.unet(x, 10, ctx).sample).abs().max().item()
    assert diff > 1e-3, diff


def test_same_lora_resumes_and_another_lora_rebuilds(lora_ort, sd_lora, tmp_path):
    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.api import _partial_of, _prepare_workdir

    out = tmp_path / "out"
    shutil.copytree(lora_ort, out)
    seen = []

    class Rec:
        def __getattr__(self, name):
            return lambda *a, **k: seen.append((name, a))
    optimize(resolve_source("random:tiny", loras=[f"{sd_lora}:0.7"]), out, OptimizeConfig(**TXT2IMG), reporter=Rec())
    assert [a[3] for n, a in seen if n == "stage_end"] == ["up to date"] * 3, seen
    other = resolve_source("random:tiny", loras=[f"{sd_lora}:0.3"])
    with pytest.raises(ArtifactError, match="another source"):
        optimize(other, out, OptimizeConfig(**TXT2IMG))
    shutil.move(str(out), str(_partial_of(tmp_path / "new")))     # an interrupted build with the 0.7 LoRA
    work, fresh = _prepare_workdir(tmp_path / "new", other, force=False)
    assert fresh and not any(work.iterdir())     # resuming with another scale starts over


# ---- refusals: one line, exit 2, nothing written ---------------------------------------------------------------
@pytest.fixture(scope="module")
def xl_lora(tmp_path_factory):
    return make_lora("random:tiny-xl", tmp_path_factory.mktemp("xl") / "xl.safetensors")


def test_bad_lora_input_is_refused_in_one_line_before_any_work(capsys, tmp_path, sd_lora, xl_lora):
    pickle = tmp_path / "style.bin"
    pickle.write_bytes(b"\x80\x04junk")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(sd_lora.read_bytes()[:-100])
    cases = [(tmp_path / "missing.safetensors", "no such file"), (pickle, "not a .safetensors file"),
             (broken, "truncated"), (f"{sd_lora}:strong", "scale 'strong' is not a number"),
             (f"{sd_lora}:nan", "is not a number"), (xl_lora, "components text_encoder_2, which this StableDiffusionPipeline has not")]
    for lora, needle in cases:
        code, _, err = run_cli(capsys, "optimize", "random:tiny", "-o", tmp_path / "out", "--lora", lora)
        assert_one_line_error(code, err, needle)
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_lora_of_other_shapes_is_refused_naming_the_file(capsys, tmp_path):
    """An SDXL U-Net-only LoRA on an SD model: refused from the configs (a weightless model), before any work; loading
    checks the same where the configs cannot be read first."""
    path = make_lora("random:tiny-xl", tmp_path / "xl-unet.safetensors", parts=("unet",))
    code, _, err = run_cli(capsys, "optimize", "random:tiny", "-o", tmp_path / "out", "--lora", path)
    assert_one_line_error(code, err, f"--lora {path}", "size mismatch", "is it a LoRA for this model family?")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    from diffaccel.optimize.sources import lora

    src = resolve_source("random:tiny")                           # as if the configs were unreadable
    bad = dataclasses.replace(src, loras=(lora.Lora.parse(path),))
    with pytest.raises(SourceError, match=f"--lora {path}: cannot fuse it.*size mismatch"):
        bad.load()


def test_lora_layers_the_model_has_not_are_refused(tmp_path, sd_lora):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(sd_lora))
    sd.update({k.replace("attn1.to_q", "attn1.to_qq"): v.clone() for k, v in sd.items() if "attn1.to_q." in k})
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(SourceError, match=r"extra.safetensors: .*(match|no layer)"):
        resolve_source("random:tiny", loras=[tmp_path / "extra.safetensors"])


# ---- SDXL ------------------------------------------------------------------------------------------------------
def test_sdxl_lora_fuses_into_both_text_encoders_as_diffusers_does(xl_lora):
    ours = resolve_source("random:tiny-xl", loras=[f"{xl_lora}:0.8"]).load()
    assert_same_weights(ours, diffusers_fused("random:tiny-xl", xl_lora, 0.8),
                        ("unet", "text_encoder", "text_encoder_2"))
    assert min(changed(ours, "random:tiny-xl", c) for c in ("unet", "text_encoder", "text_encoder_2")) > 1e-3


@pytest.mark.slow
def test_sdxl_engine_images_match_diffusers_with_the_same_lora_fused(xl_lora, tmp_path):
    from diffaccel.engines import AcceleratedStableDiffusionXLPipeline
    from diffaccel.optimize import OptimizeConfig, optimize

    optimize(resolve_source("random:tiny-xl", loras=[f"{xl_lora}:0.8"]), tmp_path / "xl", OptimizeConfig(**TXT2IMG_XL))
    ref = diffusers_fused("random:tiny-xl", xl_lora, 0.8)
    acc = AcceleratedStableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", spin=False)
    acc.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np", height=64, width=64)
    a = ref(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    b = acc(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    print(f"SDXL LoRA engine vs diffusers: {psnr(a, b):.1f} dB")
    assert psnr(a, b) >= 40, psnr(a, b)


# ---- eval of a LoRA build: the baseline has the same LoRA fused ---------------------------------------------------
def test_eval_baseline_is_diffusers_with_the_artifacts_lora_fused(lora_ort, sd_lora, tmp_path, monkeypatch):
    """The baseline of a ``--lora`` artifact is the source with its LoRAs fused at their scales (the weights diffusers'
    ``fuse_lora`` gives, not the plain model): the fp32 engines match it, and it is not the model without them."""
    from diffaccel.eval import EvalConfig, evaluate
    from diffaccel.eval.harness import runner
    from diffaccel.optimize.artifact.manifest import Manifest

    pipes, real = [], runner.generate
    monkeypatch.setattr(runner, "generate", lambda pipe, *a: pipes.append(pipe) or real(pipe, *a))
    config = EvalConfig(prompts=PROMPTS, seeds=(0,), steps=(3,), batch_sizes=(1,), repeat=1, warmup=0,
                        guidance_scale=5.0)
    report = evaluate([lora_ort], config=config, out_dir=tmp_path / "report")
    rows = {v["name"]: v for v in report["variants"]}
    q = rows["onnxruntime-fp32"]["quality"]["aggregate"]
    print(f"LoRA build vs the LoRA-fused baseline in eval: {q['psnr']:.1f} dB")
    assert q["psnr"] >= 40, q
    assert report["baseline"]["source"]["loras"] == Manifest.load(lora_ort).source["loras"]
    baseline = pipes[0]                                               # the baseline runs first
    assert type(baseline).__name__ == "StableDiffusionPipeline"
    assert_same_weights(baseline, diffusers_fused("random:tiny", sd_lora, 0.7), ("unet", "text_encoder"))
    assert changed(baseline, "random:tiny", "unet") > 1e-3            # not the model without the LoRA


def test_eval_of_a_lora_build_whose_file_is_gone_is_refused(lora_ort, capsys, tmp_path):
    import json

    art = tmp_path / "art"
    shutil.copytree(lora_ort, art)
    m = json.loads((art / "manifest.json").read_text())
    m["source"]["loras"][0]["path"] = str(tmp_path / "moved.safetensors")
    (art / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(capsys, "eval", art, "--steps", "2", "-o", tmp_path / "r")
    assert_one_line_error(code, err, "moved.safetensors, which is no longer there", "put the file back")
    assert not (tmp_path / "r").exists()


# ---- int8 with a LoRA: calibrated on the fused model ------------------------------------------------------------
def test_int8_lora_build_calibrates_the_fused_model(lora_ort, sd_lora, tiny_int8_unet, tmp_path):
    from diffaccel.engines import AcceleratedStableDiffusionPipeline
    from diffaccel.engines.base import load_engine
    from diffaccel.optimize import OptimizeConfig
    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.config import QuantConfig

    from .helpers import QUICK, build_over

    src = resolve_source("random:tiny", loras=[f"{sd_lora}:0.7"])
    out = tmp_path / "lora-int8"
    m = build_over(lora_ort, out, OptimizeConfig(precision="int8", quant=QuantConfig(**QUICK), **TXT2IMG), src=src)
    assert m.source["loras"][0]["scale"] == 0.7 and m.source["sha256"] == src.sha256
    assert m.components["unet"]["precision"] == "int8" and m.components["unet"]["validation"]["passed"]
    kept = torch.load(out / "unet" / "quantized" / "validation_inputs.pt", weights_only=True)
    plain = torch.load(tiny_int8_unet / "unet" / "quantized" / "validation_inputs.pt", weights_only=True)
    # the same prompts and seeds through the LoRA'd text encoder: calibration ran on the fused pipeline
    assert (kept[0]["encoder_hidden_states"] - plain[0]["encoder_hidden_states"]).abs().max() > 1e-3

    def unet(root):
        return load_engine("onnxruntime", root, "unet", Manifest.load(root).components["unet"])

    x = kept[-1]
    ours, other, fp32 = (unet(r)(**x)["out_sample"] for r in (out, tiny_int8_unet, lora_ort))
    err = lambda a: ((a - fp32).norm() / fp32.norm()).item()              # noqa: E731
    print(f"int8 LoRA U-Net vs fp32 LoRA U-Net: rel err {err(ours):.4f}; int8 U-Net without the LoRA: {err(other):.4f}")
    assert err(ours) < 0.6 * err(other)                                  # nearer the fp32 LoRA U-Net
    kw = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=5.0, output_type="np")
    a, b = (AcceleratedStableDiffusionPipeline.from_pretrained(r, spin=False)(
        **kw, generator=torch.Generator().manual_seed(0)).images for r in (lora_ort, out))
    print(f"int8 LoRA build vs fp32 LoRA build: {psnr(a, b):.1f} dB")
    assert psnr(a, b) > 20
