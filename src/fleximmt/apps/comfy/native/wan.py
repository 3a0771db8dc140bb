"""Wan 2.1 / 2.2 as the native patch sees ComfyUI's ``WanModel`` (``comfy/ldm/wan/model.py``), mapped as
fleximmt's Wan adapter maps diffusers' (docs/method.md#wan).

Each block makes its attention calls in one order: the self-attention (run as ComfyUI runs it; it lends
RMPM its output after ``o``, before the gate, in the conditional rows of the first 70% of the blocks),
the image tokens' call (Wan 2.1; run as ComfyUI runs it), then the text call, which becomes MDMA over
``[text | motion tokens]``: the motion tokens projected by that block's own ``k``/``norm_k``/``v``
modules (so LoRA, fp8 and GGUF weights apply to them as to the text), its unmasked groups computed by
ComfyUI's own attention function. Each MODEL is one expert: for Wan 2.2 A14B the high-noise model is
patched with expert 1, the low-noise model with expert 2.
"""

from __future__ import annotations

import torch

from ....errors import FlexiMMTInputError
from .family import CrossFamily
from .patch import Call, Run


class Wan(CrossFamily):
    name = "Wan 2.1 / 2.2"
    family = "wan"
    module, model_class = "comfy.ldm.wan.model", "WanModel"
    clip_name = "umT5"
    tokens_key = "umt5xxl"
    image_channels = slice(4, None)  # [frame mask (4) | image latents], as diffusers' Wan I2V concatenates them

    def check_learning(self, model) -> None:
        if model.in_dim == model.out_dim:
            raise FlexiMMTInputError(
                f"this Wan model takes {model.in_dim} input channels, the noise alone (text-to-video, or Wan 2.2 "
                "TI2V-5B, whose image replaces the first latent frame): Learn motion trains Wan 2.1 I2V and Wan 2.2 "
                "I2V A14B; learn TI2V-5B motions with FlexiMMT Load Model and Learn Motion"
            )

    def image_conditioning(self, vae, image, length: int) -> dict:
        """As ``WanImageToVideo``: the image followed by grey frames, encoded; the first latent frame given."""
        video = torch.full((length, *image.shape[1:]), 0.5, dtype=image.dtype)
        video[:1] = image
        latent = vae.encode(video[..., :3])
        mask = torch.ones(1, 1, latent.shape[2], *latent.shape[-2:])
        mask[:, :, :1] = 0.0
        return {"concat_latent_image": latent, "concat_mask": mask}

    def motion_shape(self, model) -> tuple[int, int]:
        return len(model.blocks), model.dim

    def patch_size(self, model) -> tuple[int, int, int]:
        return tuple(model.patch_size)

    def read_call(self, model, arguments: dict) -> Call:
        extra = arguments.get("kwargs") or {}
        if arguments.get("time_dim_concat") is not None or extra.get("reference_latent") is not None:
            raise FlexiMMTInputError(
                "FlexiMMT Apply: this graph adds frames or reference tokens to the Wan model's "
                "input (time_dim_concat / reference_latent), which FlexiMMT's masks do not cover; "
                "remove that conditioning or the FlexiMMT patch"
            )
        return super().read_call(model, arguments)

    def call_kinds(self, model, index: int) -> tuple[str, ...]:
        cross = model.blocks[index].cross_attn
        return ("self", "image", "text") if hasattr(cross, "k_img") else ("self", "text")

    def attend(self, run: Run, index: int, kind: str, base, *args, **kwargs):
        if kind == "self":
            out = base(*args, **kwargs)
            # RMPM's features: attn1's output after `o`, before the gate
            run.observe(index, lambda rows: run.model.blocks[index].self_attn.o(out.index_select(0, rows)))
            return out
        if kind != "text":
            return base(*args, **kwargs)
        return self.text_attention(run, index, base, *args, **kwargs)

    def text_path(self, run: Run, index: int):
        attn = run.model.blocks[index].cross_attn
        return (lambda tokens: attn.norm_k(attn.k(tokens))), attn.v
