"""Quality metrics against known values: closed forms, scikit-image, and tiny in-code stand-ins for learned models."""
import math

import numpy as np
import pytest
import torch

from diffaccel.eval.metrics import images as metrics
from diffaccel.optimize.artifact.errors import DiffaccelError

from .helpers import make_tiny_clip, save_fake_metric_models


def rand_image(seed, shape=(64, 48, 3), lo=0.0, hi=1.0):
    return np.random.default_rng(seed).uniform(lo, hi, shape)


# ---- PSNR ------------------------------------------------------------------------------------------------------
def test_psnr_of_identical_images_is_infinite():
    a = rand_image(0)
    assert metrics.psnr(a, a) == math.inf
    assert metrics.psnr_from_mse(0.0) == math.inf


@pytest.mark.parametrize("delta", [0.1, 0.01, 0.003])
def test_psnr_of_a_known_perturbation(delta):
    a = rand_image(1, lo=0.2, hi=0.8)
    signs = np.where(np.random.default_rng(2).random(a.shape) < 0.5, -1.0, 1.0)
    b = a + delta * signs                               # MSE is exactly delta^2
    assert metrics.psnr(b, a) == pytest.approx(-20 * math.log10(delta), abs=1e-9)
    assert metrics.psnr(b, a, data_range=2.0) == pytest.approx(20 * math.log10(2.0 / delta), abs=1e-9)


def test_psnr_reads_uint8_as_fractions_of_255():
    a = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 5, 0, 255).astype(np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(metrics.psnr(a / 255.0, b / 255.0))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))


# ---- SSIM ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,noise", [((64, 64, 3), 0.05), ((40, 72, 3), 0.2), ((33, 31), 0.1)])
def test_ssim_matches_scikit_image(shape, noise):
    skimage = pytest.importorskip("skimage.metrics")
    a = rand_image(4, shape)
    b = np.clip(a * 0.9 + np.random.default_rng(5).normal(0, noise, shape) + 0.03, 0, 1)
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    if len(shape) == 3:
        kw["channel_axis"] = -1
    expected = skimage.structural_similarity(a, b, **kw)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-9)
    assert 0 < metrics.ssim(a, b) < 1


def test_ssim_of_identical_images_is_one_and_small_images_are_refused():
    a = rand_image(6)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="smaller than the 11-pixel SSIM window"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


# ---- latents and FID ---------------------------------------------------------------------------------------------
def test_latent_relative_error():
    b = np.ones((4, 8, 8))
    assert metrics.latent_rel_error(b * 1.1, b) == pytest.approx(0.1)
    assert metrics.latent_rel_error(b, b) == 0.0
    assert metrics.latent_rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert metrics.latent_rel_error(np.ones(3), np.zeros(3)) == math.inf


def test_frechet_distance_of_two_gaussians_closed_form():
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-9)
    # same Gaussian: 0; 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert metrics.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)
    assert metrics.frechet_distance([2.0], [[9.0]], [0.0], [[1.0]]) == pytest.approx(4 + 4)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_fid_from_features():
    f = np.random.default_rng(8).normal(size=(200, 4))
    assert metrics.fid_from_features(f, f) == pytest.approx(0, abs=1e-8)
    assert metrics.fid_from_features(f + 3.0, f) == pytest.approx(4 * 9.0, rel=1e-6)   # shifted mean only
    with pytest.raises(ValueError, match="at least two"):
        metrics.fid_from_features(f[:1], f)


# ---- learned metrics with in-code stand-ins (never downloaded) ---------------------------------------------------
@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    d = tmp_path_factory.mktemp("scripted")
    save_fake_metric_models(d)
    return d


def test_inception_features_and_fid(scripted):
    imgs = [rand_image(i, (16, 16, 3)) for i in range(6)]
    others = [np.clip(i + 0.1, 0, 1) for i in imgs]
    feats = metrics.InceptionFeatures(str(scripted / "inception.pt"), batch=4)
    x = np.stack(imgs) * 255
    expected = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2), ddof=1)], axis=1)
    assert np.allclose(feats(imgs), expected, rtol=1e-4)
    fid = metrics.fid_from_features(feats(others), feats(imgs))
    assert fid > 0 and np.isfinite(fid)


def test_lpips_module_sees_images_in_minus_one_to_one(scripted):
    lp = metrics.LpipsMetric(str(scripted / "lpips.pt"))
    a, b = rand_image(10, (16, 16, 3)), rand_image(11, (16, 16, 3))
    got = lp([a, a], [b, a])
    assert got[0] == pytest.approx(4 * np.mean((a - b) ** 2), rel=1e-4) and got[1] == 0.0


def test_bad_weight_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not torchscript")
    with pytest.raises(DiffaccelError, match="--lpips .* is not a TorchScript LPIPS module"):
        metrics.LpipsMetric(str(tmp_path / "x.pt"))
    with pytest.raises(DiffaccelError, match="--inception .*: no such file"):
        metrics.InceptionFeatures(str(tmp_path / "missing.pt"))
    with pytest.raises(DiffaccelError, match="--clip-model .*no config.json"):
        metrics.ClipScorer(str(tmp_path))


def test_clip_score_with_a_local_folder(tmp_path):
    scorer = metrics.ClipScorer(str(make_tiny_clip(tmp_path / "clip")))
    imgs = [rand_image(20, (64, 64, 3)), rand_image(21, (64, 64, 3))]
    scores = scorer(imgs, ["a red circle", "a blue star"])
    assert len(scores) == 2 and all(0 <= s <= 100 for s in scores)
    assert scorer(imgs, ["a red circle", "a blue star"]) == pytest.approx(scores)
    # the definition: 100 * max(cos(image embedding, text embedding), 0)
    inputs = scorer.processor(text=["a red circle"], images=[(imgs[0] * 255).round().astype(np.uint8)],
                              return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert scores[0] == pytest.approx(max(100 * cos, 0), abs=1e-3)


def test_not_computed_texts_name_the_option():
    assert "--lpips" in metrics.NOT_COMPUTED["lpips"] and "--clip-model" in metrics.NOT_COMPUTED["clip_score"]
    assert "--inception" in metrics.NOT_COMPUTED["fid"]
