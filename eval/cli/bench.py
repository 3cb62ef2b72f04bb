"""``diffaccel bench``: argparse wiring and console output; the measurement lives in ``bench_runner``.

Heavy imports happen inside the command, so ``diffaccel --help`` stays fast."""
from __future__ import annotations

import sys

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.engines.pipelines.cache import CACHE_HELP
from diffaccel.optimize.cli.args import GUIDANCE_HELP, guidance_arg


SUMMARY = "load benchmark with dynamic batching: latency vs throughput"
DESCRIPTION = ("Serve generated requests with an in-process dynamic-batching loop on the artifact's engines and "
               "measure per-request queue wait, service time and latency, throughput, batch sizes and utilization, "
               "next to the capacity a simple model predicts. Sweep rates x max batch x timeout and pick the fastest "
               "configuration meeting a p95 SLO. Writes bench.json, bench.md, bench.png.")
EXAMPLE = ("Example: diffaccel bench out/tiny -o runs/bench --sweep-rates 0.5x,1x,2x --sweep-max-batch 1,4 "
           "--slo-p95 1.0   (docs/bench.md)")


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help=SUMMARY, description=DESCRIPTION, epilog=EXAMPLE)
    p.add_argument("artifact", nargs="?", default=None, help="artifact directory made by diffaccel optimize (or "
                                                              "--url for a running server)")
    p.add_argument("-o", "--out", required=True, help="benchmark folder to write (replaced if it holds a benchmark)")
    _add_load_args(p)
    _add_policy_args(p)
    _add_workload_args(p)
    _add_sweep_args(p)
    _add_server_args(p)
    _add_vs_server_args(p)
    p.set_defaults(func=_cmd_bench)


def _add_load_args(p) -> None:
    """One run's load: open-loop arrivals at a rate or closed-loop clients, for a count or a time."""
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


def _add_policy_args(p) -> None:
    """The batching policy of the in-process loop."""
    pol = p.add_argument_group("batching policy: dispatch when B requests wait or the oldest waited MS")
    pol.add_argument("--max-batch", type=int, default=4, help="B (default 4)")
    pol.add_argument("--batch-timeout", type=float, default=100.0, metavar="MS", help="MS (default 100; 0: never "
                                                                                      "wait for a batch to fill)")


def _add_workload_args(p) -> None:
    """What each request asks for, and how the engines are loaded and timed."""
    work = p.add_argument_group("workload")
    work.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    work.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    work.add_argument("--width", type=int, default=None)
    work.add_argument("--guidance", type=guidance_arg, default=None, metavar="SCALE|off",
                      help=GUIDANCE_HELP + "; with --url: the server's, which follows the same rule")
    work.add_argument("--prompts", default=None, metavar="FILE", help="text file, one prompt per line, used in turn")
    work.add_argument("--seed", type=int, default=0, help="seeds arrivals; request i uses seed+i")
    work.add_argument("--provider", default=None, help="ONNX Runtime provider (default: the one built for)")
    work.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    work.add_argument("--cache", default=None, metavar="SPEC", help=CACHE_HELP + "; refused with --url and "
                      "--vs-server: a server's cache is its own (diffaccel serve --cache)")
    work.add_argument("--calib-repeats", type=int, default=3, help="timed calls per batch size when calibrating; "
                                                                     "the median is used (default 3)")


def _add_sweep_args(p) -> None:
    """The sweep over rates, max batch and timeouts, and the p95 SLO that picks one."""
    sw = p.add_argument_group("sweep (every combination; an axis left out keeps the one-run value)")
    sw.add_argument("--sweep-rates", default=None, metavar="LIST", help="e.g. 0.5x,1x,2x or 1,2,4 (requests/s)")
    sw.add_argument("--sweep-max-batch", default=None, metavar="LIST", help="e.g. 1,2,4")
    sw.add_argument("--sweep-timeout-ms", default=None, metavar="LIST", help="e.g. 0,100,500")
    sw.add_argument("--slo-p95", type=float, default=None, metavar="SECONDS",
                    help="pick the highest-throughput configuration whose p95 latency is at most this")


def _add_server_args(p) -> None:
    """A running server over HTTP instead of ARTIFACT, and the capacity plan."""
    h = p.add_argument_group("a running server over HTTP (diffaccel serve, embedded or --ray): --url instead of "
                             "ARTIFACT; the server's batching policy is its own")
    h.add_argument("--url", default=None, help="e.g. http://127.0.0.1:8000")
    h.add_argument("--mode", default="jobs", help="jobs (POST /v1/jobs + event stream; default) | sync "
                                                  "(POST /v1/images/generations)")
    h.add_argument("--mix", default=None, metavar="FILE", help="request mix JSON: weighted classes of size, steps, "
                                                               "prompt_words, scheduler, n (docs/serving.md)")
    h.add_argument("--arrivals", default="poisson", help="open-loop arrivals: poisson (default) | constant | "
                                                         "trace (with --trace)")
    h.add_argument("--trace", default=None, metavar="FILE", help="recorded arrivals: 'SECONDS [CLASS]' per line")
    h.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default 300)")
    h.add_argument("--target-rate", type=float, default=None, metavar="RPS",
                   help="capacity plan: requests/s to serve within --slo-p95")
    h.add_argument("--price-per-hour", type=float, default=None, help="capacity plan: price of one replica-hour")
    h.add_argument("--measured-replicas", type=int, default=1, help="replicas behind --url (default 1)")


def _add_vs_server_args(p) -> None:
    """The embedded server's overhead, measured against the in-process loop."""
    v = p.add_argument_group("the embedded server's overhead, with ARTIFACT")
    v.add_argument("--vs-server", type=int, default=None, metavar="ROUNDS",
                   help="also start diffaccel serve ARTIFACT on the loopback and alternate ROUNDS in-process and HTTP "
                        "(sync) runs with the same closed-loop clients (--concurrency, default 4), batching policy, "
                        "steps and prompts; prints the throughput ratio HTTP / in-process and the added latency")


def _guidance(args) -> float:
    """--guidance, else the one the artifact was built for (every command's rule)."""
    from diffaccel.optimize.artifact.manifest import Manifest

    return Manifest.load(args.artifact).built_guidance if args.guidance is None else args.guidance


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
                          steps=args.steps, height=args.height, width=args.width, guidance=_guidance(args),
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

    if (args.artifact is None) == (args.url is None):
        raise DiffaccelError("give an artifact folder (in-process benchmark) or --url of a running server, not both")
    if args.vs_server is not None:
        _vs_server_args(args)
    if args.cache is not None and (args.url is not None or args.vs_server is not None):
        raise DiffaccelError("--cache sets the in-process pipeline's step cache; a server's is its own: start it "
                             "with diffaccel serve OUT --cache SPEC and bench it with --url")
    if args.url is not None:
        return _cmd_bench_url(args)
    base, sweep = _configs(args)
    prompts = read_prompts(args.prompts) if args.prompts is not None else ()
    from diffaccel.engines.pipelines.cache import cache_for

    cache = cache_for(args.artifact, Manifest.load(args.artifact), args.cache)   # one line if it cannot be run
    if Path(args.out).resolve() == Path(args.artifact).resolve():
        raise DiffaccelError("-o must be a new folder, not the artifact itself")
    check_out(args.out)
    if args.vs_server is not None:
        return _cmd_vs_server(args, base, prompts)
    n = len(sweep.points(base))
    print(f"loading {args.artifact}, calibrating, then {n} run(s) ...", file=sys.stderr, flush=True)
    result = run_bench(args.artifact, base, sweep, prompts=prompts, provider=args.provider, threads=args.threads,
                       calib_repeats=args.calib_repeats, on_run=_progress, cache=cache)
    out = write_bench_dir(result, args.out)
    print(format_console(result))
    print(f"wrote {out}/bench.json, bench.md, bench.png")
    return 0


def _http_configs(args):
    from diffaccel.optimize.cli.args import comma_list

    from diffaccel.eval.loadbench.http import HttpLoadConfig
    from diffaccel.eval.loadbench.loop import parse_rate
    from diffaccel.eval.loadbench.mix import RequestMix

    if args.sweep_max_batch or args.sweep_timeout_ms:
        raise DiffaccelError("--sweep-max-batch and --sweep-timeout-ms set the in-process batcher; with --url the "
                             "server's policy applies (diffaccel serve --max-batch/--max-wait-ms)")
    try:
        rate, relative = parse_rate(args.rate or "1x") if args.concurrency is None else (None, False)
        cfg = HttpLoadConfig(url=args.url, mode=args.mode, arrivals=args.arrivals, rate=rate, rate_relative=relative,
                             concurrency=args.concurrency, trace=args.trace,
                             requests=args.requests if args.requests is not None or args.duration is not None
                             else 48, duration_s=args.duration, steps=args.steps,
                             guidance=args.guidance, seed=args.seed,
                             request_timeout_s=args.request_timeout, time_limit_s=args.time_limit)
        rates = comma_list(args.sweep_rates, "--sweep-rates", what="rates", example="0.5x,1x,2x") or ()
        for r in rates:
            parse_rate(r)
        mix = RequestMix.load(args.mix) if args.mix else None
    except ValueError as e:
        raise DiffaccelError(str(e)) from None
    if args.measured_replicas < 1:
        raise DiffaccelError(f"--measured-replicas {args.measured_replicas} must be >= 1")
    return cfg, mix, rates


def _http_progress(index: int, total: int, run: dict) -> None:
    o = run["metrics"]["overall"]
    print(f"[{index + 1}/{total}] {run['point']['load']}: {o['served']}/{o['requests']} served, "
          f"{o['throughput_img_min']:.0f} images/min, e2e p95 {o['e2e']['p95'] or 0:.3f} s, "
          f"429s {o['rejected_429']}", file=sys.stderr, flush=True)


def _cmd_bench_url(args) -> int:
    from diffaccel.optimize.sources.prompts import default_prompts, read_prompts

    from diffaccel.eval.loadbench.http import run_http_bench
    from diffaccel.eval.loadbench.http_report import format_console, write_http_bench
    from diffaccel.eval.loadbench.report import check_out

    try:
        import httpx  # noqa: F401
    except ImportError:
        raise DiffaccelError('diffaccel bench --url needs httpx: pip install -e ".[serve]"') from None
    cfg, mix, rates = _http_configs(args)
    check_out(args.out)
    prompts = read_prompts(args.prompts) if args.prompts is not None else default_prompts("tinyshapes")
    try:
        result = run_http_bench(cfg, mix, prompts, rates, calib_repeats=args.calib_repeats, slo_p95_s=args.slo_p95,
                                target_rps=args.target_rate, price_per_hour=args.price_per_hour,
                                measured_replicas=args.measured_replicas, on_run=_http_progress)
    except (RuntimeError, ValueError) as e:
        raise DiffaccelError(str(e)) from None
    out = write_http_bench(result, args.out)
    print(format_console(result))
    print(f"wrote {out}/bench.json, bench.md, bench.png")
    return 0


def _vs_server_args(args) -> None:
    """--vs-server: closed-loop clients for a number of requests at the model's size, one policy; else one line."""
    if args.vs_server < 1:
        raise DiffaccelError(f"--vs-server {args.vs_server}: give the number of rounds, >= 1")
    given = {"--url": args.url, "--rate": args.rate, "--duration": args.duration, "--height": args.height,
             "--width": args.width, "--provider": args.provider, "--sweep-rates": args.sweep_rates,
             "--sweep-max-batch": args.sweep_max_batch, "--sweep-timeout-ms": args.sweep_timeout_ms,
             "--slo-p95": args.slo_p95}
    extra = [flag for flag, value in given.items() if value is not None]
    if extra:
        raise DiffaccelError(f"--vs-server runs closed-loop clients (--concurrency) for --requests at the model's "
                             f"size and the built provider, one policy, on ARTIFACT; drop {', '.join(extra)}")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise DiffaccelError('diffaccel bench --vs-server needs the serve extra: pip install -e ".[serve]"') from None
    args.concurrency = args.concurrency or 4


def _cmd_vs_server(args, base, prompts) -> int:
    from diffaccel.eval.loadbench import overhead
    from diffaccel.eval.loadbench.report import write_bench_dir

    print(f"starting diffaccel serve {args.artifact}, loading it here, then {args.vs_server} round(s) of each ...",
          file=sys.stderr, flush=True)
    result = overhead.run_vs_server(args.artifact, base, args.vs_server, prompts, threads=args.threads,
                                    on_round=lambda i, r: print(overhead.format_round(i, r), file=sys.stderr,
                                                                flush=True))
    out = write_bench_dir(result, args.out, markdown=overhead.to_markdown, draw=overhead.plot)
    print(overhead.format_console(result))
    print(f"wrote {out}/bench.json, bench.md, bench.png")
    return 0
