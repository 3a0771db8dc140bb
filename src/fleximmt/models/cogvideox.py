"""CogVideoX image-to-video (diffusers' ``CogVideoXImageToVideoPipeline``): 5B-I2V as in the paper, and
CogVideoX 1.5, whose tokens also span 2 latent frames.

Its blocks run one joint attention over ``[text | video]``: motion tokens join it as extra keys and
values (``attention.FORMS`` "joint"), every MDMA part exists, RMPM reads the attention output of the
video tokens, and the per-call state reaches the processors through diffusers' ``attention_kwargs``.
Training predicts v (DDPM, zero-SNR) and weighs the x0 error by ``1 / (1 - alphabar_t)``.
"""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from diffusers import CogVideoXImageToVideoPipeline
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb

from ..errors import FlexiMMTInputError
from ..method.adapter import ModelAdapter, TokenGrid, TrainingBatch, TrueSize, image_count, prompt_count
from ..method.attention import FlexiMMTState
from ..method.masks import PARTS
from ..method.pipeline import FlexiMMTMixin
from ..method.rows import BatchRows
from ..method.tokens import BlockProcessor
from .shared import (
    T5_V1_1,
    T5_XXL_SIZE,
    carry_dispatch,
    check_no_context_parallelism,
    dispatched_attention,
    repeat_per_prompt,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "THUDM/CogVideoX-5b-I2V"
V15_SIZE = (768, 1360)  # THUDM/CogVideoX1.5-5B-I2V's model card: height x width

# the checkpoints' transformer/config.json, shared by 5B-I2V and 1.5-5B-I2V
CONFIG_5B = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_head_dim=64,
    dropout=0.0,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=32,
    max_text_seq_length=226,
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    num_attention_heads=48,
    num_layers=42,
    out_channels=16,
    patch_size=2,
    spatial_interpolation_scale=1.875,
    temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0,
    text_embed_dim=4096,
    time_embed_dim=512,
    timestep_activation_fn="silu",
    use_rotary_positional_embeddings=True,
)
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=64,
    num_layers=3,
    max_text_seq_length=32,
    text_embed_dim=64,
    time_embed_dim=32,
    sample_height=8,
    sample_width=12,
    sample_frames=9,
)
# T5 v1.1 XXL (google/t5-v1_1-xxl, CogVideoX's text_encoder/config.json): only its encoder is loaded
T5_XXL = dict(**T5_V1_1, **T5_XXL_SIZE, vocab_size=32128)
# CogVideoX-5B(-I2V)'s vae/config.json: AutoencoderKLCogVideoX's defaults but for the scaling factor
VAE_5B = dict(scaling_factor=0.7)
TRUE_SIZES = {
    # THUDM/CogVideoX-5b-I2V at its only size (learned positions): 480 x 720 x 49
    "5b": TrueSize(
        "CogVideoX-5B-I2V",
        {
            **CONFIG_5B,
            "sample_frames": 49,
            "sample_height": 60,
            "sample_width": 90,
            "use_learned_positional_embeddings": True,
        },
        (480, 720, 49),
        (8, 4),
        {"prompt": 226},
        TINY,
        {"prompt": TINY["max_text_seq_length"]},
        components={"vae": VAE_5B, "text_encoder": T5_XXL},
    ),
    # THUDM/CogVideoX1.5-5B-I2V: temporal patches of 2 latent frames, ofs embedding, no learned positions; its
    # model card's 1360 x 768 (min side 768, max side <= 1360), 81 frames
    "1.5": TrueSize(
        "CogVideoX1.5-5B-I2V",
        {
            **CONFIG_5B,
            "ofs_embed_dim": 512,
            "patch_bias": False,
            "patch_size_t": 2,
            "sample_frames": 81,
            "sample_height": 300,
            "sample_width": 300,
            "use_learned_positional_embeddings": False,
        },
        (*V15_SIZE, 81),
        (8, 4),
        {"prompt": 226},
        {**TINY, "ofs_embed_dim": TINY["time_embed_dim"]},
        {"prompt": TINY["max_text_seq_length"]},
    ),
}


class FlexiMMTAttnProcessor(BlockProcessor):
    """CogVideoX's joint attention with motion tokens and MDMA: one class for every block, training
    and inference; without a ``fleximmt`` state (or with no objects) it computes exactly what diffusers'
    ``CogVideoXAttnProcessor2_0`` (or, with fused projections, ``FusedCogVideoXAttnProcessor2_0``) does.

    With objects, the tokens run in the order ``[video | text | motion]`` instead of diffusers'
    ``[text | video]``: the motion tokens join the hidden states before the block's projections and
    QK-norm (one matrix product with the rest; no RoPE), and the keys and values come out as the
    backend's key buffer, video first, without a copy of the video keys.

    Every attention it computes goes through diffusers' dispatcher with the backend chosen for the
    model (``transformer.set_attention_backend``, ``attention_backend(...)``): diffusers' own CogVideoX
    processor calls SDPA directly and ignores the choice."""

    _attention_backend = None  # set by diffusers' set_attention_backend / reset_attention_backend
    _parallel_config = None  # set by enable_parallelism

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        fleximmt: FlexiMMTState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_len, n_video = encoder_hidden_states.size(1), hidden_states.size(1)
        batch = hidden_states.shape[0]
        with_motion = fleximmt is not None and fleximmt.num_objects > 0
        attend = dispatched_attention(self, fleximmt)
        if with_motion:
            check_no_context_parallelism(self, fleximmt, "CogVideoX")
            if attention_mask is not None:
                raise ValueError("FlexiMMT attention takes no attention_mask of its own: MDMA is the mask")
            motion = fleximmt.joint_motion_rows(self.block, 0, batch, like=hidden_states)
            hidden_states = torch.cat([hidden_states, encoder_hidden_states, motion], dim=1)
            video, sizes = slice(None, n_video), [n_video, text_len]
        else:
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
            video, sizes = slice(text_len, None), [text_len, n_video]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if getattr(attn, "fused_projections", False):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, video] = apply_rotary_emb(query[:, :, video], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, video] = apply_rotary_emb(key[:, :, video], image_rotary_emb)

        if with_motion:
            out = fleximmt.joint_attention(self.block, query, key, value, text_len, attend)
        else:
            out = attend(query, key, value, attention_mask)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        first, second = out.split(sizes, dim=1)
        encoder_out, video_out = (second, first) if with_motion else (first, second)
        if fleximmt is not None:
            fleximmt.observe(self.block, video_out)
        return video_out, encoder_out


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    pipeline_class = CogVideoXImageToVideoPipeline
    form = "joint"
    parts = PARTS
    feature_share = 30 / 42  # the release averages features over the first 30 of 42 blocks
    default_model = DEFAULT_MODEL
    repeated_blocks = ("CogVideoXBlock",)  # diffusers' CogVideoX model names none (compile_repeated_blocks raises)
    motion_attention = "attn1"
    true_sizes = TRUE_SIZES
    stated_defaults: ClassVar[dict[str, Any]] = {"height": 480, "width": 720}  # CogVideoX-5B's (default_size)

    @classmethod
    def config_at(cls, values, size, vae_scale):
        """CogVideoX-5B's learned positions are made for its config's sample size, and its patch embedding refuses
        another: the sample size is the video's (1.5, without them, takes any)."""
        if not values.get("use_learned_positional_embeddings"):
            return values
        spatial = vae_scale[0]
        return {
            **values,
            "sample_height": size[0] // spatial,
            "sample_width": size[1] // spatial,
            "sample_frames": size[2],
        }

    @classmethod
    def random_conditions(cls, config, latent, text, generator):
        """One reference window as :meth:`encode_conditions` returns it, random: the T5 text, the video's and the
        image's latents."""
        frames, height, width = latent
        channels = config.in_channels // 2
        return {
            "prompt_embeds": torch.randn(1, text["prompt"], config.text_embed_dim, generator=generator),
            "video_latents": torch.randn(1, frames, channels, height, width, generator=generator),
            "image_latents": torch.randn(1, frames, channels, height, width, generator=generator),
            "padding": torch.tensor(0),
        }

    @classmethod
    def random_forwards(cls, config, size, latent, text, guidance, generator, device="cpu", dtype=torch.float32):
        """One forward of ``[uncond | cond]`` with guidance (of cond alone without): noise and image latents
        concatenated on channels, the T5 text, RoPE from the pipeline's own method, the ofs embedding's 2.0
        (CogVideoX 1.5)."""
        cond = cls.random_conditions(config, latent, text, generator)
        batch = 2 if guidance else 1
        latents = torch.cat([cond["video_latents"], cond["image_latents"]], dim=2).repeat(batch, 1, 1, 1, 1)
        prompt_embeds = cond["prompt_embeds"]
        if guidance:
            prompt_embeds = torch.cat([torch.randn(prompt_embeds.shape, generator=generator), prompt_embeds])
        pipe = SimpleNamespace(
            vae_scale_factor_spatial=size[0] // latent[1], transformer=SimpleNamespace(config=config)
        )
        rotary = CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings(
            pipe, size[0], size[1], latent[0], device
        )
        latents, prompt_embeds = latents.to(device, dtype), prompt_embeds.to(device, dtype)
        ofs = None if getattr(config, "ofs_embed_dim", None) is None else latents.new_full((1,), 2.0)

        def forwards(timestep: float) -> list[tuple[str, dict[str, Any]]]:
            t = torch.tensor(timestep, device=device).expand(batch)
            inputs = dict(
                hidden_states=latents, encoder_hidden_states=prompt_embeds, timestep=t, ofs=ofs, image_rotary_emb=rotary
            )
            return [("cond_uncond", inputs)]

        return forwards

    @classmethod
    def pipeline_around(cls, transformer: torch.nn.Module):
        """diffusers' pipeline of this family around ``transformer`` with the checkpoints' scheduler, and no text
        encoder or VAE (a denoising step's forwards and a training step's prediction need neither)."""
        from diffusers import CogVideoXDPMScheduler

        scheduler = CogVideoXDPMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
            snr_shift_scale=1.0,
            clip_sample=False,
        )
        return CogVideoXImageToVideoPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler
        )

    def check_model(self) -> None:
        latent = self.pipe.vae.config.latent_channels
        channels = self.pipe.transformer.config.in_channels
        if channels != 2 * latent:
            raise FlexiMMTInputError(
                f"this transformer takes {channels} input channels, not the {2 * latent} of an image-to-video model "
                "(text-to-video weights?): load an I2V checkpoint such as THUDM/CogVideoX-5b-I2V"
            )

    def default_text_length(self) -> int:
        return self.pipe.transformer.config.max_text_seq_length  # 226 for CogVideoX-5B

    def default_size(self) -> tuple[int, int, int]:
        """CogVideoX 1.0: the size its learned positional embeddings were made for (480 x 720 x 49).
        CogVideoX 1.5 (no learned positions; its config's sample size is the largest it takes): the
        model card's 768 x 1360, within that largest size, and 81 frames."""
        cfg = self.pipe.transformer.config
        scale = self.pipe.vae_scale_factor_spatial
        largest = (cfg.sample_height * scale, cfg.sample_width * scale)
        if cfg.use_learned_positional_embeddings:
            return *largest, cfg.sample_frames
        return min(V15_SIZE[0], largest[0]), min(V15_SIZE[1], largest[1]), cfg.sample_frames

    def token_grid(self, height: int, width: int, num_frames: int) -> TokenGrid:
        cfg = self.pipe.transformer.config
        temporal = self.pipe.vae_scale_factor_temporal
        latent_frames = (num_frames - 1) // temporal + 1
        patch_t = cfg.patch_size_t or 1
        per_token = self.pipe.vae_scale_factor_spatial * cfg.patch_size
        return TokenGrid(
            -(-latent_frames // patch_t), height // per_token, width // per_token, latent_frames, patch_t, temporal
        )

    def check_geometry(self, height: int, width: int, num_frames: int) -> None:
        cfg = self.pipe.transformer.config
        scale = self.pipe.vae_scale_factor_spatial
        if num_frames < 1:
            raise FlexiMMTInputError(f"num_frames={num_frames}: give at least 1 frame")
        multiple = scale * cfg.patch_size
        if height % multiple or width % multiple:
            raise FlexiMMTInputError(f"height x width = {height} x {width}: both must be multiples of {multiple}")
        sample = (cfg.sample_height * scale, cfg.sample_width * scale)
        if cfg.use_learned_positional_embeddings and (height, width) != sample:
            raise FlexiMMTInputError(
                f"height x width = {height} x {width}, but this model has learned positional embeddings for "
                f"{sample[0]} x {sample[1]} only: leave height and width unset or use those"
            )
        if cfg.patch_size_t is not None and (height > sample[0] or width > sample[1]):
            raise FlexiMMTInputError(
                f"height x width = {height} x {width} is larger than this model's rotary grid allows "
                f"({sample[0]} x {sample[1]}): give a smaller size, e.g. {V15_SIZE[0]} x {V15_SIZE[1]}"
            )

    def install_processors(self) -> None:
        """Give every block its FlexiMMT processor (idempotent); another processor found there is replaced
        with a warning, so that motion tokens are never silently left out."""
        for index, block in enumerate(self.pipe.transformer.transformer_blocks):
            current = block.attn1.processor
            if isinstance(current, FlexiMMTAttnProcessor):
                continue
            if index == 0 and type(current).__name__ not in (
                "CogVideoXAttnProcessor2_0",
                "FusedCogVideoXAttnProcessor2_0",
            ):
                logger.warning("replacing the attention processor %s with FlexiMMT's", type(current).__name__)
            block.attn1.set_processor(carry_dispatch(current, FlexiMMTAttnProcessor(index)))

    def prepare_call(self, call: dict[str, Any]) -> dict[str, Any]:
        """diffusers' CogVideoX I2V sets ``num_videos_per_prompt`` to 1 and needs one image per prompt;
        here each prompt and image is repeated instead, so ``num_videos_per_prompt`` videos come out,
        and one image serves every prompt."""
        call = dict(call)
        height, width, frames = self.default_size()
        call["height"], call["width"] = call["height"] or height, call["width"] or width
        call["num_frames"] = call["num_frames"] or frames
        call["max_sequence_length"] = call["max_sequence_length"] or self.default_text_length()
        step = 2 * self.pipe.vae_scale_factor_temporal
        if self.pipe.transformer.config.patch_size_t is None and (call["num_frames"] - 1) % step:
            latent = (call["num_frames"] - 1) // self.pipe.vae_scale_factor_temporal + 1
            factor = self.pipe.vae_scale_factor_temporal
            decoded = factor * latent if latent % 2 == 0 else factor * (latent - 1) + 1
            lower = (call["num_frames"] - 1) // step * step + 1
            logger.warning(
                "num_frames=%d is not %dk+1: CogVideoX's VAE decodes %d frames for it (as in diffusers); "
                "ask for %d or %d frames for an exact count",
                call["num_frames"],
                step,
                decoded,
                lower,
                lower + step,
            )
        per_prompt = call.get("num_videos_per_prompt") or 1
        count = prompt_count(call)
        images = None
        if per_prompt > 1 or count != image_count(call["image"]):
            images = self.batch_images(call, count)
        call = repeat_per_prompt(call)
        if images is not None:
            call["image"] = [img for img in images for _ in range(per_prompt)]
        return call

    def batch_prompts(self, call: dict[str, Any]) -> list[str]:
        return super().batch_prompts({**call, "num_videos_per_prompt": 1})  # prepare_call repeated them

    def batch_rows(self, call: dict[str, Any], videos: int) -> BatchRows:
        """With guidance, one forward of ``[uncond videos | cond videos]``: features from the conditional rows."""
        cfg = call["guidance_scale"] > 1
        return BatchRows(list(range(videos)) * (2 if cfg else 1), [videos + v if cfg else v for v in range(videos)])

    @contextlib.contextmanager
    def attach(self, state: FlexiMMTState, call: dict[str, Any]):
        try:
            yield {**call, "attention_kwargs": {**(call.get("attention_kwargs") or {}), "fleximmt": state}}
        finally:  # diffusers keeps the call's attention_kwargs on the pipeline: the state must not outlive the call
            self.pipe._attention_kwargs = call.get("attention_kwargs")

    # -- training ------------------------------------------------------------------------------
    def encode_conditions(self, clips, caption, text_len, generator):
        pipe = self.pipe
        device = pipe._execution_device
        prompt_embeds, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=text_len, device=device
        )
        scale = pipe.vae.config.scaling_factor
        # the image condition is scaled as the pipeline scales it (CogVideoX 1.5's VAE inverts it)
        image_scale = 1 / scale if getattr(pipe.vae.config, "invert_scale_latents", False) else scale
        patch_t = pipe.transformer.config.patch_size_t
        videos, images = [], []
        for clip in clips:
            clip = clip[None].to(device, pipe.vae.dtype)
            latents = pipe.vae.encode(clip).latent_dist.sample(generator=generator) * scale  # [1, C, F, h, w]
            image = pipe.vae.encode(clip[:, :, :1]).latent_dist.sample(generator=generator) * image_scale
            latents, image = latents.permute(0, 2, 1, 3, 4), image.permute(0, 2, 1, 3, 4)
            padding = image.new_zeros(1, latents.shape[1] - 1, *image.shape[2:])
            image = torch.cat([image, padding], dim=1)
            pad = (patch_t - latents.shape[1] % patch_t) % patch_t if patch_t else 0
            if pad:  # CogVideoX 1.5: whole token frames, padded in front with the first frame as the pipeline does
                latents = torch.cat([latents[:, :1].expand(-1, pad, -1, -1, -1), latents], dim=1)
                image = torch.cat([image[:, :pad], image], dim=1)
            videos.append(latents[0].float().cpu())
            images.append(image[0].float().cpu())
        return {
            "prompt_embeds": prompt_embeds.float().cpu(),
            "video_latents": torch.stack(videos),
            "image_latents": torch.stack(images),
            "padding": torch.tensor(pad),
        }

    def training_prediction(self, state, cond, window, generator, image_dropout, autocast, dtype=None) -> TrainingBatch:
        pipe = self.pipe
        transformer = pipe.transformer
        device = pipe._execution_device
        precision = dtype or torch.float32
        x0 = cond["video_latents"][window : window + 1].to(device, precision)
        image = cond["image_latents"][window : window + 1].to(device, precision)
        if torch.rand((), generator=generator).item() < image_dropout:
            image = torch.zeros_like(image)
        scheduler = pipe.scheduler
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device, precision)
        noisy = scheduler.add_noise(x0, noise, t)  # sqrt(alphabar) x0 + sqrt(1 - alphabar) noise, in x0's precision
        cfg = transformer.config
        height = x0.shape[-2] * pipe.vae_scale_factor_spatial
        width = x0.shape[-1] * pipe.vae_scale_factor_spatial
        rotary = None
        if cfg.use_rotary_positional_embeddings:
            rotary = pipe._prepare_rotary_positional_embeddings(height, width, x0.shape[1], device)
        ofs = None if cfg.ofs_embed_dim is None else x0.new_full((1,), 2.0)
        model_dtype = transformer.dtype
        with autocast():
            velocity = transformer(
                hidden_states=torch.cat([noisy, image], dim=2).to(model_dtype),
                encoder_hidden_states=cond["prompt_embeds"].to(device, model_dtype),
                timestep=t,
                ofs=ofs,
                image_rotary_emb=rotary,
                attention_kwargs={"fleximmt": state},
                return_dict=False,
            )[0].to(precision)
        # v-prediction -> x0: sqrt(alphabar) x_t - sqrt(1 - alphabar) v, which is diffusers' get_velocity(v, x_t)
        x0_hat = scheduler.get_velocity(velocity, noisy, t)
        alpha_bar = scheduler.alphas_cumprod.to(device)[t].float()
        weight = 1.0 / (1.0 - alpha_bar).clamp_min(1e-6)  # w_t = 1 / (1 - alphabar_t)
        # CogVideoX 1.5: the latent frames copied in front to fill a token frame (encode_conditions) are no
        # part of the reference, so the loss leaves them out
        real = slice(int(cond.get("padding", 0)), None)
        return TrainingBatch(x0, x0_hat, weight, real)


class FlexiMMTPipeline(FlexiMMTMixin, CogVideoXImageToVideoPipeline):
    """Multi-object multi-motion image-to-video (FlexiMMT) on diffusers' CogVideoX I2V (5B-I2V, 1.5-5B-I2V)."""

    adapter_class = CogVideoXAdapter
    call_defaults: ClassVar[dict[str, Any]] = {
        "height": None,
        "width": None,
        "num_frames": None,
        "max_sequence_length": None,
    }  # from the model's config
    call_doc = (
        ", except: height, width, num_frames and max_sequence_length default to the model's own config; "
        "``num_videos_per_prompt`` is honoured (diffusers' CogVideoX I2V sets it to 1); one image may serve "
        "a list of prompts."
    )
