"""ComfyUI 0.33's side of the native HunyuanVideo 1.5 tests: tiny HunyuanVideo 1.5 image-to-video models in
ComfyUI's weight format (``comfy/ldm/hunyuan_video/model.py``'s key names, the original checkpoint's)
made from diffusers' ``HunyuanVideo15Transformer3DModel``, and ComfyUI's own HunyuanVideo 1.5 tokenizer
(Qwen2.5 with its chat template, and ByT5 for quoted text; both real, in ComfyUI's source).

ComfyUI reads some sizes as fixed (heads of 128 channels, rotary axes 16/56/56, an MLP ratio of 4, two
refiner blocks, ByT5's 1472-wide and SigLIP's 1152-wide features), so the tiny models have those widths
and 1 head; the Qwen2.5 features are 16 wide (ComfyUI reads that width from the weights).
"""

from __future__ import annotations

import re

import torch
from comfy_wan import import_comfy

SHAPE = dict(
    in_channels=65,
    out_channels=32,
    num_attention_heads=1,
    attention_head_dim=128,
    num_layers=2,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=1,
    patch_size_t=1,
    text_embed_dim=16,
    text_embed_2_dim=1472,
    image_embed_dim=1152,
    rope_axes_dim=(16, 56, 56),
    target_size=32,
    task_type="i2v",
)
RENAMES = (
    ("x_embedder.", "img_in."),
    ("image_embedder.norm_in.", "vision_in.proj.0."),
    ("image_embedder.linear_1.", "vision_in.proj.1."),
    ("image_embedder.linear_2.", "vision_in.proj.3."),
    ("image_embedder.norm_out.", "vision_in.proj.4."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1.", "txt_in.t_embedder.in_layer."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2.", "txt_in.t_embedder.out_layer."),
    ("context_embedder.time_text_embed.text_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("context_embedder.time_text_embed.text_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("context_embedder.proj_in.", "txt_in.input_embedder."),
    ("context_embedder.token_refiner.refiner_blocks.", "txt_in.individual_token_refiner.blocks."),
    (".attn.to_out.0.", ".self_attn.proj."),
    (".norm_out.linear.", ".adaLN_modulation.1."),
    (".ff.net.0.proj.", ".mlp.0."),
    (".ff.net.2.", ".mlp.2."),
    ("context_embedder_2.norm.", "byt5_in.layernorm."),
    ("context_embedder_2.linear_", "byt5_in.fc"),
    ("time_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
    ("time_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
    ("cond_type_embed.", "cond_type_embedding."),
)
BLOCK = (  # inside transformer_blocks.N (double_blocks.N)
    ("norm1.linear.", "img_mod.lin."),
    ("norm1_context.linear.", "txt_mod.lin."),
    ("attn.norm_q.", "img_attn.norm.query_norm."),
    ("attn.norm_k.", "img_attn.norm.key_norm."),
    ("attn.to_out.0.", "img_attn.proj."),
    ("attn.norm_added_q.", "txt_attn.norm.query_norm."),
    ("attn.norm_added_k.", "txt_attn.norm.key_norm."),
    ("attn.to_add_out.", "txt_attn.proj."),
    ("ff.net.0.proj.", "img_mlp.0."),
    ("ff.net.2.", "img_mlp.2."),
    ("ff_context.net.0.proj.", "txt_mlp.0."),
    ("ff_context.net.2.", "txt_mlp.2."),
)
QKV = {  # (parts in order) -> the fused projection
    ("attn.to_q.", "attn.to_k.", "attn.to_v."): "img_attn.qkv.",
    ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."): "txt_attn.qkv.",
}


def comfy_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A diffusers ``HunyuanVideo15Transformer3DModel``'s weights under ComfyUI's (the original
    checkpoint's) key names: q, k and v fused, the final norm's (scale, shift) swapped to ComfyUI's
    (shift, scale). Every parameter of ComfyUI's model gets a value (checked against a meta-device one)."""
    theirs = transformer.state_dict()
    ours = {}
    for key, value in theirs.items():
        block = re.match(r"transformer_blocks\.(\d+)\.(.*)", key)
        if block:
            index, rest = block.groups()
            if any(rest.startswith(part) for parts in QKV for part in parts):
                continue
            for old, new in BLOCK:
                rest = rest.replace(old, new) if rest.startswith(old) else rest
            ours[f"double_blocks.{index}.{rest}"] = value.clone()
        elif key.startswith("norm_out.linear."):
            scale, shift = value.chunk(2)
            ours["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = torch.cat([shift, scale])
        elif key.startswith("proj_out."):
            ours["final_layer.linear." + key.rsplit(".", 1)[1]] = value.clone()
        else:
            for old, new in RENAMES:
                key = key.replace(old, new)
            ours[key] = value.clone()
    for index in range(transformer.config.num_layers):
        for parts, fused in QKV.items():
            for kind in ("weight", "bias"):
                ours[f"double_blocks.{index}.{fused}{kind}"] = torch.cat(
                    [theirs[f"transformer_blocks.{index}.{part}{kind}"] for part in parts]
                )
    for index in range(transformer.config.num_refiner_layers):
        prefix = f"txt_in.individual_token_refiner.blocks.{index}."
        for kind in ("weight", "bias"):
            parts = [ours.pop(f"{prefix}attn.to_{p}.{kind}") for p in "qkv"]
            ours[f"{prefix}self_attn.qkv.{kind}"] = torch.cat(parts)
    expected = set(comfy_meta_model(transformer).state_dict())
    assert set(ours) == expected, sorted(set(ours) ^ expected)
    return ours


def comfy_shaped_components(seed: int = 0) -> dict:
    """fleximmt's tiny HunyuanVideo 1.5 pipeline components around a transformer of ComfyUI's shape
    (:data:`SHAPE`, seeded): its VAE with 32 latent channels as ComfyUI's latents have, its ByT5 and SigLIP
    encoders widened to the 1472 and 1152 features ComfyUI's model takes (one layer each)."""
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel

    from fleximmt.toy.tiny_hunyuan15 import tiny_hunyuan15_components

    components = tiny_hunyuan15_components(seed)
    torch.manual_seed(seed)
    components["transformer"] = HunyuanVideo15Transformer3DModel(**SHAPE).eval()
    components["vae"] = AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=SHAPE["out_channels"],
        block_out_channels=(64, 64, 64),  # its encoder's output groups 64 channels into 2 x 32
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
        downsample_match_channel=False,
        upsample_match_channel=False,
    ).eval()
    components["text_encoder_2"] = T5EncoderModel(
        T5Config(vocab_size=384, d_model=SHAPE["text_embed_2_dim"], d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).eval()
    vision = dict(intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)
    components["image_encoder"] = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=SHAPE["image_embed_dim"], **vision)
    ).eval()
    return components


def comfy_meta_model(transformer):
    """ComfyUI's HunyuanVideo 1.5 of the transformer's shape, on the meta device (its key names)."""
    import_comfy()
    import comfy.ldm.hunyuan_video.model as hunyuan
    import comfy.ops

    cfg = transformer.config
    with torch.device("meta"):
        return hunyuan.HunyuanVideo(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            vec_in_dim=None,
            context_in_dim=cfg.text_embed_dim,
            hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
            mlp_ratio=cfg.mlp_ratio,
            num_heads=cfg.num_attention_heads,
            depth=cfg.num_layers,
            depth_single_blocks=0,
            axes_dim=list(cfg.rope_axes_dim),
            theta=256,
            patch_size=[cfg.patch_size_t, cfg.patch_size, cfg.patch_size],
            qkv_bias=True,
            guidance_embed=False,
            byt5=True,
            meanflow=False,
            use_cond_type_embedding=True,
            vision_in_dim=cfg.image_embed_dim,
            meanflow_sum=False,
            operations=comfy.ops.disable_weight_init,
        )


def comfy_model(transformer):
    """ComfyUI's own loader (``UNETLoader``'s) on the transformer's weights in ComfyUI's format, float32."""
    comfy = import_comfy()
    patcher = comfy.sd.load_diffusion_model_state_dict(
        comfy_state_dict(transformer), model_options={"dtype": torch.float32}
    )
    assert type(patcher.model).__name__ == "HunyuanVideo15", type(patcher.model)
    return patcher


class QwenClip:
    """The tokenizing half of a ComfyUI ``CLIP`` for HunyuanVideo 1.5: ComfyUI's own
    ``HunyuanVideo15Tokenizer`` (Qwen2.5 in the chat template, ByT5 for quoted text; the real tokenizers);
    ``tokenize`` as ``CLIP.tokenize``."""

    def __init__(self) -> None:
        import_comfy()
        from comfy.text_encoders.hunyuan_video import HunyuanVideo15Tokenizer

        self.tokenizer = HunyuanVideo15Tokenizer()

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def decode(self, ids) -> str:
        return self.tokenizer.qwen25_7b.tokenizer.decode(list(ids))


def write_hunyuan15_vae(path) -> None:
    """Random weights (seeded, float16) for ComfyUI's HunyuanVideo 1.5 VAE (16x spatial, 4x temporal, 32 latent
    channels, causal: a video encodes as one), whose loader reads a fixed config: its own *Load VAE* then loads
    them. Its weights are named ``decoder.conv_in.conv.*`` (the causal convolutions); a VAE of 3D weights named
    ``decoder.conv_in.*`` is HunyuanImage 2.1's, which ComfyUI encodes a frame at a time."""
    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    from comfy_native import write_random_weights

    config = {  # comfy/sd.py's, for a decoder.conv_in.conv of 32 channels
        "block_out_channels": [128, 256, 512, 1024, 1024],
        "in_channels": 3,
        "out_channels": 3,
        "num_res_blocks": 2,
        "ffactor_spatial": 16,
        "ffactor_temporal": 4,
        "downsample_match_channel": True,
        "upsample_match_channel": True,
        "z_channels": 32,
    }
    with torch.device("meta"):
        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.EmptyRegularizer"},
            encoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Encoder", "params": config},
            decoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Decoder", "params": config},
        )
    write_random_weights(model, path)
