"""ComfyUI 0.33's side of the native LTX-2 tests: tiny LTX-2.0 and LTX-2.3 audio-video transformers in ComfyUI's weight format
(``comfy/ldm/lightricks/av_model.py``'s key names, the original checkpoint's) made from diffusers'
``LTX2VideoTransformer3DModel``, their sizes in the file's metadata as ComfyUI's loader reads them, and
ComfyUI's own LTX-2 Gemma tokenizer on fleximmt's tiny Gemma-style sentencepiece model.

ComfyUI reads the audio latents as 8 channels x 16 frequency bins (fixed), so the tiny transformers take 128
audio channels. ComfyUI 0.33 and diffusers 0.42.1 compute one thing differently: the video-to-audio
attention reads the video normalised *after* the block's audio-to-video update in ComfyUI, *before* it in
diffusers. The tiny transformers here close the audio-to-video gate (its modulation table row and
embedding zero), so that both read the same video and the two models agree (the video stream takes no
audio then; the audio stream still reads the video).
"""

from __future__ import annotations

import json

import torch
from comfy_wan import import_comfy

SHAPE = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,
    audio_in_channels=128,
    audio_out_channels=128,
    audio_num_attention_heads=2,
    audio_attention_head_dim=4,
    audio_cross_attention_dim=8,
    num_layers=3,  # RMPM reads blocks 0 and 1: a guidance pass perturbing block 0 changes block 1's features
    caption_channels=16,
    rope_double_precision=False,
    rope_type="split",
    perturbed_attn=True,  # spatio-temporal guidance as ComfyUI runs it on every LTX-2 (no weights of its own)
)
# ComfyUI's LTXAVModel arguments for SHAPE (the loader takes them from the file's metadata): diffusers'
# causal first frame, patch midpoints and cross-attention timestep scale
CONFIG = dict(
    in_channels=SHAPE["in_channels"],
    audio_in_channels=SHAPE["audio_in_channels"],
    num_attention_heads=SHAPE["num_attention_heads"],
    attention_head_dim=SHAPE["attention_head_dim"],
    cross_attention_dim=SHAPE["cross_attention_dim"],
    audio_num_attention_heads=SHAPE["audio_num_attention_heads"],
    audio_attention_head_dim=SHAPE["audio_attention_head_dim"],
    audio_cross_attention_dim=SHAPE["audio_cross_attention_dim"],
    caption_channels=SHAPE["caption_channels"],
    rope_type="split",
    causal_temporal_positioning=True,
    use_middle_indices_grid=True,
    av_ca_timestep_scale_multiplier=1000.0,
    connector_attention_head_dim=8,
    connector_num_attention_heads=2,
    connector_num_layers=1,
)
# LTX-2.3 beside LTX-2.0: per-head gates on every attention, the text modulated by the noise level in the blocks
# (cross_attn_mod), no caption projection in the transformer (the connectors project the text, each stream to
# its width); diffusers' arguments, then ComfyUI's
VARIANTS = {
    "LTX-2": ({}, {}),
    "LTX-2.3": (
        dict(
            gated_attn=True,
            cross_attn_mod=True,
            audio_gated_attn=True,
            audio_cross_attn_mod=True,
            use_prompt_embeddings=False,
        ),
        dict(
            apply_gated_attention=True,
            cross_attention_adaln=True,
            caption_proj_before_connector=True,
            caption_projection_first_linear=False,
            audio_connector_attention_head_dim=4,
            audio_connector_num_attention_heads=2,
        ),
    ),
}
PREFIXES = {  # diffusers' top-level modules -> the original checkpoint's
    "proj_in.": "patchify_proj.",
    "audio_proj_in.": "audio_patchify_proj.",
    "time_embed.": "adaln_single.",
    "audio_time_embed.": "audio_adaln_single.",
    "av_cross_attn_video_scale_shift.": "av_ca_video_scale_shift_adaln_single.",
    "av_cross_attn_video_a2v_gate.": "av_ca_a2v_gate_adaln_single.",
    "av_cross_attn_audio_scale_shift.": "av_ca_audio_scale_shift_adaln_single.",
    "av_cross_attn_audio_v2a_gate.": "av_ca_v2a_gate_adaln_single.",
    "prompt_adaln.": "prompt_adaln_single.",
    "audio_prompt_adaln.": "audio_prompt_adaln_single.",
}
INFIXES = {
    ".video_a2v_cross_attn_scale_shift_table": ".scale_shift_table_a2v_ca_video",
    ".audio_a2v_cross_attn_scale_shift_table": ".scale_shift_table_a2v_ca_audio",
    ".norm_q.": ".q_norm.",
    ".norm_k.": ".k_norm.",
}


def tiny_transformer(seed: int = 0, variant: str = "LTX-2", **shape):
    """A diffusers LTX-2 transformer of :data:`SHAPE` (``shape`` overriding it) and the ``variant``'s settings (seeded), every weight perturbed
    off its zero or one initialisation (so every path counts), the audio-to-video gate closed (see the module's
    docstring)."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(**{**SHAPE, **shape}, **VARIANTS[variant][0]).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in transformer.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
        close_audio_to_video(transformer)
    return transformer


def close_audio_to_video(transformer) -> None:
    gate = transformer.av_cross_attn_video_a2v_gate.linear
    gate.weight.zero_()
    gate.bias.zero_()
    for block in transformer.transformer_blocks:
        block.video_a2v_cross_attn_scale_shift_table[4:].zero_()


def comfy_name(key: str) -> str:
    for old, new in PREFIXES.items():
        if key.startswith(old):
            key = new + key[len(old) :]
    for old, new in INFIXES.items():
        key = key.replace(old, new)
    return key


def comfy_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A diffusers ``LTX2VideoTransformer3DModel``'s weights under ComfyUI's (the original checkpoint's) key
    names, checked by converting them back with diffusers' own converter (``from_single_file``'s) and against
    the keys of ComfyUI's model (all but its text connectors, which run before the blocks)."""
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers

    theirs = transformer.state_dict()
    ours = {comfy_name(key): value.clone() for key, value in theirs.items()}
    # diffusers' converter is LTX-2.0's: LTX-2.3's prompt modulation (prompt_adaln) it leaves out; ComfyUI's keys check it
    later = lambda key: key.startswith(("prompt_adaln", "audio_prompt_adaln"))
    back = convert_ltx2_transformer_to_diffusers({f"model.diffusion_model.{k}": v for k, v in ours.items()})
    back = {key: value for key, value in back.items() if not later(key)}
    known = {key for key in theirs if not later(key)}
    assert set(back) == known, sorted(set(back) ^ known)
    assert all(torch.equal(back[k], theirs[k]) for k in known)
    expected = {k for k in comfy_meta_model(transformer).state_dict() if "embeddings_connector." not in k}
    assert set(ours) == expected, sorted(set(ours) ^ expected)
    return ours


def comfy_config(transformer) -> dict:
    """ComfyUI's LTXAVModel arguments for the transformer (:data:`CONFIG`, its latent channels and its variant's)."""
    variant = VARIANTS["LTX-2.3" if transformer.config.gated_attn else "LTX-2"][1]
    return {**CONFIG, "in_channels": transformer.config.in_channels, **variant}


def comfy_meta_model(transformer=None):
    """ComfyUI's LTX-2 of the transformer's config (default :data:`CONFIG`), on the meta device (its key names)."""
    import_comfy()
    import comfy.ldm.lightricks.av_model as av
    import comfy.ops

    config = CONFIG if transformer is None else comfy_config(transformer)
    with torch.device("meta"):
        layers = SHAPE["num_layers"] if transformer is None else transformer.config.num_layers
        return av.LTXAVModel(num_layers=layers, operations=comfy.ops.disable_weight_init, **config)


def comfy_model(transformer, connectors: bool = False):
    """ComfyUI's own loader (``UNETLoader``'s) on the transformer's weights in ComfyUI's format, its sizes in
    the metadata as LTX-2 files carry them, float32. ``connectors``: with random weights (seeded) for ComfyUI's
    text connectors too, which its sampler runs on the text encoder's output (the model-level tests give the
    blocks the connectors' output themselves)."""
    comfy = import_comfy()
    weights = comfy_state_dict(transformer)
    if connectors:
        gen = torch.Generator().manual_seed(1)
        for key, value in comfy_meta_model(transformer).state_dict().items():
            if "embeddings_connector." in key:
                one = 1.0 if key.endswith("norm.weight") else 0.0
                weights[key] = torch.randn(value.shape, generator=gen) * 0.1 + one
    patcher = comfy.sd.load_diffusion_model_state_dict(
        weights,
        model_options={"dtype": torch.float32},
        metadata={"config": json.dumps({"transformer": comfy_config(transformer)})},
    )
    assert type(patcher.model).__name__ == "LTXAV", type(patcher.model)
    return patcher


def comfy_shaped_components(seed: int = 0, latent_channels: int = SHAPE["in_channels"]) -> dict:
    """fleximmt's tiny LTX-2 pipeline components around a transformer of ComfyUI's shape (:func:`tiny_transformer`)
    and an audio VAE whose latents pack to its 128 audio channels (8 channels x 16 latent mel bins).
    ``latent_channels``: the video latent's (ComfyUI's LTX-2 VAE has 128), the video VAE's and the transformer's."""
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    from fleximmt.toy.tiny_ltx2 import tiny_ltx2_components

    components = tiny_ltx2_components(seed)
    components["transformer"] = tiny_transformer(seed, in_channels=latent_channels, out_channels=latent_channels)
    if latent_channels != components["vae"].config.latent_channels:
        torch.manual_seed(seed)
        vae = type(components["vae"]).from_config({**components["vae"].config, "latent_channels": latent_channels})
        vae.use_framewise_encoding = vae.use_framewise_decoding = False
        components["vae"] = vae.eval()
    old = components["audio_vae"]
    bins = 16 * old.mel_compression_ratio  # the VAE's mel bins for 16 latent bins
    torch.manual_seed(seed)
    audio_vae = AutoencoderKLLTX2Audio.from_config({**old.config, "latent_channels": 8, "mel_bins": bins}).eval()
    packed = 8 * 16  # its normalisation is per packed audio channel (8 x 16), as LTX-2's 128: the pipeline samples
    audio_vae.register_buffer("latents_mean", torch.zeros(packed), persistent=True)
    audio_vae.register_buffer("latents_std", torch.ones(packed), persistent=True)
    components["audio_vae"] = audio_vae
    vocoder = components["vocoder"].config
    channels = old.config.output_channels * bins
    components["vocoder"] = LTX2Vocoder.from_config({**vocoder, "in_channels": channels}).eval()
    return components


class GemmaClip:
    """The tokenizing half of a ComfyUI ``CLIP`` for LTX-2: ComfyUI's own ``LTXAVGemmaTokenizer`` (Gemma's
    settings: ``<bos>`` added, left padding to 1,024 tokens, pad 0) on fleximmt's tiny Gemma-style
    sentencepiece model (the real one ships inside checkpoints only); ``tokenize`` as ``CLIP.tokenize``."""

    def __init__(self) -> None:
        import_comfy()
        from comfy.text_encoders.lt import LTXAVGemmaTokenizer

        from fleximmt.toy.tiny_ltx2 import gemma_sentencepiece

        self.tokenizer = LTXAVGemmaTokenizer(tokenizer_data={"spiece_model": gemma_sentencepiece()})

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def decode(self, ids) -> str:
        return self.tokenizer.gemma3_12b.tokenizer.tokenizer.decode(list(ids))


# ComfyUI's LTX-2 VAEs at the smallest size its loaders accept, for a checkpoint file (the settings come from the
# file's metadata, as LTX-2 checkpoints carry them): the video VAE keeps its 128 latent channels and its 32 x 32
# pixels x 8 frames per latent (ComfyUI fixes both), 8 channels wide; the audio VAE keeps its 8 channels x 16
# mel bins per latent (the transformer's 128 audio channels), 8 channels wide; the vocoder two small upsamplings
VIDEO_VAE = {
    "dims": 3,
    "latent_channels": 128,
    "encoder_blocks": [["res_x", {"num_layers": 1}]] + [["compress_all", {}]] * 3,
    # listed latent side last: ComfyUI's loader knows the VAE by its decoder's up_blocks.0.res_blocks
    "decoder_blocks": [["compress_all", {"residual": True, "multiplier": 2}]] * 3
    + [["res_x", {"num_layers": 1, "inject_noise": False}]],
    "encoder_base_channels": 8,
    "decoder_base_channels": 8,
    "norm_layer": "pixel_norm",
    "patch_size": 4,
    "latent_log_var": "uniform",
    "use_quant_conv": False,
    "causal_decoder": False,
}
AUDIO_VAE = {
    "model": {
        "params": {
            "ddconfig": {
                "double_z": True,
                "mel_bins": 64,
                "z_channels": 8,
                "resolution": 256,
                "downsample_time": False,
                "in_channels": 2,
                "out_ch": 2,
                "ch": 8,
                "ch_mult": [1, 2, 4],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "dropout": 0.0,
                "mid_block_add_attention": False,
                "norm_type": "pixel",
                "causality_axis": "height",
            },
            "sampling_rate": 16000,
        }
    },
    "preprocessing": {"stft": {"filter_length": 1024, "hop_length": 160}},
}
VOCODER = {
    "upsample_rates": [10, 16],
    "upsample_kernel_sizes": [20, 32],
    "upsample_initial_channel": 16,
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3, 5]],
}


def seeded(module, seed: int) -> dict[str, torch.Tensor]:
    """A module's weights replaced by seeded random ones (norms and scales at one), as a state dict."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in module.state_dict().items():
        if not value.is_floating_point():
            out[key] = value
        elif value.ndim <= 1 and ("norm" in key or "std" in key or "scale" in key):
            out[key] = torch.ones(value.shape)
        else:
            fan_in = value[0].numel() if value.ndim > 1 else 1
            out[key] = torch.randn(value.shape, generator=gen) * (0.5 / fan_in**0.5)
    return out


def write_ltx2_checkpoint(path, transformer) -> None:
    """An LTX-2 checkpoint as *Load Checkpoint* and *Load LTXV Audio VAE* read it: the transformer (with random
    text connectors) under ``model.diffusion_model.``, ComfyUI's own video VAE (``vae.``), audio VAE
    (``audio_vae.``) and vocoder (``vocoder.``) at the sizes above with seeded random weights, every part's
    settings in the metadata's ``config``."""
    from safetensors.torch import save_file

    patcher = comfy_model(transformer, connectors=True)  # its keys checked against diffusers' and ComfyUI's
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    config = {"transformer": comfy_config(transformer), "vae": VIDEO_VAE, "audio_vae": AUDIO_VAE, "vocoder": VOCODER}
    weights = {f"model.diffusion_model.{k}": v for k, v in patcher.model.diffusion_model.state_dict().items()}
    weights |= {f"vae.{k}": v for k, v in seeded(VideoVAE(config=VIDEO_VAE), 2).items()}
    audio = AudioVAE(metadata={"config": config})
    weights |= {f"audio_vae.{k}": v for k, v in seeded(audio.autoencoder, 3).items()}
    weights |= {f"vocoder.{k}": v for k, v in seeded(audio.vocoder, 4).items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"config": json.dumps(config)})
