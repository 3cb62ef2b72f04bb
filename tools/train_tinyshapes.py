"""Train the tinyshapes model from scratch: a Stable Diffusion pipeline for the procedural shapes world.

``--family xl`` trains ``tinyshapes-xl`` instead: the same world and recipe in the SDXL architecture (two text
encoders whose penultimate hidden states are concatenated, the second's pooled projection and the six micro-
conditioning time ids added to the time embedding), usually reusing the trained tinyshapes VAE (``--vae``).
``--family sd3`` trains ``tinyshapes-sd3``: an SD3 transformer (MMDiT) with two CLIP text encoders and no T5, on a
rectified-flow loss, laid out as StableDiffusion3Pipeline feeds it (see :func:`condition`).

Two stages, each seeded, checkpointed and resumable:
1. the AutoencoderKL, on fresh renders each step (64x64 RGB -> 16x16x4 latents);
2. the CLIP text encoder and the U-Net together, on the cached latents of a pool of training renders, with
   caption dropout (classifier-free guidance), v-prediction on a zero-terminal-SNR schedule, extra loss weight on
   the latent pixels around the object (its outline is what tells the shapes apart) and an EMA of the weights.
The data for step k comes from a generator seeded by (seed, stage, k), so a resumed run sees what an unbroken run
would have seen. The result is written in diffusers format (safetensors) to ``--out``.

    python tools/train_tinyshapes.py                      # from scratch, into optimize/assets/tinyshapes
    python tools/train_tinyshapes.py --resume             # continue from runs/tinyshapes/checkpoint.pt
    python tools/train_tinyshapes.py --threads 1 --denoiser-steps 200 --out runs/tiny-try   # a quick try
    python tools/train_tinyshapes.py --family xl --vae optimize/assets/tinyshapes/vae   # tinyshapes-xl
    python tools/train_tinyshapes.py --family sd3 --vae optimize/assets/tinyshapes/vae \
        --denoiser-steps 4000 --batch 40                                                  # tinyshapes-sd3 as shipped

On a machine whose cores other processes also use, set ``OMP_WAIT_POLICY=PASSIVE`` with ``--threads 2``: OpenMP's
spinning threads made a transformer step up to 10x slower without it (docs/tinyshapes.md, tinyshapes-sd3).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from diffaccel.optimize.sources.tinyshapes import WORDS, caption, render, sample_scenes
from diffaccel.optimize.sources.tokenizer import word_tokenizer

log = logging.getLogger("train_tinyshapes")
ROOT = Path(__file__).resolve().parents[1]
CA, DB = "CrossAttnDownBlock2D", "DownBlock2D"
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=8, sample_size=64)
# attention_head_dim is the number of heads in diffusers' UNet2DConditionModel (a known naming quirk). 2 heads of
# width 16/32 instead of 4 of width 8/16: same parameters, and a training step ~20% cheaper on this CPU, where
# attention with narrow heads was 35% of the step (docs/tinyshapes.md, "Training").
UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128),
                   layers_per_block=1, down_block_types=(CA, CA, DB),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=64, attention_head_dim=2, norm_num_groups=16)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
                   projection_dim=64)
# tinyshapes-xl: the SDXL layout at tinyshapes scale. The two encoders differ in width (like CLIP ViT-L and
# OpenCLIP bigG), so the U-Net's cross-attention width (32 + 64) and the pooled width (48) are not the same number
# and anything that hard-codes one for the other fails on this model.
TEXT_CONFIG_XL = dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=3,
                      projection_dim=32)
TEXT_CONFIG_XL_2 = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
                        projection_dim=48)
TIME_IDS, TIME_EMBED = 6, 8   # (original h, w, crop top, left, target h, w), each embedded in 8 sinusoids
UNET_CONFIG_XL = dict(UNET_CONFIG, cross_attention_dim=32 + 64, addition_embed_type="text_time",
                      addition_time_embed_dim=TIME_EMBED,
                      projection_class_embeddings_input_dim=TIME_IDS * TIME_EMBED + 48, use_linear_projection=True)
# tinyshapes-sd3: SD3's MMDiT at tinyshapes scale. Two CLIPTextModelWithProjection encoders of different widths
# (the XL ones' sizes): joint_attention_dim 96 (= 32 + 64, penultimate states side by side, so nothing is cropped),
# pooled 80 (= 32 + 48), transformer width 128; no T5. Patch 2 gives 64 image tokens; pos_embed_max_size 16
# allows latents up to 32x32 (128x128 images). Layer 0 is an SD3.5 dual-attention block and q/k are RMS-normed
# (SD3.5's code paths); they cost ~12% of a step.
SD3_CONFIG = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=32 + 64, caption_projection_dim=128,
                  pooled_projection_dim=32 + 48, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
# StableDiffusion3Pipeline without text_encoder_3 appends max_sequence_length (256 by default) all-zero "T5" tokens
# to the 16 CLIP tokens; training sees the same (as one token standing for 256, see RepeatedLastKey).
T5_TOKENS = 256
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
FAMILIES = ("sd", "xl", "sd3")
# Zero terminal SNR (with v-prediction and trailing timesteps): the flat background is the image's mean color,
# which SD's schedule leaks into the last training step but not into pure-noise sampling (Lin et al., 2023).
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        num_train_timesteps=1000, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    family: str = "sd"              # "sd": tinyshapes (SD 1.x); "xl": tinyshapes-xl (SDXL); "sd3": tinyshapes-sd3
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-9
    object_weight: float = 4.0      # extra reconstruction weight on object pixels (they are few, and matter)
    pool: int = 24000
    denoiser_steps: int = 4800
    batch: int = 48
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    omit_prob: float = 0.2          # chance that a caption leaves out the size (and, separately, the position)
    # Chance that a caption leaves out the object's color ("a small circle at the top ..."). Without it the model
    # learned shape words only next to color words and drew held-out pairs in the shape its color was seen with
    # (yellow circle -> square: held-out shape 42.5% in the run after the tokenizer fix, docs/tinyshapes.md).
    omit_color_prob: float = 0.25
    # min-SNR weighting (snr_gamma > 0) starves the noisiest steps, which decide the layout and the shape: runs
    # with it learned color and background but drew shapes at chance after 1500 steps. 0: plain v-prediction MSE.
    snr_gamma: float = 0.0
    snr_floor: float = 0.1
    object_loss_weight: float = 2.0  # extra weight on latent pixels within one pixel of the object
    ema_decay: float = 0.999
    # Token positions of the text encoder. 16 hold the longest caption (12 words + BOS/EOS: every word is one token
    # since the tokenizer fix) and cost ~40% less per step than SD's 77. Before that fix "triangle" took 7 tokens
    # and 16 positions truncated the background of positioned triangle captions (docs/tinyshapes.md).
    text_tokens: int = 16

    def __post_init__(self):
        for name in ("vae_steps", "vae_batch", "pool", "denoiser_steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def step_rng(cfg: TrainConfig, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stage, step])


def to_tensor(images: list) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def build_models(cfg: TrainConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(cfg.seed)
    tokenizer = word_tokenizer(WORDS, max_length=cfg.text_tokens)

    def text_config(kw):
        return CLIPTextConfig(**kw, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                              max_position_embeddings=cfg.text_tokens)

    if cfg.family == "sd":
        return dict(tokenizer=tokenizer, vae=AutoencoderKL(**VAE_CONFIG),
                    text_encoder=CLIPTextModel(text_config(TEXT_CONFIG)), unet=UNet2DConditionModel(**UNET_CONFIG))
    if cfg.family == "sd3":
        from diffusers import SD3Transformer2DModel

        return dict(tokenizer=tokenizer, vae=AutoencoderKL(**VAE_CONFIG),
                    text_encoder=CLIPTextModelWithProjection(text_config(TEXT_CONFIG_XL)),
                    text_encoder_2=CLIPTextModelWithProjection(text_config(TEXT_CONFIG_XL_2)),
                    transformer=SD3Transformer2DModel(**SD3_CONFIG))
    return dict(tokenizer=tokenizer, vae=AutoencoderKL(**VAE_CONFIG),
                text_encoder=CLIPTextModel(text_config(TEXT_CONFIG_XL)),
                text_encoder_2=CLIPTextModelWithProjection(text_config(TEXT_CONFIG_XL_2)),
                unet=UNet2DConditionModel(**UNET_CONFIG_XL))


def trained(models: dict) -> list:
    """The names of the models stage 2 trains (and checkpoints)."""
    return [k for k in ("text_encoder", "text_encoder_2", "unet", "transformer") if k in models]


def denoiser(models: dict) -> str:
    return "transformer" if "transformer" in models else "unet"


def condition(models: dict, ids: torch.Tensor, dropped: torch.Tensor, size: int = 64,
              t5_tokens: int = T5_TOKENS) -> dict:
    """The denoiser's conditioning for caption token ids, as the family's diffusers pipeline computes it.

    SD: the text encoder's last hidden state; a dropped caption is the empty caption's (``ids`` already hold it).
    SDXL: both encoders' penultimate hidden states side by side, the second's pooled projection and the time ids of
    an uncropped ``size`` x ``size`` image; a dropped caption is all zeros, which is what StableDiffusionXLPipeline
    feeds as the unconditional half when ``force_zeros_for_empty_prompt`` is set (as in SDXL base).
    SD3: both encoders' penultimate states side by side, then ``t5_tokens`` all-zero tokens (what
    StableDiffusion3Pipeline feeds without a T5); pooled: both ``text_embeds``; a dropped caption is the empty
    caption's, as the pipeline's negative prompt "". Training passes ``t5_tokens=1`` with :class:`RepeatedLastKey`."""
    if "text_encoder_2" not in models:
        return dict(encoder_hidden_states=models["text_encoder"](ids)[0])
    first = models["text_encoder"](ids, output_hidden_states=True)
    second = models["text_encoder_2"](ids, output_hidden_states=True)
    if "transformer" in models:
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1)
        width = models["transformer"].config.joint_attention_dim
        states = torch.nn.functional.pad(states, (0, width - states.shape[-1]))
        zeros = states.new_zeros(len(ids), t5_tokens, width)
        return dict(encoder_hidden_states=torch.cat([states, zeros], 1),
                    pooled_projections=torch.cat([first.text_embeds, second.text_embeds], -1))
    keep = (~dropped).float()
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1) * keep.view(-1, 1, 1)
    pooled = second.text_embeds * keep.view(-1, 1)
    time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32).repeat(len(ids), 1)
    return dict(encoder_hidden_states=states, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})


class Progress:
    """Log lines with loss, rate and ETA every ``every`` steps."""

    def __init__(self, name: str, total: int, start: int, every: int = 25):
        self.name, self.total, self.start, self.every = name, total, start, every
        self.t0, self.losses = time.time(), []

    def update(self, step: int, loss: float):
        self.losses.append(loss)
        done = step + 1
        if done % self.every and done != self.total:
            return
        rate = (time.time() - self.t0) / max(1, done - self.start)
        log.info("%s step %d/%d  loss %.5f  %.2fs/step  elapsed %.0fs  eta %.0fs", self.name, done, self.total,
                 float(np.mean(self.losses)), rate, time.time() - self.t0, rate * (self.total - done))
        self.losses = []


def vae_loss(cfg: TrainConfig, vae, x: torch.Tensor) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    on_object = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()  # corners are background
    weight = 1 + cfg.object_weight * on_object
    rec = (weight * ((recon - x).pow(2) + 0.5 * (recon - x).abs())).mean() / weight.mean()
    return rec + cfg.kl_weight * posterior.kl().mean()


def train_vae(cfg: TrainConfig, models: dict, state: dict, save):
    vae = models["vae"].train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if "vae_opt" in state:
        opt.load_state_dict(state["vae_opt"])
    progress = Progress("vae", cfg.vae_steps, state["vae_step"])
    for step in range(state["vae_step"], cfg.vae_steps):
        rng = step_rng(cfg, 1, step)
        x = to_tensor([render(s) for s in sample_scenes(cfg.vae_batch, seed=int(rng.integers(2**31)))])
        torch.manual_seed(int(rng.integers(2**31)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        loss = vae_loss(cfg, vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, loss.item())
        state["vae_step"] = step + 1
        if save.due(step + 1) or step + 1 == cfg.vae_steps:
            state["vae_opt"] = opt.state_dict()
            save(state)
    vae.eval().requires_grad_(False)


def object_mask(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Latent-resolution mask (N, 1, h, w) of the object in renders ``x`` (N, 3, H, W), grown by one latent pixel."""
    on_object = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()
    coarse = torch.nn.functional.max_pool2d(on_object, factor)
    return torch.nn.functional.max_pool2d(coarse, 3, stride=1, padding=1).to(torch.uint8)


def make_pool(cfg: TrainConfig, models: dict):
    """Latent moments, object masks and caption token ids for ``cfg.pool`` training scenes; sets the VAE scaling
    factor."""
    vae, tok = models["vae"], models["tokenizer"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    scenes = sample_scenes(cfg.pool, seed=cfg.seed + 1000, split="train")
    moments, masks = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            x = to_tensor([render(s) for s in scenes[i:i + 256]])
            dist = vae.encode(x).latent_dist
            moments.append(torch.cat([dist.mean, dist.std], 1))
            masks.append(object_mask(x, factor))
    moments, masks = torch.cat(moments), torch.cat(masks)
    variants = [(size, pos, color) for color in (True, False) for pos in (True, False) for size in (True, False)]
    texts = [caption(s, size, pos, color) for s in scenes for size, pos, color in variants]
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.view(len(scenes), len(variants), -1)
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    noise = torch.randn(moments[:, 4:].shape, generator=torch.Generator().manual_seed(cfg.seed))
    std = float((moments[:, :4] + moments[:, 4:] * noise).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    log.info("pool of %d scenes encoded; latent std %.4f -> scaling_factor %.4f", cfg.pool, std, 1 / std)
    return moments, masks, ids, empty[0]


def caption_ids(cfg: TrainConfig, ids: torch.Tensor, empty: torch.Tensor, idx, rng) -> "tuple[torch.Tensor, torch.Tensor]":
    """Token ids for pool items ``idx``: a random caption variant each, the empty caption with dropout; and which
    captions were dropped."""
    n = len(idx)
    variant = ((rng.random(n) < cfg.omit_prob).astype(int) + 2 * (rng.random(n) < cfg.omit_prob).astype(int)
               + 4 * (rng.random(n) < cfg.omit_color_prob).astype(int))
    out = ids[torch.as_tensor(idx), torch.as_tensor(variant)].clone()
    dropped = torch.as_tensor(rng.random(n) < cfg.caption_dropout)
    out[dropped] = empty
    return out, dropped


class Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params, decay: float):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def draw_batch(cfg: TrainConfig, models: dict, pool, step: int):
    """Step ``step``'s scaled latents, noise, generator (for the timesteps), caption draw and per-pixel loss weight."""
    moments, masks, ids, empty = pool
    rng = step_rng(cfg, 2, step)
    idx = rng.integers(len(moments), size=cfg.batch)
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    m = moments[torch.as_tensor(idx)]
    vae = models["vae"].config
    latents = (m[:, :4] + m[:, 4:] * torch.randn(m[:, 4:].shape, generator=g) - (vae.shift_factor or 0.0)) \
        * vae.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    pixel_weight = 1 + cfg.object_loss_weight * masks[torch.as_tensor(idx)].float()
    return latents, noise, g, lambda: caption_ids(cfg, ids, empty, idx, rng), pixel_weight


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, pixel_weight: torch.Tensor) -> torch.Tensor:
    return (pixel_weight * (pred - target).pow(2)).mean(dim=(1, 2, 3)) / pixel_weight.mean(dim=(1, 2, 3))


def unet_loss(cfg: TrainConfig, models: dict, pool, step: int, alphas: torch.Tensor) -> torch.Tensor:
    latents, noise, g, captions, pixel_weight = draw_batch(cfg, models, pool, step)
    t = torch.randint(0, len(alphas), (cfg.batch,), generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents  # v-prediction
    pred = models["unet"](noisy, t, **condition(models, *captions())).sample
    per_sample = weighted_mse(pred, target, pixel_weight)
    if cfg.snr_gamma > 0:  # min-SNR weights for v-prediction
        snr = alphas[t] / (1 - alphas[t])
        per_sample = per_sample * snr.clamp(min=cfg.snr_floor, max=cfg.snr_gamma) / (snr + 1)
    return per_sample.mean()


def flow_loss(cfg: TrainConfig, models: dict, pool, step: int) -> torch.Tensor:
    """Rectified flow as SD3 trains it: x_t = (1 - t) x0 + t noise, the transformer predicts noise - x0, t drawn
    from a logit-normal density (mean 0, std 1); the transformer's timestep is 1000 t, as the scheduler feeds it.
    The 256 zero "T5" tokens are passed as one (the transformer must carry :class:`RepeatedLastKey`)."""
    latents, noise, g, captions, pixel_weight = draw_batch(cfg, models, pool, step)
    t = torch.sigmoid(torch.randn(cfg.batch, generator=g))
    noisy = (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * noise
    pred = models["transformer"](hidden_states=noisy, timestep=t * 1000,
                                 **condition(models, *captions(), t5_tokens=1)).sample
    return weighted_mse(pred, noise - latents, pixel_weight).mean()


class RepeatedLastKey:
    """SD3's joint attention with the last context token standing for ``repeats`` identical tokens.

    The pipeline's 256 all-zero T5 tokens stay identical through every layer (the context stream has no position
    embedding; everything but attention acts per token, and identical queries attend alike), so attending to them
    is attending to one of them with its logit raised by log(256): the same function and gradients as the full
    sequence (``tests/test_tinyshapes_model.py`` checks), for a quarter of a training step's work."""

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        n, length = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x, norm):
            x = x.view(n, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        q = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                       heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], 2)
        k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                       heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], 2)
        v = torch.cat([heads(attn.to_v(hidden_states), None), heads(attn.add_v_proj(encoder_hidden_states), None)], 2)
        bias = q.new_zeros(1, k.shape[2])
        bias[..., -1] = self.log_repeats
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(n, -1, attn.heads * q.shape[-1])
        image, context = out[:, :length], out[:, length:]
        context = context if attn.context_pre_only else attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context

    @staticmethod
    @contextlib.contextmanager
    def installed(transformer, repeats: int):
        """Joint attention (not the dual blocks' image-only ``attn2``) uses it inside the ``with``."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        blocks = transformer.transformer_blocks
        try:
            for block in blocks:
                block.attn.set_processor(RepeatedLastKey(repeats))
            yield transformer
        finally:
            for block in blocks:
                block.attn.set_processor(JointAttnProcessor2_0())


def train_unet(cfg: TrainConfig, models: dict, state: dict, save, pool):
    """Stage 2: the text encoders and the denoiser (U-Net or transformer) together."""
    from diffusers import DDIMScheduler

    if "transformer" in models:
        loss_at, ctx = partial(flow_loss, cfg, models, pool), RepeatedLastKey.installed(models["transformer"],
                                                                                       T5_TOKENS)
    else:
        alphas = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.float()
        loss_at, ctx = lambda step: unet_loss(cfg, models, pool, step, alphas), contextlib.nullcontext()
    with ctx:
        _train_loop(cfg, models, state, save, loss_at)


def _train_loop(cfg: TrainConfig, models: dict, state: dict, save, loss_at):
    params = [p for k in trained(models) for p in models[k].parameters()]
    for k in trained(models):
        models[k].train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = Ema(params, cfg.ema_decay)
    if "unet_opt" in state:
        opt.load_state_dict(state["unet_opt"])
        ema.shadow = state["ema"]
    progress = Progress(denoiser(models), cfg.denoiser_steps, state["denoiser_step"])
    for step in range(state["denoiser_step"], cfg.denoiser_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.denoiser_steps, cfg.lr, cfg.warmup)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        progress.update(step, loss.item())
        state["denoiser_step"] = step + 1
        if save.due(step + 1) or step + 1 == cfg.denoiser_steps:
            state.update(unet_opt=opt.state_dict(), ema=ema.shadow)
            save(state)
    ema.copy_to_params()
    for k in trained(models):
        models[k].eval()


class Checkpoint:
    """Saves models and training state to ``path`` every ``every`` steps (atomically), and loads them back."""

    def __init__(self, path: Path, models: dict, every: int):
        self.path, self.models, self.every = path, models, every

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, state: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        weights = {k: self.models[k].state_dict() for k in ("vae", *trained(self.models))}
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "weights": weights}, tmp)
        tmp.replace(self.path)

    def load(self) -> dict:
        if not self.path.is_file():
            raise FileNotFoundError(f"no checkpoint at {self.path}; run without --resume to start from scratch")
        state = torch.load(self.path, weights_only=False)
        for k, sd in state.pop("weights").items():
            self.models[k].load_state_dict(sd)
        log.info("resumed from %s at vae step %d, denoiser step %d", self.path, state["vae_step"],
                 state["denoiser_step"])
        return state


def save_pipeline(models: dict, out: Path):
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline)

    if "transformer" in models:  # no T5: the pipeline feeds zeros in its place, as in training
        pipe = StableDiffusion3Pipeline(transformer=models["transformer"], vae=models["vae"],
                                        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG),
                                        text_encoder=models["text_encoder"], tokenizer=models["tokenizer"],
                                        text_encoder_2=models["text_encoder_2"], tokenizer_2=models["tokenizer"],
                                        text_encoder_3=None, tokenizer_3=None)
        return _write(pipe, out)
    common = dict(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=models["tokenizer"],
                  unet=models["unet"], scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    if "text_encoder_2" in models:  # no watermark: it would change the images the benchmark scores
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=models["text_encoder_2"],
                                         tokenizer_2=models["tokenizer"], force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    _write(pipe, out)


def _write(pipe, out: Path):
    pipe.save_pretrained(out, safe_serialization=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("pipeline written to %s (%.1f MB)", out, size / 1e6)


def train(cfg: TrainConfig, work: Path, out: Path, resume: bool, every: int, vae: "Path | None" = None):
    t0 = time.time()
    models = build_models(cfg)
    if vae is not None:  # reuse a trained autoencoder: stage 1 is skipped
        from diffusers import AutoencoderKL

        models["vae"] = AutoencoderKL.from_pretrained(vae, local_files_only=True)
    if cfg.family == "sd3":  # StableDiffusion3Pipeline decodes latents / scaling_factor + shift_factor
        models["vae"].register_to_config(shift_factor=0.0)
    save = Checkpoint(work / "checkpoint.pt", models, every)
    state = save.load() if resume else {"vae_step": 0 if vae is None else cfg.vae_steps, "denoiser_step": 0,
                                        "config": dataclasses.asdict(cfg)}
    if state.get("config", dataclasses.asdict(cfg)) != dataclasses.asdict(cfg):
        raise ValueError(f"checkpoint {save.path} was made with another config: {state['config']}")
    train_vae(cfg, models, state, save)
    pool = make_pool(cfg, models)
    state["scaling_factor"] = models["vae"].config.scaling_factor
    train_unet(cfg, models, state, save, pool)
    save_pipeline(models, out)
    log.info("done in %.1f min", (time.time() - t0) / 60)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="where the diffusers pipeline is written (default: the shipped assets, "
                   "optimize/assets/tinyshapes, tinyshapes-xl or tinyshapes-sd3)")
    p.add_argument("--work", type=Path, help="checkpoint folder (default: runs/ and the model's name)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--vae", type=Path, help="a trained AutoencoderKL folder to reuse (skips stage 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    except ValueError as e:
        p.error(str(e))
    name = {"sd": "tinyshapes", "xl": "tinyshapes-xl", "sd3": "tinyshapes-sd3"}[cfg.family]
    train(cfg, args.work or ROOT / "runs" / name, args.out or ROOT / "optimize" / "assets" / name, args.resume,
          args.checkpoint_every, args.vae)


if __name__ == "__main__":
    main()
