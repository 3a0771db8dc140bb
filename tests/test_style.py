"""The repository's Python is formatted by ruff (``make lint`` in CI); a table may keep its own alignment only
where it says why, on the marker's line."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"#\s*fmt:\s*(skip|off)\b(.*)")


def unexplained_markers(paths) -> list[str]:
    """``path:line`` of every ``# fmt: skip`` / ``# fmt: off`` whose line gives no reason after it."""
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = MARKER.search(line)
            if match and len(match.group(2).strip(" -:;,.")) < 10:
                found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}")
    return found


def test_every_formatter_marker_says_why():
    paths = [p for folder in ("src", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    assert unexplained_markers(paths) == []


def test_a_bare_marker_is_reported_and_an_explained_one_is_not(tmp_path):
    bare, explained = tmp_path / "bare.py", tmp_path / "explained.py"
    marker = "# fmt" + ": skip"  # written in two pieces, so that this file's own scan does not find it
    bare.write_text(f"TABLE = {{\n    'a': 1,  'bb': 2,\n}}  {marker}\n")
    explained.write_text(f"TABLE = {{'a': 1,  'bb': 2}}  {marker} - the columns line up with the paper's table 2\n")
    assert unexplained_markers([bare, explained]) == [f"{bare}:3"]
