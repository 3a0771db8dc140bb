"""What every FlexiMMT node shares: ComfyUI's types as fleximmt reads them, the motion folder, the
objects list and its *Object* node, and errors numbered as the user sees them.

ComfyUI passes IMAGE as float ``[B, H, W, C]`` in 0-1 (video frames on B) and MASK as ``[B, H, W]``
or ``[H, W]``. FlexiMMT's own values travel between nodes as these types:

- ``FLEXIMMT_MOTION``: a :class:`fleximmt.MotionTokens`.
- ``FLEXIMMT_OBJECTS``: a tuple of :class:`fleximmt.ObjectMotion` (mask ``[H, W]`` bool at the
  image's size, motion, motion words), object 1 first; the *Object* node appends one.
- ``FLEXIMMT_PIPE``: a FlexiMMT diffusers pipeline (``FlexiMMTPipeline`` / ``FlexiMMTWanPipeline``).

The nodes use ComfyUI's V3 schema (``comfy_api.latest``), which ComfyUI 0.3.64 and 0.33 both load,
so these modules import ComfyUI; ``fleximmt.apps.comfy`` itself imports them only when ComfyUI asks.
Every node is named "FlexiMMT ..." in the node library; the class ids are those of the first
release, so saved workflows open unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io

from ...errors import ObjectInputError
from ...method.kernels import DEFAULT_KERNEL, MASK_KERNELS
from ...method.masks import RMPM_METHODS
from ...method.motion import MotionTokens, ObjectMotion
from ...method.pipeline import INITIAL_MASKS, MASK_SOURCES, about_object, check_object_mask

CATEGORY = "FlexiMMT"
MOTION = io.Custom("FLEXIMMT_MOTION")
OBJECTS = io.Custom("FLEXIMMT_OBJECTS")
PIPE = io.Custom("FLEXIMMT_PIPE")
MOTIONS_FOLDER = "fleximmt_motions"  # ComfyUI model folder of learned motions (models/fleximmt_motions)
MAX_OBJECTS = 8


def register_folders() -> None:
    """Make ``models/fleximmt_motions`` one of ComfyUI's model folders (once)."""
    import folder_paths

    if MOTIONS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[MOTIONS_FOLDER] = (
            [os.path.join(folder_paths.models_dir, MOTIONS_FOLDER)],
            {".safetensors"},
        )


def motions_dir() -> Path:
    """Where learned motions are saved: the first ``fleximmt_motions`` folder."""
    import folder_paths

    register_folders()
    path = Path(folder_paths.get_folder_paths(MOTIONS_FOLDER)[0])
    path.mkdir(parents=True, exist_ok=True)
    return path


def motion_files() -> list[str]:
    import folder_paths

    register_folders()
    return sorted(folder_paths.get_filename_list(MOTIONS_FOLDER))


def mask_source_input() -> io.Combo.Input:
    """Where each object's masks come from: Transfer's and Apply's input."""
    return io.Combo.Input(
        "mask_source",
        options=list(MASK_SOURCES),
        default="rmpm",
        tooltip="Where each object's masks come from: rmpm (propagated through the video, the paper's), static "
        "(the first-frame mask on every frame), qk (attention maps of the concept words), none (no masks).",
    )


def rmpm_inputs(optional: bool) -> list:
    """RMPM's options (docs/method.md#rmpm), as Transfer and Apply take them."""
    return [
        io.Combo.Input(
            "rmpm_method",
            options=list(RMPM_METHODS),
            default="paper",
            optional=optional,
            tooltip="RMPM's propagation: the paper's equations (12-13) or the authors' released label propagation.",
        ),
        io.Int.Input("anchors", default=3, min=1, max=64, optional=optional, tooltip="RMPM's anchor frames W."),
        io.Float.Input(
            "alpha",
            default=0.0,
            min=0.0,
            max=0.99,
            step=0.01,
            optional=optional,
            tooltip="Dynamic RMPM: masks freeze once they change less than this fraction; 0: update every step.",
        ),
        io.Combo.Input(
            "initial_masks",
            options=list(INITIAL_MASKS),
            default="first_frame",
            optional=optional,
            tooltip="RMPM's first step: the first-frame masks on every frame, or none (the authors' release).",
        ),
    ]


def mask_kernel_input() -> io.Combo.Input:
    """How MDMA is computed (docs/method.md#attention-without-an-n-x-n-mask): the optional input of the nodes
    that run FlexiMMT's attention (Transfer, Learn Motion, FlexiMMT Apply)."""
    return io.Combo.Input(
        "mask_kernel",
        options=list(MASK_KERNELS),
        default=DEFAULT_KERNEL,
        optional=True,
        tooltip="How MDMA is computed (the same result): auto, grouped attention with no N x N mask; flex, one "
        "FlexAttention call (compiles first; learning with it needs a GPU); dense, the N x N reference.",
    )


def learn_text_inputs(motion_words_use: str) -> list:
    """The inputs both Learn nodes share that name the motion: the caption, its concept and motion words (what
    ``motion_words_use`` says the motion words are for), and the motion's file name."""
    return [
        io.String.Input(
            "caption",
            default="",
            multiline=True,
            tooltip="What happens in the video, e.g. 'A man is doing yoga.'",
        ),
        io.String.Input(
            "concept_words", default="", tooltip="The caption's words naming the moving object, e.g. 'man'."
        ),
        io.String.Input(
            "motion_words",
            default="",
            tooltip=f"The caption's words describing the motion, e.g. 'is doing yoga'. {motion_words_use}",
        ),
        io.String.Input(
            "name",
            default="motion",
            tooltip="The motion's file name in models/fleximmt_motions (letters, digits, spaces, '.', '_', '-').",
        ),
    ]


def learn_run_inputs() -> list:
    """The inputs both Learn nodes share: the seed, resume, and the reference video's fps."""
    return [
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=2**31 - 1,
            control_after_generate=False,
            tooltip="Seed of the token initialisation and training draws.",
        ),
        io.Boolean.Input(
            "resume",
            default=True,
            tooltip="Continue a stopped run of this name (same settings) from its checkpoint.",
        ),
        io.Float.Input(
            "fps",
            optional=True,
            default=0.0,
            min=0.0,
            max=1000.0,
            step=0.01,
            tooltip="The video's frame rate (Get Video Components' fps): frames are subsampled to about 8 a "
            "second, as fleximmt train does. 0: take the frames as they are.",
        ),
    ]


def first_mask(mask: torch.Tensor, k: int) -> torch.Tensor:
    """A ComfyUI MASK (``[H, W]`` or ``[B, H, W]``; the first of a batch is the first frame's) as
    bool ``[H, W]``: the object is where the mask is above 0.5."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ObjectInputError(k, f"a MASK must be [H, W] or [B, H, W], got {shape}")
    if mask.ndim == 3:
        mask = mask[0]
    return mask.float().cpu() > 0.5


def add_object(
    objects: tuple | None, mask: torch.Tensor, motion: MotionTokens, motion_words: str, concept_words: str = ""
) -> tuple[ObjectMotion, ...]:
    """``objects`` with one more object appended (the *Object* node). An empty mask (no pixel above 0.5)
    is refused here with the library's message, so the wrapper nodes and the native patch refuse it
    alike, before anything runs."""
    objects = tuple(objects or ())
    k = len(objects) + 1
    if k > MAX_OBJECTS:
        raise ObjectInputError(k, f"FlexiMMT takes at most {MAX_OBJECTS} objects; remove an Object node")
    if not isinstance(motion, MotionTokens):
        raise ObjectInputError(k, "connect a MOTION (from Load Motion or Learn Motion)")
    if not motion_words.strip():
        raise ObjectInputError(k, "write its motion words, the words of the prompt that describe its motion")
    pixels = first_mask(mask, k)
    check_object_mask(k, pixels, pixels)  # the library's rule, before a model gives the token grid
    with about_object(k):
        obj = ObjectMotion(pixels, motion, motion_words.strip(), concept_words.strip() or None)
    return (*objects, obj)


class ObjectNode(io.ComfyNode):
    """FlexiMMT Object: one object of the first frame, its motion and the prompt's words for that motion."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexiMMTObject",
            display_name="FlexiMMT Object",
            category=CATEGORY,
            description="Adds one object (mask + motion + motion words) to the objects list; chain up to 8.",
            inputs=[
                io.Mask.Input(
                    "mask",
                    tooltip="The object in the first frame (mask editor, SAM, a loaded mask); "
                    "of a batch, the first mask is used.",
                ),
                MOTION.Input("motion", tooltip="The motion this object performs (Load Motion or Learn Motion)."),
                io.String.Input(
                    "motion_words",
                    default="",
                    tooltip="The words of the prompt that describe this object's motion, exactly as the prompt "
                    "has them, e.g. 'jumps up'.",
                ),
                OBJECTS.Input("objects", optional=True, tooltip="Objects before this one (chain Object nodes)."),
                io.String.Input(
                    "concept_words",
                    optional=True,
                    default="",
                    tooltip="Optional: the words naming the object (only the 'qk' mask source uses them).",
                ),
            ],
            outputs=[OBJECTS.Output("objects_out", display_name="objects")],
        )

    @classmethod
    def execute(cls, mask, motion, motion_words, objects=None, concept_words="") -> io.NodeOutput:
        return io.NodeOutput(add_object(objects, mask, motion, motion_words, concept_words))
