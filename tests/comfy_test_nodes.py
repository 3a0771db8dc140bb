"""Test-only ComfyUI nodes, loaded by the test server from its custom_nodes/ (never shipped).

ComfyUI's *Load CLIP* builds umT5-XXL from a fixed full-size config (5.7B parameters), which this
machine cannot hold for a test; ``TestOnlyTinyUMT5`` builds the same kind of CLIP - ComfyUI's own
umT5 text model class and its ``WanT5Tokenizer`` (512 tokens at least, pad 0) - at a tiny size: one
layer, 4096 wide as Wan expects, random weights (seeded), a sentencepiece model trained here on a
few sentences. Everything else in the test graphs is ComfyUI's own nodes and loaders.
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.text_encoders.t5
import comfy.text_encoders.wan
import comfy.utils
import torch

# ComfyUI 0.33 sends a progress update without a preview only 100 ms or more after the last one sent
# (comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL); a toy Learn step takes less on a quiet machine. The tests
# count every update the nodes make, so the test server sends them all (0.3.64 has no such throttle).
if hasattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL"):
    comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.0
    comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT = 0.0

SENTENCES = [
    "A ball jumps up. A box slides left.",
    "The cat (jumps) while the dog runs quickly.",
    "A dog walks on the snow, a cat runs right and jumps.",
    "A red ball and a blue box on a grey floor.",
]


def spiece_model() -> bytes:
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 40),
        model_writer=out,
        vocab_size=80,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    return out.getvalue()


def tiny_config(vocab: int) -> str:
    config = {
        "d_ff": 64,
        "d_kv": 16,
        "d_model": 4096,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_pytorch_tanh",
        "dropout_rate": 0.0,
        "eos_token_id": 1,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "umt5",
        "num_decoder_layers": 1,
        "num_heads": 2,
        "num_layers": 1,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
    }
    fd, path = tempfile.mkstemp(prefix="tiny-umt5-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    return path


class TinyUMT5(comfy.sd1_clip.SDClipModel):
    config_path: str = ""

    def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):  # noqa: B006
        super().__init__(
            device=device,
            layer=layer,
            layer_idx=layer_idx,
            textmodel_json_config=self.config_path,
            dtype=dtype,
            special_tokens={"end": 1, "pad": 0},
            model_class=comfy.text_encoders.t5.T5,
            enable_attention_masks=True,
            zero_out_masked=True,
            model_options=model_options,
        )


class TinyWanT5Model(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006
        super().__init__(
            device=device, dtype=dtype, model_options=model_options, name="umt5xxl", clip_model=TinyUMT5, **kwargs
        )


class TinyUMT5Loader:
    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    def load(self, seed):
        model = spiece_model()
        import sentencepiece

        TinyUMT5.config_path = tiny_config(sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size())
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer, TinyWanT5Model)
        clip = comfy.sd.CLIP(target, tokenizer_data={"spiece_model": model}, model_options={"dtype": torch.float32})
        gen = torch.Generator().manual_seed(seed)
        weights = {}
        for key, value in clip.cond_stage_model.state_dict().items():
            if "layer_norm" in key:
                weights[key] = torch.ones(value.shape)
            else:
                weights[key] = torch.randn(value.shape, generator=gen) * (
                    0.5 / (value.shape[-1] if value.ndim else 1) ** 0.5
                )
        missing, unexpected = clip.load_sd(weights, full_model=True)
        assert not missing and not unexpected, (missing, unexpected)
        os.unlink(TinyUMT5.config_path)
        return (clip,)


def random_weights(clip, seed: int) -> None:
    """Seeded random weights for every tensor of a CLIP's text model (norms at one), loaded whole."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, value in clip.cond_stage_model.state_dict().items():
        if "norm" in key:
            weights[key] = torch.ones(value.shape)
        else:
            weights[key] = torch.randn(value.shape, generator=gen) * (
                0.5 / (value.shape[-1] if value.ndim else 1) ** 0.5
            )
    missing, unexpected = clip.load_sd(weights, full_model=True)
    assert not missing and not unexpected, (missing, unexpected)


def t5_config(width: int, vocab: int) -> dict:
    """A one-layer T5 encoder's config (ComfyUI's ``comfy.text_encoders.t5.T5``), ``width`` wide."""
    return {
        "d_ff": 32,
        "d_kv": 8,
        "d_model": width,
        "dense_act_fn": "gelu_pytorch_tanh",
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_heads": 2,
        "num_layers": 1,
        "relative_attention_num_buckets": 32,
        "vocab_size": vocab,
    }


class TinyTextEncoder:
    """A test-only loader node of a tiny CLIP, ``width`` wide (the tiny model's text width), random weights (seeded)."""

    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    WIDTH = 16

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "width": ("INT", {"default": cls.WIDTH})}}


def text_only(model_class, config_class, vision: tuple[str, ...]):
    """ComfyUI's language model class ``model_class`` built without its vision parts (the attributes ``vision``
    left None): no image enters the tests' prompts, and the vision towers' configs are fixed at full size."""
    import comfy.text_encoders.llama as llama

    class TextOnly(model_class):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = config_class(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype
            for name in vision:
                setattr(self, name, None)

    return TextOnly


class TinyCogVideoXT5(TinyTextEncoder):
    """CogVideoX's CLIP (ComfyUI's ``CLIPLoader`` type cogvideox) at a tiny size: ComfyUI's own T5 text model
    class at one layer and ``width`` wide (the tiny CogVideoX's text width), its real T5 tokenizer
    (``CogVideoXTokenizer``, padded to 226 tokens), random weights (seeded)."""

    WIDTH = 32

    def load(self, seed, width):
        import comfy.text_encoders.cogvideo

        config = t5_config(width, 32128)

        class T5(comfy.sd1_clip.SDClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006
                super().__init__(
                    device=device,
                    textmodel_json_config=config,
                    dtype=dtype,
                    special_tokens={"end": 1, "pad": 0},
                    model_class=comfy.text_encoders.t5.T5,
                    model_options={**model_options, "model_name": "t5xxl"},
                )

        class Model(comfy.sd1_clip.SD1ClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
                super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=T5, model_options=model_options)

        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.cogvideo.CogVideoXTokenizer, Model)
        clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
        random_weights(clip, seed)
        return (clip,)


class TinyHunyuanVideo15TextEncoder(TinyTextEncoder):
    """HunyuanVideo 1.5's CLIP (ComfyUI's ``DualCLIPLoader`` type hunyuan_video_15) at a tiny size: ComfyUI's
    own Qwen2.5 language model class (four layers: ComfyUI reads the third last, ``width`` wide, its vision tower left out: no image
    enters the prompt) and ByT5 class (one layer, 1472 wide as the model takes), its own
    ``HunyuanVideo15Tokenizer`` (the real Qwen2.5 and ByT5 tokenizers) and encoder (template crop, ByT5 for
    quoted text); random weights (seeded)."""

    def load(self, seed, width):
        import comfy.text_encoders.hunyuan_image as hunyuan_image
        import comfy.text_encoders.hunyuan_video
        import comfy.text_encoders.llama as llama

        qwen = {
            "vocab_size": 152064,
            "hidden_size": width,
            "intermediate_size": 16,
            "num_hidden_layers": 4,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
        }

        Qwen = text_only(llama.Qwen25_7BVLI, llama.Qwen25_7BVLI_Config, ("visual",))

        class QwenModel(comfy.sd1_clip.SDClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006
                super().__init__(
                    device=device,
                    layer="hidden",
                    layer_idx=-3,
                    textmodel_json_config=qwen,
                    dtype=dtype,
                    special_tokens={"pad": 151643},
                    layer_norm_hidden_state=False,
                    model_class=Qwen,
                    enable_attention_masks=True,
                    return_attention_masks=True,
                    model_options=model_options,
                )

        class ByT5(comfy.sd1_clip.SDClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
                super().__init__(
                    device=device,
                    textmodel_json_config=t5_config(1472, 1510),
                    dtype=dtype,
                    model_options=model_options,
                    special_tokens={"end": 1, "pad": 0},
                    model_class=comfy.text_encoders.t5.T5,
                    enable_attention_masks=True,
                    zero_out_masked=True,
                )

        class Model(hunyuan_image.HunyuanImageTEModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
                super(hunyuan_image.QwenImageTEModel, self).__init__(
                    device=device, dtype=dtype, name="qwen25_7b", clip_model=QwenModel, model_options=model_options
                )
                self.byt5_small = ByT5(device=device, dtype=dtype, model_options=model_options)

        tokenizer = comfy.text_encoders.hunyuan_video.HunyuanVideo15Tokenizer
        clip = comfy.sd.CLIP(
            comfy.supported_models_base.ClipTarget(tokenizer, Model), model_options={"dtype": torch.float32}
        )
        random_weights(clip, seed)
        return (clip,)


class TinyVisionTokens:
    """A ``CLIP_VISION_OUTPUT`` as *CLIP Vision Encode* gives it for HunyuanVideo 1.5 (SigLIP's 1152-wide last
    hidden state), with ``tokens`` random features (seeded) instead of SigLIP's 729 of the image: ComfyUI's
    *Load CLIP Vision* builds SigLIP-so400m from a fixed config."""

    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 9})}}

    def encode(self, image, seed, tokens):
        import comfy.clip_vision

        output = comfy.clip_vision.Output()
        output["last_hidden_state"] = torch.randn(1, tokens, 1152, generator=torch.Generator().manual_seed(seed))
        return (output,)


class TinyLTXAVGemma(TinyTextEncoder):
    """LTX-2's CLIP (ComfyUI's ``LTXAVTextEncoderLoader``: Gemma 3 12B and the checkpoint's text projection) at a
    tiny size: ComfyUI's own Gemma 3 language model class (two layers, ``width`` wide, its vision tower left
    out: no image enters the prompt), its own ``LTXAVTEModel`` (every layer's hidden states, normalised and
    projected to ``width``, the model's caption width) and ``LTXAVGemmaTokenizer`` on fleximmt's tiny Gemma-style
    sentencepiece model (the real one ships inside the 12B checkpoint only); random weights (seeded)."""

    def load(self, seed, width):
        import comfy.text_encoders.llama as llama
        import comfy.text_encoders.lt as lt

        from fleximmt.toy.tiny_ltx2 import gemma_sentencepiece

        gemma = {
            "vocab_size": 262208,  # Gemma's: the tokenizer's special ids (<image_soft_token> 262144) stay in range
            "hidden_size": width,
            "intermediate_size": width,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
        }

        Gemma = text_only(llama.Gemma3_12B, llama.Gemma3_12B_Config, ("multi_modal_projector", "vision_model"))

        class GemmaModel(lt.Gemma3_12BModel):
            def __init__(self, device="cpu", layer="all", layer_idx=None, dtype=None, model_options={}):  # noqa: B006
                self.dtypes = {dtype}
                comfy.sd1_clip.SDClipModel.__init__(
                    self,
                    device=device,
                    layer=layer,
                    layer_idx=layer_idx,
                    textmodel_json_config=gemma,
                    dtype=dtype,
                    special_tokens={"start": 2, "pad": 0},
                    layer_norm_hidden_state=False,
                    model_class=Gemma,
                    enable_attention_masks=True,
                    return_attention_masks=True,
                    model_options=model_options,
                )

        model = lt.ltxav_te(text_encoder_model=GemmaModel, video_projection_dim=width)
        target = comfy.supported_models_base.ClipTarget(lt.LTXAVGemmaTokenizer, model)
        tokenizer_data = {"spiece_model": gemma_sentencepiece()}
        clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options={"dtype": torch.float32})
        random_weights(clip, seed)
        return (clip,)


NODE_CLASS_MAPPINGS = {
    "TestOnlyTinyUMT5": TinyUMT5Loader,
    "TestOnlyTinyCogVideoXT5": TinyCogVideoXT5,
    "TestOnlyTinyHunyuanVideo15TextEncoder": TinyHunyuanVideo15TextEncoder,
    "TestOnlyTinyVisionTokens": TinyVisionTokens,
    "TestOnlyTinyLTXAVGemma": TinyLTXAVGemma,
}
