"""CogVideoX as the native patch sees ComfyUI 0.33's ``CogVideoXTransformer3DModel``
(``comfy/ldm/cogvideo/model.py``), mapped as fleximmt's CogVideoX adapter maps diffusers' (docs/method.md,
the paper's model): one joint attention per block over ``[text | video]``, motion tokens as extra keys and
values projected by the block's own ``k``/``norm_k``/``v`` (no RoPE), every MDMA part, RMPM's features
the video tokens' attention output after ``attn_out`` (before the gate).

ComfyUI's CogVideoX has no block hook: its blocks are called directly, with no ``patches_replace`` and
no per-block ``transformer_options``. The least invasive mechanism that works is the one attention
hook it has: every block makes exactly one ``optimized_attention`` call, in block order, and nothing
else in the model makes one, so the patch counts the calls of each forward (``patch.Calls``) - no
module of ComfyUI's is wrapped or hooked, nothing outlives the call. Forward hooks on the blocks would
also work, but they change the shared model every clone of the MODEL holds; replacing the blocks'
``forward`` would copy ComfyUI's block.
"""

from __future__ import annotations

from ....errors import FlexiMMTInputError
from .family import JointFamily
from .patch import Run


class CogVideoX(JointFamily):
    name = "CogVideoX"
    family = "cogvideox"
    module, model_class = "comfy.ldm.cogvideo.model", "CogVideoXTransformer3DModel"
    block_hook = False
    clip_name = "T5"
    tokens_key = "t5xxl"
    noise_frames_second = True

    def image_conditioning(self, vae, image, length: int) -> dict:
        """As the native example's ``InstructPixToPixConditioning``: the image encoded, its latent frame first
        (ComfyUI's CogVideoX pads the other frames with zeros)."""
        return {"concat_latent_image": vae.encode(image[..., :3])}

    def check(self, model) -> None:
        if model.in_channels != 2 * model.out_channels:
            raise FlexiMMTInputError(
                f"this CogVideoX model takes {model.in_channels} input channels, not the {2 * model.out_channels} "
                "of an image-to-video model (text-to-video or inpainting weights?): load an I2V checkpoint such as "
                "CogVideoX-5b-I2V or CogVideoX1.5-5B-I2V"
            )

    def motion_shape(self, model) -> tuple[int, int]:
        return len(model.blocks), model.dim

    def patch_size(self, model) -> tuple[int, int, int]:
        return model.patch_size_t or 1, model.patch_size, model.patch_size

    def call_kinds(self, model, index: int) -> tuple[str, ...]:
        return ("joint",)

    def attend(self, run: Run, index: int, kind: str, base, q, k, v, *args, heads: int, **kwargs):
        if args or kwargs.pop("mask", None) is not None:
            raise FlexiMMTInputError(
                "FlexiMMT Apply: the CogVideoX attention got a mask of its own; FlexiMMT's MDMA is the mask - "
                "remove the other patch that adds one"
            )
        block = run.model.blocks[index]
        batch, length, _ = q.shape
        to_heads = lambda x: x.view(batch, x.shape[1], heads, -1).transpose(1, 2)
        motion = run.state.joint_motion_rows(index, run.expert, batch, like=v)  # [B, K * d_m, dim], the raw tokens
        motion_k = block.norm_k(block.k(motion).view(batch, motion.shape[1], heads, -1)).transpose(1, 2)
        motion_v = to_heads(block.v(motion))
        out = self.joint_attention(
            run, index, base, to_heads(q), to_heads(k), to_heads(v), motion_k, motion_v, dict(kwargs, heads=heads)
        )
        return out.transpose(1, 2).reshape(batch, length, -1).to(v.dtype)

    def video_features(self, run: Run, index: int, video_out):
        return run.model.blocks[index].attn_out(video_out.transpose(1, 2).flatten(2))
