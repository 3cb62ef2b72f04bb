"""The adherence checker: correct on ground-truth renders, robust to blur and color shifts, honest when wrong."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffaccel.eval.metrics.adherence import check, format_table, score
from diffaccel.optimize.sources.tinyshapes import BACKGROUNDS, Scene, caption, eval_prompts, render, sample_scenes


def _degrade(img: np.ndarray, rng, blur: float, shift: float, noise: float) -> np.ndarray:
    out = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    out = out + rng.normal(0, shift, 3) + rng.normal(0, noise, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def test_checker_reads_ground_truth_renders():
    scenes = sample_scenes(600, seed=7, split="all")  # every shape, color, background, size and position
    scores = score(check(render(s), caption(s)) for s in scenes)["overall"]
    assert scores.n == 600
    assert min(scores.background, scores.color, scores.shape, scores.all) >= 0.98, scores


def test_checker_tolerates_blur_and_color_shift():
    rng = np.random.default_rng(0)
    scenes = sample_scenes(300, seed=8, split="all")
    scores = score(check(_degrade(render(s), rng, 1.2, 15, 5), caption(s)) for s in scenes)["overall"]
    assert scores.all >= 0.95, scores


def test_checker_flags_wrong_attributes():
    img = render(Scene("circle", "red", "white", "large", "center"))
    result = check(img, "a large blue square in the center on a black background")
    assert (result.shape, result.color, result.background) == ("circle", "red", "white")
    assert not (result.shape_ok or result.color_ok or result.background_ok or result.all_ok)


def test_checker_sees_nothing_in_a_blank_image():
    blank = np.full((64, 64, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    result = check(blank, "a red star on a gray background")
    assert result.shape is None and result.color is None and result.background_ok and not result.all_ok


def test_checker_accepts_other_sizes_and_float_arrays():
    scene = Scene("triangle", "cyan", "black", "large", "top right")
    big = np.asarray(Image.fromarray(render(scene)).resize((256, 256), Image.BICUBIC))
    assert check(big, caption(scene)).all_ok
    assert check(render(scene) / 255.0, caption(scene)).all_ok
    assert check(Image.fromarray(render(scene)), caption(scene)).all_ok


def test_score_splits_seen_and_held_out():
    prompts = eval_prompts()
    results = [check(render(p.scene), p.prompt) for p in prompts]
    results[0] = check(render(Scene("square", "red", "white", "small", "center")), prompts[0].prompt)
    scores = score(results)
    assert scores["held_out"].n == sum(p.held_out for p in prompts) > 0
    assert scores["seen"].n + scores["held_out"].n == scores["overall"].n == len(prompts)
    assert scores["held_out"].all == 1.0 and scores["seen"].shape < 1.0
    assert "held_out" in format_table(scores)


def test_unparseable_prompt_is_refused():
    with pytest.raises(ValueError, match="cannot parse prompt"):
        check(render(sample_scenes(1)[0]), "an astronaut")
