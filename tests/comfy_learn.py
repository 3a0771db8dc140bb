"""What the tests of native learning share: a reference video whose motion is known, the library's run and
the native run of the same settings on the same weights, and the library's encoded reference in the form
ComfyUI's model takes it."""

from __future__ import annotations

import numpy as np
import torch

CAPTION, CONCEPT, MOTION = "A red ball jumps up.", "ball", "jumps up"


def jumping_square(size: int, frames: int) -> np.ndarray:
    """uint8 ``[frames, size, size, 3]``: a red square rising on black (the motion "jumps up")."""
    video = np.zeros((frames, size, size, 3), np.uint8)
    side, step = size // 4, max(1, size // 24)
    for f in range(frames):
        top = size - side - size // 8 - step * f
        video[f, top : top + side, size // 2 - side // 2 : size // 2 + side // 2] = (220, 30, 30)
    return video


class VaeShape:
    """A VAE as ``NativeTraining`` reads its shape (``latent_channels``, ComfyUI's ``downscale_ratio``), for
    runs given the library's encoded reference: the tiny diffusers VAE's compression, which no ComfyUI VAE
    loader builds (they read full-size configs)."""

    def __init__(self, channels: int, spatial: int, temporal: int = 4) -> None:
        self.latent_channels = channels
        self.downscale_ratio = (lambda frames: (frames + temporal - 1) // temporal, spatial, spatial)


def library_and_native(pipe, patchers, clip, vae, native_conditions, tmp_path, video, steps=3, native=None, **settings):
    """``train_motion`` on the diffusers ``pipe`` and ``learn_native`` on ComfyUI's ``patchers`` of the same weights,
    the same reference, seed and settings; the native run takes the library's encoded reference
    (``prepare_conditions``, what ``train_motion`` encodes) through ``native_conditions``. Returns both
    ``TrainResult``s and the library's first tokens (before any step); ``native``: ``learn_native``'s own arguments."""
    from fleximmt import train_motion
    from fleximmt.apps.comfy.learn import learn_native
    from fleximmt.models import adapter_for
    from fleximmt.training.train import TrainSettings, initial_tokens, prepare_conditions

    size, frames = settings.pop("size"), settings.pop("frames")
    settings = dict(
        steps=steps, tokens_per_motion=4, lr_warmup_steps=0, height=size, width=size, num_frames=frames, **settings
    )
    library = train_motion(
        pipe, video, CAPTION, CONCEPT, MOTION, tmp_path / "library.safetensors", return_losses=True, **settings
    )
    adapter = adapter_for(pipe)
    cfg = TrainSettings(**settings)
    geometry = (size, size, frames)
    cond = prepare_conditions(adapter, video, CAPTION, CONCEPT, MOTION, cfg, geometry, None, cfg.seed)
    native = learn_native(
        patchers,
        clip,
        vae,
        None,
        CAPTION,
        CONCEPT,
        MOTION,
        tmp_path / "native.safetensors",
        conditions=native_conditions(cond),
        **(native or {}),
        **settings,
    )
    blocks, dim = adapter.motion_shape()
    generator = torch.Generator().manual_seed(cfg.seed)
    first = [initial_tokens(blocks, 4, dim, cfg.token_init, generator) for _ in adapter.transformers()]
    return library, native, torch.stack(first)


def pipeline_moved(pipe, video: np.ndarray, motion) -> float:
    """How far ``motion`` (an object over the square's path, "jumps up") moves the diffusers ``pipe``'s latent video from
    the plain one, from the reference's first frame, two steps of the same seed (relative error)."""
    from PIL import Image

    from fleximmt import ObjectMotion

    frames, size = video.shape[:2]
    image = Image.fromarray(video[0])
    call = dict(height=size, width=size, num_frames=frames, num_inference_steps=2, output_type="latent")
    plain = pipe(image, CAPTION, generator=torch.Generator().manual_seed(0), **call).frames
    mask = np.zeros((size, size), bool)
    mask[size // 2 : size - size // 8, 3 * size // 8 : 5 * size // 8] = True
    obj = ObjectMotion(mask, motion, MOTION)
    moved = pipe(image, CAPTION, generator=torch.Generator().manual_seed(0), objects=[obj], **call).frames
    return ((moved - plain).norm() / plain.norm()).item()
