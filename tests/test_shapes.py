"""The tinyshapes world: sampling, rendering, captions, held-out pairs, evaluation prompts."""
import itertools

import numpy as np
import pytest

from diffaccel.optimize.sources import tinyshapes as shapes
from diffaccel.optimize.sources.tinyshapes import (BACKGROUNDS, COLORS, HELD_OUT, POSITIONS, SHAPES, SIZES, Attributes, Scene,
                                   caption, eval_prompts, parse, render, sample_scenes)


def test_vocabularies_meet_the_issue():
    assert len(SHAPES) >= 4 and len(COLORS) >= 6 and len(BACKGROUNDS) >= 3
    assert not set(COLORS) & set(BACKGROUNDS), "object and background color names must differ"
    assert all(shape in SHAPES and color in COLORS for color, shape in HELD_OUT)


def test_sampler_is_seeded():
    assert sample_scenes(50, seed=3) == sample_scenes(50, seed=3)
    assert sample_scenes(50, seed=3) != sample_scenes(50, seed=4)


def test_train_split_never_shows_held_out_pairs():
    scenes = sample_scenes(5000, seed=0, split="train")
    assert not {(s.color, s.shape) for s in scenes} & HELD_OUT
    assert len({(s.color, s.shape) for s in scenes}) == len(SHAPES) * len(COLORS) - len(HELD_OUT)


def test_held_out_split_shows_only_held_out_pairs():
    assert {(s.color, s.shape) for s in sample_scenes(500, seed=0, split="held_out")} == HELD_OUT


def test_unknown_split_and_attribute_are_refused():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        sample_scenes(1, split="test")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        Scene("hexagon", "red", "white", "small", "center")


def test_render_is_deterministic_and_draws_the_colors():
    scene = Scene("square", "green", "navy", "large", "center")
    a, b = render(scene), render(scene)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert tuple(a[0, 0]) == BACKGROUNDS["navy"] and tuple(a[32, 32]) == COLORS["green"]


def test_render_places_the_object_where_the_caption_says():
    for position, (fx, fy) in POSITIONS.items():
        img = render(Scene("circle", "red", "white", "small", position)).astype(int)
        ys, xs = np.nonzero(np.abs(img - np.array(BACKGROUNDS["white"])).sum(2) > 60)
        assert abs(xs.mean() / 64 - fx) < 0.05 and abs(ys.mean() / 64 - fy) < 0.05, position


def test_large_is_larger_than_small():
    def area(size):
        img = render(Scene("square", "blue", "white", size, "center")).astype(int)
        return (np.abs(img - np.array(BACKGROUNDS["white"])).sum(2) > 60).sum()

    assert area("large") > 2 * area("small")


@pytest.mark.parametrize("with_size,with_position", itertools.product([True, False], repeat=2))
def test_parse_round_trips_captions(with_size, with_position):
    for scene in sample_scenes(200, seed=1, split="all"):
        got = parse(caption(scene, with_size, with_position))
        assert got == Attributes(scene.shape, scene.color, scene.background,
                                 scene.size if with_size else None, scene.position if with_position else None)


def test_caption_can_leave_out_the_color():
    scene = Scene("circle", "yellow", "navy", "small", "top left")
    assert caption(scene) == "a small yellow circle at the top left on a navy background"
    assert caption(scene, with_color=False) == "a small circle at the top left on a navy background"
    assert caption(scene, False, False, False) == "a circle on a navy background"


def test_parse_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="cannot parse prompt"):
        parse("a photo of an astronaut riding a horse")


def test_eval_prompts_cover_every_pair_and_mark_held_out():
    prompts = eval_prompts()
    assert len(prompts) >= 64 and prompts == eval_prompts()
    assert {(p.scene.color, p.scene.shape) for p in prompts} == {(c, s) for c in COLORS for s in SHAPES}
    assert {(p.scene.color, p.scene.shape) for p in prompts if p.held_out} == HELD_OUT
    assert all(parse(p.prompt) == p.scene.attributes for p in prompts)
    assert {p.scene.background for p in prompts} == set(BACKGROUNDS)
    assert {p.scene.size for p in prompts} == set(SIZES)


def test_captions_fit_the_tokenizer_and_stay_distinct():
    from diffaccel.optimize.sources.tokenizer import word_tokenizer

    tok = word_tokenizer(shapes.WORDS)
    texts = [p.prompt for p in eval_prompts()]
    ids = [tuple(tok(t).input_ids) for t in texts]
    assert max(map(len, ids)) <= 32 < tok.model_max_length
    assert len(set(ids)) == len(set(texts))
    assert tok.unk_token_id not in {i for row in ids for i in row[1:-1]}  # every character is known
