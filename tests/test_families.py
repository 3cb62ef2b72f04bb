"""The model-family registry: detection from configs, the nearest family named on refusal, one module per family."""
import json
import shutil

import pytest

from diffaccel.optimize import OptimizeConfig, optimize
from diffaccel.optimize.artifact.errors import SourceError
from diffaccel.optimize.families import FAMILIES, configs_of, detect, family, supported_pipelines


def test_every_family_module_has_the_same_surface():
    names = ("NAME", "TITLE", "PIPELINES", "PIPELINE_CLASS", "DROP_INS", "COMPONENTS", "SOURCE_MODEL", "mismatches",
             "ModelGeometry", "specs", "export_module", "capture_unet_inputs", "size_factors", "check_pixel_range")
    for name in FAMILIES:
        fam = family(name)
        assert fam.NAME == name
        assert [n for n in names if not hasattr(fam, n)] == []


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'flux'; known: sd"):
        family("flux")


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
