"""Tiny random-weight HunyuanVideo 1.5 image-to-video components, built offline (no hub): a Qwen2.5-VL
text model with a byte-level BPE Qwen2 tokenizer made from a small vocabulary (and Qwen's chat
template), ByT5's byte tokenizer with a tiny T5 encoder, a tiny SigLIP image encoder, VAE and
transformer, shaped as diffusers' own fast tests shape them, and the contract suite's row for them."""

from __future__ import annotations

import torch

from .contract import ContractRow
from .vocabulary import WORDS

# Qwen2.5's chat template, as its tokenizer_config.json has it for a system and a user message
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_qwen_tokenizer(words: tuple[str, ...] = WORDS):
    """A byte-level BPE ``Qwen2Tokenizer``: every byte, plus merges that make each of ``words`` (alone and
    after a space) one token, as a real BPE vocabulary makes common words; Qwen's special tokens and
    chat template. Mid-sentence words tokenise differently from the word alone, as with the real one."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = []  # the forms after a space first: their merges rank first, so " dog" becomes one token
    to_chars = bytes_to_unicode()
    for form in [" " + word for word in words] + list(words):
        chars = "".join(to_chars[b] for b in form.encode())
        piece = chars[0]
        for ch in chars[1:]:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    for token in SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_hunyuan15_components(
    seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    target_size: int = 32,
    words: tuple[str, ...] = WORDS,
) -> dict:
    """Random-weight components of a ``HunyuanVideo15ImageToVideoPipeline`` (seeded): a 4x spatial, 4x
    temporal VAE of 4 latent channels, ``target_size`` pixels (the pipeline sizes the video from it and
    the image's aspect), CFG through diffusers' ``ClassifierFreeGuidance`` guider."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = tiny_qwen_tokenizer(tuple(words))
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=num_layers,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=32,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=target_size,
        task_type="i2v",
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        )
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=384, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8
        )
    )
    torch.manual_seed(seed + 4)
    image_encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=12,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        )
    )
    components = dict(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
        image_encoder=image_encoder,
        feature_extractor=SiglipImageProcessorPil(size={"height": 16, "width": 16}),
    )
    for model in (transformer, vae, text_encoder, text_encoder_2, image_encoder):
        model.eval()
    return components


def tiny_hunyuan15_pipeline(seed: int = 0, **config):
    """A ``FlexiMMTHunyuanVideo15Pipeline`` of tiny random-weight components (see :func:`tiny_hunyuan15_components`)."""
    from ..models.hunyuan15 import FlexiMMTHunyuanVideo15Pipeline

    pipe = FlexiMMTHunyuanVideo15Pipeline(**tiny_hunyuan15_components(seed, **config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


CONTRACT_ROWS = (  # its pipeline has no step callback; FlexiMMT's adds one
    ContractRow(
        "hunyuanvideo-1.5",
        lambda: tiny_hunyuan15_components(0),
        size=(32, 48, 9),
        call=dict(num_inference_steps=2),
        scale=30.0,
        added_arguments=("callback_on_step_end",),
        fused_projections=False,
    ),
)
