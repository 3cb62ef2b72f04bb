"""DeepCache's split of a ``UNet2DConditionModel`` (``optimize --step-cache``): three graphs that hold each weight once
and, run in turn, compute exactly the U-Net's step.

The U-Net's skip connections pair each down layer with an up layer: the res sample ``g`` of
``down_block_res_samples`` (``conv_in``'s output is 0; down block ``i``'s resnet ``j`` is ``i*L + 1 + j`` and its
downsampler ``i*L + L``, with ``L = layers_per_block + 1``) is consumed by up block ``n-1-i`` (counted from the
output: "reversed" block ``i``). A branch ``b = k*L + l`` (DeepCache's ``cache_branch_id``: on SD 1.x/2.x and SDXL,
``L = 3``, the same numbers) keeps the ``l + 1`` last up layers of reversed up block ``k`` and every up layer after
them, and the down layers whose res samples those consume (``0 .. k*L + l``):

- ``head``: ``conv_in``, the time (and SDXL's added) embedding, down layers ``1 .. k*L + l``: out ``emb`` and the
  res samples ``res_0 .. res_{k*L+l}`` (the last is also the hidden state the deep part starts from);
- ``deep``: the remaining down layers, the mid block and the up layers before the kept ones: out ``feature``, the
  hidden state entering the kept up layers (what DeepCache caches between steps);
- ``tail``: the kept up layers (popping the head's res samples as the U-Net does), ``conv_norm_out``/``conv_out``.

A cached step runs ``head`` and ``tail`` with the stored ``feature``. Branch 0 (DeepCache's default for SD) keeps
``conv_in`` and the U-Net's last resnet/attention pair only. Spatial axes of the parts are counted at the finest
resolution the deep part's inputs have (level ``k``), finer tensors as multiples, so every spec dim is ``N*axis``.

>>> Split.of({"layers_per_block": 2, "down_block_types": ["A"] * 4}, 0)
Split(branch=0, block=0, layer=0, per_block=3, blocks=4)
>>> Split.of({"layers_per_block": 2, "down_block_types": ["A"] * 4}, 4).res_count
5
"""
from __future__ import annotations

import dataclasses

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.artifact.specs import AxisRange, ComponentSpec, TensorSpec

PARTS = ("head", "deep", "tail")
HEAD_ORDER = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond")


def part_names(denoiser: str) -> dict:
    """{part: component name}: ``unet_head``, ``unet_deep``, ``unet_tail``."""
    return {p: f"{denoiser}_{p}" for p in PARTS}


@dataclasses.dataclass(frozen=True)
class Split:
    branch: int
    block: int          # k: the reversed up block (= down block) the split is in
    layer: int          # l: up layers of that block kept in the tail, less one (down layers kept in the head)
    per_block: int      # L = layers_per_block + 1
    blocks: int         # n: down (= up) blocks

    @classmethod
    def of(cls, config: dict, branch: int) -> "Split":
        """The split at ``branch`` of a U-Net ``config``; a branch outside it, or a U-Net with per-block layer
        counts, is refused in one line."""
        per = config.get("layers_per_block", 2)
        if not isinstance(per, int):
            raise DiffaccelError(f"--step-cache needs one layers_per_block for every block, this U-Net has {per}")
        blocks = len(config.get("down_block_types") or (0,) * 4)
        top = blocks * (per + 1) - 1
        if not 0 <= int(branch) <= top:
            raise DiffaccelError(f"--step-cache branch {branch} is out of range: this U-Net has branches 0-{top} "
                                 f"({blocks} blocks x {per + 1} layers; 0 caches the most)")
        return cls(int(branch), int(branch) // (per + 1), int(branch) % (per + 1), per + 1, blocks)

    @property
    def res_count(self) -> int:
        """How many res samples the head hands to the tail."""
        return self.block * self.per_block + self.layer + 1

    def record(self, denoiser: str) -> dict:
        """What the manifest records of the split."""
        return {"method": "deepcache", "branch": self.branch, "block": self.block, "layer": self.layer,
                "graphs": part_names(denoiser)}


# ----------------------------------------------------------------------------------------------------------
# specs
# ----------------------------------------------------------------------------------------------------------
def _res_shapes(config: dict, split: Split) -> list:
    """(channels, level) of res samples ``0 .. res_count-1``."""
    chans = list(config.get("block_out_channels") or (320, 640, 1280, 1280))
    out = [(chans[0], 0)]
    for g in range(1, split.res_count):
        i, j = divmod(g - 1, split.per_block)
        out.append((chans[i], i + 1) if j == split.per_block - 1 else (chans[i], i))
    return out


def _feature_channels(config: dict, split: Split) -> int:
    chans = list(config.get("block_out_channels") or (320, 640, 1280, 1280))
    whole = split.layer == split.per_block - 1 and split.block + 1 < split.blocks
    return chans[split.block + 1] if whole else chans[split.block]


def split_specs(full: ComponentSpec, config: dict, split: Split, denoiser: str) -> dict:
    """The three parts' specs from the whole U-Net's spec (its inputs, batch and latent axes)."""
    k = split.block
    axes = {"batch": full.axes["batch"]}
    for name in ("height", "width"):
        r = full.axes[name]
        s = 2 ** k
        axes[name] = AxisRange(r.min // s, r.opt // s, r.max // s, max(1, r.multiple // s))
    dim = lambda level: f"{2 ** (k - level)}*" if k > level else ""   # noqa: E731
    batch = full.inputs[0].dims[0]
    emb_dim = int(config.get("time_embedding_dim") or (config.get("block_out_channels") or (320,))[0] * 4)
    res = [TensorSpec(f"res_{g}", (batch, c, f"{dim(lv)}height", f"{dim(lv)}width"))
           for g, (c, lv) in enumerate(_res_shapes(config, split))]
    emb = TensorSpec("emb", (batch, emb_dim))
    ehs = next(t for t in full.inputs if t.name == "encoder_hidden_states")
    given = {t.name: t for t in full.inputs}
    head_ins = tuple(TensorSpec(n, tuple(f"{2 ** k}*{d}" if d in ("height", "width") and k else d
                                         for d in given[n].dims), given[n].dtype, given[n].sample, given[n].high)
                     for n in part_inputs(config, split)["head"])
    feature = TensorSpec("feature", (batch, _feature_channels(config, split), "height", "width"))
    out = full.outputs[0]
    out = TensorSpec(out.name, tuple(f"{2 ** k}*{d}" if d in ("height", "width") and k else d for d in out.dims))
    names = part_names(denoiser)
    tol = dict(atol=full.atol, rtol=full.rtol)
    return {names["head"]: ComponentSpec(names["head"], head_ins, (emb, *res), axes, **tol),
            names["deep"]: ComponentSpec(names["deep"], (res[-1], emb, ehs), (feature,), axes, **tol),
            names["tail"]: ComponentSpec(names["tail"], (feature, emb, ehs, *res), (out,), axes, **tol)}


def part_inputs(config: dict, split: Split) -> dict:
    """{part: its input names, in order} (the head's: the U-Net's inputs its layers read)."""
    res = [f"res_{g}" for g in range(split.res_count)]
    present = {"sample", "timestep", "encoder_hidden_states" if head_uses_text(config, split) else "",
               "timestep_cond" if config.get("time_cond_proj_dim") else "",
               *(("text_embeds", "time_ids") if config.get("addition_embed_type") == "text_time" else ())}
    return {"head": [n for n in HEAD_ORDER if n in present], "deep": [res[-1], "emb", "encoder_hidden_states"],
            "tail": ["feature", "emb", "encoder_hidden_states", *res]}


def head_uses_text(config: dict, split: Split) -> bool:
    """Whether the head's down layers include cross-attention (then it takes ``encoder_hidden_states``)."""
    types = list(config.get("down_block_types") or ())
    return any("CrossAttn" in types[i] for i in range(split.block)) or (
        split.layer > 0 and "CrossAttn" in types[split.block])


# ----------------------------------------------------------------------------------------------------------
# torch modules with exactly the parts' specs' named inputs and outputs
# ----------------------------------------------------------------------------------------------------------
def down_layers(unet) -> list:
    """The U-Net's down layers in order, each ``(resnet or downsampler, attention or None)``; each gives one res
    sample."""
    out = []
    for block in unet.down_blocks:
        attns = list(getattr(block, "attentions", None) or [None] * len(block.resnets))
        out += list(zip(block.resnets, attns)) + [(d, None) for d in (block.downsamplers or ())]
    return out


def _attend(attn, h, ehs):
    return h if attn is None else attn(h, encoder_hidden_states=ehs, return_dict=False)[0]


def _run_down(layer, h, emb, ehs):
    module, attn = layer
    if attn is None and not hasattr(module, "time_emb_proj"):   # a downsampler
        return module(h)
    return _attend(attn, module(h, emb), ehs)


def _run_up(unet, split: Split, h, emb, ehs, res: list, first: int, last: int):
    """Up layers ``first .. last-1`` in the U-Net's order (flat over up blocks, each block's upsampler after its last
    resnet), popping ``res`` from its end."""
    index = 0
    for block in unet.up_blocks:
        attns = list(getattr(block, "attentions", None) or [None] * len(block.resnets))
        for resnet, attn in zip(block.resnets, attns):
            if first <= index < last:
                h = _attend(attn, resnet(torch_cat(h, res.pop()), emb), ehs)
            index += 1
        if first < index <= last:
            for up in block.upsamplers or ():
                h = up(h)
    return h


def torch_cat(h, r):
    import torch

    return torch.cat([h, r], dim=1)


def split_modules(unet, split: Split, denoiser: str) -> dict:
    """{component: nn.Module} of the three parts over ``unet`` (its weights shared, not copied)."""
    import torch

    n_up = split.blocks * split.per_block
    keep = split.layer + 1 + split.block * split.per_block      # up layers in the tail (= res samples)
    head_layers = split.res_count - 1

    def head(sample, timestep, encoder_hidden_states=None, timestep_cond=None, text_embeds=None, time_ids=None):
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else {}
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        emb = unet.time_embed_act(emb) if unet.time_embed_act is not None else emb
        res = [unet.conv_in(sample)]
        for layer in down_layers(unet)[:head_layers]:
            res.append(_run_down(layer, res[-1], emb, encoder_hidden_states))
        return (emb, *res)

    def deep(h, emb, ehs):
        res = [None] * split.res_count
        for layer in down_layers(unet)[head_layers:]:
            h = _run_down(layer, h, emb, ehs)
            res.append(h)
        h = unet.mid_block(h, emb, encoder_hidden_states=ehs) if getattr(unet.mid_block, "has_cross_attention",
                                                                         False) else unet.mid_block(h, emb)
        return _run_up(unet, split, h, emb, ehs, res, 0, n_up - keep)

    def tail(feature, emb, ehs, *res):
        h = _run_up(unet, split, feature, emb, ehs, list(res), n_up - keep, n_up)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)

    names = part_inputs(dict(unet.config), split)
    return {comp: _module(unet, fn, comp, names[part]) for (part, comp), fn in
            zip(part_names(denoiser).items(), (head, deep, tail))}


def _module(unet, fn, name: str, names: list):
    """An nn.Module holding ``unet`` whose ``forward`` takes the spec's inputs by name (in its order): what
    torch.export binds the spec's dynamic shapes to."""
    import inspect

    import torch

    takes = list(inspect.signature(fn).parameters)
    positional = takes[0] == "sample"          # the head: by keyword (some inputs may be absent)

    def forward(self, *tensors):
        return fn(**dict(zip(names, tensors))) if positional else fn(*tensors)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] +
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    cls = type(name, (torch.nn.Module,), {"forward": forward})
    module = cls()
    module.model = unet
    return module.eval()


# ----------------------------------------------------------------------------------------------------------
# the family a --step-cache build's stages see
# ----------------------------------------------------------------------------------------------------------
class StepCacheFamily:
    """A U-Net family whose denoiser is built as the split's three parts (components, specs, export modules); the
    rest is the family's. ``COMPOSED``: the denoiser the last stage records over the parts."""

    def __init__(self, family, unet_config: dict, branch: int):
        kind = unet_config.get("_class_name") or "UNet2DConditionModel"
        if kind != "UNet2DConditionModel":
            raise DiffaccelError(f"--step-cache splits UNet2DConditionModel denoisers (DeepCache); {family.TITLE} "
                                 f"has a {kind}, whose caches (FORA, FirstBlockCache) are not built yet: build "
                                 "without --step-cache")
        self.base, self.unet_config, self.split = family, unet_config, Split.of(unet_config, branch)
        den = family.DENOISER
        self.parts = part_names(den)
        self.COMPONENTS = tuple(p for c in family.COMPONENTS for p in (self.parts.values() if c == den else (c,)))
        self.SOURCE_MODEL = {**family.SOURCE_MODEL, **{p: family.SOURCE_MODEL[den] for p in self.parts.values()}}
        self.COMPOSED = (den,)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def specs(self, geo, shapes) -> dict:
        specs = self.base.specs(geo, shapes)
        return {**specs, **split_specs(specs[self.DENOISER], self.unet_config, self.split, self.DENOISER)}

    def export_module(self, component: str, pipe_or_models):
        if component not in self.parts.values():
            return self.base.export_module(component, pipe_or_models)
        src = self.SOURCE_MODEL[component]
        unet = pipe_or_models[src] if isinstance(pipe_or_models, dict) else getattr(pipe_or_models, src)
        return split_modules(unet, self.split, self.DENOISER)[component]
