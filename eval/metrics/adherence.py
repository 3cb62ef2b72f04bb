"""A deterministic prompt-adherence checker for tinyshapes images (no learned weights).

:func:`check` reads an image and reports the shape, object color and background color it sees, and whether each
matches the prompt; :func:`score` turns many checks into accuracies, overall and split into seen and held-out
color+shape pairs. The steps, each robust to what a generative model draws (soft edges, shifted colors, specks):

1. background: the median of the image border, named by the nearest background palette color;
2. object: pixels far from the background give a first object color; every pixel is then projected on the line
   from background to object color and kept when past halfway; the largest 4-connected blob is the object;
3. object color: the median of the blob's core pixels, named by the nearest object palette color;
4. shape: the nearest of four prototypes in a space of three geometric features: convex-hull solidity (stars
   are concave), bounding-box fill ratio (square ~1, circle ~pi/4, triangle ~1/2) and the height of the
   centroid in the box (a triangle's sits low).

>>> from diffaccel.optimize.sources.tinyshapes import Scene, caption, render
>>> scene = Scene("star", "blue", "beige", "large", "center")
>>> result = check(render(scene), caption(scene))
>>> result.shape, result.color, result.background, result.all_ok
('star', 'blue', 'beige', True)
"""
from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from diffaccel.optimize.sources.tinyshapes import BACKGROUNDS, COLORS, IMAGE_SIZE, is_held_out, parse

ATTRIBUTES = ("background", "color", "shape", "all")
MIN_CONTRAST = 40.0       # an object must differ from the background by this much (RGB distance) to be seen
MIN_AREA = 12             # blobs smaller than this many pixels (at 64x64) are specks, not objects
# Shape prototypes: (solidity, bounding-box fill, centroid height in the box from the top), midway between sharp
# renders and renders blurred by 1.5 px (stars are concave; a box is filled ~1 by a square, ~pi/4 by a circle,
# ~1/2 by a triangle, whose centroid sits 2/3 down from its apex). A blob takes the nearest prototype, each
# feature divided by its scale.
PROTOTYPES = {"circle": (0.95, 0.78, 0.5), "square": (0.98, 0.96, 0.5), "triangle": (0.91, 0.58, 0.63),
              "star": (0.68, 0.50, 0.55)}
FEATURE_SCALES = (0.05, 0.08, 0.04)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What :func:`check` saw in one image, next to what its prompt asked for."""

    prompt: str
    shape: "str | None"
    color: "str | None"
    background: str
    background_ok: bool
    color_ok: bool
    shape_ok: bool
    held_out: bool
    features: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def all_ok(self) -> bool:
        return self.background_ok and self.color_ok and self.shape_ok


@dataclasses.dataclass(frozen=True)
class Scores:
    """Accuracies (0..1) per attribute and for all three together, for ``n`` images."""

    n: int
    background: float
    color: float
    shape: float
    all: float


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    dist = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(dist))]


def _as_array(image) -> np.ndarray:
    """RGB float64 array at the world's size (other sizes are box-resampled)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:  # floats in 0..1, as diffusers' output_type="np" gives
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(image, dtype=np.float64)


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (breadth-first search; images are small)."""
    seen = np.zeros_like(mask)
    best: list = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        blob, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain: list = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = np.asarray(half(pts)[:-1] + half(pts[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _segment(img: np.ndarray, bg: np.ndarray):
    """(object mask, soft coverage) or (None, None) when nothing stands out from the background."""
    dist = np.linalg.norm(img - bg, axis=2)
    far = dist >= max(MIN_CONTRAST, 0.5 * np.percentile(dist, 99.5))
    if far.sum() < MIN_AREA // 2 or dist.max() < MIN_CONTRAST:
        return None, None
    first = np.median(img[far], axis=0)
    axis = first - bg
    t = np.tensordot(img - bg, axis, axes=([2], [0])) / max(float(axis @ axis), 1e-6)
    mask = _largest_blob(t > 0.5)
    if mask.sum() < MIN_AREA:
        return None, None
    return mask, t


def shape_features(mask: np.ndarray) -> dict:
    """Solidity (area / convex-hull area), bounding-box fill ratio and relative centroid height of a blob."""
    ys, xs = np.nonzero(mask)
    area = float(len(ys))
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = max(_hull_area(corners), area)
    height = float(ys.max() - ys.min() + 1)
    box = float(xs.max() - xs.min() + 1) * height
    centroid = (ys.mean() - ys.min() + 0.5) / height
    return {"area": area, "solidity": area / hull, "fill": area / box, "centroid": float(centroid)}


def classify_shape(features: dict) -> str:
    """The shape whose prototype is nearest to ``features`` (see :data:`PROTOTYPES`)."""
    f = np.asarray([features["solidity"], features["fill"], features["centroid"]])
    dist = {name: float(np.linalg.norm((f - np.asarray(p)) / FEATURE_SCALES)) for name, p in PROTOTYPES.items()}
    return min(dist, key=dist.get)


def _object_color(img: np.ndarray, mask: np.ndarray, t: np.ndarray) -> np.ndarray:
    core = mask & (t > 0.75)
    return np.median(img[core if core.sum() >= 4 else mask], axis=0)


def check(image, prompt: str) -> CheckResult:
    """Read ``image`` (PIL image, uint8 HxWx3 or float 0..1 array) and score it against ``prompt``."""
    want = parse(prompt)
    img = _as_array(image)
    bg = _background(img)
    background = _nearest(bg, BACKGROUNDS)
    mask, t = _segment(img, bg)
    shape = color = None
    features: dict = {}
    if mask is not None:
        features = shape_features(mask)
        shape = classify_shape(features)
        color = _nearest(_object_color(img, mask, t), COLORS)
    return CheckResult(prompt, shape, color, background,
                       background_ok=want.background is None or background == want.background,
                       color_ok=color == want.color, shape_ok=shape == want.shape,
                       held_out=is_held_out(want.color, want.shape), features=features)


def _accuracy(results) -> Scores:
    n = len(results)

    def mean(values):
        return float(np.mean(values)) if n else float("nan")

    return Scores(n, mean([r.background_ok for r in results]), mean([r.color_ok for r in results]),
                  mean([r.shape_ok for r in results]), mean([r.all_ok for r in results]))


def score(results) -> dict:
    """Accuracies for ``"overall"``, ``"seen"`` and ``"held_out"`` color+shape pairs.

    >>> from diffaccel.optimize.sources.tinyshapes import eval_prompts, render
    >>> prompts = eval_prompts()[:3]
    >>> score([check(render(p.scene), p.prompt) for p in prompts])["overall"].all
    1.0
    """
    results = list(results)
    return {"overall": _accuracy(results), "seen": _accuracy([r for r in results if not r.held_out]),
            "held_out": _accuracy([r for r in results if r.held_out])}


def format_table(scores: dict) -> str:
    """A plain-text table of :func:`score`'s output (percentages)."""
    lines = [f"{'split':<10}{'n':>6}" + "".join(f"{a:>12}" for a in ATTRIBUTES)]
    for split, s in scores.items():
        cells = "".join(f"{100 * getattr(s, a):>11.1f}%" for a in ATTRIBUTES)
        lines.append(f"{split:<10}{s.n:>6}{cells}")
    return "\n".join(lines)
