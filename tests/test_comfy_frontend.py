"""The FlexiMMT nodes in ComfyUI's own frontend, in headless Chromium against the real server (the
frontend each ComfyUI version pins: 1.49.6 for 0.33, 1.27.10 for 0.3.64): the node library lists the
nodes; each example workflow, fetched as the templates browser fetches it, opens with every node in
view and none over another, and queues exactly its API form; the templates browser lists each
example once, with its thumbnail. On 0.33 the toy example runs from the page: the Learn nodes show
their motions' metadata, the outputs show in the room the layout left them, and the page is docs/comfyui.md's
picture (docs/comfyui.png). Runs in `make test-comfy`."""

import time
from pathlib import Path

import pytest
from comfy_server import (
    CURRENT,
    LEARN_STEPS,
    WORKFLOWS,
    chromium,
    example_names,
    fit_view,
    fresh_motions,
    frontend_app,
    load_workflow,
    needs_comfyui,
    node_boxes,
    overlapping,
)
from helpers import needs_chromium
from PIL import Image

from fleximmt.apps.comfy.examples import REFERENCES, write_inputs

pytestmark = [pytest.mark.comfy, needs_chromium]

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "comfyui.png"
NAMES = [
    "FlexiMMT Load Model",
    "FlexiMMT Learn Motion",
    "FlexiMMT Load Motion",
    "FlexiMMT Object",
    "FlexiMMT Transfer",
    "FlexiMMT Preview Masks",
    "FlexiMMT Apply",
]


@pytest.fixture(scope="module")
def server(comfy_server):
    write_inputs(comfy_server.base / "input")
    return comfy_server


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """The frontend in headless Chromium, a 1920 x 1080 window."""
    driver = chromium(tmp_path_factory.mktemp("chromium"))  # dies with the tests, however they end
    try:
        frontend_app(driver, server.url)
        yield driver
    finally:
        driver.quit()


def open_workflow(page, server, name: str) -> dict:
    """Open example ``name`` as the templates browser does: its UI form from the node pack's templates
    route, loaded with the frontend's ``loadGraphData``; returns that UI form."""
    ui = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(`/api/workflow_templates/fleximmt/${arguments[0]}.json`).then(r => r.json()).then(w => "
        "window.comfyAPI.app.app.loadGraphData(w, true, true, arguments[0]).then(() => done(w)));",
        name,
    )
    time.sleep(1)  # the frontend fits the view in the next animation frames
    page.execute_script("return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return ui


def queued(page) -> dict:
    """The API prompt the frontend queues for the graph it shows (``graphToPrompt``)."""
    return page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.comfyAPI.app.app.graphToPrompt().then(p => done(JSON.parse(JSON.stringify(p.output))));"
    )


def in_view(page) -> bool:
    """Whether every node lies inside the part of the canvas the window shows."""
    return page.execute_script(
        "const c = window.comfyAPI.app.app.canvas; c.ds.computeVisibleArea(c.viewport);"
        "const [vx, vy, vw, vh] = c.visible_area;"
        "return window.comfyAPI.app.app.graph._nodes.every(n => n.pos[0] >= vx && n.pos[1] - 30 >= vy"
        " && n.pos[0] + n.size[0] <= vx + vw && n.pos[1] + n.size[1] <= vy + vh);"
    )


def test_the_node_library_lists_every_fleximmt_node(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page.find_element(By.CSS_SELECTOR, ".node-library-tab-button").click()
    search = WebDriverWait(page, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".side-bar-panel input"))
    search.send_keys("FlexiMMT")
    library = page.find_element(By.CSS_SELECTOR, ".side-bar-panel")
    WebDriverWait(page, 30).until(lambda d: "FlexiMMT Preview Masks" in library.text)
    listed = library.text.replace("\n", " ")
    assert all(name in listed for name in NAMES), listed
    page.find_element(By.CSS_SELECTOR, ".node-library-tab-button").click()  # closed again


@pytest.mark.parametrize("name", example_names())
def test_each_example_opens_whole_in_view_and_queues_its_api_form(page, server, name):
    info = server.object_info()

    def declared(prompt: dict) -> dict:  # each node's inputs its definition declares here (not frontend widgets)
        spec = lambda t: {**info[t]["input"]["required"], **info[t]["input"].get("optional", {})}
        return {
            k: (v["class_type"], {n: x for n, x in v["inputs"].items() if n in spec(v["class_type"])})
            for k, v in prompt.items()
        }

    api = load_workflow(name)
    unknown = sorted({v["class_type"] for v in api.values()} - set(info))
    if unknown and server.version < CURRENT:  # the native CogVideoX and HunyuanVideo 1.5 examples
        pytest.skip(f"{name} uses nodes ComfyUI {server.version} does not have: {', '.join(unknown)}")
    ui = open_workflow(page, server, name)
    assert ui["version"] == 0.4 and ui["links"] and "ds" not in ui.get("extra", {})  # no saved view: fitted
    assert in_view(page), node_boxes(page)
    assert overlapping(node_boxes(page)) == []
    assert declared(queued(page)) == declared(api)
    if server.version >= CURRENT:  # nothing in the API form the current ComfyUI does not know
        assert declared(api) == {k: (v["class_type"], v["inputs"]) for k, v in api.items()}


def test_the_templates_browser_lists_each_example_once_with_its_thumbnail(server, tmp_path):
    import urllib.request

    listed = server.get("/workflow_templates")
    assert list(listed) == ["fleximmt"] and sorted(listed["fleximmt"]) == example_names()  # the UI forms, once

    for name in example_names():
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/fleximmt/{name}.jpg") as response:
            (tmp_path / f"{name}.jpg").write_bytes(response.read())
        with Image.open(tmp_path / f"{name}.jpg") as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.width <= 800 and thumbnail.height <= 400
            assert thumbnail.convert("L").getextrema()[1] > 60  # a picture, not a blank card
        assert (WORKFLOWS / f"{name}.jpg").is_file()


@needs_comfyui(CURRENT, "the run from the page, its outputs' room and docs/comfyui.md's picture are 0.33's frontend's")
def test_the_toy_example_runs_from_the_page_and_shows_what_it_made(page, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fresh_motions(server.base, REFERENCES)
    open_workflow(page, server, "fleximmt_toy_learn_and_transfer")
    page.execute_script(  # the training cut to LEARN_STEPS, as the other tests cut it
        "for (const n of window.comfyAPI.app.app.graph._nodes.filter(n => n.type === 'FlexiMMTLearnMotion'))"
        " n.widgets.find(w => w.name === 'steps').value = arguments[0];",
        LEARN_STEPS,
    )
    before = len(server.get("/history"))
    page.execute_async_script(
        "const done = arguments[arguments.length - 1]; window.comfyAPI.app.app.queuePrompt(0, 1).then(() => done(1));"
    )
    deadline = time.monotonic() + 600
    while len(server.get("/history")) == before or server.queue()["queue_running"]:
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(2)
    (entry,) = list(server.get("/history").values())[before:]
    assert entry["status"]["status_str"] == "success", entry["status"]
    time.sleep(3)  # the outputs reach the page
    shown = page.execute_script(
        "const g = window.comfyAPI.app.app.graph;"
        "return Object.fromEntries(g._nodes.filter(n => n.type === 'FlexiMMTLearnMotion')"
        ".map(n => [String(n.id), n.widgets.find(w => w.name === 'motion_info').value]));"
    )
    assert shown["4"].startswith("caption: A white circle zigzags right.\nconcept: white circle")
    assert shown["7"].startswith("caption: A white circle bounces.")
    videos = page.execute_script(
        "return [...document.querySelectorAll('video')].map(v => v.currentSrc || v.src).filter(s => s.includes('fleximmt'))"
    )
    assert any("transfer" in src for src in videos) and any("masks" in src for src in videos), videos
    assert overlapping(node_boxes(page)) == []  # what the nodes show stays in the room they were given

    page.find_element(By.CSS_SELECTOR, ".node-library-tab-button").click()  # the nodes beside the example
    search = WebDriverWait(page, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".side-bar-panel input"))
    search.clear()
    search.send_keys("FlexiMMT")
    WebDriverWait(page, 30).until(
        lambda d: "FlexiMMT Preview Masks" in d.find_element(By.CSS_SELECTOR, ".side-bar-panel").text
    )
    panel = page.execute_script(  # the graph right of the library panel
        "const c = window.comfyAPI.app.app.canvas.canvas, panel = document.querySelector('.side-bar-panel');"
        "return panel.getBoundingClientRect().right - c.getBoundingClientRect().left;"
    )
    fit_view(page, left=panel)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.save_screenshot(str(SCREENSHOT))
    with Image.open(SCREENSHOT) as shot:
        assert shot.size == tuple(page.execute_script("return [window.innerWidth, window.innerHeight]"))


LIFE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import psutil
from comfy_server import ComfyServer, chromium, frontend_app
base = Path({base!r})
server = ComfyServer(base / "base")
driver = chromium(base / "chromium")
frontend_app(driver, server.url)
driver_process = psutil.Process(driver.service.process.pid)
pids = [server.process.pid, driver_process.pid, *(p.pid for p in driver_process.children(recursive=True))]
print(json.dumps(pids), flush=True)
time.sleep(600)
"""


def test_chromium_and_the_server_die_with_the_test_process_however_it_ends(tmp_path):
    """A test process killed outright (SIGKILL: no cleanup runs) takes its ComfyUI server, chromedriver
    and every Chromium process with it."""
    import json
    import signal
    import subprocess
    import sys

    import psutil

    code = LIFE.format(tests=str(Path(__file__).parent), base=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(child.stdout.readline())
        assert len(pids) > 3 and all(psutil.pid_exists(pid) for pid in pids)  # the server, the driver, Chromium
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [pid for pid in pids if alive(pid)] == []
