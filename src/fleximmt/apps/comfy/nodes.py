"""The wrapper nodes: fleximmt's diffusers pipelines as ComfyUI nodes (V3 schema).

*FlexiMMT Load Model* gives a ``FLEXIMMT_PIPE``; *Learn Motion* trains a motion on it from IMAGE
frames and saves it in ``models/fleximmt_motions``; *Load Motion* reads one from there; *Object*
(``common.py``) pairs a MASK with a motion; *Transfer* makes the video; *Preview Masks* shows the
objects on the model's token grid. Each node converts ComfyUI's values and calls the library (the
same calls as the web app, ``fleximmt.apps.app``); the library's messages reach the user as ComfyUI shows
a node's error. Long runs report to ComfyUI's progress bar and stop at the next step when the user
cancels (``/interrupt``): a stopped Learn keeps a checkpoint of that step, and the same Learn again
continues from it. Learn and Load Motion show the motion's metadata on the node (``web/fleximmt.js``
in the node pack draws it); Transfer sends latent previews as ComfyUI's samplers do (``preview.py``).

A motion Learn saved is never trained again nor overwritten: the same Learn (the same frames,
words, settings and model) loads it, whatever made ComfyUI run the node again; another Learn of
that name is refused. What made each motion is kept beside them (``models/fleximmt_motions/.learned.json``).

ComfyUI runs nodes under ``torch.inference_mode()``; the model loads and trains outside it, so
its weights can take part in training's backward pass.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image

from ...errors import FlexiMMTInputError
from ...evaluation.video import grid_preview, mask_overlay
from ...method.kernels import DEFAULT_KERNEL
from ...method.motion import MotionTokens, atomic_write, check_motion_name, motion_metadata
from ...models import SUPPORTED, family_defaults
from .common import (
    CATEGORY,
    MOTION,
    MOTIONS_FOLDER,
    OBJECTS,
    PIPE,
    learn_run_inputs,
    learn_text_inputs,
    mask_kernel_input,
    mask_source_input,
    motion_files,
    motions_dir,
    rmpm_inputs,
)
from .preview import TransferPreview

logger = logging.getLogger(__name__)

TOY = "toy"  # the model that ships with fleximmt (64 x 64, 17 frames; runs on a CPU)
DTYPES = ("auto", "bfloat16", "float16", "float32")
OFFLOAD = ("none", "model", "sequential")
TRAINING_LEFTOVERS = (".ckpt.safetensors", ".latents.safetensors")  # beside a motion while it trains
LEARNED = ".learned.json"  # in the motions folder: the request that made each motion Learn saved


# -- ComfyUI's values as fleximmt's -----------------------------------------------------------
def image_batch(image, what: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE (float ``[B, H, W, C]`` in 0-1), checked."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4) or not len(image):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise FlexiMMTInputError(f"{what}: an IMAGE must be [B, H, W, 3] with B >= 1, got {shape}")
    return image[..., :3]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """IMAGE values as uint8, rounded: the bytes of an 8-bit image or video ComfyUI 0.3.64 loaded; the
    nearest bytes to the frames ComfyUI 0.33's *Load Video* decodes as floats (its colour conversion
    differs from 8-bit RGB decoding by up to 6 levels)."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def first_frame(image) -> Image.Image:
    """The first image of an IMAGE batch as a PIL image (what the pipelines take)."""
    return Image.fromarray(to_uint8(image_batch(image, "image")[0]))


def as_image(frames: np.ndarray) -> torch.Tensor:
    """Frames ``[T, H, W, 3]`` (float in 0-1, or uint8) as a ComfyUI IMAGE."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return torch.from_numpy(frames.astype(np.float32) / 255.0)
    return torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))


def check_pipe(pipe) -> None:
    if not hasattr(pipe, "adapter") or not hasattr(pipe, "default_size"):
        raise FlexiMMTInputError("connect a FLEXIMMT_PIPE from FlexiMMT Load Model")


def geometry(pipe, width: int, height: int, frames: int) -> tuple[int, int, int]:
    """(height, width, frames) of a run: each 0 is the model's own."""
    default_h, default_w, default_f = pipe.default_size()
    return height or default_h, width or default_w, frames or default_f


def check_masks(objects, image: Image.Image) -> None:
    """Every object's mask has the image's size, as Transfer's pipeline requires it (with its message)."""
    for k, obj in enumerate(objects, 1):
        mask = obj.mask_tensor
        if tuple(mask.shape) != (image.height, image.width):
            raise FlexiMMTInputError(
                f"object {k}: the mask is {mask.shape[0]} x {mask.shape[1]} but the image is {image.height} x "
                f"{image.width}: give a mask of the image's size"
            )


def on_gpu(pipe) -> bool:
    return getattr(pipe, "_execution_device", torch.device("cpu")).type == "cuda"


def make_room(pipe) -> None:
    """On a GPU, ask ComfyUI to unload its own models first: the FlexiMMT pipeline is not one of them."""
    if on_gpu(pipe):
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()


def step_reporter(total: int):
    """``report(step, preview=None)`` for a run of ``total`` steps: ComfyUI's progress bar (with a
    preview image when given), and a stop when the user cancels (``InterruptProcessingException``,
    raised at the step that reports)."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def report(step: int, preview=None) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, total, preview)

    return report


# -- the model -------------------------------------------------------------------------------
def model_folders() -> list[str]:
    """Folders under ComfyUI's ``models/diffusers`` whose ``model_index.json`` names a pipeline fleximmt runs."""
    import folder_paths

    from ...models import REGISTRY
    from ...models.loading import pipeline_name

    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        for folder, _, files in os.walk(root, followlinks=True):
            if "model_index.json" not in files:
                continue
            try:
                supported = pipeline_name(folder) in REGISTRY
            except FlexiMMTInputError:
                supported = False
            if supported:
                found.append(os.path.relpath(folder, root))
    return sorted(set(found))


def model_path(name: str) -> Path:
    import folder_paths

    for root in folder_paths.get_folder_paths("diffusers"):
        path = Path(root) / name
        if (path / "model_index.json").is_file():
            return path
    raise FlexiMMTInputError(
        f"no model {name!r} in ComfyUI's models/diffusers folders: put a diffusers folder there "
        f"({SUPPORTED} image-to-video) and refresh"
    )


def load_model(name: str, dtype: str = "auto", offload: str = "none", vae_tiling: bool = False):
    """The FlexiMMT pipeline ``name`` names (``TOY`` or a folder of ``models/diffusers``), on ComfyUI's device."""
    import comfy.model_management as mm

    if dtype not in DTYPES or offload not in OFFLOAD:
        raise FlexiMMTInputError(
            f"dtype={dtype!r}, offload={offload!r}: choose from {list(DTYPES)} and {list(OFFLOAD)}"
        )
    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
    with torch.inference_mode(False):  # weights that training's backward pass can use
        if name == TOY:
            from ...toy.lab import load_toy_pipeline

            pipe = load_toy_pipeline().to(dtype=torch_dtype)
        else:
            from ...models.loading import load_pipeline

            try:
                pipe = load_pipeline(model_path(name), torch_dtype=torch_dtype)
            except OSError as err:
                raise FlexiMMTInputError(
                    f"could not load the model {name!r} ({str(err).splitlines()[0]}): give a "
                    f"complete diffusers folder of a {SUPPORTED} image-to-video model"
                ) from None
    if offload != "none" and not cuda:
        logger.warning("offload=%s: ComfyUI runs on %s, so the model stays there", offload, device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)  # ComfyUI's progress bar reports instead
    return pipe


class LoadModel(io.ComfyNode):
    """FlexiMMT Load Model: a diffusers image-to-video folder of a supported family, or the toy model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexiMMTLoadModel",
            display_name="FlexiMMT Load Model",
            category=CATEGORY,
            description=f"Loads a {SUPPORTED} image-to-video model from models/diffusers (chosen by its "
            "model_index.json) as a FlexiMMT pipeline; 'toy' is the small model that ships with fleximmt "
            "(64x64, 17 frames, CPU).",
            inputs=[
                io.Combo.Input(
                    "model",
                    options=[TOY, *model_folders()],
                    tooltip="A diffusers folder under models/diffusers (its model_index.json picks "
                    f"{SUPPORTED}), or 'toy': the toy model shipped with fleximmt.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="auto",
                    tooltip="Weights' precision; auto: bfloat16 on a GPU, float32 on the CPU.",
                ),
                io.Combo.Input(
                    "offload",
                    options=list(OFFLOAD),
                    default="none",
                    tooltip="Keep idle parts on the CPU (GPU only): 'model' moves whole components, "
                    "'sequential' layer by layer (least memory, slowest).",
                ),
                io.Boolean.Input("vae_tiling", default=False, tooltip="Decode the video in tiles (less memory)."),
            ],
            outputs=[
                PIPE.Output(
                    "pipe_out",
                    display_name="pipe",
                    tooltip="The FlexiMMT pipeline, for Learn Motion, Transfer and Preview Masks.",
                )
            ],
        )

    @classmethod
    def execute(cls, model, dtype, offload, vae_tiling) -> io.NodeOutput:
        return io.NodeOutput(load_model(model, dtype, offload, vae_tiling))


# -- motions ---------------------------------------------------------------------------------
def is_toy(pipe) -> bool:
    """Whether ``pipe`` is the toy model that ships with fleximmt."""
    from ...toy.lab import TOY_MODEL

    name = getattr(pipe, "name_or_path", None)
    return bool(name) and Path(name).resolve() == TOY_MODEL.resolve()


def learn_defaults(toy: bool) -> tuple[int, int]:
    """(steps, tokens) Learn takes for 0: the toy model's are ``make demo``'s (``toy.lab.learn_motions``'
    defaults), any other model's the paper's (``TrainSettings``)."""
    from ...training.train import TrainSettings

    if toy:
        from ...toy.lab import learn_motions

        params = inspect.signature(learn_motions).parameters
        return params["steps"].default, params["tokens"].default
    return TrainSettings.steps, TrainSettings.tokens_per_motion


def learn_request(pipe, frames: np.ndarray, settings: list) -> str:
    """What makes a learned motion what it is - the reference frames, the words and settings, the
    model - as one digest."""
    from ...training.train import model_fingerprint

    digest = hashlib.sha256(frames.tobytes())
    digest.update(json.dumps([list(frames.shape), *settings, model_fingerprint(pipe)]).encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def learned_request(output: Path) -> str | None:
    """The request that made the motion file ``output``, if Learn saved this very file."""
    index = output.parent / LEARNED
    try:
        entry = json.loads(index.read_text()).get(output.name) or {}
    except (OSError, ValueError):
        return None
    return entry.get("request") if entry.get("file") == file_digest(output) else None


def record_learned(output: Path, request: str) -> None:
    """Keep which request made ``output`` (atomically; the other motions' entries stay)."""
    index = output.parent / LEARNED
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError):
        entries = {}
    entries[output.name] = {"request": request, "file": file_digest(output)}
    atomic_write(index, lambda tmp: Path(tmp).write_text(json.dumps(entries, indent=1, sort_keys=True)))


def learn_motion(
    pipe,
    video,
    caption: str,
    concept_words: str,
    motion_words: str,
    name: str,
    steps: int = 0,
    tokens: int = 0,
    seed: int = 0,
    resume: bool = True,
    fps: float = 0.0,
    mask_kernel: str = DEFAULT_KERNEL,
) -> tuple[MotionTokens, bool]:
    """Learn a motion from IMAGE frames into ``models/fleximmt_motions/<name>.safetensors``; ``steps``
    and ``tokens`` 0 are the model's own (:func:`learn_defaults`). Returns the motion and whether it
    was trained: a motion this same request saved before is loaded instead."""
    from ...training.train import cache_path, checkpoint_interval, checkpoint_path, train_motion

    check_pipe(pipe)
    frames = to_uint8(image_batch(video, "video"))
    for words, what, example in ((concept_words, "concept", "man"), (motion_words, "motion", "is doing yoga")):
        if not (words or "").strip():
            raise FlexiMMTInputError(
                f"write the {what} words: the words of the caption that "
                f"{'name the moving object' if what == 'concept' else 'describe the motion'}, e.g. '{example}'"
            )
    default_steps, default_tokens = learn_defaults(is_toy(pipe))
    steps, tokens = int(steps) or default_steps, int(tokens) or default_tokens
    concept_words, motion_words = concept_words.strip(), motion_words.strip()
    output = motions_dir() / f"{check_motion_name(name)}.safetensors"
    request = learn_request(pipe, frames, [caption, concept_words, motion_words, steps, tokens, int(seed), fps])
    if output.is_file():
        if learned_request(output) == request:
            logger.info("%s was learned by this same Learn: loaded, not trained again", output)
            return MotionTokens.load(output), False
        raise FlexiMMTInputError(
            f"a motion named {output.stem!r} already exists (models/{MOTIONS_FOLDER}/{output.name}), learned "
            "from another video or with other words or settings: give this one another name, or delete "
            "that file to learn it again"
        )
    checkpoint = checkpoint_path(output)
    resuming = bool(resume) and checkpoint.is_file()
    report = step_reporter(steps)
    make_room(pipe)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            motion = train_motion(
                pipe,
                frames,
                caption,
                concept_words,
                motion_words,
                output,
                steps=steps,
                tokens_per_motion=tokens,
                seed=int(seed),
                resume=bool(resume),
                video_fps=float(fps) or None,
                callback=lambda step, loss: report(step),
                checkpoint_every=checkpoint_interval(steps),
                mask_kernel=mask_kernel,
            )
    except FlexiMMTInputError as err:
        if resuming:
            raise FlexiMMTInputError(f"{err} (or set resume to false to start over)") from None
        raise
    checkpoint.unlink(missing_ok=True)  # complete: its resumable state and encoded reference go
    cache_path(output).unlink(missing_ok=True)
    record_learned(output, request)
    return motion, True


class LearnMotion(io.ComfyNode):
    """FlexiMMT Learn Motion: motion tokens from one reference video, the video model frozen."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        paper_steps, paper_tokens = learn_defaults(toy=False)
        toy_steps, toy_tokens = learn_defaults(toy=True)
        return io.Schema(
            node_id="FlexiMMTLearnMotion",
            display_name="FlexiMMT Learn Motion",
            category=CATEGORY,
            description="Learns a motion from one reference video of one moving object and saves it in "
            "models/fleximmt_motions/<name>.safetensors. Cancel stops it at the next step with a checkpoint; "
            "queue it again with the same settings and it continues from there. A motion it saved is loaded, "
            "not learned again, by the same Learn; another Learn of that name is refused.",
            is_output_node=True,  # it writes a file: it runs when queued alone
            inputs=[
                PIPE.Input("pipe", tooltip="The model to learn the motion on (FlexiMMT Load Model)."),
                io.Image.Input(
                    "video",
                    tooltip="The reference video's frames (e.g. Load Video -> Get Video Components); "
                    "resized to the model's size.",
                ),
                *learn_text_inputs("Transfer's prompt uses such words for the object."),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip=f"Training steps; 0: the model's own (the toy model: {toy_steps}, as make demo; "
                    f"others: the paper's {paper_steps}).",
                ),
                io.Int.Input(
                    "tokens",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip=f"Motion tokens per block; 0: the model's own (the toy model: {toy_tokens}; others: "
                    f"the paper's {paper_tokens}). Motions given to one Transfer need the same count.",
                ),
                *learn_run_inputs(),
                mask_kernel_input(),
            ],
            outputs=[
                MOTION.Output(
                    "motion_out",
                    display_name="motion",
                    tooltip="The learned motion (also saved in models/fleximmt_motions), for an Object node.",
                )
            ],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:  # the inputs are learn_motion()'s arguments, by name
        motion, trained = learn_motion(**inputs)
        info = motion_metadata(motion, markdown=False)
        if not trained:
            info += f"\n(already learned with these inputs: loaded from models/{MOTIONS_FOLDER}, not trained again)"
        return io.NodeOutput(motion, ui=ui.PreviewText(info))


def motion_choices() -> list[str]:
    """The motions in ``models/fleximmt_motions`` (not training's checkpoints and caches)."""
    return [f for f in motion_files() if not f.endswith(TRAINING_LEFTOVERS)]


def motion_file(name: str) -> Path:
    import folder_paths

    path = folder_paths.get_full_path(MOTIONS_FOLDER, name)
    if path is None:
        have = ", ".join(motion_choices()) or "none yet"
        raise FlexiMMTInputError(
            f"motion {name!r} is not in models/{MOTIONS_FOLDER} (it has: {have}): learn it "
            "with FlexiMMT Learn Motion or copy its .safetensors file there"
        )
    return Path(path)


class LoadMotion(io.ComfyNode):
    """FlexiMMT Load Motion: a learned motion from ``models/fleximmt_motions``, with its metadata."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexiMMTLoadMotion",
            display_name="FlexiMMT Load Motion",
            category=CATEGORY,
            description="Loads a learned motion from models/fleximmt_motions and shows its caption, words and shape.",
            inputs=[
                io.Combo.Input(
                    "motion",
                    options=motion_choices(),
                    tooltip="A motion file of models/fleximmt_motions (Learn Motion saves there).",
                )
            ],
            outputs=[
                MOTION.Output("motion_out", display_name="motion", tooltip="The motion, for an Object node."),
                io.String.Output("info", display_name="info", tooltip="Its caption, words, shape and training steps."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, motion):
        try:
            return os.path.getmtime(motion_file(motion))
        except FlexiMMTInputError:
            return float("nan")  # never equal: the node runs and says what is missing

    @classmethod
    def execute(cls, motion) -> io.NodeOutput:
        tokens = MotionTokens.load(motion_file(motion))
        info = motion_metadata(tokens, markdown=False)
        return io.NodeOutput(tokens, info, ui=ui.PreviewText(info))


# -- transfer ------------------------------------------------------------------------------
def transfer(
    pipe,
    image,
    prompt: str,
    objects,
    negative_prompt: str = "",
    steps: int = 50,
    guidance: float = 6.0,
    seed: int = 0,
    frames: int = 0,
    width: int = 0,
    height: int = 0,
    mask_source: str = "rmpm",
    rmpm_method: str = "paper",
    anchors: int = 3,
    alpha: float = 0.0,
    initial_masks: str = "first_frame",
    mask_kernel: str = DEFAULT_KERNEL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The video (IMAGE frames) and its mask overlay (IMAGE frames; the video itself without objects)."""
    check_pipe(pipe)
    picture = first_frame(image)
    objects = list(objects or ())  # the pipeline checks them against the image and the model
    settings = pipe.call_settings(
        height=height or None, width=width or None, num_frames=frames or None, guidance_scale=float(guidance)
    )  # 0: the model's own
    steps = int(steps)
    report = step_reporter(steps)
    video_height, video_width, _ = geometry(pipe, width, height, frames)
    previews = TransferPreview.wanted(pipe, picture.resize((video_width, video_height), Image.BICUBIC))

    def on_step(pipe_, step, timestep, callback_kwargs):
        latents = callback_kwargs.get("latents")
        report(step + 1, previews.image(latents) if previews is not None and latents is not None else None)
        return {}

    make_room(pipe)
    result = pipe(
        image=picture,
        prompt=prompt or "",
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        **settings,
        generator=torch.Generator().manual_seed(int(seed)),
        output_type="np",
        callback_on_step_end=on_step,
        objects=objects,
        mask_source=mask_source,
        rmpm_method=rmpm_method,
        anchors=int(anchors),
        alpha=float(alpha) or None,
        initial_masks=initial_masks,
        mask_kernel=mask_kernel,
        return_masks=bool(objects),
    )
    video = result.frames[0]
    overlay = video
    if objects:
        overlay = mask_overlay(video, result.masks[0, -1], frame_index=pipe.mask_frame_index(len(video)))
    return as_image(video), as_image(overlay)


class Transfer(io.ComfyNode):
    """FlexiMMT Transfer: each object of the first frame moves with its own motion."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexiMMTTransfer",
            display_name="FlexiMMT Transfer",
            category=CATEGORY,
            description="Makes the image move: each object (Object nodes) follows its motion, confined to its "
            "own region by FlexiMMT's masks. Without objects it is the base model's plain image-to-video. Cancel "
            "stops it at the next denoising step.",
            inputs=[
                PIPE.Input("pipe", tooltip="The model (FlexiMMT Load Model); the motions must be learned on it."),
                io.Image.Input(
                    "image",
                    tooltip="The first frame (of a batch, the first image); the object masks must have its "
                    "size. Resized to the video's size.",
                ),
                io.String.Input(
                    "prompt",
                    default="",
                    multiline=True,
                    tooltip="The video's prompt; it must hold each object's motion words as they are.",
                ),
                io.String.Input("negative_prompt", default="", multiline=True, tooltip="What to avoid."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Denoising steps."),
                io.Float.Input(
                    "guidance",
                    default=6.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="Classifier-free guidance scale (1 or less: none).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**63 - 1,
                    control_after_generate=False,
                    tooltip="The noise's seed.",
                ),
                io.Int.Input(
                    "frames",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip=f"Frames of the video; 0: the model's own ({family_defaults('num_frames')}, 17 for the "
                    "toy model).",
                ),
                io.Int.Input("width", default=0, min=0, max=8192, step=8, tooltip="Video width; 0: the model's own."),
                io.Int.Input("height", default=0, min=0, max=8192, step=8, tooltip="Video height; 0: the model's own."),
                mask_source_input(),
                *rmpm_inputs(optional=False),
                OBJECTS.Input(
                    "objects",
                    optional=True,
                    tooltip="The objects (chained Object nodes); none: plain image-to-video.",
                ),
                mask_kernel_input(),
            ],
            outputs=[
                io.Image.Output(
                    "video_frames", display_name="frames", tooltip="The video's frames (Create Video -> Save Video)."
                ),
                io.Image.Output(
                    "overlay_frames",
                    display_name="mask_overlay",
                    tooltip="The frames with each object's propagated mask drawn on them (the video itself "
                    "without objects).",
                ),
            ],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:  # the inputs are transfer()'s arguments, by name
        return io.NodeOutput(*transfer(**inputs))


def preview_masks(pipe, image, objects, width: int = 0, height: int = 0) -> torch.Tensor:
    """The objects' masks on the model's token grid over the image: an IMAGE of one frame."""
    check_pipe(pipe)
    picture = first_frame(image)
    objects = list(objects or ())
    if not objects:
        raise FlexiMMTInputError("connect the objects (Object nodes) to see their masks")
    check_masks(objects, picture)
    grid = pipe.token_grid(*geometry(pipe, width, height, 0))
    return as_image(grid_preview(np.asarray(picture), [o.mask_tensor for o in objects], grid.height, grid.width)[None])


class PreviewMasks(io.ComfyNode):
    """FlexiMMT Preview Masks: what FlexiMMT's masks see of each object, on the model's latent token grid."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        size = "Video {} (Transfer's); 0: the model's own."
        return io.Schema(
            node_id="FlexiMMTPreviewMasks",
            display_name="FlexiMMT Preview Masks",
            category=CATEGORY,
            description="Shows each object's first-frame mask as the model sees it: on its latent token grid (a "
            "token belongs to an object when half its pixels do), tinted over the image, one colour per object.",
            inputs=[
                PIPE.Input("pipe", tooltip="The model whose token grid to show."),
                io.Image.Input("image", tooltip="The first frame."),
                OBJECTS.Input("objects", tooltip="The objects (chained Object nodes)."),
                io.Int.Input("width", optional=True, default=0, min=0, max=8192, step=8, tooltip=size.format("width")),
                io.Int.Input(
                    "height", optional=True, default=0, min=0, max=8192, step=8, tooltip=size.format("height")
                ),
            ],
            outputs=[
                io.Image.Output(
                    "preview_image",
                    display_name="preview",
                    tooltip="The image with each object's mask on the token grid, one colour per object.",
                )
            ],
        )

    @classmethod
    def execute(cls, pipe, image, objects, width=0, height=0) -> io.NodeOutput:
        return io.NodeOutput(preview_masks(pipe, image, objects, width, height))


NODES = [LoadModel, LearnMotion, LoadMotion, Transfer, PreviewMasks]
