"""FlexiMMT native on ComfyUI's own models: the *FlexiMMT Apply* node.

It takes a MODEL from ComfyUI's loaders - with whatever LoRAs, GGUF or fp8 weights were loaded there
- finds its family (Wan 2.1 / 2.2, CogVideoX, HunyuanVideo 1.5, LTX-2) and returns a clone that any sampler
runs with FlexiMMT, through ComfyUI's patch points only, never by editing its files. What is the same
for every family (the run, its rows and steps, the masks' schedule) is ``patch.py``; what differs (which
attention calls host the motion tokens, how they are projected, where RMPM's features are read, where
the motion words sit in the text) is one module per family: ``wan.py``, ``cogvideox.py``, ``hunyuan15.py``,
``ltx2.py``.

A motion learned by fleximmt on diffusers' model of a family works here unchanged: motion tokens are
per block, whatever the weights' key names.
"""

from __future__ import annotations

from comfy_api.latest import io

from ....errors import FlexiMMTInputError
from ....method.kernels import DEFAULT_KERNEL
from ....method.pipeline import TransferOptions, about_object, check_motion
from ..common import CATEGORY, OBJECTS, mask_kernel_input, mask_source_input, rmpm_inputs
from .cogvideox import CogVideoX
from .family import Family, clip_tokens
from .hunyuan15 import HunyuanVideo15
from .ltx2 import LTX2
from .patch import KEY, NativePatch
from .wan import Wan

FAMILIES: tuple[type[Family], ...] = (Wan, CogVideoX, HunyuanVideo15, LTX2)
EXPERTS = ("auto", "1 (high noise)", "2 (low noise)")


def clip_token_ids(clip, text: str) -> list[int]:
    """The token ids of ``text`` as a ComfyUI CLIP's (first) tokenizer hands them to its encoder."""
    return clip_tokens(clip, text)


def family_of(model) -> Family:
    """The family of a ComfyUI MODEL (a ModelPatcher), or a ``FlexiMMTInputError`` naming what it is."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    for family in FAMILIES:
        if family.matches(diffusion_model):
            found = family()
            found.check(diffusion_model)
            return found
    names = ", ".join(f.name for f in FAMILIES)
    raise FlexiMMTInputError(
        f"FlexiMMT Apply patches ComfyUI's {names} image-to-video models; this MODEL is a "
        f"{type(diffusion_model).__name__}: load one of those with Load Diffusion Model"
    )


def check_motions(family: Family, diffusion_model, objects: tuple, expert: str) -> int:
    """Every object's motion fits the model (its family, blocks, width and experts); the expert's index."""
    if expert not in EXPERTS:
        raise FlexiMMTInputError(f"expert={expert!r}: choose from {list(EXPERTS)}")
    index = 0 if expert == "auto" else EXPERTS.index(expert) - 1
    num_blocks, dim = family.motion_shape(diffusion_model)
    adapter = family.adapter
    for k, obj in enumerate(objects, 1):
        check_motion(adapter, k, obj.motion, num_blocks, dim, obj.motion.num_experts)
        with about_object(k):
            if expert == "auto" and obj.motion.num_experts > 1:
                raise FlexiMMTInputError(
                    f"the motion holds {obj.motion.num_experts} experts' tokens (Wan 2.2 A14B): "
                    "set expert to 1 on the high-noise model, 2 on the low-noise model"
                )
            if index >= obj.motion.num_experts:
                raise FlexiMMTInputError(
                    f"the motion has one expert's tokens; expert={expert!r} needs a two-expert "
                    "motion (Wan 2.2 A14B): use expert 'auto'"
                )
    return index


def apply_fleximmt(
    model,
    clip,
    prompt: str,
    objects: tuple | None,
    expert: str = "auto",
    mask_source: str = "rmpm",
    rmpm_method: str = "paper",
    anchors: int = 3,
    alpha: float = 0.0,
    initial_masks: str = "first_frame",
    parts: tuple[str, ...] | None = None,
    mask_kernel: str = DEFAULT_KERNEL,
    context_text: str = "open",
    attention_backend: str | None = None,
):
    """A clone of ComfyUI's ``model`` (a ModelPatcher of a family FlexiMMT knows) that samples with
    FlexiMMT: ``objects`` (the *Object* nodes' list) move with their motions, their motion words found
    in ``prompt`` as ``clip`` tokenises it. ``alpha`` 0 updates RMPM's masks every step; ``parts``
    default to every MDMA part the family has. ``attention_backend``: ``mask_kernel``'s old name, until
    fleximmt 0.2."""
    family = family_of(model)
    diffusion_model = model.model.diffusion_model
    objects = tuple(objects or ())
    index = check_motions(family, diffusion_model, objects, expert)
    adapter = family.adapter
    options = TransferOptions(
        objects=objects,
        mask_source=mask_source,
        rmpm_method=rmpm_method,
        anchors=anchors,
        alpha=alpha if alpha else None,
        parts=tuple(adapter.parts) if parts is None else parts,
        context_text=context_text,
        mask_kernel=mask_kernel,
        initial_masks=initial_masks,
        attention_backend=attention_backend,
    )
    options.check(adapter)
    spans, concept_spans, prompt_len = [], None, 0
    if objects:
        spans, prompt_len = family.word_spans(clip, prompt, [obj.motion_text for obj in objects])
        if mask_source == "qk":
            concept_spans, _ = family.word_spans(clip, prompt, [o.concept_text or o.motion_text for o in objects])
    patched = model.clone()
    NativePatch(family, objects, spans, concept_spans, prompt_len, options, index).install(patched)
    return patched


class ApplyFlexiMMT(io.ComfyNode):
    """FlexiMMT Apply: patch a video MODEL so that any sampler moves each object with its own motion."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexiMMTApply",  # the class id of the first, Wan-only node: saved workflows keep loading
            display_name="FlexiMMT Apply",
            category=CATEGORY,
            description="FlexiMMT on ComfyUI's own Wan 2.1 / 2.2, CogVideoX, HunyuanVideo 1.5 and LTX-2 models: motion "
            "tokens and MDMA in their attention, RMPM masks from their own features, for any sampler. The model "
            "may come with LoRAs or fp8 weights as loaded; GGUF models (ComfyUI-GGUF) are untested.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="A Wan 2.1 / 2.2, CogVideoX, HunyuanVideo 1.5 or LTX-2 image-to-video model from ComfyUI's "
                    "loaders (LoRAs already applied).",
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The model's text encoder (umT5 for Wan, T5 for CogVideoX, Qwen2.5 for HunyuanVideo "
                    "1.5, Gemma 3 for LTX-2): its tokenizer finds each object's motion words.",
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip="The positive prompt, exactly as given to CLIP Text Encode, with each object's "
                    "motion words in it.",
                ),
                OBJECTS.Input("objects", tooltip="The objects (chain FlexiMMT Object nodes), object 1 first."),
                io.Combo.Input(
                    "expert",
                    options=list(EXPERTS),
                    default="auto",
                    tooltip="Wan 2.2 A14B: 1 on the high-noise model, 2 on the low-noise model; auto for "
                    "one-expert motions (every other model).",
                ),
                mask_source_input(),
                *rmpm_inputs(optional=True),
                mask_kernel_input(),
            ],
            outputs=[io.Model.Output("model_out", display_name="model")],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        prompt,
        objects,
        expert="auto",
        mask_source="rmpm",
        rmpm_method="paper",
        anchors=3,
        alpha=0.0,
        initial_masks="first_frame",
        mask_kernel=DEFAULT_KERNEL,
    ) -> io.NodeOutput:
        return io.NodeOutput(
            apply_fleximmt(
                model,
                clip,
                prompt,
                objects,
                expert,
                mask_source,
                rmpm_method,
                anchors,
                alpha,
                initial_masks,
                mask_kernel=mask_kernel,
            )
        )


NODES = [ApplyFlexiMMT]

__all__ = ["EXPERTS", "FAMILIES", "KEY", "NODES", "ApplyFlexiMMT", "apply_fleximmt", "clip_token_ids", "family_of"]
