"""Test helpers shared by several test files: free ports, a headless Debian Chromium, a Gradio page's
session, a run killed at a step, a torchvision that does not load, processes started as a user starts
them, and the moving square that reference videos are made of."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

needs_chromium = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_options(profile_dir, width: int = 1280, height: int = 2400, binary: str | None = None):
    """Selenium's options for Debian's chromium (or ``binary``), headless, with no background networking."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = binary or shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile_dir}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    return options


def headless_chromium(profile_dir, height: int = 2400):
    """Debian's chromium under selenium, headless, with no background networking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(
        service=Service(shutil.which("chromedriver")), options=chromium_options(profile_dir, height=height)
    )


class GradioSession:
    """One page's session against a Gradio server over plain HTTP, as the browser speaks to it:
    events joined by ``fn_index`` (private ones too) with the values the page would send, and their
    results read from the session's event stream (``/gradio_api/queue/data``)."""

    def __init__(self, url: str, session_hash: str | None = None):
        import secrets

        import httpx

        self.url = url.rstrip("/")
        self.session_hash = session_hash or secrets.token_hex(8)
        self.http = httpx.Client(timeout=120)

    def fn_index(self, name: str) -> int:
        """The index of the page's event whose function is ``name`` (private events too), from ``/config``."""
        dependencies = self.http.get(f"{self.url}/config").raise_for_status().json()["dependencies"]
        return next(d["id"] for d in dependencies if d["api_name"] == name)

    def join(self, fn_index: int, data: list) -> str:
        """Queue one event; returns its id at once."""
        body = {
            "data": data,
            "event_data": None,
            "fn_index": fn_index,
            "trigger_id": None,
            "session_hash": self.session_hash,
        }
        response = self.http.post(f"{self.url}/gradio_api/queue/join", json=body)
        response.raise_for_status()
        return response.json()["event_id"]

    def messages(self):
        """The session's stream of messages (dicts), until the server closes it."""
        import json

        with self.http.stream(
            "GET", f"{self.url}/gradio_api/queue/data", params={"session_hash": self.session_hash}
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    yield message
                    if message.get("msg") == "close_stream":
                        return

    def results(self, event_ids: list[str]) -> dict[str, dict]:
        """The ``process_completed`` message of each event (``success``, and ``output``: ``data`` or ``error``)."""
        done = {}
        for message in self.messages():
            if message.get("msg") == "process_completed" and message.get("event_id") in event_ids:
                done[message["event_id"]] = message
                if len(done) == len(event_ids):
                    break
        return done

    def call(self, fn_index: int, data: list) -> dict:
        event = self.join(fn_index, data)
        return self.results([event])[event]

    def close(self) -> None:
        self.http.close()


def spy_optimiser(monkeypatch, seen) -> None:
    """``seen(params)`` with the parameters every ``torch.optim.AdamW`` is made with (train_motion's
    optimiser), as it is made."""
    import torch

    adamw = torch.optim.AdamW

    def spy(params, **kw):
        params = list(params)
        seen(params)
        return adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)


# -- a run killed at a step (training resumes from the checkpoint it saved) -----------------------------------
class Killed(Exception):
    """What :func:`run_killed`'s callback raises: the run stopped from outside."""


def run_killed(step: int, run, *args, **kwargs) -> None:
    """``run(*args, callback=..., **kwargs)`` killed once step ``step`` is done, as a cancel button or a dying
    process would stop it (the callback raises :class:`Killed`); the run must stop there."""

    def kill(done, loss):
        if done == step:
            raise Killed

    with pytest.raises(Killed):
        run(*args, callback=kill, **kwargs)


# -- a torchvision that does not load ------------------------------------------------------------------------
class BrokenTorchvision:
    """An import finder under which ``import torchvision`` fails as a torchvision built for another
    torch does (torch 2.13.0 + torchvision 0.28.0 here)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            raise RuntimeError("operator torchvision::nms does not exist")
        return


def forget_torchvision(monkeypatch) -> None:
    """Drop torchvision and its submodules from the import cache for this test (they come back after)."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)


def break_torchvision(monkeypatch) -> None:
    """From now on in this test, ``import torchvision`` fails as :class:`BrokenTorchvision` makes it."""
    monkeypatch.setattr(sys, "meta_path", [BrokenTorchvision(), *sys.meta_path])


# -- processes started as a user starts them -------------------------------------------------------------------
def accelerate_launch(args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m fleximmt ARGS``: two CPU processes (torchrun +
    gloo) on a free port, one thread each; ``env`` adds to the environment. Returns the finished process
    (text output captured)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "fleximmt",
        *map(str, args),
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def train_command(model, video, out, steps, tokens) -> list:
    """``fleximmt train``'s arguments for the ball that jumps up in ``video`` (the moving square)."""
    return [
        "train",
        "--model",
        model,
        "--video",
        video,
        "--caption",
        "A ball jumps up.",
        "--concept",
        "ball",
        "--motion-words",
        "jumps up",
        "--out",
        out,
        "--steps",
        steps,
        "--tokens",
        tokens,
    ]


@contextlib.contextmanager
def serving(args, scratch: Path):
    """``python -m fleximmt ARGS --port P`` (a Gradio server) in its own process, its temporary files
    (``TMPDIR``, ``GRADIO_TEMP_DIR``) in ``scratch / "tmp"`` and ``scratch / "gradio"``; yields the process
    and its port once its page answers (within 120 s), and kills it when the block ends."""
    import httpx

    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(scratch / "tmp"), GRADIO_TEMP_DIR=str(scratch / "gradio"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fleximmt", *map(str, args), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the server stopped"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "timed out waiting for the server to start"
            time.sleep(0.2)
        yield server, port
    finally:
        server.kill()


# -- videos --------------------------------------------------------------------------------------------------
def moving_square(frames=9, size=32, top=10, side=10, start=2, step=2, value=200) -> np.ndarray:
    """uint8 ``[frames, size, size, 3]``: a grey background and a ``side``-px square of grey ``value`` whose
    rows start at ``top``, moving right ``step`` px per frame from column ``start``."""
    video = np.full((frames, size, size, 3), 90, np.uint8)
    for t in range(frames):
        video[t, top : top + side, start + step * t : start + step * t + side] = value
    return video
