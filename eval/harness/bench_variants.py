"""How each ``microbench`` variant is built and fed: the denoiser's inputs, drawn from its family's spec at the
benchmark's size (so a U-Net, SDXL's added conditioning, an LCM guidance embedding, SD3's pooled projections or
FLUX's guidance come out right without a branch here), and the runner of each kind of variant: the source's model
eagerly, a diffaccel build's engine, the build's export (attention unfused), or a peer's own pipeline.
"""
from __future__ import annotations

from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError

EAGER = {"torch/fp32": "float32", "torch/bf16": "bfloat16"}   # run from the source pipeline, no artifact needed
PEER_BACKENDS = ("optimum-intel",)                             # another project's pipeline, not a diffaccel build
VARIANT_OPTIONS = {"int8-scores": {"attention_scores": "int8"}, "float-scores": {"attention_scores": "float"}}
UNFUSED = "unfused-attention"     # onnxruntime/fp32: the same build's export, attention not fused


def denoiser_spec(source, cfg, pipe=None) -> tuple:
    """(family, the denoiser's spec) for the benchmark's size and batch, from the source's configs alone (no weights
    loaded; a single-file checkpoint without its configs is loaded to read them)."""
    from diffaccel.optimize.config import ShapeRange
    from diffaccel.optimize.families import detect
    from diffaccel.optimize.families.sd import pipeline_configs

    configs = pipeline_configs(pipe) if pipe is not None else source.configs()
    if configs is None:
        return denoiser_spec(source, cfg, source.load())
    fam = detect(configs, source.spec)
    images = max(1, (cfg.batch + 1) // 2)
    shapes = ShapeRange(batch=(1, images), height=(cfg.height, cfg.height), width=(cfg.width, cfg.width))
    return fam, fam.specs(fam.ModelGeometry.from_configs(configs), shapes)[fam.DENOISER]


def denoiser_name(source) -> "str | None":
    """The source's denoiser (``unet`` or ``transformer``) from its configs, None where only loading can tell."""
    from diffaccel.optimize.families import detect

    configs = source.configs()
    return detect(configs, source.spec).DENOISER if configs else None


def step_title(result: dict) -> str:
    """A benchmark table's first words: "U-Net step, SRC, HxW, U-Net batch B" (or the transformer's)."""
    from diffaccel.optimize.artifact.roles import label

    name, cfg = label(result.get("denoiser")), result["config"]
    return f"{name} step, {result['source']['spec']}, {cfg['height']}x{cfg['width']}, {name} batch {cfg['batch']}"


def make_inputs(spec, cfg) -> dict:
    """The denoiser's inputs by name, in the order of its spec (what the eager module takes positionally), seeded."""
    import torch

    values = {**spec.opt_values(), "batch": cfg.batch}
    spec.check(**values)
    return spec.random_inputs(torch.Generator().manual_seed(cfg.seed), **values)


def eager(pipe, dtype_name: str):
    """The source's denoiser in PyTorch (``float32`` or ``bfloat16``), through the family's export wrapper."""
    import torch

    from diffaccel.optimize.families import configs_of, detect

    dtype = getattr(torch, dtype_name)
    fam = detect(configs_of(pipe), "the source")
    module = fam.export_module(fam.DENOISER, pipe).to(dtype)

    def run(inputs):
        with torch.inference_mode():
            return module(*(v.to(dtype) if v.is_floating_point() else v for v in inputs.values()))
    return run


def engine(cfg, source, fam, backend: str, precision: str, exporter, reporter, spin, option=None):
    """(runner, facts) for an engine built by diffaccel optimize (the denoiser only, cached under ``cfg.work``)."""
    from diffaccel.engines import load_engine
    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.config import QuantConfig, ShapeRange

    den = fam.DENOISER
    images = max(1, (cfg.batch + 1) // 2)
    quant = {k: v for k, v in (("calib_size", cfg.calib_size), ("calib_steps", cfg.calib_steps)) if v is not None}
    quant.update(VARIANT_OPTIONS.get(option, {}))     # the variant's +option, e.g. int8 attention scores
    build_option = option if option in VARIANT_OPTIONS else None          # +unfused-attention: the plain build
    try:
        ocfg = OptimizeConfig(backend=backend, precision=precision, components=(den,), threads=cfg.threads,
                              shapes=ShapeRange(batch=(1, images), height=(cfg.height, cfg.height),
                                                width=(cfg.width, cfg.width)),
                              # builds may run in a process beside the variants already loaded: the pre-flight
                              # estimate is for a build on its own, so it would refuse builds that fit
                              memory_check=False, **({"exporter": exporter} if exporter else {}),
                              **({"quant": QuantConfig(**quant)} if quant else {}))
    except ValueError as e:
        raise DiffaccelError(str(e)) from None
    out = Path(cfg.work) / (f"{source.spec.replace(':', '_').replace('/', '_')}-{den}-{backend}-{precision}"
                            + (f"-{exporter}" if exporter else "") + (f"-{build_option}" if build_option else ""))
    manifest = optimize(source, out, ocfg, reporter=reporter)
    entry = manifest.components[den]
    if option == UNFUSED:
        run, path = unfused(out / den / "export" / "model.onnx", ocfg, cfg.threads, spin), \
            out / den / "export" / "model.onnx"
    else:
        run, path = load_engine(backend, out, den, entry, threads=cfg.threads, spin=spin), out / entry["engine"]
    facts = {"exporter": str(ocfg.exporter), "graph_nodes": node_count(path)}
    if backend == "onnxruntime":
        facts["fused_attention"] = 0 if option == UNFUSED else entry.get("fused_attention", 0)
    return (lambda inputs: run(**inputs)), facts


def unfused(path: Path, ocfg, threads, spin):
    """The build's exported denoiser as ONNX Runtime loads it at the build's graph level: what the engine stage
    starts from before it fuses attention into ``MultiHeadAttention`` (the same weights, the same other
    optimizations)."""
    from diffaccel.engines.backends.onnxruntime import OrtEngine

    return OrtEngine(path, provider=ocfg.provider, threads=threads, level=ocfg.graph_level, spin=spin)


def peer(cfg, source, backend: str, precision: str, inputs: dict):
    """(runner, facts) for a peer's own pipeline, exported once and cached under ``cfg.work``."""
    from diffaccel.eval.harness import peers_optimum

    out = peers_optimum.cached(Path(cfg.work), source, precision)
    pipe = peers_optimum.load(out, precision)
    facts = {"peer": backend, "ov_config": peers_optimum.ov_config(precision), "versions": peers_optimum.versions()}
    return peers_optimum.denoiser_runner(pipe, inputs), facts


def prepare_variant(cfg, source, parsed: tuple, reporter=None, spin=None, pipe=None) -> tuple:
    """(runner, inputs, facts) for one variant; ``pipe``: the loaded source, where the caller has one."""
    backend, precision, exporter, *option = parsed
    pair = f"{backend}/{precision}"
    if pair in EAGER:
        pipe = pipe if pipe is not None else source.load()
        return eager(pipe, EAGER[pair]), make_inputs(denoiser_spec(source, cfg, pipe)[1], cfg), {}
    fam, spec = denoiser_spec(source, cfg, pipe)
    inputs = make_inputs(spec, cfg)
    if backend in PEER_BACKENDS:
        run, facts = peer(cfg, source, backend, precision, inputs)
        return run, inputs, facts
    run, facts = engine(cfg, source, fam, backend, precision, exporter, reporter, spin, *option)
    return run, inputs, facts


def node_count(path: Path) -> "int | None":
    if path.suffix != ".onnx":
        return None
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)
