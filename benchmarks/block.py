"""One real-size CogVideoX transformer block: FlexiMMT against diffusers' attention, on this CPU.

diffusers' ``CogVideoXBlock`` built exactly as ``CogVideoXTransformer3DModel`` builds its blocks from
the real checkpoint's config (3072 = 48 heads x 64, time_embed_dim 512, QK-norm, attention bias),
with random weights, at the model's true sequence length (CogVideoX-5B-I2V at 480x720x49: 17,550
video + 226 text tokens; ``--model 1.5``: CogVideoX1.5-5B-I2V at 768x1360x81, 44,880 video tokens).
Everything runs in one process, interleaved (baseline, then each FlexiMMT variant, round after
round), and ratios are taken against the baseline of the same round.

- inference: one block call with CFG (batch 2), diffusers' ``CogVideoXAttnProcessor2_0`` against
  ``FlexiMMTAttnProcessor`` (auto backend) with K objects x d_m motion tokens, ellipse masks
  covering 5-30% of the frame that cross the frame over the token frames, features captured as in
  RMPM's blocks. ``--scope attention`` times the attention call alone (the only part that differs).
- training: one block's forward + backward (batch 1, weights frozen, gradients to the block's
  inputs; FlexiMMT: to the motion tokens too, DMEM's masks on with a 30% drop), with and without
  gradient checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``). Memory: the bytes
  autograd saves for backward (``saved_tensors_hooks``, unique storages, parameters excluded: what a
  GPU would hold between forward and backward) and the peak RSS above the pre-run level.
- ``--profile K``: torch.profiler's breakdown of one attention call, baseline and FlexiMMT K.

``--model wan2.1`` (``wan2.2-5b``): one ``WanTransformerBlock`` built exactly as
``WanTransformer3DModel.__init__`` builds it from Wan2.1-I2V-14B-480P's (Wan2.2-TI2V-5B's) transformer
config, at 480x832x81 (704x1280x121): 21 latent frames x 30 x 52 = 32,760 video tokens, encoder states
of 257 CLIP image + 512 text tokens at width 5120 (TI2V: 31 x 22 x 40 = 27,280 tokens, text only, a
timestep embedding per token), RoPE from ``WanRotaryPosEmbed``. Wan runs the conditional and
unconditional branches as two forward calls of batch 1, so one block call is batch 1. Baseline:
diffusers' ``WanAttnProcessor`` on ``attn1`` and ``attn2``; FlexiMMT: ``WanSelfAttnProcessor`` (RMPM's
capture on) and ``WanCrossAttnProcessor`` sharing one ``StateSlot``, K objects x d_m motion tokens in
``attn2``, parts m2v and t2v. ``--scope attention`` times ``attn2`` alone (the only part that changes).
Training: gradients to the block's video input (Wan's encoder states are constant over the blocks and
need none) and the motion tokens, DMEM on ``attn2``'s scores (part m2v).

``--model hunyuan1.5``: one ``HunyuanVideo15TransformerBlock`` built as ``HunyuanVideo15Transformer3DModel``
builds it from the 8.3B config (2048 = 16 heads x 128, mlp_ratio 4, QK RMSNorm; the 480p I2V checkpoint's
target_size 640), at the bucket of a 16:9 image (480x848) and 121 frames: 31 latent frames x 30 x 53 = 49,290
video tokens (16x spatial, 4x temporal VAE, patch 1), text of 729 SigLIP image + 256 ByT5 glyph + 1,000
Qwen2.5-VL prompt tokens per row, laid out as the transformer's forward lays them (valid first: all 729 image
tokens, ``--valid-glyphs`` 0, ``--valid-text`` 120 prompt tokens; the rest padding), RoPE from
``HunyuanVideo15RotaryPosEmbed``. Batch 1: the guider runs each CFG branch as its own forward (this is the
conditional one, RMPM's capture on). Baseline: diffusers' ``HunyuanVideo15AttnProcessor2_0`` (its padding as a
full [N, N] bool mask); FlexiMMT: ``FlexiMMTHunyuanAttnProcessor`` with K objects x d_m motion tokens after the
text, the padded keys left out (``TextKeys``); the step's layout of the row's text form is built before the
timed call, as the processor builds it at its first block. ``--scope attention`` times ``attn`` alone.

``--model ltx2``: one ``LTX2VideoTransformerBlock`` of Lightricks/LTX-2 (19B), built by
``LTX2VideoTransformer3DModel`` itself from the 2.0 config diffusers' scripts/convert_ltx2_to_diffusers.py writes
(video 4096 = 32 heads x 128, audio 2048 = 32 x 64, cross-attention 4096 / 2048, 48 blocks; a one-block model),
at diffusers' default 512x768x121: 16 latent frames x 16 x 24 = 6,144 video tokens, 1,024 text tokens (the
prompt, then the connectors' registers: every key attended), 126 audio tokens (5.04 s at 25 latents per second).
The block's inputs are what that model's forward hands its first block (a timestep per video token: the image's
frame at 0; RoPE, modulation and the audio stream's inputs included). Batch 2: CFG's ``[negative | positive]``
forward, RMPM's capture on the positive row. Baseline: diffusers' ``LTX2AudioVideoAttnProcessor`` on every
attention; FlexiMMT: ``LTX2SelfAttnProcessor`` (capture) and ``LTX2CrossAttnProcessor`` (K objects x d_m motion
tokens in ``attn2``, parts m2v and t2v) sharing one ``StateSlot``, the audio stream's and the audio-video
attentions diffusers'. ``--scope attention`` times ``attn2`` alone.

Float32 by default (this CPU has no fast bf16); bf16 halves every float tensor (masks and indices stay).

    python benchmarks/block.py inference [--objects 1 3 5] [--repeats 2] [--scope block] [--out r.json]   # 20 min quiet
    python benchmarks/block.py training [--repeats 1] [--checkpointing off on]                          # 25-40 min
    python benchmarks/block.py inference --model 1.5 --scope attention --batch 1 --objects 3 --repeats 1
    python benchmarks/block.py profile --objects 3
    python benchmarks/block.py profile --model wan2.1 --objects 3 [--profile-block]                 # attn2 / block
    python benchmarks/block.py inference --height 96 --width 96 --frames 9 --repeats 1   # a quick try
    python benchmarks/block.py inference --model wan2.1 --objects 3 --repeats 2                        # 30 min quiet
    python benchmarks/block.py inference --model wan2.1 --objects 3 --scope attention --repeats 3      # attn2 alone
    python benchmarks/block.py inference --model hunyuan1.5 --objects 3 --frames 33 --repeats 2        # 8 min quiet
    python benchmarks/block.py inference --model hunyuan1.5 --objects 3 --repeats 1                    # 121 frames
    python benchmarks/block.py inference --model ltx2 --objects 3 --repeats 3 --warmup                 # LTX-2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15RotaryPosEmbed,
    HunyuanVideo15TransformerBlock,
)
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from gpu import (
    GEOMETRY,
    MODEL_NAMES,
    config,
    full_config,
    moving_masks,
    random_tokens,
    rotary,
    token_geometry,
    word_members,
)
from overhead import PeakRSS

from fleximmt.method.attention import TextKeys, motion_state_for
from fleximmt.method.kernels import DEFAULT_KERNEL, MASK_KERNELS
from fleximmt.method.kernels.grouped import GroupedCross, GroupedJoint
from fleximmt.models import FAMILIES, pipeline_class
from fleximmt.models.shared import slot_of
from fleximmt.training.train import TRAIN_PARTS

MiB = 2**20

# The Wan checkpoints' transformer/config.json (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers,
# Wan-AI/Wan2.2-TI2V-5B-Diffusers; the values diffusers' scripts/convert_wan_to_diffusers.py writes for
# "Wan-I2V-14B-480p" and "Wan2.2-TI2V-5B"), used with random weights.
WAN_CONFIGS = {
    "wan2.1": dict(  # I2V 14B 480P: CLIP image tokens through attn2's add_k_proj / add_v_proj
        added_kv_proj_dim=5120,
        attention_head_dim=128,
        cross_attn_norm=True,
        eps=1e-6,
        ffn_dim=13824,
        freq_dim=256,
        image_dim=1280,
        in_channels=36,
        num_attention_heads=40,
        num_layers=40,
        out_channels=16,
        patch_size=(1, 2, 2),
        qk_norm="rms_norm_across_heads",
        text_dim=4096,
        rope_max_seq_len=1024,
        pos_embed_seq_len=None,
    ),
    "wan2.2-5b": dict(  # TI2V 5B: the image is the first latent frame; a timestep per token (expand_timesteps)
        added_kv_proj_dim=None,
        attention_head_dim=128,
        cross_attn_norm=True,
        eps=1e-6,
        ffn_dim=14336,
        freq_dim=256,
        image_dim=None,
        in_channels=48,
        num_attention_heads=24,
        num_layers=30,
        out_channels=48,
        patch_size=(1, 2, 2),
        qk_norm="rms_norm_across_heads",
        text_dim=4096,
        rope_max_seq_len=1024,
        pos_embed_seq_len=None,
    ),
}
# Default video geometry (height, width, frames): diffusers' WanImageToVideoPipeline defaults (480P);
# TI2V-5B's model card and the authors' app: 720P as 704x1280, 121 frames at 24 fps.
WAN_GEOMETRY = {"wan2.1": (480, 832, 81), "wan2.2-5b": (704, 1280, 121)}
WAN_NAMES = {"wan2.1": "Wan2.1-I2V-14B-480P", "wan2.2-5b": "Wan2.2-TI2V-5B"}
WAN_VAE_SCALE = {"wan2.1": (8, 4), "wan2.2-5b": (16, 4)}  # AutoencoderKLWan: spatial, temporal (Wan 2.2's VAE: 16)
WAN_TEXT_TOKENS, WAN_IMAGE_TOKENS = (
    512,
    257,
)  # umT5 context (the processors' hard-coded 512); CLIP ViT-H/14: 16 x 16 + 1
# HunyuanVideo 1.5 I2V 480p (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v): the 8.3B transformer is
# HunyuanVideo15Transformer3DModel's defaults (54 dual-stream blocks, 16 heads x 128, mlp_ratio 4, QK RMSNorm, patch 1,
# 65 input channels) but for what diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py sets for its 480p
# checkpoints: target_size 640 (the official "480p" tier: buckets of base size 640) and task_type "i2v"; random weights
HUNYUAN_CONFIGS = {"hunyuan1.5": dict(target_size=640, task_type="i2v")}
HUNYUAN_NAMES = {"hunyuan1.5": "HunyuanVideo-1.5-480p-I2V"}
HUNYUAN_VAE_SCALE = (16, 4)  # AutoencoderKLHunyuanVideo15's defaults (its checkpoint's): spatial, temporal; 32 channels
# the default video: a 16:9 image's bucket (the pipeline sizes the video from the image's aspect) and diffusers' 121 frames
HUNYUAN_IMAGE, HUNYUAN_FRAMES = (720, 1280), 121
# a row's text keys in the order the transformer's forward lays them out, valid ones first: SigLIP so400m-patch14-384's
# 27 x 27 image tokens (all valid in i2v), the ByT5 glyph tokens (tokenizer_2_max_length; valid only for quoted text in
# the prompt) and the Qwen2.5-VL prompt tokens after the template's crop (tokenizer_max_length), then the padding
HUNYUAN_TEXT = {"image": 729, "glyph": 256, "prompt": 1000}
# LTX-2 (Lightricks/LTX-2): the 2.0 transformer config diffusers' scripts/convert_ltx2_to_diffusers.py writes (it equals
# LTX2VideoTransformer3DModel's defaults: 48 blocks, video 32 heads x 128, audio 32 x 64, cross-attention 4096 / 2048,
# Gemma 3's 3,840-wide captions, interleaved RoPE), random weights
LTX2_CONFIGS = {
    "ltx2": dict(
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
    )
}
LTX2_NAMES = {"ltx2": "LTX-2 (19B) I2V"}
LTX2_GEOMETRY = (512, 768, 121)  # LTX2ImageToVideoPipeline's defaults (121 frames: its default without a duration head)
LTX2_VAE_SCALE = (32, 8)  # AutoencoderKLLTX2Video (LTX-2.0's): spatial, temporal; patch 1
LTX2_TEXT_TOKENS, LTX2_FPS, LTX2_AUDIO_PER_SECOND = 1024, 24.0, 16000 / 160 / 4  # max_sequence_length; audio VAE's rate
MODELS = {**MODEL_NAMES, **WAN_NAMES, **HUNYUAN_NAMES, **LTX2_NAMES}
# each model's registered family: its adapter sets up FlexiMMT's state and installs its processors
FAMILY_OF = {
    **dict.fromkeys(MODEL_NAMES, "cogvideox"),
    **dict.fromkeys(WAN_NAMES, "wan"),
    **dict.fromkeys(HUNYUAN_NAMES, "hunyuanvideo15"),
    **dict.fromkeys(LTX2_NAMES, "ltx2"),
}


def adapter_class(family: str):
    """The adapter class of a registered family."""
    return pipeline_class(FAMILIES[family].pipeline).adapter_class


class OneBlock(torch.nn.Module):
    """A transformer of one block, for its family's adapter to install FlexiMMT's processors on (under every
    name the adapters read a transformer's blocks by)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.blocks = self.transformer_blocks = torch.nn.ModuleList([block])


def attention_processors(adapter, block: torch.nn.Module) -> tuple[dict, dict, object]:
    """``block``'s attention processors, diffusers' own (as the block was built) and FlexiMMT's (as the
    family's adapter installs them), by attention module, and the slot FlexiMMT's read their state from
    (None: the state travels in ``attention_kwargs``)."""
    one = OneBlock(block)
    processors = lambda: {m: m.processor for m in one.modules() if hasattr(m, "processor")}
    plain = processors()
    adapter(SimpleNamespace(transformer=one)).install_processors()
    flexi, slot = processors(), slot_of(one)
    for module, processor in plain.items():  # diffusers' own back until a run asks for FlexiMMT's
        module.set_processor(processor)
    return plain, flexi, slot


def wan_config(model: str, **overrides) -> SimpleNamespace:
    """The full Wan transformer config: ``WanTransformer3DModel``'s defaults, then the checkpoint's values."""
    from diffusers import WanTransformer3DModel

    return full_config(WanTransformer3DModel, WAN_CONFIGS[model], **overrides)


def hunyuan_config(model: str, **overrides) -> SimpleNamespace:
    """The full HunyuanVideo 1.5 transformer config: ``HunyuanVideo15Transformer3DModel``'s defaults, then the checkpoint's."""
    from diffusers import HunyuanVideo15Transformer3DModel

    return full_config(HunyuanVideo15Transformer3DModel, HUNYUAN_CONFIGS[model], **overrides)


def latent_geometry(scale: tuple[int, int], patch: tuple[int, int, int], height: int, width: int, frames: int) -> dict:
    """Latent frames and token grid of a video through a VAE of ``scale`` (spatial, temporal) and patches ``patch``
    (t, h, w), as the Wan and HunyuanVideo 1.5 pipelines and their transformers' patching make them."""
    spatial, temporal = scale
    p_t, p_h, p_w = patch
    latent = (frames - 1) // temporal + 1
    grid = (latent // p_t, height // spatial // p_h, width // spatial // p_w)
    return {
        "latent_frames": latent,
        "grid": grid,
        "video_tokens": grid[0] * grid[1] * grid[2],
        "latent_shape": (latent, height // spatial, width // spatial),
    }


def ltx2_config(model: str, **overrides) -> SimpleNamespace:
    """The full LTX-2 transformer config: ``LTX2VideoTransformer3DModel``'s defaults, then the checkpoint's."""
    from diffusers import LTX2VideoTransformer3DModel

    return full_config(LTX2VideoTransformer3DModel, LTX2_CONFIGS[model], **overrides)


def ltx2_geometry(cfg, height: int, width: int, frames: int) -> dict:
    """Latent frames, token grid and audio tokens as ``LTX2ImageToVideoPipeline`` and the transformer make them."""
    geo = latent_geometry(LTX2_VAE_SCALE, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size), height, width, frames)
    geo["audio_tokens"] = round(frames / LTX2_FPS * LTX2_AUDIO_PER_SECOND)
    return geo


def ltx2_block_inputs(model, geo: dict, batch: int, dtype: torch.dtype, seed: int = 1, device="cpu") -> dict:
    """What ``model``'s forward hands its first block for a batch of ``batch`` rows (random latents and text, a
    timestep per video token with the image's frame at 0), caught before the block runs: its keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    frames, h, w = geo["grid"]
    n, audio = geo["video_tokens"], geo["audio_tokens"]
    timestep = torch.full((batch, n), 500.0)
    timestep[:, : h * w] = 0.0  # the image's latent frame is clean

    def tensor(*shape):
        return torch.randn(shape, generator=gen).to(device, dtype)

    caught = {}

    class Caught(Exception):
        pass

    def catch(module, args, kwargs):
        caught.update(kwargs)
        raise Caught

    handle = model.transformer_blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            model(
                hidden_states=tensor(batch, n, cfg.in_channels),
                audio_hidden_states=tensor(batch, audio, cfg.audio_in_channels),
                encoder_hidden_states=tensor(batch, LTX2_TEXT_TOKENS, cfg.caption_channels),
                audio_encoder_hidden_states=tensor(batch, LTX2_TEXT_TOKENS, cfg.caption_channels),
                timestep=timestep.to(device),
                audio_timestep=torch.full((batch,), 500.0, device=device),
                sigma=torch.full((batch,), 500.0, device=device),
                encoder_attention_mask=torch.ones(batch, LTX2_TEXT_TOKENS, device=device),
                audio_encoder_attention_mask=torch.ones(batch, LTX2_TEXT_TOKENS, device=device),
                num_frames=frames,
                height=h,
                width=w,
                fps=LTX2_FPS,
                audio_num_frames=audio,
                return_dict=False,
            )
    except Caught:
        pass
    finally:
        handle.remove()
    return caught


def wan_geometry(model: str, cfg, height: int, width: int, frames: int) -> dict:
    """Latent frames and token grid as ``WanImageToVideoPipeline`` and the transformer's patching make them."""
    return latent_geometry(WAN_VAE_SCALE[model], cfg.patch_size, height, width, frames)


def hunyuan_geometry(cfg, height: int, width: int, frames: int) -> dict:
    """Latent frames and token grid as ``HunyuanVideo15ImageToVideoPipeline`` and the transformer's patching make them."""
    return latent_geometry(HUNYUAN_VAE_SCALE, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size), height, width, frames)


def hunyuan_size(cfg, image: tuple[int, int] = HUNYUAN_IMAGE) -> tuple[int, int, int]:
    """The video the pipeline makes from an ``image`` (height, width): the bucket of ``target_size`` closest to
    its aspect (``HunyuanVideo15ImageProcessor.calculate_default_height_width``), at the default 121 frames."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=HUNYUAN_VAE_SCALE[0])
    return (*processor.calculate_default_height_width(*image, cfg.target_size), HUNYUAN_FRAMES)


def hunyuan_text(
    valid_prompt: int, valid_glyphs: int = 0, lengths: dict = HUNYUAN_TEXT
) -> tuple[TextKeys, torch.Tensor]:
    """One row's text form and its bool ``[L]`` attention mask as the transformer's forward lays the text out:
    the valid image, glyph and prompt tokens first, then the padding (the form ``hunyuan15.row_texts`` gives)."""
    if not 0 <= valid_prompt <= lengths["prompt"] or not 0 <= valid_glyphs <= lengths["glyph"]:
        raise SystemExit(
            f"--valid-text {valid_prompt} / --valid-glyphs {valid_glyphs}: at most "
            f"{lengths['prompt']} / {lengths['glyph']}"
        )
    offset = lengths["image"] + valid_glyphs
    mask = torch.zeros(sum(lengths.values()), dtype=torch.bool)
    mask[: offset + valid_prompt] = True
    return TextKeys(offset, offset + valid_prompt), mask


def make_wan_block(cfg, dtype: torch.dtype, seed: int = 0) -> WanTransformerBlock:
    """One block as ``WanTransformer3DModel.__init__`` builds it, random weights, frozen."""
    torch.manual_seed(seed)
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    block = WanTransformerBlock(
        dim, cfg.ffn_dim, cfg.num_attention_heads, cfg.qk_norm, cfg.cross_attn_norm, cfg.eps, cfg.added_kv_proj_dim
    )
    return block.to(dtype).eval().requires_grad_(False)


def make_hunyuan_block(cfg, dtype: torch.dtype, seed: int = 0) -> HunyuanVideo15TransformerBlock:
    """One block as ``HunyuanVideo15Transformer3DModel.__init__`` builds it, random weights, frozen."""
    torch.manual_seed(seed)
    block = HunyuanVideo15TransformerBlock(
        cfg.num_attention_heads, cfg.attention_head_dim, mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm
    )
    return block.to(dtype).eval().requires_grad_(False)


def hunyuan_rotary(cfg, latent_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's own ``HunyuanVideo15RotaryPosEmbed`` for this latent video (float32, as it makes them)."""
    rope = HunyuanVideo15RotaryPosEmbed(cfg.patch_size, cfg.patch_size_t, cfg.rope_axes_dim, cfg.rope_theta)
    return rope(torch.empty(1, 1, *latent_shape))  # only its shape is read


def wan_rotary(cfg, latent_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's own ``WanRotaryPosEmbed`` for this latent video, in float32 as
    ``WanTransformer3DModel(...).float()`` has its buffers (``from_pretrained`` leaves these non-persistent
    buffers in the float64 of their ``__init__``: a float64 RoPE product, the same in both runs here)."""
    rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).float()
    return rope(torch.empty(1, 1, *latent_shape, device="meta"))  # only its shape is read


def make_block(cfg, dtype: torch.dtype, seed: int = 0) -> CogVideoXBlock:
    """One block as ``CogVideoXTransformer3DModel.__init__`` builds it, random weights, frozen."""
    torch.manual_seed(seed)
    block = CogVideoXBlock(
        dim=cfg.num_attention_heads * cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        time_embed_dim=cfg.time_embed_dim,
        dropout=cfg.dropout,
        activation_fn=cfg.activation_fn,
        attention_bias=cfg.attention_bias,
        norm_elementwise_affine=cfg.norm_elementwise_affine,
        norm_eps=cfg.norm_eps,
    )
    return block.to(dtype).eval().requires_grad_(False)


class SavedBytes:
    """Bytes autograd saves for backward inside the ``with`` block: unique storages, the given
    parameters excluded; ``as_bf16`` restates float32 figures for bf16. Storages are told apart by
    their StorageImpl (``_cdata``), so this counts meta tensors too (``benchmarks/memory.py``)."""

    def __init__(self, exclude):
        self.exclude = {p.untyped_storage()._cdata for p in exclude}
        self.storages: dict[int, tuple[int, torch.dtype, tuple]] = {}

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if storage.nbytes() and key not in self.exclude and key not in self.storages:
            self.storages[key] = (storage.nbytes(), t.dtype, tuple(t.shape))
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.storages.values())

    def as_bf16(self) -> int:
        """The same storages with every float tensor in bf16."""
        return sum(n // (t.itemsize // 2) if t.is_floating_point else n for n, t, _ in self.storages.values())

    def largest(self, count: int = 8) -> list[str]:
        rows = sorted(self.storages.values(), key=lambda r: -r[0])[:count]
        return [f"{n / MiB:.1f} MiB {str(t).replace('torch.', '')} {list(s)}" for n, t, s in rows]


class Setup:
    """The block, its inputs, its attention processors and FlexiMMT's states for one model and geometry."""

    def __init__(self, args):
        self.wan, self.hunyuan = args.model in WAN_CONFIGS, args.model in HUNYUAN_CONFIGS
        self.cfg_name = args.model
        if self.wan:
            self.cfg = wan_config(args.model)
            default = WAN_GEOMETRY[args.model]
        elif self.hunyuan:
            self.cfg = hunyuan_config(args.model)
            default = hunyuan_size(self.cfg)
        else:
            self.cfg = config(args.model)
            default = GEOMETRY[args.model]
        height, width, frames = args.height or default[0], args.width or default[1], args.frames or default[2]
        self.size = (height, width, frames)
        self.dtype = getattr(torch, args.dtype)
        self.d_m = args.tokens
        self.image_tokens = 0
        if self.wan:
            self.geo = wan_geometry(args.model, self.cfg, height, width, frames)
            self.text = WAN_TEXT_TOKENS
            self.image_tokens = WAN_IMAGE_TOKENS if self.cfg.added_kv_proj_dim else 0
            self.block = make_wan_block(self.cfg, self.dtype)
            self.rotary = wan_rotary(self.cfg, self.geo["latent_shape"])
        elif self.hunyuan:
            self.geo = hunyuan_geometry(self.cfg, height, width, frames)
            self.text = sum(HUNYUAN_TEXT.values())  # every text key of a row: image, glyph and prompt tokens
            self.text_form, self.text_mask = hunyuan_text(args.valid_text, args.valid_glyphs)
            self.block = make_hunyuan_block(self.cfg, self.dtype)
            self.rotary = hunyuan_rotary(self.cfg, self.geo["latent_shape"])
        else:
            self.geo = token_geometry(self.cfg, height, width, frames)
            self.text = self.cfg.max_text_seq_length
            self.block = make_block(self.cfg, self.dtype)
            self.rotary = rotary(self.cfg, height, width, self.geo["latent_frames"])
        # the family's adapter: its processors on the block (Wan's and HunyuanVideo 1.5's read the state from their
        # slot, CogVideoX's from attention_kwargs), its state settings and MDMA parts
        self.adapter = adapter_class(FAMILY_OF[args.model])
        self.plain_procs, self.flexi_procs, self.slot = attention_processors(self.adapter, self.block)
        # the tokens motion words are counted in: the prompt's (HunyuanVideo 1.5: placed after the image and glyph
        # tokens by the row's TextKeys), elsewhere every text token
        self.words = HUNYUAN_TEXT["prompt"] if self.hunyuan else self.text
        self.grid = self.geo["grid"]
        self.n_video = self.geo["video_tokens"]
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        self.train_parts = TRAIN_PARTS & set(self.adapter.parts)

    def state_options(self) -> dict:
        """A state's settings as the model's adapter gives them (e.g. HunyuanVideo 1.5's processors name each
        row's text form and DMEM scores video queries against the concept words' keys) and its MDMA parts."""
        return {**self.adapter.state_settings(), "parts": frozenset(self.adapter.parts)}

    def step_layout(self, state):
        """The MDMA layout of this step's masks that the block's attention uses (HunyuanVideo 1.5: the one of its
        row's text form, which the processor would otherwise build at its first call in the step)."""
        if self.hunyuan:
            return state.layouts.step_layout(0, self.text_form, self.text)
        return state.layouts.step_layouts[0]

    def inputs(self, batch: int, seed: int = 1):
        """Video states, encoder states (CogVideoX: the text; Wan: ``[image | text]`` after the condition
        embedder; HunyuanVideo 1.5: ``[image | glyph | prompt]`` tokens, valid first; width ``dim``) and the
        timestep embedding as the block takes them."""
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.randn(batch, self.n_video, self.dim, generator=gen).to(self.dtype)
        text = torch.randn(batch, self.image_tokens + self.text, self.dim, generator=gen).to(self.dtype)
        if self.hunyuan:  # [B, dim]: the time embedding every block's AdaLayerNormZero reads
            temb = torch.randn(batch, self.dim, generator=gen)
        elif not self.wan:
            temb = torch.randn(batch, self.cfg.time_embed_dim, generator=gen)
        elif self.cfg_name == "wan2.2-5b":  # expand_timesteps: [B, N, 6, dim] (Wan 2.2 TI2V)
            temb = torch.randn(batch, self.n_video, 6, self.dim, generator=gen)
        else:  # [B, 6, dim]
            temb = torch.randn(batch, 6, self.dim, generator=gen)
        return hidden, text, temb.to(self.dtype)

    def install(self, state) -> None:
        """diffusers' processors (state None) or FlexiMMT's with ``state``."""
        for module, processor in (self.plain_procs if state is None else self.flexi_procs).items():
            module.set_processor(processor)
        if self.slot is not None:
            self.slot.state = state

    def padding_mask(self, batch: int) -> torch.Tensor:
        """HunyuanVideo 1.5's bool ``[B, L]`` text mask as its transformer hands it to every block; FlexiMMT's
        processor reads the same rows' text forms from its slot (``hunyuan15.row_texts``)."""
        self.slot.texts = [self.text_form] * batch
        return self.text_mask[None].expand(batch, -1)

    def call(self, hidden, text, temb, state):
        """One block call with the processors ``install(state)`` set."""
        if self.wan:
            return self.block(hidden, text, temb, self.rotary)
        if self.hunyuan:
            return self.block(hidden, text, temb, self.padding_mask(hidden.shape[0]), self.rotary)
        return self.block(
            hidden, text, temb, self.rotary, attention_kwargs=None if state is None else {"fleximmt": state}
        )

    def attention_inputs(self, hidden, text, temb):
        """The inputs of the attention FlexiMMT changes (CogVideoX: attn1 after norm1; Wan: attn2 after
        norm2; HunyuanVideo 1.5: attn after norm1 and norm1_context; the block's residual before it is left
        out: the same work in both)."""
        if self.wan:
            return self.block.norm2(hidden.float()).type_as(hidden), text
        if self.hunyuan:
            return self.block.norm1(hidden, emb=temb)[0], self.block.norm1_context(text, emb=temb)[0]
        hidden, text, _, _ = self.block.norm1(hidden, text, temb)
        return hidden, text

    def attention(self, hidden, text, state):
        if self.wan:
            return self.block.attn2(hidden, text, None, None)
        if self.hunyuan:
            return self.block.attn(
                hidden_states=hidden,
                encoder_hidden_states=text,
                attention_mask=self.padding_mask(hidden.shape[0]),
                image_rotary_emb=self.rotary,
            )
        kwargs = {} if state is None else {"fleximmt": state}
        return self.block.attn1(
            hidden_states=hidden, encoder_hidden_states=text, image_rotary_emb=self.rotary, **kwargs
        )

    @property
    def attention_name(self) -> str:
        return (
            "attn2 (cross-attention)"
            if self.wan
            else "attn (joint attention)"
            if self.hunyuan
            else "attn1 (joint attention)"
        )

    def describe(self) -> str:
        h, w, f = self.size
        grid = f"{self.grid[0]} x {self.grid[1]} x {self.grid[2]} = {self.n_video:,} video"
        if self.wan:
            extra = (
                f"encoder states {self.image_tokens} image + {self.text} text tokens; ffn {self.cfg.ffn_dim}; "
                f"temb {'per token' if self.cfg_name == 'wan2.2-5b' else '[B, 6, dim]'}"
            )
            return (
                f"{MODELS[self.cfg_name]} block, {h}x{w}x{f}: {self.geo['latent_frames']} latent frames, token grid "
                f"{grid} tokens; {extra}; {self.cfg.num_attention_heads} heads x {self.cfg.attention_head_dim}; "
                f"{self.dtype}; torch {torch.__version__}, threads {torch.get_num_threads()}"
            )
        text = f"{self.text} text tokens"
        if self.hunyuan:
            valid = self.text_form.valid
            text += (
                f" ({HUNYUAN_TEXT['image']} image + {self.text_form.offset - HUNYUAN_TEXT['image']} glyph + "
                f"{valid - self.text_form.offset} prompt tokens valid, {self.text - valid} padding; diffusers' "
                f"[N, N] bool mask over {self.n_video + self.text:,} tokens: {(self.n_video + self.text) ** 2 / MiB:,.0f} MiB)"
            )
        return (
            f"{MODELS[self.cfg_name]} block, {h}x{w}x{f}: {self.geo['latent_frames']} latent frames, token grid "
            f"{grid} + {text}; {self.cfg.num_attention_heads} heads x {self.cfg.attention_head_dim}; "
            f"{self.dtype}; torch {torch.__version__}, threads {torch.get_num_threads()}"
        )


class LTX2Setup(Setup):
    """:class:`Setup` for one LTX-2 block (the module's docstring): the block, and its inputs for each batch, come
    from a one-block ``LTX2VideoTransformer3DModel`` of the real config; FlexiMMT changes ``attn1`` (RMPM's capture)
    and ``attn2`` (motion tokens, MDMA), the audio stream's and the audio-video attentions stay diffusers'."""

    def __init__(self, args):
        from diffusers import LTX2VideoTransformer3DModel

        self.wan = self.hunyuan = False
        self.cfg_name = args.model
        self.cfg = ltx2_config(args.model)
        height, width, frames = (
            given or default for given, default in zip((args.height, args.width, args.frames), LTX2_GEOMETRY)
        )
        self.size = (height, width, frames)
        self.dtype = getattr(torch, args.dtype)
        self.d_m, self.image_tokens = args.tokens, 0
        self.geo = ltx2_geometry(self.cfg, height, width, frames)
        self.text = self.words = LTX2_TEXT_TOKENS  # the prompt's tokens, then registers: every key a text key
        self.grid, self.n_video = self.geo["grid"], self.geo["video_tokens"]
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        self.adapter = adapter_class(FAMILY_OF[args.model])
        self.train_parts = TRAIN_PARTS & set(self.adapter.parts)
        torch.manual_seed(0)
        model = LTX2VideoTransformer3DModel(**{**LTX2_CONFIGS[args.model], "num_layers": 1})
        self.model = model.to(self.dtype).eval().requires_grad_(False)
        self.block = self.model.transformer_blocks[0]
        # diffusers' LTX2AudioVideoAttnProcessor on every attention; FlexiMMT's on attn1 and attn2 (the adapter's)
        self.plain_procs, self.flexi_procs, self.slot = attention_processors(self.adapter, self.block)
        self.kwargs, self.rotary = {}, ()

    def inputs(self, batch: int, seed: int = 1):
        self.kwargs = ltx2_block_inputs(self.model, self.geo, batch, self.dtype, seed)
        names = ("video_rotary_emb", "audio_rotary_emb", "ca_video_rotary_emb", "ca_audio_rotary_emb")
        self.rotary = tuple(t for name in names for t in self.kwargs[name])
        return self.kwargs["hidden_states"], self.kwargs["encoder_hidden_states"], self.kwargs["temb"]

    def call(self, hidden, text, temb, state):
        """The block's video output (the audio stream runs too; its output is not used here)."""
        return self.block(**{**self.kwargs, "hidden_states": hidden, "encoder_hidden_states": text, "temb": temb})[0]

    def attention_inputs(self, hidden, text, temb):
        return self.block.norm2(hidden), text  # attn2's query input (LTX-2.0 modulates neither side)

    def attention(self, hidden, text, state):
        mask = self.kwargs["encoder_attention_mask"]  # the forward's bias of the connectors' all-open mask
        return self.block.attn2(hidden, encoder_hidden_states=text, query_rotary_emb=None, attention_mask=mask)

    @property
    def attention_name(self) -> str:
        return "attn2 (the video stream's text cross-attention)"

    def describe(self) -> str:
        h, w, f = self.size
        cfg, geo = self.cfg, self.geo
        return (
            f"{MODELS[self.cfg_name]} block, {h}x{w}x{f}: {geo['latent_frames']} latent frames, token grid "
            f"{self.grid[0]} x {self.grid[1]} x {self.grid[2]} = {self.n_video:,} video tokens (a timestep each), "
            f"{self.text} text tokens, {geo['audio_tokens']} audio tokens; video {cfg.num_attention_heads} heads x "
            f"{cfg.attention_head_dim}, audio {cfg.audio_num_attention_heads} x {cfg.audio_attention_head_dim}; "
            f"{self.dtype}; torch {torch.__version__}, threads {torch.get_num_threads()}"
        )


def inference_states(setup: Setup, objects: list[int], batch: int, backend: str = "auto") -> dict[int, dict]:
    """A FlexiMMT state per K as the pipeline prepares one step (CogVideoX: CFG rows ``[uncond | cond]``
    of one video; Wan and HunyuanVideo 1.5: one branch per call, features captured as in the conditional one)."""
    states = {}
    for k in objects:
        member, _ = word_members(k, setup.words)
        tokens = random_tokens(k, 1, setup.d_m, setup.dim, seed=k).to(setup.dtype)
        masks = moving_masks(k, setup.grid)
        state = motion_state_for(
            tokens,
            member,
            num_frames=setup.grid[0],
            mask_kernel=backend,
            feature_blocks=frozenset({0}),
            rows=setup.adapter(None).batch_rows({"guidance_scale": 6.0 if batch == 2 else 1.0}, 1),  # one video
            **setup.state_options(),
        )
        start = time.perf_counter()
        state.set_video_masks(masks)
        layout = setup.step_layout(state)
        layout_s = time.perf_counter() - start
        coverage = masks.view(k, setup.grid[0], -1).float().mean(-1)  # per object and token frame
        states[k] = {
            "state": state,
            "layout_s": layout_s,
            "coverage": [round(c, 3) for c in coverage.mean(1).tolist()],
            "coverage_range": [round(coverage.min().item(), 3), round(coverage.max().item(), 3)],
        }
        if not isinstance(layout, (GroupedJoint, GroupedCross)):  # only the grouped kernel has groups to report
            states[k]["backend"] = backend
        elif setup.adapter.form == "cross":
            states[k].update(
                {
                    "groups": [g.count for g in layout.groups],
                    "group_keys": [int(g.keys.numel()) for g in layout.groups],
                }
            )
        else:
            states[k].update(
                {
                    "groups": [g.count for g in layout.groups],
                    "groups_chained": [g.chained for g in layout.groups],
                    "masked_rows": int(layout.masked_rows.shape[0]),
                    "text_queries": setup.text if layout.text_queries is None else int(layout.text_queries.numel()),
                    "merged_video_queries": layout.num_merged,
                    "keys": [setup.n_video + int(g.keys.numel()) for g in layout.groups],
                }
            )
    return states


def describe_layout(setup: Setup, k: int, s: dict) -> str:
    head = (
        f"  K={k}: object coverage {s['coverage']} of the frame (per frame {s['coverage_range'][0]:.0%}-"
        f"{s['coverage_range'][1]:.0%}); "
    )
    if "backend" in s:
        return head + f"{s['backend']} backend: one attention call; layout built in {s['layout_s']:.3f} s once per step"
    if setup.adapter.form == "cross":
        pairs = ", ".join(f"{q:,} x {n}" for q, n in zip(s["groups"], s["group_keys"]))
        return (
            head + f"{len(s['groups'])} SDPA calls in attn2 (video queries x keys of [text | motion]): {pairs}; "
            f"layout built in {s['layout_s']:.3f} s once per step"
        )
    return (
        head + f"unmasked groups {s['groups']} (chained {s['groups_chained']}) over {s['keys']} keys; masked call "
        f"{s['masked_rows']} rows ({s['text_queries']} text + {s['merged_video_queries']} merged video queries); layout "
        f"built in {s['layout_s']:.3f} s once per step" + (" and text form" if setup.hunyuan else "")
    )


def interleave(runs: dict, repeats: int, warmup: bool) -> dict[str, dict[str, list[float]]]:
    """Wall time, and the CPU time of this process (all its threads): on a machine whose cores others
    share, the CPU time a call needs moves far less with their load than its wall time does. The order is
    reversed every other round (as ``overhead.py`` does), so that a run is not always the one after another."""
    samples = {name: {"time": [], "cpu": [], "rss_extra": []} for name in runs}
    if warmup:
        for fn in runs.values():
            fn()
    for r in range(repeats):
        for name, fn in list(runs.items())[:: -1 if r % 2 else 1]:
            with PeakRSS() as mem:
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                samples[name]["time"].append(time.perf_counter() - start)
                samples[name]["cpu"].append(time.process_time() - cpu)
            samples[name]["rss_extra"].append(mem.extra)
            print(
                f"  round {r + 1}: {name:<28} {samples[name]['time'][-1]:8.2f} s wall {samples[name]['cpu'][-1]:8.2f} s CPU"
                f"  peak RSS +{mem.extra / MiB:7.0f} MiB",
                flush=True,
            )
    return samples


def ratios(samples: dict, base: str) -> dict[str, dict]:
    """Per variant: median time, and the ratio to the baseline of the same round (median, min, max)."""
    out = {}
    for name, s in samples.items():
        per_round = [t / b for t, b in zip(s["time"], samples[base]["time"])]
        per_round_cpu = [t / b for t, b in zip(s["cpu"], samples[base]["cpu"])]
        mem = [m / b if b else float("nan") for m, b in zip(s["rss_extra"], samples[base]["rss_extra"])]
        out[name] = {
            "time_s": s["time"],
            "median_s": statistics.median(s["time"]),
            "ratio": statistics.median(per_round),
            "ratio_min": min(per_round),
            "ratio_max": max(per_round),
            "cpu_s": s["cpu"],
            "cpu_ratio": statistics.median(per_round_cpu),
            "cpu_ratio_min": min(per_round_cpu),
            "cpu_ratio_max": max(per_round_cpu),
            "rss_extra_mib": [m / MiB for m in s["rss_extra"]],
            "rss_ratio": statistics.median(mem),
            "ratio_rounds": per_round,
            "cpu_ratio_rounds": per_round_cpu,
        }
    return out


def run_inference(args, setup: Setup) -> dict:
    batch = args.batch
    hidden, text, temb = setup.inputs(batch)
    states = inference_states(setup, args.objects, batch, args.backend)
    if args.scope == "attention":
        with torch.no_grad():
            hidden, text = setup.attention_inputs(hidden, text, temb)

    def call(state):
        setup.install(state)
        with torch.no_grad():
            if args.scope == "attention":
                return setup.attention(hidden, text, state)
            return setup.call(hidden, text, temb, state)

    def plain():
        call(None)

    def flexi(k):
        def run():
            call(states[k]["state"])
            states[k]["state"].capture.take()  # what RMPM reads after the step; resets the running sum

        return run

    runs = {
        "diffusers": plain,
        **{
            f"fleximmt K={k}{'' if args.backend == DEFAULT_KERNEL else ' ' + args.backend}": flexi(k)
            for k in args.objects
        },
    }
    scope = f"attention call: {setup.attention_name}" if args.scope == "attention" else "block"
    branch = " = CFG" if batch == 2 and not setup.wan else ""
    if setup.wan:
        branch = " (one CFG branch: Wan calls the model once per branch)"
    elif setup.hunyuan:
        branch = " (the conditional branch: HunyuanVideo 1.5's guider runs each branch as its own forward)"
    print(
        f"inference ({scope}, batch {batch}{branch}), d_m = {setup.d_m}, "
        f"{args.repeats} rounds{' after a warm-up round' if args.warmup else ''}:"
    )
    for k in args.objects:
        print(describe_layout(setup, k, states[k]))
    samples = interleave(runs, args.repeats, args.warmup)
    result = ratios(samples, "diffusers")
    for name, r in result.items():
        rounds = " / ".join(f"{a:.3f}x, CPU {b:.3f}x" for a, b in zip(r["ratio_rounds"], r["cpu_ratio_rounds"]))
        print(
            f"  {name:<16} median {r['median_s']:8.2f} s  ratio {r['ratio']:.3f}x (rounds {r['ratio_min']:.3f}-"
            f"{r['ratio_max']:.3f}); CPU time ratio {r['cpu_ratio']:.3f}x ({r['cpu_ratio_min']:.3f}-{r['cpu_ratio_max']:.3f}); "
            f"peak RSS extra {statistics.median(r['rss_extra_mib']):.0f} MiB ({r['rss_ratio']:.3f}x); per round: {rounds}"
        )
    for k in args.objects:
        states[k].pop("state")
    return {"runs": result, "layouts": {str(k): v for k, v in states.items()}}


def run_training(args, setup: Setup) -> dict:
    block = setup.block
    hidden, text, temb = setup.inputs(1, seed=2)
    gen = torch.Generator().manual_seed(3)
    grad_h = torch.randn(hidden.shape, generator=gen).to(setup.dtype)
    grad_t = torch.randn(text.shape, generator=gen).to(setup.dtype)
    member, concept = word_members(1, setup.words)
    tokens = torch.nn.Parameter(random_tokens(1, 1, setup.d_m, setup.dim).to(setup.dtype))
    options = {**setup.state_options(), "parts": setup.train_parts}
    state = motion_state_for(
        tokens,
        member,
        num_frames=setup.grid[0],
        dmem=True,
        concept_member=concept,
        dmem_drop=0.3,
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    params = [*list(block.parameters()), tokens]
    saved: dict[str, SavedBytes] = {}
    dmem_cover: list[float] = []
    # CogVideoX and HunyuanVideo 1.5 update their text in every block (gradients flow to it); Wan's encoder
    # states are the same constants for every block (the condition embedder's output, frozen): no gradient to them
    text_grad = setup.adapter.form != "cross"

    def step(flexi: bool, ckpt: bool, name: str):
        def run():
            setup.install(state if flexi else None)
            if flexi:
                tokens.grad = None
                state.begin_step(setup.n_video, 1)
            x = hidden.detach().requires_grad_(True)
            y = text.detach().requires_grad_(text_grad)

            def fn(a, b):
                return setup.call(a, b, temb, state if flexi else None)

            with SavedBytes(params) as counter:
                out = checkpoint(fn, x, y, use_reentrant=False) if ckpt else fn(x, y)
            saved[name] = counter
            if text_grad:
                torch.autograd.backward(out, (grad_h, grad_t))
            else:
                torch.autograd.backward(out, grad_h)
            assert x.grad is not None and (not flexi or tokens.grad is not None)
            if flexi:
                dmem_cover.append(next(iter(state.layouts.dmem_layouts.values())).video_masks.float().mean().item())

        return run

    runs = {}
    for ckpt in [c == "on" for c in args.checkpointing]:
        suffix = " +ckpt" if ckpt else ""
        runs[f"plain{suffix}"] = step(False, ckpt, f"plain{suffix}")
        runs[f"fleximmt{suffix}"] = step(True, ckpt, f"fleximmt{suffix}")
    print(
        f"training (batch 1, forward + backward, weights frozen), d_m = {setup.d_m}, DMEM drop 0.3, parts "
        f"{sorted(setup.train_parts)}, {args.repeats} rounds{' after a warm-up round' if args.warmup else ''}:"
    )
    samples = interleave(runs, args.repeats, args.warmup)
    result = {}
    for ckpt in args.checkpointing:
        suffix = " +ckpt" if ckpt == "on" else ""
        part = ratios({k: samples[k] for k in (f"plain{suffix}", f"fleximmt{suffix}")}, f"plain{suffix}")
        result.update(part)
    for name, r in result.items():
        counter = saved[name]
        r["saved_mib"], r["saved_bf16_mib"] = counter.total / MiB, counter.as_bf16() / MiB
        r["saved_largest"] = counter.largest()
    # what checkpointing keeps per block: its inputs (Wan: the video states only; the encoder states,
    # timestep embedding and RoPE are one set of tensors shared by every block)
    inputs_bytes = (hidden.numel() + (text.numel() if text_grad else 0)) * hidden.element_size()
    shared = 0 if text_grad else sum(t.numel() * t.element_size() for t in (text, temb, *setup.rotary))
    for name, r in result.items():
        base = result["plain +ckpt" if "ckpt" in name else "plain"]
        if "ckpt" in name:  # checkpoint keeps the block's inputs (its own hooks hide the rest from ours)
            r["held_mib"], r["held_bf16_mib"] = inputs_bytes / MiB, inputs_bytes / 2 / MiB
        else:
            r["held_mib"], r["held_bf16_mib"] = r["saved_mib"], r["saved_bf16_mib"]
        r["held_ratio"] = r["held_mib"] / base["held_mib"]
        print(
            f"  {name:<16} median {r['median_s']:8.2f} s  ratio {r['ratio']:.3f}x (rounds {r['ratio_min']:.3f}-"
            f"{r['ratio_max']:.3f}); CPU time ratio {r['cpu_ratio']:.3f}x;  held for backward {r['held_mib']:.0f} MiB ({r['held_ratio']:.3f}x; bf16 "
            f"{r['held_bf16_mib']:.0f} MiB)  peak RSS extra {statistics.median(r['rss_extra_mib']):.0f} MiB "
            f"({r['rss_ratio']:.3f}x)"
        )
    for name in ("plain", "fleximmt"):
        if name in saved:
            print(f"  largest saved storages, {name}: " + "; ".join(saved[name].largest(6)))
    if shared:
        print(f"  shared by every block (encoder states, timestep embedding, RoPE): {shared / MiB:.0f} MiB")
    print(f"  DMEM masks covered {statistics.mean(dmem_cover):.0%} of the video tokens (after the 30% drop)")
    return {
        "runs": result,
        "block_inputs_mib": inputs_bytes / MiB,
        "shared_inputs_mib": shared / MiB,
        "dmem_coverage": statistics.mean(dmem_cover),
    }


def run_profile(args, setup: Setup) -> dict:
    """torch.profiler over one call of the attention FlexiMMT changes (``--scope block``: of the whole
    block), baseline and FlexiMMT with the first K."""
    from torch.profiler import ProfilerActivity, profile

    batch, k = args.batch, args.objects[0]
    hidden, text, temb = setup.inputs(batch)
    state = inference_states(setup, [k], batch)[k]["state"]
    block = args.profile_block
    if not block:
        with torch.no_grad():
            hidden, text = setup.attention_inputs(hidden, text, temb)
    out = {}
    for name, run_state in (("diffusers", None), (f"fleximmt K={k}", state)):
        setup.install(run_state)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start, cpu = time.perf_counter(), time.process_time()
            setup.call(hidden, text, temb, run_state) if block else setup.attention(hidden, text, run_state)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
            state.capture.take()
        rows = []
        for ev in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[
            : args.top
        ]:
            shapes = ", ".join(str(s) for s in ev.input_shapes[:3] if s)
            rows.append({"op": ev.key, "calls": ev.count, "self_s": ev.self_cpu_time_total / 1e6, "shapes": shapes})
        out[name] = {"total_s": total, "cpu_s": cpu, "ops": rows}
        what = "block" if block else setup.attention_name
        print(f"{name}: {what} call {total:.2f} s ({cpu:.2f} s CPU); self time by op and input shapes:")
        for r in rows:
            print(f"  {r['self_s']:8.3f} s  {r['calls']:3d}x  {r['op']:<55} {r['shapes'][:110]}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["inference", "training", "profile"])
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="5b",
        help="5b, 1.5 (CogVideoX), a Wan model, hunyuan1.5 (HunyuanVideo 1.5 I2V 480p) or ltx2 (LTX-2)",
    )
    parser.add_argument("--height", type=int), parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int, help="video frames (default: the model's own)")
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 3, 5], help="K values (profile: the first)")
    parser.add_argument("--tokens", type=int, default=226, help="motion tokens per object and block (d_m)")
    parser.add_argument(
        "--mask-kernel",
        "--backend",  # its old name
        dest="backend",
        choices=MASK_KERNELS,
        default=DEFAULT_KERNEL,
        help="inference: FlexiMMT's mask kernel (flex: one compiled FlexAttention call)",
    )
    parser.add_argument("--repeats", type=int, help="rounds (default: inference 2, training 1)")
    parser.add_argument("--warmup", action="store_true", help="one untimed round first")
    parser.add_argument(
        "--batch",
        type=int,
        choices=[1, 2],
        help="inference rows (CogVideoX, LTX-2: 2 = CFG, the default; Wan, HunyuanVideo 1.5: 1)",
    )
    parser.add_argument(
        "--valid-text",
        type=int,
        default=120,
        help="HunyuanVideo 1.5: prompt tokens that are not padding, of 1000 (a prompt of about 90 words)",
    )
    parser.add_argument(
        "--valid-glyphs",
        type=int,
        default=0,
        help="HunyuanVideo 1.5: ByT5 glyph tokens that are not padding, of 256 (0: no quoted text)",
    )
    parser.add_argument("--scope", choices=["block", "attention"], default="block")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top", type=int, default=14, help="profile: rows shown")
    parser.add_argument("--profile-block", action="store_true", help="profile: the whole block call, not the attention")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.what == "inference" else 1
    branch_calls = {**WAN_CONFIGS, **HUNYUAN_CONFIGS}  # models that run each CFG branch as its own call
    if args.batch is None:
        args.batch = 1 if args.model in branch_calls else 2
    elif args.batch == 2 and args.model in branch_calls:
        parser.error(
            f"--batch 2: {MODELS[args.model]} runs its conditional and unconditional branches as two calls of batch 1"
        )
    setup = (LTX2Setup if args.model in LTX2_CONFIGS else Setup)(args)
    print(setup.describe(), flush=True)
    result = {
        "what": args.what,
        "model": args.model,
        "size": setup.size,
        "video_tokens": setup.n_video,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    result.update(
        {"inference": run_inference, "training": run_training, "profile": run_profile}[args.what](args, setup)
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
