"""Subcommands of ``diffaccel`` that measure: ``microbench``, ``eval``, ``bench`` and ``demo``.

Only argparse wiring lives here; heavy imports happen inside the commands."""
from __future__ import annotations

import json


def add_microbench(sub) -> None:
    p = sub.add_parser("microbench", help="denoiser (U-Net or transformer) step latency of several variants, "
                                          "side by side",
                       description="Time one denoising step of the U-Net or transformer for each variant "
                                   "(backend/precision) on identical inputs in one run, and print the ratio of each to the first. By default each "
                                   "variant runs in its own process, two passes in alternating order; the table "
                                   "shows each pass and the median of the medians, and the CPU (ISA, AMX).")
    p.add_argument("src", nargs="?", default="random:sd15", help="checkpoint or built-in (default random:sd15)")
    p.add_argument("--variants", default="torch/fp32,onnxruntime/fp32",
                   help="comma-separated backend/precision list; the first is the reference; optimum-intel/fp32, "
                        "/bf16 and /int8 are the optimum-intel peer (diffaccel[openvino-peer], docs/openvino.md); "
                        "+int8-scores / +float-scores change an int8 build's attention scores; "
                        "onnxruntime/fp32+unfused-attention runs that build's export with attention unfused")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="denoiser input batch (2 = one image with guidance)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--isolation", choices=("process", "interleaved"), default="process",
                   help="process (default): each variant in its own process, --passes passes in alternating order, "
                        "median of the per-pass medians; interleaved: all in this process, one call each per round")
    p.add_argument("--passes", type=int, default=2, help="passes over the variants with --isolation process")
    p.add_argument("--work", default="runs/microbench", help="where engines are built and cached")
    p.add_argument("--calib-size", type=int, default=None,
                   help="int8 builds: calibration prompts (default: optimize's, 8); fewer for SDXL-size models")
    p.add_argument("--calib-steps", type=int, default=None,
                   help="int8 builds: denoising steps captured per prompt (default: optimize's, 8)")
    p.add_argument("--json", default=None, help="also write the full record (samples, host, config) here")
    p.add_argument("--cache", default=None, metavar="SPEC", help="refused: a step cache saves whole steps across an "
                   "image, so one timed step cannot show it; use diffaccel eval OUT@cache=SPEC (whole images) or "
                   "tools/step_cache_bench.py (docs/step-cache.md)")
    p.set_defaults(func=_cmd_microbench)


def _cmd_microbench(args) -> int:
    from diffaccel.optimize.artifact.errors import DiffaccelError
    from diffaccel.optimize.cli.args import comma_list
    from diffaccel.optimize.cli.progress import ConsoleReporter

    from diffaccel.eval.harness.host import describe
    from diffaccel.eval.harness.microbench import StepBenchConfig, format_table, run_step_bench

    if args.cache is not None:
        raise DiffaccelError(f"microbench --cache {args.cache}: microbench times one denoiser step, and a step cache "
                             "saves whole steps across an image; time it with diffaccel eval OUT OUT@cache=SPEC "
                             "(whole images) or tools/step_cache_bench.py")
    variants = comma_list(args.variants, "--variants", what="backend/precision pairs",
                          example="torch/fp32,onnxruntime/fp32")
    try:
        cfg = StepBenchConfig(src=args.src, variants=variants,
                              height=args.height, width=args.width, batch=args.batch, warmup=args.warmup,
                              repeat=args.repeat, work=args.work, threads=args.threads, isolation=args.isolation,
                              passes=args.passes, calib_size=args.calib_size, calib_steps=args.calib_steps)
    except ValueError as e:
        raise DiffaccelError(str(e)) from None
    result = run_step_bench(cfg, reporter=ConsoleReporter())
    print(format_table(result))
    if args.isolation == "interleaved":
        print(f"host: {describe(result['host'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"record: {args.json}")
    return 0


def register(sub) -> None:
    from diffaccel.eval.cli.bench import add_bench   # argparse wiring only; heavy imports stay inside the commands
    from diffaccel.eval.cli.demo import add_demo
    from diffaccel.eval.cli.evaluate import add_eval

    add_demo(sub)
    add_eval(sub)
    add_microbench(sub)
    add_bench(sub)
