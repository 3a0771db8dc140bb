"""``make demo`` / ``fleximmt demo``: the whole pipeline on a built-in tiny random-weight model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .motion import MotionTokens, ObjectMotion
from .toy import random_motion, tiny_pipeline
from .video import mask_overlay, save_video

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
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = tiny_pipeline(seed=0, height=SIZE, width=SIZE, num_frames=FRAMES)
    image, masks = demo_scene()
    image.save(out / "input.png")
    objects = []
    for k, ((name, words, _), mask) in enumerate(zip(OBJECTS, masks)):
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"mask_{k}.png")
        path = out / f"motion_{k}.safetensors"
        random_motion(pipe.transformer, tokens_per_motion=8, seed=k + 1, scale=4.0, name=f"random {k}",
                      motion_words=words).save(path)  # fmt: skip
        objects.append(ObjectMotion(str(out / f"mask_{k}.png"), MotionTokens.load(path), words))
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    result = pipe(image=image, prompt=PROMPT, objects=objects, num_inference_steps=steps, output_type="np",
                  max_sequence_length=pipe.transformer.config.max_text_seq_length, return_masks=True,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    frames = result.frames[0]
    save_video(frames, out / "fleximmt.mp4")
    save_video(mask_overlay(frames, result.masks[-1], pipe.vae_scale_factor_temporal), out / "masks.mp4")
    summary = {"prompt": PROMPT, "frames": int(frames.shape[0]), "size": list(frames.shape[1:3]), "steps": steps,
               "objects": [{"mask": f"mask_{k}.png", "motion": f"motion_{k}.safetensors", "motion_text": o[1]}
                           for k, o in enumerate(OBJECTS)],
               "mask_tokens_per_latent_frame": result.masks[-1].flatten(2).sum(-1).tolist(),
               "seconds": round(time.perf_counter() - start, 1), "random_weights": True,
               "files": ["input.png", "mask_0.png", "mask_1.png", "motion_0.safetensors", "motion_1.safetensors",
                         "fleximmt.mp4  (the generated video)", "masks.mp4  (propagated object masks over the video)",
                         "demo.json"]}  # fmt: skip
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
