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


def assert_recipe(pairs) -> None:
    """Every setting of each (recipe settings, shipped config) pair is what the config says (configs store tuples
    as lists once saved)."""
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for settings, config in pairs:
        for key, value in settings.items():
            got = config[key] if isinstance(config, dict) else getattr(config, key)
            assert plain(got) == plain(value), key


def test_shipped_weights_have_the_training_recipes_architecture(pipe):
    """The shipped model was built by tools/train_tinyshapes.py as it stands: every architecture setting the script
    passes to diffusers/transformers is what the shipped configs say (catches a recipe edited without retraining)."""
    train = _train_module()
    assert_recipe(((train.UNET_CONFIG, pipe.unet.config), (train.VAE_CONFIG, pipe.vae.config),
                   (train.TEXT_CONFIG, pipe.text_encoder.config)))
    assert pipe.tokenizer.model_max_length == train.TrainConfig().text_tokens


@pytest.mark.parametrize("family", ["sd", "xl", "sd3"])
def test_training_resumes_where_it_stopped(tmp_path, monkeypatch, family):
    """An interrupted run, resumed, ends with the same weights as an unbroken one (a few tiny steps)."""
    train = _train_module()
    cfg = train.TrainConfig(family=family, vae_steps=2, vae_batch=2, pool=8, denoiser_steps=3, batch=2, warmup=1)
    train.train(cfg, tmp_path / "a", tmp_path / "a" / "pipe", resume=False, every=1)

    real_update = train.Progress.update

    def interrupt(self, step, loss):
        real_update(self, step, loss)
        if self.name != "vae" and step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, tmp_path / "b", tmp_path / "b" / "pipe", resume=False, every=1)
    monkeypatch.setattr(train.Progress, "update", real_update)
    train.train(cfg, tmp_path / "b", tmp_path / "b" / "pipe", resume=True, every=1)

    from safetensors.torch import load_file

    parts = sorted(f.parent.name for f in (tmp_path / "a" / "pipe").glob("*/*.safetensors"))
    expected = {"sd": ["unet", "text_encoder"], "xl": ["unet", "text_encoder", "text_encoder_2"],
                "sd3": ["transformer", "text_encoder", "text_encoder_2"]}[family]
    assert parts == sorted(expected + ["vae"])
    for part in parts:
        (fa,) = (tmp_path / "a" / "pipe" / part).glob("*.safetensors")
        (fb,) = (tmp_path / "b" / "pipe" / part).glob("*.safetensors")
        a, b = load_file(fa), load_file(fb)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


# tinyshapes-sd3 (tools/train_tinyshapes.py --family sd3): the recipe must condition the transformer exactly as
# StableDiffusion3Pipeline does without T5 (checked on untrained models, so it holds before any weights exist).
SD3 = ASSETS / "tinyshapes-sd3"
PROMPT = "a small red circle at the top left on a white background"


def _sd3_models():
    train = _train_module()
    return train, train.build_models(train.TrainConfig(family="sd3"))


def _sd3_pipeline(train, models: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=models["transformer"], vae=models["vae"],
                                    scheduler=FlowMatchEulerDiscreteScheduler(**train.FLOW_SCHEDULER_CONFIG),
                                    text_encoder=models["text_encoder"], tokenizer=models["tokenizer"],
                                    text_encoder_2=models["text_encoder_2"], tokenizer_2=models["tokenizer"],
                                    text_encoder_3=None, tokenizer_3=None)


def _caption_ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids


def test_sd3_training_conditions_the_transformer_as_the_pipeline_does():
    """Both CLIPs' penultimate states side by side, then 256 zero "T5" tokens; both pooled projections; the empty
    caption's for a dropped caption: what StableDiffusion3Pipeline.encode_prompt gives with its defaults, no T5."""
    train, models = _sd3_models()
    pipe = _sd3_pipeline(train, models)
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=True)
        ours = train.condition(models, _caption_ids(pipe.tokenizer, [PROMPT, ""]), torch.tensor([False, True]))
    torch.testing.assert_close(ours["encoder_hidden_states"], torch.cat([pos, neg]))  # one batch vs two: rounding
    torch.testing.assert_close(ours["pooled_projections"], torch.cat([pooled, neg_pooled]))
    config = models["transformer"].config
    assert pos.shape == (1, 16 + 256, config.joint_attention_dim) and not pos[:, 16:].any()
    assert (config.joint_attention_dim, config.pooled_projection_dim, config.caption_projection_dim) == (96, 80, 128)
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64


def test_sd3_training_attends_to_one_zero_token_as_to_256():
    """RepeatedLastKey with one zero token gives the transformer's output and gradients on the full 16 + 256
    tokens (so training on the short sequence is training on the pipeline's), and is removed after the ``with``."""
    train, models = _sd3_models()
    transformer = models["transformer"]
    ids = _caption_ids(models["tokenizer"], [PROMPT, ""])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([250.0, 900.0])
    weights = torch.randn(2, 4, 16, 16, generator=g)

    def run(t5_tokens):
        transformer.zero_grad()
        out = transformer(hidden_states=x, timestep=t, **train.condition(models, ids, None, t5_tokens=t5_tokens))
        (out.sample * weights).sum().backward()
        return out.sample.detach(), [p.grad.clone() for p in transformer.parameters() if p.grad is not None]

    full, full_grads = run(256)
    with train.RepeatedLastKey.installed(transformer, 256):
        short, short_grads = run(1)
    torch.testing.assert_close(short, full, rtol=1e-4, atol=1e-5)
    assert len(short_grads) == len(full_grads)
    for a, b in zip(short_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert {type(b.attn.processor).__name__ for b in transformer.transformer_blocks} == {"JointAttnProcessor2_0"}


def _sd3_shipped():
    return pytest.mark.skipif(not (SD3 / "model_index.json").is_file(), reason=f"no weights at {SD3}")


@pytest.fixture(scope="module")
def sd3_pipe():
    from diffusers import StableDiffusion3Pipeline

    # diffusers' way to load SD3 without its T5 (the folder's model_index.json lists both as null)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(SD3), text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_sd3_shipped()
def test_sd3_files_are_safetensors_small_and_without_t5():
    index = shipped_index(SD3)
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]


@_sd3_shipped()
def test_sd3_shipped_weights_have_the_training_recipes_architecture(sd3_pipe):
    train = _train_module()
    assert_recipe(((train.SD3_CONFIG, sd3_pipe.transformer.config), (train.VAE_CONFIG, sd3_pipe.vae.config),
                   (train.TEXT_CONFIG_XL, sd3_pipe.text_encoder.config),
                   (train.TEXT_CONFIG_XL_2, sd3_pipe.text_encoder_2.config),
                   (train.FLOW_SCHEDULER_CONFIG, sd3_pipe.scheduler.config)))
    assert sd3_pipe.vae.config.shift_factor == 0.0
    assert sd3_pipe.tokenizer.model_max_length == train.TrainConfig().text_tokens
    # the tinyshapes VAE, reused as it is
    assert (SD3 / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (MODEL / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


@_sd3_shipped()
def test_sd3_two_step_generation_runs(sd3_pipe):
    out = sd3_pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                   output_type="np")
    image = out.images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and 0.0 <= image.min() <= image.max() <= 1.0
