"""tests/conftest.py's rule for tests marked `vision` (they need torchvision): where torchvision does
not load, such a test FAILS when it was asked for (``-m vision``, as `make test-vision` runs it) or
in CI (CI=true), and skips with the reason and the fix elsewhere. Checked in child pytest runs whose
``import torchvision`` fails, whether or not this environment has torchvision."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

NEEDS_VISION = """
import pytest


@pytest.mark.vision
def test_uses_torchvision():
    import torchvision  # noqa: F401


def test_plain():
    pass
"""


@pytest.fixture
def child(tmp_path):
    """Run pytest on a test file with one `vision` test and one plain test, beside a copy of our
    conftest.py, with a `torchvision` on the path that cannot be imported."""
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_needs_vision.py").write_text(NEEDS_VISION)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    vision: needs torchvision\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torchvision.py").write_text("raise ImportError('no torchvision here')\n")

    def run(*args: str, ci: bool) -> subprocess.CompletedProcess:
        path = os.pathsep.join(p for p in (str(broken), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "CI": "true" if ci else ""}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def test_a_vision_test_skips_with_its_reason_in_a_plain_run(child):
    done = child(ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 skipped" in done.stdout
    assert "needs torchvision (ImportError: no torchvision here): run `make test-vision`" in done.stdout


@pytest.mark.parametrize(("args", "ci"), [((), True), (("-m", "vision"), False)], ids=["CI=true", "-m vision"])
def test_a_vision_test_fails_in_ci_or_when_asked_for(child, args, ci):
    done = child(*args, ci=ci)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 error" in done.stdout and "skipped" not in done.stdout
    assert "needs torchvision (ImportError: no torchvision here)" in done.stdout


def test_make_tests_deselection_leaves_no_vision_test_to_fail_in_ci(child):
    done = child("-m", "not vision", ci=True)  # what `make test` runs
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 deselected" in done.stdout
