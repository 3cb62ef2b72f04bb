"""Built-in diffusion-transformer pipelines with random weights, made in code from a fixed seed (nothing downloaded):

``random:tiny-sd3``    a tiny SD3.5-style pipeline (patch 2, dual-attention and qk RMS-norm blocks, two CLIP text
                       encoders with projections, a tiny T5), for tests and smoke runs;
``random:sd35-medium`` Stable Diffusion 3.5 medium's transformer, CLIP-L, OpenCLIP-bigG and 16-channel VAE at full
                       size (2.2B + 0.8B parameters) without T5-XXL (``text_encoder_3=None``, as diffusers allows: 19 GB
                       in fp32, which an in-memory recipe cannot hold beside the rest on a 24 GB machine), for speed
                       and memory measurements of the transformer;
``random:tiny-flux``   a tiny FLUX.1-dev-style pipeline (guidance embedding, dynamic shifting) with a tiny T5;
``random:tiny-flux-schnell`` the same without the guidance embedding (schnell's layout).

Each model is drawn from its own seed, so a build that reads one model alone gets the weights it has in the pipeline.
A recipe is ``{"pipeline": class name, "seed": int, "models": {name: (class name, config)}, "scheduler": config,
"t5_length": int}``; :func:`assemble` builds it, or just the named models.
"""
from __future__ import annotations

_CLIP_TINY = dict(hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                  num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
_T5_TINY = dict(d_model=64, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8,
                is_encoder_decoder=False, use_cache=False)
_VAE_TINY = dict(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 layers_per_block=1, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                 use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
_VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, use_quant_conv=False,
               use_post_quant_conv=False, force_upcast=True)
# FLUX packs 2x2 latent patches: its in_channels are 4x the VAE's latent channels (16 = 4 x 4 here)
_VAE_FLUX_TINY = {**_VAE_TINY, "latent_channels": 4, "shift_factor": 0.1159, "scaling_factor": 0.3611}
_FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))

RECIPES = {
    "random:tiny-sd3": dict(
        pipeline="StableDiffusion3Pipeline", seed=3, t5_length=256,
        models={"transformer": ("SD3Transformer2DModel", dict(
                    sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                    pooled_projection_dim=64, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")),
                "vae": ("AutoencoderKL", _VAE_TINY),
                "text_encoder": ("CLIPTextModelWithProjection", _CLIP_TINY),
                "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_TINY),
                "text_encoder_3": ("T5EncoderModel", _T5_TINY)},
        scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
    "random:sd35-medium": dict(   # stabilityai/stable-diffusion-3.5-medium's configs, T5-XXL left out (see above)
        pipeline="StableDiffusion3Pipeline", seed=35, t5_length=256,
        models={"transformer": ("SD3Transformer2DModel", dict(
                    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
                "vae": ("AutoencoderKL", {**_VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}),
                "text_encoder": ("CLIPTextModelWithProjection", dict(
                    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")),
                "text_encoder_2": ("CLIPTextModelWithProjection", dict(
                    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                    max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu"))},
        scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
    "random:tiny-flux": dict(
        pipeline="FluxPipeline", seed=4, t5_length=512,
        models={"transformer": ("FluxTransformer2DModel", {**_FLUX_TINY, "guidance_embeds": True}),
                "vae": ("AutoencoderKL", _VAE_FLUX_TINY),
                "text_encoder": ("CLIPTextModel", _CLIP_TINY),
                "text_encoder_2": ("T5EncoderModel", _T5_TINY)},
        scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True,
                   "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}),
    "random:tiny-flux-schnell": dict(
        pipeline="FluxPipeline", seed=5, t5_length=512,
        models={"transformer": ("FluxTransformer2DModel", {**_FLUX_TINY, "guidance_embeds": False}),
                "vae": ("AutoencoderKL", _VAE_FLUX_TINY),
                "text_encoder": ("CLIPTextModel", _CLIP_TINY),
                "text_encoder_2": ("T5EncoderModel", _T5_TINY)},
        scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "use_dynamic_shifting": False}),
}


def configs(name: str) -> dict:
    """The recipe's configs as detection reads them (``_class_name`` in each), without building anything."""
    r = RECIPES[name]
    out = {"pipeline": r["pipeline"], "t5_length": r["t5_length"]}
    for model, (cls, cfg) in r["models"].items():
        out[model] = {**_tokenized(model, cls, cfg), "_class_name": cls}
    return out


def _tokenizers(r: dict) -> dict:
    """The pipeline's tokenizers: word-level CLIP ones (the second pads with "!" as SD3's OpenCLIP tokenizer does)
    and a T5 Unigram one, all over the built-in word list (:mod:`~diffaccel.optimize.sources.tokenizer`)."""
    from diffaccel.optimize.sources.tokenizer import DEFAULT_WORDS, t5_tokenizer, word_tokenizer

    t5 = t5_tokenizer(DEFAULT_WORDS)
    if r["pipeline"] == "FluxPipeline":
        return {"tokenizer": word_tokenizer(DEFAULT_WORDS, 77), "tokenizer_2": t5}
    out = {"tokenizer": word_tokenizer(DEFAULT_WORDS, 77), "tokenizer_2": word_tokenizer(DEFAULT_WORDS, 77, "!")}
    return {**out, "tokenizer_3": t5 if "text_encoder_3" in r["models"] else None}


def _tokenized(model: str, cls: str, cfg: dict) -> dict:
    """A text encoder's config with the built-in tokenizers' vocabulary size and special token ids."""
    from diffaccel.optimize.sources.tokenizer import DEFAULT_WORDS, t5_tokenizer, word_tokenizer

    if cls == "T5EncoderModel":
        return {**cfg, "vocab_size": len(t5_tokenizer(DEFAULT_WORDS)), "pad_token_id": 0, "eos_token_id": 1}
    if cls.startswith("CLIPText"):
        tok = word_tokenizer(DEFAULT_WORDS, 77)
        vocab = cfg.get("vocab_size") or len(tok)
        return {**cfg, "vocab_size": max(vocab, len(tok)), "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return dict(cfg)


def _model(cls: str, cfg: dict):
    import diffusers
    import transformers

    if hasattr(diffusers, cls):
        return getattr(diffusers, cls)(**cfg).eval()
    config = transformers.T5Config(**cfg) if cls == "T5EncoderModel" else transformers.CLIPTextConfig(**cfg)
    return getattr(transformers, cls)(config).eval()


def assemble(name: str, only=None):
    """The recipe's pipeline, or (``only``: model names) just those models in a dict, each from its own seed."""
    import diffusers

    from diffaccel.optimize.sources.seeded import made, seeded

    r = RECIPES[name]
    makers = {model: (lambda cls=cls, cfg=_tokenized(model, cls, cfg), k=k:
                      seeded(r["seed"] + k, lambda: _model(cls, cfg)))
              for k, (model, (cls, cfg)) in enumerate(r["models"].items())}
    models = made(makers, only)
    if only is not None:
        return models
    sched = dict(r["scheduler"])
    scheduler = getattr(diffusers, sched.pop("_class_name")).from_config(sched)
    return getattr(diffusers, r["pipeline"])(**models, **_tokenizers(r), scheduler=scheduler,
                                             **({"text_encoder_3": None} if r["pipeline"] != "FluxPipeline"
                                                and "text_encoder_3" not in r["models"] else {}))
