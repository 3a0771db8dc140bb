"""docs/method.md is the method document the code cites: every ``docs/method.md#anchor`` in the repository's
sources, tests, benchmarks, node pack and documentation (and every ``(#anchor)`` link inside method.md) names a
heading of method.md, by GitHub's rule for heading anchors. Every relative link of README.md and the pages of
docs/ reaches a file, and with an anchor a heading of that Markdown file."""

import re
from pathlib import Path

import pytest

THIS = Path(__file__).resolve()  # its citations are made-up examples
ROOT = THIS.parents[1]
CITING = ("src", "tests", "benchmarks", "docs", "comfyui")  # folders whose text files may cite method.md
TEXT = {".py", ".md", ".txt", ".rst", ".toml", ".cfg", ".json", ".yaml", ".yml", ".sh", ".js", ".html"}
CITATION = re.compile(r"\bmethod\.md#([\w-]+)")  # docs/method.md#x, or method.md#x from a page beside it
OWN_LINK = re.compile(r"\]\(#([\w-]+)\)")  # [text](#x) inside method.md
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target "title")
CODE_SPAN = re.compile(r"`[^`]*`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: the text as rendered (a link's text, no markup), lower-cased,
    every character that is not a letter, digit, underscore, hyphen or space removed, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(markdown: str):
    """The lines of a Markdown text outside fenced code, with their numbers (from 1)."""
    fenced = False
    for number, line in enumerate(markdown.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def anchors(markdown: str) -> set[str]:
    """The anchors of a page's ATX headings, outside fenced code; a repeated one gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    for _, line in prose(markdown):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def citations(root: Path) -> dict[str, list[str]]:
    """Every anchor of method.md cited under ``root`` (its CITING folders and its top-level files), with the
    places (``path:line``) that cite it."""
    files = [f for f in root.iterdir() if f.is_file()]
    for folder in CITING:
        files += [f for f in (root / folder).rglob("*") if f.is_file() and ".egg-info" not in str(f)]
    cited: dict[str, list[str]] = {}
    for path in sorted(files):
        if (path.suffix not in TEXT and path.name != "Makefile") or path == THIS:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        own = path == root / "docs" / "method.md"
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in (CITATION, OWN_LINK) if own else (CITATION,):
                for anchor in pattern.findall(line):
                    cited.setdefault(anchor, []).append(f"{path.relative_to(root)}:{number}")
    return cited


def broken_citations(root: Path) -> dict[str, list[str]]:
    """The cited anchors that no heading of ``root/docs/method.md`` produces, with where they are cited."""
    method = root / "docs" / "method.md"
    headings = anchors(method.read_text(encoding="utf-8")) if method.is_file() else set()
    return {anchor: places for anchor, places in citations(root).items() if anchor not in headings}


def documents(root: Path) -> list[Path]:
    """The Markdown a reader browses: README.md and every page of docs/."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def broken_links(root: Path) -> dict[str, list[str]]:
    """The relative links of ``documents(root)`` (outside fenced code and code spans) that reach no file, or
    name an anchor that no heading of their Markdown file produces; absolute paths count as broken (they do
    not resolve in a checkout). Each with the places (``path:line``) that make it."""
    broken: dict[str, list[str]] = {}
    for path in documents(root):
        for number, line in prose(path.read_text(encoding="utf-8")):
            for target in LINK.findall(CODE_SPAN.sub("", line)):
                if EXTERNAL.match(target):
                    continue
                file, _, anchor = target.partition("#")
                linked = (path.parent / file).resolve() if file else path
                ok = not file.startswith("/") and linked.exists()
                if ok and anchor:
                    ok = linked.suffix == ".md" and anchor in anchors(linked.read_text(encoding="utf-8"))
                if not ok:
                    broken.setdefault(target, []).append(f"{path.relative_to(root)}:{number}")
    return broken


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    assert len(documents(ROOT)) >= 10  # README.md and the pages it links
    broken = broken_links(ROOT)
    assert not broken, "links that reach nothing: " + "; ".join(
        f"{target} (at {', '.join(places)})" for target, places in sorted(broken.items())
    )


def test_a_link_to_a_missing_file_or_heading_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n\n## On a GPU (`gpu.py`)\n")
    (tmp_path / "docs" / "a.png").write_bytes(b"")
    (tmp_path / "docs" / "models.md").write_text(
        '# Models\n\n## The pipelines\n\n[up](#the-pipelines) [down](#nowhere) ![pic](a.png "title")\n'
        "[gpu](../BENCHMARKS.md#on-a-gpu-gpupy) [cpu](../BENCHMARKS.md#on-a-cpu) [web](https://example.org/x#y)\n"
        "```\n[in code](missing.md)\n```\n`[in a span](missing.md)` [absolute](/docs/models.md)\n"
    )
    (tmp_path / "README.md").write_text(
        "[models](docs/models.md) [apps](docs/web-apps.md) [img](docs/b.png) [pipes](docs/models.md#the-pipelines)\n"
    )
    assert broken_links(tmp_path) == {
        "#nowhere": ["docs/models.md:5"],
        "../BENCHMARKS.md#on-a-cpu": ["docs/models.md:6"],
        "/docs/models.md": ["docs/models.md:10"],
        "docs/web-apps.md": ["README.md:1"],
        "docs/b.png": ["README.md:1"],
    }


def test_every_citation_of_the_method_document_names_one_of_its_headings():
    cited = citations(ROOT)
    in_src = {a for a, places in cited.items() if any(p.startswith("src/") for p in places)}
    assert {"mdma", "dmem", "rmpm", "training", "evaluation", "wan", "hunyuanvideo-15"} <= in_src  # found at all
    broken = broken_citations(ROOT)
    assert not broken, "docs/method.md has no heading for: " + "; ".join(
        f"#{anchor} (cited at {', '.join(places)})" for anchor, places in sorted(broken.items())
    )


def test_a_citation_of_a_heading_that_is_not_there_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "docs" / "method.md").write_text(
        "# The method\n\n## MDMA\n\n```\n## Inside a code block\n```\n\n## HunyuanVideo 1.5 ##\n\n## MDMA\n\n"
        "See [the rules](#mdma) and [nothing](#no-such-part).\n"
    )
    (tmp_path / "src" / "mod.py").write_text(
        "# docs/method.md#mdma, docs/method.md#mdma-1 and docs/method.md#hunyuanvideo-15's table\n"
        "X = 1  # docs/method.md#inside-a-code-block\n"
    )
    (tmp_path / "docs" / "models.md").write_text("[the Wan mapping](method.md#wan)\n")
    (tmp_path / "README.md").write_text("[DMEM](docs/method.md#dmem)\n")
    assert broken_citations(tmp_path) == {
        "no-such-part": ["docs/method.md:13"],
        "inside-a-code-block": ["src/mod.py:2"],
        "wan": ["docs/models.md:1"],
        "dmem": ["README.md:1"],
    }


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("MDMA", "mdma"),
        ("Attention without an N x N mask", "attention-without-an-n-x-n-mask"),
        ("HunyuanVideo 1.5", "hunyuanvideo-15"),
        ('The grouped kernel ("auto")', "the-grouped-kernel-auto"),
        ("Wan 2.2 I2V-A14B: two experts", "wan-22-i2v-a14b-two-experts"),
        ("The paper's form (Eqs. 12-13)", "the-papers-form-eqs-12-13"),
        ("`mask_kernel` and [its kernels](#x)", "mask_kernel-and-its-kernels"),
    ],
)
def test_anchors_follow_githubs_rule(heading, anchor):
    assert slug(heading) == anchor
