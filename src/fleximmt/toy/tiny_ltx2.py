"""Tiny random-weight LTX-2 image-to-video components, built offline (no hub): a Gemma 3 text model with a
Gemma-style tokenizer made here from a small sentencepiece model, LTX-2's text connectors (with learnable
registers, as Lightricks/LTX-2 ships them), a video VAE of 8x spatial and 2x temporal compression, an
audio VAE and vocoder, and the audio-video transformer, shaped as diffusers' own fast tests shape them; and the
contract suite's row for them.

The tokenizer: the real Gemma tokenizer ships inside checkpoints only, so a sentencepiece BPE model is
trained here, in memory and in milliseconds, with Gemma's settings - byte fallback, no dummy prefix,
whitespace kept as it is, digits split, ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3 and the
turn markers - on sentences of ``toy.vocabulary.WORDS``. ``tiny_gemma_tokenizer`` turns it into transformers'
``GemmaTokenizer`` the way transformers converts Gemma's own (vocabulary and merges from the pieces, a
``<bos>`` in front); ComfyUI reads the same model with sentencepiece itself (``gemma_sentencepiece``).
"""

from __future__ import annotations

import functools
import io
import random

import torch

from .contract import ContractRow
from .vocabulary import WORDS

SPECIAL = ("<mask>", "<start_of_turn>", "<end_of_turn>")  # Gemma's user-defined pieces after <pad>, <eos>, <bos>, <unk>
VOCAB_SIZE = 500  # 256 byte pieces, the specials, and merges enough for every word of WORDS


@functools.lru_cache(maxsize=4)
def gemma_sentencepiece(words: tuple[str, ...] = tuple(WORDS), vocab_size: int = VOCAB_SIZE) -> bytes:
    """A sentencepiece BPE model (its serialized bytes) with Gemma's settings, trained on seeded sentences of
    ``words`` with punctuation, brackets and quotes: the same bytes at every call."""
    import sentencepiece as spm

    rng = random.Random(0)
    vocabulary = sorted(set(words) - {".", ","})
    sentences = []
    for _ in range(400):
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 9)))
        sentences.append(text[0].upper() + text[1:] + rng.choice(".!,?;"))
    sentences += [f"({word})" for word in vocabulary] + [f'"{word}"' for word in vocabulary]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(SPECIAL),
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def tiny_gemma_tokenizer(words: tuple[str, ...] = tuple(WORDS)):
    """transformers' ``GemmaTokenizer`` of :func:`gemma_sentencepiece`'s model: its pieces as the vocabulary,
    merges ordered by the pieces' scores (as transformers' Gemma converter orders them), ``<bos>`` added in
    front, the turn markers special. It tokenises as sentencepiece does (tests/test_ltx2.py checks it)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    processor = spm.SentencePieceProcessor(model_proto=gemma_sentencepiece(tuple(words)))
    pieces = range(processor.get_piece_size())
    vocab = {processor.id_to_piece(i): i for i in pieces}
    scores = {processor.id_to_piece(i): processor.get_score(i) for i in pieces}
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=generate_merges(vocab, scores), add_bos_token=True, add_eos_token=False
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL[1:])})
    return tokenizer


def tiny_ltx2_components(
    seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    text_dim: int = 16,
    registers: int | None = 8,
    perturbed_attn: bool = False,
    words: tuple[str, ...] = tuple(WORDS),
) -> dict:
    """Random-weight components of an ``LTX2ImageToVideoPipeline`` (seeded). ``registers``: the text
    connectors' learnable registers (None: none, the padding stays where the tokenizer put it);
    ``perturbed_attn``: LTX-2.3's blocks, whose self-attention spatio-temporal guidance perturbs. Sizes
    must be multiples of 32 (diffusers' check); frames are 2k+1 (the VAE's 2x temporal compression)."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    tokenizer = tiny_gemma_tokenizer(tuple(words))
    text_layers = 2
    torch.manual_seed(seed)
    text_encoder = Gemma3ForConditionalGeneration(
        Gemma3Config(
            text_config=Gemma3TextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_dim,
                intermediate_size=text_dim,
                num_hidden_layers=text_layers,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                sliding_window=8,
                max_position_embeddings=2048,
            ),
            vision_config=SiglipVisionConfig(
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
            ),
            mm_tokens_per_image=4,
            image_token_index=len(tokenizer) - 1,
        )
    )
    torch.manual_seed(seed + 1)
    connectors = LTX2TextConnectors(
        caption_channels=text_dim,
        text_proj_in_factor=text_layers + 1,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=text_dim // 2,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=registers,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=text_dim // 2,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=registers,
        connector_rope_base_seq_len=32,
        rope_double_precision=False,
        rope_type="split",
    )
    torch.manual_seed(seed + 2)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=num_layers,
        caption_channels=text_dim,
        rope_double_precision=False,
        rope_type="split",
        perturbed_attn=perturbed_attn,
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLLTX2Video(  # 4x4 patches, one spatial and one temporal downsampling: 8x and 2x, as decoded
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        decoder_block_out_channels=(8,),
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial", "temporal"),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
        spatial_compression_ratio=8,
        temporal_compression_ratio=2,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    torch.manual_seed(seed + 4)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    torch.manual_seed(seed + 5)
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    # LTX's schedule: shifted by the video's token count (LTX-Video's published scheduler config)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096
    )
    for model in (text_encoder, connectors, transformer, vae, audio_vae, vocoder):
        model.eval()
    return dict(
        transformer=transformer,
        vae=vae,
        audio_vae=audio_vae,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        vocoder=vocoder,
    )


def tiny_ltx2_pipeline(seed: int = 0, **config):
    """A ``FlexiMMTLTX2ImageToVideoPipeline`` of tiny random-weight components (see :func:`tiny_ltx2_components`)."""
    from ..models.ltx2 import FlexiMMTLTX2ImageToVideoPipeline

    pipe = FlexiMMTLTX2ImageToVideoPipeline(**tiny_ltx2_components(seed, **config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# diffusers refuses sizes that are not multiples of 32; image_crf=0 leaves out the image's H.264 re-compression,
# which needs PyAV (tests go without); diffusers' fuse_qkv_projections fails on LTX-2's audio-video attentions,
# whose query and key widths differ
CONTRACT_ROWS = (
    ContractRow(
        "ltx-2",
        lambda: tiny_ltx2_components(0),
        size=(64, 64, 9),
        call=dict(num_inference_steps=2, max_sequence_length=16, image_crf=0),
        scale=30.0,
        fused_projections=False,
    ),
)
