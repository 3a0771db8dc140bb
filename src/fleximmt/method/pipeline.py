"""The transfer half of FlexiMMT, for any base model: what a FlexiMMT pipeline adds to diffusers'.

``FlexiMMTMixin`` sits in front of a diffusers image-to-video pipeline (one per registered family,
``fleximmt/models``). Around diffusers' own denoising loop it (1) checks the objects against images,
prompts and model, (2) builds the call's transfer (:func:`build_transfer`): one ``FlexiMMTState`` - every
video's motion tokens, motion words and first-frame masks - that the model's processors read, and its
``MaskSchedule``, which (3) after every step runs RMPM on the features captured during that step and
prepares the next step's masks (a one-step lag, docs/method.md#rmpm). ComfyUI's native patch builds its
transfers with the same function.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..errors import FlexiMMTInputError, ObjectInputError
from .adapter import ModelAdapter, TokenGrid, family_name
from .attention import FlexiMMTState
from .kernels import DEFAULT_KERNEL, MASK_KERNELS
from .masks import (
    PARTS,
    RMPM_METHODS,
    check_context_text,
    check_parts,
    mask_change,
    mask_to_token_grid,
    rmpm,
    span_membership,
)
from .motion import ObjectMotion
from .presets import fill_preset
from .prompt import find_token_spans
from .rows import BatchRows
from .tokens import VideoMotions

logger = logging.getLogger(__name__)

MAX_OBJECTS = 8
MASK_SOURCES = ("rmpm", "static", "qk", "none")
INITIAL_MASKS = ("first_frame", "none")  # RMPM's step 0: first-frame masks everywhere, or the release's none
# dynamic RMPM (docs/method.md#dynamic-rmpm): steps 0-4 always take the new masks; from step 5 on, a step whose
# masks all changed by less than alpha keeps the previous ones and ends the updates - the release's rule
ALWAYS_UPDATE_STEPS = 5
RELEASE_MASK_STEPS = 50  # the release computes masks after its first 50 steps only (its final_step)
# what preset="release" sets where the caller did not (docs/method.md#the-release-preset); "dense": the release's
# masked attention, bit for bit (the grouped kernel rounds otherwise, which propagation in bf16 amplifies)
RELEASE_OPTIONS = {
    "mask_source": "rmpm",
    "rmpm_method": "released",
    "initial_masks": "none",
    "alpha": 0.05,
    "anchors": 3,
    "mask_kernel": "dense",
}
OPTIONS_DOC = """FlexiMMT's own arguments (keyword-only):
    objects: ``ObjectMotion`` list, applied to every video of the call; or one list per prompt. Empty:
        exactly diffusers' pipeline.
    mask_source: "rmpm" (propagated masks), "static" (first-frame masks on every frame), "qk" (DMEM's
        QK masks) or "none" (every object covers all video).
    rmpm_method: "paper" (Eqs. 12-13) or "released" (the authors' label propagation).
    anchors: RMPM's W. alpha: dynamic RMPM's threshold (None: update every step).
    feature_blocks: blocks whose attention outputs feed RMPM (default: the model's share of the first blocks).
    parts: MDMA parts on. context_text: "open" | "closed" (joint attention: CogVideoX, HunyuanVideo 1.5).
    mask_kernel: how MDMA is computed, exactly, by every kernel: "auto" (grouped SDPA, no N x N mask),
        "flex" (one FlexAttention call with a block mask; compiled; on a CPU inference only) or "dense" (the
        reference). Not diffusers' attention backend (``transformer.set_attention_backend``), which the
        kernels' calls use. The old name ``attention_backend`` is accepted until fleximmt 0.2, with a warning.
    return_masks: add the per-step masks to the output. initial_masks: RMPM's step 0, "first_frame" or
        "none" (the release).
    preset: "release" reproduces the authors' released inference: it sets mask_source "rmpm",
        rmpm_method "released", initial_masks "none", alpha 0.05, anchors 3 and mask_kernel
        "dense" where they are not passed, and the release's first-frame mask resize and RMPM precision
        (the model's); docs/method.md#the-release-preset. None: fleximmt's own choices."""


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
RENAMED = {"attention_backend": "mask_kernel"}  # FlexiMMT's old option names, accepted until REMOVED_IN
REMOVED_IN = "0.2"


def renamed_option(old: str, value: Any) -> Any:
    """``value`` given under an option's old name (``RENAMED``): a ``FutureWarning`` naming the new one, as
    diffusers' ``deprecate`` warns."""
    new = RENAMED[old]
    warnings.warn(
        f"{old}={value!r} is deprecated and will be removed in fleximmt {REMOVED_IN}: use {new}={value!r} "
        f"(FlexiMMT's mask kernel; diffusers' attention backend is set with transformer.set_attention_backend)",
        FutureWarning,
        stacklevel=4,
    )
    return value


def rename_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every old option name (``RENAMED``) given as its new one, each warned about once."""
    for old, new in RENAMED.items():
        if old in kwargs:
            if new in kwargs:
                raise FlexiMMTInputError(f"{old} and {new} both given: give {new} only ({old} is its old name)")
            kwargs = {**kwargs, new: renamed_option(old, kwargs[old])}
            del kwargs[old]
    return kwargs


def check_safetensors(path: str | os.PathLike, kwargs: dict[str, Any]) -> None:
    """Ask diffusers for safetensors only; a local folder whose weights are only pickles is refused
    here, with how to convert it, rather than by diffusers' "no file named ..."."""
    if kwargs.get("use_safetensors") is False:
        raise FlexiMMTInputError(
            "use_safetensors=False: fleximmt loads safetensors weights only (pickled weights can run code when "
            "loaded); convert the checkpoint to safetensors instead"
        )
    kwargs["use_safetensors"] = True
    folder = Path(path)
    if not folder.is_dir():
        return
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f.name for f in component.iterdir() if f.is_file()]
        pickled = [f for f in files if f.endswith(PICKLED)]
        if pickled and not any(f.endswith(".safetensors") for f in files):
            raise FlexiMMTInputError(
                f"{str(component)!r} holds pickled weights only ({', '.join(sorted(pickled))}): fleximmt loads "
                "safetensors only, on purpose (a pickle can run code when it is loaded). If you trust the files, "
                'convert the checkpoint once with diffusers: python -c "from diffusers import DiffusionPipeline; '
                f"DiffusionPipeline.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}-safetensors')\""
            )


@dataclass
class FlexiMMTPipelineOutput(BaseOutput):
    """diffusers' output (``frames``, and ``audio`` where the model makes sound: LTX-2) plus ``masks``: bool
    ``[videos, steps, K, frames, h, w]``, the object masks on the token grid that each denoising step used
    (None unless ``return_masks=True``)."""

    frames: Any
    masks: torch.Tensor | None = None
    audio: Any = None


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an array ``[H, W, C]`` or a tensor ``[C, H, W]``."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    if isinstance(image, np.ndarray):
        return tuple(image.shape[:2])
    raise FlexiMMTInputError(f"image must be a PIL image, an array or a tensor, got {type(image).__name__}")


@dataclass
class TransferOptions:
    """FlexiMMT's keyword arguments of one call, checked: the one declaration of FlexiMMT's options (their
    names, order and defaults). Every FlexiMMT pipeline's ``__call__`` is built from diffusers' own and
    these (:func:`flexi_call`); ``OPTIONS_DOC`` documents them."""

    objects: Sequence = ()
    mask_source: str = "rmpm"
    rmpm_method: str = "paper"
    anchors: int = 3
    alpha: float | None = None
    feature_blocks: Sequence[int] | None = None
    parts: Sequence[str] = PARTS
    context_text: str = "open"
    mask_kernel: str = DEFAULT_KERNEL
    return_masks: bool = False
    initial_masks: str = "first_frame"
    preset: str | None = None
    attention_backend: InitVar[str | None] = None  # mask_kernel's old name (renamed_option), until fleximmt 0.2

    def __post_init__(self, attention_backend: str | None) -> None:
        if attention_backend is not None:
            self.mask_kernel = renamed_option("attention_backend", attention_backend)

    def apply_preset(self, given: Collection[str]) -> None:
        """Fill the options the caller did not pass (``given``: the names passed) from ``preset``."""
        fill_preset(self, self.preset, RELEASE_OPTIONS, given)

    @property
    def release(self) -> bool:
        """Whether the release's own computations run where no option names them: its mask resize,
        RMPM in the model's precision, an empty old mask's change 0, masks from the first 50 steps."""
        return self.preset == "release"

    def check(self, adapter: ModelAdapter) -> None:
        """Refuse a value no option takes, or MDMA settings ``adapter``'s model does not have."""
        if self.mask_source not in MASK_SOURCES:
            raise FlexiMMTInputError(f"mask_source={self.mask_source!r}: choose from {list(MASK_SOURCES)}")
        if self.mask_kernel not in MASK_KERNELS:
            raise FlexiMMTInputError(f"mask_kernel={self.mask_kernel!r}: choose from {list(MASK_KERNELS)}")
        if self.rmpm_method not in RMPM_METHODS:
            raise FlexiMMTInputError(f"rmpm_method={self.rmpm_method!r}: choose from {list(RMPM_METHODS)}")
        if self.anchors < 1:
            raise FlexiMMTInputError(f"anchors={self.anchors}: RMPM needs at least 1 anchor frame")
        if self.initial_masks not in INITIAL_MASKS:
            raise FlexiMMTInputError(f"initial_masks={self.initial_masks!r}: choose from {list(INITIAL_MASKS)}")
        if self.alpha is not None and not 0 <= self.alpha < 1:
            raise FlexiMMTInputError(f"alpha={self.alpha}: give a fraction in [0, 1), e.g. 0.05, or None")
        self.parts = check_parts(self.parts)
        check_context_text(self.context_text)
        adapter.check_settings(self.parts, self.context_text)


OPTIONS = tuple(f.name for f in fields(TransferOptions))  # FlexiMMT's options, in their order


def flexi_call(cls) -> Callable:
    """A FlexiMMT pipeline's ``__call__``: diffusers' own signature (``cls.adapter_class.pipeline_class``),
    in its order, with the defaults ``cls.call_defaults`` changes, then FlexiMMT's options keyword-only
    (:class:`TransferOptions`; ``parts`` defaults to the model's own). ``inspect.signature``, ``help()``
    and positional arguments see and take exactly that; the body is :meth:`FlexiMMTMixin._call`."""
    diffusers_call = cls.adapter_class.pipeline_class.__call__
    theirs = inspect.signature(diffusers_call)
    defaults = {
        **{f.name: f.default for f in fields(TransferOptions)},
        "parts": tuple(cls.adapter_class.parts),
        **cls.call_defaults,
    }
    params = [p.replace(default=defaults.get(p.name, p.default)) for p in theirs.parameters.values()]
    if "callback_on_step_end" not in theirs.parameters:  # diffusers' habit, for a pipeline without it (see _call)
        params.append(
            inspect.Parameter(
                "callback_on_step_end", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Callable | None"
            )
        )
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=defaults[f.name], annotation=f.type)
        for f in fields(TransferOptions)
    ]
    signature = theirs.replace(parameters=params, return_annotation="FlexiMMTPipelineOutput | Any")

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **rename_options(kwargs))
        given = frozenset(bound.arguments)  # what the caller passed: a preset fills only the rest
        bound.apply_defaults()
        return self._call(bound.arguments, given)

    __call__.__signature__ = signature
    __call__.__qualname__ = f"{cls.__qualname__}.__call__"
    __call__.__module__ = cls.__module__
    __call__.__doc__ = (
        f"Generate videos in which each object of ``objects`` moves with its own motion.\n\n"
        f"    diffusers' ``{cls.adapter_class.pipeline_class.__name__}.__call__`` arguments, in its order "
        f"and with its meaning{cls.call_doc}\n\n    {OPTIONS_DOC}"
    )
    return __call__


@contextmanager
def about_object(number: int) -> Iterator[None]:
    """Bad input raised inside the block is about object ``number`` (from 1): its message says so."""
    try:
        yield
    except ObjectInputError:
        raise
    except FlexiMMTInputError as err:
        raise ObjectInputError(number, str(err)) from None


def object_word_spans(adapter: ModelAdapter, prompt: str, phrases: Sequence[str], text_len: int) -> list[list[int]]:
    """Every object's phrase in the prompt as the adapter's pipeline tokenises it
    (``ModelAdapter.word_spans``), a phrase that is not in it named by its object's number
    ("object 2: motion words ..."). An empty prompt is about no one object."""
    if prompt.strip():
        for number, phrase in enumerate(phrases, 1):
            with about_object(number):
                adapter.word_spans(prompt, [phrase], text_len)
    return adapter.word_spans(prompt, phrases, text_len)


def object_token_spans(
    ids: Sequence[int], phrases: Sequence[str], encode, prompt: str, max_sequence_length: int
) -> list[list[int]]:
    """:func:`find_token_spans` (the id search) of every object's phrase, numbered as in
    :func:`object_word_spans`: for ComfyUI's native patch, whose CLIP gives token ids and no
    character offsets."""
    if prompt.strip():
        for number, phrase in enumerate(phrases, 1):
            with about_object(number):
                find_token_spans(ids, [phrase], encode, prompt, max_sequence_length)
    return find_token_spans(ids, phrases, encode, prompt, max_sequence_length)


def objects_per_prompt(objects: Sequence, prompts: int) -> list[list[ObjectMotion]]:
    """``objects`` as one list per prompt: a flat list applies to every prompt."""
    objects = list(objects)
    if objects and all(isinstance(o, (list, tuple)) for o in objects):
        if len(objects) != prompts:
            raise FlexiMMTInputError(f"{len(objects)} object lists for {prompts} prompts: give one list per prompt")
        per = [list(o) for o in objects]
    else:
        per = [objects] * prompts
    counts = {len(o) for o in per}
    if len(counts) > 1:
        raise FlexiMMTInputError(
            f"the prompts have {sorted(counts)} objects: give every prompt as many objects (or call once per prompt)"
        )
    for objs in per:
        for k, obj in enumerate(objs, 1):
            if not isinstance(obj, ObjectMotion):
                raise ObjectInputError(
                    k, f"it is a {type(obj).__name__}: give fleximmt.ObjectMotion(mask, motion, motion_text)"
                )
    return per


class FlexiMMTMixin:
    """FlexiMMT's transfer on top of a diffusers pipeline; ``adapter_class`` names the model family."""

    adapter_class: type[ModelAdapter]
    call_defaults: ClassVar[dict[str, Any]] = {}  # diffusers' arguments whose default FlexiMMT changes
    call_doc: str = "."  # what the call does differently from diffusers' (the docstring's first paragraph ends so)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "adapter_class" in cls.__dict__ and "__call__" not in cls.__dict__:
            cls.__call__ = flexi_call(cls)

    @property
    def adapter(self) -> ModelAdapter:
        return self.adapter_class(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | None = None, **kwargs):
        """Load the family's components (default: the adapter's ``default_model``, e.g.
        ``THUDM/CogVideoX-5b-I2V``; or a local folder); safetensors only."""
        pretrained_model_name_or_path = pretrained_model_name_or_path or cls.adapter_class.default_model
        check_safetensors(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # -- geometry from the model's config --------------------------------------------------
    def token_grid(self, height: int, width: int, num_frames: int) -> TokenGrid:
        return self.adapter.token_grid(height, width, num_frames)

    def default_size(self) -> tuple[int, int, int]:
        """(height, width, num_frames) a call generates when it does not say."""
        return self.adapter.default_size()

    def check_geometry(self, height: int, width: int, num_frames: int) -> None:
        self.adapter.check_geometry(height, width, num_frames)

    def mask_frame_index(self, num_video_frames: int) -> np.ndarray:
        """For each frame of a decoded video, the token frame its masks are on (``video.mask_overlay``)."""
        height, width, _ = self.default_size()
        return self.token_grid(height, width, num_video_frames).frame_index(num_video_frames)

    def to_json_string(self) -> str:
        """``model_index.json`` names diffusers' own pipeline class, so a saved FlexiMMT pipeline loads
        anywhere diffusers does (``fleximmt.load_pipeline`` maps it back to FlexiMMT's)."""
        index = json.loads(super().to_json_string())
        index["_class_name"] = self.adapter_class.pipeline_class.__name__
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    def call_settings(self, **settings) -> dict[str, Any]:
        """Settings a front end offers for every model (``guidance_scale``, ``height``, ``width``,
        ``num_frames``, ...) as this pipeline's call takes them; None (the model's default) is left out. A
        pipeline whose call has no ``guidance_scale`` but a ``guider`` (HunyuanVideo 1.5) gets a guider of
        that scale; any other setting its call lacks is refused by name."""
        params = inspect.signature(type(self).__call__).parameters
        out = {}
        for name, value in settings.items():
            if value is None:
                continue
            if name in params:
                out[name] = value
            elif name == "guidance_scale" and getattr(self, "guider", None) is not None:
                if self.guider.guidance_scale != value:
                    self.guider = self.guider.new(guidance_scale=value)
            else:
                raise FlexiMMTInputError(
                    f"{name}={value!r}: {self.adapter_class.display_name}'s pipeline takes no {name} (see "
                    f"help({type(self).__name__}.__call__)): leave it unset"
                )
        return out

    @classmethod
    def diffusers_parameters(cls) -> list[str]:
        """The names of diffusers' own ``__call__`` arguments, in diffusers' order."""
        params = inspect.signature(cls.adapter_class.pipeline_class.__call__).parameters
        return [name for name in params if name != "self"]

    # -- one call ----------------------------------------------------------------------------
    def _call(self, arguments: dict[str, Any], given: Collection[str] = ()) -> Any:
        """Run diffusers' ``__call__`` with FlexiMMT around it; ``arguments`` are the locals of the
        subclass's ``__call__`` (diffusers' arguments and FlexiMMT's options), ``given`` the names the
        caller passed."""
        adapter = self.adapter
        diffusers_call = self.adapter_class.pipeline_class.__call__
        call = {name: arguments[name] for name in self.diffusers_parameters()}
        # a pipeline without diffusers' step callback gets FlexiMMT's: the adapter's each_step runs it
        own_callback = "callback_on_step_end" not in call and arguments.get("callback_on_step_end") is not None
        if own_callback:
            call["callback_on_step_end"] = arguments["callback_on_step_end"]
        options = TransferOptions(**{name: arguments[name] for name in OPTIONS})
        options.apply_preset(given)
        prompt = call.get("prompt")
        per_prompt = objects_per_prompt(options.objects, len(prompt) if isinstance(prompt, list) else 1)
        call = adapter.prepare_call(call)
        try:
            if not per_prompt[0] and own_callback:
                with adapter.each_step(call, lambda step: None) as call:
                    return diffusers_call(self, **call)
            if not per_prompt[0]:
                return diffusers_call(self, **call)
            adapter.check_model()
            options.check(adapter)
            return self._transfer(adapter, diffusers_call, call, options, per_prompt)
        except BaseException:
            # a callback that raises to stop a run (the web app's Stop) leaves what diffusers' loop
            # would have cleared at its end: the step's timestep, and offloaded models on the GPU
            self._current_timestep = None
            self.maybe_free_model_hooks()
            raise

    def _transfer(
        self,
        adapter: ModelAdapter,
        diffusers_call: Callable,
        call: dict,
        options: TransferOptions,
        per_prompt: list[list[ObjectMotion]],
    ) -> Any:
        height, width, num_frames = adapter.call_size(call)
        adapter.check_geometry(height, width, num_frames)
        grid = adapter.token_grid(height, width, num_frames)
        prompts = adapter.batch_prompts(call)
        videos_per_prompt = len(prompts) // len(per_prompt)
        objects = [objs for objs in per_prompt for _ in range(videos_per_prompt)]
        images = adapter.batch_images(call, len(prompts))
        text_len = call.get("max_sequence_length") or adapter.default_text_length()
        videos = [
            self._video_objects(adapter, prompt, image, objs, grid, (height, width), text_len, options)
            for prompt, image, objs in zip(prompts, images, objects)
        ]
        num_blocks = adapter.motion_shape()[0]
        rows = adapter.batch_rows(call, len(videos))
        shard, dtype = adapter.video_shard(grid.size), adapter.transformers()[0].dtype
        transfer = build_transfer(
            adapter, options, videos, grid, text_len, num_blocks, self._execution_device, rows, shard, dtype=dtype
        )
        adapter.install_processors()
        state, schedule = transfer
        with adapter.each_step(call, schedule.step_end) as call, adapter.attach(state, call) as call:
            check_caches(adapter.transformers(), state)
            output = diffusers_call(self, **call)
        masks = schedule.masks()
        if not options.return_masks:
            return output
        if not call.get("return_dict", True):
            return (*output, masks)
        return FlexiMMTPipelineOutput(**dict(output), masks=masks)

    @staticmethod
    def _video_objects(
        adapter: ModelAdapter,
        prompt: str,
        image,
        objects: list[ObjectMotion],
        grid: TokenGrid,
        size: tuple[int, int],
        text_len: int,
        options: TransferOptions,
    ) -> VideoObjects:
        """One video's objects checked against its image, its prompt and the model: their motion words found
        in the prompt as the pipeline tokenises it, their masks framed as the video's first frame (``size``) and
        brought to the token grid (the release's resize under ``preset="release"``)."""
        check_object_count(objects)
        num_blocks, dim = adapter.motion_shape()
        img_h, img_w = image_size(image)
        firsts = []
        for k, obj in enumerate(objects, 1):
            check_motion(adapter, k, obj.motion, num_blocks, dim, adapter.num_experts)
            mask = obj.mask_tensor
            if tuple(mask.shape) != (img_h, img_w):
                raise ObjectInputError(
                    k,
                    f"the mask is {mask.shape[0]} x {mask.shape[1]} but the image is "
                    f"{img_h} x {img_w}: give a mask of the image's size",
                )
            resize = "released" if options.release else "coverage"
            grid_mask = mask_to_token_grid(adapter.frame_mask(mask, *size), grid.height, grid.width, resize)
            check_object_mask(k, mask, grid_mask)
            firsts.append(grid_mask)
        check_one_d_m(objects)
        spans = object_word_spans(adapter, prompt, [o.motion_text for o in objects], text_len)
        concept_spans = None
        if options.mask_source == "qk":
            concepts = [o.concept_text or o.motion_text for o in objects]
            concept_spans = object_word_spans(adapter, prompt, concepts, text_len)
        return VideoObjects(objects, spans, firsts, concept_spans)


def check_object_mask(number: int, mask: torch.Tensor, grid_mask: torch.Tensor) -> None:
    """Refuse an object whose mask is empty, at the image's size or on the token grid: its motion
    would reach no video token."""
    if not mask.any():
        raise ObjectInputError(
            number,
            "the mask is empty (no pixel of the object is set), so its motion would reach no video token: "
            "give a mask whose object pixels are non-zero (white), or leave the object out",
        )
    if not grid_mask.any():
        raise ObjectInputError(
            number,
            f"the mask covers too little of the image to reach the {grid_mask.shape[0]} x {grid_mask.shape[1]} token "
            "grid with the release's resize (preset='release', docs/method.md#the-release-preset): draw a larger "
            "mask, or leave the preset out (fleximmt's resize keeps every object)",
        )


def check_motion(adapter: ModelAdapter, number: int, motion, num_blocks: int, dim: int, experts: int) -> None:
    """Refuse object ``number``'s motion when it was learned on another family or for another shape of model
    (``num_blocks`` blocks of width ``dim``, ``experts`` token sets)."""
    with about_object(number):
        motion.check_model(
            num_blocks, dim, family=adapter.family, experts=experts, source=f"object {number}", family_name=family_name
        )


def check_object_count(objects: Sequence[ObjectMotion]) -> None:
    if len(objects) > MAX_OBJECTS:
        raise FlexiMMTInputError(f"{len(objects)} objects given: FlexiMMT takes at most {MAX_OBJECTS}")


def check_one_d_m(objects: Sequence[ObjectMotion]) -> None:
    d_ms = {obj.motion.d_m for obj in objects}
    if len(d_ms) > 1:
        raise FlexiMMTInputError(
            f"the motions have different token counts d_m {sorted(d_ms)}: use motions trained with one d_m"
        )


@dataclass
class VideoObjects:
    """One video's objects as a transfer takes them, whoever found their words and put their masks on the
    token grid (a FlexiMMT pipeline by characters and the pipeline's own resize; ComfyUI's native patch by
    CLIP's token ids and ComfyUI's crop)."""

    objects: Sequence[ObjectMotion]
    spans: list[list[int]]  # each object's motion words among the text tokens
    first_masks: list[torch.Tensor]  # each object's first-frame mask on the token grid, bool [h, w]
    concept_spans: list[list[int]] | None = None  # each object's concept words (DMEM: mask_source="qk")


class Transfer(NamedTuple):
    """One transfer: the state the model's processors read, and the schedule of its masks."""

    state: FlexiMMTState
    schedule: MaskSchedule


def build_transfer(
    adapter: ModelAdapter,
    options: TransferOptions,
    videos: Sequence[VideoObjects],
    grid: TokenGrid,
    text_len: int,
    num_blocks: int,
    device: torch.device | str | None = None,
    rows: BatchRows | None = None,
    shard=None,
    expert: int | None = None,
    dtype: torch.dtype | None = None,
    text_keys: bool | None = None,
) -> Transfer:
    """The transfer of one call, for any family: ``options`` checked against ``adapter`` (an instance of the
    family's adapter: its attention form, parts and settings), then the state of every video's objects
    (``videos``: motion tokens, motion words among ``text_len`` text tokens, first-frame masks on ``grid``)
    for a model of ``num_blocks`` blocks, and its mask schedule from the first-frame masks. ``rows``: the
    call's batch rows (default: every row is video 0; a driver may give each forward's as it comes);
    ``shard``: this process's video tokens (``VideoShard``) under context parallelism; ``expert``: the one
    expert whose tokens the model is (a ComfyUI MODEL; None: every expert's); ``dtype``: the model's precision
    (RMPM's under ``preset="release"``); ``text_keys``: whether the attention names each row's text keys
    (``TextKeys``; None: as the adapter's processors do; ComfyUI's native patch names them on every family)."""
    options.check(adapter)
    motions, firsts = [], []
    for video in videos:
        check_object_count(video.objects)
        check_one_d_m(video.objects)
        firsts.append(torch.stack(list(video.first_masks)).to(device))
        tokens = torch.stack([obj.motion.expert_tokens() for obj in video.objects])  # [K, experts, blocks, d_m, dim]
        if expert is not None:
            tokens = tokens[:, expert : expert + 1]
        concept_index = None
        if options.mask_source == "qk":
            concept_index = [torch.tensor(span, dtype=torch.long, device=device) for span in video.concept_spans]
        member = span_membership(text_len, video.spans).to(device)
        motions.append(VideoMotions(tokens.to(device), member, concept_index))
    state = transfer_state(motions, options, adapter, num_blocks, grid.frames, rows, shard, text_keys)
    return Transfer(state, MaskSchedule(state, firsts, grid, options, num_blocks, dtype))


def check_caches(transformers: Sequence[torch.nn.Module], state: FlexiMMTState) -> None:
    """Refuse a diffusers cache (``transformer.enable_cache``) that cannot run with objects. Every cache
    that skips blocks or steps, or reuses attention outputs, runs: RMPM keeps the last masks on the
    steps it skips (``MaskSchedule``). FasterCache without ``is_guidance_distilled`` runs the
    conditional half of a batch alone on the steps it approximates the unconditional branch: it needs
    both branches in one forward, the conditional rows last (CogVideoX with guidance); a model that
    runs them as two calls (Wan), or a call without guidance, has no such halves."""
    from diffusers.hooks import FasterCacheConfig

    halves = state.rows.conditional_halves()
    for transformer in transformers:
        config = getattr(transformer, "_cache_config", None)
        if isinstance(config, FasterCacheConfig) and not config.is_guidance_distilled and not halves:
            raise FlexiMMTInputError(
                "FasterCache (enable_cache(FasterCacheConfig(...))) approximates the unconditional branch from a "
                "batch holding both branches, which this call does not run (a model that runs them as two calls, "
                "such as Wan, or guidance_scale <= 1): pass FasterCacheConfig(is_guidance_distilled=True, ...), "
                "another cache, or transformer.disable_cache()"
            )


def transfer_state(
    videos: list[VideoMotions],
    options: TransferOptions,
    adapter: ModelAdapter,
    num_blocks: int,
    num_frames: int,
    rows: BatchRows | None = None,
    shard=None,
    text_keys: bool | None = None,
) -> FlexiMMTState:
    """The state a transfer's processors read: every video's motions, the model's settings
    (``adapter.state_settings()``; ``text_keys`` given: whether the attention names each row's text keys),
    the MDMA settings and RMPM's feature blocks (by default the model's ``feature_share`` of its first blocks)."""
    feature_blocks = options.feature_blocks
    if feature_blocks is None:
        feature_blocks = range(max(1, round(num_blocks * adapter.feature_share)))
    bad = [b for b in feature_blocks if not 0 <= b < num_blocks]
    if bad:
        raise FlexiMMTInputError(f"feature_blocks {bad} are outside the model's {num_blocks} blocks")
    settings = adapter.state_settings()
    if text_keys is not None:
        settings["text_keys"] = text_keys
    return FlexiMMTState(
        videos=videos,
        **settings,
        parts=options.parts,
        context_text=options.context_text,
        mask_kernel=options.mask_kernel,
        num_frames=num_frames,
        dmem=options.mask_source == "qk",
        feature_blocks=frozenset(feature_blocks) if options.mask_source == "rmpm" else frozenset(),
        rows=BatchRows() if rows is None else rows,
        shard=shard,
    )


class MaskSchedule:
    """The object masks of one transfer, step by step (docs/method.md#rmpm): step 0's from the
    options (first-frame masks on every frame, the release's none, all video, or DMEM's), then after
    every step RMPM's from the features captured during it - used from the next step on - until
    dynamic RMPM freezes them. Any driver of a denoising loop calls :meth:`step_end` after each step
    (diffusers' callback here; ComfyUI's native patch when the noise level changes).

    New masks come only from a step whose features came from every feature block: on a step where a
    cache (``transformer.enable_cache``) skipped blocks or reused attention outputs - FirstBlockCache
    past its first block, MagCache and TaylorSeer's skipped steps, PAB and FasterCache's reused
    attention - the capture is partial or empty, and the last masks stay for the next step.

    ``dtype`` is the model's precision: RMPM runs in it under ``preset="release"`` (the release
    propagates the block-averaged features as the model outputs them), else in float32."""

    def __init__(
        self,
        state: FlexiMMTState,
        first_masks: list[torch.Tensor],
        grid: TokenGrid,
        options: TransferOptions,
        num_blocks: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.state, self.first_masks, self.grid, self.options, self.num_blocks = (
            state,
            first_masks,
            grid,
            options,
            num_blocks,
        )
        self.dtype = dtype if options.release and dtype is not None else torch.float32
        self.updating = options.mask_source == "rmpm"
        self.history: list[torch.Tensor] = []
        num_objects = state.num_objects
        for v, first in enumerate(first_masks):
            device = first.device
            if options.mask_source == "none":
                state.set_video_masks(torch.ones(num_objects, grid.size, dtype=torch.bool, device=device), v)
            elif options.mask_source == "rmpm" and options.initial_masks == "none":
                # the release's step 0: no masks yet - motion tokens reach only their motion words, and
                # those words see all video (T2V open); RMPM's first masks arrive after step 0
                none = torch.zeros(num_objects, grid.size, dtype=torch.bool, device=device)
                state.set_video_masks(none, v, parts=options.parts - {"t2v"})
            elif options.mask_source in ("rmpm", "static", "qk"):
                state.set_video_masks(first[:, None].expand(-1, grid.frames, -1, -1).reshape(num_objects, -1), v)
        state.begin_step(grid.size, num_blocks)

    def step_end(self, step: int) -> None:
        """Step ``step`` (from 0) is done: record its masks, then prepare the next step's."""
        state, grid, options = self.state, self.grid, self.options
        num_objects = state.num_objects
        if options.return_masks:
            self.history.append(
                torch.stack(
                    [
                        masks.view(num_objects, grid.frames, grid.height, grid.width).cpu()
                        for masks in state.layouts.video_masks
                    ]
                )
            )
        state.begin_step(grid.size, self.num_blocks)
        if not self.updating:
            return
        new_masks, changes = {}, []
        empty = 0.0 if options.release else float("inf")  # the change of an empty old mask that changed
        for v in range(len(state.videos)):
            complete = state.capture.complete(v)
            features = state.capture.take(v)
            if features is None or not complete:  # a cache skipped blocks of this step: the last masks stay
                logger.debug(
                    "step %d: RMPM's features came from %s of blocks %s: masks kept",
                    step,
                    "none" if features is None else "some",
                    sorted(state.capture.blocks),
                )
                continue
            new = rmpm(
                self.first_masks[v],
                features.view(grid.frames, grid.height, grid.width, -1),
                options.anchors,
                options.rmpm_method,
                self.dtype,
            ).reshape(num_objects, -1)
            new_masks[v] = new
            changes += [mask_change(o, n, empty) for o, n in zip(state.layouts.video_masks[v], new)]
        alpha = options.alpha
        if alpha is not None and step >= ALWAYS_UPDATE_STEPS and changes and all(c < alpha for c in changes):
            self.stop(f"dynamic RMPM: every mask changed by less than alpha={options.alpha} at step {step}: kept")
            return
        for v, new in new_masks.items():
            # after a release-style step 0, every part is on again
            state.set_video_masks(new, v, parts=options.parts)
        if options.release and step + 1 >= RELEASE_MASK_STEPS:
            self.stop(f"masks frozen after step {step}: the release computes masks in its first 50 steps")

    def stop(self, why: str) -> None:
        """Keep the current masks for every later step and capture no more features."""
        self.updating = False
        self.state.capture.stop()
        logger.info(why)

    def masks(self) -> torch.Tensor | None:
        """The masks every step used, bool ``[videos, steps, K, frames, h, w]`` (with ``return_masks``)."""
        return torch.stack(self.history, dim=1) if self.history else None
