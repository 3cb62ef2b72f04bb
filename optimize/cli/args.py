"""Parsing of flag values shared by every ``diffaccel`` command.

>>> comma_list("0, 1,", "--seeds", int)
(0, 1)
>>> comma_list(None, "--sweep-rates"), comma_list("", "--peers", empty_ok=True)
((), ())
>>> comma_list("0,x", "--seeds", int)
Traceback (most recent call last):
...
diffaccel.optimize.artifact.errors.DiffaccelError: bad --seeds '0,x': give comma-separated integers, e.g. --seeds 1,2
"""
from __future__ import annotations

import argparse

from diffaccel.optimize.artifact.errors import DiffaccelError

_KINDS = {int: ("integers", "1,2"), float: ("numbers", "0.5,1")}


def comma_list(text, flag: str, kind=str, *, empty_ok: bool = False, what: "str | None" = None,
               example: "str | None" = None) -> tuple:
    """The items of a comma-separated flag value, stripped, blanks skipped, each converted with ``kind``.

    ``None`` (the flag was not given) gives ``()``. An item ``kind`` refuses, or no item at all unless ``empty_ok``,
    raises a one-line :class:`DiffaccelError` naming ``flag`` and showing an example (``what``/``example`` override
    the defaults for ``kind``).
    """
    if text is None:
        return ()
    default_what, default_example = _KINDS.get(kind, ("values", "a,b"))
    try:
        values = tuple(kind(t.strip()) for t in str(text).split(",") if t.strip())
    except ValueError:
        values = None
    if values is None or not (values or empty_ok):
        raise DiffaccelError(f"bad {flag} {text!r}: give comma-separated {what or default_what}, "
                             f"e.g. {flag} {example or default_example}")
    return values


GUIDANCE_HELP = ("classifier-free guidance scale, or off (= 0) (default: the one the artifact was built for: "
                 "optimize --guidance, else a trained built-in's recommended one (2 for tinyshapes, 3 for "
                 "tinyshapes-xl and -sd3), else the diffusers pipeline's)")


def guidance_arg(text: str) -> float:
    """The argparse type of every ``--guidance``: a scale >= 0, or ``off`` (0).

    >>> guidance_arg("2"), guidance_arg("off")
    (2.0, 0.0)
    >>> guidance_arg("-1")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: bad guidance '-1': give a scale >= 0, e.g. 7.5 (off = 0: no classifier-free guidance)
    """
    from diffaccel.optimize.config import check_guidance

    try:
        return check_guidance(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
