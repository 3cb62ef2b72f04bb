"""The one place prompts come from: a user's file, or the shipped default set (tinyshapes: its own captions).

>>> len(default_prompts()) >= 16
True
>>> default_prompts("tinyshapes", n=2)
('a small red circle at the top left on a white background', 'a large red square at the top right on a white background')
>>> read_prompts("no/such/file")
Traceback (most recent call last):
...
diffaccel.optimize.artifact.errors.DiffaccelError: prompts file no/such/file does not exist; give a text file with one prompt per line
"""
from __future__ import annotations

from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.sources.builtins import TINYSHAPES

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "data" / "prompts.txt"
TINYSHAPES_EVAL_PROMPTS = 16     # an even spread of tinyshapes' evaluation prompts (seen and held-out pairs)


def _lines(text: str) -> tuple:
    lines = (ln.strip() for ln in text.splitlines())
    return tuple(ln for ln in lines if ln and not ln.startswith("#"))


def read_prompts(path) -> tuple:
    """Prompts from a text file, one per line ('#' comments and blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DiffaccelError(f"prompts file {path} does not exist; give a text file with one prompt per line")
    prompts = _lines(p.read_text(encoding="utf-8"))
    if not prompts:
        raise DiffaccelError(f"prompts file {path} holds no prompts; write one prompt per line")
    return prompts


def default_prompts(source_spec: str = "", n: "int | None" = None) -> tuple:
    """The shipped prompts (the first ``n``); for tinyshapes, an even spread of its evaluation prompts."""
    if source_spec in TINYSHAPES:
        from diffaccel.optimize.sources import tinyshapes

        every = tinyshapes.eval_prompts()
        step = max(1, len(every) // TINYSHAPES_EVAL_PROMPTS)
        prompts = tuple(p.prompt for p in every[::step][:TINYSHAPES_EVAL_PROMPTS])
    else:
        prompts = _lines(PROMPTS_FILE.read_text())
    return prompts[:n] if n else prompts


def calibration_prompts(source_spec: str, size: int, seed: int, path: "str | None" = None) -> list:
    """``size`` calibration prompts: the user's file; for tinyshapes, captions of its training split (never the
    held-out pairs); else the shipped set. Repeated to ``size``."""
    if path:
        prompts = list(read_prompts(path))
    elif source_spec in TINYSHAPES:
        from diffaccel.optimize.sources import tinyshapes

        prompts = [tinyshapes.caption(s) for s in tinyshapes.sample_scenes(size, seed=seed)]
    else:
        prompts = list(default_prompts())
    return (prompts * -(-size // len(prompts)))[:size]
