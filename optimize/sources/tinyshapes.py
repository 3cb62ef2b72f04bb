"""The tinyshapes world: captioned renders of one flat-colored shape on a flat background.

Everything here is procedural and seeded (numpy + PIL, no files): a :class:`Scene` names a shape, an object
color, a background color, a size and a position (plus a little continuous jitter); :func:`render` draws it,
:func:`caption` writes it in plain English and :func:`parse` reads a caption back. Some color+shape pairs
(:data:`HELD_OUT`) never occur in the ``"train"`` split; :func:`eval_prompts` covers every pair, held-out ones
included and marked.

>>> scene = Scene("circle", "red", "white", "small", "top left")
>>> caption(scene)
'a small red circle at the top left on a white background'
>>> parse(caption(scene)) == Attributes("circle", "red", "white", "small", "top left")
True
>>> render(scene).shape
(64, 64, 3)
>>> is_held_out("red", "star"), is_held_out("red", "circle")
(True, False)
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {  # object colors: six hues 60 degrees apart, so nearest-color classification has wide margins
    "red": (220, 30, 30), "yellow": (235, 215, 30), "green": (30, 170, 50),
    "cyan": (30, 200, 210), "blue": (35, 60, 220), "purple": (150, 50, 200),
}
BACKGROUNDS = {
    "white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128),
    "navy": (25, 35, 90), "beige": (225, 205, 160),
}
SIZES = {"small": 0.15, "large": 0.25}        # half-extent of the shape, as a fraction of the image side
POSITIONS = {                                # object center (x, y), as fractions of the image side
    "top left": (0.28, 0.28), "top": (0.5, 0.28), "top right": (0.72, 0.28),
    "left": (0.28, 0.5), "center": (0.5, 0.5), "right": (0.72, 0.5),
    "bottom left": (0.28, 0.72), "bottom": (0.5, 0.72), "bottom right": (0.72, 0.72),
}
HELD_OUT = frozenset({("red", "star"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle")})
SPLITS = ("train", "held_out", "all")
IMAGE_SIZE = 64
WORDS = sorted({"a", "at", "the", "on", "in", "background"} | set(SHAPES) | set(COLORS) | set(BACKGROUNDS)
               | set(SIZES) | {w for p in POSITIONS for w in p.split()})


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What a caption says. ``None`` means the caption does not say it."""

    shape: "str | None" = None
    color: "str | None" = None
    background: "str | None" = None
    size: "str | None" = None
    position: "str | None" = None


@dataclasses.dataclass(frozen=True)
class Scene:
    """One renderable scene: the named attributes plus continuous jitter (offsets in image fractions)."""

    shape: str
    color: str
    background: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("color", COLORS), ("background", BACKGROUNDS),
                              ("size", SIZES), ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(allowed)}")

    @property
    def attributes(self) -> Attributes:
        return Attributes(self.shape, self.color, self.background, self.size, self.position)


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    scene: Scene
    held_out: bool


def is_held_out(color: str, shape: str) -> bool:
    """True for the color+shape pairs that the training split never shows."""
    return (color, shape) in HELD_OUT


def _pairs(split: str) -> list:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if split == "train":
        return [p for p in pairs if p not in HELD_OUT]
    return sorted(HELD_OUT) if split == "held_out" else pairs


def sample_scenes(n: int, seed: int = 0, split: str = "train") -> list:
    """``n`` random scenes drawn from ``split`` ("train" excludes :data:`HELD_OUT`; "held_out"; "all").

    >>> [s.shape for s in sample_scenes(3, seed=1)] == [s.shape for s in sample_scenes(3, seed=1)]
    True
    """
    rng = np.random.default_rng(seed)
    pairs = _pairs(split)
    bgs, sizes, positions = list(BACKGROUNDS), list(SIZES), list(POSITIONS)
    scenes = []
    for _ in range(n):
        color, shape = pairs[rng.integers(len(pairs))]
        scenes.append(Scene(shape, color, bgs[rng.integers(len(bgs))], sizes[rng.integers(len(sizes))],
                            positions[rng.integers(len(positions))], dx=float(rng.uniform(-0.04, 0.04)),
                            dy=float(rng.uniform(-0.04, 0.04)), scale=float(rng.uniform(0.9, 1.1))))
    return scenes


def _polygon(shape: str, cx: float, cy: float, r: float) -> list:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, centered on its bounding box
        R = 1.1 * r
        pts = [(cx + R * math.cos(a), cy + R * math.sin(a)) for a in np.radians([-90, 30, 150])]
        shift = R * 0.25
        return [(x, y + shift) for x, y in pts]
    R, inner = 1.15 * r, 0.45 * 1.15 * r  # five-pointed star, pointing up
    pts = []
    for k in range(10):
        a = math.radians(-90 + 36 * k)
        rad = R if k % 2 == 0 else inner
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + 0.1 * R))
    return pts


def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """The scene as an RGB ``uint8`` array of shape (size, size, 3), anti-aliased by supersampling."""
    from PIL import Image, ImageDraw

    big = size * supersample
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    r = SIZES[scene.size] * scene.scale
    px, py = POSITIONS[scene.position]
    margin = r + 0.03
    cx = float(np.clip(px + scene.dx, margin, 1 - margin)) * big
    cy = float(np.clip(py + scene.dy, margin, 1 - margin)) * big
    color = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r * big, cy - r * big, cx + r * big, cy + r * big], fill=color)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r * big), fill=color)
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


def _position_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def caption(scene: Scene, with_size: bool = True, with_position: bool = True, with_color: bool = True) -> str:
    """Plain-English caption; size, position and the object's color may be left out (training varies this)."""
    parts = ["a"] + ([scene.size] if with_size else []) + ([scene.color] if with_color else []) + [scene.shape]
    if with_position:
        parts.append(_position_phrase(scene.position))
    return " ".join(parts + [f"on a {scene.background} background"])


_ALT = lambda names: "|".join(sorted(names, key=len, reverse=True))  # noqa: E731  longest first
_CAPTION = re.compile(
    rf"^an? (?:(?P<size>{_ALT(SIZES)}) )?(?P<color>{_ALT(COLORS)}) (?P<shape>{_ALT(SHAPES)})"
    rf"(?: (?:at|in|on) the (?P<position>{_ALT(POSITIONS)}))?"
    rf"(?: on an? (?P<background>{_ALT(BACKGROUNDS)}) background)?$")


def parse(prompt: str) -> Attributes:
    """Attributes named by a caption written like :func:`caption`'s; raises ``ValueError`` otherwise.

    >>> parse("a blue star on a black background")
    Attributes(shape='star', color='blue', background='black', size=None, position=None)
    """
    m = _CAPTION.match(" ".join(prompt.lower().strip().rstrip(".").split()))
    if not m:
        raise ValueError(f"cannot parse prompt {prompt!r}; expected e.g. "
                         f"'a small red circle at the top left on a white background'")
    return Attributes(**m.groupdict())


def eval_prompts() -> tuple:
    """Deterministic evaluation prompts: every color+shape pair, held-out pairs more often (and marked).

    Backgrounds, sizes and positions cycle with co-prime strides so each pair meets several of them.

    >>> prompts = eval_prompts()
    >>> len(prompts) >= 64, sum(p.held_out for p in prompts)
    (True, 20)
    """
    bgs, sizes, positions = list(BACKGROUNDS), list(SIZES), list(POSITIONS)
    out, k = [], 0
    for color, shape in _pairs("all"):
        for _ in range(5 if is_held_out(color, shape) else 3):
            scene = Scene(shape, color, bgs[k % len(bgs)], sizes[(k // 3) % len(sizes)],
                          positions[(k * 4) % len(positions)])
            out.append(EvalPrompt(caption(scene), scene, is_held_out(color, shape)))
            k += 1
    return tuple(out)
