"""Write a diffusers SD 1.x pipeline as an original (LDM-format) single-file checkpoint, for the single-file tests.

The inverse of diffusers' own single-file conversion, for the SD 1.x layout (4 down blocks, 2 layers per block);
tests build tiny pipelines with that topology so nothing is downloaded.
"""
from __future__ import annotations


def _unet_map() -> list:
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i < 3:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i > 0:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        if i < 3:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return pairs


_UNET_FIXED = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
               "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd: dict) -> dict:
    out = {}
    for key, v in sd.items():
        new = key
        for hf, ldm in _UNET_FIXED.items():
            if new.startswith(hf):
                new = ldm + new[len(hf):]
        if ".resnets." in new:
            for hf, ldm in _RESNET.items():
                new = new.replace(f".{hf}.", f".{ldm}.")
        for hf, ldm in _unet_map():
            if new.startswith(hf):
                new = ldm + new[len(hf):]
        out["model.diffusion_model." + new] = v
    return out


def _vae_map() -> list:
    pairs = [("mid_block.attentions.0.", "mid.attn_1."), ("conv_norm_out.", "norm_out.")]
    for i in range(4):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(3)]
        if i < 3:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{3 - i}.upsample."))
    pairs += [(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.") for j in range(2)]
    return pairs


_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_to_ldm(sd: dict) -> dict:
    out = {}
    for key, v in sd.items():
        new = key.replace("conv_shortcut", "nin_shortcut")
        for hf, ldm in _vae_map():
            new = new.replace(hf, ldm)
        if ".attn_1." in new:
            for hf, ldm in _VAE_ATTN.items():
                new = new.replace(f".attn_1.{hf}", f".attn_1.{ldm}")
            if v.ndim == 2:                       # LDM's attention projections are 1x1 convolutions
                v = v[:, :, None, None]
        out["first_stage_model." + new] = v
    return out


def pipeline_to_ldm(pipe) -> dict:
    """The state dict of an LDM single-file SD 1.x checkpoint holding ``pipe``'s weights."""
    sd = unet_to_ldm(pipe.unet.state_dict())
    sd.update(vae_to_ldm(pipe.vae.state_dict()))
    for k, v in pipe.text_encoder.state_dict().items():   # transformers 5 dropped the text_model. prefix
        sd["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return {k: v.contiguous() for k, v in sd.items()}


def tiny_sd1_pipeline():
    """A tiny pipeline with SD 1.x's topology (what single-file conversion expects), random weights, seed 0."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffaccel.optimize.sources.tokenizer import word_tokenizer

    torch.manual_seed(0)
    tok = word_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, sample_size=8,
                                attention_head_dim=4, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        norm_num_groups=32, sample_size=64)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=1000, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                      pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
