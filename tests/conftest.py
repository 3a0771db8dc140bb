"""Shared test set-up: never reach the Hugging Face Hub; one tiny random-weight pipeline per session; torch on
one thread for the modules that ask."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest


@pytest.fixture(scope="session")
def tiny_pipe():
    """``fleximmt.toy.tiny_pipeline(0)``: 32 x 32 images, 9 frames, 16 text tokens, random weights.
    Shared by the whole session: read it, do not change its settings."""
    from fleximmt.toy import tiny_pipeline

    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models run fastest so (a second thread only waits on the first, more so on a shared CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tests marked `vision` (RAFT, SAM 2's video processors) need a torchvision that loads -------------
_TORCHVISION: list = []


def _torchvision_problem() -> str | None:
    """Why ``import torchvision`` fails here (None when it loads); checked once per run."""
    if not _TORCHVISION:
        try:
            import torchvision  # noqa: F401
        except Exception as err:  # ImportError, or RuntimeError from a torchvision built for another torch
            _TORCHVISION.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        else:
            _TORCHVISION.append(None)
    return _TORCHVISION[0]


def _comfy_problem() -> str | None:
    """Why ComfyUI cannot be started from this environment (None when its source and requirements are here)."""
    import importlib.util

    from comfy_server import COMFYUI

    if not (COMFYUI / "main.py").is_file():
        return f"no ComfyUI source at {COMFYUI}; set COMFYUI"
    missing = [
        m for m in ("torchsde", "av", "aiohttp", "comfyui_frontend_package") if importlib.util.find_spec(m) is None
    ]
    return f"ComfyUI's requirements are missing: {', '.join(missing)}" if missing else None


NEEDS = {"vision": ("torchvision", _torchvision_problem), "comfy": ("ComfyUI", _comfy_problem)}


def pytest_runtest_setup(item):
    """A `vision` test without a working torchvision, or a `comfy` test without ComfyUI and its
    requirements, fails where it was asked for (``-m vision`` / ``-m comfy``, as `make test-vision` and
    `make test-comfy` run them) or in CI (CI=true): no test skips there for want of them. Elsewhere
    (a plain ``pytest`` in .venv) it skips and says how to run it."""
    for marker, (what, find_problem) in NEEDS.items():
        if item.get_closest_marker(marker) is None:
            continue
        problem = find_problem()
        if problem is None:
            continue
        reason = f"needs {what} ({problem}): run `make test-{marker}`"
        ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
        if ci or marker in (item.config.getoption("markexpr", "") or ""):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


# -- tests marked `comfy`: one real ComfyUI server (tests/comfy_server.py) for the session ---------------
@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """ComfyUI's ``main.py --cpu`` on 127.0.0.1 (a free port) with the repository's node pack in a base
    directory of its own (``comfy_server.base``: put models under ``base / "models"``, inputs under
    ``base / "input"``); stopped when the session ends (and with the test process if it dies)."""
    from comfy_server import ComfyServer

    server = ComfyServer(tmp_path_factory.mktemp("comfyui"))
    yield server
    server.stop()
