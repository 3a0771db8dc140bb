"""LTX-2 image-to-video (diffusers' ``LTX2ImageToVideoPipeline``, Lightricks' 19B audio-video model): FlexiMMT
as docs/method.md#ltx-2 maps it.

Each ``LTX2VideoTransformerBlock`` runs two streams, video and audio. The video stream has self-attention
``attn1`` (3D RoPE), cross-attention ``attn2`` from video queries to the prompt (Gemma 3's hidden states
after the text connectors: the prompt's tokens, then learnable registers where the padding was), and
audio-to-video cross-attention; the audio stream mirrors it and reads the video through
video-to-audio cross-attention. Motion tokens join ``attn2``'s keys and values beside the prompt
(``attention.FORMS`` "cross", as on Wan); only ``m2v`` and ``t2v`` exist; the registers are context,
open to every video query. Video self-attention, the whole audio stream and both audio-video
cross-attentions stay diffusers'. RMPM reads ``attn1``'s outputs (before the block's gate) of the
conditional rows over the first 70% of the blocks, captured in each step's first forward only; CFG
runs both branches in that forward (``[negative | positive]`` rows), spatio-temporal and modality
guidance run forwards of their own on the positive prompt, all with the objects. The first latent
frame is the image, kept clean (per-token timestep 0); it is a frame of the token grid like any other.
diffusers' blocks pass no ``attention_kwargs`` to their processors, so the processors of the transformer
share one slot (``shared.StateSlot``) the adapter fills for the call. Training is flow matching: the velocity error,
i.e. the x0 error weighted by ``1 / sigma^2``, on the generated frames, at noise levels shifted as the
scheduler shifts them for the video's token count.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import LTX2ImageToVideoPipeline
from diffusers.models.transformers.transformer_ltx2 import LTX2PerturbedAttnProcessor
from diffusers.pipelines.ltx2.pipeline_ltx2_image2video import calculate_shift, retrieve_latents

from ..errors import FlexiMMTInputError
from ..method.adapter import ModelAdapter, TokenGrid, TrainingBatch, TrueSize
from ..method.attention import FlexiMMTState
from ..method.masks import CROSS_PARTS, check_cross_parts
from ..method.pipeline import FlexiMMTMixin
from ..method.prompt import find_word_spans
from ..method.rows import BatchRows
from .shared import (
    FEATURE_SHARE,
    SlotAdapter,
    SlotProcessor,
    StateSlot,
    check_frame_count,
    dispatched_attention,
    patched_token_grid,
    sample_sigma,
    slot_of,
    text_path_projector,
)

# The pipeline's components as diffusers' scripts/convert_ltx2_to_diffusers.py assembles LTX-2.0: the transformer
# (TRUE_SIZES below), the video VAE below, the connectors and the vocoder at their classes' defaults (the
# script's 2.0 values: 30 x 128 connectors of 2 layers, 128 registers; the 24 kHz vocoder), the audio VAE at its
# class's defaults (8 latent channels, 64 mel bins: the transformer's 128 audio input channels), and Gemma 3 12B
# (google/gemma-3-12b-it-qat-q4_0-unquantized's config) as text encoder, its SigLIP vision tower included
GEMMA3_12B_TEXT = dict(
    hidden_size=3840,
    intermediate_size=15360,
    num_hidden_layers=48,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    vocab_size=262208,
    sliding_window=1024,
    query_pre_attn_scalar=256,
    max_position_embeddings=131072,
)
GEMMA3_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    vision_use_head=False,
)
LTX2_VAE = dict(
    latent_channels=128,
    block_out_channels=(256, 512, 1024, 2048),
    decoder_block_out_channels=(256, 512, 1024),
    layers_per_block=(4, 6, 6, 2, 2),
    decoder_layers_per_block=(5, 5, 5, 5),
    spatio_temporal_scaling=(True, True, True, True),
    decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2),
    timestep_conditioning=False,
    patch_size=4,
    patch_size_t=1,
    encoder_causal=True,
    decoder_causal=False,
    spatial_compression_ratio=32,
    temporal_compression_ratio=8,
)

DEFAULT_MODEL = "Lightricks/LTX-2"
# diffusers' frame count when a call gives none and the pipeline has no duration head (LTX-2.0 / 2.3):
# set in LTX2ImageToVideoPipeline.__call__'s body, not in its signature
FRAMES_WITHOUT_DURATION_HEAD = 121
SIZE_MULTIPLE = 32  # diffusers' check_inputs refuses other heights and widths, whatever the VAE
# diffusers' calculate_shift defaults when the scheduler's config has none (the pipeline's step 5)
SHIFT_DEFAULTS = {"base_image_seq_len": 1024, "max_image_seq_len": 4096, "base_shift": 0.95, "max_shift": 2.05}
FPS = inspect.signature(LTX2ImageToVideoPipeline.__call__).parameters["frame_rate"].default  # diffusers': 24
AUDIO_PER_SECOND = 16000 / 160 / 4  # the audio VAE's latents a second: 16 kHz, hop 160, 4x temporal compression
STG_BLOCK = 28  # the pipeline's default spatio_temporal_guidance_blocks=[28]
TRUE_SIZES = {
    # Lightricks/LTX-2 (19B): the 2.0 transformer config diffusers' scripts/convert_ltx2_to_diffusers.py writes (it
    # equals LTX2VideoTransformer3DModel's defaults: 48 blocks, video 32 heads x 128, audio 32 x 64, cross-attention
    # 4096 / 2048, Gemma 3's 3,840-wide captions, interleaved RoPE) at LTX2ImageToVideoPipeline's defaults (121
    # frames: its default without a duration head); AutoencoderKLLTX2Video (LTX-2.0's) compresses 32x and 8x;
    # max_sequence_length's 1,024 text tokens (the prompt, then the connectors' registers: every key attended)
    "ltx2": TrueSize(
        "LTX-2 (19B) I2V",
        dict(
            in_channels=128,
            out_channels=128,
            num_attention_heads=32,
            attention_head_dim=128,
            cross_attention_dim=4096,
            audio_in_channels=128,
            audio_out_channels=128,
            audio_num_attention_heads=32,
            audio_attention_head_dim=64,
            audio_cross_attention_dim=2048,
            num_layers=48,
            caption_channels=3840,
        ),
        (512, 768, FRAMES_WITHOUT_DURATION_HEAD),
        (32, 8),
        {"prompt": 1024},
        dict(
            num_attention_heads=2,
            attention_head_dim=32,
            cross_attention_dim=64,
            audio_num_attention_heads=2,
            audio_attention_head_dim=16,
            audio_cross_attention_dim=32,
            audio_in_channels=4,
            audio_out_channels=4,
            caption_channels=48,
            num_layers=3,
        ),
        {"prompt": 64},
        components={
            "vae": LTX2_VAE,
            "audio_vae": {},
            "vocoder": {},
            "text_encoder": {
                "text_config": GEMMA3_12B_TEXT,
                "vision_config": GEMMA3_VISION,
                "mm_tokens_per_image": 256,
            },
            "connectors": {},
        },
    )
}


@dataclass
class LTX2Slot(StateSlot):
    """The slot of LTX-2's processors, with each block's motion keys and values of the call's state."""

    # (block, video) -> the motion tokens' keys and values through that block's attn2 for the state ``motion_for``:
    # made at its first forward and reused by the others (without gradients neither changes within a call)
    motion: dict = field(default_factory=dict)
    motion_for: FlexiMMTState | None = None


class LTX2SelfAttnProcessor(SlotProcessor):
    """The video stream's ``attn1`` exactly as diffusers computes it (spatio-temporal guidance's perturbation
    included, when the blocks have one); its output (after ``to_out``, before the block's gate) is handed to
    RMPM's feature capture. ``LTX2Attention`` passes a processor only the arguments its ``__call__`` names:
    these are the perturbed processor's."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        query_rotary_emb=None,
        key_rotary_emb=None,
        perturbation_mask=None,
        all_perturbed=None,
    ):
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)
        if isinstance(self.inner, LTX2PerturbedAttnProcessor):
            out = self.inner(*args, perturbation_mask=perturbation_mask, all_perturbed=all_perturbed)
        else:
            out = self.inner(*args)
        state = self.slot.state
        if state is not None:
            state.observe(self.block, out)
        return out


class LTX2CrossAttnProcessor(SlotProcessor):
    """The video stream's ``attn2`` with motion tokens beside the prompt and MDMA over video queries x
    [prompt | motion]; LTX-2.3's per-head gates as diffusers applies them. Without a state, or with no
    objects, it is diffusers' processor (``self.inner``: LTX-2.0's ``LTX2AudioVideoAttnProcessor``, or LTX-2.3's
    ``LTX2PerturbedAttnProcessor``). The text's attention mask is not read: diffusers' connectors open
    every text key (the registers in the padding's place, or the padding itself), and the pipeline's
    forwards are checked to say so (``LTX2Adapter.attach``)."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        query_rotary_emb=None,
        key_rotary_emb=None,
    ):
        state = self.slot.state
        if state is None or state.num_objects == 0 or encoder_hidden_states is None:
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, key_rotary_emb
            )
        if self._parallel_config is not None:
            raise FlexiMMTInputError(
                "context parallelism (transformer.enable_parallelism) does not run with objects on LTX-2: "
                "diffusers' plan for it splits the prompt's tokens between processes too, and FlexiMMT's groups "
                "read text keys by position; call without objects, or without enable_parallelism"
            )
        attend = dispatched_attention(self, state)
        query = attn.norm_q(attn.to_q(hidden_states))
        key, value = attn.norm_k(attn.to_k(encoder_hidden_states)), attn.to_v(encoder_hidden_states)
        heads = lambda x: x.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        query, key, value = heads(query), heads(key), heads(value)
        project = text_path_projector(attn, query)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            out = state.cross_attention(self.block, 0, query, key, value, project, attend)
        else:  # each block projects the motion tokens once per call, not in every forward (BENCHMARKS.md: 1.3%)
            if self.slot.motion_for is not state:
                self.slot.motion.clear()
                self.slot.motion_for = state
            motion = self.slot.motion

            def motion_of(video: int):
                if (self.block_index, video) not in motion:
                    motion[self.block_index, video] = state.motion_projections(video, self.block, 0, project)
                return motion[self.block_index, video]

            out = state.cross_with(self.block, query, key, value, motion_of, attend)
        out = out.transpose(1, 2)  # [B, N, H, d]
        if attn.to_gate_logits is not None:  # LTX-2.3: a gate per head, from the block's own input
            out = out * (2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))).unsqueeze(-1)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def token_shift(num_video_tokens: int, config=None) -> float:
    """``mu`` of LTX's dynamic shift for a video of ``num_video_tokens`` tokens (diffusers' ``calculate_shift``), from
    a scheduler config's settings, :data:`SHIFT_DEFAULTS` where it has none (ComfyUI's *LTXVScheduler* defaults to
    the same 0.95 to 2.05 over 1,024 to 4,096 tokens)."""
    config = config or {}
    return calculate_shift(num_video_tokens, *(config.get(name) or default for name, default in SHIFT_DEFAULTS.items()))


def check_open_text(mask: torch.Tensor | None) -> None:
    """Refuse a forward whose text attention mask closes keys: FlexiMMT's ``attn2`` reads every key, as
    diffusers' own pipeline does (its connectors return an all-open mask)."""
    if mask is not None and mask.ndim == 2 and not bool(mask.bool().all()):
        raise FlexiMMTInputError(
            "an encoder_attention_mask with closed text keys reached LTX-2's transformer with objects: "
            "FlexiMMT attends every text key, as diffusers' LTX-2 pipeline does after its text connectors; "
            "pass the connectors' mask (all ones), or call without objects"
        )


class LTX2Adapter(SlotAdapter, ModelAdapter):
    family = "ltx2"
    pipeline_class = LTX2ImageToVideoPipeline
    form = "cross"
    parts = CROSS_PARTS
    feature_share = FEATURE_SHARE
    default_model = DEFAULT_MODEL
    stated_defaults: ClassVar[dict[str, Any]] = {"num_frames": FRAMES_WITHOUT_DURATION_HEAD}
    motion_attention = "attn2"
    true_sizes = TRUE_SIZES

    @classmethod
    def random_conditions(cls, config, latent, text, generator):
        """One reference window as :meth:`encode_conditions` returns it, random: the connectors' video and audio
        text with their all-open mask, the video's latents ``[1, C, F, h, w]``."""
        return {
            "prompt_embeds": torch.randn(1, text["prompt"], config.caption_channels, generator=generator),
            "audio_prompt_embeds": torch.randn(1, text["prompt"], config.caption_channels, generator=generator),
            "prompt_mask": torch.ones(1, text["prompt"], dtype=torch.long),
            "video_latents": torch.randn(1, config.in_channels, *latent, generator=generator),
        }

    @classmethod
    def random_forwards(cls, config, size, latent, text, guidance, generator, device="cpu", dtype=torch.float32):
        """With guidance (the pipeline's default), CFG's forward of rows ``[negative | positive]``, then
        spatio-temporal guidance's (block 28, or a smaller model's last) and modality guidance's forwards of the
        positive prompt; without, the positive prompt's forward. Packed latents with a timestep per video token
        (the image's frame at 0), the audio stream's latents for the video's length, the connectors' all-open
        text masks."""
        cond = cls.random_conditions(config, latent, text, generator)
        frames, height, width = latent
        n, audio = frames * height * width, round(size[2] / FPS * AUDIO_PER_SECOND)
        hidden = cond["video_latents"].permute(0, 2, 3, 4, 1).reshape(1, n, -1).to(device, dtype)  # _pack_latents
        clean = torch.zeros(1, n, device=device)  # 1 on the image's frame: a timestep of 0 there
        clean[:, : height * width] = 1.0
        audio_latents = torch.randn(1, audio, config.audio_in_channels, generator=generator).to(device, dtype)
        video_text, audio_text = (
            torch.cat([torch.randn(cond[name].shape, generator=generator), cond[name]]).to(device, dtype)
            for name in ("prompt_embeds", "audio_prompt_embeds")
        )  # [negative, positive]
        text_mask = torch.ones(2, text["prompt"], device=device)
        stg_blocks = [min(STG_BLOCK, config.num_layers - 1)]

        def forward(rows: slice, t: float, **guided) -> dict[str, Any]:
            batch = len(range(2)[rows])
            timestep = torch.full((batch,), t, device=device)
            return dict(
                hidden_states=hidden.expand(batch, -1, -1),
                audio_hidden_states=audio_latents.expand(batch, -1, -1),
                encoder_hidden_states=video_text[rows],
                audio_encoder_hidden_states=audio_text[rows],
                timestep=timestep[:, None] * (1 - clean),
                audio_timestep=timestep,
                sigma=timestep,
                encoder_attention_mask=text_mask[rows],
                audio_encoder_attention_mask=text_mask[rows],
                num_frames=frames,
                height=height,
                width=width,
                fps=FPS,
                audio_num_frames=audio,
                **guided,
            )

        def forwards(timestep: float) -> list[tuple[str, dict[str, Any]]]:
            if not guidance:
                return [("cond", forward(slice(1, 2), timestep))]
            return [
                ("cond_uncond", forward(slice(None), timestep)),
                ("uncond_stg", forward(slice(1, 2), timestep, spatio_temporal_guidance_blocks=stg_blocks)),
                ("uncond_modality", forward(slice(1, 2), timestep, isolate_modalities=True)),
            ]

        return forwards

    @classmethod
    def pipeline_around(cls, transformer: torch.nn.Module):
        """diffusers' pipeline of this family around ``transformer`` with the checkpoint's scheduler, no encoders,
        video VAE or vocoder (its compression ratios are then the real VAE's: 32 and 8), and a tiny audio VAE of
        the shape the transformer takes (a training step reads its config for the silent audio; a step never
        calls it)."""
        from diffusers import AutoencoderKLLTX2Audio, FlowMatchEulerDiscreteScheduler

        channels = transformer.config.audio_in_channels
        mel_bins = 64 if channels >= 64 else 8  # latent channels x mel bins / 4 = the audio input channels
        audio_vae = AutoencoderKLLTX2Audio(base_channels=4, latent_channels=channels * 4 // mel_bins, mel_bins=mel_bins)
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **SHIFT_DEFAULTS)
        return LTX2ImageToVideoPipeline(
            scheduler=scheduler,
            vae=None,
            audio_vae=audio_vae.to(transformer.device),
            text_encoder=None,
            tokenizer=None,
            connectors=None,
            transformer=transformer,
            vocoder=None,
        )

    def default_text_length(self) -> int:
        return self.diffusers_default("max_sequence_length")  # 1,024 Gemma tokens: prompt, then registers

    def diffusers_default(self, name: str) -> Any:
        return inspect.signature(LTX2ImageToVideoPipeline.__call__).parameters[name].default

    def default_size(self) -> tuple[int, int, int]:
        height, width = self.diffusers_default("height"), self.diffusers_default("width")
        return height, width, FRAMES_WITHOUT_DURATION_HEAD

    def call_size(self, call: dict[str, Any]) -> tuple[int, int, int]:
        """The call's height, width and frames; with 5-D ``latents`` (a second stage), theirs, as the
        pipeline reads them. Without ``num_frames`` the pipeline makes 121 frames, or, with a duration head
        (LTX-2.5), as many as it predicts from the encoded prompt - unknown before the call: refused."""
        pipe = self.pipe
        latents = call.get("latents")
        if latents is not None and latents.ndim == 5:
            _, _, frames, height, width = latents.shape
            spatial = pipe.vae_spatial_compression_ratio
            return height * spatial, width * spatial, (frames - 1) * pipe.vae_temporal_compression_ratio + 1
        num_frames = call.get("num_frames")
        if num_frames is None:
            if getattr(pipe, "duration_head", None) is not None:
                raise FlexiMMTInputError(
                    "num_frames=None: this LTX-2 pipeline predicts the video's length from the encoded prompt "
                    "(its duration_head), which objects need before the call; give num_frames "
                    f"({pipe.vae_temporal_compression_ratio}k+1, e.g. {FRAMES_WITHOUT_DURATION_HEAD})"
                )
            num_frames = FRAMES_WITHOUT_DURATION_HEAD
        return call["height"], call["width"], num_frames

    def token_grid(self, height: int, width: int, num_frames: int) -> TokenGrid:
        pipe, cfg = self.pipe, self.pipe.transformer.config
        return patched_token_grid(
            height,
            width,
            num_frames,
            pipe.vae_spatial_compression_ratio,
            pipe.vae_temporal_compression_ratio,
            cfg.patch_size,
            cfg.patch_size_t,
        )

    def video_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The step callback's packed tokens ``[B, N, C x patches]`` as diffusers unpacks them after the loop:
        ``[B, C, F, h, w]``, still normalised (the space the pipeline denoises in)."""
        grid = self.token_grid(height, width, 1)
        frames = latents.shape[1] // (grid.height * grid.width)
        cfg = self.pipe.transformer.config
        return self.pipe._unpack_latents(latents, frames, grid.height, grid.width, cfg.patch_size, cfg.patch_size_t)

    def check_geometry(self, height: int, width: int, num_frames: int) -> None:
        check_frame_count(
            num_frames, self.pipe.vae_temporal_compression_ratio, "LTX-2", "its VAE would decode another count"
        )
        multiple = max(SIZE_MULTIPLE, self.pipe.vae_spatial_compression_ratio * self.pipe.transformer.config.patch_size)
        if height % multiple or width % multiple:
            fit = lambda n: max(multiple, n // multiple * multiple)
            raise FlexiMMTInputError(
                f"height x width = {height} x {width}: LTX-2 needs multiples of {multiple}; use {fit(height)} x "
                f"{fit(width)}"
            )

    @classmethod
    def check_settings(cls, parts: frozenset[str], context_text: str) -> None:
        try:
            check_cross_parts(parts, context_text)
        except ValueError as err:
            raise FlexiMMTInputError(f"{err} (LTX-2)") from None

    def prompt_text(self, prompt: str) -> str:
        return prompt.strip()  # the pipeline strips each prompt before tokenising it

    def registers(self) -> bool:
        """Whether the video connector puts learnable registers where the padding was (Lightricks/LTX-2: 128)."""
        return self.pipe.connectors.video_connector.learnable_registers is not None

    def word_spans(self, prompt: str, phrases, text_len: int) -> list[list[int]]:
        """Motion words among the ``text_len`` text keys ``attn2`` reads. The pipeline pads Gemma's tokens on
        the left (``<bos>`` first, no chat template); the connectors then move the prompt's tokens to the
        front and put registers after them, so a word's key is its index in the unpadded tokens. Without
        registers the padding stays in front, and so do the indices."""
        tokenizer, text = self.pipe.tokenizer, self.prompt_text(prompt)
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # as the pipeline sets it before tokenising
        try:
            spans = find_word_spans(tokenizer, text, phrases, text_len)
        finally:
            tokenizer.padding_side = side
        if not self.registers():
            return spans
        valid = min(len(tokenizer(text, add_special_tokens=True).input_ids), text_len)
        return [[index - (text_len - valid) for index in span] for span in spans]

    def batch_prompts(self, call: dict[str, Any]) -> list[str]:
        if call.get("enable_prompt_enhancement"):
            raise FlexiMMTInputError(
                "enable_prompt_enhancement=True: the pipeline would rewrite the prompt, and the objects' motion "
                "words are found in the prompt as given; enhance the prompt first (pipe.enhance_prompt), then "
                "call with the text it returns and each object's words from it"
            )
        return super().batch_prompts(call)

    # -- inference plumbing ----------------------------------------------------------------
    def install_processors(self) -> None:
        transformer = self.pipe.transformer
        if slot_of(transformer) is not None:
            return
        slot = LTX2Slot()
        for index, block in enumerate(transformer.transformer_blocks):
            block.attn1.set_processor(LTX2SelfAttnProcessor(index, slot, block.attn1.processor))
            block.attn2.set_processor(LTX2CrossAttnProcessor(index, slot, block.attn2.processor))

    def batch_rows(self, call: dict[str, Any], videos: int) -> BatchRows:
        """Each step's first forward holds the conditional rows - ``[negative | positive]`` with CFG, the
        positive alone without - and RMPM's features come from its positive rows; spatio-temporal and modality
        guidance run later forwards of the step on the positive rows alone (objects on, no features)."""
        cfg = call["guidance_scale"] > 1
        rows = list(range(videos)) * (2 if cfg else 1)
        return BatchRows(rows, [videos + v if cfg else v for v in range(videos)], first_forward_only=True)

    def before_forward(self, state: FlexiMMTState, slot, transformer, args: tuple, kwargs: dict) -> None:
        """Every forward's text mask is checked to be open (:func:`check_open_text`), then as ``SlotAdapter``."""
        check_open_text(kwargs.get("encoder_attention_mask"))
        super().before_forward(state, slot, transformer, args, kwargs)

    @contextlib.contextmanager
    def attach(self, state: FlexiMMTState, call: dict[str, Any]):
        """Fill the transformer's slot for the call (``SlotAdapter``); the motion tokens' projections go with it."""
        slot = slot_of(self.pipe.transformer)
        try:
            with super().attach(state, call) as call:
                yield call
        finally:
            slot.motion_for = None
            slot.motion.clear()  # the projections' memory goes with the call

    # -- training ------------------------------------------------------------------------------
    def conditioning_modules(self) -> list[str]:
        return [*super().conditioning_modules(), "connectors"]

    def encode_conditions(self, clips, caption, text_len, generator):
        """The caption through Gemma and the connectors (both streams' text, as the pipeline makes it), and
        each window's latents, normalised as the pipeline's latents are, their first frame the image latents
        exactly as the pipeline encodes the conditioning image."""
        pipe = self.pipe
        device = pipe._execution_device
        embeds, mask, _, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=text_len, device=device
        )
        video_text, audio_text, text_mask = pipe.connectors(embeds, mask, padding_side=pipe.tokenizer.padding_side)
        vae, cfg = pipe.vae, pipe.vae.config
        videos = []
        for clip in clips:
            clip = clip[None].to(device, vae.dtype)  # [1, 3, T, H, W]
            latents = retrieve_latents(vae.encode(clip), generator).float()
            image = retrieve_latents(vae.encode(clip[:, :, :1]), generator, "argmax").float()
            latents = pipe._normalize_latents(latents, vae.latents_mean, vae.latents_std, cfg.scaling_factor)
            latents[:, :, :1] = pipe._normalize_latents(image, vae.latents_mean, vae.latents_std)
            videos.append(latents[0].cpu())
        return {
            "prompt_embeds": video_text.float().cpu(),
            "audio_prompt_embeds": audio_text.float().cpu(),
            "prompt_mask": text_mask.cpu(),
            "video_latents": torch.stack(videos),  # [W, C, F, h, w]
        }

    # LTX's shift of the noise levels by a video's token count, for whoever samples them as the adapter does
    # (ComfyUI's native training reaches it through the registered adapter)
    token_shift = staticmethod(token_shift)

    def training_sigma(self, generator: torch.Generator, num_video_tokens: int) -> float:
        """A training noise level (``shared.sample_sigma``), shifted by ``mu`` of the video's token count where
        the scheduler shifts dynamically (LTX); the schedule's terminal stretch, ``shift_terminal``, is a
        property of a whole schedule and not applied."""
        cfg = self.pipe.scheduler.config
        mu = token_shift(num_video_tokens, cfg) if cfg.get("use_dynamic_shifting") else None
        return sample_sigma(self.pipe.scheduler, generator, mu)

    def training_prediction(self, state, cond, window, generator, image_dropout, autocast, dtype=None) -> TrainingBatch:
        """One window noised at a training noise level, its first latent frame kept clean with timestep 0 as
        the pipeline keeps the image (or, with ``image_dropout``'s probability, noised like the rest: LTX-2's
        own text-to-video mode). The reference has no sound: the audio stream gets pure noise at noise level
        1, as at the start of a generation, and its prediction is not part of the loss."""
        pipe = self.pipe
        device = pipe._execution_device
        transformer = pipe.transformer
        self.attached_slot(transformer, state)
        precision = dtype or torch.float32  # of the latents, noise and prediction outside the transformer
        x0 = cond["video_latents"][window : window + 1].to(device, precision)  # [1, C, F, h, w]
        _, _, frames, height, width = x0.shape
        patch, patch_t = transformer.config.patch_size, transformer.config.patch_size_t
        image_given = torch.rand((), generator=generator).item() >= image_dropout
        clean = torch.zeros_like(x0[:, :1])  # 1 where the frame is given, as the pipeline's conditioning mask
        if image_given:
            clean[:, :, 0] = 1.0
        sigma = max(self.training_sigma(generator, frames * height * width // (patch * patch * patch_t)), 1e-3)
        noise = torch.randn(x0.shape, generator=generator).to(device, precision)
        noise_level = sigma * (1 - clean)  # per frame: 0 on the image's frame
        noisy = (1 - noise_level) * x0 + noise_level * noise
        num_train = pipe.scheduler.config.num_train_timesteps
        t = torch.tensor([sigma * num_train], device=device)
        token_clean = pipe._pack_latents(clean, patch, patch_t).squeeze(-1)  # [1, N]
        frame_rate = self.diffusers_default("frame_rate")
        seconds = ((frames - 1) * pipe.vae_temporal_compression_ratio + 1) / frame_rate
        audio_frames = round(
            seconds * pipe.audio_sampling_rate / pipe.audio_hop_length / pipe.audio_vae_temporal_compression_ratio
        )
        audio_cfg = pipe.audio_vae.config
        audio_shape = (
            1,
            audio_cfg.latent_channels,
            audio_frames,
            audio_cfg.mel_bins // pipe.audio_vae_mel_compression_ratio,
        )
        audio = pipe._pack_audio_latents(torch.randn(audio_shape, generator=generator).to(device))
        silent = torch.tensor([float(num_train)], device=device)  # the audio's noise level 1, as a timestep
        model_dtype = transformer.dtype
        with autocast():
            velocity, _ = transformer(
                hidden_states=pipe._pack_latents(noisy, patch, patch_t).to(model_dtype),
                audio_hidden_states=audio.to(model_dtype),
                encoder_hidden_states=cond["prompt_embeds"].to(device, model_dtype),
                audio_encoder_hidden_states=cond["audio_prompt_embeds"].to(device, model_dtype),
                timestep=t[:, None] * (1 - token_clean),
                audio_timestep=silent,
                sigma=t,
                audio_sigma=silent,
                encoder_attention_mask=cond["prompt_mask"].to(device),
                audio_encoder_attention_mask=cond["prompt_mask"].to(device),
                num_frames=frames // patch_t,
                height=height // patch,
                width=width // patch,
                fps=frame_rate,
                audio_num_frames=audio_frames,
                return_dict=False,
            )
        velocity = pipe._unpack_latents(
            velocity.to(precision), frames // patch_t, height // patch, width // patch, patch, patch_t
        )
        x0_hat = noisy - noise_level * velocity  # flow matching: v = noise - x0
        weight = torch.tensor(1.0 / sigma**2, device=device)  # the velocity error as an x0 error
        frames_scored = slice(1, None) if image_given else slice(None)  # the image's frame is given, not predicted
        return TrainingBatch(x0.transpose(1, 2), x0_hat.transpose(1, 2), weight, frames_scored)


class FlexiMMTLTX2ImageToVideoPipeline(FlexiMMTMixin, LTX2ImageToVideoPipeline):
    """Multi-object multi-motion image-to-video (FlexiMMT) on diffusers' LTX-2 I2V (video and audio)."""

    adapter_class = LTX2Adapter
    call_doc = (
        ", with its defaults. With objects, ``num_frames`` must be 8k+1 (121 when None, unless the pipeline "
        "predicts the length: then give it), height and width multiples of 32, prompt enhancement off; "
        "every guidance (CFG, spatio-temporal, modality) runs with the objects, and the audio is made as "
        "diffusers makes it."
    )


ADAPTER = LTX2Adapter
