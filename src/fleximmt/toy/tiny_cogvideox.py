"""Tiny CogVideoX-architecture models (1.0 and 1.5) built from configs with diffusers' own classes, and the
contract suite's rows for them.

Used by the test suite, by ``fleximmt demo --model tiny`` and, with their configs, by
``toy.train`` (which trains the toy model that ships). Built here, every weight is random, so the
videos they make are noise - what they show is that the whole pipeline runs.
"""

from __future__ import annotations

import torch

from .contract import ContractRow
from .vocabulary import WORDS, tiny_t5_encoder, tiny_tokenizer


def tiny_components(
    seed: int = 0,
    height: int = 32,
    width: int = 32,
    num_frames: int = 9,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    text_len: int = 16,
    vae_channels: tuple[int, ...] = (8, 8, 8),
    latent_channels: int = 4,
    text_dim: int = 16,
    text_layers: int = 1,
    time_embed_dim: int = 8,
    norm_groups: int = 2,
    words: tuple[str, ...] = WORDS,
    version: str = "1.0",
) -> dict:
    """Random-weight components of a ``CogVideoXImageToVideoPipeline`` (seeded). ``version="1.5"`` is
    shaped like CogVideoX 1.5: tokens span 2 latent frames, no learned positional embeddings (any
    size), an ``ofs`` embedding, and the VAE's inverted image-latent scale."""
    if version not in ("1.0", "1.5"):
        raise ValueError(f"version={version!r}: choose '1.0' or '1.5'")
    v15 = version == "1.5"
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    spatial = 2 ** (len(vae_channels) - 1)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * len(vae_channels),
        up_block_types=("CogVideoXUpBlock3D",) * len(vae_channels),
        block_out_channels=vae_channels,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=norm_groups,
        temporal_compression_ratio=4,
        invert_scale_latents=v15,
    )
    tokenizer = tiny_tokenizer(tuple(words))
    text_encoder = tiny_t5_encoder(T5EncoderModel, T5Config, len(tokenizer), text_dim, text_layers)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=2 * latent_channels,
        out_channels=latent_channels,
        time_embed_dim=time_embed_dim,
        text_embed_dim=text_dim,
        num_layers=num_layers,
        sample_width=width // spatial,
        sample_height=height // spatial,
        sample_frames=num_frames,
        patch_size=2,
        patch_size_t=2 if v15 else None,
        patch_bias=not v15,
        ofs_embed_dim=time_embed_dim if v15 else None,
        temporal_compression_ratio=4,
        max_text_seq_length=text_len,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=not v15,
    )
    scheduler = CogVideoXDDIMScheduler()
    for model in (vae, text_encoder, transformer):
        model.eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def tiny_pipeline(seed: int = 0, **config):
    """A ``FlexiMMTPipeline`` of tiny random-weight components (see :func:`tiny_components`)."""
    from ..models.cogvideox import FlexiMMTPipeline

    pipe = FlexiMMTPipeline(**tiny_components(seed, **config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = dict(num_inference_steps=2, max_sequence_length=16)
MODEL_DEFAULTS = frozenset({"height", "width", "num_frames", "max_sequence_length"})  # None: the model's own
CONTRACT_ROWS = (
    ContractRow(
        "cogvideox-1.0",
        lambda: tiny_components(0),
        size=(32, 32, 9),
        call=CALL,
        fast_backends=("auto", "flex"),
        model_defaults=MODEL_DEFAULTS,
    ),
    ContractRow(
        "cogvideox-1.5",
        lambda: tiny_components(0, version="1.5", height=64, width=64, num_frames=17),
        size=(64, 64, 17),
        call=CALL,
        model_defaults=MODEL_DEFAULTS,
    ),
)
