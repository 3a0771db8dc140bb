"""The input files of the example workflows (``comfyui/example_workflows/`` in the repository), written into
ComfyUI's ``input/`` folder: ``python -m fleximmt.apps.comfy.examples /path/to/ComfyUI/input``.

They are ``make demo``'s: the bundled reference videos of the toy world's zigzag and bounce, and the
demo's two-object image (a red square and a blue circle) with a mask PNG per object.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

REFERENCES = ("zigzag", "bounce")  # the demo's motions, learned from the bundled reference videos
IMAGE = "fleximmt_demo.png"


def mask_name(k: int) -> str:
    return f"fleximmt_demo_object_{k}.png"


def video_name(motion: str) -> str:
    return f"fleximmt_{motion}.mp4"


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
    return written


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
