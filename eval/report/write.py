"""The evaluation report: ``report.json`` (versioned schema), ``report.md``, self-contained ``report.html``.

``report.json`` holds every number with its config and environment. It is plain JSON: an infinite value (the PSNR
of identical images) is stored as the string ``"inf"``, a missing or undefined one as ``null``. :func:`render_report`
rebuilds the Markdown, the HTML and the plots from report.json alone (plus the image files beside it, when present).

>>> json_safe({"psnr": float("inf"), "x": [float("nan"), 1.5]})
{'psnr': 'inf', 'x': [None, 1.5]}
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from diffaccel.optimize.artifact.errors import DiffaccelError
from diffaccel.optimize.artifact.files import atomic_write_bytes, atomic_write_json, atomic_write_text, fresh_dir

SCHEMA_VERSION = 1
REPORT = "report.json"


def json_safe(obj):
    """Recursively: inf -> "inf", -inf -> "-inf", nan -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):   # numpy scalar
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


# ---- writing -------------------------------------------------------------------------------------------------
def check_out_dir(out_dir) -> Path:
    """Refuse an output directory that holds something other than a previous report (checked before any work)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).is_file())):
        raise DiffaccelError(f"{out} exists and is not a diffaccel report; choose another -o or remove it")
    return out


def write_report(report: dict, images: dict, out_dir) -> dict:
    """Write images, report.json, report.md, report.html into a temporary folder beside ``out_dir``, then swap it
    into place, so ``out_dir`` holds a finished report or the previous one. Returns the stored report."""
    import numpy as np
    from PIL import Image

    out = check_out_dir(out_dir)
    with fresh_dir(out) as tmp:
        for rel, arr in images.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(arr)).save(tmp / rel)
        stored = json_safe(report)
        atomic_write_json(tmp / REPORT, stored)
        render_report(tmp / REPORT, tmp)
    return stored


def load_report(path) -> dict:
    p = Path(path)
    p = p / REPORT if p.is_dir() else p
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffaccelError(f"cannot read {p} ({e}); give a report.json written by diffaccel eval") from None
    if data.get("schema_version") != SCHEMA_VERSION or data.get("kind") != "diffaccel-eval":
        raise DiffaccelError(f"{p} is not a diffaccel eval report of schema {SCHEMA_VERSION} (found "
                             f"{data.get('kind')!r} schema {data.get('schema_version')}); re-run diffaccel eval")
    return data


def render_report(report_json, out_dir=None) -> dict:
    """Rebuild report.md, report.html and plots/*.png from report.json (images are read relative to it).
    Returns {"md": path, "html": path, "plots": [paths]}."""
    from diffaccel.eval.report import html
    from diffaccel.eval.report import plots

    src = Path(report_json)
    report = load_report(src)
    root = src.parent if src.is_file() else src
    out = Path(out_dir) if out_dir is not None else root
    (out / "plots").mkdir(parents=True, exist_ok=True)
    figures = plots.all_plots(report)
    grids = plots.image_grids(report, root)
    paths = []
    for name, png in {**figures, **grids}.items():
        path = out / "plots" / f"{name}.png"
        atomic_write_bytes(path, png)
        paths.append(path)
    atomic_write_text(out / "report.md", markdown(report, list(figures), list(grids)))
    atomic_write_text(out / "report.html", html.render(report, figures, grids))
    return {"md": out / "report.md", "html": out / "report.html", "plots": paths}


def markdown(report: dict, plot_names: list, grid_names: list = ()) -> str:
    """report.md: the summary, every detail table, and the figures (as files under plots/)."""
    from diffaccel.eval.harness.host import describe
    from diffaccel.eval.report.tables import headline, md_table, sections, summary_note, summary_rows

    note = summary_note(report)
    parts = [f"# diffaccel eval report\n\n{headline(report)}  \nhost: {describe(report['host'])}  \n"
             f"created {report['created']}\n", "## Summary\n\n" + md_table(summary_rows(report)) +
             (f"\n\n{note}" if note else "")]
    for title, rows in sections(report):
        parts.append(f"## {title}\n\n" + (md_table(rows) if isinstance(rows, list) else rows))
    parts.append("## Figures\n\n" + "\n\n".join(f"![{n}](plots/{n}.png)" for n in plot_names))
    if grid_names:
        parts.append("## Baseline vs variants (image | |difference|)\n\n" +
                     "\n\n".join(f"![{n}](plots/{n}.png)" for n in grid_names))
    return "\n\n".join(parts) + "\n"
