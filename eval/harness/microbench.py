"""Denoiser step latency (a U-Net's or a transformer's) of several variants, measured side by side in one run, with
ratios to the first.

Each variant is ``backend/precision``: ``torch/fp32`` runs the source's denoiser eagerly; ``optimum-intel/PRECISION``
is the peer, optimum-intel's own OpenVINO pipeline (see :mod:`diffaccel.eval.harness.peers_optimum`; skipped with
the reason where its extra is absent); any other pair that ``diffaccel optimize`` supports is built (the denoiser only,
cached under ``work``; re-runs skip finished stages) and loaded as an engine. ``backend/precision@exporter`` picks
the ONNX exporter (dynamo, the default, or torchscript); engine rows also give the node count of their graph. Every
variant gets the same inputs and the same timing wrapper.

Isolation (``StepBenchConfig.isolation``): ``process`` (the default) times each variant in its own process, so no
other runtime's thread pool or memory sits beside it, over ``passes`` passes in alternating order, and reports each
pass's median and the median of the medians (see :mod:`diffaccel.eval.harness.isolated`); ``interleaved`` keeps
every variant in this process and times one call of each per round.

>>> parse_variant("onnxruntime/int8")
('onnxruntime', 'int8', None)
>>> parse_variant("onnxruntime/fp32@torchscript")
('onnxruntime', 'fp32', 'torchscript')
>>> parse_variant("optimum-intel/int8")
('optimum-intel', 'int8', None)
>>> parse_variant("openvino/int8+int8-scores")
('openvino', 'int8', None, 'int8-scores')
>>> parse_variant("onnxruntime/fp32+unfused-attention")
('onnxruntime', 'fp32', None, 'unfused-attention')

A ``+option`` suffix builds a diffaccel int8 variant with one quantization choice changed (``VARIANT_OPTIONS``), so
two int8 builds of the same backend can be timed side by side. ``onnxruntime/fp32+unfused-attention`` loads the same
fp32 build's exported denoiser instead of its engine: attention as exported (MatMul/Softmax/MatMul, the score matrix
held) rather than fused into ONNX Runtime's ``MultiHeadAttention``, at the build's graph level, so the fusion's
speed and memory show beside ``onnxruntime/fp32``. Isolated rows give each process's peak RSS.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError, DiffaccelError, disk_full, one_line

from diffaccel.eval.harness.bench_variants import (  # noqa: F401  (the variant kinds, re-exported)
    EAGER, PEER_BACKENDS, UNFUSED, VARIANT_OPTIONS, denoiser_name, prepare_variant, step_title)


log = logging.getLogger(__name__)
ISOLATION = ("process", "interleaved")


def parse_variant(text: str) -> tuple:
    """(backend, precision, exporter or None[, option]) from ``backend/precision[@exporter][+option]``."""
    text, plus, option = text.strip().partition("+")
    if plus and option == UNFUSED and text.partition("@")[0] != "onnxruntime/fp32":
        raise DiffaccelError(f"bad variant {text + plus + option!r}: +{UNFUSED} is for onnxruntime/fp32 (the engine "
                             "that fuses attention), e.g. onnxruntime/fp32+unfused-attention")
    if plus and option != UNFUSED and (option not in VARIANT_OPTIONS
                                       or not text.partition("/")[2].startswith("int8")):
        raise DiffaccelError(f"bad variant option {option!r} in {text + plus + option!r}: int8 variants take one of "
                             f"+{', +'.join(VARIANT_OPTIONS)}, e.g. openvino/int8+int8-scores; onnxruntime/fp32 "
                             f"takes +{UNFUSED}")
    pair, at, exporter = text.partition("@")
    backend, _slash, precision = pair.partition("/")
    if not backend or not precision or (at and not exporter) or (exporter and (pair in EAGER
                                                                               or backend in PEER_BACKENDS)):
        raise DiffaccelError(f"bad variant {text!r}: write backend/precision[@exporter], e.g. onnxruntime/fp32, "
                             "onnxruntime/fp32@torchscript, torch/fp32 or optimum-intel/int8 (eager PyTorch and "
                             "the optimum-intel peer have no exporter)")
    if backend in PEER_BACKENDS and plus:
        raise DiffaccelError(f"bad variant {text + plus + option!r}: +options are for diffaccel's own int8 builds")
    return (backend, precision, exporter or None) + ((option,) if plus else ())


@dataclasses.dataclass(frozen=True)
class StepBenchConfig:
    src: str = "random:sd15"
    variants: tuple = ("torch/fp32", "onnxruntime/fp32")
    height: int = 256
    width: int = 256
    batch: int = 2            # the denoiser's input batch (2 = one image with classifier-free guidance)
    warmup: int = 2
    repeat: int = 10          # timed calls per variant (per process and pass, or interleaved rounds)
    work: str = "runs/microbench"
    threads: "int | None" = None
    seed: int = 0
    isolation: str = "process"
    passes: int = 2           # process isolation: passes over all variants, the order reversed every other pass
    calib_size: "int | None" = None    # int8 builds: calibration prompts / steps per prompt (None: optimize's
    calib_steps: "int | None" = None   # defaults); fewer for models whose calibration would take hours (SDXL)

    def __post_init__(self):
        object.__setattr__(self, "variants", tuple(self.variants))
        if self.isolation not in ISOLATION:
            raise ValueError(f"unknown isolation {self.isolation!r}; choose one of: {', '.join(ISOLATION)}")
        if self.passes < 1 or self.repeat < 1 or self.warmup < 0:
            raise ValueError(f"bad passes {self.passes} / repeat {self.repeat} / warmup {self.warmup}: need passes "
                             ">= 1, repeat >= 1 and warmup >= 0")
        if any(v is not None and v < 1 for v in (self.calib_size, self.calib_steps)):
            raise ValueError(f"bad calib_size {self.calib_size} / calib_steps {self.calib_steps}: need >= 1")


def variant_name(parsed: tuple) -> str:
    backend, precision, exporter, *option = parsed
    return f"{backend}/{precision}" + (f"@{exporter}" if exporter else "") + "".join(f"+{o}" for o in option)


def run_step_bench(cfg: StepBenchConfig, reporter=None) -> dict:
    """Build what is missing, then time every variant on identical inputs (isolated processes by default, see the
    module's docstring). Returns a JSON-able record."""
    variants = [parse_variant(v) for v in cfg.variants]     # a typo fails before the model loads
    if cfg.isolation == "process":
        from diffaccel.optimize.sources import resolve_source

        from diffaccel.eval.harness.isolated import run_isolated

        return run_isolated(cfg, [variant_name(v) for v in variants], [variant_name(v) for v in variants
                                                                       if f"{v[0]}/{v[1]}" not in EAGER],
                            __name__, resolve_source(cfg.src))
    return _run_interleaved(cfg, variants, reporter)


def _run_interleaved(cfg: StepBenchConfig, variants: list, reporter) -> dict:
    """Timed calls interleaved (one call of each variant per round) in this process, so drift in machine load hits
    every variant alike."""
    from diffaccel.optimize.sources import resolve_source

    from diffaccel.eval.harness.host import host_info
    from diffaccel.eval.harness.isolated import speedups
    from diffaccel.eval.harness.stability import step_problems
    from diffaccel.eval.harness.timing import Clock, LatencyStats

    source = resolve_source(cfg.src)
    pipe = source.load()
    runners, setup, facts, skipped, inputs = {}, {}, {}, {}, None
    for parsed in variants:
        name, t0 = variant_name(parsed), time.perf_counter()
        try:
            # ORT's intra-op threads must not spin after their run here: they would slow the variant timed next
            # (PyTorch's U-Net step on tinyshapes: 17 ms alone, 99 ms right after ORT sessions with spinning on)
            runners[name], own, facts[name] = prepare_variant(cfg, source, parsed, reporter, spin=False, pipe=pipe)
        except BackendUnavailableError as e:
            if parsed[0] not in PEER_BACKENDS:
                raise
            skipped[name] = str(e)
            continue
        inputs = inputs or own
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
    for r in rows:
        r["unstable"] = step_problems(r["stats"])
    rows += [{"variant": n, "skipped": why} for n, why in skipped.items()]
    speedups(rows, "p50")
    return {"benchmark": "denoiser-step", "config": dataclasses.asdict(cfg), "source": source.to_dict(),
            "denoiser": denoiser_name(source), "host": host_info(),
            "timing": "interleaved rounds in one process, perf_counter, ONNX Runtime intra-op spinning off", "rows": rows}


def format_table(result: dict) -> str:
    cfg = result["config"]
    if cfg.get("isolation") == "process":
        from diffaccel.eval.harness.isolated import format_isolated

        peaks = [f"{r['variant']} {r['peak_rss_gb']:.2f} GB" for r in result["rows"] if "peak_rss_gb" in r]
        return format_isolated(result) + (f"\npeak RSS of the first pass's process: {', '.join(peaks)}"
                                          if peaks else "")
    from diffaccel.eval.harness.isolated import ratio_cell
    from diffaccel.eval.harness.stability import note

    timed = [r for r in result["rows"] if "stats" in r]
    lines = [f"{step_title(result)}, {cfg['repeat']} interleaved timed rounds after {cfg['warmup']} warm-up",
             f"{'variant':<36} {'mean ms':>9} {'p50 ms':>9} {'p90 ms':>9} {'min ms':>9} {'nodes':>6} "
             f"{'x vs ' + (timed[0]['variant'] if timed else '-'):>18}"]
    for r in result["rows"]:
        if "stats" not in r:
            lines.append(f"{r['variant']:<36} skipped: {r['skipped']}")
            continue
        s = r["stats"]
        nodes = r.get("graph_nodes") or "-"
        lines.append(f"{r['variant']:<36} {s['mean'] * 1e3:9.1f} {s['p50'] * 1e3:9.1f} {s['p90'] * 1e3:9.1f} "
                     f"{s['min'] * 1e3:9.1f} {nodes:>6} {ratio_cell(r, timed[0], 17)}")
    return "\n".join(lines + [n for n in [note(timed, lambda r: r["variant"])] if n])


def time_one(cfg: StepBenchConfig, name: str, build_only: bool = False) -> dict:
    """Build or load one variant in this process, warm it up and time ``cfg.repeat`` calls (an isolated child's
    work); a peer whose extra is absent answers ``{"skipped": reason}``."""
    from diffaccel.optimize.cli.progress import ConsoleReporter
    from diffaccel.optimize.sources import resolve_source
    from diffaccel.optimize.stages.base import Reporter

    from diffaccel.eval.harness.timing import measure

    parsed = parse_variant(name)
    source = resolve_source(cfg.src)
    t0 = time.perf_counter()
    try:
        run, inputs, facts = prepare_variant(cfg, source, parsed, ConsoleReporter() if sys.stderr.isatty()
                                             else Reporter())
    except BackendUnavailableError as e:
        if parsed[0] not in PEER_BACKENDS:
            raise
        return {"variant": name, "skipped": one_line(e)}
    setup = round(time.perf_counter() - t0, 2)
    if build_only:
        return {"variant": name, "setup_seconds": setup}
    _stats, samples = measure(lambda: run(inputs), warmup=cfg.warmup, repeat=cfg.repeat)
    import resource

    peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)    # this variant's process, in GB
    return {"variant": name, "setup_seconds": setup, "samples": samples, "facts": {**facts, "peak_rss_gb": peak}}


def main(argv: list) -> int:
    """``python -m diffaccel.eval.harness.microbench CONFIG_JSON VARIANT OUT_JSON [--build-only]``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config, name, out, *flags = argv
    try:
        record = time_one(StepBenchConfig(**json.loads(config)), name, "--build-only" in flags)
    except DiffaccelError as e:
        print(f"error: {name}: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if (full := disk_full(e)) is None:
            raise
        print(f"error: {name}: {one_line(full)}", file=sys.stderr)
        return full.exit_code
    Path(out).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
