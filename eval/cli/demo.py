"""``diffaccel demo``: the README's main command. Optimize a model (tinyshapes by default, shipped with diffaccel)
into ONNX Runtime fp32 and int8 and OpenVINO int8 engines, evaluate them against the PyTorch baseline and its peers
on the same prompts and seeds, and say where the report is. Finished stages are skipped on re-runs.

>>> list(variant_configs("onnxruntime/fp32, OpenVINO/int8", threads=1))
['onnxruntime/fp32', 'openvino/int8']
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError, DiffaccelError, one_line
from diffaccel.optimize.cli.args import GUIDANCE_HELP, guidance_arg

VARIANTS = "onnxruntime/fp32,onnxruntime/int8,openvino/int8"


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="optimize tinyshapes to ONNX Runtime and OpenVINO engines and evaluate them "
                                    "(the main command)",
                       description="Optimize SRC into engines (default: ONNX Runtime fp32 and int8, OpenVINO int8), "
                                   "then evaluate them against the diffusers PyTorch baseline and the peers "
                                   "(latency, quality, prompt adherence) and write a report. The summary's 'vs peer' "
                                   "column gives each engine's denoiser step speed relative to the fastest peer. A "
                                   "variant whose runtime is not installed (OpenVINO without the openvino extra) is "
                                   "skipped with the reason. Needs no network: tinyshapes ships with diffaccel.",
                       epilog="Example: diffaccel demo -o runs/demo   then open runs/demo/report/report.html")
    p.add_argument("--src", default="tinyshapes", help="checkpoint or built-in (default tinyshapes)")
    p.add_argument("-o", "--out", default="runs/demo", help="folder for the engines and the report (default "
                                                            "runs/demo)")
    p.add_argument("--variants", default=VARIANTS, metavar="BACKEND/PRECISION,...",
                   help=f"engines to build, each into OUT/engines/SRC-BACKEND-PRECISION (default {VARIANTS}); "
                        "one whose backend is not installed here is skipped with the reason")
    p.add_argument("--steps", default="20", help="denoising steps (several make a steps sweep; default 20)")
    p.add_argument("--seeds", default="0,1", help="seeds (default 0,1)")
    p.add_argument("--peers", default="torch-bf16", help="what a user would run instead, evaluated beside the engines "
                                                         "(default torch-bf16; optimum-intel-bf16 and "
                                                         "optimum-intel-int8 with the openvino-peer extra; '' for "
                                                         "none)")
    p.add_argument("--batch-sizes", default="1,2,4", help="throughput batch sizes (default 1,2,4)")
    p.add_argument("--guidance", type=guidance_arg, default=None, metavar="SCALE|off",
                   help=GUIDANCE_HELP + "; the engines are built for it and calibrated at it")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every variant")
    p.set_defaults(func=_cmd_demo)


def variant_configs(text: str, threads: "int | None", guidance: "float | None" = None) -> dict:
    """{"backend/precision": OptimizeConfig} for ``--variants``, in the order given, built for ``guidance`` (None:
    the source's, by optimize's one rule; int8 calibrates at it); a bad or repeated item is a one-line
    :class:`DiffaccelError` listing the supported pairs."""
    from diffaccel.optimize import OptimizeConfig
    from diffaccel.optimize.cli.args import comma_list
    from diffaccel.optimize.stages.plans import supported_pairs

    configs = {}
    for item in comma_list(text, "--variants", what="backend/precision pairs", example=VARIANTS):
        backend, _, precision = item.partition("/")
        try:
            cfg = OptimizeConfig(backend=backend.strip(), precision=precision.strip(), threads=threads,
                                 guidance=guidance)
        except ValueError:
            raise DiffaccelError(f"bad --variants item {item!r}: give comma-separated BACKEND/PRECISION pairs, "
                                 f"supported: {supported_pairs()}") from None
        key = f"{cfg.backend}/{cfg.precision}"
        if key in configs:
            raise DiffaccelError(f"bad --variants {text!r}: {key} is given twice")
        configs[key] = cfg
    return configs


def demo_configs(args):
    """The demo's optimize configs ({"backend/precision": OptimizeConfig}) and its evaluation config, from the
    parsed arguments."""
    from diffaccel.optimize.cli.args import comma_list
    from diffaccel.eval.harness.evaluate import EvalConfig

    configs = variant_configs(args.variants, args.threads, args.guidance)   # None: the artifacts' built guidance
    try:
        eval_cfg = EvalConfig(steps=comma_list(args.steps, "--steps", int),
                              seeds=comma_list(args.seeds, "--seeds", int),
                              peers=comma_list(args.peers, "--peers", empty_ok=True),
                              batch_sizes=comma_list(args.batch_sizes, "--batch-sizes", int), threads=args.threads,
                              guidance_scale=args.guidance)
    except ValueError as e:
        raise DiffaccelError(str(e)) from None
    return configs, eval_cfg


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def unavailable(cfg) -> "str | None":
    """Why this machine cannot build ``cfg``, or None: its backend's optional package (named like the backend:
    openvino, tensorrt) is not installed, or a stage's preflight refuses (bf16 on a CPU without it, no GPU)."""
    from diffaccel.engines.base import EXTRAS
    from diffaccel.optimize.stages.plans import stages_for

    backend = str(cfg.backend)
    if backend in EXTRAS and not _importable(backend):
        return f'{backend} is not installed; pip install -e ".[{EXTRAS[backend]}]" adds it'
    try:
        for cls in stages_for(cfg.backend, cfg.precision):
            cls.preflight(cfg)
    except BackendUnavailableError as e:
        return one_line(e)
    return None


def buildable(configs: dict) -> "tuple[dict, list]":
    """The configs this machine can build, and one "skip VARIANT: why" line per other one. Nothing buildable is a
    one-line DiffaccelError with every reason."""
    why = {k: unavailable(cfg) for k, cfg in configs.items()}
    skipped = [f"skip {k}: {reason}" for k, reason in why.items() if reason]
    if len(skipped) == len(configs):
        raise DiffaccelError(f"nothing to build: {'; '.join(skipped)}")
    return {k: cfg for k, cfg in configs.items() if not why[k]}, skipped


def _cmd_demo(args) -> int:
    from diffaccel.optimize import optimize
    from diffaccel.optimize.cli.progress import ConsoleReporter

    from diffaccel.eval.harness.evaluate import evaluate
    from diffaccel.eval.report.tables import format_summary

    out = Path(args.out)
    configs, eval_cfg = demo_configs(args)
    configs, skipped = buildable(configs)
    for line in skipped:
        print(f"== {line}", flush=True)
    reporter = ConsoleReporter()
    artifacts, t0 = [], time.perf_counter()
    try:
        for variant, cfg in configs.items():
            target = out / "engines" / f"{args.src.replace(':', '_').replace('/', '_')}-{cfg.backend}-{cfg.precision}"
            print(f"== optimize {args.src} -> {target} ({variant})", flush=True)
            optimize(args.src, target, cfg, reporter=reporter)
            artifacts.append(target)
        print(f"== evaluate {len(artifacts)} artifact(s) against the PyTorch baseline", flush=True)
        report = evaluate(artifacts, args.src, eval_cfg, out / "report", reporter=reporter)
    finally:
        reporter.close()
    print(format_summary(report))
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    print(f"report: {out / 'report' / 'report.html'}  (also report.md, report.json)")
    return 0
