"""A self-contained ``report.html``: inline CSS, every figure and image embedded as a base64 PNG data URI, no
scripts, fonts, stylesheets or links to anywhere else, so it opens offline and can be mailed as one file.

>>> page = render({"config": {}, "variants": []}, {}, {}, title="t")
>>> "http" in page
False
"""
from __future__ import annotations

import base64
import html as _html
import json
import re

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem;line-height:1.4}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.meta{color:#555;font-size:.9rem}.fail{color:#a00}
img{max-width:100%;height:auto}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}
pre{background:#f7f7f7;padding:.5rem;font-size:.8rem;overflow-x:auto}
details summary{cursor:pointer;font-weight:600}
"""

CAPTIONS = {
    "quality_vs_speed": "PSNR of each variant's images against the baseline's (same prompts, seeds, scheduler) "
                        "versus the whole image's latency (end to end, p50: text encoders, every step, VAE); the "
                        "dashed line is the Pareto front. The top line holds the baseline (identical to itself) and "
                        "every variant above 60 dB (lossless: float rounding), each labelled with its PSNR.",
    "latency_distribution": "Distribution of the denoiser's per-step latency over every denoising step of the timed "
                            "generations (warm-up excluded).",
    "stage_breakdown": "Mean time per image split into text encoders, denoiser (all steps), VAE decode and the rest "
                       "(scheduler, pre/post-processing).",
    "throughput": "End-to-end images per second for each batch size (a batch of prompts in one call).",
    "steps_sweep": "Left: latency as the number of denoising steps falls. Right: PSNR against the baseline at the "
                   "most steps - the baseline's own curve is what fewer steps cost.",
}


def esc(x) -> str:
    return _html.escape(str(x), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def cell(value) -> str:
    """A table cell; a Markdown link ``[text](relative/path)`` becomes a local link (never an external URL)."""
    m = re.fullmatch(r"\[([^\]]+)\]\(([^)\s:]+)\)", str(value))
    return f'<a href="{esc(m.group(2))}">{esc(m.group(1))}</a>' if m else esc(value)


def table(rows: list) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(png: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="{data_uri(png)}">{cap}</figure>'


def _section(title: str, body: str) -> str:
    return f"<h2>{esc(title)}</h2>\n{body}"


def _text(body: str) -> str:
    """Short Markdown-ish notes from the tables module: bullet lines and fenced code."""
    if body.startswith("```"):
        return f"<pre>{esc(body.strip('`').removeprefix('json').strip())}</pre>"
    lines = [ln[2:] if ln.startswith("- ") else ln for ln in body.splitlines()]
    items = "".join(f"<li>{esc(ln).replace('**', '')}</li>" for ln in lines if ln.strip())
    return f"<ul>{items}</ul>" if len(lines) > 1 or body.startswith("- ") else f"<p>{esc(body)}</p>"


def _grids(report: dict, grids: dict) -> str:
    prompts = report.get("config", {}).get("prompts", [])
    parts = []
    for name, png in grids.items():
        p, seed = name.removeprefix("grid-p").split("-seed")
        prompt = prompts[int(p)] if int(p) < len(prompts) else f"prompt {p}"
        parts.append(figure(png, name, f"“{prompt}”, seed {seed}: baseline | each variant | its absolute "
                                       "difference from the baseline (mean over RGB)"))
    return "\n".join(parts) or "<p>No images stored with this report.</p>"


def render(report: dict, figures: dict, grids: dict, title: str = "diffaccel eval report") -> str:
    """The whole page from the report dict, {name: PNG} figures and {name: PNG} image grids."""
    body = [f"<h1>{esc(title)}</h1>"]
    if report.get("variants") and report.get("baseline"):
        from diffaccel.eval.harness.host import describe
        from diffaccel.eval.report.tables import failures, headline, sections, summary_note, summary_rows

        body.append(f'<p class="meta">{esc(headline(report))}<br>host: {esc(describe(report["host"]))}<br>'
                    f'created {esc(report.get("created", ""))}, schema {esc(report.get("schema_version"))}</p>')
        note = summary_note(report)
        body.append(_section("Summary", table(summary_rows(report)) + (f"<p>{esc(note)}</p>" if note else "") +
                             "".join(f'<p class="fail">failed: {esc(f)}</p>' for f in failures(report))))
        body += [figure(png, name, CAPTIONS.get(name, "")) for name, png in figures.items()]
        body.append(_section("Baseline vs variants, per prompt and seed", _grids(report, grids)))
        for name, rows in sections(report):
            body.append(_section(name, table(rows) if isinstance(rows, list) else _text(rows)))
        body.append("<details><summary>Host</summary><pre>" + esc(json.dumps(report.get("host"), indent=1)) +
                    "</pre></details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
