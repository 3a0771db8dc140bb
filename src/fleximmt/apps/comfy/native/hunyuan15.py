"""HunyuanVideo 1.5 as the native patch sees ComfyUI 0.33's ``HunyuanVideo`` (``comfy/ldm/hunyuan_video/model.py``
with ``cond_type_embedding`` and ``vision_in``), mapped as fleximmt's adapter maps diffusers'
(docs/method.md#hunyuanvideo-15): dual-stream blocks whose video and text streams meet in one joint
attention over ``[text | video]``; motion tokens join after the text, projected by the **text stream's**
``txt_attn.qkv`` and key norm (no RoPE: ComfyUI's text positions are 0, whose rotation is the identity);
every MDMA part; RMPM's features the video stream's attention output after ``img_attn.proj`` (before
the gate). Each block is named by a ``double_block`` replacement.

ComfyUI's text is ``[SigLIP image tokens | ByT5 glyph tokens | Qwen2.5 tokens]``, each part present only
when its conditioning is: the motion words lie in the Qwen2.5 part, after the other two
(``attention.TextKeys``' offset); padding (an ``attention_mask`` ComfyUI keeps only when it masks
something) is closed to every query, as in diffusers. ComfyUI's Qwen2.5 text is the prompt inside
HunyuanVideo 1.5's chat template, cropped where the user's message starts (``QwenImageTEModel``), so
the motion words are found by their characters in that text (a byte-level BPE tokenises " jumps"
mid-sentence other than "jumps" alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ....errors import FlexiMMTInputError
from ....method.prompt import find_word_spans
from ....method.tokens import TextKeys
from .family import JointFamily, clip_tokens, inner_tokenizer
from .patch import Call, Run

QWEN = "qwen25_7b"  # the Qwen2.5 tokenizer's key in ComfyUI's HunyuanVideo 1.5 tokens
IM_START, USER, NEWLINE = 151644, 872, 198  # Qwen2.5's ids of "<|im_start|>", "user", "\n"


def qwen_crop(ids: Sequence[int]) -> int:
    """How many of the Qwen2.5 tokens ComfyUI's HunyuanVideo 1.5 text encoder drops from the front
    (``HunyuanImageTEModel.encode_token_weights`` and ``QwenImageTEModel.encode_token_weights``, 0.33):
    up to the second ``<|im_start|>``, and its "user\\n" after it; a prompt that starts the template
    with "<" (id 27) and holds more than 36 tokens is cropped at 36 (the refiner's template)."""
    if ids and ids[0] == 27 and len(ids) > 36:
        return 36
    end, seen = -1, 0
    for i, token in enumerate(ids):
        if token == IM_START and seen < 2:
            end, seen = i, seen + 1
    if len(ids) > end + 3 and ids[end + 1] == USER and ids[end + 2] == NEWLINE:
        end += 3
    return end


class HunyuanVideo15(JointFamily):
    name = "HunyuanVideo 1.5"
    family = "hunyuanvideo15"
    module, model_class = "comfy.ldm.hunyuan_video.model", "HunyuanVideo"
    clip_name = "Qwen2.5"
    tokens_key = QWEN
    image_channels = slice(0, -1)  # [image latents | frame mask (1)]
    inplace_streams = ("img", "txt")  # DoubleStreamBlock: img += ..., txt += ... after their norms saved them
    learn_frames = 121

    def image_conditioning(self, vae, image, length: int) -> dict:
        """As ``HunyuanVideo15ImageToVideo``: the image's latent frame first, zeros after; the first frame given."""
        encoded = vae.encode(image[..., :3])
        frames = (length - 1) // 4 + 1
        latent = torch.zeros(1, encoded.shape[1], frames, *encoded.shape[-2:])
        latent[:, :, : encoded.shape[2]] = encoded
        mask = torch.ones(1, 1, frames, *encoded.shape[-2:])
        mask[:, :, :1] = 0.0
        return {"concat_latent_image": latent, "concat_mask": mask}

    def check(self, model) -> None:
        if model.cond_type_embedding is None or model.vision_in is None:
            raise FlexiMMTInputError(
                "this is a HunyuanVideo 1.0 model: FlexiMMT Apply patches HunyuanVideo 1.5 image-to-video "
                "(load hunyuanvideo1.5 i2v weights)"
            )
        if model.in_channels != 2 * model.out_channels + 1 or model.single_blocks:
            raise FlexiMMTInputError(
                f"this HunyuanVideo 1.5 model takes {model.in_channels} input channels, not the "
                f"{2 * model.out_channels + 1} of the image-to-video model (text-to-video or super-resolution "
                "weights?): load HunyuanVideo 1.5 i2v (480p or 720p)"
            )

    def blocks(self, model):
        return model.double_blocks

    def motion_shape(self, model) -> tuple[int, int]:
        return len(model.double_blocks), model.hidden_size

    def patch_size(self, model) -> tuple[int, int, int]:
        return tuple(model.patch_size)

    def read_call(self, model, arguments: dict) -> Call:
        x, context = arguments["x"], arguments["context"]
        if arguments.get("ref_latent") is not None:
            raise FlexiMMTInputError(
                "FlexiMMT Apply: this graph adds a reference latent's tokens to the HunyuanVideo 1.5 model's "
                "video, which FlexiMMT's masks do not cover; remove that conditioning or the FlexiMMT patch"
            )
        clip_fea, byt5, mask = arguments.get("clip_fea"), arguments.get("txt_byt5"), arguments.get("attention_mask")
        offset = (clip_fea.shape[1] if clip_fea is not None else 0) + (byt5.shape[1] if byt5 is not None else 0)
        if mask is None:
            return Call(x, context.shape[1], [TextKeys(offset)] * x.shape[0])
        valid = mask.bool().reshape(-1, context.shape[1]).expand(x.shape[0], -1)
        counts = valid.sum(1).tolist()
        if any(bool(row[count:].any()) for row, count in zip(valid, counts)):
            raise FlexiMMTInputError(
                "FlexiMMT Apply: the HunyuanVideo 1.5 text's attention mask leaves gaps inside the text; "
                "FlexiMMT takes padding only at the end of the Qwen2.5 tokens, as ComfyUI's encoder gives it"
            )
        return Call(x, context.shape[1], [TextKeys(offset, offset + count) for count in counts])

    def call_kinds(self, model, index: int) -> tuple[str, ...]:
        return ("joint",)

    def attend(self, run: Run, index: int, kind: str, base, q, k, v, heads: int, *args, **kwargs):
        kwargs.pop("mask", None)  # the text's padding: closed by the rows' TextKeys instead
        kwargs.pop("skip_reshape", None)
        attn = run.model.double_blocks[index].txt_attn
        batch = q.shape[0]
        motion = run.state.joint_motion_rows(index, run.expert, batch, like=v)  # [B, K * d_m, dim], the raw tokens
        mq, mk, mv = attn.qkv(motion).view(batch, motion.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        _, mk = attn.norm(mq, mk, mv)
        out = self.joint_attention(run, index, base, q, k, v, mk, mv, dict(kwargs, heads=heads))
        return out.transpose(1, 2).flatten(2).to(v.dtype)

    def video_features(self, run: Run, index: int, video_out):
        return run.model.double_blocks[index].img_attn.proj(video_out.transpose(1, 2).flatten(2))

    def span_finder(self, clip, prompt: str):
        """The motion words among the Qwen2.5 tokens ComfyUI's encoder gives the model (after its crop),
        found by their characters in the templated prompt."""
        ids = clip_tokens(clip, prompt, QWEN)
        crop = qwen_crop(ids)
        outer, tokenizer = clip.tokenizer, inner_tokenizer(clip).tokenizer
        content = prompt or " "  # as the tokenizer's prevent_empty_text puts an empty prompt
        template = "{}" if content.startswith("<|im_start|>") else outer.llama_template
        start = template.index("{}")
        text = template.format(content)
        if tokenizer(text)["input_ids"] != ids:
            raise FlexiMMTInputError(
                "FlexiMMT Apply: ComfyUI's Qwen2.5 tokenizer parsed this prompt into other tokens than its "
                "text has (an escape or an embedding in the prompt?): write the prompt as plain text"
            )
        length = len(ids) - crop

        def find(phrases):
            return find_word_spans(
                tokenizer, text, phrases, length, prompt_start=start, prompt_end=start + len(content), skip_tokens=crop
            )

        return find, length
