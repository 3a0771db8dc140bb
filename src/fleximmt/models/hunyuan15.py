"""HunyuanVideo 1.5 image-to-video (diffusers' ``HunyuanVideo15ImageToVideoPipeline``, 8.3B): FlexiMMT as
docs/method.md#hunyuanvideo-15 maps it.

Its blocks are dual-stream: video tokens and text tokens have their own projections and meet in one
joint attention over ``[video | text]``, where "text" is, per batch row, the SigLIP image tokens, the
ByT5 glyph tokens and the Qwen2.5-VL prompt tokens (valid ones first), then padding. Motion tokens
join after the text (``attention.FORMS`` "joint") through the **text stream's** frozen ``add_q/k/v_proj``
and ``norm_added_q/k`` (no RoPE); every MDMA part exists; padded text keys are closed to every query
without an N x N mask (``attention.TextKeys``: where each row's prompt starts and its padding begins);
RMPM reads the video stream's attention outputs (before the gate) of the conditional branch over the
first 70% of the blocks. diffusers' blocks pass no ``attention_kwargs`` to their processors, so the
processors of the transformer share one ``StateSlot`` the pipeline fills for the call (``shared.py``); the guider runs
the conditional branch first in each step, its own forward. Training is flow matching: the velocity
error, i.e. the x0 error weighted by ``1 / sigma^2``, at timesteps shifted as the scheduler shifts them.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from typing import Any, ClassVar

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import HunyuanVideo15ImageToVideoPipeline
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import format_text_input

from ..errors import FlexiMMTInputError
from ..method.adapter import ModelAdapter, TokenGrid, TrainingBatch, TrueSize
from ..method.masks import PARTS
from ..method.pipeline import FlexiMMTMixin
from ..method.prompt import find_word_spans
from ..method.tokens import TextKeys
from .shared import (
    FEATURE_SHARE,
    T5_V1_1,
    SlotAdapter,
    SlotProcessor,
    StateSlot,
    bound_arguments,
    carry_dispatch,
    check_frame_count,
    check_no_context_parallelism,
    dispatched_attention,
    patched_token_grid,
    sample_sigma,
    slot_of,
)

logger = logging.getLogger(__name__)

# The pipeline's encoders as diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py assembles them: text_encoder is
# Qwen2.5-VL-7B-Instruct's language model (Qwen2_5_VLTextModel), text_encoder_2 google/byt5-small's encoder with
# Glyph-SDXL-v2's weights and its color and font tokens (1,510 in all), image_encoder FLUX.1-Redux-dev's SigLIP
# (google/siglip-so400m-patch14-384); the VAE is AutoencoderKLHunyuanVideo15's defaults
QWEN25_VL_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]},
)
BYT5_GLYPH = dict(
    **T5_V1_1,
    d_model=1472,
    d_ff=3584,
    d_kv=64,
    num_heads=6,
    num_layers=12,
    num_decoder_layers=4,
    vocab_size=1510,
    is_encoder_decoder=False,
)
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    num_channels=3,
)

DEFAULT_MODEL = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v"
CHECKPOINTS = (DEFAULT_MODEL, "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_i2v")
VAE_SCALE = (16, 4)  # AutoencoderKLHunyuanVideo15's defaults (its checkpoint's): spatial, temporal; 32 channels
TRUE_SIZES = {
    # the 480p I2V checkpoint: the 8.3B transformer is HunyuanVideo15Transformer3DModel's defaults (54 dual-stream
    # blocks, 16 heads x 128, mlp_ratio 4, QK RMSNorm, patch 1, 65 input channels) but for what diffusers'
    # scripts/convert_hunyuan_video1_5_to_diffusers.py sets for its 480p checkpoints: target_size 640 (buckets of base
    # size 640) and task_type "i2v". The video: a 16:9 image's bucket (the pipeline sizes the video from the image's
    # aspect) at diffusers' 121 frames. A row's text keys in the order the transformer's forward lays them out,
    # valid ones first: SigLIP so400m-patch14-384's 27 x 27 image tokens (all valid in i2v), the ByT5 glyph tokens
    # (tokenizer_2_max_length; valid only for quoted text in the prompt) and the Qwen2.5-VL prompt tokens after the
    # template's crop (tokenizer_max_length), then the padding; valid prompt tokens: a prompt of about 90 words and the
    # empty negative prompt's 6 (the template's closing " ", <|im_end|>, "\n", <|im_start|>, "assistant", "\n")
    "hunyuan1.5": TrueSize(
        "HunyuanVideo-1.5-480p-I2V",
        {"target_size": 640, "task_type": "i2v"},
        (
            *HunyuanVideo15ImageProcessor(vae_scale_factor=VAE_SCALE[0]).calculate_default_height_width(720, 1280, 640),
            121,
        ),
        VAE_SCALE,
        {"image": 729, "glyph": 256, "prompt": 1000, "valid": 120, "valid_negative": 6, "valid_glyphs": 0},
        dict(
            num_attention_heads=2,
            attention_head_dim=32,
            num_layers=3,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            text_embed_dim=32,
            text_embed_2_dim=16,
            image_embed_dim=24,
            rope_axes_dim=(8, 12, 12),
        ),
        {"image": 16, "glyph": 8, "prompt": 40, "valid": 12, "valid_negative": 3, "valid_glyphs": 0},
        components={
            "vae": {},
            "text_encoder": QWEN25_VL_7B_TEXT,
            "text_encoder_2": BYT5_GLYPH,
            "image_encoder": SIGLIP_SO400M,
        },
    )
}
MARKER = "\ue000"  # a private-use character no template holds: it shows where the prompt goes


class FlexiMMTHunyuanAttnProcessor(SlotProcessor):
    """HunyuanVideo 1.5's joint attention with motion tokens and MDMA; without a state, or with no
    objects, it is diffusers' ``HunyuanVideo15AttnProcessor2_0`` (its dense padding mask included).

    With objects, the text stream computes ``[text | motion]`` in one projection, the tokens run as
    ``[video | text | motion]`` (diffusers' order plus the motion tokens) and the padded text keys are
    left out of every attention call instead of masked."""

    def __init__(self, block_index: int, slot: StateSlot) -> None:
        super().__init__(block_index, slot, HunyuanVideo15AttnProcessor2_0())

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        state = self.slot.state
        if state is None or state.num_objects == 0 or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        check_no_context_parallelism(self, state, "HunyuanVideo 1.5")
        attend = dispatched_attention(self, state)
        batch, n_video, text_len = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
        heads = lambda x: x.unflatten(2, (attn.heads, -1))
        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        motion = state.joint_motion_rows(self.block, 0, batch, like=encoder_hidden_states)
        context = torch.cat([encoder_hidden_states, motion], dim=1)  # the text stream: [text | motion]
        context_q, context_k = heads(attn.add_q_proj(context)), heads(attn.add_k_proj(context))
        context_v = heads(attn.add_v_proj(context))
        if attn.norm_added_q is not None:
            context_q = attn.norm_added_q(context_q)
        if attn.norm_added_k is not None:
            context_k = attn.norm_added_k(context_k)
        query, key, value = (
            torch.cat([v, c], dim=1).transpose(1, 2)
            for v, c in ((query, context_q), (key, context_k), (value, context_v))
        )
        texts = self.slot.texts if len(self.slot.texts) == batch else [TextKeys()] * batch
        out = state.joint_attention(self.block, query, key, value, text_len, attend, texts)
        out = out.transpose(1, 2).flatten(2, 3).to(hidden_states.dtype)
        video_out = attn.to_out[1](attn.to_out[0](out[:, :n_video]))
        text_out = attn.to_add_out(out[:, n_video:])
        state.observe(self.block, video_out)
        return video_out, text_out


def row_texts(kwargs: dict[str, Any]) -> list[TextKeys]:
    """Each row's text form in a forward of diffusers' HunyuanVideo 1.5 transformer, as its forward
    lays the text out: valid image tokens, valid glyph (ByT5) tokens, valid prompt tokens, then padding."""
    mask, mask_2, image = (
        kwargs["encoder_attention_mask"],
        kwargs.get("encoder_attention_mask_2"),
        kwargs.get("image_embeds"),
    )
    images = 0 if image is None or bool(torch.all(image == 0)) else image.shape[1]  # diffusers' t2v rule
    prompt = mask.bool().sum(1).tolist()
    glyphs = [0] * len(prompt) if mask_2 is None else mask_2.bool().sum(1).tolist()
    return [TextKeys(images + g, images + g + p) for p, g in zip(prompt, glyphs)]


class HunyuanVideo15Adapter(SlotAdapter, ModelAdapter):
    family = "hunyuanvideo15"
    pipeline_class = HunyuanVideo15ImageToVideoPipeline
    form = "joint"
    parts = PARTS
    feature_share = FEATURE_SHARE
    default_model = DEFAULT_MODEL
    stated_defaults: ClassVar[dict[str, Any]] = {
        "height": "the image's aspect bucket",
        "width": "the image's aspect bucket",
        "guidance_scale": "its guider's",
    }
    text_keys = True  # image, glyph and prompt tokens, then padding (row_texts)
    dmem_video_queries = True
    motion_attention = "attn"
    true_sizes = TRUE_SIZES

    @classmethod
    def random_text(cls, config, text, valid: int, generator) -> dict[str, torch.Tensor]:
        """One row's text as the pipeline hands it to the transformer: ``text["prompt"]`` Qwen2.5-VL tokens of which
        the first ``valid`` are not padding, ``text["glyph"]`` ByT5 tokens of which ``text["valid_glyphs"]``."""
        for count, kind, most in ((valid, "valid prompt", "prompt"), (text["valid_glyphs"], "valid glyph", "glyph")):
            if not 0 <= count <= text[most]:
                raise FlexiMMTInputError(f"{count} {kind} tokens: between 0 and the {text[most]} {most} tokens")

        def mask(count: int, length: int) -> torch.Tensor:
            out = torch.zeros(1, length, dtype=torch.long)
            out[:, :count] = 1
            return out

        return {
            "prompt_embeds": torch.randn(1, text["prompt"], config.text_embed_dim, generator=generator),
            "prompt_embeds_mask": mask(valid, text["prompt"]),
            "prompt_embeds_2": torch.randn(1, text["glyph"], config.text_embed_2_dim, generator=generator),
            "prompt_embeds_mask_2": mask(text["valid_glyphs"], text["glyph"]),
        }

    @classmethod
    def random_conditions(cls, config, latent, text, generator):
        """One reference window as :meth:`encode_conditions` returns it, random: the prompt's padded text
        (:meth:`random_text`, ``text["valid"]`` tokens valid), the video's latents, the image's latent frame and
        the frame mask, SigLIP's image tokens."""
        frames, height, width = latent
        channels = config.out_channels
        tensors = cls.random_text(config, text, text["valid"], generator)
        tensors["video_latents"] = torch.randn(1, channels, frames, height, width, generator=generator)
        condition = torch.zeros(1, channels + 1, frames, height, width)  # the image's latent frame and the frame mask
        condition[:, :channels, :1] = torch.randn(1, channels, 1, height, width, generator=generator)
        condition[:, channels:, :1] = 1.0
        tensors["condition"] = condition
        tensors["image_embeds"] = torch.randn(1, text["image"], config.image_embed_dim, generator=generator)
        return tensors

    @classmethod
    def random_forwards(cls, config, size, latent, text, guidance, generator, device="cpu", dtype=torch.float32):
        """The guider's conditional forward, then with guidance its unconditional one (the empty negative prompt's
        ``text["valid_negative"]`` valid tokens), batch 1 each: noise, the image's latent frame and the frame mask on
        channels, each forward's padded text, SigLIP's image tokens."""
        cond = cls.random_conditions(config, latent, text, generator)
        model_input = torch.cat([cond["video_latents"], cond["condition"]], dim=1).to(device, dtype)
        image = cond["image_embeds"].to(device, dtype)
        rows = {"pred_cond": cond}
        if guidance:
            rows["pred_uncond"] = cls.random_text(config, text, text["valid_negative"], generator)
        names = {
            "prompt_embeds": "encoder_hidden_states",
            "prompt_embeds_mask": "encoder_attention_mask",
            "prompt_embeds_2": "encoder_hidden_states_2",
            "prompt_embeds_mask_2": "encoder_attention_mask_2",
        }
        branches = {
            branch: {
                names[k]: row[k].to(device, dtype) if row[k].is_floating_point() else row[k].to(device) for k in names
            }
            for branch, row in rows.items()
        }

        def forwards(timestep: float) -> list[tuple[str, dict[str, Any]]]:
            t = torch.tensor([timestep], device=device).to(dtype)
            return [
                (branch, dict(hidden_states=model_input, image_embeds=image, timestep=t, **inputs))
                for branch, inputs in branches.items()
            ]

        return forwards

    @classmethod
    def pipeline_around(cls, transformer: torch.nn.Module):
        """diffusers' pipeline of this family around ``transformer`` with the checkpoints' scheduler and guider,
        no encoders, and a tiny VAE of the real one's compression and channels (the pipeline reads its scale
        factors and latent channels; a denoising step never calls it)."""
        from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler
        from diffusers.guiders import ClassifierFreeGuidance

        spatial, temporal = VAE_SCALE
        vae = AutoencoderKLHunyuanVideo15(
            latent_channels=transformer.config.out_channels,
            block_out_channels=(8,) * 5,
            layers_per_block=1,
            spatial_compression_ratio=spatial,
            temporal_compression_ratio=temporal,
        )
        return HunyuanVideo15ImageToVideoPipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
            vae=vae.to(transformer.device),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
            text_encoder_2=None,
            tokenizer_2=None,
            guider=ClassifierFreeGuidance(guidance_scale=6.0),
            image_encoder=None,
            feature_extractor=None,
        )

    def check_model(self) -> None:
        cfg = self.pipe.transformer.config
        latent = self.pipe.vae.config.latent_channels
        if cfg.task_type != "i2v" or cfg.in_channels != 2 * latent + 1:
            raise FlexiMMTInputError(
                f"this HunyuanVideo 1.5 transformer is made for {cfg.task_type!r} ({cfg.in_channels} input channels): "
                "load an image-to-video checkpoint: " + ", ".join(CHECKPOINTS)
            )

    def default_text_length(self) -> int:
        return self.pipe.tokenizer_max_length  # the Qwen2.5-VL prompt tokens after the template's crop (1000)

    def default_size(self) -> tuple[int, int, int]:
        """A square image's size (the pipeline sizes the video from the image's aspect) and diffusers' 121 frames."""
        target = self.pipe.target_size
        height, width = self.pipe.video_processor.calculate_default_height_width(target, target, target)
        return height, width, inspect.signature(self.pipeline_class.__call__).parameters["num_frames"].default

    def call_size(self, call: dict[str, Any]) -> tuple[int, int, int]:
        """The pipeline makes its video at the size of ``target_size``'s bucket closest to the image's aspect."""
        image = call["image"]
        self.batch_images(call, 1)
        if not isinstance(image, PIL.Image.Image):
            raise FlexiMMTInputError(
                f"image: HunyuanVideo 1.5 takes a PIL image, got {type(image).__name__}: "
                "pass PIL.Image.open(path) (or Image.fromarray(array))"
            )
        height, width = self.pipe.video_processor.calculate_default_height_width(
            image.height, image.width, self.pipe.target_size
        )
        return height, width, call["num_frames"]

    def frame_mask(self, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The mask resized and centre-cropped exactly as the pipeline's ``resize(..., resize_mode="crop")``
        treats the image: scaled to cover ``height x width`` with its aspect kept, then cut to it."""
        src_h, src_w = mask.shape
        ratio, src_ratio = width / height, src_w / src_h
        cover_w = width if ratio > src_ratio else src_w * height // src_h
        cover_h = height if ratio <= src_ratio else src_h * width // src_w
        cover = F.interpolate(mask[None, None].float(), size=(cover_h, cover_w), mode="bilinear", align_corners=False)[
            0, 0
        ]
        top, left = cover_h // 2 - height // 2, cover_w // 2 - width // 2
        return cover[top : top + height, left : left + width] >= 0.5

    def token_grid(self, height: int, width: int, num_frames: int) -> TokenGrid:
        pipe, cfg = self.pipe, self.pipe.transformer.config
        return patched_token_grid(
            height,
            width,
            num_frames,
            pipe.vae_scale_factor_spatial,
            pipe.vae_scale_factor_temporal,
            cfg.patch_size,
            cfg.patch_size_t,
        )

    def check_geometry(self, height: int, width: int, num_frames: int) -> None:
        check_frame_count(
            num_frames, self.pipe.vae_scale_factor_temporal, "HunyuanVideo 1.5", "its VAE would decode another count"
        )

    def word_spans(self, prompt: str, phrases, text_len: int) -> list[list[int]]:
        """Motion words among the Qwen2.5-VL prompt tokens the transformer sees: the prompt inside the
        pipeline's chat template (whose tokens are never motion words), its first
        ``prompt_template_encode_start_idx`` tokens cropped as the pipeline crops them."""
        pipe = self.pipe
        render = lambda content: pipe.tokenizer.apply_chat_template(
            format_text_input([content], pipe.system_message)[0], add_generation_prompt=True, tokenize=False
        )
        content = prompt if prompt else " "  # as format_text_input puts an empty prompt
        text, start = render(content), render(MARKER).index(MARKER)  # where the template puts the user's text
        return find_word_spans(
            pipe.tokenizer,
            text,
            phrases,
            text_len,
            prompt_start=start,
            prompt_end=start + len(content),
            skip_tokens=pipe.prompt_template_encode_start_idx,
        )

    def batch_images(self, call: dict[str, Any], videos: int) -> list[Any]:
        if isinstance(call["image"], list):
            raise FlexiMMTInputError(
                "HunyuanVideo 1.5's pipeline takes one image per call (it serves every prompt "
                "of the batch): call once per image"
            )
        return [call["image"]] * videos

    # -- inference plumbing ----------------------------------------------------------------
    def install_processors(self) -> None:
        transformer = self.pipe.transformer
        if slot_of(transformer) is not None:
            return
        slot = StateSlot()
        for index, block in enumerate(transformer.transformer_blocks):
            current = block.attn.processor
            if index == 0 and type(current) is not HunyuanVideo15AttnProcessor2_0:
                logger.warning("replacing the attention processor %s with FlexiMMT's", type(current).__name__)
            block.attn.set_processor(carry_dispatch(current, FlexiMMTHunyuanAttnProcessor(index, slot)))

    @contextlib.contextmanager
    def each_step(self, call: dict[str, Any], step_end):
        """diffusers' HunyuanVideo 1.5 pipeline has no step callback: ``step_end`` runs after each of its
        scheduler steps (the step's last act on the latents), then FlexiMMT's ``callback_on_step_end(pipe, step, timestep, {})`` (no tensors: the pipeline hands none)."""
        scheduler = self.pipe.scheduler
        original, own = scheduler.step, "step" in vars(scheduler)
        steps = itertools.count()
        call = dict(call)
        callback = call.pop("callback_on_step_end", None)  # FlexiMMT's (the pipeline has none): run here

        def step(model_output, timestep, *args, **kwargs):
            out = original(model_output, timestep, *args, **kwargs)
            index = next(steps)
            step_end(index)
            if callback is not None and callback(self.pipe, index, timestep, {}):
                raise FlexiMMTInputError(
                    "callback_on_step_end returned tensors: HunyuanVideo 1.5's pipeline hands its "
                    "step callback none and takes none back; return {} or None"
                )
            return out

        scheduler.step = step
        try:
            yield call
        finally:
            if own:
                scheduler.step = original
            else:
                del scheduler.step

    def row_texts(self, transformer, args, kwargs) -> list[TextKeys]:
        return row_texts(bound_arguments(transformer, args, kwargs))

    # -- training ------------------------------------------------------------------------------
    def encode_conditions(self, clips, caption, text_len, generator):
        pipe = self.pipe
        device = pipe._execution_device
        dtype = pipe.transformer.dtype
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(caption, device=device, dtype=dtype)
        scale = pipe.vae.config.scaling_factor
        videos, conditions, images = [], [], []
        for clip in clips:
            clip = clip[None].to(device, pipe.vae.dtype)  # [1, 3, T, H, W]
            latents = pipe.vae.encode(clip).latent_dist.sample(generator=generator).float() * scale
            image = pipe.vae.encode(clip[:, :, :1]).latent_dist.mode().float() * scale  # as _get_image_latents
            condition = torch.zeros_like(latents)
            condition[:, :, :1] = image
            frame_mask = torch.zeros_like(latents[:, :1])
            frame_mask[:, :, 0] = 1.0
            videos.append(latents[0].cpu())
            conditions.append(torch.cat([condition, frame_mask], dim=1)[0].cpu())
            pixels = ((clip[0, :, 0].float().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
            images.append(pipe.encode_image(PIL.Image.fromarray(pixels), 1, device, dtype)[0].float().cpu())
        return {
            "prompt_embeds": embeds.float().cpu(),
            "prompt_embeds_mask": mask.cpu(),
            "prompt_embeds_2": embeds_2.float().cpu(),
            "prompt_embeds_mask_2": mask_2.cpu(),
            "video_latents": torch.stack(videos),
            "condition": torch.stack(conditions),
            "image_embeds": torch.stack(images),
        }

    def training_prediction(self, state, cond, window, generator, image_dropout, autocast, dtype=None) -> TrainingBatch:
        pipe = self.pipe
        device = pipe._execution_device
        transformer = pipe.transformer
        self.attached_slot(transformer, state)
        precision = dtype or torch.float32  # of the latents, noise and prediction outside the transformer
        x0 = cond["video_latents"][window : window + 1].to(device, precision)  # [1, C, F, h, w]
        condition = cond["condition"][window : window + 1].to(device, precision)
        if torch.rand((), generator=generator).item() < image_dropout:
            condition = condition.clone()
            condition[:, :-1] = 0  # the image latents (the frame mask stays)
        sigma = max(sample_sigma(pipe.scheduler, generator), 1e-3)
        noise = torch.randn(x0.shape, generator=generator).to(device, precision)
        noisy = (1 - sigma) * x0 + sigma * noise
        t = torch.tensor([sigma * pipe.scheduler.config.num_train_timesteps], device=device)
        model_dtype = transformer.dtype
        with autocast():
            velocity = transformer(
                hidden_states=torch.cat([noisy, condition], dim=1).to(model_dtype),
                timestep=t.to(model_dtype),
                encoder_hidden_states=cond["prompt_embeds"].to(device, model_dtype),
                encoder_attention_mask=cond["prompt_embeds_mask"].to(device),
                encoder_hidden_states_2=cond["prompt_embeds_2"].to(device, model_dtype),
                encoder_attention_mask_2=cond["prompt_embeds_mask_2"].to(device),
                image_embeds=cond["image_embeds"][window : window + 1].to(device, model_dtype),
                return_dict=False,
            )[0].to(precision)
        x0_hat = noisy - sigma * velocity  # flow matching: v = noise - x0
        weight = torch.tensor(1.0 / sigma**2, device=device)  # the velocity error as an x0 error
        return TrainingBatch(x0.transpose(1, 2), x0_hat.transpose(1, 2), weight)


class FlexiMMTHunyuanVideo15Pipeline(FlexiMMTMixin, HunyuanVideo15ImageToVideoPipeline):
    """Multi-object multi-motion image-to-video (FlexiMMT) on diffusers' HunyuanVideo 1.5 I2V (480p, 720p)."""

    adapter_class = HunyuanVideo15Adapter
    call_doc = (
        ". The video's size comes from the image (the pipeline's ``target_size`` bucket of its aspect); "
        "with objects, ``num_frames`` must be 4k+1 and one PIL image serves the call; CFG is the pipeline's "
        "``guider``."
    )
