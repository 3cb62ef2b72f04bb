"""Engine-backed stand-ins for the text encoders and the VAE diffusers' pipelines call (the denoisers' are in
:mod:`.denoisers`).

Each shim honours exactly what diffusers' ``__call__`` uses: ``unet(...)[0]`` and ``unet.config``, ``vae.decode``,
``vae.encode(...).latent_dist``, ``vae.config.scaling_factor``, ``text_encoder(ids)[0]``, and ``dtype``/``device``;
the VAE also honours ``enable_slicing``/``enable_tiling`` as ``AutoencoderKL`` does. For SDXL the U-Net also takes
``added_cond_kwargs`` (``text_embeds``, ``time_ids``) and exposes ``add_embedding.linear_1.in_features`` (what
diffusers checks the time ids against), and the text encoders serve ``output_hidden_states=True`` with the
penultimate hidden state (the only one SDXL reads; others raise, naming ``clip_skip``) and, for
``text_encoder_2``, ``text_embeds`` first. Batches larger than an engine's maximum are run in chunks.
"""
from __future__ import annotations

import functools
import types

from diffaccel.optimize.artifact.errors import DiffaccelError, ShapeError


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

    def modules(self):
        """What diffusers walks looking for offloading hooks (there are none on an engine)."""
        return iter((self,))

    def set_default_attn_processor(self):
        """diffusers' switch back to its default attention processors: nothing to switch in an engine, whose
        attention was fixed when it was built."""


CLIP_SKIP = ("clip_skip is not supported by exported text encoders: they return the last and the penultimate "
             "hidden state only; call the pipeline without clip_skip")


class LastTwoHiddenStates(tuple):
    """``hidden_states`` of an exported text encoder: (penultimate, last). Asking for any other layer (what
    ``clip_skip`` does) raises, naming why, instead of returning a wrong layer."""

    def __getitem__(self, index):
        if isinstance(index, int) and index in (-2, -1):
            return tuple.__getitem__(self, index)
        raise DiffaccelError(CLIP_SKIP)


class TextEncoderShim(_Shim):
    """``CLIPTextModel`` (outputs last_hidden_state, pooler_output) or, where the engine returns ``text_embeds``,
    ``CLIPTextModelWithProjection``; ``output_hidden_states=True`` needs a ``penultimate_hidden_state`` output."""

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        names = {t.name for t in self.spec.outputs}
        if output_hidden_states and "penultimate_hidden_state" not in names:
            raise DiffaccelError("clip_skip / output_hidden_states is not supported by exported text encoders; "
                                 "call the pipeline without clip_skip")
        out = run_chunked(self.engine, self.spec, {"input_ids": input_ids})
        hidden = LastTwoHiddenStates((out["penultimate_hidden_state"], out["last_hidden_state"])) \
            if output_hidden_states else None
        if "text_embeds" in names:
            return CLIPTextModelOutput(text_embeds=out["text_embeds"], last_hidden_state=out["last_hidden_state"],
                                       hidden_states=hidden)
        return BaseModelOutputWithPooling(last_hidden_state=out["last_hidden_state"],
                                          pooler_output=out["pooler_output"], hidden_states=hidden)


class T5EncoderShim(_Shim):
    """``T5EncoderModel``: ``(input_ids)[0]`` is the last hidden state (SD3's ``text_encoder_3``, FLUX's
    ``text_encoder_2``); the engine serves any token count its ``text`` axis allows (diffusers' 1-512)."""

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        if output_hidden_states:
            raise DiffaccelError("output_hidden_states is not served by the exported T5 encoder: it returns its last "
                                 "hidden state only")
        out = run_chunked(self.engine, self.spec, {"input_ids": input_ids})["last_hidden_state"]
        return BaseModelOutput(last_hidden_state=out.to(input_ids.device))


class VaeShim(_Shim):
    """Decoder and (optional) encoder engines behind one ``AutoencoderKL``-like object.

    Slicing runs one image per engine call. Tiling runs diffusers' own ``AutoencoderKL.tiled_decode`` /
    ``_tiled_encode`` with the engines in place of the decoder and encoder, so it blends exactly as diffusers does;
    it needs engines whose shape range serves every tile (:meth:`tile_problem` says which do not)."""

    def __init__(self, decoder, decoder_spec, config, encoder=None, encoder_spec=None):
        super().__init__(decoder, decoder_spec, config)
        self.encoder, self.encoder_spec = encoder, encoder_spec
        self.use_slicing = self.use_tiling = False
        self.scale_factor = 2 ** (len(config["block_out_channels"]) - 1)
        size = config.get("sample_size", 512)          # AutoencoderKL's tile sizes and overlap
        self.tile_sample_min_size = size[0] if isinstance(size, (list, tuple)) else size
        self.tile_latent_min_size = int(self.tile_sample_min_size / self.scale_factor)
        self.tile_overlap_factor = 0.25

    def enable_slicing(self):
        """Decode (and encode) one image at a time: less memory for large batches, same images."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True):
        """Decode (and encode) large images in overlapping tiles, as ``AutoencoderKL.enable_tiling``. Raises
        :class:`ShapeError` when the engines were not built for the tile size."""
        if use_tiling:
            tile = self.tile_latent_min_size * self.scale_factor
            problem = self.tile_problem({tile}, self.spec, "decoder") or (
                self.tile_problem({self.tile_sample_min_size}, self.encoder_spec, "encoder") if self.encoder else "")
            if problem:
                raise ShapeError(f"VAE tiling is not available: {problem}; rebuild with diffaccel optimize "
                                 f"--height/--width ranges that include {tile}, or leave tiling off")
        self.use_tiling = use_tiling

    def disable_tiling(self):
        self.use_tiling = False

    def decode(self, z, return_dict=True, generator=None, **kwargs):
        import torch
        from diffusers.models.autoencoders.vae import DecoderOutput

        parts = [self._decode(p) for p in (z.split(1) if self.use_slicing and z.shape[0] > 1 else (z,))]
        image = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(z.device)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x, return_dict=True, **kwargs):
        import torch
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder is None:
            raise DiffaccelError("this artifact has no VAE encoder engine; rebuild it with diffaccel optimize")
        parts = [self._encode(p) for p in (x.split(1) if self.use_slicing and x.shape[0] > 1 else (x,))]
        dist = DiagonalGaussianDistribution((parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.device))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def _decode(self, z):
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            from diffusers import AutoencoderKL

            return AutoencoderKL.tiled_decode(self._as_autoencoder(), z, return_dict=False)[0]
        return self._run_decoder(z)

    def _encode(self, x):
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            from diffusers import AutoencoderKL

            return AutoencoderKL._tiled_encode(self._as_autoencoder(), x)
        return self._run_encoder(x)

    def _run_decoder(self, z):
        return run_chunked(self.engine, self.spec, {"latent_sample": z})["sample"]

    def _run_encoder(self, x):
        return run_chunked(self.encoder, self.encoder_spec, {"sample": x})["latent_parameters"]

    def _as_autoencoder(self):
        """What ``AutoencoderKL``'s tiling methods read from ``self``; the engines include the (post-)quant convs."""
        from diffusers import AutoencoderKL

        return types.SimpleNamespace(
            config=types.SimpleNamespace(use_quant_conv=False, use_post_quant_conv=False),
            decoder=self._run_decoder, encoder=self._run_encoder,
            blend_v=functools.partial(AutoencoderKL.blend_v, None),
            blend_h=functools.partial(AutoencoderKL.blend_h, None),
            **{k: getattr(self, k) for k in ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")})

    def tile_sizes(self, height: int, width: int, encode: bool = False) -> set:
        """The tile sides in pixels that tiling cuts a ``height`` x ``width`` image into (empty: not tiled)."""
        s = self.scale_factor
        tile = self.tile_sample_min_size if encode else self.tile_latent_min_size * s
        step = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor)) if encode else \
            int(self.tile_latent_min_size * (1 - self.tile_overlap_factor)) * s
        if not self.use_tiling or max(height, width) <= tile:
            return set()
        return {min(tile, n - i) for n in (height, width) for i in range(0, n, step)}

    def tile_problem(self, sizes: set, spec, what: str) -> str:
        """Why the ``what`` engine (decoder | encoder) cannot serve tiles of these sides in pixels ('' if it can)."""
        s = self.scale_factor
        axes = [spec.axes[a] for a in ("height", "width") if a in spec.axes]
        bad = sorted(p for p in sizes if any(p % (s * r.multiple) or not r.allows(p // s) for r in axes))
        if not bad:
            return ""
        spans = " x ".join(f"{r.min * s}-{r.max * s}" for r in axes)
        return (f"tiles of {', '.join(map(str, bad))} pixels, but the VAE {what} engine serves {spans} pixels in "
                f"multiples of {s * max(r.multiple for r in axes)}")
