"""Tiny random-weight Wan image-to-video components (Wan 2.1 I2V, Wan 2.2 I2V-A14B and TI2V-5B), built from
configs with diffusers' own classes as diffusers' fast tests build them, and the contract suite's rows for them."""

from __future__ import annotations

import torch

from .contract import ContractRow
from .vocabulary import WORDS, tiny_t5_encoder, tiny_tokenizer

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
    text_encoder = tiny_t5_encoder(UMT5EncoderModel, UMT5Config, len(tokenizer), text_dim)
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


CALL = dict(num_inference_steps=2, max_sequence_length=24)  # two steps: Wan 2.2 A14B's two experts each run one
CONTRACT_ROWS = (
    ContractRow(
        "wan-2.1",
        lambda: tiny_wan_components(0, "2.1"),
        size=(64, 64, 9),
        call=CALL,
        scale=30.0,
        fast_backends=("auto", "flex"),
    ),
    ContractRow("wan-2.2-a14b", lambda: tiny_wan_components(0, "2.2"), size=(64, 64, 9), call=CALL, scale=30.0),
    ContractRow("wan-2.2-ti2v", lambda: tiny_wan_components(0, "2.2-ti2v"), size=(64, 64, 9), call=CALL, scale=30.0),
)
