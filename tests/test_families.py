"""The model-family registry: detection from configs, the nearest family named on refusal, one module per family."""
import json
import shutil

import pytest

from diffaccel.optimize import OptimizeConfig, optimize
from diffaccel.optimize.artifact.errors import SourceError
from diffaccel.optimize.families import FAMILIES, configs_of, detect, family, supported_pipelines


def test_every_family_module_implements_the_protocol():
    """The declared contract (optimize/families/protocol.py): every member, every function's parameters, the denoiser
    among its components; and the check itself catches a module that lacks one."""
    import types

    from diffaccel.optimize.families import DENOISERS
    from diffaccel.optimize.families.protocol import MEMBERS, problems

    for name in FAMILIES:
        fam = family(name)
        assert fam.NAME == name and problems(fam) == [], problems(fam)
        assert fam.DENOISER in DENOISERS and set(fam.TEXT_ENCODERS) <= set(fam.COMPONENTS)
    broken = types.ModuleType("broken")
    broken.__dict__.update({n: getattr(family("sd"), n) for n in MEMBERS if n not in ("DENOISER", "specs")})
    broken.specs = lambda geo: {}
    assert problems(broken) == ["broken has no DENOISER", "broken.specs(geo) does not take (geo, shapes)"]


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'kandinsky'; known: sd"):
        family("kandinsky")


@pytest.mark.parametrize("unet, vae, differs", [
    ({"addition_embed_type": "text_time"}, {}, "addition_embed_type=text_time"),
    ({"in_channels": 5}, {"latent_channels": 4}, "in_channels=5"),     # 9 is inpainting: the sd-inpaint family
    ({"_class_name": "UNet2DModel"}, {}, "denoiser is UNet2DModel"),
    ({}, {"_class_name": "AutoencoderTiny"}, "vae is AutoencoderTiny, not AutoencoderKL"),
])
def test_refusal_names_the_nearest_family_and_what_differs(unet, vae, differs):
    with pytest.raises(SourceError, match=f"nearest family is Stable Diffusion 1.x/2.x \\(sd\\), which differs in: "
                                          f".*{differs}"):
        detect({"pipeline": None, "unet": unet, "vae": vae}, "x")


def test_loaded_pipeline_is_detected(tiny_pipe):
    configs = configs_of(tiny_pipe)
    assert configs["pipeline"] == "StableDiffusionPipeline" and detect(configs, "tiny").NAME == "sd"
    assert "StableDiffusionImg2ImgPipeline" in supported_pipelines()


def test_autoencoder_tiny_is_refused_before_loading(tiny_folder, tmp_path):
    """TAESD (AutoencoderTiny) has no latent distribution: refused from its config, nothing written."""
    src = tmp_path / "taesd"
    shutil.copytree(tiny_folder, src)
    cfg = json.loads((src / "vae" / "config.json").read_text())
    (src / "vae" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(SourceError, match="vae is AutoencoderTiny"):
        optimize(str(src), tmp_path / "out", OptimizeConfig())
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
