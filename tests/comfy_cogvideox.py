"""ComfyUI 0.33's side of the native CogVideoX tests: tiny CogVideoX 1.5 image-to-video models in ComfyUI's
weight format (``comfy/ldm/cogvideo/model.py``'s key names) made from fleximmt's tiny diffusers ones, and
ComfyUI's own CogVideoX tokenizer (T5, whose real files ComfyUI's source holds).

ComfyUI reads some sizes as fixed (heads of 64 channels; CogVideoX 1.5's patch of 2 x 2 x 2 from a
linear patch embedding), so the tiny models have 2 heads of 64. They are shaped like CogVideoX 1.5
(rotary positions, an ``ofs`` embedding, no learned positional embedding): ComfyUI 0.33 reads a checkpoint
with learned positional embeddings as one without rotary positions, which CogVideoX 1.0 I2V in diffusers
has both of, so a 1.0-shaped tiny model would compute another function in each.
"""

from __future__ import annotations

import torch
from comfy_wan import import_comfy

SHAPE = dict(latent_channels=16, heads=2, head_dim=64, text_dim=32, time_embed_dim=32, num_layers=2, version="1.5")
TEXT = 226  # ComfyUI's CogVideoX T5 tokenizer pads to 226 tokens, as diffusers' pipeline does
RENAMES = (
    ("transformer_blocks.", "blocks."),
    (".attn1.to_q.", ".q."),
    (".attn1.to_k.", ".k."),
    (".attn1.to_v.", ".v."),
    (".attn1.norm_q.", ".norm_q."),
    (".attn1.norm_k.", ".norm_k."),
    (".attn1.to_out.0.", ".attn_out."),
    (".ff.net.0.proj.", ".ff_proj."),
    (".ff.net.2.", ".ff_out."),
    ("time_embedding.linear_", "time_embedding_linear_"),
    ("ofs_embedding.linear_", "ofs_embedding_linear_"),
)


def comfy_name(key: str) -> str:
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def comfy_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A diffusers ``CogVideoXTransformer3DModel``'s weights under ComfyUI's key names. ComfyUI 0.33's
    CogVideoX 1.5 patch embedding always has a bias, diffusers' has none (``patch_bias=False``): a zero bias
    computes what diffusers computes. Every parameter of ComfyUI's model gets a value (checked)."""
    import_comfy()
    import comfy.ldm.cogvideo.model as cogvideo
    import comfy.ops

    ours = {comfy_name(key): value.clone() for key, value in transformer.state_dict().items()}
    if "patch_embed.proj.bias" not in ours:
        ours["patch_embed.proj.bias"] = torch.zeros(transformer.config.num_attention_heads * 64)
    cfg = transformer.config
    with torch.device("meta"):
        model = cogvideo.CogVideoXTransformer3DModel(
            num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=64,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            time_embed_dim=cfg.time_embed_dim,
            ofs_embed_dim=cfg.ofs_embed_dim,
            text_embed_dim=cfg.text_embed_dim,
            num_layers=cfg.num_layers,
            patch_size_t=cfg.patch_size_t,
            use_rotary_positional_embeddings=True,
            operations=comfy.ops.disable_weight_init,
        )
    theirs = {k for k, _ in model.named_parameters()}
    assert set(ours) == theirs, sorted(set(ours) ^ theirs)
    return ours


def comfy_model(transformer):
    """ComfyUI's own loader (``UNETLoader``'s) on the transformer's weights in ComfyUI's format, float32."""
    comfy = import_comfy()
    patcher = comfy.sd.load_diffusion_model_state_dict(
        comfy_state_dict(transformer), model_options={"dtype": torch.float32}
    )
    assert type(patcher.model).__name__ == "CogVideoX", type(patcher.model)
    return patcher


class T5Clip:
    """The tokenizing half of a ComfyUI ``CLIP`` for CogVideoX: ComfyUI's own ``CogVideoXTokenizer`` (T5,
    its real tokenizer files, padded to 226); ``tokenize`` as ``CLIP.tokenize``."""

    def __init__(self) -> None:
        import_comfy()
        from comfy.text_encoders.cogvideo import CogVideoXTokenizer

        self.tokenizer = CogVideoXTokenizer()

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def decode(self, ids) -> str:
        return self.tokenizer.clip_t5xxl.tokenizer.decode(list(ids))


def write_cogvideox_vae(path) -> None:
    """Random weights (seeded, float16) for ComfyUI's CogVideoX VAE, whose loader reads a fixed config: its
    own *Load VAE* then loads them."""
    import_comfy()
    import comfy.ldm.cogvideo.vae as vae
    from comfy_native import write_random_weights

    with torch.device("meta"):
        model = vae.AutoencoderKLCogVideoX(latent_channels=16)
    write_random_weights(model, path)
