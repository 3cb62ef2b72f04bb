"""Engine-backed stand-ins for the models diffusers' Stable Diffusion pipelines call.

Each shim honours exactly what diffusers' ``__call__`` uses: ``unet(...)[0]`` and ``unet.config``, ``vae.decode``,
``vae.encode(...).latent_dist``, ``vae.config.scaling_factor``, ``text_encoder(ids)[0]``, and ``dtype``/``device``.
Batches larger than an engine's maximum are run in chunks.
"""
from __future__ import annotations

from diffaccel.optimize.artifact.errors import DiffaccelError


def run_chunked(engine, spec, inputs: dict) -> dict:
    """Call ``engine``; split along the batch axis when the batch exceeds the spec's maximum."""
    import torch

    max_batch = spec.axes["batch"].max if spec is not None and "batch" in spec.axes else None
    batch = next(iter(inputs.values())).shape[0]
    if max_batch is None or batch <= max_batch:
        return engine(**inputs)
    parts = [engine(**{k: v[i:i + max_batch] for k, v in inputs.items()}) for i in range(0, batch, max_batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class _Shim:
    def __init__(self, engine, spec, config):
        self.engine, self.spec, self.config = engine, spec, config

    @property
    def device(self):
        return self.engine.device

    @property
    def dtype(self):
        import torch

        return torch.float32

    def to(self, *args, **kwargs):
        """Engines live where they were loaded; ``.to()`` is accepted and ignored so pipeline code keeps working."""
        return self

    def eval(self):
        return self


class TextEncoderShim(_Shim):
    def __call__(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if output_hidden_states:
            raise DiffaccelError("clip_skip / output_hidden_states is not supported by exported text encoders; "
                                 "call the pipeline without clip_skip")
        out = run_chunked(self.engine, self.spec, {"input_ids": input_ids})
        return BaseModelOutputWithPooling(last_hidden_state=out["last_hidden_state"],
                                          pooler_output=out["pooler_output"])


class UNetShim(_Shim):
    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, return_dict=True, **kwargs):
        import torch
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if timestep_cond is not None or (cross_attention_kwargs or {}).get("scale") not in (None, 1.0):
            raise DiffaccelError("timestep_cond and LoRA scales are not supported by exported U-Nets; fuse LoRA "
                                 "weights before diffaccel optimize")
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        out = run_chunked(self.engine, self.spec, {"sample": sample, "timestep": t.contiguous(),
                                                    "encoder_hidden_states": encoder_hidden_states})["out_sample"]
        out = out.to(sample.device)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class VaeShim(_Shim):
    """Decoder and (optional) encoder engines behind one ``AutoencoderKL``-like object."""

    def __init__(self, decoder, decoder_spec, config, encoder=None, encoder_spec=None):
        super().__init__(decoder, decoder_spec, config)
        self.encoder, self.encoder_spec = encoder, encoder_spec

    def decode(self, z, return_dict=True, generator=None, **kwargs):
        from diffusers.models.autoencoders.vae import DecoderOutput

        image = run_chunked(self.engine, self.spec, {"latent_sample": z})["sample"].to(z.device)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x, return_dict=True, **kwargs):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder is None:
            raise DiffaccelError("this artifact has no VAE encoder engine; rebuild it with diffaccel optimize")
        moments = run_chunked(self.encoder, self.encoder_spec, {"sample": x})["latent_parameters"].to(x.device)
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)
