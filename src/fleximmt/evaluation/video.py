"""Writing videos people can look at: mp4 / gif written atomically, and object-mask overlays.

``save_video`` takes what the pipeline returns (``output.frames[0]`` with ``output_type="np"`` or
``"pil"``); ``mask_overlay`` draws ``FlexiMMTPipelineOutput.masks[-1]`` (bool ``[K, L, h, w]`` on
the latent token grid) over those frames, one colour per object.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FlexiMMTInputError
from ..method.masks import mask_to_token_grid
from ..method.motion import atomic_write

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".gif")
# one distinct colour per object (K <= 8), RGB
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [255, 225, 25],
        [145, 30, 180],
        [70, 240, 240],
        [245, 130, 48],
        [240, 50, 230],
    ],
    dtype=np.float32,
)


def check_video_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it names a video this module can write (.mp4 or .gif), else raise."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise FlexiMMTInputError(f"{str(path)!r}: write videos as {' or '.join(VIDEO_SUFFIXES)}")
    return path


def to_uint8_frames(frames: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    """PIL images, float ``[0, 1]`` or uint8 arrays ``[T, H, W, 3]`` -> uint8 ``[T, H, W, 3]``."""
    if isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "convert"):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float().numpy() if frames.is_floating_point() else frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise FlexiMMTInputError(f"video frames must be [T, H, W, 3] with T >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        if not np.issubdtype(frames.dtype, np.floating):
            raise FlexiMMTInputError(f"video frames must be uint8 or floats in [0, 1], got {frames.dtype}")
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    return frames


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row / column where height / width is odd (H.264 in yuv420p needs even sizes)."""
    height, width = frames.shape[1:3]
    if not (height % 2 or width % 2):
        return frames
    logger.info("padding %d x %d frames to %d x %d for yuv420p", height, width, height + height % 2, width + width % 2)
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def save_video(frames, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write ``frames`` (see :func:`to_uint8_frames`) to ``path``, chosen by suffix: ``.mp4`` (H.264,
    yuv420p, odd sizes padded by one pixel) or ``.gif`` (looping). The file appears only complete:
    a failed write leaves any earlier file at ``path`` untouched and no partial file behind."""
    import imageio.v3 as iio

    path = check_video_path(path)
    if fps <= 0:
        raise FlexiMMTInputError(f"fps={fps}: give a positive frame rate")
    frames = to_uint8_frames(frames)
    if path.suffix.lower() == ".gif":
        write = lambda tmp: iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
    else:
        frames = pad_to_even(frames)
        write = lambda tmp: iio.imwrite(
            tmp,
            frames,
            extension=".mp4",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,
        )
    atomic_write(path, write)
    logger.info("wrote %s (%d frames)", path, len(frames))
    return path


def latent_frame_of(frame: int, temporal_factor: int) -> int:
    """The latent frame a video frame belongs to: CogVideoX's causal VAE keeps frame 0 alone, then
    packs ``temporal_factor`` frames per latent frame (frame t > 0 -> ``(t - 1) // factor + 1``)."""
    return 0 if frame == 0 else (frame - 1) // temporal_factor + 1


def mask_frame_index(num_frames: int, mask_frames: int, temporal_factor: int) -> np.ndarray:
    """For every video frame, the index of its mask frame (int ``[T]``). Masks with one frame per
    latent frame map directly; masks on a coarser grid (a transformer that also patches time)
    map latent frames proportionally onto their ``mask_frames``."""
    latent = np.array([latent_frame_of(t, temporal_factor) for t in range(num_frames)])
    latent_frames = int(latent[-1]) + 1
    if mask_frames == latent_frames:
        return latent
    logger.debug("%d mask frames for %d latent frames: mapping proportionally", mask_frames, latent_frames)
    return np.minimum(latent * mask_frames // latent_frames, mask_frames - 1)


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """The inner boundary of a bool mask ``[H, W]``: mask pixels with a 4-neighbour outside it
    (the image's own edge does not count as outside)."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def mask_overlay(
    frames,
    masks: torch.Tensor | np.ndarray,
    temporal_factor: int = 4,
    alpha: float = 0.5,
    frame_index: np.ndarray | None = None,
) -> np.ndarray:
    """The video ``[T, H, W, 3]`` with each object's mask drawn on it: uint8 ``[T, H, W, 3]``.

    ``masks`` is bool ``[K, L, h, w]`` on the latent token grid (``FlexiMMTPipelineOutput.masks[-1]``);
    video frame t shows latent frame :func:`latent_frame_of` ``(t, temporal_factor)``, each token
    covers its ``H/h x W/w`` pixels (nearest upsampling); ``frame_index`` (the pipeline's
    ``mask_frame_index``) says exactly which mask frame each video frame shows, for models whose
    tokens span several latent frames. Object k is tinted with ``PALETTE[k]`` at
    ``alpha`` and outlined in that colour; pixels outside every mask are unchanged.
    """
    frames = to_uint8_frames(frames)
    num_frames, height, width = frames.shape[:3]
    masks = torch.as_tensor(masks).bool()
    if masks.ndim != 4:
        raise FlexiMMTInputError(f"masks must be [K, L, h, w], got shape {tuple(masks.shape)}")
    if not 0 <= alpha <= 1:
        raise FlexiMMTInputError(f"alpha={alpha}: give an opacity in [0, 1]")
    big = F.interpolate(masks.float(), size=(height, width), mode="nearest").bool().numpy()  # [K, L, H, W]
    index = mask_frame_index(num_frames, masks.shape[1], temporal_factor) if frame_index is None else frame_index
    out = frames.astype(np.float32)
    for t in range(num_frames):
        for k in range(masks.shape[0]):
            inside = big[k, index[t]]
            colour = PALETTE[k % len(PALETTE)]
            out[t][inside] = (1 - alpha) * out[t][inside] + alpha * colour
            out[t][mask_contour(inside)] = colour
    return out.round().clip(0, 255).astype(np.uint8)


def grid_preview(image: np.ndarray, masks: list[torch.Tensor], grid_h: int, grid_w: int, scale: int = 4) -> np.ndarray:
    """The objects' masks on the latent token grid, tinted over the image (what MDMA sees at frame 1):
    uint8 ``[H * scale / 2, W * scale / 2, 3]`` from an image uint8 ``[H, W, 3]`` and bool masks ``[H, W]``."""
    from PIL import Image

    height, width = image.shape[:2]
    grids = torch.stack([mask_to_token_grid(m, grid_h, grid_w) for m in masks])[:, None]  # [K, 1, h, w]
    tinted = mask_overlay(image[None], grids, temporal_factor=4)[0]
    return np.asarray(
        Image.fromarray(tinted).resize((width * scale // 2 or width, height * scale // 2 or height), Image.NEAREST)
    )
