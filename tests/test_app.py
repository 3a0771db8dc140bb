"""The web app: its logic without a browser, then one transfer driven in headless Chromium."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import socket
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from fleximmt.app import MotionLibrary, TransferApp, build_app, drawn_mask, highlight
from fleximmt.toy import random_motion, tiny_pipeline

PROMPT = "A ball jumps up. A box slides left."
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "app.png"


@pytest.fixture()
def assets(tmp_path):
    pipe = tiny_pipeline(0)
    library = tmp_path / "motions"
    library.mkdir()
    random_motion(pipe.transformer, 4, seed=1, name="jump", motion_words="jumps up").save(library / "jump.safetensors")
    random_motion(pipe.transformer, 4, seed=2, name="slide", motion_words="slides left").save(library / "slide.safetensors")
    (library / "jump.ckpt.safetensors").write_bytes(b"not a motion")  # training leftovers are not motions
    image = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    for k, (y, x) in enumerate([(4, 4), (30, 30)], 1):
        mask = np.zeros((64, 64), np.uint8)
        mask[y : y + 24, x : x + 24] = 255
        Image.fromarray(mask).save(tmp_path / f"mask{k}.png")
    return pipe, tmp_path, image


def test_highlight_marks_each_objects_motion_words():
    pieces = highlight(PROMPT, ["jumps up", "slides left", ""])
    assert ("jumps up", "object 1") in pieces and ("slides left", "object 2") in pieces
    assert "".join(text for text, _ in pieces) == PROMPT
    assert highlight("A cat jumps. A dog jumps.", ["jumps", "jumps"]) == [
        ("A cat ", None), ("jumps", "object 1"), (". A dog ", None), ("jumps", "object 2"), (".", None)]  # fmt: skip


def test_brush_strokes_become_a_mask():
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[2:4, 3:6, 3] = 255
    mask = drawn_mask({"background": None, "layers": [layer], "composite": None})
    assert mask.sum() == 6 and mask[2:4, 3:6].all()
    assert drawn_mask({"background": None, "layers": [np.zeros((8, 8, 4), np.uint8)]}) is None


def test_library_lists_motions_with_their_words(assets):
    _, root, _ = assets
    entries = MotionLibrary(root / "motions").entries()
    assert [(e.name, e.motion_words) for e in entries] == [("jump", "jumps up"), ("slide", "slides left")]


def test_transfer_and_learn_without_a_browser(assets):
    pipe, root, image = assets
    app = TransferApp(pipe, MotionLibrary(root / "motions"), root / "out")
    slots = [(True, "png", None, str(root / "mask1.png"), "", "", "jump", None, "jumps up"),
             (True, "png", None, str(root / "mask2.png"), "", "", "slide", None, "slides left"),
             (False, "draw", None, None, "", "", None, None, "")]  # fmt: skip
    preview = app.preview(image, slots)
    assert preview.ndim == 3 and (preview != 0).any()
    video, overlay = app.generate(image, PROMPT, slots, steps=2, seed=0)
    assert iio.imread(video).shape == (9, 32, 32, 3) and iio.imread(overlay).shape == (9, 32, 32, 3)
    with pytest.raises(ValueError, match="draw its mask"):
        app.generate(image, PROMPT, [(True, "draw", None, None, "", "", "jump", None, "jumps up")], 2, 0)
    with pytest.raises(ValueError, match="needs SAM"):
        app.generate(image, PROMPT, [(True, "points", None, None, "3,4", "", "jump", None, "jumps up")], 2, 0)
    reference = np.full((9, 32, 32, 3), 90, np.uint8)
    for t in range(9):
        reference[t, 10:20, 2 + 2 * t : 12 + 2 * t] = 220
    iio.imwrite(root / "ref.mp4", reference, fps=8, codec="libx264")
    steps = []
    entry = app.learn(str(root / "ref.mp4"), "A ball jumps up.", "ball", "jumps up", "hop", 3, 2, lambda s, l: steps.append(s))
    assert steps == [1, 2, 3] and entry.name == "hop" and entry.preview.is_file()
    assert "hop" in [e.name for e in app.library.entries()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="needs Debian's chromium and chromium-driver")
def test_a_transfer_in_chromium_shows_a_video(assets, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, root, _ = assets
    demo = build_app(pipe, root / "motions")
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1280,2600"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(driver, 90)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(root / "image.png"))
        for k in (1, 2):
            driver.find_element(By.CSS_SELECTOR, f"#png_{k} input[type=file]").send_keys(str(root / f"mask{k}.png"))
            radio = driver.find_element(By.CSS_SELECTOR, f"#motion_{k} input[value='{['jump', 'slide'][k - 1]}']")
            driver.execute_script("arguments[0].click();", radio)
            wait.until(lambda d, k=k: d.find_element(By.CSS_SELECTOR, f"#motion_words_{k} textarea").get_attribute("value"))
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        prompt.send_keys(PROMPT)
        wait.until(ec.text_to_be_present_in_element((By.ID, "highlight"), "slides left"))
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "generate"))
        video = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#video_out video")))
        wait.until(lambda d: video.get_attribute("src"))
        SCREENSHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(tmp_path / "app.png"))
        if os.environ.get("FLEXIMMT_UPDATE_SCREENSHOT"):
            shutil.copy(tmp_path / "app.png", SCREENSHOT)
    finally:
        driver.quit()
        demo.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
