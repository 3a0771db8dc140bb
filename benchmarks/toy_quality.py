"""How well the shipped toy base model follows its captions (plain image-to-video, no motion tokens).

Two measurements against the toy world's ground truth, each sprite found by its colour:
- held-out scenes (seeds the trainer never draws), given their first frame and caption: mean
  distance in pixels between each sprite's generated and true centre over the frames, next to the
  error of a "nothing moves" guess; and the share of sprites with a linear motion (left/right/up/
  down) whose generated displacement points the way the caption says;
- the counterfactual test (TOY-NOTES.md): one first frame, one sprite, captioned with each of the
  four directions in turn; the share of videos that move the way their caption says. A model that
  reads the motion from where the sprite starts scores about 50% here.

    python benchmarks/toy_quality.py [--scenes 40] [--frames-tests 20] [--steps 20] [--guidance 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from fleximmt.toylab import load_toy_pipeline
from fleximmt.toyworld import MOTIONS, Sprite, Trajectory, colour_track, random_scene, render
from fleximmt.video import to_uint8_frames

HELD_OUT = 10**9  # the trainer draws seeds below 10**8
AXES = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}


def generate(pipe, image: np.ndarray, caption: str, steps: int, guidance: float, seed: int) -> np.ndarray:
    out = pipe(image=Image.fromarray(image), prompt=caption, num_inference_steps=steps, guidance_scale=guidance,
               output_type="np", generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return to_uint8_frames(out.frames[0])


def moved_as_told(centres: np.ndarray, motion: str, min_px: float = 3.0) -> bool:
    axis, sign = AXES[motion]
    found = centres[~np.isnan(centres).any(-1)]
    return len(found) >= 2 and sign * (found[-1, axis] - found[0, axis]) >= min_px


def held_out(pipe, count: int, steps: int, guidance: float) -> dict:
    errors, still_errors, direction = [], [], []
    seed, scenes = HELD_OUT, 0
    while scenes < count:
        seed += 1
        scene = random_scene(seed)
        colours = [s.colour for s in scene.sprites]
        if len(set(colours)) < len(colours):
            continue  # two sprites of one colour: the colour tracker could not tell them apart
        frames = generate(pipe, scene.frames[0], scene.caption, steps, guidance, seed)
        scenes += 1
        for k, sprite in enumerate(scene.sprites):
            centres, _ = colour_track(frames, sprite.colour, start=sprite.start)
            truth = scene.positions[k]
            found = ~np.isnan(centres).any(-1)
            dist = np.where(found, np.hypot(*(np.nan_to_num(centres) - truth).T), np.nan)
            errors.append(float(np.nanmean(dist)) if found.any() else np.nan)
            still_errors.append(float(np.hypot(*(truth - truth[:1]).T).mean()))
            if sprite.trajectory.name in AXES:
                direction.append(moved_as_told(centres, sprite.trajectory.name))
    return {"scenes": count, "sprites": len(errors), "position_error_px": float(np.nanmean(errors)),
            "still_guess_error_px": float(np.mean(still_errors)), "lost_sprites": int(np.isnan(errors).sum()),
            "direction_accuracy": float(np.mean(direction)), "linear_sprites": len(direction)}  # fmt: skip


def counterfactual(pipe, count: int, steps: int, guidance: float) -> dict:
    rng = np.random.RandomState(7)
    right = []
    per_motion = {m: [] for m in AXES}
    for i in range(count):
        colour = str(rng.choice(["red", "green", "blue", "yellow", "orange", "purple", "white"]))
        shape = str(rng.choice(["circle", "square", "triangle", "diamond"]))
        start = tuple(float(v) for v in rng.uniform(22, 42, size=2))
        first = render([Sprite(shape, colour, float(rng.uniform(5, 7)), start, Trajectory("still"), int(rng.randint(1 << 30)))],
                       17, 64, str(rng.choice(["plain", "gradient", "stripes"])), HELD_OUT + 10_000 + i).frames[0]  # fmt: skip
        for motion in AXES:
            frames = generate(pipe, first, f"A {colour} {shape} {MOTIONS[motion]}.", steps, guidance, i)
            ok = moved_as_told(colour_track(frames, colour, start=start)[0], motion)
            right.append(ok)
            per_motion[motion].append(ok)
    return {"first_frames": count, "videos": len(right), "direction_accuracy": float(np.mean(right)),
            "per_motion": {m: float(np.mean(v)) for m, v in per_motion.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=40, help="held-out scenes (default: %(default)s)")
    parser.add_argument("--counterfactual", type=int, default=20, help="first frames x 4 captions (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    pipe = load_toy_pipeline()
    start = time.perf_counter()
    results = {"held_out": held_out(pipe, args.scenes, args.steps, args.guidance),
               "counterfactual": counterfactual(pipe, args.counterfactual, args.steps, args.guidance),
               "steps": args.steps, "guidance": args.guidance}  # fmt: skip
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
