"""LTX-2 (2.0 and 2.3) as the native patch sees ComfyUI 0.33's ``LTXAVModel`` (``comfy/ldm/lightricks/av_model.py``),
mapped as fleximmt's adapter maps diffusers' (docs/method.md#ltx-2).

Each audio-video block makes its attention calls in one order, each only when the call's options run it:
the video self-attention ``attn1`` (run as ComfyUI runs it; the module lends RMPM its output, after
``to_out`` and LTX-2.3's per-head gate, before the block's gate), the video text attention ``attn2``,
which becomes MDMA over ``[text | motion tokens]`` (the motion tokens through that block's own ``to_k``,
``k_norm`` over the whole inner width, and ``to_v``, unmodulated as in the library: LTX-2.3 modulates the
text before ``attn2``, ComfyUI and diffusers alike, and gates its output after), then the audio stream's
self and text attentions and the two audio-video cross-attentions. The audio stream is left untouched, as the library's adapter leaves it: its calls and
both audio-video cross-attentions are ComfyUI's own, so the audio hears the objects' motion only through
the video it attends to. A spatio-temporal guidance pass (``stg_self_attn_blocks``: those blocks'
``attn1`` makes no call) and a modality guidance pass (audio-video attention severed) run with the
objects and lend RMPM no features, as the library's extra guidance forwards do. Each block is named by
a ``double_block`` replacement.

ComfyUI's LTX-2 text is the Gemma tokens without their padding (its encoder crops the left padding),
then the connector's learnable registers up to 1,024 tokens, every key open: a motion word's key is its
index in ``[<bos> | prompt]``, found by its characters in the prompt (Gemma's sentencepiece keeps a
word's leading space inside its piece, so " jumps" mid-sentence is not "jumps" alone).

*Learn Motion (native)* trains as the library's adapter does (``LTX2Adapter.training_prediction``): the
image is the first latent frame, kept clean at timestep 0 and out of the loss (as *LTXVImgToVideoInplace*
puts it); the reference has no sound, so the audio latent is pure noise at noise level 1; the noise level is
shifted by the video's token count (the LTX-2 adapter's ``token_shift``, as *LTXVScheduler* shifts); the frame rate is
the library's (24). ComfyUI's call carries the two streams' timesteps as its sampler does, denoise masks times
sigma. ComfyUI's blocks then modulate the audio-video cross-attentions by each stream's own timesteps and gate
them by the other stream's (the largest), where diffusers' ``use_cross_timestep=False`` (the library's
training) takes both from each stream's own and ``True`` (its I2V pipeline's sampling) both from the other's:
with the audio at level 1 and the video at sigma, the audio-to-video gate differs from the library's (and, as in
sampling, the video-to-audio attention's order: tests/comfy_ltx2.py).
"""

from __future__ import annotations

import bisect
import contextlib
import importlib

import torch

from ....errors import FlexiMMTInputError
from ....method.adapter import TokenGrid
from ....method.prompt import find_word_spans
from ....method.tokens import TextKeys
from .family import CrossFamily, clip_tokens, inner_tokenizer
from .patch import Call, Run

GEMMA = "gemma3_12b"  # the Gemma tokenizer's key in ComfyUI's LTX-2 tokens
CONNECTOR_LENGTH = 1024  # ComfyUI's text connector fills the text with registers up to this many tokens
VIDEO_CALLS, AUDIO_CALLS = ("self", "text"), ("audio_self", "audio_text")


class PieceOffsets:
    """A sentencepiece model (ComfyUI's ``SPieceTokenizer`` for Gemma) tokenising as the text reaches LTX-2's
    blocks - ``<bos>``, the prompt's pieces, then padding where the registers are - with each piece's
    characters, in the form ``prompt.find_word_spans`` reads from a "fast" tokenizer."""

    is_fast = True

    def __init__(self, processor, bos: int) -> None:
        self.processor, self.bos = processor, bos

    def ids(self, text: str) -> list[int]:
        return [self.bos, *self.processor.encode(text, add_bos=False, add_eos=False)]

    def offsets(self, text: str, ids: list[int]) -> list[tuple[int, int]] | None:
        """Each piece's (start, end) characters in ``text``; None where the pieces do not spell ``text``
        byte for byte (a normalising model)."""
        processor = self.processor
        starts = [0]
        for char in text:
            starts.append(starts[-1] + len(char.encode()))
        spans, at, spelled = [], 0, b""
        for i in ids:
            piece = processor.id_to_piece(i)
            raw = bytes([int(piece[3:5], 16)]) if processor.is_byte(i) else piece.replace("\u2581", " ").encode()
            begin, at, spelled = at, at + len(raw), spelled + raw
            spans.append((bisect.bisect_right(starts, begin) - 1, bisect.bisect_left(starts, at)))
        return spans if spelled == text.encode() else None

    def __call__(self, text: str, max_length: int | None = None, padding=None, truncation=False, **_) -> dict:
        ids = self.ids(text)
        offsets = [(0, 0), *(self.offsets(text, ids[1:]) or [])]
        special = [1] + [0] * (len(ids) - 1)
        if padding == "max_length" and max_length is not None:
            pad = max(0, max_length - len(ids))
            ids, offsets, special = ids + [0] * pad, offsets + [(0, 0)] * pad, special + [1] * pad
        if truncation and max_length is not None:
            ids, offsets, special = ids[:max_length], offsets[:max_length], special[:max_length]
        return {"input_ids": ids, "offset_mapping": offsets, "special_tokens_mask": special}


class LTX2(CrossFamily):
    name = "LTX-2"
    family = "ltx2"
    module, model_class = "comfy.ldm.lightricks.av_model", "LTXAVModel"
    clip_name = "Gemma 3"
    tokens_key = GEMMA
    registers: int | None = 128  # ComfyUI's connector default; read from the model in check

    @classmethod
    def matches(cls, diffusion_model) -> bool:
        """Every LTX model of ComfyUI's (LTX-Video too): :meth:`check` names the variants FlexiMMT does not run."""
        try:
            lightricks = importlib.import_module("comfy.ldm.lightricks.model")
        except ImportError:
            return False
        base = getattr(lightricks, "LTXBaseModel", None)  # ComfyUI 0.3.64 has LTX-Video only, without this base
        return base is not None and isinstance(diffusion_model, base)

    def check(self, model) -> None:
        """Refuse LTX-Video; read how many registers the text connector has."""
        if not super().matches(model):
            raise FlexiMMTInputError(
                f"this is an LTX-Video model ({type(model).__name__}, video only): FlexiMMT Apply patches LTX-2 "
                "(audio-video, LTXAVModel); load LTX-2 weights with Load Diffusion Model"
            )
        connector = getattr(model, "video_embeddings_connector", None)
        self.registers = getattr(connector, "num_learnable_registers", None) or None

    # -- learning (native/training.py), as the library's adapter trains (models/ltx2.py: training_prediction) --
    mutated_streams = ("x",)  # each block's (video, audio) streams: vx.addcmul_(...) after rms_norm(vx) kept vx
    image_frame = True  # the image is the first latent frame, as LTXVImgToVideoInplace puts it

    @property
    def learn_frames(self) -> int:
        return self.adapter.default_size()[2]  # the library's window: 121 frames

    def frame_rate(self) -> float:
        """The frame rate LTX-2 learns at: the library's (diffusers' default, 24), whose audio length and video
        positions it sets."""
        return float(self.adapter.diffusers_default("frame_rate"))

    def image_conditioning(self, vae, image, length: int) -> dict:
        return {}  # no condition beside the latent: the image is its first frame (reference_latent)

    def reference_latent(self, vae, image, latent):
        """The first latent frame the first frame's own encoding, as *LTXVImgToVideoInplace* puts the image in the
        video latent (and the library encodes the image apart)."""
        latent = latent.clone()
        first = vae.encode(image[:1, ..., :3])
        latent[:, :, : first.shape[2]] = first
        return latent

    def training_shift(self, tokens: int) -> float:
        """LTX's shift by the video's token count, as the library's adapter and ComfyUI's *LTXVScheduler* shift."""
        return self.adapter.token_shift(tokens)

    def training_constants(self) -> dict:
        return {"frame_rate": self.frame_rate()}

    def training_inputs(self, model, x, sigma, image, frames, generator):
        """The reference has no sound: the audio latent is pure noise at noise level 1 (drawn after the video's
        noise, as large as ComfyUI's *LTXV Empty Latent Audio* makes it for the video's length), packed behind the
        video as ComfyUI's sampler packs them. ComfyUI's per-token timesteps are its denoise masks times sigma: the
        video's 1 (0 on the clean image frame, as *LTXVImgToVideoInplace*'s mask), the audio's ``1 / sigma``."""
        import comfy.utils

        p = model.a_patchifier
        length = round(frames / self.frame_rate() * p.sample_rate / p.hop_length / p.audio_latent_downsample_factor)
        audio = torch.randn((1, model.num_audio_channels, length, model.audio_frequency_bins), generator=generator)
        packed, shapes = comfy.utils.pack_latents([x, audio.to(x.device, x.dtype)])
        video_mask = torch.ones(1, 1, *x.shape[2:], device=x.device)
        if image:
            video_mask[:, :, 0] = 0
        audio_mask = torch.full((1, 1, length, 1), 1 / sigma, device=x.device)
        return packed, {"denoise_mask": video_mask, "audio_denoise_mask": audio_mask, "latent_shapes": shapes}

    def training_output(self, out, x):
        return out.flatten(1)[:, : x[0].numel()].view(x.shape)  # [video | audio], flat (comfy.utils.pack_latents)

    def blocks(self, model):
        return model.transformer_blocks

    def motion_shape(self, model) -> tuple[int, int]:
        return len(model.transformer_blocks), model.cross_attention_dim

    def patch_size(self, model) -> tuple[int, int, int]:
        return tuple(model.patchifier.patch_size)

    def grid(self, model, x: torch.Tensor) -> TokenGrid:
        grid = super().grid(model, x)
        return TokenGrid(
            grid.frames, grid.height, grid.width, grid.latent_frames, grid.patch_frames, model.vae_scale_factors[0]
        )

    def read_call(self, model, arguments: dict) -> Call:
        """The video latent of ``x`` (``[video, audio]`` or the video alone); a float mask is ComfyUI's additive
        one (0 open), an integer mask 1 where open."""
        x, context, mask = arguments["x"], arguments["context"], arguments.get("attention_mask")
        video = x[0] if isinstance(x, (list, tuple)) else x
        extra = arguments.get("kwargs") or {}
        keyframes = arguments.get("keyframe_idxs")
        if (keyframes is not None and keyframes.shape[2] > 0) or extra.get("guide_attention_entries"):
            raise FlexiMMTInputError(
                "FlexiMMT Apply: this graph appends guide or keyframe tokens to the LTX-2 video (LTXV Add Guide, "
                "keyframes, IC-LoRA references), which FlexiMMT's masks do not cover; remove that conditioning or "
                "the FlexiMMT patch"
            )
        if mask is not None and bool((mask != 0 if torch.is_floating_point(mask) else mask == 0).any()):
            raise FlexiMMTInputError(
                "FlexiMMT Apply: the LTX-2 text's attention mask closes text keys; FlexiMMT attends every text key, "
                "as ComfyUI's LTX-2 text connector leaves them (its registers in the padding's place)"
            )
        options = arguments.get("transformer_options") or {}
        guidance = bool(options.get("stg_self_attn_blocks")) or not (
            options.get("a2v_cross_attn", True) and options.get("v2a_cross_attn", True)
        )
        return Call(video, context.shape[1], [TextKeys()] * video.shape[0], features=not guidance)

    def call_kinds(self, model, index: int) -> tuple[str, ...]:
        return (*VIDEO_CALLS, *AUDIO_CALLS, "a2v", "v2a")

    def block_kinds(self, model, index: int, args: dict) -> tuple[str, ...]:
        """The calls a block makes under its options: a stream runs when its ``run_vx``/``run_ax`` is on (the
        audio only with audio tokens), the self-attention of an STG-perturbed block makes none, the audio-video
        attentions run unless severed."""
        options = args["transformer_options"]
        audio = args["img"][1].numel() > 0
        video_on, audio_on = options.get("run_vx", True), options.get("run_ax", True) and audio
        kinds = []
        if video_on:
            kinds += VIDEO_CALLS[options.get("stg_skip_self_attn", False) :]
        if audio_on:
            kinds += AUDIO_CALLS
        if video_on and audio and options.get("a2v_cross_attn", True):
            kinds.append("a2v")
        if audio_on and options.get("v2a_cross_attn", True):
            kinds.append("v2a")
        return tuple(kinds)

    def attend(self, run: Run, index: int, kind: str, base, *args, **kwargs):
        if kind != "text":
            return base(*args, **kwargs)
        return self.text_attention(run, index, base, *args, **kwargs)

    @contextlib.contextmanager
    def block_context(self, run: Run, index: int):
        """RMPM's features: the video self-attention module's output, read by a forward hook on the current
        model's ``attn1`` for the block's call only. That output is what the library's processors lend
        (after ``to_out`` and LTX-2.3's per-head gate, before the block's gate); the attention call inside
        it is the attention alone, and the gate reads the module's input, which no attention call sees."""
        if not run.state.capturing(index):
            yield
            return
        attn1 = run.model.transformer_blocks[index].attn1
        read = lambda module, inputs, out: run.observe(index, lambda rows: out.index_select(0, rows))
        handle = attn1.register_forward_hook(read)
        try:
            yield
        finally:
            handle.remove()

    def text_path(self, run: Run, index: int):
        attn = run.model.transformer_blocks[index].attn2
        return (lambda tokens: attn.k_norm(attn.to_k(tokens))), attn.to_v

    def text_length(self, tokens: int) -> int:
        """The text keys the blocks read for a prompt of ``tokens`` Gemma tokens: the connector's registers
        fill it up to 1,024, or to the next whole number of registers past that."""
        if not self.registers:
            return tokens
        return -(-max(CONNECTOR_LENGTH, tokens) // self.registers) * self.registers

    def span_finder(self, clip, prompt: str):
        """The motion words among ``[<bos> | prompt]``, as ComfyUI's encoder gives them to the model (left
        padding cropped), found by their characters."""
        ids = clip_tokens(clip, prompt, GEMMA)
        tokenizer = inner_tokenizer(clip)
        pad = tokenizer.pad_token
        valid = ids[next((i for i, t in enumerate(ids) if t != pad), len(ids)) :]
        pieces = PieceOffsets(tokenizer.tokenizer.tokenizer, tokenizer.start_token)
        if pieces.ids(prompt) != valid or pieces.offsets(prompt, valid[1:]) is None:
            raise FlexiMMTInputError(
                "FlexiMMT Apply: ComfyUI's Gemma tokenizer parsed this prompt into other tokens than its text has "
                "(a special token or an embedding in the prompt?): write the prompt as plain text"
            )
        length = self.text_length(len(valid))
        return (lambda phrases: find_word_spans(pieces, prompt, phrases, length)), length
