"""The README and docs/*.md: every relative link reaches a file, every #anchor a heading of its
page (GitHub's anchor rules), every docs page is linked from the README, and the README stays
a front door (at most 260 lines)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 260

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside code: fenced blocks and indented code blocks become empty lines."""
    out: list[str] = []
    fence: str | None = None
    prev_blank, in_indented = True, False
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            out.append("")
            continue
        if m:
            fence = m.group(1)
            out.append("")
            continue
        blank = not line.strip()
        indented = line.startswith(("    ", "\t")) and not blank
        in_indented = indented and (prev_blank or in_indented)
        out.append("" if in_indented else line)
        prev_blank = blank
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, code marks dropped, lowercase, punctuation
    dropped (letters, digits, '_', '-' and spaces stay), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)
    return "".join(c for c in text.lower() if c.isalnum() or c in "_- ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor on the page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image on the page, code excluded."""
    found: list[tuple[int, str]] = []
    for no, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), 1):
        line = _CODE_SPAN.sub("", line)
        ref = _REF_DEF.match(line)
        if ref:
            found.append((no, ref.group(1)))
            continue
        found.extend((no, m.group(1)) for m in _LINK.finditer(line))
    return found


def broken_links(path: Path) -> list[str]:
    """What is wrong with the page's relative links, one line each; empty when all resolve."""
    bad: list[str] = []
    for no, target in links(path):
        where = f"{path.relative_to(ROOT)}:{no}: {target!r}"
        if not target:
            bad.append(f"{where}: empty link")
            continue
        if _SCHEME.match(target) or target.startswith("//"):
            continue  # an absolute URL: not checked here
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{where}: outside the repository")
            continue
        if not dest.exists():
            bad.append(f"{where}: no such file")
            continue
        if not anchor:
            continue
        if dest.suffix != ".md" or not dest.is_file():
            bad.append(f"{where}: an anchor into a file that has no headings")
        elif anchor not in anchors(dest):
            bad.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return bad


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert links(page) or page != README, "the README links nowhere"
    assert broken_links(page) == []


def test_readme_is_a_front_door() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES}"


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(README) if not _SCHEME.match(t)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"docs pages the README does not link: {missing}"


def test_every_docs_page_opens_with_a_title_and_a_paragraph() -> None:
    for page in sorted((ROOT / "docs").glob("*.md")):
        lines = [ln for ln in page.read_text(encoding="utf-8").splitlines() if ln.strip()]
        assert lines[0].startswith("# "), f"{page.name} does not open with a title"
        assert not lines[1].startswith(("#", "|", "-", "```", "    ")), f"{page.name}: no opening paragraph"


def test_slug_follows_githubs_rules() -> None:
    assert slug("What runs between backward and step") == "what-runs-between-backward-and-step"
    assert slug("Checkpoints: every rank's momentum") == "checkpoints-every-ranks-momentum"
    assert slug("Inside DDP, Hugging Face, Lightning and Accelerate") == (
        "inside-ddp-hugging-face-lightning-and-accelerate"
    )
    assert slug("Digits CNN, 4 to 16 workers (32 cut)") == "digits-cnn-4-to-16-workers-32-cut"
    assert slug("Under DDP: `dlion.attach`") == "under-ddp-dlionattach"
    assert slug("The bundled job: `dlion train`") == "the-bundled-job-dlion-train"
    assert slug("snake_case [a link](x.md)") == "snake_case-a-link"


def test_the_checker_finds_what_is_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n"
        "[ok](docs/a.md#two-words) [ok, repeated](docs/a.md#two-words-1) [ok, here](#top)\n"
        "[web](https://example.com/x) `[in code](nowhere.md)`\n\n"
        "    [indented code](nowhere.md)\n\n"
        "```\n[fenced](nowhere.md)\n```\n\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#three) [bad here](#bottom) ![img](docs/x.png)\n",
        encoding="utf-8",
    )
    bad = broken_links(page)
    assert [b.split(": ", 1)[1] for b in bad] == [
        "'docs/b.md': no such file",
        "'docs/a.md#three': no heading with anchor #three in docs/a.md",
        "'#bottom': no heading with anchor #bottom in README.md",
        "'docs/x.png': no such file",
    ]
