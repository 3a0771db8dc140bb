"""Tiny CogVideoX-architecture models built from configs with diffusers' own classes.

Used by the test suite, by ``fleximmt demo --model tiny`` and, with their configs, by
``toy.train`` (which trains the toy model that ships). Built here, every weight is random, so the
videos they make are noise - what they show is that the whole pipeline runs.
"""

from __future__ import annotations

import torch

from ..method.motion import MotionTokens

WORDS = [
    "A",
    "An",
    "The",
    "a",
    "an",
    "the",
    "and",
    "is",
    "are",
    "on",
    "in",
    "with",
    "of",
    "to",
    "at",
    "its",
    "from",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "orange",
    "purple",
    "small",
    "big",
    "left",
    "right",
    "middle",
    "ball",
    "box",
    "star",
    "circle",
    "square",
    "triangle",
    "sprite",
    "dog",
    "cat",
    "man",
    "tiger",
    "rabbit",
    "jumps",
    "jumping",
    "moves",
    "moving",
    "slides",
    "sliding",
    "rolls",
    "rolling",
    "spins",
    "spinning",
    "walks",
    "walking",
    "runs",
    "up",
    "down",
    "left",
    "right",
    "around",
    "quickly",
    "slowly",
    "still",
    "stands",
    "bounces",
    "zigzags",
    "circles",
    "grows",
    "shrinks",
    "doing",
    "yoga",
    "snow",
    "ground",
    "background",
    ".",
    ",",
]


def tiny_tokenizer(words: tuple[str, ...] = WORDS):
    """An offline T5 tokenizer whose vocabulary is ``words`` (no download)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = set()
    for w in words:
        # punctuation both glued to the previous word ("up.") and standing alone ("up .")
        for piece in [w, "\u2581" + w] if w in ".," else ["\u2581" + w]:
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -1.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0)


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
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=2 * text_dim,
            num_layers=text_layers,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
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


WAN_VERSIONS = ("2.1", "2.2", "2.2-ti2v")


def tiny_wan_components(
    seed: int = 0,
    version: str = "2.1",
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 12,
    text_dim: int = 16,
    words: tuple[str, ...] = WORDS,
    freq_dim: int = 32,
    ffn_dim: int = 32,
    image_dim: int = 4,
) -> dict:
    """Random-weight components of a ``WanImageToVideoPipeline`` (seeded), shaped like diffusers' own
    fast tests: ``"2.1"`` (I2V-14B: the first frame's latents beside the noise, CLIP image tokens in
    every cross-attention), ``"2.2"`` (I2V-A14B: two experts split at ``boundary_ratio``, no CLIP) or
    ``"2.2-ti2v"`` (TI2V-5B: the first latent frame is the image, per-token timesteps, 16x VAE).
    ComfyUI's Wan reads some sizes as fixed (heads of 128, ``text_dim`` 4096, ``freq_dim`` 256, CLIP
    width ``image_dim`` 1280): its tests pass those."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    if version not in WAN_VERSIONS:
        raise ValueError(f"version={version!r}: choose from {list(WAN_VERSIONS)}")
    torch.manual_seed(seed)
    ti2v = version == "2.2-ti2v"
    if ti2v:
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            temperal_downsample=[False, True, True],
        )
    else:
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    tokenizer = tiny_tokenizer(tuple(words))
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=2 * text_dim,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    image_dim = image_dim if version == "2.1" else None

    def transformer():
        channels = 48 if ti2v else 16
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=channels if ti2v else 2 * channels + 4,
            out_channels=channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
            image_dim=image_dim,
            added_kv_proj_dim=heads * head_dim if image_dim else None,
        )

    components = dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        image_encoder=None,
        image_processor=None,
        transformer_2=None,
    )
    if version == "2.1":
        components["image_encoder"] = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=image_dim,
                projection_dim=image_dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=4,
            )
        )
        components["image_processor"] = CLIPImageProcessorPil(crop_size=32, size=32)
    if version == "2.2":
        components["transformer_2"] = transformer()
        components["boundary_ratio"] = 0.875
    if ti2v:
        components["expand_timesteps"] = True
    for model in (
        vae,
        text_encoder,
        components["transformer"],
        components["transformer_2"],
        components["image_encoder"],
    ):
        if model is not None:
            model.eval()
    return components


def tiny_wan_pipeline(seed: int = 0, **config):
    """A ``FlexiMMTWanPipeline`` of tiny random-weight components (see :func:`tiny_wan_components`)."""
    from ..models.wan import FlexiMMTWanPipeline

    pipe = FlexiMMTWanPipeline(**tiny_wan_components(seed, **config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_motion(
    transformer, tokens_per_motion: int = 4, seed: int = 0, scale: float = 1.0, experts: int = 1, **metadata
) -> MotionTokens:
    """Random motion tokens shaped for ``transformer`` (kaiming-uniform-like spread, seeded), one set per expert."""
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    gen = torch.Generator().manual_seed(seed)
    bound = scale * (3.0 / dim) ** 0.5
    sets = [(torch.rand(cfg.num_layers, tokens_per_motion, dim, generator=gen) * 2 - 1) * bound for _ in range(experts)]
    if "family" not in metadata:
        metadata["family"] = family_of(transformer)
    return MotionTokens(sets, **metadata)


def family_of(transformer) -> str:
    """The registered family whose pipeline takes ``transformer`` (its ``transformer`` argument's type)."""
    import inspect
    import typing

    from ..models import adapters

    for adapter_cls in adapters():
        init = adapter_cls.pipeline_class.__init__
        try:
            hint = typing.get_type_hints(init).get("transformer")
        except Exception:  # an annotation that does not resolve here: read it as written
            hint = inspect.signature(init).parameters["transformer"].annotation
        if any(isinstance(kind, type) and isinstance(transformer, kind) for kind in typing.get_args(hint) or (hint,)):
            return adapter_cls.family
    raise ValueError(f"{type(transformer).__name__} is the denoiser of no registered family (fleximmt.models.REGISTRY)")
