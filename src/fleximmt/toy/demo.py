"""``make demo`` / ``fleximmt demo``.

On the toy model that ships with the package (the default): learn two motions from bundled
reference videos, transfer them onto a two-object image, and compare FlexiMMT with motion tokens
without masks and with plain image-to-video (``run_toy_demo``). ``--model tiny`` runs every stage
on a tiny random-weight model instead (``run_demo``): a smoke test whose video is noise."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..evaluation.video import mask_overlay, save_video
from ..method.motion import MotionTokens, ObjectMotion, atomic_write
from .tiny import random_motion, tiny_pipeline

SIZE, FRAMES = 64, 17
PROMPT = "A red ball jumps up. A blue box slides left."
OBJECTS = (("red ball", "jumps up", (230, 40, 40)), ("blue box", "slides left", (40, 70, 230)))


def demo_scene() -> tuple[Image.Image, list[np.ndarray]]:
    """A two-object image (a red disc and a blue square on a soft gradient) and the objects' masks."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    background = np.stack([120 + x, 140 + 0 * x, 110 + y], axis=-1).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    draw.ellipse([8, 28, 28, 48], fill=OBJECTS[0][2])
    draw.rectangle([38, 14, 56, 32], fill=OBJECTS[1][2])
    ball = (x - 18) ** 2 + (y - 38) ** 2 <= 10**2
    box = (x >= 38) & (x <= 56) & (y >= 14) & (y <= 32)
    return image, [ball, box]


def run_demo(out: Path, steps: int = 10) -> dict:
    """Every stage on a tiny random-weight model: two objects, two random motion files."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = tiny_pipeline(seed=0, height=SIZE, width=SIZE, num_frames=FRAMES)
    image, masks = demo_scene()
    image.save(out / "input.png")
    objects = []
    for k, ((_name, words, _), mask) in enumerate(zip(OBJECTS, masks)):
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"mask_{k}.png")
        path = out / f"motion_{k}.safetensors"
        random_motion(
            pipe.transformer, tokens_per_motion=8, seed=k + 1, scale=4.0, name=f"random {k}", motion_words=words
        ).save(path)
        objects.append(ObjectMotion(str(out / f"mask_{k}.png"), MotionTokens.load(path), words))
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    result = pipe(
        image=image,
        prompt=PROMPT,
        objects=objects,
        num_inference_steps=steps,
        output_type="np",
        return_masks=True,
        generator=torch.Generator().manual_seed(0),
    )
    frames = result.frames[0]
    save_video(frames, out / "fleximmt.mp4")
    save_video(
        mask_overlay(frames, result.masks[0, -1], frame_index=pipe.mask_frame_index(len(frames))), out / "masks.mp4"
    )
    summary = {
        "prompt": PROMPT,
        "frames": int(frames.shape[0]),
        "size": list(frames.shape[1:3]),
        "steps": steps,
        "objects": [
            {"mask": f"mask_{k}.png", "motion": f"motion_{k}.safetensors", "motion_text": o[1]}
            for k, o in enumerate(OBJECTS)
        ],
        "mask_tokens_per_latent_frame": result.masks[0, -1].flatten(2).sum(-1).tolist(),
        "seconds": round(time.perf_counter() - start, 1),
        "random_weights": True,
        "files": [
            "input.png",
            "mask_0.png",
            "mask_1.png",
            "motion_0.safetensors",
            "motion_1.safetensors",
            "fleximmt.mp4  (the generated video)",
            "masks.mp4  (propagated object masks over the video)",
            "demo.json",
        ],
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


DEMO_MOTIONS = ("zigzag", "bounce")
DEMO_VARIANTS = ("fleximmt", "no_masks", "plain_i2v")


def demo_case():
    """The bundled two-object image: a red square (left) and a blue circle (right)."""
    from .lab import Case
    from .world import Sprite, Trajectory

    sprites = [
        Sprite("square", "red", 6.0, (16.0, 22.0), Trajectory("still"), texture_seed=11),
        Sprite("circle", "blue", 6.5, (44.0, 44.0), Trajectory("still"), texture_seed=12),
    ]
    return Case(sprites, list(DEMO_MOTIONS), "plain", seed=5)


def _side_by_side(panels: list[np.ndarray], labels: list[str], scale: int = 3) -> np.ndarray:
    """Videos ``[T, H, W, 3]`` next to each other, enlarged, each with a caption strip on top."""
    frames = []
    for t in range(min(len(p) for p in panels)):
        row = []
        for panel, label in zip(panels, labels):
            big = Image.fromarray(panel[t]).resize((panel.shape[2] * scale, panel.shape[1] * scale), Image.NEAREST)
            tile = Image.new("RGB", (big.width, big.height + 14), "white")
            tile.paste(big, (0, 14))
            ImageDraw.Draw(tile).text((3, 1), label, fill="black")
            row.append(np.asarray(tile))
        frames.append(np.concatenate(row, axis=1))
    return np.stack(frames)


def run_toy_demo(
    out: Path, steps: int = 20, train_steps: int = 300, motions_dir: Path | None = None, log=print
) -> dict:
    """Learn two motions on the shipped toy model (or reuse them), transfer them onto the demo
    image with three variants, write videos, a side-by-side GIF and ``metrics.json``."""
    from .lab import REFERENCE_DIR, learn_motions, load_toy_pipeline, reference_scene, score, transfer

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = load_toy_pipeline()
    case = demo_case()
    first = case.scene(trajectories=False)
    Image.fromarray(first.frames[0]).save(out / "input.png")
    for k, mask in enumerate(first.masks[:, 0]):
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"mask_{k}.png")
    motions_dir = Path(motions_dir or out / "motions")
    for name in DEMO_MOTIONS:
        if not (motions_dir / f"{name}.safetensors").is_file():
            log(
                f"learning motion {name!r} from {REFERENCE_DIR / (name + '.mp4')} ({train_steps} steps; the same as "
                f"`fleximmt train --model toy --video {REFERENCE_DIR / (name + '.mp4')} ... --out {motions_dir / (name + '.safetensors')}`)"
            )
        else:
            log(f"reusing the learned motion {motions_dir / (name + '.safetensors')}")
    motions = learn_motions(pipe, DEMO_MOTIONS, motions_dir, steps=train_steps)
    results, videos = {}, {}
    for variant in DEMO_VARIANTS:
        log(f"generating: {variant}")
        frames, masks, _ = transfer(pipe, case, motions, variant, steps=steps)
        videos[variant] = frames
        metrics = score(frames, case)
        results[variant] = {k: round(v, 4) for k, v in metrics.items() if k != "objects"}
        results[variant]["objects"] = metrics["objects"]
        if variant == "fleximmt":
            save_video(frames, out / "fleximmt.mp4")
            save_video(
                mask_overlay(frames, masks[-1], frame_index=pipe.mask_frame_index(len(frames))), out / "masks.mp4"
            )
    refs = [reference_scene(name).frames for name in DEMO_MOTIONS]
    panels = refs + [videos[v] for v in DEMO_VARIANTS]
    labels = [f"ref: {n}" for n in DEMO_MOTIONS] + ["FlexiMMT", "no masks", "plain I2V"]
    save_video(_side_by_side(panels, labels), out / "side_by_side.gif")
    metrics = {
        "prompt": case.prompt,
        "motions": list(DEMO_MOTIONS),
        "variants": results,
        "notes": "per-object averages; tf/ff against each object's reference video (LK tracks, DIS flow), "
        "traj_err in pixels from the path the reference motion prescribes from the object's start, "
        "leak = share of objects whose path is closer to another object's reference",
    }
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    summary = {
        "prompt": case.prompt,
        "seconds": round(time.perf_counter() - start, 1),
        "random_weights": False,
        "variants": {v: {k: r[k] for k in ("tf", "ff", "traj_err", "leak")} for v, r in results.items()},
        "files": [
            "input.png",
            "mask_0.png",
            "mask_1.png",
            f"motions/{DEMO_MOTIONS[0]}.safetensors",
            f"motions/{DEMO_MOTIONS[1]}.safetensors",
            "fleximmt.mp4  (FlexiMMT's video)",
            "masks.mp4  (propagated object masks over the video)",
            "side_by_side.gif  (references | FlexiMMT | motion tokens without masks | plain image-to-video)",
            "metrics.json  (TF, FF, trajectory error and leakage per variant)",
        ],
    }
    return summary
