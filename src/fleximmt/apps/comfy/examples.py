"""The input files of the example workflows (``comfyui/example_workflows/`` in the repository), written into
ComfyUI's ``input/`` folder: ``python -m fleximmt.apps.comfy.examples /path/to/ComfyUI/input``.

The toy workflows' are ``make demo``'s: the bundled reference videos of the toy world's zigzag and bounce,
and the demo's two-object image (a red square and a blue circle) with a mask PNG per object. The native
workflows' (``native_*``) are a first frame of a red ball and a blue box on grey, a mask per object, and
the two reference videos their *Learn Motion (native)* nodes learn from: the ball jumping up, the box
sliding left (17 frames at 8 a second, drawn here).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

REFERENCES = ("zigzag", "bounce")  # the demo's motions, learned from the bundled reference videos
IMAGE = "fleximmt_demo.png"
# the native examples' scene, at Wan's 832 x 480 (each workflow scales it to its model's size)
NATIVE_IMAGE, NATIVE_MASKS = "ball_and_box.png", ("ball_mask.png", "box_mask.png")
NATIVE_REFERENCES = {"jump": (-12, 0), "slide": (0, -16)}  # fleximmt_<name>.mp4: its object's step a frame (y, x)
NATIVE_SIZE, NATIVE_FRAMES, NATIVE_FPS = (480, 832), 17, 8
GREY, BALL, BOX = (90, 90, 90), (220, 30, 30), (30, 30, 220)


def mask_name(k: int) -> str:
    return f"fleximmt_demo_object_{k}.png"


def video_name(motion: str) -> str:
    return f"fleximmt_{motion}.mp4"


def native_scene(ball: tuple[int, int] = (200, 200), box: tuple[int, int] = (240, 520)) -> tuple[np.ndarray, list]:
    """The native examples' frame (uint8 ``[480, 832, 3]``): a red ball (radius 60) centred at ``ball`` and a
    blue box (120 wide) centred at ``box`` on grey; and each object's mask."""
    height, width = NATIVE_SIZE
    y, x = np.mgrid[:height, :width]
    ball_mask = (y - ball[0]) ** 2 + (x - ball[1]) ** 2 <= 60**2
    box_mask = (abs(y - box[0]) <= 60) & (abs(x - box[1]) <= 60)
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = GREY
    frame[ball_mask], frame[box_mask] = BALL, BOX
    return frame, [ball_mask, box_mask]


def native_reference(name: str) -> np.ndarray:
    """A native example's reference video (uint8 ``[17, 480, 832, 3]``): its object moves, the other stays away."""
    dy, dx = NATIVE_REFERENCES[name]
    frames = []
    for f in range(NATIVE_FRAMES):
        if name == "jump":  # the ball alone, rising
            frame, _ = native_scene(ball=(400 + dy * f, 416), box=(-1000, -1000))
        else:  # the box alone, sliding left
            frame, _ = native_scene(ball=(-1000, -1000), box=(240, 640 + dx * f))
        frames.append(frame)
    return np.stack(frames)


def write_native_inputs(folder: Path) -> list[Path]:
    """The native workflows' first frame, masks and reference videos, in ``folder``."""
    import imageio.v3 as iio
    from PIL import Image

    frame, masks = native_scene()
    Image.fromarray(frame).save(folder / NATIVE_IMAGE)
    written = [folder / NATIVE_IMAGE]
    for name, mask in zip(NATIVE_MASKS, masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / name)
        written.append(folder / name)
    for name in NATIVE_REFERENCES:
        path = folder / video_name(name)
        iio.imwrite(path, native_reference(name), fps=NATIVE_FPS, codec="libx264")
        written.append(path)
    return written


def write_inputs(folder: str | Path) -> list[Path]:
    """Write the example workflows' inputs into ``folder`` (ComfyUI's ``input/``); returns their paths."""
    from PIL import Image

    from ...toy.demo import demo_case
    from ...toy.lab import REFERENCE_DIR

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for motion in REFERENCES:
        written.append(Path(shutil.copyfile(REFERENCE_DIR / f"{motion}.mp4", folder / video_name(motion))))
    first = demo_case().scene(trajectories=False)
    Image.fromarray(first.frames[0]).save(folder / IMAGE)
    written.append(folder / IMAGE)
    for k, mask in enumerate(first.masks[:, 0], 1):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / mask_name(k))
        written.append(folder / mask_name(k))
    return written + write_native_inputs(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fleximmt.apps.comfy.examples",
        description="Write the input files of fleximmt's example ComfyUI workflows.",
    )
    parser.add_argument("folder", help="ComfyUI's input folder, e.g. ComfyUI/input")
    for path in write_inputs(parser.parse_args(argv).folder):
        print(path)


if __name__ == "__main__":
    main()
