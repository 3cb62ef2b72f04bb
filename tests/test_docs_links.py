"""The README and docs/ as contracts: every relative link reaches a file and every ``#anchor`` a heading of it (GitHub's
heading slugs), the README stays a page for users (under 200 lines), and its test command is the one CI runs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def _prose(path: Path) -> list:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for line in _prose(path):
        if m := re.match(r"#{1,6}\s+(.*)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(doc: Path) -> list:
    bad = []
    for line in _prose(doc):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):           # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file) if file else doc
            if not dest.exists():
                bad.append(f"{target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    return bad


def test_slugs_follow_github():
    assert slug("Ray Serve: replicas × threads") == "ray-serve-replicas--threads"
    assert slug("Per-layer precision on OpenVINO (`--quality-target psnr=50`)") == \
        "per-layer-precision-on-openvino---quality-target-psnr50"
    assert slug("**The peer**: optimum-intel's own pipeline") == "the-peer-optimum-intels-own-pipeline"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n[ok](a.md#top) [gone](b.md) [no anchor](a.md#bottom)\n"
                                   "```\n[in code](c.md)\n```\n`[inline](d.md)` [web](https://example.com)\n")
    assert broken_links(tmp_path / "a.md") == ["b.md (no such file)", "a.md#bottom (no heading #bottom in a.md)"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(doc):
    assert not broken_links(doc), f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken_links(doc))}"


def test_readme_is_a_users_page_whose_test_command_is_ci():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200, "README.md is for users: measurements go to docs/measurements.md"
    fast, slow = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-2:]
    assert "-m \"not slow\"" in fast and slow.endswith("-m slow"), ".ci/run ends with the two tiers"
    assert fast in readme and slow in readme, "the README's test commands must be the ones .ci/run runs"
