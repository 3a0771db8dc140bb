"""A probe of why FlexiMMT's multi-object gains stay small on the toy model: two sprites, one motion.

A red square is given the learned reference motion "right" (1.9 px a frame, 30 px over the clip);
a blue circle next to it is given either nothing (its sentence, "stands still", is then context
text, open to every video token) or the learned motion "still" (its sentence is then its own
motion span). The right answer is known: red moves about 30 px right, blue stays. For each variant
and six first frames (two layouts x three seeds) the script reports how far each sprite moved
along x, and how often red moved right (> 10 px) while blue stayed (< 5 px).

    python benchmarks/toy_two_sprites.py [--model DIR] [--motions DIR] [--train-steps 150]
"""

from __future__ import annotations

import argparse

import numpy as np

from fleximmt.toy.lab import TOY_MODEL, VARIANTS, Case, learn_motions, load_toy_pipeline, transfer
from fleximmt.toy.world import Sprite, Trajectory, colour_track

LAYOUTS = (((20.0, 20.0), (30.0, 46.0)), ((20.0, 44.0), (40.0, 18.0)))  # (red start, blue start)
PROBES = {  # label -> (variant, what the blue circle is given)
    "plain image-to-video": ("plain_i2v", None),
    "motion tokens without masks, blue given nothing": ("no_masks", None),
    "FlexiMMT, blue given nothing": ("fleximmt", None),
    "FlexiMMT w/o T2X, blue given nothing": ("w/o T2X", None),
    "FlexiMMT w/o M2X, blue given nothing": ("w/o M2X", None),
    "oracle path masks, blue given nothing": ("oracle: static masks of the whole true path", None),
    "FlexiMMT, context text closed, blue given nothing": ("context text closed", None),
    "motion tokens without masks, blue given 'still'": ("no_masks", "still"),
    "FlexiMMT, blue given 'still'": ("fleximmt", "still"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TOY_MODEL), help="toy model folder (default: the shipped one)")
    parser.add_argument("--motions", default="toy-two-sprites/motions", help="folder of learned motions (reused)")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    args = parser.parse_args()
    VARIANTS.setdefault("context text closed", {"context_text": "closed"})
    pipe = load_toy_pipeline(args.model)
    motions = learn_motions(pipe, ["right", "still"], args.motions, steps=args.train_steps, seed=0)
    print("| variant | red dx px (6 videos) | blue dx px | red right and blue still |\n|---|---|---|---|")
    for label, (variant, blue_motion) in PROBES.items():
        red_dx, blue_dx = [], []
        for seed in range(3):
            for red_start, blue_start in LAYOUTS:
                case = Case(
                    [
                        Sprite("square", "red", 6.0, red_start, Trajectory("still"), texture_seed=3),
                        Sprite("circle", "blue", 6.0, blue_start, Trajectory("still"), texture_seed=5),
                    ],
                    ["right", blue_motion],
                    "plain",
                    seed,
                )
                frames, _, _ = transfer(pipe, case, motions, variant, steps=args.steps, seed=seed)
                for colour, start, out in (("red", red_start, red_dx), ("blue", blue_start, blue_dx)):
                    centres, _ = colour_track(frames, colour, start=start)
                    found = centres[~np.isnan(centres).any(-1)]
                    out.append(float(found[-1, 0] - found[0, 0]) if len(found) >= 2 else float("nan"))
        ok = sum(r > 10 and abs(b) < 5 for r, b in zip(red_dx, blue_dx))
        fmt = lambda xs: " ".join("lost" if np.isnan(x) else f"{x:+.0f}" for x in xs)
        print(f"| {label} | {fmt(red_dx)} | {fmt(blue_dx)} | {ok}/6 |", flush=True)


if __name__ == "__main__":
    main()
