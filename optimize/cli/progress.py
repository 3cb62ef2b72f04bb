"""Console rendering for the CLI: stage progress bars with per-item and per-stage times, and the info summary."""
from __future__ import annotations

import sys

from diffaccel.optimize.stages.base import Reporter


class ConsoleReporter(Reporter):
    """Draws one tqdm bar per stage on stderr; prints per-item and per-stage times."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr   # looked up now, not at import
        self.bar = None
        self.times: dict = {}

    def stage_start(self, name, items):
        from tqdm import tqdm

        self._close_bar()
        self.times[name] = []
        if items:
            self.bar = tqdm(total=len(items), desc=f"{name:>8}", unit="part", file=self.stream, leave=False,
                            bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} {postfix} [{elapsed}]")
        else:
            print(f"{name:>8} ...", file=self.stream, flush=True)

    def item(self, stage, item):
        if self.bar is not None:
            self.bar.set_postfix_str(item)

    def item_done(self, stage, item, seconds, peak_bytes=0):
        peak = f" {peak_bytes / 1e9:.1f} GB" if peak_bytes else ""
        self.times.setdefault(stage, []).append(f"{item} {seconds:.1f}s{peak}")
        if self.bar is not None:
            self.bar.update(1)

    def stage_end(self, name, seconds, skipped, reason="", peak_bytes=0, anon_bytes=0):
        self._close_bar()
        if skipped:
            print(f"{name:>8}: skipped ({reason})", file=self.stream, flush=True)
        else:
            detail = f"  [{', '.join(self.times.get(name, []))}]" if self.times.get(name) else ""
            peak = f", peak RSS {peak_bytes / 1e9:.2f} GB" if peak_bytes else ""
            peak += f" (anonymous {anon_bytes / 1e9:.2f} GB)" if peak_bytes and anon_bytes else ""
            print(f"{name:>8}: done in {seconds:.1f}s{peak}{detail}", file=self.stream, flush=True)

    def _close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        self._close_bar()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def guidance_text(m) -> str:
    """How the artifact's denoiser serves classifier-free guidance (``optimize --guidance``), for ``diffaccel info``."""
    scale, den = m.built_guidance, m.denoiser
    if m.takes_guidance:
        return f"{scale:g}: the {den} takes guidance as an input (its batch is never doubled)"
    if scale <= 1:
        return f"{scale:g}: built for guidance <= 1 only ({den} batch not doubled; guidance_scale > 1 is refused)"
    return f"{scale:g}: classifier-free guidance doubles the {den} batch (guidance <= 1 runs too)"


def _component_lines(components: dict) -> list:
    """One row per component; a ``--step-cache`` denoiser is its parts' total, with the split, and its parts
    indented under it (each weight is in one part)."""
    def row(name, c, size=None, engine=None):
        size = sum(f["bytes"] for f in c.get("files", [])) if size is None else size
        val = c.get("validation", {})
        errs = [o.get("max_abs", float("nan")) for p in val.get("points", []) for o in p["outputs"].values()]
        parity = (("ok " if val.get("passed") else "FAIL ") + f"{max(errs):.2g}") if errs else "n/a"
        return f"{name:<13} {c.get('precision', '?'):<9} {_mb(size):>10}  {parity:<24} {engine or c.get('engine')}"

    splits = {n: c["step_cache"] for n, c in components.items() if c.get("step_cache")}
    parts = {g: n for n, r in splits.items() for g in r["graphs"].values()}
    lines = []
    for name, c in components.items():
        if name in parts and parts[name] in components:
            continue                          # listed under its split denoiser
        if name not in splits:
            lines.append(row(name, c))
            continue
        r = splits[name]
        graphs = {p: (g, components.get(g, {})) for p, g in r["graphs"].items()}
        total = sum(f["bytes"] for _, e in graphs.values() for f in e.get("files", []))
        lines.append(row(name, c, total, f"{r['method']} split at branch {r['branch']} (block {r['block']}, layer "
                                         f"{r['layer']}): {' + '.join(graphs)}"))
        lines += [row(f"  {g}", e) for g, e in graphs.values()]
    return lines


def format_info(m) -> str:
    src = m.source
    lines = [f"artifact   {m.root}",
             f"status     {m.get('status')}",
             f"source     {src.get('spec')} ({src.get('kind')}, sha256 {src.get('sha256', '')[:12]})",
             f"backend    {m.get('backend')}" + (f" / provider {m.get('provider')}" if m.get("provider") else ""),
             f"precision  {m.get('precision')}",
             f"shapes     batch {m['shapes']['batch']}, height {m['shapes']['height'] or 'default'}, "
             f"width {m['shapes']['width'] or 'default'}",
             f"guidance   {guidance_text(m)}",
             "", f"{'component':<13} {'precision':<9} {'size':>10}  {'parity (max abs err)':<24} engine"]
    lines += _component_lines(m.components)
    lines += ["", f"{'stage':<13} {'time':>9} {'peak RSS':>10} {'anonymous':>10}"]
    for k, v in m.stages.items():
        peak = f"{v['peak_rss_bytes'] / 1e9:.2f} GB" if v.get("peak_rss_bytes") else "n/a"
        anon = f"{v['peak_anon_bytes'] / 1e9:.2f} GB" if v.get("peak_anon_bytes") else "n/a"
        items = v.get("component_peak_rss_bytes") or {}
        detail = ("  (" + ", ".join(f"{c} {b / 1e9:.2f} GB" for c, b in items.items()) + ")") if items else ""
        lines.append(f"{k:<13} {v['seconds']:>8.1f}s {peak:>10} {anon:>10}{detail}")
    lines.append("")
    tools = m.get("tools", {})
    lines.append("tools:  " + ", ".join(f"{k} {v}" for k, v in tools.items() if k != "platform"))
    return "\n".join(lines)
