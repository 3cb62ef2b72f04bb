"""The shipped tinyshapes pipeline: loads offline, has the SD 1.x layout diffaccel expects, is small, runs."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaccel.optimize.sources.builtins import ASSETS, BUILTINS

MODEL = ASSETS / "tinyshapes"
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"no weights at {MODEL}")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shipped_index(folder: Path) -> dict:
    """The folder's model_index.json, after checking that every weight file is safetensors and all is <= 25 MiB."""
    files = [f for f in folder.rglob("*") if f.is_file()]
    weights = [f.name for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(w.endswith(".safetensors") for w in weights), weights
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    return json.loads((folder / "model_index.json").read_text())


def test_files_are_safetensors_and_small():
    index = shipped_index(MODEL)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index.get("safety_checker", [None])[0] is None and index.get("feature_extractor", [None])[0] is None


def test_architecture_is_plain_sd1(pipe):
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and "CLIPTokenizer" in type(pipe.tokenizer).__name__
    assert unet.addition_embed_type is None and unet.time_cond_proj_dim is None
    assert unet.in_channels == unet.out_channels == vae.latent_channels
    assert unet.cross_attention_dim == text.hidden_size
    assert any("CrossAttn" in b for b in unet.down_block_types)
    factor = 2 ** (len(vae.block_out_channels) - 1)
    assert unet.sample_size >= 16 and unet.sample_size % 2 ** (len(unet.down_block_types) - 1) == 0
    assert unet.sample_size * factor == 64
    assert pipe.tokenizer.model_max_length <= text.max_position_embeddings
    assert pipe.scheduler.config.prediction_type in ("epsilon", "v_prediction")
    assert vae.scaling_factor != 0.18215, "the VAE scaling factor should be measured on its own latents"


def test_tokenizer_knows_every_word(pipe):
    from diffaccel.optimize.sources.tinyshapes import WORDS

    ids = pipe.tokenizer(" ".join(WORDS)).input_ids[1:-1]
    assert pipe.tokenizer.unk_token_id not in ids


def test_training_tokenizer_spells_every_word_as_one_token():
    from diffaccel.optimize.sources.tinyshapes import WORDS, eval_prompts
    from diffaccel.optimize.sources.tokenizer import word_tokenizer

    tok = word_tokenizer(WORDS, max_length=16)
    assert [w for w in WORDS if tok.tokenize(w) != [w + "</w>"]] == []
    assert max(len(tok(p.prompt).input_ids) for p in eval_prompts()) <= 16     # no caption is truncated


def test_shipped_tokenizer_fits_every_eval_prompt(pipe):
    from diffaccel.optimize.sources.tinyshapes import eval_prompts

    longest = max(len(pipe.tokenizer(p.prompt).input_ids) for p in eval_prompts())
    assert longest <= pipe.tokenizer.model_max_length


def test_builtin_name_loads_the_same_weights(pipe):
    builtin = BUILTINS["tinyshapes"]()
    for a, b in zip(builtin.unet.parameters(), pipe.unet.parameters()):
        torch.testing.assert_close(a, b)


def test_two_step_generation_runs(pipe):
    out = pipe("a large red circle in the center on a white background", num_inference_steps=2,
               guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np")
    image = out.images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tinyshapes", ROOT / "tools" / "train_tinyshapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_tinyshapes", module)  # dataclasses look their module up while building
    spec.loader.exec_module(sys.modules["train_tinyshapes"])
    module = sys.modules["train_tinyshapes"]
    return module


def test_training_captions_leave_out_attributes_at_the_configured_rates():
    """caption_ids picks variant size + 2*position + 4*color (1 = left out) and the empty caption for dropout."""
    import numpy as np

    train = _train_module()
    cfg = train.TrainConfig(omit_prob=0.2, omit_color_prob=0.25, caption_dropout=0.1)
    n, length = 4000, 3
    ids = torch.arange(8).view(1, 8, 1).expand(n, 8, length).clone()      # token value = variant index
    empty = torch.full((length,), -1)
    out, dropped = train.caption_ids(cfg, ids, empty, np.arange(n), np.random.default_rng(0))
    out = out[:, 0].numpy()
    assert ((out < 0) == dropped.numpy()).all()
    kept = out[out >= 0]
    assert abs((out < 0).mean() - 0.1) < 0.02
    assert abs((kept & 1).astype(bool).mean() - 0.2) < 0.03
    assert abs((kept & 2).astype(bool).mean() - 0.2) < 0.03
    assert abs((kept & 4).astype(bool).mean() - 0.25) < 0.03


def test_shipped_weights_have_the_training_recipes_architecture(pipe):
    """The shipped model was built by tools/train_tinyshapes.py as it stands: every architecture setting the script
    passes to diffusers/transformers is what the shipped configs say (catches a recipe edited without retraining)."""
    def plain(value):  # configs store tuples as lists once saved
        return list(value) if isinstance(value, (list, tuple)) else value

    train = _train_module()
    for settings, config in ((train.UNET_CONFIG, pipe.unet.config), (train.VAE_CONFIG, pipe.vae.config),
                             (train.TEXT_CONFIG, pipe.text_encoder.config)):
        for key, value in settings.items():
            got = config[key] if isinstance(config, dict) else getattr(config, key)
            assert plain(got) == plain(value), key
    assert pipe.tokenizer.model_max_length == train.TrainConfig().text_tokens


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_training_resumes_where_it_stopped(tmp_path, monkeypatch, family):
    """An interrupted run, resumed, ends with the same weights as an unbroken one (a few tiny steps)."""
    train = _train_module()
    cfg = train.TrainConfig(family=family, vae_steps=2, vae_batch=2, pool=8, unet_steps=3, batch=2, warmup=1)
    train.train(cfg, tmp_path / "a", tmp_path / "a" / "pipe", resume=False, every=1)

    real_update = train.Progress.update

    def interrupt(self, step, loss):
        real_update(self, step, loss)
        if self.name == "unet" and step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, tmp_path / "b", tmp_path / "b" / "pipe", resume=False, every=1)
    monkeypatch.setattr(train.Progress, "update", real_update)
    train.train(cfg, tmp_path / "b", tmp_path / "b" / "pipe", resume=True, every=1)

    from safetensors.torch import load_file

    for part in ("unet", "text_encoder", "vae") + (("text_encoder_2",) if family == "xl" else ()):
        (fa,) = (tmp_path / "a" / "pipe" / part).glob("*.safetensors")
        (fb,) = (tmp_path / "b" / "pipe" / part).glob("*.safetensors")
        a, b = load_file(fa), load_file(fb)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
