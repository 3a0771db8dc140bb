"""A miniature world in which every claim of FlexiMMT can be measured on a CPU.

Short videos of 1-3 textured sprites (shapes and colours) over simple backgrounds, each moving
along a trajectory from a rich family, with a caption that names every sprite and describes its
motion in words, and the ground truth: per-frame masks and positions. Everything is
deterministic from a seed. ``Trajectory`` parameters that words cannot express (the exact curve,
speed profile or bounce height) are what reference videos carry and motion tokens must learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
    "white": (235, 235, 235),
    "orange": (245, 140, 30),
    "purple": (150, 50, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS = ("plain", "gradient", "stripes")
# motion name -> the words a caption uses for it
MOTIONS = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "circle": "circles around",
    "bounce": "bounces",
    "zigzag": "zigzags right",
    "grow": "grows",
    "shrink": "shrinks",
    "still": "stands still",
}
WORDS = sorted(
    {w for phrase in MOTIONS.values() for w in phrase.split()}
    | set(COLOURS)
    | set(SHAPES)
    | {"A", "a", "the", "and", "."}
)


@dataclass(frozen=True)
class Trajectory:
    """A motion: its name and the parameters words do not express (speed, amplitude, phase...)."""

    name: str
    speed: float = 1.5  # pixels per frame (for linear motions; other motions scale with it)
    amplitude: float = 6.0  # pixels (circle radius, bounce height, zigzag amplitude)
    period: float = 8.0  # frames (circle, bounce, zigzag)
    rate: float = 0.03  # relative size change per frame (grow / shrink)

    def offset(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dx, dy, scale) at frames ``t`` relative to frame 0."""
        zero, one = np.zeros_like(t, dtype=float), np.ones_like(t, dtype=float)
        phase = 2 * math.pi * t / self.period
        if self.name in ("left", "right", "up", "down"):
            sign = -1.0 if self.name in ("left", "up") else 1.0
            move = sign * self.speed * t
            return (move, zero, one) if self.name in ("left", "right") else (zero, move, one)
        if self.name == "circle":
            return self.amplitude * np.sin(phase), self.amplitude * (1 - np.cos(phase)) * -1, one
        if self.name == "bounce":
            return zero, -self.amplitude * np.abs(np.sin(phase / 2)), one
        if self.name == "zigzag":
            tri = 2 / math.pi * np.arcsin(np.sin(phase))
            return self.speed * t, self.amplitude * tri, one
        if self.name == "grow":
            return zero, zero, 1 + self.rate * t
        if self.name == "shrink":
            return zero, zero, np.maximum(0.3, 1 - self.rate * t)
        if self.name == "still":
            return zero, zero, one
        raise ValueError(f"unknown motion {self.name!r}: choose from {list(MOTIONS)}")

    @property
    def words(self) -> str:
        return MOTIONS[self.name]


@dataclass
class Sprite:
    shape: str
    colour: str
    size: float  # radius-like half extent in pixels
    start: tuple[float, float]  # centre (x, y) at frame 0
    trajectory: Trajectory
    texture_seed: int = 0

    @property
    def concept_words(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def phrase(self) -> str:
        return f"A {self.colour} {self.shape} {self.trajectory.words}."


@dataclass
class Scene:
    """Frames uint8 ``[T, H, W, 3]``, per-sprite masks bool ``[K, T, H, W]`` and centres
    ``[K, T, 2]`` (x, y), scales ``[K, T]``, and the caption."""

    frames: np.ndarray
    masks: np.ndarray
    positions: np.ndarray
    scales: np.ndarray
    sprites: list[Sprite]
    caption: str
    seed: int
    background: str = "plain"
    extra: dict = field(default_factory=dict)


def sprite_mask(shape: str, cx: float, cy: float, half: float, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half * 1.3
    if shape == "triangle":  # apex up
        return (dy <= half) & (dy >= -half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}: choose from {list(SHAPES)}")


def _background(kind: str, rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    base = rng.randint(40, 120, size=3).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "plain":
        img = np.broadcast_to(base, (height, width, 3)).copy()
    elif kind == "gradient":
        img = base + (x / width)[..., None] * rng.randint(-40, 40, size=3)
    else:
        img = base + 18 * (np.sin(2 * math.pi * (x + y) / rng.randint(8, 16)) > 0)[..., None]
    img += rng.normal(0, 4, size=img.shape)  # faint texture so flow and tracking have something to hold
    return img.clip(0, 255)


def _texture(colour: str, seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    pattern = rng.normal(0, 22, size=(height, width, 1))
    return (np.array(COLOURS[colour], np.float32) + pattern).clip(0, 255)


def render(sprites: list[Sprite], frames: int = 17, size: int = 64, background: str = "plain", seed: int = 0) -> Scene:
    """Draw ``sprites`` moving along their trajectories; later sprites are drawn on top, and each
    mask is what is visible of its sprite."""
    rng = np.random.RandomState(seed)
    bg = _background(background, rng, size, size)
    t = np.arange(frames, dtype=float)
    video = np.repeat(bg[None], frames, 0)
    masks = np.zeros((len(sprites), frames, size, size), bool)
    positions = np.zeros((len(sprites), frames, 2))
    scales = np.zeros((len(sprites), frames))
    for k, sprite in enumerate(sprites):
        dx, dy, scale = sprite.trajectory.offset(t)
        texture = _texture(sprite.colour, sprite.texture_seed, size, size)
        for f in range(frames):
            cx, cy = sprite.start[0] + dx[f], sprite.start[1] + dy[f]
            mask = sprite_mask(sprite.shape, cx, cy, sprite.size * scale[f], size, size)
            video[f][mask] = texture[mask]
            masks[:k, f] &= ~mask  # occlusion: what is under a later sprite is not visible
            masks[k, f] = mask
            positions[k, f] = (cx, cy)
            scales[k, f] = scale[f]
    caption = " ".join(s.phrase for s in sprites)
    return Scene(video.round().astype(np.uint8), masks, positions, scales, sprites, caption, seed, background)


def random_scene(
    seed: int,
    num_objects: int | None = None,
    frames: int = 17,
    size: int = 64,
    motions: list[str] | None = None,
    jitter: bool = True,
) -> Scene:
    """A random scene: 1-3 sprites of distinct colour-shape names, starting away from the edges
    (so that the start position does not give the motion away), each with a random motion."""
    rng = np.random.RandomState(seed)
    count = num_objects or rng.randint(1, 4)
    names = set()
    sprites = []
    slots = rng.permutation([(x, y) for x in (0.3, 0.5, 0.7) for y in (0.35, 0.65)])
    for k in range(count):
        while True:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if (colour, shape) not in names:
                names.add((colour, shape))
                break
        motion = motions[k] if motions else rng.choice(list(MOTIONS))
        trajectory = Trajectory(
            motion,
            speed=float(rng.uniform(1.0, 2.0)) if jitter else 1.5,
            amplitude=float(rng.uniform(4.0, 8.0)) if jitter else 6.0,
            period=float(rng.uniform(6.0, 12.0)) if jitter else 8.0,
            rate=float(rng.uniform(0.02, 0.04)) if jitter else 0.03,
        )
        x, y = slots[k] * size + rng.uniform(-3, 3, size=2)
        sprites.append(
            Sprite(
                shape,
                colour,
                float(rng.uniform(5, 8)),
                (float(x), float(y)),
                trajectory,
                texture_seed=int(rng.randint(1 << 30)),
            )
        )
    return render(sprites, frames, size, rng.choice(BACKGROUNDS), seed)


def colour_track(
    frames: np.ndarray,
    colour: str,
    start: tuple[float, float] | None = None,
    tolerance: float = 80.0,
    reach: float = 14.0,
    min_pixels: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Follow a sprite through ``frames`` (uint8 ``[T, H, W, 3]``) by its colour: per frame, the
    pixels within ``tolerance`` (RGB distance) of ``COLOURS[colour]`` and within ``reach`` pixels of
    the previous position. Returns centres ``[T, 2]`` (x, y; NaN where the sprite is not found,
    the last position is then kept as the search centre) and masks bool ``[T, H, W]``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames of shape {frames.shape}: give uint8 [T, H, W, 3]")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}: choose from {list(COLOURS)}")
    near = np.linalg.norm(frames.astype(np.float32) - np.array(COLOURS[colour], np.float32), axis=-1) < tolerance
    height, width = frames.shape[1:3]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    centres = np.full((len(frames), 2), np.nan)
    masks = np.zeros(near.shape, bool)
    last = start
    for f, hits in enumerate(near):
        if last is not None:
            hits = hits & ((x - last[0]) ** 2 + (y - last[1]) ** 2 <= reach**2)
        if hits.sum() >= min_pixels:
            centres[f] = x[hits].mean(), y[hits].mean()
            masks[f] = hits
            last = tuple(centres[f])
    return centres, masks
