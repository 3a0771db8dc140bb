"""The paper's claims, measured in the toy world on the shipped toy model.

Learns the motion tokens of every bundled reference motion once (or reuses them), then animates
``--scenes`` scenes of 2-3 sprites, each given a different reference motion, with every variant of
``fleximmt.toy.lab.VARIANTS``: FlexiMMT; w/o M2X; w/o T2X; motion tokens without masks
(FlexiAct-style concatenation); plain image-to-video; w/o RMPM (static first-frame masks); QK masks;
RMPM "released"; anchors 1 / 5 (3 is FlexiMMT's); alpha 5% / 10% (FlexiMMT: off); RMPM's step 0
without masks, as released (FlexiMMT starts from the first-frame masks, docs/method.md#rmpm); and a
probe, first-frame masks dilated by one token (does a sprite leaving its mask lose its motion?). Per variant:
TF, FF (each object against its own reference), trajectory error (pixels from the path its
reference prescribes) and leakage (share of objects whose path is closer to another object's
reference than to their own), mean and standard deviation over scenes, and seconds per video.

Results are appended to ``OUT/results.jsonl`` as they come (a rerun skips what is there) and the
tables go to ``OUT/table.md``: mean ± std over scenes, then every variant paired scene by scene
with ``--baseline`` (plain image-to-video): mean difference ± its 95% interval.

    python benchmarks/toy_ablation.py [--scenes 30] [--objects N] [--out toy-ablation] [--train-steps 300] [--steps 20]
    python benchmarks/toy_ablation.py --mask-quality --variants fleximmt "anchors 1" ...   # masks against the truth
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fleximmt.toy.lab import (
    REFERENCES,
    TOY_MODEL,
    VARIANTS,
    learn_motions,
    load_toy_pipeline,
    mask_quality,
    random_case,
    score,
    transfer,
)

STILL = "first frame repeated"  # a reference point: what a video in which nothing moves scores
KEYS = (("tf", "TF ↑"), ("ff", "FF ↑"), ("traj_err", "traj. err px ↓"), ("leak", "leakage ↓"))


def table(rows: list[dict], variants: list[str]) -> str:
    lines = [
        "| variant | " + " | ".join(label for _, label in KEYS) + " | s / video |",
        "|---|" + "---|" * (len(KEYS) + 1),
    ]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        cells = [f"{np.mean([r[k] for r in mine]):.3f} ± {np.std([r[k] for r in mine]):.3f}" for k, _ in KEYS]
        seconds = np.mean([r["seconds"] for r in mine])
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {seconds:.2f} |")
    return (
        "\n".join(lines) + f"\n\n{len({r['case'] for r in rows})} scenes, {len(rows)} videos; mean ± std over scenes."
    )


def paired(rows: list[dict], variants: list[str], baseline: str) -> str:
    """Each variant minus ``baseline`` scene by scene (the same scenes and seeds): mean difference
    ± the half-width of its 95% interval (1.96 standard errors), and the scenes where it is better."""
    base = {r["case"]: r for r in rows if r["variant"] == baseline}
    lines = [
        f"| variant minus {baseline} | " + " | ".join(f"Δ {label}" for _, label in KEYS) + " |",
        "|---|" + "---|" * len(KEYS),
    ]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant and r["case"] in base]
        if variant == baseline or len(mine) < 2:
            continue
        cells = []
        for key, label in KEYS:
            diff = np.array([r[key] - base[r["case"]][key] for r in mine])
            better = int(((diff < 0) if "↓" in label else (diff > 0)).sum())
            cells.append(
                f"{diff.mean():+.3f} ± {1.96 * diff.std(ddof=1) / np.sqrt(len(diff)):.3f} ({better}/{len(diff)})"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(n/m): better than the baseline in n of m scenes."


def masks_table(pipe, motions, args) -> str:
    """How well each mask source covers where the sprites should be (``toylab.mask_quality``), on
    the same scenes and seeds as the ablation: IoU and recall of the last step's masks."""
    lines = ["| variant | IoU | recall | recall per latent frame |", "|---|---|---|---|"]
    for variant in args.variants:
        if variant == STILL or VARIANTS.get(variant) is None:
            continue
        found = []
        for seed in range(args.scenes):
            case = random_case(seed, num_objects=args.objects)
            _, masks, _ = transfer(pipe, case, motions, variant, steps=args.steps, guidance=args.guidance, seed=seed)
            found.append(mask_quality(case, masks[-1]))
        per_frame = np.mean([q["per_frame_recall"] for q in found], axis=0)
        lines.append(
            f"| {variant} | {np.mean([q['iou'] for q in found]):.3f} | {np.mean([q['recall'] for q in found]):.3f} | "
            + " ".join(f"{r:.2f}" for r in per_frame)
            + " |"
        )
    return (
        "\n".join(lines) + f"\n\n{args.scenes} scenes; masks of the last denoising step, latent frames after the first."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--model", default=str(TOY_MODEL), help="toy model folder (default: the shipped one)")
    parser.add_argument("--objects", type=int, help="sprites per scene (default: 2 or 3, drawn per scene)")
    parser.add_argument("--out", default="toy-ablation")
    parser.add_argument("--motions", help="folder of learned motions to reuse or fill (default: OUT/motions)")
    parser.add_argument("--train-steps", type=int, default=300, help="steps per learned motion (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=16, help="motion tokens per block (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument(
        "--mask-quality",
        action="store_true",
        help="instead: how well each variant's masks cover the sprites' true positions (OUT/mask_quality.md)",
    )
    parser.add_argument(
        "--baseline", default="plain_i2v", help="variant the paired table compares with (default: %(default)s)"
    )
    parser.add_argument(
        "--variants", nargs="*", default=[*VARIANTS, STILL], help="a subset of: " + ", ".join(VARIANTS) + f", '{STILL}'"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_toy_pipeline(args.model)
    motions = learn_motions(
        pipe, list(REFERENCES), args.motions or out / "motions", steps=args.train_steps, tokens=args.tokens
    )
    if args.mask_quality:
        text = masks_table(pipe, motions, args)
        (out / "mask_quality.md").write_text(text + "\n")
        print(text)
        return
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["case"], r["variant"]) for r in rows}
    jobs = [(seed, v) for seed in range(args.scenes) for v in args.variants if (seed, v) not in done]
    for seed, variant in tqdm(jobs, desc="toy ablation"):
        case = random_case(seed, num_objects=args.objects)
        if variant == STILL:
            frames, seconds = case.scene(trajectories=False).frames, 0.0
        else:
            frames, _, seconds = transfer(
                pipe, case, motions, variant, steps=args.steps, guidance=args.guidance, seed=seed
            )
        row = {"case": seed, "variant": variant, "motions": case.motions, "seconds": seconds, **score(frames, case)}
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
    text = table(rows, args.variants)
    if args.baseline in args.variants:
        text += "\n\n" + paired(rows, args.variants, args.baseline)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
