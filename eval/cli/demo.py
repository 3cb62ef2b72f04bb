"""``diffaccel demo``: the README's main command. Optimize a model (tinyshapes by default, shipped with diffaccel)
into ONNX Runtime fp32 and int8 engines, evaluate both against the PyTorch baseline on the same prompts and seeds,
and say where the report is. Finished stages are skipped on re-runs."""
from __future__ import annotations

import time
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="optimize tinyshapes to fp32 + int8 engines and evaluate them (the main command)",
                       description="Optimize SRC into ONNX Runtime fp32 and int8 engines, then evaluate both against "
                                   "the diffusers PyTorch baseline (latency, quality, prompt adherence) and write a "
                                   "report. Needs no network: tinyshapes ships with diffaccel.",
                       epilog="Example: diffaccel demo -o runs/demo   then open runs/demo/report/report.html")
    p.add_argument("--src", default="tinyshapes", help="checkpoint or built-in (default tinyshapes)")
    p.add_argument("-o", "--out", default="runs/demo", help="folder for the engines and the report (default "
                                                            "runs/demo)")
    p.add_argument("--precisions", default="fp32,int8", help="onnxruntime precisions to build (default fp32,int8)")
    p.add_argument("--steps", default="20", help="denoising steps (several make a steps sweep; default 20)")
    p.add_argument("--seeds", default="0,1", help="seeds (default 0,1)")
    p.add_argument("--peers", default="torch-bf16", help="extra PyTorch rows (default torch-bf16; '' for none)")
    p.add_argument("--batch-sizes", default="1,2,4", help="throughput batch sizes (default 1,2,4)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the built-in's recommended one, 2.0 for "
                        "tinyshapes; 7.5 for other sources)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every variant")
    p.set_defaults(func=_cmd_demo)


def demo_configs(args):
    """The demo's optimize configs (one per precision) and its evaluation config, from the parsed arguments."""
    from diffaccel.optimize import OptimizeConfig
    from diffaccel.optimize.cli.args import comma_list
    from diffaccel.optimize.sources.builtins import recommended_guidance

    from diffaccel.eval.harness.evaluate import EvalConfig

    precisions = comma_list(args.precisions, "--precisions", empty_ok=True, what="precisions", example="fp32,int8")
    guidance = recommended_guidance(args.src) if args.guidance is None else args.guidance
    try:
        configs = {p: OptimizeConfig(precision=p, threads=args.threads) for p in precisions}
        eval_cfg = EvalConfig(steps=comma_list(args.steps, "--steps", int),
                              seeds=comma_list(args.seeds, "--seeds", int),
                              peers=comma_list(args.peers, "--peers", empty_ok=True),
                              batch_sizes=comma_list(args.batch_sizes, "--batch-sizes", int), threads=args.threads,
                              guidance_scale=guidance)
    except ValueError as e:
        raise DiffaccelError(str(e)) from None
    return configs, eval_cfg


def _cmd_demo(args) -> int:
    from diffaccel.optimize import optimize
    from diffaccel.optimize.cli.progress import ConsoleReporter

    from diffaccel.eval.harness.evaluate import evaluate
    from diffaccel.eval.report.tables import format_summary

    out = Path(args.out)
    configs, eval_cfg = demo_configs(args)
    reporter = ConsoleReporter()
    artifacts, t0 = [], time.perf_counter()
    try:
        for precision, cfg in configs.items():
            target = out / "engines" / f"{args.src.replace(':', '_').replace('/', '_')}-onnxruntime-{precision}"
            print(f"== optimize {args.src} -> {target} (onnxruntime/{precision})", flush=True)
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
