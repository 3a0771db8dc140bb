"""A real ComfyUI server for the tests marked `comfy`: ComfyUI's own ``main.py --cpu`` (its source in
``../shared/comfyui-0.33``, or where ``COMFYUI`` says: `make test-comfy` runs the tests once with 0.33
and once with ``../shared/comfyui``, 0.3.64), on 127.0.0.1 at a free port, in a base directory of its
own whose ``custom_nodes/`` links to the repository's ``comfyui/`` folder (the node pack as users
install it) and whose ``models/`` holds what a test puts there. A server of a version whose
frontend `make install-comfy` put aside (0.3.64's) finds it first on its path.

``ComfyServer`` starts and stops one, with latent previews on (``--preview-method auto``); the session
fixture ``comfy_server`` in tests/conftest.py shares one among the tests. Prompts go in as a client
sends them (``/prompt`` with a ``client_id``) and their messages come back over ``/ws``: ``run``
waits for a prompt's end and returns its history entry with the messages it sent (progress,
errors, interruption, previews).

Run as a script it writes the UI form of each example workflow from its API form, as ComfyUI's own
frontend saves it, and its thumbnail for the templates browser (``python tests/comfy_server.py
ui-workflows``, against 0.33 unless ``COMFYUI`` says; Chromium and chromedriver needed).
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
COMFYUI = Path(os.environ.get("COMFYUI") or ROOT.parent / "shared" / "comfyui-0.33")
NODE_PACK = ROOT / "comfyui"
WORKFLOWS = NODE_PACK / "example_workflows"  # the UI forms (and thumbnails) the templates browser lists
API_WORKFLOWS = WORKFLOWS / "api"  # the same workflows in API form, for /prompt
CURRENT = (0, 33, 0)  # the ComfyUI users run (../shared/comfyui-0.33); the oldest supported is 0.3.64
LEARN_STEPS = 24  # the toy example learns 300 steps (as make demo); the tests cut it to keep CI short
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes.py"
START_TIMEOUT_S = 240  # CPU start-up: ComfyUI imports torch and every node pack, then serves


def comfyui_version(comfyui: Path = COMFYUI) -> tuple[int, ...]:
    """The version of the ComfyUI source at ``comfyui`` (its ``comfyui_version.py``), e.g. ``(0, 33, 0)``."""
    text = (comfyui / "comfyui_version.py").read_text()
    return tuple(int(part) for part in text.split('__version__ = "')[1].split('"')[0].split("."))


def needs_comfyui(version: tuple[int, ...], why: str):
    """A test mark: the test runs against ComfyUI ``version`` and later (a model native only in 0.33, the
    current frontend), and says ``why`` where `make test-comfy` runs an older one. Without a ComfyUI
    source it marks nothing: tests/conftest.py fails such a run."""
    import pytest

    have = comfyui_version() if (COMFYUI / "comfyui_version.py").is_file() else None
    return pytest.mark.skipif(
        have is not None and have < version,
        reason=f"needs ComfyUI {'.'.join(map(str, version))} or later: {why}",
    )


def pinned_packages(comfyui: Path = COMFYUI) -> Path | None:
    """The folder of packages this ComfyUI pins older than the environment has (its frontend, workflow
    templates and embedded docs), where `make install-comfy` puts them: ``<venv>/comfyui-<version>``."""
    folder = Path(sys.prefix) / f"comfyui-{'.'.join(map(str, comfyui_version(comfyui)))}"
    return folder if folder.is_dir() else None


def fresh_motions(base: Path, names) -> None:
    """No motion of these names in the server's motions folder, nor what Learn keeps about them."""
    folder = base / "models" / "fleximmt_motions"
    for name in names:
        for path in folder.glob(f"{name}.*"):
            path.unlink()
    (folder / ".learned.json").unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies (no server outlives its tests)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def chromium(folder: Path, width: int = 1920, height: int = 1080):
    """Debian's Chromium, headless, under selenium, for the frontend tests: it and its chromedriver die
    with the test process, however that ends (chromedriver through ``PR_SET_PDEATHSIG``; Chromium,
    which chromedriver starts, through a launcher in ``folder`` that sets the same before it becomes
    Chromium; its own helper processes end with it)."""
    import shutil

    from helpers import chromium_options
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / "chromium"
    launcher.write_text(
        f"#!{sys.executable}\nimport ctypes, os, signal, sys\n"
        "ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
        f"os.execv({shutil.which('chromium')!r}, [{shutil.which('chromium')!r}, *sys.argv[1:]])\n"
    )
    launcher.chmod(0o755)
    options = chromium_options(folder / "profile", width, height, binary=str(launcher))
    service = Service(shutil.which("chromedriver"), popen_kw={"preexec_fn": _die_with_parent})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_window_size(width, height)
    return driver


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
    """One prompt's end: its history entry and the messages the server sent about it (previews as
    ``{"type": "preview", "data": {"prompt_id", "node", "image"}}``, the image a PIL image)."""

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

    def previews(self, node: str) -> list:
        """The preview images node ``node`` sent while it ran (PIL images), in order."""
        return [d["image"] for d in self.events("preview") if str(d.get("node")) == str(node)]


class PromptRejected(Exception):
    """``/prompt`` refused a prompt (ComfyUI's validation): ``.body`` holds its ``error`` and ``node_errors``."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body)[:2000])
        self.body = body


class ComfyServer:
    """ComfyUI serving on 127.0.0.1 from ``base`` (see :func:`make_base_directory`); ``stop`` ends it
    (also when the test process dies). The log is ``base/comfyui.log``."""

    def __init__(
        self,
        base: Path,
        comfyui: Path = COMFYUI,
        python: str = sys.executable,
        extra_args: tuple = ("--preview-method", "auto"),
    ):
        if not (comfyui / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI at {comfyui}: set COMFYUI to its source folder (make test-comfy does)")
        self.base = make_base_directory(Path(base))
        self.comfyui = comfyui
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = self.base / "comfyui.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        pinned = pinned_packages(comfyui)
        if pinned is not None:  # ahead of the environment's newer frontend: the one this version pins
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pinned), env.get("PYTHONPATH")]))
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
        # as the frontend does: previews then come with their node and prompt (PREVIEW_IMAGE_WITH_METADATA)
        self._ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))

        def read():
            while True:
                try:
                    text = self._ws.recv()
                except Exception:  # closed: the server or the test stopped
                    return
                if not text:
                    return
                message = json.loads(text) if isinstance(text, str) else preview_message(text)
                if message is not None:
                    with self._lock:
                        self._messages.append(message)
                        self._lock.notify_all()

        threading.Thread(target=read, daemon=True, name="comfy-ws").start()

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def version(self) -> tuple[int, ...]:
        return comfyui_version(self.comfyui)

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
    def submit(self, prompt: dict, **extra_data) -> str:
        """Queue ``prompt`` (API format) as this client, with ``extra_data`` (0.33: ``preview_method``);
        returns its id, or raises :class:`PromptRejected`."""
        body = {"prompt": prompt, "client_id": self.client_id, "extra_data": extra_data}
        status, body = self.post("/prompt", body)
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

    def run(self, prompt: dict, timeout: float = 600, **extra_data) -> Run:
        return self.finish(self.submit(prompt, **extra_data), timeout)

    def interrupt(self, prompt_id: str) -> None:
        """Interrupt the prompt if it is the one running (the frontend's cancel button)."""
        status, _ = self.post("/interrupt", {"prompt_id": prompt_id})
        assert status == 200

    def queue(self) -> dict:
        return self.get("/queue")

    def output_file(self, item: dict) -> Path:
        """The file an output node wrote (an entry of a history output: filename, subfolder, type)."""
        return self.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"]


def comfy_video_frames(path: Path):
    """A video's frames (IMAGE, float ``[T, H, W, 3]``) as the ``COMFYUI`` server's *Load Video* ->
    *Get Video Components* decode them: ComfyUI's own code, imported in this process (0.33 decodes
    to float through FFmpeg's gbrpf32le, 0.3.64 to 8-bit rgb24)."""
    from comfy_wan import import_comfy

    import_comfy()
    from comfy_api.latest import InputImpl

    return InputImpl.VideoFromFile(str(path)).get_components().images


def preview_message(frame: bytes) -> dict | None:
    """A binary ``/ws`` frame as a message: a preview with its node (``PREVIEW_IMAGE_WITH_METADATA``:
    the metadata's length, the metadata as JSON, the JPEG), None for other kinds."""
    import io

    from PIL import Image

    if int.from_bytes(frame[:4], "big") != 4:
        return None
    length = int.from_bytes(frame[4:8], "big")
    meta = json.loads(frame[8 : 8 + length])
    image = Image.open(io.BytesIO(frame[8 + length :]))
    image.load()
    return {
        "type": "preview",
        "data": {"prompt_id": meta.get("prompt_id"), "node": meta.get("node_id"), "image": image},
    }


# -- workflows ----------------------------------------------------------------------------------
def load_workflow(name: str) -> dict:
    """An example workflow's API form (``comfyui/example_workflows/api/NAME.json``)."""
    return json.loads((API_WORKFLOWS / f"{name}.json").read_text())


def example_names() -> list[str]:
    """The example workflows, by name."""
    return sorted(path.stem for path in API_WORKFLOWS.glob("*.json"))


def frontend_app(driver, url: str, timeout: float = 180):
    """Open ComfyUI's frontend in ``driver`` and wait until its app has a graph and the node definitions."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    ready = (
        "const a = window.comfyAPI?.app?.app; return !!(a && a.graph && window.LiteGraph && "
        "LiteGraph.registered_node_types['FlexiMMTTransfer'])"
    )
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(ready))


# How much taller a node grows once it shows what it made (ComfyUI 0.33's frontend, measured on the
# toy example at these nodes' widths: a video player, an image, Transfer's latent previews): the
# UI forms give these nodes that room from the start, so nothing they show covers another node.
ROOM = {"SaveVideo": 270, "PreviewImage": 230, "SaveImage": 230, "FlexiMMTTransfer": 210, "KSamplerAdvanced": 210}
# The size a loader has once it shows its file (measured likewise): it grows to it when the file arrives.
SHOWN = {"LoadImage": (283, 314), "LoadImageMask": (283, 318), "LoadVideo": (283, 357)}
TITLE = 30  # a node's title bar, drawn above its position


def layout(api: dict, sizes: dict[str, tuple[float, float]], gap: tuple[int, int] = (60, 40)) -> dict[str, list]:
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
            positions[k] = [x, y + TITLE]
            y += sizes[k][1] + TITLE + gap[1]
        x += max(sizes[k][0] for k in members) + gap[0]
    return positions


def ui_from_api(driver, api: dict, name: str) -> dict:
    """The UI form of an API workflow as the frontend saves it: loaded with its own ``loadApiJson``, the
    loaders given the size they have when they show their files (:data:`SHOWN`) and the nodes that
    show outputs their :data:`ROOM`, laid out by :func:`layout`, then ``graphToPrompt().workflow``
    (what Save / Export write) without a saved view: the frontend then fits the whole workflow to
    the window it opens in."""
    driver.execute_script("window.comfyAPI.app.app.loadApiJson(arguments[0], arguments[1])", api, name)
    time.sleep(2)
    sizes = driver.execute_script(
        "return Object.fromEntries(window.comfyAPI.app.app.graph._nodes"
        ".map(n => [String(n.id), [n.size[0], n.size[1]]]))"
    )
    for k, (w, h) in sizes.items():
        least_w, least_h = SHOWN.get(api[k]["class_type"], (0, 0))
        sizes[k] = [max(w, least_w), max(h, least_h) + ROOM.get(api[k]["class_type"], 0)]
    driver.execute_script(
        "const g = window.comfyAPI.app.app.graph;"
        "for (const [id, pos] of Object.entries(arguments[0])) g.getNodeById(id).pos = pos;"
        "for (const [id, size] of Object.entries(arguments[1])) g.getNodeById(id).size = size;"
        "window.comfyAPI.app.app.canvas.setDirty(true, true);",
        layout(api, sizes),
        sizes,
    )
    workflow = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.comfyAPI.app.app.graphToPrompt().then(p => done(JSON.parse(JSON.stringify(p.workflow))));"
    )
    workflow.get("extra", {}).pop("ds", None)
    return workflow


def fit_view(driver, text: bool = True, left: float = 0) -> None:
    """The whole graph centred in the canvas right of ``left`` pixels (a side panel), for pictures;
    ``text`` draws titles and widgets at any zoom (the frontend leaves them out below a font size), and
    the minimap is hidden."""
    driver.execute_script(
        "const settings = window.comfyAPI.app.app.ui.settings;"
        "settings.setSettingValue('Comfy.Minimap.Visible', false);"
        "if (arguments[0]) settings.setSettingValue('LiteGraph.Canvas.MinFontSizeForLOD', 1);",
        text,
    )
    driver.execute_script(
        "const app = window.comfyAPI.app.app, c = app.canvas, nodes = app.graph._nodes, left = arguments[0];"
        "const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - 30));"
        "const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));"
        "const w = c.canvas.width / (window.devicePixelRatio || 1) - left, h = c.canvas.height / (window.devicePixelRatio || 1);"
        "const scale = 0.96 * Math.min(w / (x1 - x0), h / (y1 - y0));"
        "c.ds.scale = scale;"
        "c.ds.offset = [(left + (w - scale * (x1 - x0)) / 2) / scale - x0, (h - scale * (y1 - y0)) / 2 / scale - y0];"
        "c.setDirty(true, true);",
        left,
    )
    driver.execute_script("return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def graph_picture(driver, path: Path, margin: int = 12) -> Path:
    """A screenshot of the window cut to the graph's nodes (after :func:`fit_view`), as a PNG at ``path``."""
    from PIL import Image

    driver.save_screenshot(str(path))
    x0, y0, x1, y1 = driver.execute_script(
        "const app = window.comfyAPI.app.app, c = app.canvas, nodes = app.graph._nodes, r = c.canvas.getBoundingClientRect();"
        "const s = c.ds.scale, [ox, oy] = c.ds.offset;"
        "const X = x => r.left + (x + ox) * s, Y = y => r.top + (y + oy) * s;"
        "return [X(Math.min(...nodes.map(n => n.pos[0]))), Y(Math.min(...nodes.map(n => n.pos[1] - 30))),"
        " X(Math.max(...nodes.map(n => n.pos[0] + n.size[0]))), Y(Math.max(...nodes.map(n => n.pos[1] + n.size[1])))];"
    )
    ratio = driver.execute_script("return window.devicePixelRatio || 1")
    box = [round(v * ratio) for v in (x0 - margin, y0 - margin, x1 + margin, y1 + margin)]
    with Image.open(path) as shot:
        shot.crop(box).save(path)
    return path


def node_boxes(driver) -> dict[str, list[float]]:
    """Every node's box on the canvas, title bar included: ``[x0, y0, x1, y1]`` by node id."""
    return driver.execute_script(
        "return Object.fromEntries(window.comfyAPI.app.app.graph._nodes.map(n => [String(n.id),"
        " [n.pos[0], n.pos[1] - 30, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]]))"
    )


def overlapping(boxes: dict[str, list[float]]) -> list[tuple[str, str]]:
    """The pairs of node boxes that overlap."""
    ids = sorted(boxes, key=int)
    return [
        (a, b)
        for i, a in enumerate(ids)
        for b in ids[i + 1 :]
        if boxes[a][0] < boxes[b][2]
        and boxes[b][0] < boxes[a][2]
        and boxes[a][1] < boxes[b][3]
        and boxes[b][1] < boxes[a][3]
    ]


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


# the loaders of the example workflows: each model folder and the input naming the file loaded from it
LOADERS = {
    "UNETLoader": (("diffusion_models", "unet_name"),),
    "CLIPLoader": (("text_encoders", "clip_name"),),
    "VAELoader": (("vae", "vae_name"),),
    "CheckpointLoaderSimple": (("checkpoints", "ckpt_name"),),
    "LTXVAudioVAELoader": (("checkpoints", "ckpt_name"),),
    "LTXAVTextEncoderLoader": (("text_encoders", "text_encoder"), ("checkpoints", "ckpt_name")),
    "FlexiMMTLoadMotion": (("fleximmt_motions", "motion"),),
}


def stand_in_files(base: Path, api: dict) -> None:
    """Empty files under the names an example's loaders ask for (so the frontend marks none missing in
    the pictures), and the demo image or a mask of it for each image it loads."""
    from fleximmt.apps.comfy.examples import IMAGE, mask_name

    masks = 0
    for node in api.values():
        inputs = node["inputs"]
        for folder, key in LOADERS.get(node["class_type"], ()):
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (base / "models" / folder / inputs[key]).touch()
        if node["class_type"] in ("LoadImage", "LoadImageMask"):
            masks += node["class_type"] == "LoadImageMask"
            source = IMAGE if node["class_type"] == "LoadImage" else mask_name(masks)
            if not (base / "input" / inputs["image"]).exists():
                (base / "input" / inputs["image"]).write_bytes((base / "input" / source).read_bytes())


def write_ui_workflows() -> list[Path]:
    """Write ``comfyui/example_workflows/NAME.json`` (UI form) and ``NAME.jpg`` (its thumbnail in the
    templates browser) for every ``api/NAME.json`` there."""
    from PIL import Image

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        from fleximmt.apps.comfy.examples import write_inputs

        server = ComfyServer(Path(tmp) / "base")
        write_inputs(server.base / "input")
        driver = chromium(Path(tmp) / "chromium")
        try:
            frontend_app(driver, server.url)
            for name in example_names():
                stand_in_files(server.base, load_workflow(name))
            driver.refresh()  # the model lists as they are now
            frontend_app(driver, server.url)
            for name in example_names():
                ui = ui_from_api(driver, load_workflow(name), name)
                target = WORKFLOWS / f"{name}.json"
                target.write_text(json.dumps(ui, indent=2) + "\n")
                fit_view(driver)
                thumbnail = Image.open(graph_picture(driver, Path(tmp) / f"{name}.png")).convert("RGB")
                thumbnail.thumbnail((800, 400))  # the registry's and the browser's card size at most
                thumbnail.save(WORKFLOWS / f"{name}.jpg", quality=85)
                written += [target, WORKFLOWS / f"{name}.jpg"]
        finally:
            driver.quit()
            server.stop()
    return written


if __name__ == "__main__":
    if sys.argv[1:] != ["ui-workflows"]:
        sys.exit(
            "usage: python tests/comfy_server.py ui-workflows   "
            "(writes comfyui/example_workflows/NAME.json and NAME.jpg from api/NAME.json)"
        )
    for written in write_ui_workflows():
        print(f"wrote {written.relative_to(ROOT)}")
