"""Reference videos for motion training: reading, frame-rate subsampling, windows, crops, resizing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FlexiMMTInputError

RESIZES = ("bilinear", "bicubic")  # frames to the training size: fleximmt's, the release's
CROP_SMALLEST = 0.6  # a random crop's side, as a share of the largest crop that fits (fleximmt's choice)


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of a video file as uint8 ``[T, H, W, 3]`` and its frame rate."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FlexiMMTInputError(f"video {str(path)!r} does not exist: give the path of an mp4/gif/webm file")
    try:
        frames = np.asarray(iio.imread(path))
        meta = iio.immeta(path)
    except Exception as err:
        raise FlexiMMTInputError(f"video {str(path)!r} could not be read ({err}); re-encode it as H.264 mp4") from None
    fps = float(meta.get("fps") or (1000.0 / meta["duration"] if meta.get("duration") else 8.0))
    return as_frames(frames, f"video {str(path)!r}"), fps


def as_frames(video, what: str = "video") -> np.ndarray:
    """Check and normalise a video array to uint8 ``[T, H, W, 3]``."""
    frames = np.asarray(video)
    if frames.ndim == 3:  # grey frames
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise FlexiMMTInputError(f"{what} must be frames [T, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise FlexiMMTInputError(f"{what} must be uint8 frames in 0..255, got {frames.dtype}")
    return frames[..., :3]


def subsample(frames: np.ndarray, fps: float, target_fps: float | None, num_frames: int) -> np.ndarray:
    """Keep about ``target_fps`` frames a second (the release uses about 8), but never so few that
    fewer than ``num_frames`` remain when the original has enough."""
    if target_fps is None or fps <= target_fps:
        return frames
    stride = max(1, round(fps / target_fps))
    while stride > 1 and len(range(0, len(frames), stride)) < num_frames:
        stride -= 1
    return frames[::stride]


def window_starts(length: int, num_frames: int, max_windows: int) -> list[int]:
    """Start frames of up to ``max_windows`` evenly spread ``num_frames``-frame windows."""
    if length < num_frames:
        raise FlexiMMTInputError(
            f"the reference video has {length} frames but training needs {num_frames}: "
            f"use a longer video or --frames {max(1, (length - 1) // 8 * 8 + 1)}"
        )
    last = length - num_frames
    count = min(max_windows, last + 1)
    return sorted({round(i * last / max(1, count - 1)) for i in range(count)})


def random_crop(height: int, width: int, aspect: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop of a ``height x width`` frame with the aspect ``aspect``
    (h / w): its side a uniform share in [CROP_SMALLEST, 1] of the largest such crop, placed uniformly."""
    full_h = min(height, round(width * aspect))
    full_w = min(width, round(height / aspect))
    share = CROP_SMALLEST + (1 - CROP_SMALLEST) * torch.rand((), generator=generator).item()
    h, w = max(1, round(full_h * share)), max(1, round(full_w * share))
    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    return top, left, h, w


def to_model_tensor(frames: np.ndarray, height: int, width: int, resize: str = "bilinear") -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[3, T, height, width]`` in [-1, 1] (resized, not cropped).

    ``"bilinear"`` resizes the float frames, antialiased. ``"bicubic"`` resizes as the release does, with
    torchvision's ``resize`` of the uint8 frames: antialiased bicubic, clamped to 0-255 and rounded to uint8
    before the scaling to [-1, 1]."""
    if resize not in RESIZES:
        raise FlexiMMTInputError(f"resize={resize!r}: choose from {list(RESIZES)}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if resize == "bicubic":
        if video.shape[-2:] != (height, width):
            video = F.interpolate(
                video.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
            )
            video = video.clamp(0, 255).round().to(torch.uint8)
        video = video.float() / 127.5 - 1.0
    else:
        video = video.float() / 127.5 - 1.0
        if video.shape[-2:] != (height, width):
            video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return video.permute(1, 0, 2, 3).contiguous()
