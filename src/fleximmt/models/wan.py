"""Wan 2.1 / 2.2 image-to-video (diffusers' ``WanImageToVideoPipeline``): FlexiMMT as docs/method.md#wan
maps it - the first multi-object motion transfer on Wan.

Wan's blocks run self-attention ``attn1`` over video tokens only and cross-attention ``attn2`` from
video queries to the umT5 text (and, on Wan 2.1 I2V, 257 CLIP image tokens through their own
projections). Motion tokens join ``attn2``'s keys and values beside the text (``attention.FORMS``
"cross"); only ``m2v`` and ``t2v`` exist (no text or motion queries); the image tokens stay open to
every video query; ``attn1`` stays one unmasked attention and lends RMPM its outputs (the first 70%
of blocks, conditional pass). diffusers' Wan blocks pass no ``attention_kwargs`` to their processors,
so the processors of a transformer share one ``StateSlot`` the pipeline fills for the call (``shared.py``).
Wan 2.2 I2V-A14B has two experts (``transformer`` for high noise, ``transformer_2`` for low noise):
a motion holds one token set per expert. Training is flow matching: the velocity error, i.e. the
x0 error weighted by ``1 / sigma^2``, at timesteps shifted as the pipeline's scheduler shifts them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import WanImageToVideoPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ..errors import FlexiMMTInputError
from ..method.adapter import ModelAdapter, TokenGrid, TrainingBatch, TrueSize
from ..method.masks import CROSS_PARTS, check_cross_parts
from ..method.pipeline import FlexiMMTMixin
from .shared import (
    FEATURE_SHARE,
    T5_V1_1,
    T5_XXL_SIZE,
    SlotAdapter,
    SlotProcessor,
    StateSlot,
    carry_dispatch,
    check_frame_count,
    context_shard,
    dispatched_attention,
    repeat_per_prompt,
    sample_sigma,
    slot_of,
    text_path_projector,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
CHECKPOINTS = (
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
)
# The transformer/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers and Wan-AI/Wan2.2-TI2V-5B-Diffusers (the values
# diffusers' scripts/convert_wan_to_diffusers.py writes for "Wan-I2V-14B-480p" and "Wan2.2-TI2V-5B")
CONFIG = dict(
    attention_head_dim=128,
    cross_attn_norm=True,
    eps=1e-6,
    freq_dim=256,
    patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads",
    text_dim=4096,
    rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)
TINY = dict(num_attention_heads=2, attention_head_dim=32, num_layers=3, ffn_dim=128, text_dim=32, freq_dim=32)
# umT5's context (the processors' hard-coded 512) and CLIP ViT-H/14's 16 x 16 + 1 image tokens (Wan 2.1 I2V)
TEXT_TOKENS, IMAGE_TOKENS = 512, 257
# google/umt5-xxl's encoder, as Wan's text_encoder/config.json (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers) gives it
UMT5_XXL = dict(**T5_V1_1, **T5_XXL_SIZE, num_decoder_layers=24, vocab_size=256384, scalable_attention=True)
# Wan 2.1 I2V's image_encoder/config.json: CLIPVisionModel, OpenCLIP ViT-H/14 (laion2B), 257 tokens at 224 px
CLIP_VIT_H14 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    num_channels=3,
)
# vae/config.json: Wan 2.1 uses AutoencoderKLWan's defaults; Wan2.2-TI2V-5B-Diffusers' VAE (latents_mean/std
# left at placeholders: they scale latents and take no memory)
WAN_VAES = {
    "wan2.1": {},
    "wan2.2-5b": dict(
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
    ),
}
TRUE_SIZES = {
    # I2V 14B 480P: CLIP image tokens through attn2's add_k_proj / add_v_proj; diffusers' pipeline defaults
    "wan2.1": TrueSize(
        "Wan2.1-I2V-14B-480P",
        {
            **CONFIG,
            "added_kv_proj_dim": 5120,
            "ffn_dim": 13824,
            "image_dim": 1280,
            "in_channels": 36,
            "num_attention_heads": 40,
            "num_layers": 40,
            "out_channels": 16,
        },
        (480, 832, 81),
        (8, 4),
        {"prompt": TEXT_TOKENS, "image": IMAGE_TOKENS},
        {**TINY, "image_dim": 32, "added_kv_proj_dim": TINY["num_attention_heads"] * TINY["attention_head_dim"]},
        components={"vae": WAN_VAES["wan2.1"], "text_encoder": UMT5_XXL, "image_encoder": CLIP_VIT_H14},
    ),
    # TI2V 5B: the image is the first latent frame, a timestep per token (expand_timesteps); Wan 2.2's VAE compresses
    # 16x; its model card and the authors' app: 720P as 704 x 1280, 121 frames at 24 fps
    "wan2.2-5b": TrueSize(
        "Wan2.2-TI2V-5B",
        {
            **CONFIG,
            "added_kv_proj_dim": None,
            "ffn_dim": 14336,
            "image_dim": None,
            "in_channels": 48,
            "num_attention_heads": 24,
            "num_layers": 30,
            "out_channels": 48,
        },
        (704, 1280, 121),
        (16, 4),
        {"prompt": TEXT_TOKENS},
        TINY,
        components={"vae": WAN_VAES["wan2.2-5b"], "text_encoder": UMT5_XXL},
    ),
}


class WanProcessor(SlotProcessor):
    """A FlexiMMT processor around diffusers' own ``WanAttnProcessor`` (``self.inner``), whose dispatch
    settings it shares (``DelegatingProcessor``)."""

    def __init__(self, block_index: int, slot: StateSlot) -> None:
        super().__init__(block_index, slot, WanAttnProcessor())


class WanSelfAttnProcessor(WanProcessor):
    """``attn1`` exactly as diffusers computes it; its output (after ``to_out``, before the block's
    gate) is handed to RMPM's feature capture."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        state = self.slot.state
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if state is not None:
            state.observe(self.block, out)
        return out


class WanCrossAttnProcessor(WanProcessor):
    """``attn2`` with motion tokens beside the text and MDMA over video queries x [text | motion];
    the CLIP image tokens (Wan 2.1) are attended as diffusers does. Without a state, or with no
    objects, it is diffusers' ``WanAttnProcessor``."""

    def __init__(self, block_index: int, expert: int, slot: StateSlot) -> None:
        super().__init__(block_index, slot)
        self.expert = expert

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        state = self.slot.state
        if state is None or state.num_objects == 0:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if attention_mask is not None:
            raise ValueError("FlexiMMT attention takes no attention_mask of its own: MDMA is the mask")
        shard = state.shard
        if (shard is None) != (self._parallel_config is None) or (
            shard is not None and hidden_states.shape[1] != shard.stop - shard.start
        ):
            raise FlexiMMTInputError(
                f"block {self.block_index} got {hidden_states.shape[1]} video tokens, not the share "
                f"FlexiMMT's masks were cut for ({shard}): enable context parallelism on the "
                f"transformer (enable_parallelism) before the call, not during it"
            )
        attend = dispatched_attention(self, state)
        text_len = state.videos[0].member.shape[1]
        image_tokens, text = encoder_hidden_states[:, :-text_len], encoder_hidden_states[:, -text_len:]
        query = attn.norm_q(attn.to_q(hidden_states))
        if getattr(attn, "fused_projections", False):
            key, value = attn.to_kv(text).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(text), attn.to_v(text)
        key = attn.norm_k(key)
        heads = lambda x: x.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        out = state.cross_attention(
            self.block, self.expert, heads(query), heads(key), heads(value), text_path_projector(attn, query), attend
        )
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        if attn.add_k_proj is not None and image_tokens.shape[1]:
            if getattr(attn, "fused_projections", False):
                key_img, value_img = attn.to_added_kv(image_tokens).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(image_tokens), attn.add_v_proj(image_tokens)
            key_img = attn.norm_added_k(key_img)
            image_out = attend(heads(query), heads(key_img), heads(value_img))
            out = out + image_out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanAdapter(SlotAdapter, ModelAdapter):
    family = "wan"
    pipeline_class = WanImageToVideoPipeline
    form = "cross"
    parts = CROSS_PARTS
    feature_share = FEATURE_SHARE
    default_model = DEFAULT_MODEL
    motion_attention = "attn2"
    true_sizes = TRUE_SIZES

    @classmethod
    def random_conditions(cls, config, latent, text, generator):
        """One reference window as :meth:`encode_conditions` returns it, random: the text, the video's latents, the
        image condition (TI2V, ``in_channels == out_channels``: the image's latent frame) and, where the model takes
        them, CLIP's image tokens."""
        frames, height, width = latent
        channels = config.out_channels
        condition = channels if config.in_channels == channels else config.in_channels - channels
        tensors = {
            "prompt_embeds": torch.randn(1, text["prompt"], config.text_dim, generator=generator),
            "video_latents": torch.randn(1, channels, frames, height, width, generator=generator),
            "condition": torch.randn(1, condition, frames, height, width, generator=generator),
        }
        if config.image_dim:
            tensors["image_embeds"] = torch.randn(1, text["image"], config.image_dim, generator=generator)
        return tensors

    @classmethod
    def random_forwards(cls, config, size, latent, text, guidance, generator, device="cpu", dtype=torch.float32):
        """The conditional forward, then (with guidance) the unconditional one, batch 1 each: noise and the image
        condition concatenated on channels (TI2V: the image's latent as frame 0, a timestep of 0 on its tokens), the
        text and, where the model takes them, CLIP's image tokens."""
        cond = cls.random_conditions(config, latent, text, generator)
        latents, condition = cond["video_latents"], cond["condition"]
        expand = config.in_channels == config.out_channels
        token_mask = None
        if expand:
            mask = torch.ones(1, 1, *latent)
            mask[:, :, 0] = 0
            model_input = (1 - mask) * condition + mask * latents
            patch = config.patch_size
            token_mask = mask[0, 0][:, :: patch[1], :: patch[2]].flatten()[None].to(device)
        else:
            model_input = torch.cat([latents, condition], dim=1)
        model_input = model_input.to(device, dtype)
        prompts = [cond["prompt_embeds"]]
        if guidance:  # the negative prompt's
            prompts.append(torch.randn(cond["prompt_embeds"].shape, generator=generator))
        prompts = [p.to(device, dtype) for p in prompts]
        image = cond.get("image_embeds")
        image = None if image is None else image.to(device, dtype)

        def forwards(timestep: float) -> list[tuple[str, dict[str, Any]]]:
            t = torch.tensor([timestep], device=device)
            t = token_mask * t if expand else t
            return [
                (
                    branch,
                    dict(
                        hidden_states=model_input,
                        timestep=t,
                        encoder_hidden_states=prompt,
                        encoder_hidden_states_image=image,
                    ),
                )
                for branch, prompt in zip(("cond", "uncond"), prompts)
            ]

        return forwards

    @classmethod
    def pipeline_around(cls, transformer: torch.nn.Module):
        """diffusers' pipeline of this family around ``transformer`` with the checkpoints' scheduler (TI2V: its
        timestep per token), and no encoders or VAE (a denoising step's forwards and a training step's prediction
        need none)."""
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        )
        expand = transformer.config.in_channels == transformer.config.out_channels
        return WanImageToVideoPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            scheduler=scheduler,
            transformer=transformer,
            expand_timesteps=expand,
        )

    def transformers(self) -> list[torch.nn.Module]:
        return [t for t in (self.pipe.transformer, getattr(self.pipe, "transformer_2", None)) if t is not None]

    def check_model(self) -> None:
        if len(self.transformers()) > 1 and self.pipe.config.boundary_ratio is None:
            raise FlexiMMTInputError(
                "this Wan pipeline has two experts but no boundary_ratio: load its model_index.json"
            )
        channels = self.transformers()[0].config.in_channels
        if not self.pipe.config.expand_timesteps and channels == self.pipe.vae.config.z_dim:
            raise FlexiMMTInputError(
                f"this Wan transformer takes {channels} input channels, the noise alone: it is a text-to-video model. "
                "Load an image-to-video checkpoint: " + ", ".join(CHECKPOINTS)
            )

    def default_text_length(self) -> int:
        return 512  # umT5 context, as diffusers' Wan pipelines and their processors assume

    def default_size(self) -> tuple[int, int, int]:
        params = self.diffusers_defaults()
        return params["height"], params["width"], params["num_frames"]

    def diffusers_defaults(self) -> dict[str, Any]:
        import inspect

        return {k: v.default for k, v in inspect.signature(WanImageToVideoPipeline.__call__).parameters.items()}

    def token_grid(self, height: int, width: int, num_frames: int) -> TokenGrid:
        patch = self.transformers()[0].config.patch_size
        temporal = self.pipe.vae_scale_factor_temporal
        latent_frames = (num_frames - 1) // temporal + 1
        per_token = self.pipe.vae_scale_factor_spatial * patch[1]
        return TokenGrid(
            latent_frames // patch[0], height // per_token, width // per_token, latent_frames, patch[0], temporal
        )

    def check_geometry(self, height: int, width: int, num_frames: int) -> None:
        check_frame_count(num_frames, self.pipe.vae_scale_factor_temporal, "Wan", "diffusers would round it silently")
        multiple = self.pipe.vae_scale_factor_spatial * self.transformers()[0].config.patch_size[1]
        if height % multiple or width % multiple:
            raise FlexiMMTInputError(
                f"height x width = {height} x {width}: Wan needs multiples of {multiple}; use "
                f"{height // multiple * multiple} x {width // multiple * multiple}"
            )

    @classmethod
    def check_settings(cls, parts: frozenset[str], context_text: str) -> None:
        try:
            check_cross_parts(parts, context_text)
        except ValueError as err:
            raise FlexiMMTInputError(f"{err} (Wan)") from None

    def prompt_text(self, prompt: str) -> str:
        from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

        return prompt_clean(prompt)

    # -- inference plumbing ----------------------------------------------------------------
    def video_shard(self, num_video_tokens: int):
        """Under context parallelism (diffusers' plan for Wan splits the video tokens before the first
        block; ``attn1`` runs as diffusers runs it, Ulysses or ring) each process attends its own video
        queries in ``attn2``, and RMPM gathers its features once per step."""
        return context_shard(self.transformers(), num_video_tokens)

    def install_processors(self) -> None:
        for expert, transformer in enumerate(self.transformers()):
            if slot_of(transformer) is not None:
                continue
            slot = StateSlot()
            for index, block in enumerate(transformer.blocks):
                block.attn1.set_processor(carry_dispatch(block.attn1.processor, WanSelfAttnProcessor(index, slot)))
                block.attn2.set_processor(
                    carry_dispatch(block.attn2.processor, WanCrossAttnProcessor(index, expert, slot))
                )

    def prepare_call(self, call: dict[str, Any]) -> dict[str, Any]:
        """Each prompt repeated instead of ``num_videos_per_prompt`` (the same videos; diffusers' Wan 2.1
        repeats its CLIP image tokens per prompt only and fails on more videos per prompt)."""
        return repeat_per_prompt(call)

    def batch_images(self, call: dict[str, Any], videos: int) -> list[Any]:
        image = call["image"]
        if isinstance(image, list) or (
            isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4 and image.shape[0] > 1
        ):
            raise FlexiMMTInputError(
                "Wan's pipeline takes one image per call (it serves every prompt of the batch): call once per image"
            )
        return [image] * videos

    # -- training ------------------------------------------------------------------------------
    def _normalise(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents)
        return (latents - mean) / std

    def encode_conditions(self, clips, caption, text_len, generator):
        pipe = self.pipe
        device = pipe._execution_device
        prompt_embeds, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=text_len, device=device
        )
        vae_dtype = pipe.vae.dtype
        videos, conditions, images = [], [], []
        for clip in clips:
            clip = clip[None].to(device, vae_dtype)  # [1, 3, T, H, W]
            latents = self._normalise(pipe.vae.encode(clip).latent_dist.sample(generator=generator).float())
            first = clip[:, :, :1]
            # the image condition exactly as the pipeline builds it (Wan 2.1/2.2: frame mask + the image
            # followed by black frames; TI2V: the first latent frame), from its own prepare_latents
            _, condition, *_ = pipe.prepare_latents(
                first[:, :, 0].float(),
                1,
                latents.shape[1],
                clip.shape[3],
                clip.shape[4],
                clip.shape[2],
                torch.float32,
                device,
                latents=torch.zeros_like(latents),
            )
            videos.append(latents[0].cpu())
            conditions.append(condition[0].cpu())
            if getattr(pipe, "image_encoder", None) is not None and pipe.transformer.config.image_dim is not None:
                pixels = (
                    ((first[0, :, 0].float().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
                )
                images.append(pipe.encode_image(PIL.Image.fromarray(pixels), device)[0].float().cpu())
        tensors = {
            "prompt_embeds": prompt_embeds.float().cpu(),
            "video_latents": torch.stack(videos),
            "condition": torch.stack(conditions),
        }
        if images:
            tensors["image_embeds"] = torch.stack(images)
        return tensors

    def training_prediction(self, state, cond, window, generator, image_dropout, autocast, dtype=None) -> TrainingBatch:
        pipe = self.pipe
        device = pipe._execution_device
        precision = dtype or torch.float32  # of the latents, noise and prediction outside the transformer
        x0 = cond["video_latents"][window : window + 1].to(device, precision)  # [1, C, F, h, w]
        condition = cond["condition"][window : window + 1].to(device, precision)
        if torch.rand((), generator=generator).item() < image_dropout:
            condition = condition.clone()
            condition[:, -x0.shape[1] :] = 0  # the image latents (Wan 2.1 / 2.2 keep their frame mask)
        sigma = max(sample_sigma(pipe.scheduler, generator), 1e-3)
        noise = torch.randn(x0.shape, generator=generator).to(device, precision)
        noisy = (1 - sigma) * x0 + sigma * noise
        num_train = pipe.scheduler.config.num_train_timesteps
        t = torch.tensor([sigma * num_train], device=device)
        experts = self.transformers()
        expert = 0
        if len(experts) > 1 and t.item() < pipe.config.boundary_ratio * num_train:
            expert = 1  # the low-noise expert
        transformer = experts[expert]
        model_dtype = transformer.dtype
        if pipe.config.expand_timesteps:
            mask = torch.ones_like(x0[:, :1])
            mask[:, :, 0] = 0
            model_input = (1 - mask) * condition + mask * noisy
            patch = transformer.config.patch_size
            timestep = (mask[0, 0][:, :: patch[1], :: patch[2]] * t).flatten()[None]
        else:
            model_input = torch.cat([noisy, condition], dim=1)
            timestep = t
        image_embeds = cond.get("image_embeds")
        self.attached_slot(transformer, state)
        with autocast():
            velocity = transformer(
                hidden_states=model_input.to(model_dtype),
                timestep=timestep,
                encoder_hidden_states=cond["prompt_embeds"].to(device, model_dtype),
                encoder_hidden_states_image=None
                if image_embeds is None
                else image_embeds[window : window + 1].to(device, model_dtype),
                return_dict=False,
            )[0].to(precision)
        x0_hat = noisy - sigma * velocity  # flow matching: v = noise - x0
        weight = torch.tensor(1.0 / sigma**2, device=device)  # the velocity error as an x0 error
        frames = slice(1, None) if pipe.config.expand_timesteps else slice(None)  # TI2V's frame 0 is given
        return TrainingBatch(x0.transpose(1, 2), x0_hat.transpose(1, 2), weight, frames, expert)


class FlexiMMTWanPipeline(FlexiMMTMixin, WanImageToVideoPipeline):
    """Multi-object multi-motion image-to-video (FlexiMMT) on diffusers' Wan 2.1 / 2.2 I2V."""

    adapter_class = WanAdapter
    call_doc = (
        ", with its defaults. With objects, ``num_frames`` must be 4k+1 and height/width multiples of 16 "
        "(diffusers would round them), and one image serves the call."
    )
