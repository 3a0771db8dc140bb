"""ComfyUI's side of the native tests: ComfyUI imported in-process (CPU), tiny Wan models in ComfyUI's
weight format made from fleximmt's tiny diffusers ones, and a tiny umT5-style tokenizer.

ComfyUI reads some Wan sizes as fixed (heads of 128 channels, umT5's 4096-wide text, a 256-wide time
embedding, CLIP-H's 1280-wide image features), so the tiny models here have those widths and 1 head.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import torch
from wan_names import original_name

COMFYUI = Path(os.environ.get("COMFYUI") or Path(__file__).resolve().parents[2] / "shared" / "comfyui")
SHAPE = dict(num_layers=2, heads=1, head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=64, image_dim=1280)
SENTENCES = [
    "A ball jumps up. A box slides left.",
    "The cat (jumps) while the dog runs quickly.",
    "A dog walks on the snow, a cat runs right and jumps.",
]


def import_comfy():
    """ComfyUI's modules, imported in this process on the CPU."""
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.sd

    return comfy


def comfy_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A diffusers ``WanTransformer3DModel``'s weights under ComfyUI's key names, checked by converting
    them back with diffusers' own converter (``from_single_file``'s)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    theirs = transformer.state_dict()
    ours = {original_name(key): value.clone() for key, value in theirs.items()}
    back = convert_wan_transformer_to_diffusers(dict(ours))
    assert set(back) == set(theirs), sorted(set(back) ^ set(theirs))
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    return ours


def comfy_model(transformer):
    """ComfyUI's own loader (``UNETLoader``'s) on the transformer's weights in ComfyUI's format, float32."""
    comfy = import_comfy()
    return comfy.sd.load_diffusion_model_state_dict(
        comfy_state_dict(transformer), model_options={"dtype": torch.float32}
    )


def spiece_model(sentences=SENTENCES) -> bytes:
    """A tiny sentencepiece model with umT5's special ids (pad 0, end 1), trained here on ``sentences``."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences) * 40),
        model_writer=out,
        vocab_size=80,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return out.getvalue()


class TokenizerClip:
    """The tokenizing half of a ComfyUI ``CLIP`` for Wan: ComfyUI's own ``WanT5Tokenizer`` (umT5's
    settings: 512 tokens at least, pad 0) on a tiny sentencepiece model; ``tokenize`` as ``CLIP.tokenize``."""

    def __init__(self, model: bytes | None = None) -> None:
        import_comfy()
        from comfy.text_encoders.wan import WanT5Tokenizer

        self.tokenizer = WanT5Tokenizer(tokenizer_data={"spiece_model": model or spiece_model()})

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def decode(self, ids) -> str:
        inner = getattr(self.tokenizer, self.tokenizer.clip)
        return inner.tokenizer.tokenizer.decode(list(ids))


def comfy_forward(patcher, x, timestep, context, clip_fea=None, sigma=0.5, cond_or_uncond=(0,)):
    """One call of ComfyUI's Wan model as its sampler makes it (``comfy_native.model_call``)."""
    from comfy_native import model_call

    return model_call(patcher, x, timestep, context, clip_fea=clip_fea, sigma=sigma, cond_or_uncond=cond_or_uncond)


def write_wan_vae(path) -> None:
    """Random weights (seeded, float16) for ComfyUI's Wan 2.1 VAE, whose loader reads a fixed config
    (96 channels): ComfyUI's own *Load VAE* then loads them."""
    comfy = import_comfy()
    import comfy.ldm.wan.vae  # noqa: F811 - loads the module into the package import_comfy found
    from comfy_native import write_random_weights

    with torch.device("meta"):
        vae = comfy.ldm.wan.vae.WanVAE(
            dim=96,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=2,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            dropout=0.0,
        )
    write_random_weights(vae, path)
