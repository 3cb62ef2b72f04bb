"""``diffaccel eval``: argparse wiring and console output; the measurement lives in :mod:`diffaccel.eval.harness.evaluate`.

Heavy imports happen inside the command, so ``diffaccel --help`` stays fast."""
from __future__ import annotations

from diffaccel.engines.pipelines.cache import CACHE_HELP
from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.cli.args import GUIDANCE_HELP, guidance_arg

EXAMPLE = ("Example: diffaccel eval out/tiny-fp32 out/tiny-int8 --steps 10,20 --peers torch-bf16 -o runs/eval   "
           "(docs/eval.md)")


SUMMARY = "latency and quality of artifacts against the diffusers baseline, side by side"
DESCRIPTION = ("Generate the same prompts with the same seeds and scheduler on the diffusers fp32 baseline, optional "
               "peers (torch bf16/fp16/compile, optimum-intel) and each artifact; report the denoiser's (U-Net's or "
               "transformer's) per-step latency distribution, stage times, throughput per batch size and memory next to PSNR/SSIM/latent error "
               "against the baseline (LPIPS, CLIP score, FID with local weights; prompt adherence on tinyshapes). "
               "Writes report.json, report.md and a self-contained report.html.")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help=SUMMARY, description=DESCRIPTION, epilog=EXAMPLE)
    p.add_argument("artifacts", nargs="*", metavar="OUT[@cache=SPEC]",
                   help="artifact directories made by diffaccel optimize; OUT@cache=SPEC runs one with that step "
                        "cache (repeat OUT with other SPECs, or @cache=off, to compare them side by side)")
    p.add_argument("-o", "--out", required=True, metavar="REPORT_DIR", help="report folder (replaced if it holds a "
                                                                            "report)")
    p.add_argument("--baseline", default=None, metavar="SRC", help="the checkpoint to compare with (default: the "
                                                                   "source recorded in the first OUT)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text file, one prompt per line (default: 8 "
                                                                   "shipped prompts)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", default="20", help="denoising steps; several (10,20,30,50) make a steps sweep, the "
                                                 "largest is the headline (default 20)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--batch-sizes", default="1,2,4", help="throughput batch sizes (default 1,2,4)")
    p.add_argument("--scheduler", default=None, help="diffusers scheduler class or alias for every variant, e.g. "
                                                     "EulerDiscreteScheduler, euler-a, dpm++ (default: the baseline's)")
    p.add_argument("--guidance", type=guidance_arg, default=None, metavar="SCALE|off",
                   help=GUIDANCE_HELP + "; artifacts built for different ones are all run at the first's")
    p.add_argument("--peers", default="", help="extra rows a user might try instead: torch-bf16, torch-fp16, "
                                               "torch-compile, optimum-intel-fp32, optimum-intel-bf16, "
                                               "optimum-intel-int8 (comma-separated; optimum-intel: docs/openvino.md)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per batch size (default 3)")
    p.add_argument("--device", default="cpu", help="where the PyTorch baseline and peers run: cpu | cuda")
    p.add_argument("--provider", default=None, help="ONNX Runtime provider for artifacts (default: as built)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and ONNX Runtime alike")
    p.add_argument("--cache", default=None, metavar="SPEC", help="step cache for every OUT built with --step-cache "
                                                                 "that has no @cache= of its own; " + CACHE_HELP)
    q = p.add_argument_group("learned metrics (local weights only; nothing is downloaded)")
    q.add_argument("--clip-model", default=None, metavar="DIR", help="Hugging Face CLIP folder -> CLIP score")
    q.add_argument("--inception", default=None, metavar="PATH", help="TorchScript Inception (inception-2015-12-05"
                                                                     ".pt) -> FID")
    q.add_argument("--lpips", default=None, metavar="PATH", help="TorchScript LPIPS module -> LPIPS")
    a = q.add_mutually_exclusive_group()
    a.add_argument("--adherence", dest="adherence", action="store_true", default=None,
                   help="score prompt adherence with the tinyshapes checker (default: on for tinyshapes)")
    a.add_argument("--no-adherence", dest="adherence", action="store_false")
    p.add_argument("--allow-different-source", action="store_true", help="compare artifacts built from other "
                                                                         "weights than the baseline")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickle checkpoint as --baseline")
    p.add_argument("--config", default=None, help="diffusers config folder for a single-file --baseline")
    p.add_argument("--bench", action="append", default=[], metavar="BENCH_DIR",
                   help="link a diffaccel bench result folder into the report (repeatable)")
    p.add_argument("--render-only", action="store_true", help="only rebuild report.md/.html from REPORT_DIR's "
                                                              "report.json")
    p.set_defaults(func=_cmd_eval)


def config_from_args(args):
    from diffaccel.optimize.cli.args import comma_list
    from diffaccel.optimize.sources.prompts import read_prompts

    from diffaccel.eval.harness.evaluate import EvalConfig

    try:
        return EvalConfig(
            prompts=read_prompts(args.prompts) if args.prompts else (), seeds=comma_list(args.seeds, "--seeds", int),
            steps=comma_list(args.steps, "--steps", int), height=args.height, width=args.width,
            batch_sizes=comma_list(args.batch_sizes, "--batch-sizes", int), scheduler=args.scheduler,
            guidance_scale=args.guidance, peers=comma_list(args.peers, "--peers", empty_ok=True),
            warmup=args.warmup, repeat=args.repeat, device=args.device, provider=args.provider, threads=args.threads,
            clip_model=args.clip_model, inception=args.inception, lpips=args.lpips, adherence=args.adherence,
            allow_different_source=args.allow_different_source, bench=tuple(args.bench), cache=args.cache)
    except ValueError as e:
        raise DiffaccelError(str(e)) from None


def _cmd_eval(args) -> int:
    from pathlib import Path

    from diffaccel.eval.report.write import load_report, render_report
    from diffaccel.eval.report.tables import format_summary

    out = Path(args.out)
    if args.render_only:
        paths = render_report(out / "report.json", out)
        print(format_summary(load_report(out)))
        print(f"report: {paths['html']}  (rebuilt from {out / 'report.json'})")
        return 0
    from diffaccel.optimize.cli.progress import ConsoleReporter

    from diffaccel.eval.harness.evaluate import evaluate

    config = config_from_args(args)
    reporter = ConsoleReporter()
    try:
        report = evaluate(args.artifacts, args.baseline, config, out, reporter=reporter,
                          trust_pickle=args.trust_pickle, single_file_config=args.config)
    finally:
        reporter.close()
    print(format_summary(report))
    print(f"report: {out / 'report.html'}  (also report.md, report.json, images/)")
    return 0
