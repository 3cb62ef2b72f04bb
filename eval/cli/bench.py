"""``diffaccel bench``: argparse wiring and console output; the measurement lives in ``bench_runner``.

Heavy imports happen inside the command, so ``diffaccel --help`` stays fast."""
from __future__ import annotations

import sys

from diffaccel.optimize.artifact.errors import DiffaccelError


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="load benchmark with dynamic batching: latency vs throughput",
        description="Serve generated requests with an in-process dynamic-batching loop on the artifact's engines and "
                    "measure per-request queue wait, service time and latency, throughput, batch sizes and "
                    "utilization, next to the capacity a simple model predicts. Sweep rates x max batch x timeout "
                    "and pick the fastest configuration meeting a p95 SLO. Writes bench.json, bench.md, bench.png.",
        epilog="Example: diffaccel bench out/tiny -o runs/bench --sweep-rates 0.5x,1x,2x --sweep-max-batch 1,4 "
               "--slo-p95 1.0   (docs/bench.md)")
    p.add_argument("artifact", help="artifact directory made by diffaccel optimize")
    p.add_argument("-o", "--out", required=True, help="benchmark folder to write (replaced if it holds a benchmark)")
    load = p.add_argument_group("load (one run)")
    how = load.add_mutually_exclusive_group()
    how.add_argument("--rate", default=None, help="Poisson arrivals in requests/s (2.5), or a multiple of the "
                                                  "measured batch-1 capacity (1x); default 1x")
    how.add_argument("--concurrency", type=int, default=None, help="closed-loop clients, each sending its next "
                                                                    "request when the previous one returns")
    size = load.add_mutually_exclusive_group()
    size.add_argument("--requests", type=int, default=None, help="requests per run (default 48)")
    size.add_argument("--duration", type=float, default=None, help="admit requests for this many seconds, "
                                                                  "then drain the queue")
    load.add_argument("--time-limit", type=float, default=300.0,
                      help="hard cap per run in seconds; requests still queued then are reported unserved "
                           "(default 300)")
    pol = p.add_argument_group("batching policy: dispatch when B requests wait or the oldest waited MS")
    pol.add_argument("--max-batch", type=int, default=4, help="B (default 4)")
    pol.add_argument("--batch-timeout", type=float, default=100.0, metavar="MS", help="MS (default 100; 0: never "
                                                                                      "wait for a batch to fill)")
    work = p.add_argument_group("workload")
    work.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    work.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    work.add_argument("--width", type=int, default=None)
    work.add_argument("--guidance", type=float, default=7.5)
    work.add_argument("--prompts", default=None, metavar="FILE", help="text file, one prompt per line, used in turn")
    work.add_argument("--seed", type=int, default=0, help="seeds arrivals; request i uses seed+i")
    work.add_argument("--provider", default=None, help="ONNX Runtime provider (default: the one built for)")
    work.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    work.add_argument("--calib-repeats", type=int, default=3, help="timed calls per batch size when calibrating; "
                                                                     "the median is used (default 3)")
    sw = p.add_argument_group("sweep (every combination; an axis left out keeps the one-run value)")
    sw.add_argument("--sweep-rates", default=None, metavar="LIST", help="e.g. 0.5x,1x,2x or 1,2,4 (requests/s)")
    sw.add_argument("--sweep-max-batch", default=None, metavar="LIST", help="e.g. 1,2,4")
    sw.add_argument("--sweep-timeout-ms", default=None, metavar="LIST", help="e.g. 0,100,500")
    sw.add_argument("--slo-p95", type=float, default=None, metavar="SECONDS",
                    help="pick the highest-throughput configuration whose p95 latency is at most this")
    p.set_defaults(func=_cmd_bench)


def _configs(args):
    from diffaccel.optimize.cli.args import comma_list

    from diffaccel.eval.loadbench.loop import LoadConfig, parse_rate
    from diffaccel.eval.loadbench.runner import SweepConfig

    try:
        rate, relative = parse_rate(args.rate or "1x") if args.concurrency is None else (None, False)
        base = LoadConfig(rate=rate, rate_relative=relative, concurrency=args.concurrency,
                          requests=args.requests if args.requests is not None or args.duration is not None
                          else LoadConfig.requests,
                          duration_s=args.duration, max_batch=args.max_batch, timeout_ms=args.batch_timeout,
                          steps=args.steps, height=args.height, width=args.width, guidance=args.guidance,
                          seed=args.seed, time_limit_s=args.time_limit)
        sweep = SweepConfig(rates=comma_list(args.sweep_rates, "--sweep-rates", what="rates", example="0.5x,1x,2x"),
                            max_batches=comma_list(args.sweep_max_batch, "--sweep-max-batch", int, example="1,2,4"),
                            timeouts_ms=comma_list(args.sweep_timeout_ms, "--sweep-timeout-ms", float,
                                                   example="0,100,500"),
                            slo_p95_s=args.slo_p95)
        sweep.points(base)
    except ValueError as e:
        raise DiffaccelError(str(e)) from None
    if args.calib_repeats < 1:
        raise DiffaccelError(f"--calib-repeats {args.calib_repeats} must be >= 1")
    return base, sweep


def _progress(index: int, total: int, run: dict) -> None:
    from diffaccel.eval.loadbench.report import format_table, table_row

    if total > 1:
        header, line = format_table([table_row(run["point"], run["metrics"])])
        if index == 0:
            print(f"{'':8}{header}", file=sys.stderr)
        print(f"[{index + 1:>2}/{total}] {line}", file=sys.stderr, flush=True)


def _cmd_bench(args) -> int:
    from pathlib import Path

    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.sources.prompts import read_prompts

    from diffaccel.eval.loadbench.report import check_out, format_console, write_bench_dir
    from diffaccel.eval.loadbench.runner import run_bench

    base, sweep = _configs(args)
    prompts = read_prompts(args.prompts) if args.prompts is not None else ()
    Manifest.load(args.artifact)          # a missing or foreign folder fails here, in one line
    if Path(args.out).resolve() == Path(args.artifact).resolve():
        raise DiffaccelError("-o must be a new folder, not the artifact itself")
    check_out(args.out)
    n = len(sweep.points(base))
    print(f"loading {args.artifact}, calibrating, then {n} run(s) ...", file=sys.stderr, flush=True)
    result = run_bench(args.artifact, base, sweep, prompts=prompts, provider=args.provider, threads=args.threads,
                       calib_repeats=args.calib_repeats, on_run=_progress)
    out = write_bench_dir(result, args.out)
    print(format_console(result))
    print(f"wrote {out}/bench.json, bench.md, bench.png")
    return 0
