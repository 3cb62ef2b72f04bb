"""The ``diffaccel`` command. The CLI owns the console: progress bars, tables, one-line errors (exit code 2)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from diffaccel.optimize.artifact.errors import DiffaccelError, disk_full, one_line
from diffaccel.optimize.cli.args import GUIDANCE_HELP, guidance_arg
from diffaccel.engines.pipelines.cache import CACHE_HELP, parse_cache
from diffaccel.engines.pipelines.schedulers import ALIASES
from diffaccel.optimize.config import Backend, Precision
from diffaccel.optimize.families import COMPONENTS
from diffaccel.optimize.stages.plans import supported_pairs

EPILOG = "Built-in sources: tinyshapes, random:tiny, random:sd15, random:sd21. Docs: README.md"


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def _choices(enum) -> str:
    return " | ".join(m.value for m in enum)


# ---- optimize --------------------------------------------------------------------------------------------------
def _add_optimize(sub) -> None:
    p = sub.add_parser("optimize", help="build accelerated engines from a checkpoint",
                       description="Load SRC, export its components to ONNX, optimize/quantize them and build engines "
                                   "into OUT (a directory with manifest.json). Re-running skips finished stages.",
                       epilog=EPILOG)
    p.add_argument("src", help="diffusers folder, .safetensors file, hub id, or built-in name")
    p.add_argument("-o", "--out", required=True, help="output artifact directory")
    p.add_argument("--backend", default="onnxruntime", help=f"{_choices(Backend)} (default onnxruntime; the pairs "
                                                            f"with --precision that build: {supported_pairs()})")
    p.add_argument("--precision", default="fp32", help=f"{_choices(Precision)} (default fp32)")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider: cpu (default) | cuda | tensorrt")
    p.add_argument("--batch", default="1-4", help="images per call the engines serve, N or MIN-MAX (default 1-4)")
    p.add_argument("--height", default=None, help="image height(s) in pixels, N or MIN-MAX (default: around the "
                                                   "model's native size)")
    p.add_argument("--width", default=None, help="image width(s) in pixels, N or MIN-MAX")
    p.add_argument("--exporter", default="dynamo", help="dynamo (default) | torchscript")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--graph-level", default="extended", help="ORT graph optimizations saved into the engine: "
                                                               "disable | basic | extended (default) | all")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace an OUT built from another source; rebuild all")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickle checkpoints (.ckpt/.bin/.pt): they "
                                                                "can run code when loaded")
    p.add_argument("--config", default=None, help="diffusers config folder for a single-file checkpoint (offline)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA .safetensors (diffusers or kohya format) into the denoiser (U-Net or transformer) and text encoders "
                        "before export, at SCALE (default 1); repeatable, fused in order")
    p.add_argument("--guidance", type=guidance_arg, default=None, metavar="SCALE|off",
                   help="the classifier-free guidance scale the engines will run at (default: a trained built-in's "
                        "recommended one, 2 for tinyshapes, 3 for tinyshapes-xl and -sd3, else the diffusers "
                        "pipeline's: 7.5 SD, 5 SDXL, 7 SD3, 3.5 FLUX). 1 or below (off = 0: SDXL-Turbo, LCM-LoRA) "
                        "builds the denoiser for one guidance half only, a batch range half as "
                        "large, and the drop-in pipelines refuse guidance_scale > 1; int8 calibrates at this scale")
    p.add_argument("--components", default=None, help="comma-separated subset to build (default: all the model has): "
                                                       + ", ".join(COMPONENTS))
    p.add_argument("--step-cache", type=int, nargs="?", const=0, default=None, metavar="BRANCH",
                   help="export the U-Net split for DeepCache at BRANCH (default 0: caches the most; generate --cache)")
    _add_int8_args(p)
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory the build may use, e.g. 16G (default: what the machine has available)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="build even when the estimated peak memory exceeds what is available")
    _add_tensorrt_args(p)
    p.set_defaults(func=_cmd_optimize)


def _add_int8_args(p) -> None:
    q = p.add_argument_group("int8 calibration and quantization")
    q.add_argument("--calib-prompts", default=None, help="text file, one calibration prompt per line")
    q.add_argument("--calib-size", type=int, default=8, help="calibration prompts used (default 8)")
    q.add_argument("--calib-steps", type=int, default=8, help="denoising steps captured per prompt (default 8)")
    q.add_argument("--calib-seed", type=int, default=0)
    q.add_argument("--calib-method", default="minmax", help="minmax (default) | percentile | entropy")
    q.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant activation/weight balancing strength 0..1 (default off)")
    q.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN",
                   help="regex of node names kept in float, in addition to the defaults (repeatable)")
    q.add_argument("--int8-weights", choices=("auto", "8bit", "7bit"), default="auto",
                   help="int8 weight range: 7bit keeps x86 CPUs without VNNI/AMX exact (their int8 kernels saturate "
                        "8-bit products); auto (default) picks 7bit on such a build machine, else 8bit; recorded in "
                        "the manifest")
    q.add_argument("--attention-scores", choices=("float", "int8"), default=None,
                   help="attention's score MatMul (QK^T, into the softmax) in float or int8 (default: the backend's; "
                        "float for onnxruntime, whose int8 softmax is slower)")
    q.add_argument("--quality-target", default=None, metavar="psnr=DB",
                   help="keep the most sensitive layers in float until the int8 denoiser keeps this PSNR")


def _add_tensorrt_args(p) -> None:
    t = p.add_argument_group("TensorRT")
    t.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default 3)")
    t.add_argument("--workspace-gb", type=float, default=None, help="tactic memory pool limit in GiB")
    t.add_argument("--timing-cache", default=None, help="timing cache file reused across builds")
    t.add_argument("--static-shapes", action="store_true", help="build for one shape (needed for CUDA graphs)")
    t.add_argument("--cuda-graph", action="store_true", help="capture CUDA graphs when running (static shapes)")


def _quality_target(text):
    if text is None:
        return None
    name, _, value = text.partition("=")
    try:
        if name.strip().lower() != "psnr":
            raise ValueError
        return float(value)
    except ValueError:
        raise DiffaccelError(f"bad --quality-target {text!r}; write psnr=DB, e.g. psnr=30") from None


def _cmd_optimize(args) -> int:
    from diffaccel.optimize.api import OptimizeConfig, optimize
    from diffaccel.optimize.config import QuantConfig, ShapeRange, TensorRTConfig
    from diffaccel.optimize.cli.args import comma_list
    from diffaccel.optimize.cli.progress import ConsoleReporter
    from diffaccel.optimize.stages.resources import parse_size

    try:
        quant = QuantConfig(calib_prompts=args.calib_prompts, calib_size=args.calib_size,
                            calib_steps=args.calib_steps, calib_seed=args.calib_seed, method=args.calib_method,
                            smoothquant=args.smoothquant, keep_fp32=tuple(args.keep_fp32),
                            quality_target=_quality_target(args.quality_target),
                            attention_scores=args.attention_scores, int8_weights=args.int8_weights)
        trt = TensorRTConfig(opt_level=args.opt_level, workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                             static_shapes=args.static_shapes, cuda_graph=args.cuda_graph)
        comps = comma_list(args.components, "--components", what="component names",
                           example="vae_decoder") if args.components else COMPONENTS
        cfg = OptimizeConfig(backend=args.backend, precision=args.precision, provider=args.provider,
                             shapes=ShapeRange.parse(args.batch, args.height, args.width), exporter=args.exporter,
                             opset=args.opset, graph_level=args.graph_level, threads=args.threads,
                             components=comps, quant=quant, tensorrt=trt,
                             memory_limit=parse_size(args.memory_limit) if args.memory_limit else None,
                             memory_check=not args.no_memory_check, guidance=args.guidance,
                             step_cache=args.step_cache)
    except ValueError as e:
        raise DiffaccelError(str(e)) from None
    src = args.src
    if args.lora:   # LoRAs are part of the source: checked and hashed before any work
        from diffaccel.optimize.sources import resolve_source

        src = resolve_source(args.src, trust_pickle=args.trust_pickle, single_file_config=args.config,
                             loras=args.lora)
    reporter = ConsoleReporter()
    t0 = time.perf_counter()
    manifest = optimize(src, args.out, cfg, force=args.force, reporter=reporter,
                        trust_pickle=args.trust_pickle, single_file_config=args.config)
    reporter.close()
    loras = f" + {len(manifest.source['loras'])} LoRA(s)" if manifest.source.get("loras") else ""
    print(f"built {manifest['backend']}/{manifest['precision']} engines for {manifest.source['spec']}{loras} in "
          f"{time.perf_counter() - t0:.1f}s -> {args.out}")
    print(f"try: diffaccel generate {args.out} \"a red circle\"   |   diffaccel info {args.out}")
    return 0


# ---- generate --------------------------------------------------------------------------------------------------
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with an optimized artifact",
                       description="Run the drop-in pipeline on OUT and save PNG image(s).", epilog=EPILOG)
    p.add_argument("artifact", help="artifact directory made by diffaccel optimize")
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=guidance_arg, default=None, metavar="SCALE|off", help=GUIDANCE_HELP)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", default=None, help="a diffusers scheduler class (any case), e.g. "
                                                     "DPMSolverMultistepScheduler, or an alias: " + ", ".join(ALIASES))
    p.add_argument("--provider", default=None, help="ONNX Runtime provider (default: the one built for)")
    p.add_argument("--cache", default=None, metavar="SPEC", help=CACHE_HELP)
    p.add_argument("-o", "--output", default="image.png", help="output PNG (index appended for several images)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    import torch

    from diffaccel.engines.pipelines import pipeline_class
    from diffaccel.engines.pipelines.schedulers import scheduler_class

    scheduler = scheduler_class(args.scheduler) if args.scheduler else None   # a typo fails before the engines load
    cache = parse_cache(args.cache)
    pipe = pipeline_class(args.artifact).from_pretrained(args.artifact, provider=args.provider)  # the family's drop-in
    if cache is not None:
        pipe.denoiser.enable_cache(cache)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    native = pipe.native_size
    if (args.height is None) != (args.width is None):   # diffusers would silently reset both to the default
        args.height, args.width = args.height or native, args.width or native
    if args.guidance is None:   # the one rule of every command: the guidance the artifact was built for
        args.guidance = pipe.manifest.built_guidance
    t0 = time.perf_counter()
    images = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=args.height, width=args.width,
                  num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(args.seed)).images
    seconds = time.perf_counter() - t0
    paths = _image_paths(args.output, len(images))
    for img, path in zip(images, paths):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        img.save(path)
    print(f"{len(images)} image(s) in {seconds:.2f}s (guidance {args.guidance:g}) -> {', '.join(paths)}")
    return 0


def _image_paths(output: str, n: int) -> list:
    if n == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(n)]


# ---- info ------------------------------------------------------------------------------------------------------
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="summarize an artifact's manifest", epilog=EPILOG)
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument("--verify", action="store_true", help="also check every engine file's sha256")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    import json

    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.cli.progress import format_info

    m = Manifest.load(args.artifact)
    if args.verify:
        m.verify()
    print(json.dumps(m.data, indent=2) if args.json else format_info(m))
    if args.verify:
        print("verified: every engine file matches its recorded sha256")
    return 0


# ---- main ------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line naming what is wrong (``diffaccel: error: ...``, no
    usage block), exit code 2, as every other error. Subcommands' parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"diffaccel: error: {one_line(message)}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffaccel", description="Accelerate diffusion checkpoints and measure "
                     "what was gained and lost.", epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log library details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_optimize, _add_generate, _add_info):
        add(sub)
    from diffaccel.engines.serving.cli import register as serving   # the HTTP server
    from diffaccel.eval.cli import register as measuring             # microbench, eval, bench, demo

    for register in (measuring, serving):  # each package registers its own commands (argparse wiring only)
        register(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:            # --help (0) or a bad flag (2, after its one line)
        return e.code
    _quiet_libraries(args.verbose)
    try:
        return args.func(args)
    except DiffaccelError as e:
        print(f"diffaccel: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        full = disk_full(e)
        if full is None:
            raise
        print(f"diffaccel: error: {one_line(full)}", file=sys.stderr)
        return full.exit_code
    except KeyboardInterrupt:
        print("diffaccel: interrupted; finished stages are kept and the same command resumes", file=sys.stderr)
        return 130

