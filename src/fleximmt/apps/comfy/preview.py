"""Latent previews while *FlexiMMT Transfer* denoises, as ComfyUI's samplers send them.

ComfyUI previews a sampler's latents through its latent format's linear latent-to-RGB factors
(``latent_preview.Latent2RGBPreviewer``), when the user has previews on (``--preview-method``, or
the frontend's setting on 0.33). A FlexiMMT pipeline's latents have no ComfyUI latent format (the
toy model's VAE has 8 channels of its own), so each run fits its factors on its own first frame: the
image is encoded by the pipeline's VAE, its latents brought into the denoising space the way
diffusers' pipelines bring them (``latents_mean`` / ``latents_std`` where the VAE config has them,
as Wan's; else ``scaling_factor``, as CogVideoX's and HunyuanVideo 1.5's), and its colours regressed
on the channels by least squares. The first frame, not a chart of colours: an image-to-video's
colours are its first frame's, and a small VAE trained on its own world (the toy's) encodes other
colours badly (measured on the toy example's last step: 6-9 levels of mean error against the
decoded frames with the first frame's fit, 29-31 with a chart of random colours, 25-27 for a flat
grey). The native path needs none of this: its samplers are ComfyUI's own.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def denoising_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``[B, C, ...]`` in the space a diffusers pipeline denoises them in."""
    cfg = vae.config
    shape = (1, -1) + (1,) * (latents.ndim - 2)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        return (latents - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
    mean, std = getattr(vae, "latents_mean", None), getattr(vae, "latents_std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):  # LTX-2's, buffers beside a scaling factor
        mean, std = mean.float().cpu().view(shape), std.float().cpu().view(shape)
        return (latents - mean) * (getattr(cfg, "scaling_factor", None) or 1.0) / std
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (latents - shift) * (getattr(cfg, "scaling_factor", None) or 1.0)


@torch.no_grad()
def rgb_factors(vae, picture: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear factors ``[C, 3]`` and bias ``[3]`` from a pipeline's denoising latents to RGB in -1..1,
    fitted on ``picture`` as ``vae`` encodes it (least squares over its latent pixels)."""
    pixels = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    param = next(vae.parameters())
    encoded = vae.encode(pixels[None, :, None].to(param.device, param.dtype)).latent_dist.mode()
    latents = denoising_latents(vae, encoded.float().cpu())[0, :, 0]  # [C, h, w]
    height, width = latents.shape[-2:]
    target = torch.nn.functional.adaptive_avg_pool2d(pixels[None], (height, width))[0]  # [3, h, w]
    design = torch.cat([latents.flatten(1), torch.ones(1, height * width)]).T  # [h * w, C + 1]
    solution = torch.linalg.lstsq(design, target.flatten(1).T).solution  # [C + 1, 3]
    return solution[:-1], solution[-1]


def channel_axis(latents: torch.Tensor, channels: int) -> int:
    """Where a pipeline's latents ``[B, C, F, h, w]`` (Wan, HunyuanVideo 1.5, LTX-2) or ``[B, F, C, h, w]``
    (CogVideoX) keep their channels."""
    return 2 if latents.shape[1] != channels and latents.shape[2] == channels else 1


class TransferPreview:
    """Preview images of a pipeline's latents: the middle frame of the first video, through ComfyUI's
    own previewer (JPEG, at most ComfyUI's ``--preview-size``)."""

    def __init__(self, pipe, first_frame: Image.Image) -> None:
        import latent_preview

        factors, bias = rgb_factors(pipe.vae, first_frame)
        self.channels = factors.shape[0]
        self.adapter, (self.width, self.height) = pipe.adapter, first_frame.size
        self.previewer = latent_preview.Latent2RGBPreviewer(factors.tolist(), bias.tolist())

    @classmethod
    def wanted(cls, pipe, first_frame: Image.Image) -> TransferPreview | None:
        """A previewer for a run from ``first_frame`` (at the video's size) when the user has ComfyUI's
        previews on, else None (as ComfyUI's samplers decide)."""
        from comfy.cli_args import LatentPreviewMethod, args

        if args.preview_method == LatentPreviewMethod.NoPreviews:
            return None
        return cls(pipe, first_frame)

    def image(self, latents: torch.Tensor):
        """ComfyUI's preview tuple ``("JPEG", PIL image, size)`` of ``latents`` (a pipeline's, batch first)."""
        latents = self.adapter.video_latents(latents, self.height, self.width)  # LTX-2's tokens as a video
        video = latents[0].movedim(channel_axis(latents, self.channels) - 1, 0)  # [C, F, h, w]
        frame = video[:, video.shape[1] // 2].float().cpu()
        return self.previewer.decode_latent_to_preview_image("JPEG", frame[None])
