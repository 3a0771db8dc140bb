"""A real ComfyUI server for the tests marked `comfy`: ComfyUI's own ``main.py --cpu`` (its source in
``../shared/comfyui``, or where ``COMFYUI`` says), on 127.0.0.1 at a free port, in a base directory of
its own whose ``custom_nodes/`` links to the repository's ``comfyui/`` folder (the node pack as users
install it) and whose ``models/`` holds what a test puts there.

``ComfyServer`` starts and stops one; the session fixture ``comfy_server`` in tests/conftest.py shares
one among the tests. Prompts go in as a client sends them (``/prompt`` with a ``client_id``) and their
messages come back over ``/ws``: ``run`` waits for a prompt's end and returns its history entry
with the messages it sent (progress, errors, interruption).

Run as a script it writes the UI form of each example workflow from its API form, as ComfyUI's own
frontend saves it (``python tests/comfy_server.py ui-workflows``; Chromium and chromedriver needed).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI") or ROOT.parent / "shared" / "comfyui")
NODE_PACK = ROOT / "comfyui"
WORKFLOWS = NODE_PACK / "workflows"
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes.py"
START_TIMEOUT_S = 240  # CPU start-up: ComfyUI imports torch and every node pack, then serves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies (no server outlives its tests)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def make_base_directory(base: Path) -> Path:
    """A ComfyUI base directory: ``custom_nodes/fleximmt`` a link to the repository's node pack, beside
    it the tests' own nodes (``tests/comfy_test_nodes.py``), the frontend's settings without its
    first-run dialog, and empty ``models/``, ``input/``, ``output/``."""
    for sub in ("custom_nodes", "models", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "fleximmt"
    if not link.exists():
        link.symlink_to(NODE_PACK, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"  # the frontend's: no first-run template dialog
    if not settings.exists():
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    test_nodes = base / "custom_nodes" / "fleximmt_test_nodes.py"  # test-only stand-ins (tests/comfy_test_nodes.py)
    if not test_nodes.exists():
        test_nodes.symlink_to(TEST_NODES)
    return base


@dataclass
class Run:
    """One prompt's end: its history entry and the messages the server sent about it."""

    prompt_id: str
    history: dict
    messages: list[dict] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.history.get("status", {}).get("status_str", "")

    def events(self, kind: str) -> list[dict]:
        """The data of every ``kind`` message (``progress``, ``execution_error``, ...) of this prompt."""
        return [m["data"] for m in self.messages if m.get("type") == kind]

    @property
    def error(self) -> dict | None:
        """The ``execution_error`` (node_id, node_type, exception_message, ...), if it failed so."""
        for event, data in self.history.get("status", {}).get("messages", []):
            if event == "execution_error":
                return data
        return None

    @property
    def interrupted(self) -> bool:
        return any(event == "execution_interrupted" for event, _ in self.history.get("status", {}).get("messages", []))

    def progress(self, node: str) -> list[int]:
        """The progress values node ``node`` reported, in order."""
        return [d["value"] for d in self.events("progress") if str(d.get("node")) == str(node)]

    def outputs(self, node: str) -> dict:
        return self.history.get("outputs", {}).get(str(node), {})


class PromptRejected(Exception):
    """``/prompt`` refused a prompt (ComfyUI's validation): ``.body`` holds its ``error`` and ``node_errors``."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body)[:2000])
        self.body = body


class ComfyServer:
    """ComfyUI serving on 127.0.0.1 from ``base`` (see :func:`make_base_directory`); ``stop`` ends it
    (also when the test process dies). The log is ``base/comfyui.log``."""

    def __init__(self, base: Path, comfyui: Path = COMFYUI, python: str = sys.executable, extra_args: tuple = ()):
        if not (comfyui / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI at {comfyui}: set COMFYUI to its source folder (make test-comfy does)")
        self.base = make_base_directory(Path(base))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = self.base / "comfyui.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - the server writes to it until stop()
        self.process = subprocess.Popen(
            [
                python,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--base-directory",
                str(self.base),
                "--disable-auto-launch",
                "--database-url",
                f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
                *extra_args,
            ],
            cwd=comfyui,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self._messages: list[dict] = []
        self._lock = threading.Condition()
        self._ws = None
        try:
            self._wait_until_serving()
            self._listen()
        except BaseException:
            self.stop()
            raise

    # -- life ---------------------------------------------------------------------------------
    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log()[-4000:]}"
                )
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not serve within {START_TIMEOUT_S} s:\n{self.log()[-4000:]}")

    def _listen(self) -> None:
        """Collect every message the server sends this client over ``/ws`` (a background thread)."""
        import websocket

        self._ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=600)

        def read():
            while True:
                try:
                    text = self._ws.recv()
                except Exception:  # closed: the server or the test stopped
                    return
                if not text:
                    return
                if isinstance(text, str):  # binary frames are previews
                    with self._lock:
                        self._messages.append(json.loads(text))
                        self._lock.notify_all()

        threading.Thread(target=read, daemon=True, name="comfy-ws").start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()

    # -- HTTP ---------------------------------------------------------------------------------
    def get(self, path: str):
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict | None = None) -> tuple[int, dict | None]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            text = err.read()
            return err.code, json.loads(text) if text else None

    def object_info(self, node: str | None = None) -> dict:
        info = self.get("/object_info" + (f"/{node}" if node else ""))
        return info[node] if node else info

    # -- prompts ------------------------------------------------------------------------------
    def submit(self, prompt: dict) -> str:
        """Queue ``prompt`` (API format) as this client; returns its id, or raises :class:`PromptRejected`."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(body or {})
        return body["prompt_id"]

    def messages(self, prompt_id: str) -> list[dict]:
        with self._lock:
            return [m for m in self._messages if (m.get("data") or {}).get("prompt_id") == prompt_id]

    def wait_for(self, condition, timeout: float = 600, what: str = "a message") -> list[dict]:
        """Block until ``condition(messages)`` is true of all messages so far; returns them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not condition(self._messages):
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive():
                    raise TimeoutError(
                        f"waited for {what}; ComfyUI {'is up' if self.alive() else 'exited'}:\n{self.log()[-3000:]}"
                    )
                self._lock.wait(min(left, 1.0))
            return list(self._messages)

    def wait_for_progress(self, prompt_id: str, node: str, at_least: int, timeout: float = 600) -> int:
        """Block until node ``node`` of the prompt reported progress ``at_least``; returns the value seen."""

        def values(messages):
            return [
                m["data"]["value"]
                for m in messages
                if m.get("type") == "progress"
                and m["data"].get("prompt_id") == prompt_id
                and str(m["data"].get("node")) == str(node)
            ]

        messages = self.wait_for(
            lambda ms: any(v >= at_least for v in values(ms)), timeout, f"node {node} to report step {at_least}"
        )
        return max(values(messages))

    def finish(self, prompt_id: str, timeout: float = 600) -> Run:
        """Wait until the prompt ended (success, error or interruption); its history and messages."""

        def ended(messages):
            return any(
                m.get("type") in ("execution_success", "execution_error", "execution_interrupted")
                and m["data"].get("prompt_id") == prompt_id
                for m in messages
            )

        self.wait_for(ended, timeout, f"prompt {prompt_id} to end")
        deadline = time.monotonic() + 60
        while prompt_id not in (history := self.get(f"/history/{prompt_id}")):  # written just after the message
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} ended but has no history")
            time.sleep(0.2)
        return Run(prompt_id, history[prompt_id], self.messages(prompt_id))

    def run(self, prompt: dict, timeout: float = 600) -> Run:
        return self.finish(self.submit(prompt), timeout)

    def interrupt(self, prompt_id: str) -> None:
        """Interrupt the prompt if it is the one running (the frontend's cancel button)."""
        status, _ = self.post("/interrupt", {"prompt_id": prompt_id})
        assert status == 200

    def queue(self) -> dict:
        return self.get("/queue")

    def output_file(self, item: dict) -> Path:
        """The file an output node wrote (an entry of a history output: filename, subfolder, type)."""
        return self.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"]


# -- workflows ----------------------------------------------------------------------------------
def load_workflow(name: str) -> dict:
    """An example workflow's API form (``comfyui/workflows/NAME.api.json``)."""
    return json.loads((WORKFLOWS / f"{name}.api.json").read_text())


def frontend_app(driver, url: str, timeout: float = 180):
    """Open ComfyUI's frontend in ``driver`` and wait until its app has a graph and the node definitions."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    ready = (
        "const a = window.comfyAPI?.app?.app; return !!(a && a.graph && window.LiteGraph && "
        "LiteGraph.registered_node_types['FlexiMMTTransfer'])"
    )
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(ready))


def layout(api: dict, sizes: dict[str, tuple[float, float]], gap: tuple[int, int] = (50, 50)) -> dict[str, list]:
    """Positions for an API workflow's nodes: columns from left to right in the order data flows (a node
    one column right of its farthest input), a loader in the column just left of its first consumer
    (not all loaders in the first column), each column's nodes stacked by id; ``sizes`` as drawn."""
    sources = {k: [v[0] for v in node["inputs"].values() if isinstance(v, list)] for k, node in api.items()}
    column: dict[str, int] = {}

    def depth(k: str) -> int:
        if k not in column:
            column[k] = 1 + max((depth(s) for s in sources[k]), default=-1)
        return column[k]

    for k in api:
        depth(k)
    for k in api:
        consumers = [c for c in api if k in sources[c]]
        if not sources[k] and consumers:
            column[k] = min(column[c] for c in consumers) - 1
    positions, x = {}, 0.0
    for c in sorted(set(column.values())):
        members = sorted((k for k in api if column[k] == c), key=int)
        y = 0.0
        for k in members:
            positions[k] = [x, y + 30]  # a node's position is below its 30-pixel title
            y += sizes[k][1] + 30 + gap[1]
        x += max(sizes[k][0] for k in members) + gap[0]
    return positions


def ui_from_api(driver, api: dict, name: str) -> dict:
    """The UI form of an API workflow as the frontend saves it: loaded with its own ``loadApiJson``,
    laid out by :func:`layout` once the loaders show their images and videos, then
    ``graphToPrompt().workflow`` (what Save / Export write)."""
    driver.execute_script("window.comfyAPI.app.app.loadApiJson(arguments[0], arguments[1])", api, name)
    time.sleep(3)  # the previews of the example's inputs arrive and the loader nodes grow
    sizes = driver.execute_script(
        "return Object.fromEntries(window.comfyAPI.app.app.graph._nodes"
        ".map(n => [String(n.id), [n.size[0], n.size[1]]]))"
    )
    driver.execute_script(
        "const g = window.comfyAPI.app.app.graph;"
        "for (const [id, pos] of Object.entries(arguments[0])) g.getNodeById(id).pos = pos;",
        layout(api, sizes),
    )
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.comfyAPI.app.app.graphToPrompt().then(p => done(JSON.parse(JSON.stringify(p.workflow))));"
    )


def prompt_from_ui(driver, ui: dict, name: str = "workflow") -> dict:
    """The API prompt the frontend queues for a UI workflow it loads (``loadGraphData``, ``graphToPrompt``)."""
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.comfyAPI.app.app.loadGraphData(arguments[0], true, true, arguments[1]).then(() => done(true));",
        ui,
        name,
    )
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.comfyAPI.app.app.graphToPrompt().then(p => done(JSON.parse(JSON.stringify(p.output))));"
    )


def write_ui_workflows() -> list[Path]:
    """Write ``comfyui/workflows/NAME.json`` (UI form) for every ``NAME.api.json`` there."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import headless_chromium

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        from fleximmt.apps.comfy.examples import write_inputs

        server = ComfyServer(Path(tmp) / "base")
        write_inputs(server.base / "input")
        driver = headless_chromium(Path(tmp) / "profile", height=1200)
        try:
            frontend_app(driver, server.url)
            for path in sorted(WORKFLOWS.glob("*.api.json")):
                name = path.name[: -len(".api.json")]
                ui = ui_from_api(driver, json.loads(path.read_text()), name)
                target = WORKFLOWS / f"{name}.json"
                target.write_text(json.dumps(ui, indent=2) + "\n")
                written.append(target)
        finally:
            driver.quit()
            server.stop()
    return written


if __name__ == "__main__":
    if sys.argv[1:] != ["ui-workflows"]:
        sys.exit("usage: python tests/comfy_server.py ui-workflows   (writes comfyui/workflows/*.json from *.api.json)")
    for written in write_ui_workflows():
        print(f"wrote {written.relative_to(ROOT)}")
