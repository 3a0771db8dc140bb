"""What FlexiMMT needs to know about a base model: the ``ModelAdapter`` every model family implements.

The method (mask rules, RMPM, DMEM, motion files, the training loop, the pipeline's transfer
logic, metrics, CLI and app) talks to a base model only through an adapter: how big its token grid
is, which attention form hosts the motion tokens (``attention.FORMS``), how its processors are
installed and receive the per-call state, which batch rows are which video, where RMPM's features come
from, and how a training step encodes its conditions and predicts ``x0``. Adding a base model means
writing one adapter module (and its tiny components, ``fleximmt.toy``) and registering it by one line
(a :class:`Family`, in ``fleximmt.models``): what names the families elsewhere is derived from the
registrations.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..errors import FlexiMMTInputError
from .prompt import find_word_spans
from .rows import BatchRows


class Family(NamedTuple):
    """A base-model family as ``fleximmt.models`` registers it (one line there): what is known of it before
    its adapter module is imported (that module imports diffusers' pipeline and its image processors)."""

    name: str  # how messages name it: "Wan"
    family: str  # what motion files record (its adapter's ``family``): "wan"
    module: str  # its adapter module, ``fleximmt.models.<module>``
    pipeline: str  # its FlexiMMT pipeline class, exported by ``fleximmt``
    diffusers: tuple[str, ...]  # the diffusers pipeline classes it runs, as ``model_index.json`` names them


DOCUMENTED = ("height", "width", "num_frames", "guidance_scale")  # the settings documented_defaults names
FAMILIES: dict[str, Family] = {}  # family -> its registration, in the order of registration


def register_family(family: Family) -> Family:
    """Register a model family (``fleximmt.models`` does, one line each); a family registers once."""
    if family.family in FAMILIES:
        raise ValueError(f"the model family {family.family!r} is registered twice")
    FAMILIES[family.family] = family
    return family


def family_name(family: str) -> str:
    """How messages name a model family ("Wan image-to-video"); an unregistered one by what motion files record."""
    registered = FAMILIES.get(family)
    return family if registered is None else f"{registered.name} image-to-video"


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


@dataclass(frozen=True)
class TrueSize:
    """A released checkpoint of a family at its true size, as the benchmarks (``benchmarks/``) build its
    transformer with random weights: what its files and its pipeline's defaults say. Declared in the family's
    adapter module (``ModelAdapter.true_sizes``); the adapter's ``random_forwards`` feeds it."""

    name: str  # how tables name it: "Wan2.1-I2V-14B-480P"
    config: dict[str, Any]  # its transformer's config, as diffusers' conversion script writes it
    size: tuple[int, int, int]  # the video a call makes by default: height, width, frames
    vae_scale: tuple[int, int]  # its VAE's spatial and temporal compression
    # the text the pipeline hands the transformer, in tokens: "prompt" (where motion words are found) and any
    # other kinds the family's random_forwards reads (image tokens, padding)
    text: dict[str, int]
    tiny: dict[str, Any] = field(default_factory=dict)  # config values of a tiny transformer of its shape (dry runs)
    tiny_text: dict[str, int] | None = None  # the tiny transformer's text (None: as the true size's)
    # the pipeline's other models (encoders, VAEs), by component name: each one's config as the checkpoint's files
    # give it (a transformers model's: its config class's values), built as the class the pipeline's __init__ takes
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    def text_of(self, tiny: bool) -> dict[str, int]:
        """The text of the true-size transformer, or of the tiny one."""
        return dict(self.tiny_text if tiny and self.tiny_text is not None else self.text)


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
    pipeline (FlexiMMT's own or diffusers'; None: the family's facts alone, for its model run outside
    diffusers, as ComfyUI's native patch runs it); it is cheap to make."""

    family: ClassVar[str]  # written into motion files; a motion is refused on another family
    display_name: ClassVar[str]  # how messages name the family: its registration's (family_name), set here
    pipeline_class: ClassVar[type]  # diffusers' pipeline this adapter serves
    form: ClassVar[str]  # "joint" or "cross" (attention.FORMS)
    parts: ClassVar[tuple[str, ...]]  # MDMA parts that exist on this model
    feature_share: ClassVar[float]  # RMPM averages features over the first share of the blocks
    default_model: ClassVar[str]
    repeated_blocks: ClassVar[tuple[str, ...]] = ()  # block classes to compile regionally (default: diffusers')
    # settings of a call to default_model that leaves them out, where diffusers' __call__ gives no default
    # (documented_defaults: what help texts say)
    stated_defaults: ClassVar[dict[str, Any]] = {}
    # what the state must know of this model's attention, given when the state is made (state_settings):
    # its processors name each row's text keys (attention.TextKeys: text beyond the prompt's tokens, padding)
    text_keys: ClassVar[bool] = False
    # joint form, DMEM: video queries scored against the concept words' keys (docs/method.md#hunyuanvideo-15),
    # not the concept words' queries against the video keys (docs/method.md#dmem)
    dmem_video_queries: ClassVar[bool] = False
    # the attention of each block that hosts the motion tokens (the one MDMA masks): "attn1", "attn2", "attn"
    motion_attention: ClassVar[str]
    # released checkpoints at their true size, by the name the benchmarks' --model takes (TrueSize)
    true_sizes: ClassVar[dict[str, TrueSize]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in vars(cls):
            cls.display_name = family_name(cls.family)

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @classmethod
    def state_settings(cls) -> dict[str, Any]:
        """The settings of a ``FlexiMMTState`` for this model's processors (its keyword arguments)."""
        return {"form": cls.form, "text_keys": cls.text_keys, "dmem_video_queries": cls.dmem_video_queries}

    @classmethod
    def documented_defaults(cls) -> dict[str, Any]:
        """``height``, ``width``, ``num_frames`` and ``guidance_scale`` of a call to ``default_model`` that
        leaves them out, as help texts name them: diffusers' ``__call__`` defaults, then ``stated_defaults``."""
        params = inspect.signature(cls.pipeline_class.__call__).parameters
        given = {name: params[name].default for name in DOCUMENTED if name in params}
        return {**{k: v for k, v in given.items() if v is not None}, **cls.stated_defaults}

    # -- the model -----------------------------------------------------------------------
    @classmethod
    def transformer_class(cls) -> type:
        """diffusers' transformer class of this family: the one its pipeline takes."""
        return inspect.signature(cls.pipeline_class.__init__).parameters["transformer"].annotation

    @classmethod
    def config_at(
        cls, values: dict[str, Any], size: tuple[int, int, int], vae_scale: tuple[int, int]
    ) -> dict[str, Any]:
        """A transformer config (``values``) that takes ``size`` videos through a VAE of ``vae_scale`` (spatial,
        temporal): the same, for a model that takes any size; a model whose config fixes its size says so here."""
        return values

    @classmethod
    def random_forwards(
        cls,
        config,
        size: tuple[int, int, int],
        latent: tuple[int, int, int],
        text: dict[str, int],
        guidance: bool,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Callable[[float], list[tuple[str, dict[str, Any]]]]:
        """The transformer forwards of one denoising step of a ``size`` video (``latent``: its latent frames,
        padded as the pipeline pads them, height and width) as the pipeline makes them for one video, with
        ``guidance`` (its default) or without: random latents and text of the shapes and dtypes it gives a
        transformer of ``config`` (``text``: ``TrueSize.text``), drawn once from ``generator``. Returns a
        function of the step's timestep (0-1000) giving each forward's name (its ``cache_context``, as the
        pipeline names it) and keyword arguments (``return_dict`` left out)."""
        raise NotImplementedError

    @classmethod
    def random_conditions(
        cls, config, latent: tuple[int, int, int], text: dict[str, int], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One reference window of a ``latent`` video as :meth:`encode_conditions` returns it for a transformer of
        ``config``, random (float32, on the CPU): what a training step of the benchmarks feeds
        :meth:`training_prediction`."""
        raise NotImplementedError

    @classmethod
    def pipeline_around(cls, transformer: torch.nn.Module):
        """diffusers' pipeline of this family around ``transformer``, with its checkpoints' scheduler and without
        the encoders and VAE a denoising step's forwards and a training step's prediction never call (the
        benchmarks' random-weight models)."""
        raise NotImplementedError

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

    def batch_rows(self, call: dict[str, Any], videos: int) -> BatchRows:
        """Which video each row of the call's transformer batches is, and which rows feed RMPM (the
        conditional branch): given to the call's state when it is made. The default, one row per video in a
        pipeline that runs each guidance branch as a forward of its own, the conditional first (Wan's and
        HunyuanVideo 1.5's): features from the first forward of each step, whose start the adapter's forward
        hook tells the state (``state.rows.begin_forward()``, as ``models.shared.SlotAdapter`` does)."""
        return BatchRows(list(range(videos)), list(range(videos)), first_forward_only=True)

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
