"""Quality of a variant's images and latents against the baseline's, on the same prompts, seeds and scheduler.

Per image: PSNR, SSIM, final-latent relative error (and LPIPS / CLIP score with local weights). Aggregates: PSNR of
the pooled MSE (finite unless every image is identical), the worst image's PSNR, mean/min SSIM, mean/max latent
error, FID of the variant's images against the baseline's. On tinyshapes, the prompt-adherence checker scores
every variant, the baseline included.

Outputs are dicts keyed by ``(steps, prompt_index, seed)`` holding ``(image HxWx3 float in [0,1], latents)``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.sources.builtins import TINYSHAPES

from diffaccel.eval.metrics import images as metrics


# ---- the one adapter to the tinyshapes world (eval/shapes.py + eval/adherence.py) -------------------------------
def tinyshapes_adherence(images, prompts) -> dict:
    """Prompt adherence of ``images`` to ``prompts`` (raises ValueError naming an unparseable prompt):
    ``{"splits": {"overall"|"seen"|"held_out": {n, background, color, shape, all}}, "per_image": [...]}``."""
    from diffaccel.eval.metrics.adherence import check, score

    results = [check(img, p) for img, p in zip(images, prompts)]
    splits = {name: dataclasses.asdict(s) for name, s in score(results).items()}
    per_image = [{"shape": r.shape, "color": r.color, "background": r.background, "ok": r.all_ok,
                  "held_out": r.held_out} for r in results]
    return {"splits": splits, "per_image": per_image}


def adherence_enabled(setting, source_spec: str, prompts) -> "tuple[bool, str]":
    """(on?, why) for the adherence columns; ``setting`` True forces (prompts must parse), None means auto."""
    if setting is False:
        return False, "not computed (turned off)"
    if setting is None and source_spec not in TINYSHAPES:
        return False, "not computed (only for the tinyshapes world; pass --adherence to force)"
    blank = np.full((8, 8, 3), 0.5)
    for p in prompts:
        try:
            tinyshapes_adherence([blank], [p])
        except ValueError as e:
            if setting:
                raise DiffaccelError(f"--adherence needs tinyshapes captions: {e}") from None
            return False, f"not computed (prompt {p!r} is not a tinyshapes caption)"
    return True, "tinyshapes adherence checker (diffaccel.eval.metrics.adherence)"


# ---- closed-form comparisons --------------------------------------------------------------------------------------
def compare_one(image, latents, ref_image, ref_latents) -> dict:
    err = metrics.mse(image, ref_image)
    return {"mse": err, "psnr": metrics.psnr_from_mse(err), "ssim": metrics.ssim(image, ref_image),
            "latent_rel_error": metrics.latent_rel_error(latents, ref_latents)}


def aggregate(per_image: list) -> dict:
    if not per_image:
        return {}
    col = lambda k: [r[k] for r in per_image if r.get(k) is not None]  # noqa: E731
    # two views of PSNR: pooled (PSNR of the mean MSE, dominated by the worst images) and the mean of per-image PSNRs
    out = {"n": len(per_image), "psnr": metrics.psnr_from_mse(float(np.mean(col("mse")))),
           "psnr_mean": float(np.mean(col("psnr"))), "psnr_min": min(col("psnr")),
           "ssim": float(np.mean(col("ssim"))), "ssim_min": min(col("ssim")),
           "latent_rel_error": float(np.mean(col("latent_rel_error"))),
           "latent_rel_error_max": max(col("latent_rel_error"))}
    for k in ("lpips", "clip_score"):
        if col(k):
            out[k] = float(np.mean(col(k)))
    return out


def compare(outputs: dict, reference: dict, keys: list, ref_keys: "list | None" = None) -> list:
    """Per-image comparisons of ``outputs[k]`` with ``reference[rk]`` for k, rk in zip(keys, ref_keys)."""
    rows = []
    for k, rk in zip(keys, ref_keys or keys):
        (img, lat), (rimg, rlat) = outputs[k], reference[rk]
        rows.append({"steps": k[0], "prompt": k[1], "seed": k[2], **compare_one(img, lat, rimg, rlat)})
    return rows


# ---- learned metrics ----------------------------------------------------------------------------------------------
class Learned:
    """LPIPS / CLIP score / FID when their local weights were given; otherwise each says why not."""

    def __init__(self, clip_model=None, inception=None, lpips=None):
        self.clip = metrics.ClipScorer(clip_model) if clip_model else None
        self.inception = metrics.InceptionFeatures(inception) if inception else None
        self.lpips = metrics.LpipsMetric(lpips) if lpips else None
        self._ref_features = None

    def status(self, n_images: int) -> dict:
        fid = (metrics.NOT_COMPUTED["fid"] if self.inception is None else
               "not computed (FID needs at least two images per variant)" if n_images < 2 else
               f"computed with {self.inception.path} on {n_images} images (biased below ~2000 images: compare "
               "variants of one run only)")
        return {"lpips": f"computed with {self.lpips.path}" if self.lpips else metrics.NOT_COMPUTED["lpips"],
                "clip_score": f"computed with {self.clip.path}" if self.clip else metrics.NOT_COMPUTED["clip_score"],
                "fid": fid}

    def add_per_image(self, rows: list, images, ref_images, prompts) -> None:
        lp = self.lpips(images, ref_images) if self.lpips is not None and images else None
        cs = self.clip(images, prompts) if self.clip is not None and images else None
        for i, r in enumerate(rows):
            r["lpips"] = None if lp is None else lp[i]
            r["clip_score"] = None if cs is None else cs[i]

    def fid(self, images, ref_images) -> "float | None":
        if self.inception is None or len(images) < 2:
            return None
        if self._ref_features is None:
            self._ref_features = self.inception(ref_images)
        return metrics.fid_from_features(self.inception(images), self._ref_features)


def headline_quality(outputs: dict, reference: dict, keys: list, prompts: list, learned: Learned,
                     is_baseline: bool) -> dict:
    """Per-image rows and aggregates at the headline step count (the baseline gets its CLIP score only)."""
    images = [outputs[k][0] for k in keys]
    ref_images = [reference[k][0] for k in keys]
    rows = compare(outputs, reference, keys)
    learned.add_per_image(rows, images, ref_images, [prompts[k[1]] for k in keys])
    if is_baseline:
        for r in rows:
            r["lpips"] = None
    agg = aggregate(rows)
    agg["fid"] = None if is_baseline else learned.fid(images, ref_images)
    return {"per_image": rows, "aggregate": agg}


def sweep_quality(outputs: dict, reference: dict, steps_list, prompts_n: int, seeds) -> list:
    """For each step count s: quality against the baseline at s and against the baseline at max(steps)."""
    top = max(steps_list)
    out = []
    for s in sorted(steps_list):
        keys = [(s, p, seed) for p in range(prompts_n) for seed in seeds]
        same = aggregate(compare(outputs, reference, keys))
        vs_top = aggregate(compare(outputs, reference, keys, [(top, p, seed) for _, p, seed in keys]))
        out.append({"steps": s, "psnr": same["psnr"], "ssim": same["ssim"],
                    "latent_rel_error": same["latent_rel_error"], "psnr_vs_reference": vs_top["psnr"],
                    "ssim_vs_reference": vs_top["ssim"]})
    return out


def adherence_by_steps(outputs: dict, steps_list, prompts: list, seeds) -> dict:
    """{steps: adherence result} for every step count."""
    out = {}
    for s in sorted(steps_list):
        keys = [(s, p, seed) for p in range(len(prompts)) for seed in seeds]
        out[s] = tinyshapes_adherence([outputs[k][0] for k in keys], [prompts[k[1]] for k in keys])
    return out

