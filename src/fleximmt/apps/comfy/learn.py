"""Learn a motion on ComfyUI's own model: the *FlexiMMT Learn Motion (native)* node.

It takes the MODEL, CLIP and VAE ComfyUI's loaders give (LoRAs, fp8 or GGUF weights as loaded), a
reference video as IMAGE frames (ComfyUI's video nodes, with their fps) and the words of a caption, and
trains only the motion tokens through ComfyUI's own forward with the library's loop
(``fleximmt.training.train.fit_tokens``: the same objective, timestep draws, DMEM, learning-rate schedule
and checkpoints as ``train_motion``). No second copy of the model is loaded: the model's side is
``native/training.py`` (``NativeTraining``). The motion is written as the library's motion file into
``models/fleximmt_motions`` (atomically), where *FlexiMMT Load Motion* and ``fleximmt inspect`` read it,
and *Apply FlexiMMT* or the wrapper nodes use it.

Like ComfyUI's own trainer (``comfy_extras/nodes_train.py``: *Train LoRA*, *Plot Loss Graph*) it moves the
progress bar every step and returns the losses as a ``LOSS_MAP``, which ComfyUI's *Plot Loss Graph* draws;
a cancel stops it at the next step with a checkpoint beside the motion, and the same node queued again
continues from there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io, ui

from ...errors import FlexiMMTInputError
from ...method.kernels import DEFAULT_KERNEL
from ...method.kernels import check as check_kernel
from ...method.kernels import mask_kernel as kernel_named
from ...method.motion import check_motion_name, motion_metadata
from ...training.train import (
    Conditions,
    Reference,
    TrainResult,
    TrainSettings,
    checkpoint_interval,
    checkpoint_path,
    checkpointing_needed,
    fit_tokens,
    learned_motion,
    load_reference,
    prepare_conditions,
)
from .common import (
    CATEGORY,
    MOTIONS_FOLDER,
    learn_run_inputs,
    learn_text_inputs,
    mask_kernel_input,
    motions_dir,
)
from .common import MOTION as MOTION_TYPE
from .native import family_of
from .native.training import NativeTraining, compute_dtype

logger = logging.getLogger(__name__)

MOTION = io.Custom(MOTION_TYPE) if isinstance(MOTION_TYPE, str) else MOTION_TYPE
LOSS_MAP = io.Custom("LOSS_MAP")  # ComfyUI's trainer's type: {"loss": [one value a step]}, for Plot Loss Graph
WAN22_BOUNDARY = 0.875  # Wan 2.2 I2V A14B's boundary_ratio: below this noise level the low-noise expert denoises
# What one Learn step keeps besides the weights, per token and width channel of the blocks, in elements of the
# dtype the model computes in; counted by benchmarks/memory.py on ComfyUI 0.33's own Wan 2.1 blocks (StorageBytes on
# meta, which the CPU allocator confirms: tests/test_benchmarks.py), at widths 2,048-5,120, FFNs 1-5.4x as wide and
# 4-40 blocks, and rounded up. Each block keeps its input in the stream's dtype while checkpointing (1 a channel).
CHECKPOINTED_INPUT = 1
# The block recomputed in the backward pass peaks in one of two phases: its attention calls (22.1 a channel of the
# width, measured) or its FFN (17.1 a channel of the width and 3 of the FFN's hidden width: the up projection's
# output, the GELU's and a gradient of that width), whichever is larger; the Wan 2.1 14B block (5,120 wide, FFN
# 13,824) peaks in its FFN: 258,820 bytes a video token. The heads barely matter (their float32 log-sum-exps and
# RoPE tables): 20 heads of 256 instead of 40 of 128 add 784 bytes a video token to 300 KB, which the rounding covers.
RECOMPUTED_ATTENTION = 23
RECOMPUTED_WIDTH, RECOMPUTED_FFN = 18, 3
# Without checkpointing every block keeps its activations for the backward pass: 17.05 a channel of the width and
# 1 of the FFN's hidden width, measured; at its peak the backward pass has freed more than it allocated (19-92 KB a
# video token, measured), so no transient is added.
SAVED_WIDTH, SAVED_FFN = 17.5, 1
# A cross-attention family's text does not run through the blocks; each block that keeps its activations keeps its
# text's keys and values (5.2 a text token and channel of the width, measured with Wan 2.1 I2V's 257 image tokens
# beside 512 text tokens), and the text embedding keeps about as much before the blocks (with checkpointing the
# two together: 35 MB measured for Wan 2.1 14B, 63 MB counted). A joint-attention family's text runs through the
# blocks with the video and is counted as its tokens are (HunyuanVideo 1.5's and CogVideoX's blocks are counted
# with Wan's figures: benchmarks/memory.py does not build ComfyUI's models of them).
TEXT_SAVED = 6
# The loss's float32 tensors, each the size of the latent: the noised input, the noise, the target, the
# prediction and its float32 copy, their difference and its square, with a spare (about 3 in the benchmark's step,
# 0.8 KB a video token, whose loss is simpler than the loop's).
LOSS_TENSORS = 8


def linear_layers(block: torch.nn.Module) -> list[torch.nn.Module]:
    """A block's linear layers, whichever of ComfyUI's operations built them (their ``in_features``/``out_features``:
    ``torch.nn.Linear``'s, and those of ComfyUI's quantized layers, which are not ``torch.nn.Linear``)."""
    return [m for m in block.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]


def cast_per_call(layers: Sequence[torch.nn.Module], dtype: torch.dtype) -> bool:
    """Whether ComfyUI copies these layers' weights to ``dtype`` at each call (fp8 or GGUF weights: its
    ``comfy_cast_weights`` layers, or weights stored in another dtype)."""
    return any(
        getattr(m, "comfy_cast_weights", False) or (getattr(m, "weight", None) is not None and m.weight.dtype != dtype)
        for m in layers
    )


def training_memory(trainer: NativeTraining, geometry: tuple[int, int, int], checkpointing: bool) -> int:
    """Bytes a training step needs besides the weights, for ComfyUI's model management to keep free
    (``load_models_gpu``'s ``memory_required``): the blocks' activations kept for the backward pass (with
    checkpointing each block's input and one recomputed block's peak), the text's, the loss's float32 tensors, and
    the weight copies ComfyUI's layers make at a call and the backward pass keeps.

    What the family knows of its model is read, not any one family's numbers: its width and blocks
    (``motion_shape``), the FFN's hidden width (the widest input of a block's linear layers: the down
    projection's), the token grid and text length, whether its text runs through the blocks (a joint attention)
    or is only read by them (a cross-attention), and the dtype it computes in."""
    native, model = trainer.native, trainer.diffusion_models()[0]
    blocks, width = trainer.motion_shape()
    layers = linear_layers(native.blocks(model)[0])
    ffn = max(layer.in_features for layer in layers)
    dtype = compute_dtype(trainer.models[0].model)
    size = dtype.itemsize
    text = trainer.default_text_length()
    joint = native.adapter.form == "joint"
    tokens = trainer.token_grid(*geometry).size + (text if joint else 0)  # what runs through each block
    text_saved = 0 if joint else text * width * TEXT_SAVED
    if checkpointing:
        recomputed = max(RECOMPUTED_ATTENTION * width, RECOMPUTED_WIDTH * width + RECOMPUTED_FFN * ffn)
        activations = tokens * (blocks * CHECKPOINTED_INPUT * width + recomputed) + 2 * text_saved
    else:
        activations = blocks * (tokens * (SAVED_WIDTH * width + SAVED_FFN * ffn) + text_saved) + text_saved
    loss = LOSS_TENSORS * math.prod(trainer.latent_shape(*geometry)) * 4
    # A layer whose weight ComfyUI copies at each call (fp8 or GGUF weights; with a partial load, every layer it
    # streams) keeps the copy until its backward pass: one block's with checkpointing (the recomputed one; 0.52-0.62
    # GiB measured for Wan 2.1 14B's fp8_scaled weights, whose block holds 0.75 GiB of them), which a partial load
    # can need whatever the weights; every block's without (25.8 GiB measured, 40 blocks), counted only for weights
    # always cast - weights used in place are then better loaded whole, and a partial load would need the copies.
    copy = sum(layer.in_features * layer.out_features for layer in layers) * size
    if checkpointing:
        copies = copy
    else:
        copies = blocks * copy if cast_per_call(layers, dtype) else 0
    return int(activations * size + loss + copies)


def learn_native(
    models: Sequence,
    clip,
    vae,
    frames,
    caption: str,
    concept_words: str,
    motion_words: str,
    output: str | Path,
    *,
    clip_vision_output=None,
    fps: float | None = None,
    boundary: float | None = None,
    resume: bool = False,
    callback: Callable[[int, float], None] | None = None,
    conditions: Conditions | None = None,
    **settings: Any,
) -> TrainResult:
    """Learn motion tokens on ComfyUI's MODEL(s) (``models``: one, or Wan 2.2 A14B's high- and low-noise
    experts) from ``frames`` (uint8 ``[T, H, W, 3]`` at ``fps``; subsampled as ``fleximmt train`` does) and
    write them to ``output``. ``settings`` are :class:`fleximmt.training.train.TrainSettings`' (``height``,
    ``width``: the frames' own where not given; ``num_frames``: the family's). ``conditions``: the
    reference already encoded (``encode_conditions``' keys), instead of ComfyUI's VAE and CLIP on ``frames``.
    ``resume`` continues from the checkpoint beside ``output``; ``callback(step, loss)`` after each step,
    and one that raises stops the run with a checkpoint of that step."""
    output = Path(output)
    if not models:
        raise FlexiMMTInputError("Learn motion needs a MODEL: connect one from ComfyUI's loaders")
    family = family_of(models[0])
    shapes = {(type(m.model.diffusion_model), family.motion_shape(m.model.diffusion_model)) for m in models}
    if len(shapes) > 1 or len(models) > 2:
        raise FlexiMMTInputError(
            "model_2 is Wan 2.2 A14B's low-noise expert: connect the low-noise model of the same family and size "
            "as model, or leave it unconnected"
        )
    for model in models:
        family.check_learning(model.model.diffusion_model)
    unknown = set(settings) - set(TrainSettings.__dataclass_fields__)
    if unknown:
        raise FlexiMMTInputError(f"unknown training setting(s) {sorted(unknown)}: see TrainSettings")
    settings.setdefault("num_frames", family.learn_frames)
    if frames is not None:
        settings.setdefault("height", int(frames.shape[1]))
        settings.setdefault("width", int(frames.shape[2]))
    cfg = TrainSettings(**settings)
    cfg.apply_preset(given=settings)
    cfg.validate()
    device = models[0].load_device
    check_kernel(kernel_named(cfg.mask_kernel), device, grad=True)  # before any encoding: flex trains on a GPU only
    trainer = NativeTraining(family, models, clip, vae, clip_vision_output, boundary if len(models) > 1 else None)
    geometry = (cfg.height, cfg.width, cfg.num_frames)
    trainer.check_geometry(*geometry)
    if conditions is None:
        trainer.word_spans(caption, [motion_words])  # the caption's length as ComfyUI's CLIP gives it to the model
    else:
        trainer.text_len = conditions.member.shape[1]
    reference = None
    if frames is not None:
        subsampled = load_reference(frames, cfg.num_frames, cfg.fps, video_fps=fps)
        reference = Reference(subsampled, caption, concept_words, motion_words)
    by_sample = bool(cfg.crops or cfg.caption_dropout or cfg.reencode)
    if conditions is None and not by_sample:
        conditions = prepare_conditions(
            trainer, reference.frames, caption, concept_words, motion_words, cfg, geometry, None, cfg.seed
        )
    if conditions is not None:  # ordinary tensors, not inference mode's (ComfyUI runs nodes in it)
        with torch.inference_mode(False):
            tensors = {name: value.clone() for name, value in conditions.tensors.items()}
            conditions = Conditions(tensors, conditions.member.clone(), conditions.concept_member.clone())
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:
        checkpointing = checkpointing_needed(trainer, trainer.token_grid(*geometry), trainer.default_text_length())
    fingerprints = {
        "model": trainer.fingerprint(),
        "settings": cfg.fingerprint(),
        "caption": caption,
        "words": f"{concept_words}|{motion_words}",
        "processes": 1,
    }
    memory = training_memory(trainer, geometry, checkpointing)
    with torch.inference_mode(False), torch.enable_grad(), trainer.training(checkpointing, memory):
        experts, losses = fit_tokens(
            trainer,
            cfg,
            geometry,
            checkpoint_path(output),
            fingerprints,
            device,
            cond=None if by_sample else conditions,
            reference=reference,
            resume=resume,
            callback=callback,
            desc=f"learning {output.name}",
        )
    motion = learned_motion(experts, output, caption, concept_words, motion_words, fingerprints, cfg, trainer.family)
    motion.save(output)
    return TrainResult(motion, losses)


def step_reporter(total: int) -> Callable[[int, float], None]:
    """``report(step, loss)`` for a run of ``total`` steps: ComfyUI's progress bar, and a stop at the step
    when the user cancels (``InterruptProcessingException``)."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def report(step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise FlexiMMTInputError(
                f"Learn motion: the loss is {loss} at step {step}: lower the learning rate, or learn in another "
                "precision (a float16 model overflows: load it as bf16 or fp32)"
            )
        bar.update_absolute(step, total)
        mm.throw_exception_if_processing_interrupted()

    return report


def to_frames(video) -> Any:
    """A ComfyUI IMAGE (float ``[T, H, W, C]`` in 0-1) as uint8 frames ``[T, H, W, 3]``."""
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[-1] not in (3, 4) or not len(video):
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise FlexiMMTInputError(f"video: an IMAGE of frames [T, H, W, 3] with T >= 1, got {shape}")
    return (video[..., :3].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def learn_motion_node(
    model,
    clip,
    vae,
    video,
    caption: str,
    concept_words: str,
    motion_words: str,
    name: str,
    steps: int,
    tokens: int,
    learning_rate: float,
    seed: int,
    resume: bool = True,
    fps: float = 0.0,
    model_2=None,
    clip_vision_output=None,
    width: int = 0,
    height: int = 0,
    frames: int = 0,
    gradient_checkpointing: bool = True,
    boundary: float = WAN22_BOUNDARY,
    mask_kernel: str = DEFAULT_KERNEL,
) -> TrainResult:
    """What the node does: check the inputs, learn into ``models/fleximmt_motions/<name>.safetensors``,
    and remove the checkpoint once the motion is written."""
    for words, what, example in ((concept_words, "concept", "man"), (motion_words, "motion", "is doing yoga")):
        if not (words or "").strip():
            raise FlexiMMTInputError(
                f"write the {what} words: the words of the caption that "
                f"{'name the moving object' if what == 'concept' else 'describe the motion'}, e.g. '{example}'"
            )
    output = motions_dir() / f"{check_motion_name(name)}.safetensors"
    if output.is_file():
        raise FlexiMMTInputError(
            f"a motion named {output.stem!r} already exists (models/{MOTIONS_FOLDER}/{output.name}): give this one "
            "another name, or delete that file to learn it again"
        )
    checkpoint = checkpoint_path(output)
    resuming = bool(resume) and checkpoint.is_file()
    settings = dict(steps=int(steps), tokens_per_motion=int(tokens), lr=float(learning_rate), seed=int(seed))
    settings.update(checkpoint_every=checkpoint_interval(steps), gradient_checkpointing=bool(gradient_checkpointing))
    settings.update(mask_kernel=mask_kernel)
    for key, value in (("width", width), ("height", height), ("num_frames", frames)):
        if value:
            settings[key] = int(value)
    try:
        result = learn_native(
            [model] if model_2 is None else [model, model_2],
            clip,
            vae,
            to_frames(video),
            caption,
            concept_words.strip(),
            motion_words.strip(),
            output,
            clip_vision_output=clip_vision_output,
            fps=float(fps) or None,
            boundary=float(boundary),
            resume=bool(resume),
            callback=step_reporter(int(steps)),
            **settings,
        )
    except FlexiMMTInputError as err:
        if resuming:
            raise FlexiMMTInputError(f"{err} (or set resume to false to start over)") from None
        raise
    checkpoint.unlink(missing_ok=True)  # complete: its resumable state goes
    return result


class LearnMotionNative(io.ComfyNode):
    """FlexiMMT Learn Motion (native): motion tokens from one reference video on ComfyUI's own model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexiMMTLearnMotionNative",
            display_name="FlexiMMT Learn Motion (native)",
            category=CATEGORY,
            description="Learns a motion from one reference video of one moving object on ComfyUI's own Wan "
            "2.1 / 2.2, CogVideoX 1.5, HunyuanVideo 1.5 or LTX-2 image-to-video model (the MODEL, CLIP and VAE its "
            "loaders give), training only the motion tokens, and saves it in "
            "models/fleximmt_motions/<name>.safetensors for Apply FlexiMMT. Cancel stops it at the next step "
            "with a checkpoint; queue it again with the same settings and it continues from there.",
            is_output_node=True,  # it writes a file: it runs when queued alone
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The image-to-video model from ComfyUI's loaders (LoRAs, fp8 or GGUF weights as "
                    "loaded); for Wan 2.2 A14B, the high-noise expert.",
                ),
                io.Clip.Input("clip", tooltip="The model's text encoder, as for CLIP Text Encode."),
                io.Vae.Input("vae", tooltip="The model's VAE: it encodes the reference video."),
                io.Image.Input(
                    "video",
                    tooltip="The reference video's frames (Load Video -> Get Video Components), at the size "
                    "to learn at (multiples of 16, LTX-2: 32; resize with Upscale Image, or set width and height).",
                ),
                *learn_text_inputs("Apply FlexiMMT's prompt gives the object such words."),
                io.Int.Input(
                    "steps", default=TrainSettings.steps, min=1, max=100000, tooltip="Training steps (the paper: 2000)."
                ),
                io.Int.Input(
                    "tokens",
                    default=TrainSettings.tokens_per_motion,
                    min=1,
                    max=1024,
                    tooltip="Motion tokens per block (the paper: 226). Motions given to one Apply need the same count.",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=TrainSettings.lr,
                    min=1e-7,
                    max=1.0,
                    step=1e-5,
                    tooltip="AdamW's learning rate (fleximmt's default: 3e-3), with warmup and a cosine decay.",
                ),
                *learn_run_inputs(),
                io.Model.Input(
                    "model_2",
                    optional=True,
                    tooltip="Wan 2.2 A14B's low-noise expert: the motion then holds one token set per expert, each "
                    "trained on its own noise levels.",
                ),
                io.ClipVisionOutput.Input(
                    "clip_vision_output",
                    optional=True,
                    tooltip="CLIP Vision Encode of the reference's first frame, for the models that take one "
                    "(Wan 2.1 I2V, HunyuanVideo 1.5), as their image-to-video node takes it.",
                ),
                io.Int.Input(
                    "width", optional=True, default=0, min=0, max=8192, step=16, tooltip="0: the video's width."
                ),
                io.Int.Input(
                    "height", optional=True, default=0, min=0, max=8192, step=16, tooltip="0: the video's height."
                ),
                io.Int.Input(
                    "frames",
                    optional=True,
                    default=0,
                    min=0,
                    max=1024,
                    step=1,  # the frontend rounds a value to its step from min: step 4 made 17 frames 16
                    tooltip="Frames a training window holds (4k+1, LTX-2: 8k+1); 0: the model's own (81, HunyuanVideo "
                    "1.5 and LTX-2: 121).",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    optional=True,
                    default=True,
                    tooltip="Recompute each block in the backward pass instead of keeping its activations.",
                ),
                io.Float.Input(
                    "boundary",
                    optional=True,
                    default=WAN22_BOUNDARY,
                    min=0.0,
                    max=1.0,
                    step=0.005,
                    tooltip="With model_2: the noise level below which the low-noise expert denoises "
                    "(Wan 2.2 I2V A14B: 0.875).",
                ),
                mask_kernel_input(),
            ],
            outputs=[
                MOTION.Output(
                    "motion_out",
                    display_name="motion",
                    tooltip="The learned motion (also saved in models/fleximmt_motions), for an Object node.",
                ),
                LOSS_MAP.Output("loss_map", display_name="loss_map", tooltip="Each step's loss, for Plot Loss Graph."),
            ],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:  # the inputs are learn_motion_node()'s arguments, by name
        result = learn_motion_node(**inputs)
        info = motion_metadata(result.motion, markdown=False)
        return io.NodeOutput(result.motion, {"loss": result.losses}, ui=ui.PreviewText(info))


NODES = [LearnMotionNative]
