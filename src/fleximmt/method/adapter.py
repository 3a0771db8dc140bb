"""What FlexiMMT needs to know about a base model: the ``ModelAdapter`` every model family implements.

The method (mask rules, RMPM, DMEM, motion files, the training loop, the pipeline's transfer
logic, metrics, CLI and app) talks to a base model only through an adapter: how big its token grid
is, which attention form hosts the motion tokens (``attention.FORMS``), how its processors are
installed and receive the per-call state, where RMPM's features come from, and how a training step
encodes its conditions and predicts ``x0``. Adding a base model means writing one adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import FlexiMMTInputError
from .prompt import find_word_spans


@dataclass
class TokenGrid:
    """The video token grid of one generation: ``frames x height x width`` tokens.

    A token frame covers ``patch_frames`` latent frames (2 for CogVideoX 1.5); ``latent_frames`` is
    the number of latent frames the VAE gives for the requested video, before any padding to a
    whole number of token frames (the padding goes in front, as diffusers does)."""

    frames: int
    height: int
    width: int
    latent_frames: int = 0
    patch_frames: int = 1
    temporal_factor: int = 4

    @property
    def size(self) -> int:
        return self.frames * self.height * self.width

    def frame_index(self, num_video_frames: int) -> np.ndarray:
        """For every frame of the decoded video, its token frame (int ``[T]``): the causal VAE keeps
        frame 0 alone and packs ``temporal_factor`` frames per later latent frame; padding latent
        frames sit in front of the first one."""
        latent = np.array([0 if t == 0 else (t - 1) // self.temporal_factor + 1 for t in range(num_video_frames)])
        latent = np.minimum(latent, max(self.latent_frames, 1) - 1)
        pad = self.frames * self.patch_frames - max(self.latent_frames, 1)
        return np.minimum((latent + pad) // self.patch_frames, self.frames - 1)


@dataclass
class TrainingBatch:
    """What one training step's loss needs from the model: the clean latents and the prediction of
    them, with the per-sample weight that turns the x0 error into the model's own objective."""

    x0: torch.Tensor  # [1, F, C, h, w] (frames second)
    x0_hat: torch.Tensor
    weight: torch.Tensor  # broadcastable to x0
    loss_frames: slice = field(
        default_factory=lambda: slice(None)
    )  # latent frames the loss covers (padding frames excluded)
    expert: int = 0  # the expert (of ModelAdapter.transformers) that made the prediction


class ModelAdapter:
    """One family of diffusers image-to-video models, as FlexiMMT uses it. An instance wraps one
    pipeline (FlexiMMT's own or diffusers'); it is cheap to make."""

    family: ClassVar[str]  # written into motion files; a motion is refused on another family
    display_name: ClassVar[str]  # how messages name the family
    pipeline_class: ClassVar[type]  # diffusers' pipeline this adapter serves
    form: ClassVar[str]  # "joint" or "cross" (attention.FORMS)
    parts: ClassVar[tuple[str, ...]]  # MDMA parts that exist on this model
    feature_share: ClassVar[float]  # RMPM averages features over the first share of the blocks
    default_model: ClassVar[str]
    repeated_blocks: ClassVar[tuple[str, ...]] = ()  # block classes to compile regionally (default: diffusers')
    # how messages name any family (a motion's, when it is not this one): the registry, fleximmt.models, sets it
    name_family: ClassVar[Callable[[str], str]] = staticmethod(str)

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    # -- the model -----------------------------------------------------------------------
    def transformers(self) -> list[torch.nn.Module]:
        """The denoisers, one per expert (most models have one)."""
        return [self.pipe.transformer]

    @property
    def num_experts(self) -> int:
        return len(self.transformers())

    def check_model(self) -> None:
        """Raise a ``ValueError`` when the pipeline's components cannot run FlexiMMT (wrong kind of model)."""

    def motion_shape(self) -> tuple[int, int]:
        """(blocks, width) of one expert's motion tokens: one token set per block, of the attention's width."""
        cfg = self.transformers()[0].config
        return cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim

    def default_text_length(self) -> int:
        raise NotImplementedError

    def default_size(self) -> tuple[int, int, int]:
        """(height, width, num_frames) a call without them generates."""
        raise NotImplementedError

    def token_grid(self, height: int, width: int, num_frames: int) -> TokenGrid:
        raise NotImplementedError

    def call_size(self, call: dict[str, Any]) -> tuple[int, int, int]:
        """(height, width, num_frames) of the video a call (after :meth:`prepare_call`) makes. The default
        reads the call's arguments; a pipeline that sizes the video from its image says so here."""
        return call["height"], call["width"], call["num_frames"]

    def video_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A denoising step's latents, as the pipeline's step callback gets them for a ``height x width``
        video, in a video's layout: ``[B, C, F, h, w]`` (``[B, F, C, h, w]`` on CogVideoX). The default
        returns them as they are; a pipeline that denoises packed tokens unpacks them here."""
        return latents

    def frame_mask(self, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """An object mask at the image's size as the video's frames show it (``height x width``): the
        default leaves it (the pipeline resizes the whole image, as the token grid's downsampling does);
        a pipeline that crops the image crops the masks the same way here."""
        return mask

    def check_geometry(self, height: int, width: int, num_frames: int) -> None:
        """Raise a ``ValueError`` for a size this model cannot generate (FlexiMMT needs the grid exact)."""

    @classmethod
    def check_settings(cls, parts: frozenset[str], context_text: str) -> None:
        """Raise for MDMA settings that do not exist on this model."""

    def prompt_text(self, prompt: str) -> str:
        """The prompt as the pipeline hands it to its tokenizer (where motion words are looked up)."""
        return prompt

    def word_spans(self, prompt: str, phrases: Sequence[str], text_len: int) -> list[list[int]]:
        """Each phrase's token indices among the ``text_len`` text tokens the transformer sees, found
        by characters in the prompt as the pipeline tokenises it (``prompt.find_word_spans``). A
        family whose pipeline wraps the prompt in a template, or crops tokens from the front, says
        so here (``prompt_start``, ``skip_tokens``)."""
        return find_word_spans(self.pipe.tokenizer, self.prompt_text(prompt), phrases, text_len)

    # -- inference plumbing ----------------------------------------------------------------
    def video_shard(self, num_video_tokens: int):
        """This process's share of the ``num_video_tokens`` video tokens when the transformer runs with
        context parallelism (``attention.VideoShard``), or None when its blocks see all of them. The
        default: None - a family that supports context parallelism with objects says so here, and the
        others' processors refuse it."""
        return

    def install_processors(self) -> None:
        raise NotImplementedError

    def prepare_call(self, call: dict[str, Any]) -> dict[str, Any]:
        """Normalise a call's batch (images per prompt, videos per prompt) before anything else;
        returns the call to make. The default leaves it as it is."""
        return call

    def batch_prompts(self, call: dict[str, Any]) -> list[str]:
        """The prompt of every video the call makes, in batch order."""
        prompt = call.get("prompt")
        if prompt is None:
            raise FlexiMMTInputError(
                "objects need the prompt as text (their motion words are found in it): pass prompt=... "
                "instead of prompt_embeds, or call without objects"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = call.get("num_videos_per_prompt") or 1
        return [p for p in prompts for _ in range(per_prompt)]

    def batch_images(self, call: dict[str, Any], videos: int) -> list[Any]:
        """The conditioning image of every video, in batch order."""
        image = call["image"]
        images = list(image) if image_count(image) > 1 or isinstance(image, list) else [image]
        if len(images) == 1:
            return images * videos
        if videos % len(images):
            raise FlexiMMTInputError(f"{len(images)} images for {videos} videos: give one image, or one per prompt")
        return [img for img in images for _ in range(videos // len(images))]

    @contextlib.contextmanager
    def each_step(self, call: dict[str, Any], step_end: Callable[[int], None]) -> Iterator[dict[str, Any]]:
        """Have ``step_end(step)`` run after every denoising step of the call (RMPM's schedule); yields
        the call to make. The default chains diffusers' ``callback_on_step_end`` before the user's own
        callback (a ``PipelineCallback`` keeps its tensor inputs)."""
        user_callback = call.get("callback_on_step_end")
        call = dict(call)
        if hasattr(user_callback, "tensor_inputs"):  # diffusers' PipelineCallback / MultiPipelineCallbacks
            call["callback_on_step_end_tensor_inputs"] = user_callback.tensor_inputs

        def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            step_end(step)
            if user_callback is not None:
                return user_callback(pipe, step, timestep, callback_kwargs)
            return {}

        call["callback_on_step_end"] = callback
        yield call

    @contextlib.contextmanager
    def attach(self, state, call: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Make ``state`` reach the processors during the call; yields the call to make."""
        raise NotImplementedError
        yield call

    # -- training --------------------------------------------------------------------------
    def conditioning_modules(self) -> list[str]:
        """The pipeline components (by name) of the frozen encoders that :meth:`encode_conditions` runs:
        a training run freezes them and, once the conditions are cached, may offload them to the CPU.
        The default: whichever of the text encoder(s) and the image encoder the pipeline has."""
        names = ("text_encoder", "text_encoder_2", "image_encoder")
        return [name for name in names if isinstance(getattr(self.pipe, name, None), torch.nn.Module)]

    def encode_conditions(
        self, clips: list[torch.Tensor], caption: str, text_len: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Encode a caption and reference windows ``[3, T, H, W]`` in [-1, 1] into the tensors a
        training step needs: ``prompt_embeds [1, L, D]`` and, stacked per window, ``video_latents``
        ``[W, F, C, h, w]`` plus the model's image conditions."""
        raise NotImplementedError

    @contextlib.contextmanager
    def training_attached(self, state) -> Iterator[None]:
        """Keep ``state`` where the attention reads it for a whole training loop: the forward passes
        and the backward passes, where gradient checkpointing recomputes blocks and must see the same
        motion tokens and DMEM masks. Models that hand the state over in each call's arguments (which
        recomputation replays) need nothing here."""
        yield

    def training_prediction(
        self,
        state,
        cond: dict[str, torch.Tensor],
        window: int,
        generator: torch.Generator,
        image_dropout: float,
        autocast,
        dtype: torch.dtype | None = None,
    ) -> TrainingBatch:
        """Noise one window at a random timestep, run the denoiser with ``state`` attached (inside
        :meth:`training_attached`) and return the clean latents, their prediction and the loss
        weight (docs/method.md#training, docs/method.md#wan). ``dtype`` is the precision of the latents,
        the noise and the prediction outside the denoiser (None: float32; the release: the model's,
        docs/method.md#the-releases-recipe)."""
        raise NotImplementedError


def image_count(image) -> int:
    """How many images a pipeline's ``image`` argument holds (a list, or a batched array/tensor)."""
    if isinstance(image, list):
        return len(image)
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4:
        return image.shape[0]
    return 1


def prompt_count(call: dict[str, Any]) -> int:
    """How many prompts a call holds (strings or embeddings)."""
    prompt = call.get("prompt")
    if prompt is None:
        return call["prompt_embeds"].shape[0]
    return 1 if isinstance(prompt, str) else len(prompt)


def module_placement(pipe) -> dict[str, tuple[torch.device, torch.dtype]]:
    """(device, dtype) of every module component of a pipeline (its first parameter's)."""
    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            param = next(module.parameters(), None)
            if param is not None:
                out[name] = (param.device, param.dtype)
    return out
