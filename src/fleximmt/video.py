"""Writing videos people can look at: mp4 / gif, written atomically, and mask overlays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FlexiMMTInputError
from .motion import atomic_write

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180], [70, 240, 240], [245, 130, 48], [240, 50, 230]],
    dtype=np.float32,
)


def to_uint8_frames(frames) -> np.ndarray:
    """PIL images, float [0, 1] or uint8 arrays ``[T, H, W, 3]`` -> uint8 ``[T, H, W, 3]``."""
    if isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "convert"):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise FlexiMMTInputError(f"video frames must be [T, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    return frames


def save_video(frames, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write frames to ``path`` (.mp4: H.264, yuv420p; .gif), atomically."""
    import imageio.v3 as iio

    frames = to_uint8_frames(frames)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return atomic_write(path, lambda tmp: iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0))
    if suffix != ".mp4":
        raise FlexiMMTInputError(f"{str(path)!r}: write videos as .mp4 or .gif")
    height, width = frames.shape[1:3]
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))  # yuv420p needs even sizes
    frames = np.pad(frames, pad, mode="edge")
    return atomic_write(
        path,
        lambda tmp: iio.imwrite(tmp, frames, extension=".mp4", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1),  # fmt: skip
    )


def latent_frame_of(frame: int, temporal_factor: int) -> int:
    """The latent frame a video frame belongs to (CogVideoX's causal VAE: frame 0 alone)."""
    return 0 if frame == 0 else (frame - 1) // temporal_factor + 1


def mask_overlay(frames, masks: torch.Tensor, temporal_factor: int = 4, alpha: float = 0.5) -> np.ndarray:
    """Tint each object's latent-grid mask ``[K, L, h, w]`` over the video ``[T, H, W, 3]``."""
    frames = to_uint8_frames(frames)
    num_frames, height, width = frames.shape[:3]
    masks = torch.as_tensor(masks).bool()
    if masks.ndim != 4:
        raise FlexiMMTInputError(f"masks must be [K, L, h, w], got shape {tuple(masks.shape)}")
    big = F.interpolate(masks.float(), size=(height, width), mode="nearest").bool().numpy()  # [K, L, H, W]
    out = frames.astype(np.float32)
    for t in range(num_frames):
        latent = min(latent_frame_of(t, temporal_factor), masks.shape[1] - 1)
        for k in range(masks.shape[0]):
            inside = big[k, latent]
            out[t][inside] = (1 - alpha) * out[t][inside] + alpha * PALETTE[k % len(PALETTE)]
    return out.round().clip(0, 255).astype(np.uint8)
