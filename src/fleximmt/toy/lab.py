"""Measuring FlexiMMT in the toy world: reference motions, learning them, transferring them onto
scenes with each variant of the method, and scoring the result against the generator's truth.

Used by ``make demo`` (two motions onto a two-object image), ``benchmarks/toy_quality.py`` (does
the base model follow its captions?) and ``benchmarks/toy_ablation.py`` (the paper's tables).

A reference motion is a single sprite moving along a ``Trajectory`` whose exact parameters (speed,
bounce height, period) the caption's words cannot say; the motion tokens learned from it should
carry them. Transferred onto a scene, object k starting at ``p_k`` should follow
``p_k + offset_ref(t)``; the generated sprite is found by its colour (``colour_track``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..evaluation.video import save_video, to_uint8_frames
from ..method.motion import MotionTokens, ObjectMotion
from .world import MOTIONS, Scene, Sprite, Trajectory, colour_track, render

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
TOY_MODEL = ASSETS / "toy-model"
REFERENCE_DIR = ASSETS / "references"
EXAMPLE_DIR = ASSETS / "examples"
FRAMES, SIZE = 17, 64

# name -> the reference trajectory; the parameters are ones a caption cannot express
REFERENCES = {
    "left": Trajectory("left", speed=1.1),
    "right": Trajectory("right", speed=1.9),
    "up": Trajectory("up", speed=1.3),
    "down": Trajectory("down", speed=1.7),
    "bounce": Trajectory("bounce", amplitude=10.0, period=6.0),
    "zigzag": Trajectory("zigzag", speed=1.2, amplitude=7.0, period=6.0),
    "circle": Trajectory("circle", amplitude=8.0, period=16.0),
    "still": Trajectory("still"),
}
REFERENCE_SPRITE = ("circle", "white", 6.5)  # shape, colour, size of the sprite in every reference video

# variant name -> pipeline keyword arguments (None = plain image-to-video: no objects)
VARIANTS: dict[str, dict | None] = {
    "fleximmt": {},
    "w/o M2X": {"parts": ("t2v", "t2t", "t2m")},
    "w/o T2X": {"parts": ("m2v", "m2m")},
    "no_masks": {"parts": ()},  # motion tokens concatenated, nothing masked (FlexiAct-style)
    "plain_i2v": None,
    "w/o RMPM (static)": {"mask_source": "static"},
    "QK masks": {"mask_source": "qk"},
    "rmpm released": {"rmpm_method": "released"},
    "anchors 1": {"anchors": 1},
    "anchors 5": {"anchors": 5},
    "alpha 5%": {"alpha": 0.05},
    "alpha 10%": {"alpha": 0.10},
    "step 0 without masks (release)": {"initial_masks": "none"},
    "masks dilated by one token": {"dilate": 8},  # a toy-world probe, not a pipeline setting: see transfer
    "oracle: static masks of the whole true path": {"mask_source": "static", "oracle_path": True},  # a probe too
}


def load_toy_pipeline(path: str | Path = TOY_MODEL):
    """The toy base model that ships with the package (float16 on disk, float32 in memory)."""
    from ..errors import FlexiMMTInputError
    from ..models.cogvideox import FlexiMMTPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise FlexiMMTInputError(
            f"no toy model at {path}: train it with `python -m fleximmt.toy.train` (docs/toy-world.md)"
        )
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones only know it
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = FlexiMMTPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=32)
def reference_scene(name: str, seed: int = 0) -> Scene:
    """The reference video of motion ``name``: one white circle on a plain background (drawn once
    and shared: treat it as read-only)."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference motion {name!r}: choose from {list(REFERENCES)}")
    shape, colour, size = REFERENCE_SPRITE
    start = {
        "left": (44.0, 32.0),
        "right": (18.0, 32.0),
        "up": (32.0, 46.0),
        "down": (32.0, 18.0),
        "zigzag": (20.0, 32.0),
        "bounce": (32.0, 44.0),
    }.get(name, (32.0, 32.0))
    return render([Sprite(shape, colour, size, start, REFERENCES[name], texture_seed=7)], FRAMES, SIZE, "plain", seed)


def reference_caption(name: str) -> tuple[str, str, str]:
    """(caption, concept words, motion words) of a reference video."""
    shape, colour, _ = REFERENCE_SPRITE
    words = MOTIONS[REFERENCES[name].name]
    return f"A {colour} {shape} {words}.", f"{colour} {shape}", words


def write_examples(folder: str | Path = EXAMPLE_DIR, count: int = 3) -> list[Path]:
    """Bundled example images (first frames of toy scenes) with their object masks as PNGs."""
    from PIL import Image

    folder = Path(folder)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        first = random_case(100 + seed, num_objects=2).scene(trajectories=False)
        paths.append(folder / f"scene_{seed}.png")
        Image.fromarray(first.frames[0]).save(paths[-1])
        for k, mask in enumerate(first.masks[:, 0]):
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"scene_{seed}_object_{k}.png")
    return paths


def write_references(folder: str | Path = REFERENCE_DIR) -> list[Path]:
    """The bundled reference videos (mp4) and ``references.json`` with their captions and parameters."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index, paths = {}, []
    for name in REFERENCES:
        paths.append(save_video(reference_scene(name).frames, folder / f"{name}.mp4"))
        caption, concept, words = reference_caption(name)
        index[name] = {
            "video": f"{name}.mp4",
            "caption": caption,
            "concept_words": concept,
            "motion_words": words,
            "trajectory": dataclasses.asdict(REFERENCES[name]),
        }
    (folder / "references.json").write_text(json.dumps(index, indent=2))
    return paths


def learn_motions(
    pipe, names, folder: str | Path, steps: int = 300, tokens: int = 16, seed: int = 0, **settings
) -> dict[str, MotionTokens]:
    """Learn (or reuse, when ``folder/NAME.safetensors`` exists and was learned on this very model)
    the motion tokens of each reference."""
    from ..training.train import model_fingerprint, train_motion

    model = model_fingerprint(pipe)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    motions = {}
    for name in names:
        path = folder / f"{name}.safetensors"
        if not path.with_suffix(".gif").is_file():  # the app's library shows it as the motion's preview
            save_video(reference_scene(name).frames, path.with_suffix(".gif"))
        learned_on = MotionTokens.load(path).metadata.get("base_model") if path.is_file() else model
        if learned_on != model:
            logger.info("%s was learned on another model (%s, not %s): learning it again", path, learned_on, model)
            path.unlink()
        if not path.is_file():
            caption, concept, words = reference_caption(name)
            bundled = REFERENCE_DIR / f"{name}.mp4"
            video = str(bundled) if bundled.is_file() else reference_scene(name).frames
            train_motion(
                pipe, video, caption, concept, words, path, steps=steps, tokens_per_motion=tokens, seed=seed, **settings
            )
        motions[name] = MotionTokens.load(path)
    return motions


@dataclass
class Case:
    """A scene to animate: sprites (their first frame is the image) and the reference motion of each
    (``None``: the sprite is drawn, described as standing still, and given no motion tokens)."""

    sprites: list[Sprite]
    motions: list[str | None]
    background: str = "plain"
    seed: int = 0

    def scene(self, trajectories: bool = True) -> Scene:
        """The first frame (``trajectories=False``: every sprite still) or the ideal transfer."""
        sprites = [
            dataclasses.replace(s, trajectory=REFERENCES[m] if trajectories and m else Trajectory("still"))
            for s, m in zip(self.sprites, self.motions)
        ]
        return render(sprites, FRAMES, SIZE, self.background, self.seed)

    @property
    def prompt(self) -> str:
        return " ".join(
            f"A {s.colour} {s.shape} {MOTIONS[REFERENCES[m or 'still'].name]}."
            for s, m in zip(self.sprites, self.motions)
        )


def random_case(seed: int, num_objects: int | None = None, names: tuple[str, ...] = tuple(REFERENCES)) -> Case:
    """2-3 sprites of distinct colours, each given a different reference motion, placed so that
    every sprite's whole prescribed path stays inside the frame and apart from the others' paths."""
    from .world import COLOURS, SHAPES

    rng = np.random.RandomState(seed)
    count = num_objects or int(rng.randint(2, 4))
    colours = rng.choice([c for c in COLOURS if c != REFERENCE_SPRITE[1]], count, replace=False)
    motions = [str(m) for m in rng.choice(list(names), count, replace=False)]
    sizes = rng.uniform(5, 6.5, size=count)
    for _ in range(10_000):
        starts, paths = [], []
        for name, size in zip(motions, sizes):
            offset = expected_path((0.0, 0.0), name)
            lo, hi = size + 1 - offset.min(0), SIZE - size - 1 - offset.max(0)
            if (hi < lo).any():
                raise ValueError(f"reference motion {name!r} does not fit in a {SIZE}-pixel frame")
            starts.append(rng.uniform(lo, hi))
            paths.append(starts[-1] + offset)
        apart = all(
            np.hypot(*(paths[i] - paths[j]).T).min() > 2.2 * max(sizes[i], sizes[j]) + 2
            for i in range(count)
            for j in range(i)
        )
        if apart:
            break
    else:
        raise ValueError(f"no room for {count} sprites with motions {motions}: ask for fewer objects")
    sprites = [
        Sprite(
            str(rng.choice(SHAPES)),
            str(c),
            float(size),
            (float(x), float(y)),
            Trajectory("still"),
            texture_seed=int(rng.randint(1 << 30)),
        )
        for c, size, (x, y) in zip(colours, sizes, starts)
    ]
    return Case(sprites, motions, "plain", seed)


def transfer(
    pipe,
    case: Case,
    motions: dict[str, MotionTokens],
    variant: str = "fleximmt",
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
) -> tuple[np.ndarray, list | None, float]:
    """Animate ``case``'s first frame with one variant; returns frames uint8 ``[T, H, W, 3]``,
    the per-step object masks (or None) and the seconds it took."""
    from PIL import Image

    first = case.scene(trajectories=False)
    image = Image.fromarray(first.frames[0])
    settings = dict(VARIANTS[variant]) if VARIANTS[variant] is not None else None
    objects = []
    if settings is not None:
        # "dilate": grow each first-frame mask by that many pixels before the pipeline puts it on the
        # token grid (8 px = one token of the toy model): does a sprite leaving its mask cost motion?
        # "oracle_path": each mask is everything the sprite covers on its ideal path (the answer the
        # generator knows), so no token the sprite should move into is ever cut off from its motion
        radius, oracle = settings.pop("dilate", 0), settings.pop("oracle_path", False)
        path_masks = case.scene(trajectories=True).masks.any(1) if oracle else first.masks[:, 0]
        for k, name in enumerate(case.motions):
            if name is None:
                continue
            mask = dilate(torch.from_numpy(path_masks[k]), radius)
            objects.append(ObjectMotion(mask, motions[name], MOTIONS[REFERENCES[name].name]))
    start = time.perf_counter()
    result = pipe(
        image=image,
        prompt=case.prompt,
        objects=objects,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        return_masks=bool(objects),
        **(settings or {}),
    )
    seconds = time.perf_counter() - start
    return to_uint8_frames(result.frames[0]), result.masks[0] if objects else None, seconds


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A bool mask ``[H, W]`` grown by ``radius`` pixels (a square neighbourhood)."""
    if radius <= 0:
        return mask
    grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0] > 0


def mask_quality(case: Case, masks: torch.Tensor) -> dict:
    """How well the object masks a run used (bool ``[K, L, h, w]`` on the latent token grid, e.g. the
    last step of ``transfer``'s masks) cover where each sprite should be: per latent frame l, the
    sprite's true mask at video frame 4l of the ideal transfer, put on the same grid. Returns the
    mean ``iou`` and ``recall`` (share of the true tokens inside the mask) over objects and latent
    frames after the first, and ``per_frame_recall``."""
    from ..method.masks import mask_to_token_grid

    truth = torch.from_numpy(case.scene(trajectories=True).masks)  # [K, T, H, W]
    objects = [k for k, m in enumerate(case.motions) if m is not None]
    if masks.shape[0] != len(objects):
        raise ValueError(f"{masks.shape[0]} masks for {len(objects)} objects with a motion: give one per object")
    _, frames, height, width = masks.shape
    iou, recall = np.zeros((len(objects), frames)), np.zeros((len(objects), frames))
    for i, k in enumerate(objects):
        for f in range(frames):
            true = mask_to_token_grid(truth[k, min(4 * f, truth.shape[1] - 1)], height, width)
            got = masks[i, f].bool()
            iou[i, f] = (true & got).sum() / max(1, (true | got).sum())
            recall[i, f] = (true & got).sum() / max(1, true.sum())
    return {
        "iou": float(iou[:, 1:].mean()),
        "recall": float(recall[:, 1:].mean()),
        "per_frame_recall": recall.mean(0).round(3).tolist(),
    }


def expected_path(start: tuple[float, float], name: str) -> np.ndarray:
    """Centres ``[T, 2]`` of a sprite starting at ``start`` that follows reference motion ``name``."""
    dx, dy, _ = REFERENCES[name].offset(np.arange(FRAMES, dtype=float))
    return np.asarray(start, float) + np.stack([dx, dy], -1)


def path_error(centres: np.ndarray, expected: np.ndarray) -> float:
    """Mean distance (pixels) between tracked and expected centres over the frames where the sprite
    was found; a sprite lost on most frames scores the frame's half-diagonal for those frames."""
    found = ~np.isnan(centres).any(-1)
    dist = np.where(found, np.hypot(*(np.nan_to_num(centres) - expected).T), SIZE * 0.7)
    return float(dist.mean())


def score(frames: np.ndarray, case: Case) -> dict:
    """Per object: ``traj_err`` (pixels from the path its reference motion prescribes), ``tf`` and
    ``ff`` against its reference video, and ``leak`` (1 when its path is closer to another object's
    reference motion than to its own); averages over objects at the top level."""
    from ..evaluation.metrics import flow_fidelity, trajectory_fidelity

    objects = []
    names = [m or "still" for m in case.motions]  # an object given no motion should stay still
    first_masks = case.scene(trajectories=False).masks[:, 0]
    for k, (sprite, name) in enumerate(zip(case.sprites, names)):
        centres, masks = colour_track(frames, sprite.colour, start=sprite.start)
        ref = reference_scene(name)
        own = path_error(centres, expected_path(sprite.start, name))
        others = [path_error(centres, expected_path(sprite.start, m)) for m in names if m != name]
        first = first_masks[k]
        objects.append(
            {
                "motion": name,
                "traj_err": own,
                "tf": trajectory_fidelity(frames, ref.frames, first, ref.masks[0, 0]),
                "ff": flow_fidelity(frames, ref.frames, masks, ref.masks[0]),
                "leak": float(any(o < own for o in others)) if others else 0.0,
            }
        )
    summary = {key: float(np.mean([o[key] for o in objects])) for key in ("traj_err", "tf", "ff", "leak")}
    return {**summary, "objects": objects}
