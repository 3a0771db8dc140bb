"""Test helpers shared by several test files: free ports and a headless Debian Chromium."""

import shutil
import socket

import pytest

needs_chromium = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def headless_chromium(profile_dir, height: int = 2400):
    """Debian's chromium under selenium, headless, with no background networking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
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
        f"--window-size=1280,{height}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


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
