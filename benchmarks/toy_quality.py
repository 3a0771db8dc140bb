"""How well the shipped toy base model follows its captions (plain image-to-video, no motion tokens).

Two measurements against the toy world's ground truth, each sprite found by its colour:
- held-out scenes (seeds the trainer never draws), given their first frame and caption: mean
  distance in pixels between each sprite's generated and true centre over the frames, next to the
  error of a "nothing moves" guess; and the share of sprites with a linear motion (left/right/up/
  down) whose generated displacement points the way the caption says;
- the counterfactual test (TOY-NOTES.md): one first frame, one sprite, captioned with each of the
  four directions in turn; the share of videos that move the way their caption says. A model that
  reads the motion from where the sprite starts scores about 50% here;
- the same with two sprites: one first frame, the two captioned with opposite directions, then
  the reverse (up/down, down/up, left/right, right/left); the share of sprites that move the way
  their own sentence says, and of videos where both do. A model that moves sprites but ignores
  which sentence names which sprite scores about 50% per sprite.
Held-out results are also given for one-sprite and for two-or-three-sprite scenes apart.

    python benchmarks/toy_quality.py [--scenes 40] [--counterfactual 20] [--pairs 10] [--model DIR] [--steps 20] [--guidance 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from fleximmt.evaluation.video import to_uint8_frames
from fleximmt.toy.lab import TOY_MODEL, load_toy_pipeline
from fleximmt.toy.world import COLOURS, MOTIONS, SHAPES, Sprite, Trajectory, colour_track, random_scene, render

HELD_OUT = 10**9  # the trainer draws seeds below 10**8
AXES = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}


def generate(pipe, image: np.ndarray, caption: str, steps: int, guidance: float, seed: int) -> np.ndarray:
    out = pipe(
        image=Image.fromarray(image),
        prompt=caption,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )
    return to_uint8_frames(out.frames[0])


def moved_as_told(centres: np.ndarray, motion: str, min_px: float = 3.0) -> bool:
    axis, sign = AXES[motion]
    found = centres[~np.isnan(centres).any(-1)]
    return len(found) >= 2 and sign * (found[-1, axis] - found[0, axis]) >= min_px


def held_out(pipe, count: int, steps: int, guidance: float) -> dict:
    errors, still_errors, direction, counts, direction_counts = [], [], [], [], []
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
            counts.append(len(scene.sprites))
            if sprite.trajectory.name in AXES:
                direction.append(moved_as_told(centres, sprite.trajectory.name))
                direction_counts.append(len(scene.sprites))

    def summary(keep: np.ndarray, keep_linear: np.ndarray) -> dict:
        err = np.asarray(errors)[keep]
        return {
            "sprites": int(keep.sum()),
            "position_error_px": float(np.nanmean(err)) if keep.any() else None,
            "still_guess_error_px": float(np.mean(np.asarray(still_errors)[keep])) if keep.any() else None,
            "lost_sprites": int(np.isnan(err).sum()),
            "linear_sprites": int(keep_linear.sum()),
            "direction_accuracy": float(np.mean(np.asarray(direction)[keep_linear])) if keep_linear.any() else None,
        }

    counts, direction_counts = np.asarray(counts), np.asarray(direction_counts)
    return {
        "scenes": count,
        **summary(counts > 0, direction_counts > 0),
        "one_sprite": summary(counts == 1, direction_counts == 1),
        "two_or_three_sprites": summary(counts > 1, direction_counts > 1),
    }


def counterfactual(pipe, count: int, steps: int, guidance: float) -> dict:
    rng = np.random.RandomState(7)
    right = []
    per_motion = {m: [] for m in AXES}
    for i in range(count):
        colour = str(rng.choice(["red", "green", "blue", "yellow", "orange", "purple", "white"]))
        shape = str(rng.choice(["circle", "square", "triangle", "diamond"]))
        start = tuple(float(v) for v in rng.uniform(22, 42, size=2))
        first = render(
            [Sprite(shape, colour, float(rng.uniform(5, 7)), start, Trajectory("still"), int(rng.randint(1 << 30)))],
            17,
            64,
            str(rng.choice(["plain", "gradient", "stripes"])),
            HELD_OUT + 10_000 + i,
        ).frames[0]
        for motion in AXES:
            frames = generate(pipe, first, f"A {colour} {shape} {MOTIONS[motion]}.", steps, guidance, i)
            ok = moved_as_told(colour_track(frames, colour, start=start)[0], motion)
            right.append(ok)
            per_motion[motion].append(ok)
    return {
        "first_frames": count,
        "videos": len(right),
        "direction_accuracy": float(np.mean(right)),
        "per_motion": {m: float(np.mean(v)) for m, v in per_motion.items()},
    }


PAIRS = (("up", "down"), ("down", "up"), ("left", "right"), ("right", "left"))


def counterfactual_pairs(pipe, count: int, steps: int, guidance: float) -> dict:
    """Two sprites in one first frame, captioned with opposite directions and then the reverse:
    does each sprite move the way its own sentence says (the caption must bind motion to sprite)?"""
    rng = np.random.RandomState(11)
    sprite_ok, video_ok = [], []
    for i in range(count):
        colours = [str(c) for c in rng.choice(list(COLOURS), 2, replace=False)]
        shapes = [str(s) for s in rng.choice(SHAPES, 2)]
        starts = [
            (float(24 + rng.uniform(-2, 2)), float(24 + rng.uniform(-2, 2))),
            (float(40 + rng.uniform(-2, 2)), float(40 + rng.uniform(-2, 2))),
        ]
        sprites = [
            Sprite(shape, colour, float(rng.uniform(5, 7)), start, Trajectory("still"), int(rng.randint(1 << 30)))
            for shape, colour, start in zip(shapes, colours, starts)
        ]
        first = render(
            sprites, 17, 64, str(rng.choice(["plain", "gradient", "stripes"])), HELD_OUT + 20_000 + i
        ).frames[0]
        order = rng.permutation(2)  # which sprite the caption names first
        for pair in PAIRS:
            caption = " ".join(f"A {colours[k]} {shapes[k]} {MOTIONS[pair[k]]}." for k in order)
            frames = generate(pipe, first, caption, steps, guidance, i)
            oks = [moved_as_told(colour_track(frames, colours[k], start=starts[k])[0], pair[k]) for k in range(2)]
            sprite_ok += oks
            video_ok.append(all(oks))
    return {
        "first_frames": count,
        "videos": len(video_ok),
        "sprite_direction_accuracy": float(np.mean(sprite_ok)),
        "both_right": float(np.mean(video_ok)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=40, help="held-out scenes (default: %(default)s)")
    parser.add_argument(
        "--counterfactual", type=int, default=20, help="first frames x 4 captions (default: %(default)s)"
    )
    parser.add_argument(
        "--pairs", type=int, default=10, help="two-sprite first frames x 4 caption pairs (default: %(default)s)"
    )
    parser.add_argument("--model", default=str(TOY_MODEL), help="toy model folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    pipe = load_toy_pipeline(args.model)
    start = time.perf_counter()
    results = {
        "held_out": held_out(pipe, args.scenes, args.steps, args.guidance),
        "counterfactual": counterfactual(pipe, args.counterfactual, args.steps, args.guidance),
        "counterfactual_pairs": counterfactual_pairs(pipe, args.pairs, args.steps, args.guidance),
        "steps": args.steps,
        "guidance": args.guidance,
    }
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
