"""Quality metrics against the baseline: closed-form ones that always run, learned ones from local weights.

Images are float arrays in [0, 1], shaped (H, W, C) (uint8 arrays are divided by 255). Closed-form metrics need
only numpy: :func:`psnr`, :func:`ssim` (the Gaussian-window SSIM of Wang et al. 2004, as scikit-image computes it
with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``), :func:`latent_rel_error` and
:func:`frechet_distance`. Learned metrics load weights the user already has, never from a network:
:class:`ClipScorer` (a Hugging Face CLIP folder), :class:`InceptionFeatures` (a TorchScript Inception, for FID) and
:class:`LpipsMetric` (a TorchScript LPIPS module); see docs/eval.md for where to get each.

>>> import numpy as np
>>> a = np.zeros((16, 16, 3)); psnr(a, a)
inf
>>> round(psnr(a, a + 0.1), 6)
20.0
>>> round(ssim(a + 0.5, a + 0.5), 6)
1.0
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from diffaccel.optimize.artifact.errors import DiffaccelError, one_line

# What a learned-metric column says when its weights were not given (the report shows this text verbatim).
NOT_COMPUTED = {
    "lpips": "not computed (pass --lpips PATH, a TorchScript LPIPS module; see docs/eval.md)",
    "clip_score": "not computed (pass --clip-model DIR, a local Hugging Face CLIP folder)",
    "fid": "not computed (pass --inception PATH, a TorchScript Inception such as inception-2015-12-05.pt)",
}


def as_float_image(x) -> np.ndarray:
    """float64 array in [0, 1] (uint8 input is divided by 255)."""
    a = np.asarray(x)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def mse(a, b) -> float:
    a, b = as_float_image(a), as_float_image(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return float(np.mean((a - b) ** 2))


def psnr_from_mse(err: float, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) in dB; ``inf`` for identical images (MSE 0)."""
    return math.inf if err == 0 else 10.0 * math.log10(data_range ** 2 / err)


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``a`` against ``b``; ``inf`` when they are identical."""
    return psnr_from_mse(mse(a, b), data_range)


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable filter with half-sample symmetric borders (scipy.ndimage mode='reflect')."""
    r = len(kernel) // 2
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(kernel))
    return out


def ssim(a, b, data_range: float = 1.0, sigma: float = 1.5, truncate: float = 3.5) -> float:
    """Mean structural similarity (Gaussian 11x11 window, sigma 1.5), averaged over channels; 1.0 for identical
    images. Matches ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1.0)``."""
    a, b = as_float_image(a), as_float_image(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    kernel = _gaussian_kernel(sigma, truncate)
    pad = len(kernel) // 2
    if min(a.shape[:2]) < len(kernel):
        raise ValueError(f"images of {a.shape[0]}x{a.shape[1]} are smaller than the {len(kernel)}-pixel SSIM window")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        ux, uy = _filter2d(x, kernel), _filter2d(y, kernel)
        vx = _filter2d(x * x, kernel) - ux * ux
        vy = _filter2d(y * y, kernel) - uy * uy
        vxy = _filter2d(x * y, kernel) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
        scores.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(scores))


def latent_rel_error(a, b) -> float:
    """||a - b|| / ||b|| (``b`` is the baseline's final latents)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    num, den = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). The trace of the matrix square root is taken
    as Tr((s1^(1/2) sigma2 s1^(1/2))^(1/2)), which is symmetric and needs no scipy."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    r1 = _sqrt_psd(s1)
    inner = np.linalg.eigvalsh((r1 @ s2 @ r1 + (r1 @ s2 @ r1).T) / 2)
    tr_covmean = float(np.sqrt(np.clip(inner, 0, None)).sum())
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)   # a distance: a tiny negative value is rounding error


def fid_from_features(f1, f2) -> float:
    """FID between two sets of feature vectors (rows). Needs at least two vectors per set."""
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError("FID needs at least two images per set")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


# ---- learned metrics (local weights only) ------------------------------------------------------------------------
def _nchw(images, scale: float, shift: float):
    import torch

    arr = np.stack([as_float_image(i) for i in images]).astype(np.float32)
    return torch.from_numpy(arr * scale + shift).permute(0, 3, 1, 2).contiguous()


def _load_script(path: str, what: str, flag: str):
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise DiffaccelError(f"{flag} {path}: no such file; give a local TorchScript {what} file (see docs/eval.md)")
    try:
        return torch.jit.load(str(p), map_location="cpu").eval()
    except Exception as e:  # torch raises RuntimeError/ValueError variants for non-TorchScript files
        raise DiffaccelError(f"{flag} {path} is not a TorchScript {what} module ({one_line(e)[:120]}); "
                             "export one as docs/eval.md shows") from None


class LpipsMetric:
    """LPIPS distance from a TorchScript module called as ``module(x, y)`` on (N, 3, H, W) images in [-1, 1]."""

    def __init__(self, path: str):
        self.path, self.module = str(path), _load_script(path, "LPIPS", "--lpips")

    def __call__(self, images, references) -> list:
        import torch

        with torch.inference_mode():
            out = self.module(_nchw(images, 2.0, -1.0), _nchw(references, 2.0, -1.0))
        return [float(v) for v in out.reshape(len(images), -1).mean(1)]


class InceptionFeatures:
    """Feature vectors for FID from a TorchScript module taking (N, 3, H, W) floats in [0, 255]. Modules whose
    forward has a ``return_features`` argument (StyleGAN2-ADA / clean-fid's inception-2015-12-05.pt) get it set."""

    def __init__(self, path: str, batch: int = 16):
        self.path, self.module, self.batch = str(path), _load_script(path, "Inception", "--inception"), batch
        names = [a.name for a in self.module.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in names else {}

    def __call__(self, images) -> np.ndarray:
        import torch

        feats = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch):
                x = _nchw(images[i:i + self.batch], 255.0, 0.0)
                feats.append(self.module(x, **self.kwargs).reshape(x.shape[0], -1).double().numpy())
        return np.concatenate(feats)


class ClipScorer:
    """CLIP score 100 * max(cos(image, text), 0) (Hessel et al. 2021, as torchmetrics computes it) with a local
    Hugging Face CLIP folder (``CLIPModel`` + ``CLIPProcessor``), loaded offline."""

    def __init__(self, folder: str):
        from transformers import CLIPModel, CLIPProcessor

        p = Path(folder).expanduser()
        if not (p / "config.json").is_file():
            raise DiffaccelError(f"--clip-model {folder}: not a Hugging Face model folder (no config.json); give a "
                                 "local copy of e.g. openai/clip-vit-large-patch14")
        try:
            self.model = CLIPModel.from_pretrained(str(p), local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(str(p), local_files_only=True)
        except Exception as e:
            raise DiffaccelError(f"--clip-model {folder} cannot be loaded as CLIPModel + CLIPProcessor "
                                 f"({one_line(e)[:120]})") from None
        self.path = str(p)

    def __call__(self, images, prompts) -> list:
        import torch
        from PIL import Image

        pil = [Image.fromarray((np.clip(as_float_image(i), 0, 1) * 255).round().astype(np.uint8)) for i in images]
        inputs = self.processor(text=list(prompts), images=pil, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return [float(v) for v in (100.0 * (img * txt).sum(-1)).clamp(min=0)]
