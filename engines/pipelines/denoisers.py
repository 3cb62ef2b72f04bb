"""Engine-backed stand-ins for the denoisers diffusers' pipelines call: the U-Net (SD, SDXL) and the diffusion
transformers (SD3 / SD3.5's ``SD3Transformer2DModel``, FLUX.1's ``FluxTransformer2DModel``).

Each honours what diffusers' ``__call__`` uses of its model: ``(...)[0]``, ``.config``, ``dtype``/``device``, and for
the transformers ``cache_context`` (a no-op: the engines cache nothing between calls). What an exported graph cannot
compute is refused in one line before the engine runs: LoRA scales, IP-Adapter embeddings, ControlNet residuals,
SD3's skip-layer guidance (it removes blocks per call), FLUX position ids other than the text-to-image grid.

FLUX's engine takes the latents *unpacked*, ``(batch, channels, height, width)``, and packs them and builds their
position ids inside the graph (its spec then has the batch/height/width axes every family has); this shim unpacks
what the pipeline packed and packs the engine's answer back: data movement only, exact.
"""
from __future__ import annotations

import contextlib
import types

from diffaccel.optimize.artifact.errors import DiffaccelError

from diffaccel.engines.pipelines.shims import _Shim, run_chunked

LORA_SCALE = ("LoRA scales are not supported by exported denoisers; fuse LoRA weights before diffaccel optimize")


class DenoiserShim(_Shim):
    """What every engine-backed denoiser is (the drop-ins' checks read its ``spec``)."""

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers' cache hooks' context (FLUX calls it each step); the engines hold no cache between calls."""
        yield

    def enable_cache(self, config) -> None:
        """diffusers' ``CacheMixin`` switch: step caching with a :class:`~diffaccel.engines.pipelines.cache.
        DeepCacheConfig`, on an artifact built with ``optimize --step-cache`` (others are refused in one line)."""
        from diffaccel.engines.pipelines.cache import StepCache

        self._cache = StepCache(self.engine, config)

    def disable_cache(self) -> None:
        self._cache = None

    @property
    def is_cache_enabled(self) -> bool:
        return getattr(self, "_cache", None) is not None

    def _timestep(self, timestep, batch: int):
        import torch

        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        return (t.expand(batch) if t.numel() == 1 else t).contiguous()


class UNetShim(DenoiserShim):
    """``UNet2DConditionModel``: ``sample``, ``timestep``, ``encoder_hidden_states`` and SDXL's ``added_cond_kwargs`` /
    an LCM U-Net's ``timestep_cond`` as engine inputs."""

    ADDED = ("text_embeds", "time_ids")      # SDXL's added conditioning, inputs of their own in the engine

    def __init__(self, engine, spec, config):
        super().__init__(engine, spec, config)
        self.added = tuple(t.name for t in spec.inputs if t.name in self.ADDED)
        self.takes_timestep_cond = any(t.name == "timestep_cond" for t in spec.inputs)   # LCM U-Nets
        if config.get("addition_embed_type") == "text_time":   # what diffusers checks the time ids against
            width = int(config["projection_class_embeddings_input_dim"])
            self.add_embedding = types.SimpleNamespace(linear_1=types.SimpleNamespace(in_features=width))

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, return_dict=True, **kwargs):
        import torch
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if (cross_attention_kwargs or {}).get("scale") not in (None, 1.0):
            raise DiffaccelError("LoRA scales are not supported by exported U-Nets; fuse LoRA weights before "
                                 "diffaccel optimize")
        if (timestep_cond is not None) != self.takes_timestep_cond:
            raise DiffaccelError("timestep_cond (an LCM U-Net's guidance embedding) was " +
                                 ("not given; the engine needs it" if self.takes_timestep_cond else
                                  "given; this U-Net engine has no such input"))
        added = added_cond_kwargs or {}
        extra = sorted(set(added) - set(self.added))
        missing = [k for k in self.added if k not in added]
        if extra or missing:
            raise DiffaccelError(f"this U-Net engine takes added conditioning {list(self.added)}, got "
                                 f"{sorted(added)} (missing {missing}, unsupported {extra}): use the drop-in pipeline "
                                 "of the artifact's family")
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        inputs = {"sample": sample, "timestep": t.contiguous(), "encoder_hidden_states": encoder_hidden_states,
                  **{k: added[k].float() for k in self.added},
                  **({"timestep_cond": timestep_cond.float()} if self.takes_timestep_cond else {})}
        cache = getattr(self, "_cache", None)
        out = (cache(inputs) if cache is not None else run_chunked(self.engine, self.spec, inputs))["out_sample"]
        out = out.to(sample.device)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)




class TransformerShim(DenoiserShim):
    """``SD3Transformer2DModel``: ``hidden_states``, ``timestep`` (sigma x 1000), ``encoder_hidden_states``,
    ``pooled_projections`` as engine inputs; ``out_hidden_states`` out."""

    def _refuse(self, joint_attention_kwargs, **unsupported) -> None:
        kw = joint_attention_kwargs or {}
        if kw.get("scale") not in (None, 1.0):
            raise DiffaccelError(LORA_SCALE)
        if kw.get("ip_adapter_image_embeds") is not None:
            raise DiffaccelError("IP-Adapter image embeddings are not supported by exported transformers")
        given = sorted(k for k, v in unsupported.items() if v is not None and v is not False)
        if given:
            raise DiffaccelError(f"{', '.join(given)} cannot be served by an exported transformer (skip-layer "
                                 "guidance removes blocks per call, ControlNet residuals are not engine inputs); call "
                                 "the pipeline without skip_guidance_layers or a ControlNet")

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True,
                 skip_layers=None, **kwargs):
        self._refuse(joint_attention_kwargs, skip_layers=skip_layers,
                     block_controlnet_hidden_states=block_controlnet_hidden_states)
        inputs = {"hidden_states": hidden_states, "timestep": self._timestep(timestep, hidden_states.shape[0]),
                  "encoder_hidden_states": encoder_hidden_states, "pooled_projections": pooled_projections}
        return self._answer(run_chunked(self.engine, self.spec, inputs)["out_hidden_states"].to(hidden_states.device),
                            return_dict)

    @staticmethod
    def _answer(out, return_dict: bool):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class FluxTransformerShim(TransformerShim):
    """``FluxTransformer2DModel``: the packed latents the pipeline passes are unpacked for the engine (which packs
    them and makes ``img_ids`` itself) and its answer packed back; ``timestep`` is sigma (the graph scales it),
    ``guidance`` an input of FLUX.1-dev's engines only."""

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                 controlnet_single_block_samples=None, return_dict=True, controlnet_blocks_repeat=False, **kwargs):
        import torch

        self._refuse(joint_attention_kwargs, controlnet_block_samples=controlnet_block_samples,
                     controlnet_single_block_samples=controlnet_single_block_samples)
        rows, cols = self._grid(img_ids, txt_ids, hidden_states.shape[1], encoder_hidden_states.shape[1])
        b, n, c4 = hidden_states.shape
        c = c4 // 4
        latents = hidden_states.view(b, rows, cols, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * rows,
                                                                                                 2 * cols)
        inputs = {"hidden_states": latents, "timestep": self._timestep(timestep, b),
                  "encoder_hidden_states": encoder_hidden_states, "pooled_projections": pooled_projections}
        takes_guidance = any(t.name == "guidance" for t in self.spec.inputs)
        if takes_guidance != (guidance is not None):
            raise DiffaccelError("guidance was " + ("not given; this engine (FLUX.1-dev) needs it" if takes_guidance
                                                    else "given; this engine (FLUX.1-schnell) has no guidance input"))
        if takes_guidance:
            inputs["guidance"] = self._timestep(guidance, b)
        out = run_chunked(self.engine, self.spec, inputs)["out_hidden_states"]
        out = out.view(b, c, rows, 2, cols, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c4)
        return self._answer(out.to(hidden_states.device), return_dict)

    @staticmethod
    def _grid(img_ids, txt_ids, tokens: int, text: int) -> tuple:
        """(rows, cols) of the packed latent grid, after checking the ids are text-to-image's: zero text ids, and
        image ids (0, row, col) over the grid in row-major order (other layouts, e.g. FLUX Kontext's, need other
        engines)."""
        import torch

        img = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt = txt_ids[0] if txt_ids is not None and txt_ids.ndim == 3 else txt_ids
        rows, cols = int(img[:, 1].max()) + 1, int(img[:, 2].max()) + 1
        grid = torch.zeros(rows, cols, 3, dtype=img.dtype)
        grid[..., 1] = torch.arange(rows, dtype=img.dtype)[:, None]
        grid[..., 2] = torch.arange(cols, dtype=img.dtype)[None, :]
        standard = rows * cols == tokens and torch.equal(img.cpu(), grid.reshape(-1, 3))
        if not standard or (txt is not None and (txt.shape[0] != text or bool(txt.abs().sum()))):
            raise DiffaccelError("these position ids are not text-to-image's (zero text ids, image ids over the "
                                 "latent grid); FLUX Kontext/Fill-style inputs need engines built for them")
        return rows, cols


SHIMS = {"UNet2DConditionModel": UNetShim, "SD3Transformer2DModel": TransformerShim,
         "FluxTransformer2DModel": FluxTransformerShim}


def denoiser_shim(kind: str, engine, spec, config) -> DenoiserShim:
    """The shim for a denoiser of diffusers class ``kind`` (``UNet2DConditionModel``, ``SD3Transformer2DModel``...)
    over ``engine``; the class is the manifest's ``denoiser_class``."""
    if kind not in SHIMS:
        raise DiffaccelError(f"no engine stand-in for a {kind} denoiser; known: {', '.join(SHIMS)}")
    return SHIMS[kind](engine, spec, config)
