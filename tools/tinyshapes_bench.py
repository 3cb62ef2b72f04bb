"""The tinyshapes Bar: prompt adherence of the fp32 PyTorch pipeline, scored by the deterministic checker.

Generates every prompt of :func:`diffaccel.optimize.sources.tinyshapes.eval_prompts` (held-out color+shape pairs included) with
each seed, reads each image with :func:`diffaccel.eval.metrics.adherence.check` and prints background / object color /
shape / all-three accuracy overall, for seen and for held-out pairs.

    python tools/tinyshapes_bench.py                                   # the Bar: 20 steps, 2 seeds
    python tools/tinyshapes_bench.py --grid docs/tinyshapes_samples.png --json reports/tinyshapes_bench.json
    python tools/tinyshapes_bench.py --model optimize/assets/tinyshapes-xl --guidance 3   # tinyshapes-xl
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from diffaccel.eval.metrics.adherence import check, format_table, score
from diffaccel.optimize.sources.tinyshapes import eval_prompts
from diffaccel.optimize.sources.builtins import recommended_guidance

log = logging.getLogger("tinyshapes_bench")
ROOT = Path(__file__).resolve().parents[1]
BAR = {"background": 0.90, "color": 0.90, "shape": 0.80, "all": 0.70}


def load_pipeline(path: Path):
    """The folder's own diffusers pipeline class (StableDiffusionPipeline or StableDiffusionXLPipeline)."""
    from diffusers import DiffusionPipeline

    xl = "text_encoder_2" in json.loads((path / "model_index.json").read_text())
    extra = dict(add_watermarker=False) if xl else dict(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list, seeds: list, steps: int, guidance: float, batch: int) -> list:
    """One image (float HxWx3 in 0..1) per (seed, prompt), seed-major; image i of seed s uses seed s*10000+i."""
    jobs = [(s, i, p) for s in seeds for i, p in enumerate(prompts)]
    images, t0 = [], time.time()
    for k in range(0, len(jobs), batch):
        chunk = jobs[k:k + batch]
        gens = [torch.Generator().manual_seed(s * 10000 + i) for s, i, _ in chunk]
        with torch.no_grad():
            out = pipe([p for _, _, p in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, output_type="np")
        images.extend(out.images)
        log.info("generated %d/%d images (%.0fs)", len(images), len(jobs), time.time() - t0)
    return images


def save_grid(path: Path, images: list, results: list, columns: int = 8):
    """Samples with their prompts; the title is green when the checker agrees on all three, red otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 2.05), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, r in zip(axes.flat, images, results):
        ax.imshow(image, interpolation="nearest")
        label = r.prompt.removeprefix("a ").replace(" background", " bg") + (" [held-out]" if r.held_out else "")
        ax.set_title("\n".join(textwrap.wrap(label, 22)), fontsize=6.5, color="green" if r.all_ok else "red")
    fig.tight_layout(pad=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("grid written to %s", path)


def grid_selection(results: list, n: int) -> list:
    """Indices of the first seed's images to show: every held-out prompt, then seen ones evenly spaced."""
    first = len(eval_prompts())
    held = [i for i in range(first) if results[i].held_out]
    seen = [i for i in range(first) if not results[i].held_out]
    take = max(0, n - len(held))
    return sorted(held[:n] + [seen[j] for j in np.linspace(0, len(seen) - 1, take).astype(int)] * (take > 0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "optimize" / "assets" / "tinyshapes")
    p.add_argument("--steps", type=int, default=20)
    # tinyshapes' recommended guidance (2.0): picked on seeds 2 and 3, not the bar's 0 and 1, from 1.5, 2, 2.5, 3, 4,
    # as the best "all three" for both the shipped and the previous weights there (docs/tinyshapes.md).
    p.add_argument("--guidance", type=float, help="default: the model's recommended guidance (tinyshapes 2.0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch", type=int, default=40, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--grid", type=Path, help="write a picture grid of samples here (PNG)")
    p.add_argument("--grid-n", type=int, default=40, help="images in the grid")
    p.add_argument("--json", type=Path, help="write the scores and the run's settings here")
    p.add_argument("--images", type=Path, help="save the generated images here (.npz, uint8, seed-major)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.guidance is None:
        args.guidance = recommended_guidance(args.model.name)
    prompts = eval_prompts()
    t0 = time.time()
    images = generate(load_pipeline(args.model), [e.prompt for e in prompts], args.seeds, args.steps,
                      args.guidance, args.batch)
    if args.images:
        np.savez_compressed(args.images, images=(np.stack(images) * 255).round().astype(np.uint8))
    results = [check(img, prompt) for img, prompt in zip(images, [e.prompt for e in prompts] * len(args.seeds))]
    scores = score(results)
    print(f"tinyshapes adherence: {len(prompts)} prompts x {len(args.seeds)} seeds, {args.steps} steps, "
          f"guidance {args.guidance}, fp32 PyTorch ({time.time() - t0:.0f}s)")
    print(format_table(scores))
    overall = scores["overall"]
    verdict = all(getattr(overall, a) >= bar for a, bar in BAR.items())
    print("Bar (overall: background>=90%, color>=90%, shape>=80%, all>=70%):", "PASS" if verdict else "FAIL")
    print("reproduce:", shlex.join(["python", *sys.argv]))
    if args.grid:
        keep = grid_selection(results, args.grid_n)
        save_grid(args.grid, [images[i] for i in keep], [results[i] for i in keep])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"scores": {k: vars(v) for k, v in scores.items()}, "bar_pass": verdict,
                  "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "env": {"torch": torch.__version__, "python": platform.python_version(),
                          "threads": torch.get_num_threads()}}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
