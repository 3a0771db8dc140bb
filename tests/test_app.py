"""The web app: its logic without a browser, then one transfer driven in headless Chromium."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from fleximmt.app import MotionLibrary, TransferApp, build_app, drawn_mask, highlight, motion_metadata
from fleximmt.toy import random_motion, tiny_pipeline
from fleximmt.toy.lab import random_case
from helpers import free_port, headless_chromium, needs_chromium

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


def test_generation_reports_its_progress_and_motions_show_their_metadata(assets):
    pipe, root, image = assets
    app = TransferApp(pipe, MotionLibrary(root / "motions"), root / "out")
    slots = [(True, "png", None, str(root / "mask1.png"), "", "", "jump", None, "jumps up")]
    seen = []
    app.generate(image, PROMPT, slots, steps=3, seed=0, progress=lambda share, desc: seen.append((share, desc)))
    assert [share for share, _ in seen] == pytest.approx([1 / 3, 2 / 3, 1.0]) and seen[-1][1] == "denoising step 3/3"
    from fleximmt import MotionTokens

    info = motion_metadata(MotionTokens.load(root / "motions" / "jump.safetensors"))
    assert "motion words: `jumps up`" in info and "x 4 tokens x" in info


@pytest.fixture(scope="module")
def toy_assets(tmp_path_factory):
    """The shipped toy model, two motions learned on it (briefly) and a bundled example image."""
    from fleximmt.toy.lab import EXAMPLE_DIR, learn_motions, load_toy_pipeline

    root = tmp_path_factory.mktemp("toy_app")
    pipe = load_toy_pipeline()
    learn_motions(pipe, ["right", "bounce"], root / "motions", steps=30)
    return pipe, root, EXAMPLE_DIR


def _serve(pipe, motions, tmp_path, **kwargs):
    demo = build_app(pipe, motions, **kwargs)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    return demo, port


@needs_chromium
def test_a_transfer_in_chromium_on_the_toy_model_shows_a_video(toy_assets, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, root, examples = toy_assets
    demo, port = _serve(pipe, root / "motions", tmp_path)
    driver = headless_chromium(tmp_path / "profile", height=2600)
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(examples / "scene_0.png"))
        words = {1: "moves right", 2: "bounces"}
        for k, motion in ((1, "right"), (2, "bounce")):
            driver.find_element(By.CSS_SELECTOR, f"#png_{k} input[type=file]").send_keys(
                str(examples / "masks" / f"scene_0_object_{k - 1}.png"))  # fmt: skip
            radio = driver.find_element(By.CSS_SELECTOR, f"#motion_{k} input[value='{motion}']")
            driver.execute_script("arguments[0].click();", radio)
            wait.until(lambda d, k=k: d.find_element(By.CSS_SELECTOR, f"#motion_words_{k} textarea").get_attribute("value") == words[k])
        sprites = random_case(100, num_objects=2).sprites  # the bundled scene_0.png
        prompt_text = f"A {sprites[0].colour} {sprites[0].shape} moves right. A {sprites[1].colour} {sprites[1].shape} bounces."
        driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(prompt_text)
        wait.until(ec.text_to_be_present_in_element((By.ID, "highlight"), "bounces"))
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "show_masks"))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#preview img").get_attribute("src"))
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "generate"))
        video = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#video_out video")))
        wait.until(lambda d: video.get_attribute("src"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#overlay_out video")))
        driver.save_screenshot(str(tmp_path / "app.png"))
        if os.environ.get("FLEXIMMT_UPDATE_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copy(tmp_path / "app.png", SCREENSHOT)
    finally:
        driver.quit()
        demo.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000


@needs_chromium
def test_bad_input_shows_a_readable_message_in_the_page(assets, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, root, _ = assets
    demo, port = _serve(pipe, root / "motions", tmp_path)
    driver = headless_chromium(tmp_path / "profile")
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        button = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "generate"))
        driver.execute_script("arguments[0].click();", button)  # no image given
        WebDriverWait(driver, 60).until(lambda d: "upload an image first" in d.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.quit()
        demo.close()


@needs_chromium
def test_the_learn_tab_trains_a_motion_that_joins_the_library(assets, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, root, _ = assets
    reference = np.full((9, 32, 32, 3), 90, np.uint8)
    for t in range(9):
        reference[t, 10:20, 2 + 2 * t : 12 + 2 * t] = 220
    iio.imwrite(root / "ref.mp4", reference, fps=8, codec="libx264")
    demo, port = _serve(pipe, root / "motions", tmp_path)
    driver = headless_chromium(tmp_path / "profile")
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        tab = wait.until(lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Learn"), False))
        driver.execute_script("arguments[0].click();", tab)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#ref_video input[type=file]"))).send_keys(str(root / "ref.mp4"))
        for elem_id, text in (("caption", "A ball jumps up."), ("concept", "ball"), ("learn_words", "jumps up"),
                              ("motion_name", "hop")):  # fmt: skip
            driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").send_keys(text)
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "learn"))
        wait.until(lambda d: "hop" in d.find_element(By.ID, "learned").text)
    finally:
        driver.quit()
        demo.close()
    entry = MotionLibrary(root / "motions").get("hop")
    assert entry.motion_words == "jumps up" and entry.preview.is_file()
