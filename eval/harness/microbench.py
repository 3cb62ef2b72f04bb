"""U-Net step latency of several variants, measured side by side in one run, with ratios to the first.

Each variant is ``backend/precision``: ``torch/fp32`` runs the source's U-Net eagerly; any other pair that
``diffaccel optimize`` supports is built (U-Net only, cached under ``work``; re-runs skip finished stages) and loaded
as an engine. ``backend/precision@exporter`` picks the ONNX exporter (dynamo, the default, or torchscript), so both
exporters can be timed side by side; engine rows also give the node count of their graph. Every variant gets the
same inputs and the same timing wrapper.

>>> parse_variant("onnxruntime/int8")
('onnxruntime', 'int8', None)
>>> parse_variant("onnxruntime/fp32@torchscript")
('onnxruntime', 'fp32', 'torchscript')
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError


log = logging.getLogger(__name__)
EAGER = {"torch/fp32": "float32", "torch/bf16": "bfloat16"}   # run from the source pipeline, no artifact needed


def parse_variant(text: str) -> tuple:
    """(backend, precision, exporter or None) from ``backend/precision[@exporter]``."""
    pair, at, exporter = text.strip().partition("@")
    backend, _slash, precision = pair.partition("/")
    if not backend or not precision or (at and not exporter) or (exporter and pair in EAGER):
        raise DiffaccelError(f"bad variant {text!r}: write backend/precision[@exporter], e.g. onnxruntime/fp32, "
                             "onnxruntime/fp32@torchscript or torch/fp32 (eager PyTorch has no exporter)")
    return backend, precision, exporter or None


@dataclasses.dataclass(frozen=True)
class UNetBenchConfig:
    src: str = "random:sd15"
    variants: tuple = ("torch/fp32", "onnxruntime/fp32")
    height: int = 256
    width: int = 256
    batch: int = 2            # the U-Net's input batch (2 = one image with classifier-free guidance)
    warmup: int = 2
    repeat: int = 10
    work: str = "runs/microbench"
    threads: "int | None" = None
    seed: int = 0


def _inputs(pipe, cfg: UNetBenchConfig):
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    c = pipe.unet.config
    return {"sample": torch.randn(cfg.batch, c.in_channels, cfg.height // scale, cfg.width // scale, generator=g),
            "timestep": torch.full((cfg.batch,), 500.0),
            "encoder_hidden_states": torch.randn(cfg.batch, pipe.tokenizer.model_max_length, c.cross_attention_dim,
                                                 generator=g)}


def _eager(pipe, dtype_name: str):
    import torch

    from diffaccel.optimize.families.sd import export_module

    dtype = getattr(torch, dtype_name)
    module = export_module("unet", pipe).to(dtype)

    def run(inputs):
        with torch.inference_mode():
            return module(*(v.to(dtype) if v.is_floating_point() else v for v in inputs.values()))
    return run


def _engine(cfg: UNetBenchConfig, source, backend: str, precision: str, exporter, reporter):
    """(runner, facts) for an engine built by diffaccel optimize (U-Net only, cached under ``cfg.work``)."""
    from diffaccel.engines import load_engine
    from diffaccel.optimize import OptimizeConfig, optimize
    from diffaccel.optimize.config import ShapeRange

    images = max(1, (cfg.batch + 1) // 2)
    try:
        ocfg = OptimizeConfig(backend=backend, precision=precision, components=("unet",), threads=cfg.threads,
                              shapes=ShapeRange(batch=(1, images), height=(cfg.height, cfg.height),
                                                width=(cfg.width, cfg.width)),
                              # builds run in this process beside the variants already loaded: the pre-flight
                              # estimate is for a build on its own, so it would refuse builds that fit
                              memory_check=False, **({"exporter": exporter} if exporter else {}))
    except ValueError as e:
        raise DiffaccelError(str(e)) from None
    out = Path(cfg.work) / (f"{source.spec.replace(':', '_').replace('/', '_')}-unet-{backend}-{precision}"
                            + (f"-{exporter}" if exporter else ""))
    manifest = optimize(source, out, ocfg, reporter=reporter)
    entry = manifest.components["unet"]
    # Interleaved rounds put every variant on the same cores back to back: ORT's intra-op threads must not keep
    # spinning after their run, or they slow the variant timed next (PyTorch's U-Net step on tinyshapes: 17 ms
    # alone, 99 ms right after ORT sessions with spinning on).
    engine = load_engine(backend, out, "unet", entry, threads=cfg.threads, spin=False)
    facts = {"exporter": str(ocfg.exporter), "graph_nodes": _node_count(out / entry["engine"])}
    return (lambda inputs: engine(**inputs)), facts


def _node_count(path: Path) -> "int | None":
    if path.suffix != ".onnx":
        return None
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def run_unet_bench(cfg: UNetBenchConfig, reporter=None) -> dict:
    """Build what is missing, then time every variant on identical inputs. Timed calls are interleaved (one call of
    each variant per round), so drift in machine load hits every variant alike. Returns a JSON-able record."""
    from diffaccel.optimize.sources import resolve_source

    from diffaccel.eval.harness.host import host_info
    from diffaccel.eval.harness.timing import Clock, LatencyStats

    variants = [parse_variant(v) for v in cfg.variants]     # a typo fails before the model loads
    source = resolve_source(cfg.src)
    pipe = source.load()
    inputs = _inputs(pipe, cfg)
    runners, setup, facts = {}, {}, {}
    for backend, precision, exporter in variants:
        pair = f"{backend}/{precision}"
        name = pair + (f"@{exporter}" if exporter else "")
        t0 = time.perf_counter()
        if pair in EAGER:
            runners[name], facts[name] = _eager(pipe, EAGER[pair]), {}
        else:
            runners[name], facts[name] = _engine(cfg, source, backend, precision, exporter, reporter)
        setup[name] = round(time.perf_counter() - t0, 2)
    for name, run in runners.items():
        log.info("warming up %s", name)
        for _ in range(cfg.warmup):
            run(inputs)
    clock, samples = Clock("cpu"), {name: [] for name in runners}
    for _ in range(cfg.repeat):
        for name, run in runners.items():
            with clock.span() as span:
                run(inputs)
            samples[name].append(span.seconds)
    rows = [{"variant": n, "setup_seconds": setup[n], "stats": LatencyStats.from_samples(samples[n]).to_dict(),
             "samples": samples[n], **facts[n]} for n in runners]
    base = rows[0]["stats"]["p50"]
    for r in rows:
        r["speedup_vs_first"] = base / r["stats"]["p50"]
    return {"benchmark": "unet-step", "config": dataclasses.asdict(cfg), "source": source.to_dict(),
            "host": host_info(), "timing": "interleaved rounds, perf_counter, ONNX Runtime intra-op spinning off",
            "rows": rows}


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"U-Net step, {result['source']['spec']}, {cfg['height']}x{cfg['width']}, U-Net batch {cfg['batch']}, "
             f"{cfg['repeat']} interleaved timed rounds after {cfg['warmup']} warm-up",
             f"{'variant':<30} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} {'min ms':>9} {'nodes':>6} "
             f"{'x vs ' + result['rows'][0]['variant']:>18}"]
    for r in result["rows"]:
        s = r["stats"]
        nodes = r.get("graph_nodes") or "-"
        lines.append(f"{r['variant']:<30} {s['mean'] * 1e3:9.1f} {s['p50'] * 1e3:9.1f} {s['p90'] * 1e3:9.1f} "
                     f"{s['min'] * 1e3:9.1f} {nodes:>6} {r['speedup_vs_first']:17.2f}x")
    return "\n".join(lines)
