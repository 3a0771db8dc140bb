"""What the native patch must know of one model family: :class:`Family`, one small subclass per family.

The family-agnostic bookkeeping (``patch.py``) asks a family a handful of questions: is this ComfyUI
diffusion model yours, what are its blocks and token grid, what does a model call carry (the text's
layout per row), which attention calls does a block make, and how is each computed - which one
hosts the motion tokens, how they are projected, where RMPM's features are read. The mapping per
family is the library's adapter's (``fleximmt.models``, docs/method.md): the native path computes
what the library computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from ....errors import FlexiMMTInputError
from ....method.adapter import ModelAdapter, TokenGrid
from ....method.pipeline import about_object
from ....method.prompt import find_token_spans
from ....method.tokens import TextKeys
from ....models import adapter_class
from .patch import Call, Run, additive


def clip_tokens(clip, text: str, key: str | None = None) -> list[int]:
    """The token ids of ``text`` as a ComfyUI CLIP's tokenizer hands them to its encoder (weights
    syntax parsed, end token and padding included), from its tokenizer ``key`` (default: the first)."""
    tokens = clip.tokenize(text)
    batches = tokens[key] if key is not None else next(iter(tokens.values()))
    return [int(t[0]) for batch in batches for t in batch]


def inner_tokenizer(clip):
    """ComfyUI's ``SDTokenizer`` of the prompt behind a CLIP (an ``SD1Tokenizer`` holds it as ``clip``)."""
    outer = clip.tokenizer
    return getattr(outer, outer.clip) if hasattr(outer, "clip") else outer


def phrase_ids(tokenizer, phrase: str) -> list[int]:
    """A phrase's ids as ComfyUI's ``SDTokenizer`` ``tokenizer`` tokenises a word of the prompt, without
    special tokens."""
    ids = tokenizer.tokenizer(phrase)["input_ids"]
    return list(ids[tokenizer.tokens_start : -1 if tokenizer.tokenizer_adds_end_token else None])


class Family:
    """One model family as the native patch sees ComfyUI's model of it."""

    name: ClassVar[str]  # as messages name it
    family: ClassVar[str]  # the registered family whose adapter maps diffusers' model (fleximmt.models)
    module: ClassVar[str]  # ComfyUI's module of the model class
    model_class: ClassVar[str]
    # the blocks can be replaced (patches_replace["dit"][("double_block", i)]), which names each call's
    # block; without that hook the calls are counted in the order the blocks make them
    block_hook: ClassVar[bool] = True
    clip_name: ClassVar[str]  # the text encoder a message names
    tokens_key: ClassVar[str]  # the prompt's tokens in what the family's CLIP.tokenize returns
    # learning (native/training.py): the channels of the model's concatenated condition that hold the image
    # (training's image dropout zeroes them), and the block arguments its blocks add to in place (``+=``)
    image_channels: ClassVar[slice] = slice(None)
    inplace_streams: ClassVar[tuple[str, ...]] = ()
    # block arguments (tensors, or tuples of them) its blocks change with in-place methods whose results they drop
    # (LTX-2: ``vx.addcmul_(...)``); training hands the blocks copies of them (native.training.CopyOnRead)
    mutated_streams: ClassVar[tuple[str, ...]] = ()
    # the image is the video's own first latent frame, kept clean (noise level 0) and out of the loss unless
    # training's image dropout drops it (LTX-2's image-to-video), not a condition beside the latent
    image_frame: ClassVar[bool] = False
    learn_frames: ClassVar[int] = 81  # frames of a training window where none are given (the library's default)
    # the library's adapter draws a step's noise as [1, F, C, h, w] (frames second, CogVideoX's layout), not
    # ComfyUI's [1, C, F, h, w]: the native step draws it alike, so a seed gives both the same noise
    noise_frames_second: ClassVar[bool] = False

    @property
    def adapter(self) -> ModelAdapter:
        """The family's registered adapter with no pipeline: the family's facts (its attention form, parts,
        settings)."""
        return adapter_class(self.family)(None)

    @classmethod
    def matches(cls, diffusion_model) -> bool:
        import importlib

        try:
            module = importlib.import_module(cls.module)
        except ImportError:  # a ComfyUI without this family
            return False
        return type(diffusion_model) is getattr(module, cls.model_class, None)

    def check(self, model) -> None:
        """Raise for a model of this class FlexiMMT does not run (another variant of the family)."""

    def check_learning(self, model) -> None:
        """Raise for a model of this family Learn motion does not train (one it samples with is enough here)."""

    def image_conditioning(self, vae, image: torch.Tensor, length: int) -> dict:
        """The conditioning values the family's ComfyUI image-to-video node adds for a first frame ``image``
        (IMAGE ``[1, H, W, 3]``) and a video of ``length`` frames (``concat_latent_image``, ``concat_mask``)."""
        raise NotImplementedError

    def reference_latent(self, vae, image: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The latent a reference video (IMAGE ``[T, H, W, 3]``) trains on, from ComfyUI's VAE's ``latent`` of it
        (default: that latent)."""
        return latent

    def training_shift(self, tokens: int) -> float | None:
        """The shift of a training step's noise level for a video of ``tokens`` tokens, where the family's sampling
        shifts by the video's size; None (default): the MODEL's model sampling's own."""
        return None

    def training_constants(self) -> dict:
        """Inputs every training call of the model takes, in place of ComfyUI's own for them (default: none)."""
        return {}

    def training_inputs(self, model, x: torch.Tensor, sigma: float, image: bool, frames: int, generator):
        """``(input, conditions)``: what ``apply_model`` takes for the noisy latent ``x [1, C, F, h, w]`` of a
        ``frames``-frame video at noise level ``sigma`` (``image``: its first latent frame is the clean image), any
        further draws from ``generator`` after the video's noise. Default: ``x``, nothing more."""
        return x, {}

    def training_output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The video's x0 in ``apply_model``'s output for the latent ``x`` (default: the output)."""
        return out

    def blocks(self, model) -> Sequence[torch.nn.Module]:
        return model.blocks

    def motion_shape(self, model) -> tuple[int, int]:
        """(blocks, width) of the motion tokens this model takes."""
        raise NotImplementedError

    def grid(self, model, x: torch.Tensor) -> TokenGrid:
        """The video token grid of a latent ``x [B, C, T, H, W]`` (padded up to whole patches, as the model pads)."""
        patch = self.patch_size(model)
        frames, height, width = (-(-size // p) for size, p in zip(x.shape[2:], patch))
        return TokenGrid(frames, height, width, x.shape[2], patch[0])

    def patch_size(self, model) -> tuple[int, int, int]:
        raise NotImplementedError

    def read_call(self, model, arguments: dict) -> Call:
        """What a model call carries (``arguments``: its ``_forward``'s): refuses what FlexiMMT cannot do."""
        x, context = arguments["x"], arguments["context"]
        return Call(x, context.shape[1], [TextKeys()] * x.shape[0])

    def call_kinds(self, model, index: int) -> tuple[str, ...]:
        """The attention calls of block ``index``, in the order it makes them."""
        raise NotImplementedError

    def block_context(self, run: Run, index: int):
        """A context around block ``index``'s call (default: nothing), for a family that reads a module's
        output rather than an attention call's."""
        return contextlib.nullcontext()

    def block_kinds(self, model, index: int, args: dict) -> tuple[str, ...]:
        """The attention calls block ``index`` makes in this call, ``args`` its ``double_block`` replacement's
        arguments (a family whose blocks skip calls by the call's options reads them here)."""
        return self.call_kinds(model, index)

    def attend(self, run: Run, index: int, kind: str, base: Callable, *args, **kwargs):
        """Compute one attention call of block ``index`` (``base``: ComfyUI's attention function)."""
        raise NotImplementedError

    # -- the prompt -------------------------------------------------------------------------
    def word_spans(self, clip, prompt: str, phrases: Sequence[str]) -> tuple[list[list[int]], int]:
        """Each phrase's token indices among the prompt's text tokens as this family's ComfyUI text
        encoder gives them to the model, and how many tokens that is; a phrase that is not there is
        named by its object's number ("object 2: motion words ..."); a CLIP of another model is refused."""
        made = sorted(clip.tokenize(" "))
        if self.tokens_key not in made:
            raise FlexiMMTInputError(
                f"FlexiMMT Apply: this CLIP tokenises for {made}, not for {self.name}'s text encoder "
                f"({self.clip_name}): connect the CLIP that encodes this model's prompt"
            )
        find, length = self.span_finder(clip, prompt)
        if prompt.strip():
            for number, phrase in enumerate(phrases, 1):
                with about_object(number):
                    find([phrase])
        return find(phrases), length

    def span_finder(self, clip, prompt: str) -> tuple[Callable, int]:
        """``(find, length)``: ``find(phrases)`` gives the phrases' spans among the ``length`` text tokens.
        The default searches a phrase's ids among the prompt's (``find_token_spans``): ComfyUI
        tokenises each weighted segment of the prompt on its own, with no character offsets into it."""
        ids = clip_tokens(clip, prompt, self.tokens_key)
        tokenizer = inner_tokenizer(clip)
        encode = lambda phrase: phrase_ids(tokenizer, phrase)
        return (lambda phrases: find_token_spans(ids, phrases, encode, prompt, len(ids))), len(ids)


class CrossFamily(Family):
    """A family whose video queries read the text in a cross-attention of their own, where motion tokens
    join the text as extra keys and values (``attention.FORMS`` "cross"), projected by that attention's
    own text path (so LoRA, fp8 and GGUF weights apply to them as to the text)."""

    def text_path(self, run: Run, index: int) -> tuple[Callable, Callable]:
        """The text's key path (projection and key norm, no RoPE) and value projection in block ``index``'s
        cross-attention, each from ``[1, n, dim]`` tokens to ``[1, n, H x d]``."""
        raise NotImplementedError

    def text_attention(self, run: Run, index: int, base: Callable, q, k, v, heads: int, *args, **kwargs):
        """MDMA cross-attention of the video queries ``q [B, N, H x d]`` over the block's text keys and the
        motion tokens; its unmasked groups computed by ComfyUI's own attention function ``base``."""
        if args or kwargs.get("mask") is not None:
            raise FlexiMMTInputError(
                f"FlexiMMT Apply: the {self.name} text attention got a mask of its own; FlexiMMT's MDMA "
                "is the mask - remove the other patch that adds one"
            )
        kwargs.pop("mask", None)
        key_path, value_path = self.text_path(run, index)
        to_heads = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
        kw = dict(kwargs, heads=heads, skip_reshape=True, skip_output_reshape=True)
        group = lambda qg, kg, vg, mask=None: base(qg, kg, vg, mask=additive(mask, qg.dtype), **kw)

        def project(tokens, kind: str):
            tokens = tokens.to(device=q.device, dtype=q.dtype)[None]
            return to_heads(key_path(tokens) if kind == "k" else value_path(tokens))

        out = run.state.cross_attention(
            index, run.expert, to_heads(q), to_heads(k), to_heads(v), project, group, run.texts
        )
        return out.transpose(1, 2).flatten(2).to(q.dtype)


class JointFamily(Family):
    """A family whose blocks run one joint attention over ``[text | video]`` (ComfyUI's order), where
    motion tokens join the text as extra keys and values (``attention.FORMS`` "joint")."""

    def joint_attention(self, run: Run, index: int, base: Callable, query, key, value, motion_k, motion_v, kwargs):
        """MDMA over ``query/key/value [B, H, L + N_v, d]`` (text first, after QK-norm and RoPE) and the
        motion tokens' keys and values ``[B, H, K * d_m, d]``; returns ``[B, H, L + N_v, d]``, text
        first, and lends RMPM the video rows (the family's :meth:`video_features`). The library's
        state takes the tokens video first: the few text and motion rows go behind the video's."""
        text_len = query.shape[2] - run.grid.size
        kw = dict(kwargs, skip_reshape=True, skip_output_reshape=True)
        attention = lambda q, k, v, mask=None: base(q, k, v, mask=additive(mask, q.dtype), **kw)
        video_first = lambda x, motion: torch.cat([x[:, :, text_len:], x[:, :, :text_len], motion], dim=2)
        # motion-token queries are never attended with (their outputs would be dropped): their rows hold the keys
        out = run.state.joint_attention(
            index,
            video_first(query, motion_k),
            video_first(key, motion_k),
            video_first(value, motion_v),
            text_len,
            attention,
            run.texts,
        )
        video = out[:, :, : run.grid.size]
        run.observe(index, lambda rows: self.video_features(run, index, video.index_select(0, rows)))
        return torch.cat([out[:, :, run.grid.size :], video], dim=2)

    def video_features(self, run: Run, index: int, video_out: torch.Tensor) -> torch.Tensor:
        """RMPM's features from the video rows of a block's attention output ``[B, H, N_v, d]``: the video
        stream's output projection (before the gate), as the library's processors read them."""
        raise NotImplementedError
