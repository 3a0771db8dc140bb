"""The wrapper nodes: fleximmt's diffusers pipelines as ComfyUI nodes.

*Load FlexiMMT model* gives a ``FLEXIMMT_PIPE``; *Learn motion* trains a motion on it from IMAGE
frames and saves it in ``models/fleximmt_motions``; *Load motion* reads one from there; *Object*
(``common.py``) pairs a MASK with a motion; *Transfer* makes the video; *Preview masks* shows the
objects on the model's token grid. Each node converts ComfyUI's values and calls the library (the
same calls as the web app, ``fleximmt.apps.app``); the library's messages reach the user as ComfyUI shows
a node's error. Long runs report to ComfyUI's progress bar and stop at the next step when the user
cancels (``/interrupt``): a stopped Learn keeps a checkpoint of that step, and the same Learn again
continues from it.

ComfyUI runs nodes under ``torch.inference_mode()``; the model loads and trains outside it, so
its weights can take part in training's backward pass.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...errors import FlexiMMTInputError
from ...evaluation.video import grid_preview, mask_overlay
from ...method.masks import RMPM_METHODS
from ...method.motion import MotionTokens, check_motion_name, motion_metadata
from ...method.pipeline import INITIAL_MASKS, MASK_SOURCES
from ...models import SUPPORTED
from .common import CATEGORY, MOTION, MOTIONS_FOLDER, OBJECTS, PIPE, motion_files, motions_dir

logger = logging.getLogger(__name__)

TOY = "toy"  # the model that ships with fleximmt (64 x 64, 17 frames; runs on a CPU)
DTYPES = ("auto", "bfloat16", "float16", "float32")
OFFLOAD = ("none", "model", "sequential")
TRAINING_LEFTOVERS = (".ckpt.safetensors", ".latents.safetensors")  # beside a motion while it trains


# -- ComfyUI's values as fleximmt's -----------------------------------------------------------
def image_batch(image, what: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE (float ``[B, H, W, C]`` in 0-1), checked."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4) or not len(image):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise FlexiMMTInputError(f"{what}: an IMAGE must be [B, H, W, 3] with B >= 1, got {shape}")
    return image[..., :3]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """IMAGE values as uint8 (exactly the bytes a loaded image or video had)."""
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
        raise FlexiMMTInputError("connect a FLEXIMMT_PIPE from Load FlexiMMT model")


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
    """``report(step)`` for a run of ``total`` steps: ComfyUI's progress bar, and a stop when the user
    cancels (``InterruptProcessingException``, raised at the step that reports)."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def report(step: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, total)

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


class LoadModel:
    """Load FlexiMMT model: a diffusers image-to-video folder (CogVideoX, Wan or HunyuanVideo 1.5) or the toy model."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The FlexiMMT pipeline, for Learn motion, Transfer and Preview masks.",)
    FUNCTION = "load"
    DESCRIPTION = (
        f"Loads a {SUPPORTED} image-to-video model from models/diffusers (chosen by its model_index.json) "
        "as a FlexiMMT pipeline; 'toy' is the small model that ships with fleximmt (64x64, 17 frames, CPU)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    [TOY, *model_folders()],
                    {
                        "tooltip": "A diffusers folder under models/diffusers (its "
                        f"model_index.json picks {SUPPORTED}), or 'toy': the toy model shipped with fleximmt."
                    },
                ),
                "dtype": (
                    list(DTYPES),
                    {"default": "auto", "tooltip": "Weights' precision; auto: bfloat16 on a GPU, float32 on the CPU."},
                ),
                "offload": (
                    list(OFFLOAD),
                    {
                        "default": "none",
                        "tooltip": "Keep idle parts on the CPU (GPU only): "
                        "'model' moves whole components, 'sequential' layer by layer (least memory, slowest).",
                    },
                ),
                "vae_tiling": ("BOOLEAN", {"default": False, "tooltip": "Decode the video in tiles (less memory)."}),
            }
        }

    def load(self, model, dtype, offload, vae_tiling):
        return (load_model(model, dtype, offload, vae_tiling),)


# -- motions ---------------------------------------------------------------------------------
def learn_motion(
    pipe,
    video,
    caption: str,
    concept_words: str,
    motion_words: str,
    name: str,
    steps: int,
    tokens: int,
    seed: int = 0,
    resume: bool = True,
    fps: float = 0.0,
) -> MotionTokens:
    """Learn a motion from IMAGE frames into ``models/fleximmt_motions/<name>.safetensors``."""
    from ...training.train import cache_path, checkpoint_interval, checkpoint_path, train_motion

    check_pipe(pipe)
    frames = to_uint8(image_batch(video, "video"))
    for words, what, example in ((concept_words, "concept", "man"), (motion_words, "motion", "is doing yoga")):
        if not (words or "").strip():
            raise FlexiMMTInputError(
                f"write the {what} words: the words of the caption that "
                f"{'name the moving object' if what == 'concept' else 'describe the motion'}, e.g. '{example}'"
            )
    output = motions_dir() / f"{check_motion_name(name)}.safetensors"
    checkpoint = checkpoint_path(output)
    resuming = bool(resume) and checkpoint.is_file()
    report = step_reporter(int(steps))
    make_room(pipe)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            motion = train_motion(
                pipe,
                frames,
                caption,
                concept_words.strip(),
                motion_words.strip(),
                output,
                steps=int(steps),
                tokens_per_motion=int(tokens),
                seed=int(seed),
                resume=bool(resume),
                video_fps=float(fps) or None,
                callback=lambda step, loss: report(step),
                checkpoint_every=checkpoint_interval(steps),
            )
    except FlexiMMTInputError as err:
        if resuming:
            raise FlexiMMTInputError(f"{err} (or set resume to false to start over)") from None
        raise
    checkpoint.unlink(missing_ok=True)  # complete: its resumable state and encoded reference go
    cache_path(output).unlink(missing_ok=True)
    return motion


class LearnMotion:
    """Learn motion: motion tokens from one reference video, the video model frozen."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("motion",)
    OUTPUT_TOOLTIPS = ("The learned motion (also saved in models/fleximmt_motions), for an Object node.",)
    OUTPUT_NODE = True  # it writes a file: it runs when queued alone
    FUNCTION = "learn"
    DESCRIPTION = (
        "Learns a motion from one reference video of one moving object and saves it in "
        "models/fleximmt_motions/<name>.safetensors. Cancel stops it at the next step with a checkpoint; "
        "queue it again with the same settings and it continues from there."
    )

    @classmethod
    def INPUT_TYPES(cls):
        from ...training.train import TrainSettings

        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The model to learn the motion on (Load FlexiMMT model)."}),
                "video": (
                    "IMAGE",
                    {
                        "tooltip": "The reference video's frames (e.g. Load Video -> Get Video "
                        "Components); resized to the model's size."
                    },
                ),
                "caption": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "What happens in the video, e.g. 'A man is doing yoga.'",
                    },
                ),
                "concept_words": (
                    "STRING",
                    {"default": "", "tooltip": "The caption's words naming the moving object, e.g. 'man'."},
                ),
                "motion_words": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "The caption's words describing the motion, "
                        "e.g. 'is doing yoga'. Transfer's prompt uses such words for the object.",
                    },
                ),
                "name": (
                    "STRING",
                    {
                        "default": "motion",
                        "tooltip": "The motion's file name in "
                        "models/fleximmt_motions (letters, digits, spaces, '.', '_', '-').",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": TrainSettings.steps,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "Training steps (the paper: 2000).",
                    },
                ),
                "tokens": (
                    "INT",
                    {
                        "default": TrainSettings.tokens_per_motion,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "Motion tokens per block (the paper: 226; the toy model: 16). Motions given to one "
                        "Transfer need the same count.",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**31 - 1,
                        "control_after_generate": False,
                        "tooltip": "Seed of the token initialisation and training draws.",
                    },
                ),
                "resume": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Continue a stopped run of this name (same settings) from its checkpoint.",
                    },
                ),
            },
            "optional": {
                "fps": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1000.0,
                        "step": 0.01,
                        "tooltip": "The "
                        "video's frame rate (Get Video Components' fps): frames are subsampled to about 8 a second, "
                        "as fleximmt train does. 0: take the frames as they are.",
                    },
                ),
            },
        }

    def learn(self, pipe, video, caption, concept_words, motion_words, name, steps, tokens, seed, resume, fps=0.0):
        motion = learn_motion(pipe, video, caption, concept_words, motion_words, name, steps, tokens, seed, resume, fps)
        return {"ui": {"text": [motion_metadata(motion, markdown=False)]}, "result": (motion,)}


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
            "with Learn motion or copy its .safetensors file there"
        )
    return Path(path)


class LoadMotion:
    """Load motion: a learned motion from ``models/fleximmt_motions``, with its metadata."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (MOTION, "STRING")
    RETURN_NAMES = ("motion", "info")
    OUTPUT_TOOLTIPS = ("The motion, for an Object node.", "Its caption, words, shape and training steps.")
    FUNCTION = "load"
    DESCRIPTION = "Loads a learned motion from models/fleximmt_motions and shows its caption, words and shape."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion": (
                    motion_choices(),
                    {"tooltip": "A motion file of models/fleximmt_motions (Learn motion saves there)."},
                )
            }
        }

    @classmethod
    def IS_CHANGED(cls, motion):
        try:
            return os.path.getmtime(motion_file(motion))
        except FlexiMMTInputError:
            return float("nan")  # never equal: the node runs and says what is missing

    def load(self, motion):
        tokens = MotionTokens.load(motion_file(motion))
        info = motion_metadata(tokens, markdown=False)
        return {"ui": {"text": [info]}, "result": (tokens, info)}


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

    def on_step(pipe_, step, timestep, callback_kwargs):
        report(step + 1)
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
        return_masks=bool(objects),
    )
    video = result.frames[0]
    overlay = video
    if objects:
        overlay = mask_overlay(video, result.masks[0, -1], frame_index=pipe.mask_frame_index(len(video)))
    return as_image(video), as_image(overlay)


class Transfer:
    """Transfer: each object of the first frame moves with its own motion."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("frames", "mask_overlay")
    OUTPUT_TOOLTIPS = (
        "The video's frames (Create Video -> Save Video).",
        "The frames with each object's propagated mask drawn on them (the video itself without objects).",
    )
    FUNCTION = "transfer"
    DESCRIPTION = (
        "Makes the image move: each object (Object nodes) follows its motion, confined to its own region by "
        "FlexiMMT's masks. Without objects it is the base model's plain image-to-video. Cancel stops it at "
        "the next denoising step."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The model (Load FlexiMMT model); the motions must be learned on it."}),
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "The first frame (of a batch, the first image); the object masks "
                        "must have its size. Resized to the video's size."
                    },
                ),
                "prompt": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "The video's prompt; it must hold each object's motion words as they are.",
                    },
                ),
                "negative_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "What to avoid."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
                "guidance": (
                    "FLOAT",
                    {
                        "default": 6.0,
                        "min": 0.0,
                        "max": 30.0,
                        "step": 0.1,
                        "tooltip": "Classifier-free guidance scale (1 or less: none).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**63 - 1,
                        "control_after_generate": False,
                        "tooltip": "The noise's seed.",
                    },
                ),
                "frames": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 1024,
                        "tooltip": "Frames of the video; 0: the model's own (CogVideoX-5B: 49, Wan 2.1: 81, toy: 17).",
                    },
                ),
                "width": (
                    "INT",
                    {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "Video width; 0: the model's own."},
                ),
                "height": (
                    "INT",
                    {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "Video height; 0: the model's own."},
                ),
                "mask_source": (
                    list(MASK_SOURCES),
                    {
                        "default": "rmpm",
                        "tooltip": "Where each object's masks come "
                        "from: rmpm (propagated through the video, the paper's), static (the first-frame "
                        "mask on every frame), qk (attention maps of the concept words), none (no masks).",
                    },
                ),
                "rmpm_method": (
                    list(RMPM_METHODS),
                    {
                        "default": "paper",
                        "tooltip": "RMPM's propagation: the "
                        "paper's equations or the authors' released label propagation.",
                    },
                ),
                "anchors": ("INT", {"default": 3, "min": 1, "max": 64, "tooltip": "RMPM's anchor frames W."}),
                "alpha": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 0.99,
                        "step": 0.01,
                        "tooltip": "Dynamic "
                        "RMPM: masks freeze once they change less than this fraction; 0: update every step.",
                    },
                ),
                "initial_masks": (
                    list(INITIAL_MASKS),
                    {
                        "default": "first_frame",
                        "tooltip": "RMPM's first step: "
                        "the first-frame masks on every frame, or none (the authors' release).",
                    },
                ),
            },
            "optional": {
                "objects": (OBJECTS, {"tooltip": "The objects (chained Object nodes); none: plain image-to-video."}),
            },
        }

    def transfer(
        self,
        pipe,
        image,
        prompt,
        negative_prompt,
        steps,
        guidance,
        seed,
        frames,
        width,
        height,
        mask_source,
        rmpm_method,
        anchors,
        alpha,
        initial_masks,
        objects=None,
    ):
        return transfer(
            pipe,
            image,
            prompt,
            objects,
            negative_prompt,
            steps,
            guidance,
            seed,
            frames,
            width,
            height,
            mask_source,
            rmpm_method,
            anchors,
            alpha,
            initial_masks,
        )


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


class PreviewMasks:
    """Preview masks: what FlexiMMT's masks see of each object, on the model's latent token grid."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("preview",)
    OUTPUT_TOOLTIPS = ("The image with each object's mask on the token grid, one colour per object.",)
    FUNCTION = "preview"
    DESCRIPTION = (
        "Shows each object's first-frame mask as the model sees it: on its latent token grid (a token "
        "belongs to an object when half its pixels do), tinted over the image, one colour per object."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The model whose token grid to show."}),
                "image": ("IMAGE", {"tooltip": "The first frame."}),
                "objects": (OBJECTS, {"tooltip": "The objects (chained Object nodes)."}),
            },
            "optional": {
                "width": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 8192,
                        "step": 8,
                        "tooltip": "Video width (Transfer's); 0: the model's own.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 8192,
                        "step": 8,
                        "tooltip": "Video height (Transfer's); 0: the model's own.",
                    },
                ),
            },
        }

    def preview(self, pipe, image, objects, width=0, height=0):
        return (preview_masks(pipe, image, objects, width, height),)


NODES = {
    "FlexiMMTLoadModel": (LoadModel, "Load FlexiMMT model"),
    "FlexiMMTLearnMotion": (LearnMotion, "FlexiMMT Learn motion"),
    "FlexiMMTLoadMotion": (LoadMotion, "FlexiMMT Load motion"),
    "FlexiMMTTransfer": (Transfer, "FlexiMMT Transfer"),
    "FlexiMMTPreviewMasks": (PreviewMasks, "FlexiMMT Preview masks"),
}
