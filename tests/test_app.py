"""The web app: its logic without a browser; the server driven as clients drive it (gradio_client,
plain HTTP, headless Chromium): one run at a time whatever they do, cancel, bad input, disk."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import gc
import shutil
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from helpers import GradioSession, free_port, headless_chromium, needs_chromium, serving
from PIL import Image

from fleximmt.apps.app import (
    MAX_IMAGE_PIXELS,
    MIN_UPLOAD_BYTES,
    MotionLibrary,
    ObjectInput,
    TransferApp,
    drawn_mask,
    fit_to_model,
    hide_paths,
    highlight,
    motion_metadata,
    read_image,
    serve,
    size_note,
    upload_limit,
)
from fleximmt.apps.gradio_cache import remove_empty_folders
from fleximmt.errors import FlexiMMTInputError
from fleximmt.toy import random_motion, tiny_pipeline
from fleximmt.toy.lab import random_case

PROMPT = "A ball jumps up. A box slides left."
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "app.png"


@pytest.fixture()
def assets(tmp_path):
    pipe = tiny_pipeline(0)
    library = tmp_path / "motions"
    library.mkdir()
    random_motion(pipe.transformer, 4, seed=1, name="jump", motion_words="jumps up").save(library / "jump.safetensors")
    random_motion(pipe.transformer, 4, seed=2, name="slide", motion_words="slides left").save(
        library / "slide.safetensors"
    )
    (library / "jump.ckpt.safetensors").write_bytes(b"not a motion")  # training leftovers are not motions
    image = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    for k, (y, x) in enumerate([(4, 4), (30, 30)], 1):
        mask = np.zeros((64, 64), np.uint8)
        mask[y : y + 24, x : x + 24] = 255
        Image.fromarray(mask).save(tmp_path / f"mask{k}.png")
    return pipe, tmp_path, image


def two_objects(root: Path) -> list[ObjectInput]:
    return [
        ObjectInput(mask_png=str(root / "mask1.png"), motion="jump", motion_words="jumps up"),
        ObjectInput(mask_png=str(root / "mask2.png"), motion="slide", motion_words="slides left"),
    ]


def reference_video(path: Path) -> Path:
    """9 frames of a bright square moving right on grey, 32 x 32."""
    frames = np.full((9, 32, 32, 3), 90, np.uint8)
    for t in range(9):
        frames[t, 10:20, 2 + 2 * t : 12 + 2 * t] = 220
    iio.imwrite(path, frames, fps=8, codec="libx264")
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` pixels and holds none: what PIL reads before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# -- the page's logic ---------------------------------------------------------------------------
def test_highlight_marks_each_objects_motion_words():
    pieces = highlight(PROMPT, ["jumps up", "slides left", ""])
    assert ("jumps up", "Object 1") in pieces and ("slides left", "Object 2") in pieces
    assert "".join(text for text, _ in pieces) == PROMPT
    assert highlight("A cat jumps. A dog jumps.", ["jumps", "jumps"]) == [
        ("A cat ", None),
        ("jumps", "Object 1"),
        (". A dog ", None),
        ("jumps", "Object 2"),
        (".", None),
    ]


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
    slots = [*two_objects(root), ObjectInput(use=False, mask_from="draw")]
    preview = app.preview(image, slots)
    assert preview.ndim == 3 and (preview != 0).any()
    video, overlay = app.generate(image, PROMPT, slots, steps=2, seed=0)
    assert iio.imread(video).shape == (9, 32, 32, 3) and iio.imread(overlay).shape == (9, 32, 32, 3)
    with pytest.raises(ValueError, match="Object 1: draw its mask"):
        app.generate(image, PROMPT, [ObjectInput(mask_from="draw", motion="jump", motion_words="jumps up")], 2, 0)
    with pytest.raises(ValueError, match="Object 1: clicking objects needs SAM"):
        app.generate(
            image, PROMPT, [ObjectInput(mask_from="points", points="3,4", motion="jump", motion_words="jumps up")], 2, 0
        )
    steps = []
    entry = app.learn(
        str(reference_video(root / "ref.mp4")),
        "A ball jumps up.",
        "ball",
        "jumps up",
        "hop",
        3,
        2,
        lambda s, _loss: steps.append(s),
    )
    assert steps == [1, 2, 3] and entry.name == "hop" and entry.preview.is_file()
    assert "hop" in [e.name for e in app.library.entries()]
    assert sorted(p.name for p in (root / "motions").glob("hop*")) == [
        "hop.gif",
        "hop.safetensors",
    ]  # no run state left


def test_the_mask_kernel_setting_reaches_transfer_and_learning(assets, monkeypatch):
    """The page's mask kernel: "dense" builds the dense kernel's layouts and makes the video "auto" makes;
    learning takes it too, and "flex" (no backward on a CPU) is refused with the fix."""
    from fleximmt.method.kernels.dense import DenseJoint

    pipe, root, image = assets
    app = TransferApp(pipe, MotionLibrary(root / "motions"), root / "out")
    slots = two_objects(root)
    built = []
    real = DenseJoint.__init__
    monkeypatch.setattr(DenseJoint, "__init__", lambda self, *args: built.append(1) or real(self, *args))
    auto, _ = app.generate(image, PROMPT, slots, steps=2, seed=0)
    assert not built
    dense, _ = app.generate(image, PROMPT, slots, steps=2, seed=0, mask_kernel="dense")
    assert built
    assert np.abs(iio.imread(dense).astype(int) - iio.imread(auto).astype(int)).mean() < 1.0
    with pytest.raises(ValueError, match="mask_kernel='flex' has no backward on a CPU"):
        app.learn(
            str(reference_video(root / "ref.mp4")),
            "A ball jumps up.",
            "ball",
            "jumps up",
            "hop",
            2,
            2,
            mask_kernel="flex",
        )


def test_generation_reports_its_progress_and_motions_show_their_metadata(assets):
    pipe, root, image = assets
    app = TransferApp(pipe, MotionLibrary(root / "motions"), root / "out")
    seen = []
    app.generate(
        image, PROMPT, two_objects(root)[:1], steps=3, seed=0, progress=lambda share, desc: seen.append((share, desc))
    )
    assert [share for share, _ in seen] == pytest.approx([1 / 3, 2 / 3, 1.0]) and seen[-1][1] == "denoising step 3/3"
    from fleximmt import MotionTokens

    info = motion_metadata(MotionTokens.load(root / "motions" / "jump.safetensors"))
    assert "motion words: `jumps up`" in info and "x 4 tokens x" in info


def test_messages_number_objects_from_1_and_say_what_to_type(assets):
    pipe, root, image = assets
    app = TransferApp(pipe, MotionLibrary(root / "motions"), root / "out")
    first, second = two_objects(root)
    no_words = ObjectInput(mask_png=first.mask_png, motion="jump", motion_words="  ")
    with pytest.raises(FlexiMMTInputError) as err:
        app.generate(image, PROMPT, [second, no_words], 2, 0)
    assert str(err.value) == (
        "Object 2: type its motion words, the words of the prompt that describe how it moves, "
        "e.g. 'jumps up' (its motion file says 'jumps up')"
    )
    with pytest.raises(FlexiMMTInputError, match=r"^Object 2: upload its mask PNG"):
        app.generate(image, PROMPT, [first, ObjectInput(motion="slide", motion_words="slides left")], 2, 0)
    with pytest.raises(
        FlexiMMTInputError, match=r"^Object 1: choose a motion from the library or upload a motion file"
    ):
        app.generate(image, PROMPT, [ObjectInput(mask_png=first.mask_png, motion_words="jumps up")], 2, 0)
    with pytest.raises(
        FlexiMMTInputError, match=r"^Object 1: motion 'spin' is not in the motion library \(it has: jump, slide\)"
    ):
        app.generate(image, PROMPT, [ObjectInput(mask_png=first.mask_png, motion="spin", motion_words="spins")], 2, 0)


def test_server_paths_are_hidden_from_messages():
    message = "'/tmp/gradio/ab12/mask.png' is not a readable image; see '/srv/lib/x.safetensors' and /tmp/run-3/v.mp4"
    assert (
        hide_paths(message, ["/tmp", "/srv/lib"]) == "'mask.png' is not a readable image; see 'x.safetensors' and v.mp4"
    )


# -- images: what opens, how they are fitted to the model --------------------------------------------
def test_images_too_large_or_unreadable_are_refused_with_a_clear_message(tmp_path):
    bomb = png_header(tmp_path / "huge.png", 15000, 15000)  # 225 megapixels: PIL's own guard refuses it
    with pytest.raises(FlexiMMTInputError) as err:
        read_image(bomb)
    assert str(err.value) == (
        "the image (huge.png) is 15000 x 15000 pixels: this app takes images of at most "
        f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels; scale it down first"
    )
    with pytest.raises(
        FlexiMMTInputError, match=r"^the image \(big.png\) is 8000 x 8000 pixels: this app takes images of at most 50"
    ):
        read_image(png_header(tmp_path / "big.png", 8000, 8000))  # 64 megapixels: below PIL's guard, above ours
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(
        FlexiMMTInputError, match=r"^the image \(notes.png\) is not an image this app can read: give a PNG or JPEG"
    ):
        read_image(tmp_path / "notes.png")
    Image.new("RGB", (300, 100)).save(tmp_path / "wide.png")
    assert read_image(tmp_path / "wide.png").size == (300, 100) and read_image(
        tmp_path / "wide.png", header_only=True
    ).size == (300, 100)


def test_image_and_masks_are_resized_together_and_the_page_says_how():
    image = np.zeros((32, 96, 3), np.uint8)
    image[:, 64:] = 255  # the right third is white
    mask = torch.zeros(32, 96, dtype=torch.bool)
    mask[:, 64:] = True  # and is the object
    picture, (fitted,) = fit_to_model(image, [mask], 48, 48)
    assert picture.size == (48, 48) and fitted.shape == (48, 48)
    assert fitted[:, 33:].all() and not fitted[:, :31].any()  # still the right third
    assert (np.asarray(picture)[:, 33:] > 200).all() and (np.asarray(picture)[:, :31] < 50).all()
    assert size_note((96, 32), (48, 48)) == (
        "The image is 96 x 32; the model makes 48 x 48 videos, so the image and its "
        "masks are resized to 48 x 48 together: the picture is stretched (aspect "
        "ratio 3.00 becomes 1.00). Mask PNGs must be 96 x 32, like the image."
    )
    assert size_note((96, 96), (48, 48)).endswith(
        "resized to 48 x 48 together. Mask PNGs must be 96 x 96, like the image."
    )
    assert size_note((48, 48), (48, 48)) == "The image is 48 x 48, the model's own size: it is used as it is."


def test_a_mask_whose_size_differs_from_the_image_is_refused(assets):
    pipe, root, _ = assets
    app = TransferApp(pipe, MotionLibrary(root / "motions"), root / "out")
    wide = np.zeros((100, 300, 3), np.uint8)  # a 64 x 64 mask is not stretched onto it
    with pytest.raises(FlexiMMTInputError) as err:
        app.generate(wide, PROMPT, two_objects(root)[:1], 2, 0)
    assert str(err.value) == (
        "Object 1: the mask PNG is 64 x 64 but the image is 300 x 100: give a mask of the image's "
        "size (image and masks are resized to the model together)"
    )
    Image.fromarray(np.full((100, 300), 255, np.uint8)).save(root / "wide_mask.png")
    video, _ = app.generate(
        wide,
        "A ball jumps up.",
        [ObjectInput(mask_png=str(root / "wide_mask.png"), motion="jump", motion_words="jumps up")],
        1,
        0,
    )
    assert iio.imread(video).shape[1:3] == (32, 32)  # the model's size


def test_the_upload_limit_grows_with_the_models_motion_files(tiny_pipe):
    assert upload_limit(tiny_pipe) == MIN_UPLOAD_BYTES == 200 * 2**20

    def model(blocks, dim, experts):
        adapter = SimpleNamespace(
            motion_shape=lambda: (blocks, dim), default_text_length=lambda: 226, num_experts=experts
        )
        return SimpleNamespace(adapter=adapter)

    assert upload_limit(model(42, 3072, 1)) == MIN_UPLOAD_BYTES  # CogVideoX-5B: a 117 MB motion file
    assert upload_limit(model(40, 5120, 2)) == int(40 * 226 * 5120 * 4 * 2 * 1.25)  # two experts of width 5120: 370 MB


# -- stopping a run ---------------------------------------------------------------------------------
def tensors_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def test_a_stopped_generation_ends_at_the_next_step_keeps_no_tensors_and_leaves_the_model_as_it_was(assets):
    pipe, root, image = assets
    app = TransferApp(pipe, MotionLibrary(root / "motions"), root / "out")
    objects = two_objects(root)
    before, _ = app.generate(image, PROMPT, objects, steps=20, seed=3)
    alive = tensors_alive()  # what a finished run leaves (diffusers keeps its attention_kwargs until the next call)
    seen = []

    def job(stop):
        def progress(share, desc):
            seen.append(desc)
            stop.set()  # stop asked for during step 1

        return app.generate(image, PROMPT, objects, 20, 0, progress, stop)

    assert asyncio.run(app.worker.run(job)) == (False, None)
    assert seen == ["denoising step 1/20"] and (app.worker.runs, app.worker.cancelled) == (1, 1)
    assert tensors_alive() <= alive  # no more than a finished run: the stopped run's latents went with it
    assert len(list((root / "out").glob("run-*"))) == 1  # the stopped run wrote nothing
    after, _ = app.generate(image, PROMPT, objects, steps=20, seed=3)
    assert np.array_equal(iio.imread(after), iio.imread(before))


class Gate:
    """Holds every call of ``module`` at its start, while closed, until the test lets it go on; counts
    the calls and the most that ever ran at once."""

    def __init__(self, module: torch.nn.Module, closed: bool = True):
        self.entered, self.permits = threading.Semaphore(0), threading.Semaphore(0)
        self.calls = self.active = self.most_active = 0
        self.opened = not closed
        self._lock = threading.Lock()
        self._hooks = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._leave)]

    def _enter(self, module, args):
        with self._lock:
            self.calls += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.entered.release()
        if not self.opened:
            assert self.permits.acquire(timeout=120), "the test never let this call go on"

    def _leave(self, module, args, output):
        with self._lock:
            self.active -= 1

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=120), "no call started"

    def let_go(self, calls: int = 1) -> None:
        self.permits.release(calls)

    def open(self) -> None:
        self.opened = True
        self.permits.release(1000)

    def close(self) -> None:
        """Hold the calls from now on (the permits and starts counted while open are dropped)."""
        self.opened = False
        while self.permits.acquire(blocking=False):
            pass
        while self.entered.acquire(blocking=False):
            pass

    def remove(self) -> None:
        self.open()
        for hook in self._hooks:
            hook.remove()


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture()
def server(assets, tmp_path, monkeypatch):
    """The app on the tiny model, its Gradio cache in tmp_path, a gate on its transformer, a client;
    ``server.restart(**serve_options)`` serves it again with other options."""
    from gradio_client import Client

    pipe, root, _ = assets
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    gate = Gate(pipe.transformer, closed=False)
    running = SimpleNamespace(gate=gate, root=root)

    def restart(**options):
        if getattr(running, "demo", None) is not None:
            running.demo.close()
        port = free_port()
        running.demo = serve(pipe, root / "motions", port=port, block=False, **options)
        running.app, running.url = running.demo.fleximmt, f"http://127.0.0.1:{port}/"
        running.client = Client(running.url, verbose=False, download_files=str(tmp_path / "downloads"))

    running.restart = restart
    restart()
    yield running
    gate.remove()
    running.demo.close()


def generate_inputs(root: Path, **changes) -> dict:
    """docs/web-apps.md's /generate call: two objects given by mask PNGs and library motions."""
    from gradio_client import handle_file

    inputs = dict(
        image=handle_file(str(root / "image.png")),
        prompt=PROMPT,
        object_1_mask_png=handle_file(str(root / "mask1.png")),
        object_1_motion="jump",
        object_1_motion_words="jumps up",
        object_2_mask_png=handle_file(str(root / "mask2.png")),
        object_2_motion="slide",
        object_2_motion_words="slides left",
        steps=2,
    )
    return inputs | changes


def test_the_api_has_named_endpoints_with_named_inputs(server):
    api = server.client.view_api(return_format="dict", print_info=False)
    assert sorted(api["named_endpoints"]) == ["/generate", "/learn", "/show_masks"] and not api["unnamed_endpoints"]
    generate = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert (
        generate[:9]
        == [
            "image",
            "prompt",
            "steps",
            "seed",
            "mask_kernel",
            "object_1_use",
            "object_1_mask_from",
            "object_1_brush",
            "object_1_mask_png",
        ]
        and generate[-1] == "object_3_motion_words"
        and len(generate) == 32
    )
    learn = [p["parameter_name"] for p in api["named_endpoints"]["/learn"]["parameters"]]
    assert learn == [
        "video",
        "caption",
        "concept_words",
        "motion_words",
        "name",
        "steps",
        "tokens_per_block",
        "mask_kernel",
        "resume",
    ]
    video, _overlay = server.client.predict(**generate_inputs(server.root), api_name="/generate")
    assert iio.imread(video["video"] if isinstance(video, dict) else video).shape == (9, 32, 32, 3)
    preview = server.client.predict(
        **{k: v for k, v in generate_inputs(server.root).items() if k not in ("prompt", "steps")},
        api_name="/show_masks",
    )
    assert np.asarray(Image.open(preview)).ndim == 3


def test_cancel_stops_a_generation_at_its_next_step_and_runs_stay_one_at_a_time(server):
    gate, client, app = server.gate, server.client, server.app
    gate.close()
    for _ in range(3):  # cancelled again and again, each while its first step runs
        job = client.submit(**generate_inputs(server.root, steps=20), api_name="/generate")
        gate.wait_entered()
        job.cancel()  # returns once the server has asked the run to stop
        gate.let_go(1)  # the step ends; the run must not start another
    last = client.submit(**generate_inputs(server.root, steps=2), api_name="/generate")
    gate.wait_entered()
    gate.open()
    video, _ = last.result(timeout=120)
    assert iio.imread(video["video"] if isinstance(video, dict) else video).shape == (9, 32, 32, 3)
    assert (gate.calls, gate.most_active) == (3 * 1 + 2, 1)  # one step of each stopped run, then two; never two at once
    assert (app.worker.runs, app.worker.cancelled) == (4, 3)
    assert len(list(app.out_dir.glob("run-*"))) == 1  # only the finished run wrote files


def upload(session: GradioSession, path: Path) -> dict:
    with open(path, "rb") as f:
        response = session.http.post(f"{session.url}/gradio_api/upload", files={"files": (path.name, f)})
    response.raise_for_status()
    return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def test_a_client_that_goes_away_stops_its_run_and_the_next_one_runs(server):
    gate, app, root = server.gate, server.app, server.root
    gate.close()
    session = GradioSession(server.url)
    objects = {
        "object_1_use": True,
        "object_1_mask_from": "png",
        "object_1_mask_png": upload(session, root / "mask1.png"),
        "object_1_motion": "jump",
        "object_1_motion_words": "jumps up",
        "object_2_use": False,
        "object_3_use": False,
    }
    names = [
        p["parameter_name"]
        for p in server.client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"][
            "parameters"
        ]
    ][5:]
    data = [upload(session, root / "image.png"), "A ball jumps up.", 20, 0, "auto", *[objects.get(n) for n in names]]
    session.join(session.fn_index("generate"), data)
    for message in session.messages():  # the page's event stream, dropped while its run is in step 1
        if message.get("msg") == "process_starts":
            gate.wait_entered()
            break
    session.close()
    wait_for(lambda: app.worker.stop_requests == 1, "the server to notice the client left")
    gate.open()
    wait_for(lambda: app.worker.cancelled == 1, "the run to stop")
    _video, _ = server.client.predict(**generate_inputs(root), api_name="/generate")
    assert gate.calls == 1 + 2 and gate.most_active == 1


def test_learning_stops_at_a_step_and_continues_from_its_checkpoint(server):
    from gradio_client import handle_file

    gate, client, app, root = server.gate, server.client, server.app, server.root
    inputs = dict(
        video=handle_file(str(reference_video(root / "ref.mp4"))),
        caption="A ball jumps up.",
        concept_words="ball",
        motion_words="jumps up",
        name="hop",
        steps=40,
        tokens_per_block=4,
        resume=True,
    )
    assert app.checkpoint_every(40) == 2
    gate.close()
    job = client.submit(**inputs, api_name="/learn")
    for _ in range(3):
        gate.wait_entered()
        gate.let_go(1)
    gate.wait_entered()  # step 4 runs
    job.cancel()
    gate.let_go(1)
    wait_for(lambda: app.worker.cancelled == 1, "training to stop")
    library = root / "motions"
    assert (library / "hop.ckpt.safetensors").is_file() and not (library / "hop.safetensors").exists()
    assert gate.calls == 4
    gate.open()
    curve, message = client.predict(**inputs, api_name="/learn")
    assert message == "Learned **hop**; it is in the motion library now."
    steps = [row[0] for row in curve["data"]]  # the loss curve: [step, loss] rows
    assert steps == list(range(5, 41)) and gate.calls == 40  # resumed after step 4: every step ran once
    assert not (library / "hop.ckpt.safetensors").exists()


def refusal(server, **changes) -> str:
    """The message of a /generate call the server refuses (``changes`` to docs/web-apps.md's call)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        server.client.predict(**generate_inputs(server.root, **changes), api_name="/generate")
    return str(err.value)


def test_bad_files_get_clear_messages_without_server_paths(server, tmp_path):
    from gradio_client import handle_file

    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    huge = handle_file(str(png_header(tmp_path / "huge.png", 15000, 15000)))  # past PIL's own guard
    cases = {
        "the image (huge.png) is 15000 x 15000 pixels: this app takes images of at most 50 megapixels; scale it down first": {
            "image": huge
        },
        "Object 2: its mask PNG (huge.png) is 15000 x 15000 pixels: this app takes images of at most 50 megapixels": {
            "object_2_mask_png": huge
        },
        "Object 1: 'junk.safetensors' is not a readable safetensors motion file": {
            "object_1_motion_file": handle_file(str(tmp_path / "junk.safetensors"))
        },
        "Object 2: type its motion words": {"object_2_motion_words": ""},
    }
    for expected, change in cases.items():
        message = refusal(server, **change)
        assert message.startswith(expected)
        assert tempfile.gettempdir() not in message and str(tmp_path) not in message


def test_every_message_about_one_object_starts_with_its_number_on_the_page(server):
    from gradio_client import handle_file

    root = server.root
    third = dict(
        object_3_use=True,
        object_3_mask_png=handle_file(str(root / "mask2.png")),
        object_3_motion="jump",
        object_3_motion_words="jumps up",
    )
    assert refusal(server, object_2_motion="spin").startswith(
        "Object 2: motion 'spin' is not in the motion library (it has: jump, slide): choose one of them"
    )
    assert refusal(server, object_2_motion_words="dances wildly").startswith(
        "Object 2: motion words 'dances wildly' were not found among the tokens of the prompt"
    )
    # object 1 unused: the pipeline gets two objects, and the page still names its third
    message = refusal(
        server,
        object_1_use=False,
        object_2_motion_words="slides left",
        **third,
        prompt="A box slides left. A ball hops.",
    )
    assert message.startswith("Object 3: motion words 'jumps up' were not found among the tokens of the prompt")
    assert server.gate.calls == 0  # nothing ran


def test_the_pages_motion_events_name_their_object(server, tmp_path):
    (tmp_path / "not_motion.safetensors").write_bytes(b"\x00" * 64)
    session = GradioSession(server.url)  # the page's own events, as the browser sends them
    try:
        uploaded = session.call(session.fn_index("on_upload_1"), [upload(session, tmp_path / "not_motion.safetensors")])
        (server.root / "motions" / "slide.safetensors").unlink()  # gone since the page listed it
        chosen = session.call(session.fn_index("on_choice_2"), ["slide"])
    finally:
        session.close()
    assert not uploaded["success"] and uploaded["output"]["error"].startswith(
        "Object 2: 'not_motion.safetensors' is not a readable safetensors motion file"
    )
    assert not chosen["success"] and chosen["output"]["error"].startswith(
        "Object 3: motion 'slide' is not in the motion library (it has: jump)"
    )


def test_the_page_names_the_size_of_a_decompression_bomb_when_it_is_uploaded(server, tmp_path):
    session = GradioSession(server.url)
    try:
        bomb = upload(session, png_header(tmp_path / "huge.png", 15000, 15000))
        shown = session.call(session.fn_index("on_image"), [bomb])
    finally:
        session.close()
    assert shown["output"]["data"][0] == (
        "**the image (huge.png) is 15000 x 15000 pixels: this app takes images of at most "
        "50 megapixels; scale it down first**"
    )


def test_fleximmt_app_takes_its_step_limit_from_max_steps(monkeypatch, tiny_pipe):
    import fleximmt.apps.app
    from fleximmt.apps import cli

    served = {}
    monkeypatch.setattr(cli, "load_pipeline", lambda args: tiny_pipe)
    monkeypatch.setattr(fleximmt.apps.app, "serve", lambda *args, **options: served.update(options))
    assert cli.main(["app", "--model", "tiny", "--max-steps", "7"]) == 0 and served["max_steps"] == 7
    assert cli.main(["app", "--model", "tiny"]) == 0 and served["max_steps"] == 100


def test_an_empty_prompt_says_so_and_what_to_write(server):
    message = refusal(server, prompt="")
    assert message.startswith(
        "the prompt is empty, so the motion words 'jumps up' are not in it: write a prompt that "
        "describes the scene and holds each object's motion words as they are"
    )
    assert "cut to" not in message and server.gate.calls == 0


def test_an_empty_or_vanishing_mask_is_refused_naming_its_object(server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    dot = np.zeros((64, 64), np.uint8)
    dot[0, 0] = 255  # one pixel: the 32 x 32 model's resize (nearest) keeps none of it
    Image.fromarray(dot).save(tmp_path / "dot.png")
    empty = "Object 2: its mask is empty, so its motion would move nothing: mark the object"
    assert refusal(server, object_2_mask_png=handle_file(str(tmp_path / "black.png"))).startswith(empty)
    with pytest.raises(AppError, match=r"^Object 2: its mask is empty"):
        server.client.predict(
            **{
                k: v
                for k, v in generate_inputs(
                    server.root, object_2_mask_png=handle_file(str(tmp_path / "black.png"))
                ).items()
                if k not in ("prompt", "steps")
            },
            api_name="/show_masks",
        )
    assert refusal(server, object_1_mask_png=handle_file(str(tmp_path / "dot.png"))) == (
        "Object 1: its mask is too small: nothing of it is left once the image is resized to the model's 32 x 32; "
        "give a larger mask"
    )
    assert server.gate.calls == 0


def test_step_counts_over_the_api_are_whole_and_within_the_pages_limit(server):
    from gradio_client import handle_file

    assert refusal(server, steps=2.5) == "steps=2.5: give a whole number of denoising steps from 1 to 100"
    assert refusal(server, steps=1000) == "steps=1000: give a whole number of denoising steps from 1 to 100"
    assert refusal(server, steps=0) == "steps=0: give a whole number of denoising steps from 1 to 100"
    assert server.gate.calls == 0
    server.client.predict(**generate_inputs(server.root, steps=3.0), api_name="/generate")  # a whole number, as a float
    assert server.gate.calls == 3
    server.restart(max_steps=4)
    slider = next(c for c in server.client.config["components"] if c["props"].get("elem_id") == "steps")
    assert slider["props"]["maximum"] == 4  # the page's limit is the API's
    assert refusal(server, steps=5) == "steps=5: give a whole number of denoising steps from 1 to 4"
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"^steps=12.5: give a whole number of training steps from 1 to 2000"):
        server.client.predict(
            video=handle_file(str(reference_video(server.root / "ref.mp4"))),
            caption="A ball jumps up.",
            concept_words="ball",
            motion_words="jumps up",
            name="hop",
            steps=12.5,
            tokens_per_block=4,
            resume=True,
            api_name="/learn",
        )
    assert server.gate.calls == 3


def test_uploads_over_the_limit_are_refused(assets):
    pipe, root, _ = assets
    port = free_port()
    demo = serve(pipe, root / "motions", port=port, block=False, max_file_size=1000)
    session = GradioSession(f"http://127.0.0.1:{port}/")
    try:
        big = session.http.post(f"{session.url}/gradio_api/upload", files={"files": ("big.png", b"\x00" * 2000)})
        small = session.http.post(f"{session.url}/gradio_api/upload", files={"files": ("small.png", b"\x00" * 500)})
    finally:
        session.close()
        demo.close()
    assert (big.status_code, small.status_code) == (413, 200)


def test_run_files_stay_bounded_and_everything_goes_at_shutdown(server, tmp_path):
    server.restart(keep_files=2)
    app, client = server.app, server.client
    for seed in range(3):
        client.predict(**generate_inputs(server.root, seed=seed), api_name="/generate")
    assert len(list(app.out_dir.glob("run-*"))) == app.keep_runs == 2  # the oldest run's files are gone

    def cached_files():
        return [p for p in (tmp_path / "gradio").rglob("*") if p.is_file()]

    assert cached_files()  # Gradio's copies of the uploads and results...
    wait_for(lambda: not cached_files(), "Gradio's copies to go (keep_files=2 s)")  # ...go once they are old
    assert list((tmp_path / "gradio").iterdir())  # their folders are still there (a sweep takes them a minute later)
    server.demo.close()
    assert not app.out_dir.exists()
    assert list((tmp_path / "gradio").iterdir()) == []  # at shutdown, the folders go too


def test_fleximmt_app_stopped_with_sigterm_leaves_no_files(assets, tmp_path):
    import signal

    from gradio_client import Client

    _, root, _ = assets
    scratch = tmp_path / "server"
    (scratch / "tmp").mkdir(parents=True)
    cache = scratch / "gradio"
    others = cache_of_another_server(cache)
    with serving(["app", "--model", "tiny", "--motions", root / "motions"], scratch) as (server, port):
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        client.predict(**generate_inputs(root), api_name="/generate")
        made = set(scratch.rglob("*")) - others - {scratch / "tmp", cache}
        assert any(p.is_file() for p in made) and any(
            p.is_dir() for p in made
        )  # the run's files, the uploads, their folders
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    assert set(scratch.rglob("*")) == others | {scratch / "tmp", cache}  # no file, no folder of its own left


def cache_of_another_server(cache: Path) -> set[Path]:
    """Gradio's cache as another server left it: a folder with a file and one emptied a moment ago
    (both stay), and one emptied two hours ago (it goes, as a sweep would take it). Returns what stays."""
    (cache / "in_use").mkdir(parents=True)
    (cache / "in_use" / "picture.png").write_bytes(b"x")
    (cache / "just_emptied").mkdir()
    (cache / "emptied_long_ago").mkdir()
    os.utime(cache / "emptied_long_ago", (time.time() - 7200, time.time() - 7200))
    return {cache / "in_use", cache / "in_use" / "picture.png", cache / "just_emptied"}


def test_emptied_cache_folders_go_once_they_are_old(tmp_path):
    for name in ("old_empty", "old_full", "new_empty"):
        (tmp_path / name).mkdir()
    (tmp_path / "old_full" / "video.mp4").write_bytes(b"x")
    (tmp_path / "a_file").write_bytes(b"x")
    for name in ("old_empty", "old_full", "a_file"):
        os.utime(tmp_path / name, (time.time() - 7200, time.time() - 7200))
    assert remove_empty_folders(tmp_path, older_than_s=3600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "new_empty", "old_full"]


# -- in the browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_assets(tmp_path_factory):
    """The shipped toy model, two motions for it and the bundled example images. The motions are
    random unless the screenshot is being updated (then learned, briefly: minutes on a busy CPU)."""
    from fleximmt.toy.lab import EXAMPLE_DIR, learn_motions, load_toy_pipeline

    root = tmp_path_factory.mktemp("toy_app")
    pipe = load_toy_pipeline()
    if os.environ.get("FLEXIMMT_UPDATE_SCREENSHOT"):
        learn_motions(pipe, ["right", "bounce"], root / "motions", steps=30)
    else:
        (root / "motions").mkdir()
        for seed, (name, words) in enumerate([("right", "moves right"), ("bounce", "bounces")]):
            random_motion(pipe.transformer, 16, seed=seed, name=name, motion_words=words).save(
                root / "motions" / f"{name}.safetensors"
            )
    return pipe, root, EXAMPLE_DIR


def _serve(pipe, motions):
    port = free_port()
    return serve(pipe, motions, port=port, block=False), port


@needs_chromium
def test_a_transfer_in_chromium_on_the_toy_model_shows_a_video(toy_assets, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, root, examples = toy_assets
    demo, port = _serve(pipe, root / "motions")
    driver = headless_chromium(tmp_path / "profile", height=2600)
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        upload_box = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload_box.send_keys(str(examples / "scene_0.png"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "image_info"), "the model's own size"))
        words = {1: "moves right", 2: "bounces"}
        for k, motion in ((1, "right"), (2, "bounce")):
            driver.find_element(By.CSS_SELECTOR, f"#png_{k} input[type=file]").send_keys(
                str(examples / "masks" / f"scene_0_object_{k - 1}.png")
            )
            radio = driver.find_element(By.CSS_SELECTOR, f"#motion_{k} input[value='{motion}']")
            driver.execute_script("arguments[0].click();", radio)
            wait.until(
                lambda d, k=k: (
                    d.find_element(By.CSS_SELECTOR, f"#motion_words_{k} textarea").get_attribute("value") == words[k]
                )
            )
        sprites = random_case(100, num_objects=2).sprites  # the bundled scene_0.png
        prompt_text = (
            f"A {sprites[0].colour} {sprites[0].shape} moves right. A {sprites[1].colour} {sprites[1].shape} bounces."
        )
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
    demo, port = _serve(pipe, root / "motions")
    driver = headless_chromium(tmp_path / "profile")
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        button = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "generate"))
        driver.execute_script("arguments[0].click();", button)  # no image given
        WebDriverWait(driver, 60).until(lambda d: "upload an image first" in d.find_element(By.TAG_NAME, "body").text)
        png_header(tmp_path / "huge.png", 15000, 15000)
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(tmp_path / "huge.png"))
        WebDriverWait(driver, 60).until(
            lambda d: "(huge.png) is 15000 x 15000 pixels" in d.find_element(By.ID, "image_info").text
        )
    finally:
        driver.quit()
        demo.close()


@needs_chromium
def test_stop_in_the_page_ends_the_run_at_its_next_step(assets, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, root, _ = assets
    Image.fromarray(np.zeros((32, 96, 3), np.uint8)).save(root / "wide.png")
    mask = np.zeros((32, 96), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "wide_mask.png")
    gate = Gate(pipe.transformer)
    demo, port = _serve(pipe, root / "motions")
    driver = headless_chromium(tmp_path / "profile")
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]"))).send_keys(
            str(root / "wide.png")
        )
        wait.until(
            ec.text_to_be_present_in_element(
                (By.ID, "image_info"), "the picture is stretched (aspect ratio 3.00 becomes 1.00)"
            )
        )
        driver.find_element(By.CSS_SELECTOR, "#png_1 input[type=file]").send_keys(str(root / "wide_mask.png"))
        driver.execute_script("arguments[0].click();", driver.find_element(By.CSS_SELECTOR, "#use_2 input"))
        driver.execute_script(
            "arguments[0].click();", driver.find_element(By.CSS_SELECTOR, "#motion_1 input[value='jump']")
        )
        wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#motion_words_1 textarea").get_attribute("value") == "jumps up"
        )
        driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("A ball jumps up.")
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "generate"))
        gate.wait_entered()  # step 1 of 10 runs
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "stop"))
        wait_for(lambda: demo.fleximmt.worker.stop_requests == 1, "Stop to reach the server")
        gate.open()
        wait_for(lambda: demo.fleximmt.worker.cancelled == 1, "the run to stop")
        assert not driver.find_elements(By.CSS_SELECTOR, "#video_out video")
    finally:
        gate.remove()
        driver.quit()
        demo.close()
    assert gate.calls == 1


@needs_chromium
def test_the_learn_tab_trains_a_motion_that_joins_the_library(assets, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, root, _ = assets
    reference_video(root / "ref.mp4")
    demo, port = _serve(pipe, root / "motions")
    driver = headless_chromium(tmp_path / "profile")
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        tab = wait.until(
            lambda d: next(
                (b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Learn"), False
            )
        )
        driver.execute_script("arguments[0].click();", tab)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#ref_video input[type=file]"))).send_keys(
            str(root / "ref.mp4")
        )
        for elem_id, text in (
            ("caption", "A ball jumps up."),
            ("concept", "ball"),
            ("learn_words", "jumps up"),
            ("motion_name", "hop"),
        ):
            driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").send_keys(text)
        driver.execute_script("arguments[0].click();", driver.find_element(By.ID, "learn"))
        wait.until(lambda d: "hop" in d.find_element(By.ID, "learned").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#motion_1 input[value='hop']"))  # the library lists it
    finally:
        driver.quit()
        demo.close()
    entry = MotionLibrary(root / "motions").get("hop")
    assert entry.motion_words == "jumps up" and entry.preview.is_file()


def test_the_page_names_a_local_model_by_its_folder_not_the_servers_path(assets):
    from fleximmt.apps.app import build_app

    pipe, root, _ = assets
    folder = root / "models" / "my-model"
    folder.mkdir(parents=True)
    pipe.register_to_config(_name_or_path=str(folder))  # what from_pretrained(folder) records
    assert pipe.name_or_path == str(folder)
    demo = build_app(pipe, root / "motions")
    try:
        texts = [b.value for b in demo.blocks.values() if type(b).__name__ == "Markdown" and isinstance(b.value, str)]
        header = next(t for t in texts if t.startswith("# FlexiMMT"))
        assert "`my-model`" in header and str(root) not in header
    finally:
        demo.close()
