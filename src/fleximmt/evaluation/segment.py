"""Object masks: from words (Grounded-SAM: Grounding-DINO boxes, then SAM), from clicks or a box
(SAM), and through a video (SAM 2, or an offline optical-flow approximation), all through transformers.

Models take a hub id, a local folder, or an already-loaded ``(model, processor)`` pair. Ids and
folders load with ``use_safetensors=True`` (never ``trust_remote_code``) onto ``device`` (CUDA when
there is one) and are kept for the next call; a pair is used as given, on its own device.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FlexiMMTInputError
from ..method.motion import atomic_write

logger = logging.getLogger(__name__)

DETECTOR = "IDEA-Research/grounding-dino-tiny"
SEGMENTER = "facebook/sam-vit-base"
VIDEO_SEGMENTER = "facebook/sam2.1-hiera-tiny"
PROPAGATION_METHODS = ("sam2", "flow")


# ---------------------------------------------------------------------------------------------- loading


def _load(model: Any, model_cls: str, processor_cls: str, device, instead: str):
    """``(model, processor)`` from a pair (kept as it is) or from a hub id / folder (cached)."""
    if isinstance(model, tuple):
        if len(model) != 2:
            raise FlexiMMTInputError(f"give a loaded model as a (model, processor) pair, got a tuple of {len(model)}")
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise FlexiMMTInputError(
            f"a model is a hub id, a folder or a (model, processor) pair, got {type(model).__name__}"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _load_cached(model_cls, processor_cls, os.fspath(model), str(device), instead)


@functools.lru_cache(maxsize=4)
def _load_cached(model_cls: str, processor_cls: str, name: str, device: str, instead: str):
    import transformers

    if not hasattr(transformers, model_cls):
        raise FlexiMMTInputError(
            f"transformers {transformers.__version__} has no {model_cls}: upgrade transformers, {instead}"
        )
    path = Path(name)
    if not path.is_dir() and (path.is_absolute() or name.startswith(".") or name.count("/") > 1 or path.exists()):
        problem = "is not a folder" if path.exists() else "does not exist"
        raise FlexiMMTInputError(f"model folder {name!r} {problem}: check the path, {instead}")
    try:
        processor = getattr(transformers, processor_cls).from_pretrained(name)
        net = getattr(transformers, model_cls).from_pretrained(name, use_safetensors=True)
    except ImportError as err:  # e.g. SAM 2's video processor needs torchvision
        raise FlexiMMTInputError(
            f"loading {name!r} failed: {str(err).strip().splitlines()[0]} "
            f"Install it (pip install 'fleximmt[vision]' for torchvision), {instead}"
        ) from None
    except (OSError, ValueError) as err:  # missing files, no hub access, a folder of another model
        raise FlexiMMTInputError(
            f"could not load {name!r} ({str(err).strip().splitlines()[0]}): give a local folder with its "
            f"safetensors weights and processor files, {instead}"
        ) from None
    logger.info("loaded %s from %s on %s", model_cls, name, device)
    return net.to(device).eval(), processor


def _device(net) -> torch.device:
    return next(net.parameters()).device


def _image(image):
    """A PIL RGB image from a PIL image, a path, or a uint8 array ``[H, W, 3]``."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FlexiMMTInputError(f"image {os.fspath(image)!r} does not exist: check the path")
        return Image.open(image).convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise FlexiMMTInputError(
                f"an image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}: "
                "convert it with (x * 255).round().astype(np.uint8) and drop any alpha channel"
            )
        return Image.fromarray(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise FlexiMMTInputError(f"an image is a PIL image, a path or a uint8 array [H, W, 3], got {type(image).__name__}")


# ---------------------------------------------------------------------------------------------- first frame


def _phrases(words) -> list[str]:
    if isinstance(words, str):
        raise FlexiMMTInputError(f"words must be a list of phrases, one per object, e.g. [{words!r}], not a string")
    words = list(words)
    if not words:
        raise FlexiMMTInputError("give at least one phrase naming an object, e.g. ['tiger']")
    for word in words:
        if not isinstance(word, str) or not word.strip(" ."):
            raise FlexiMMTInputError(f"every phrase must be non-empty text naming an object, got {word!r}")
    return words


def _post_process_detection(processor, outputs, input_ids, box_threshold, text_threshold, size):
    # transformers renamed `box_threshold` to `threshold` in 4.51; accept both.
    params = inspect.signature(processor.post_process_grounded_object_detection).parameters
    threshold = {"threshold" if "threshold" in params else "box_threshold": box_threshold}
    return processor.post_process_grounded_object_detection(
        outputs, input_ids, text_threshold=text_threshold, target_sizes=[size], **threshold
    )[0]


def detect_boxes(
    image,
    words: list[str],
    detector: Any = DETECTOR,
    box_threshold: float = 0.35,
    text_threshold: float = 0.25,
    device=None,
) -> list[list[float]]:
    """The highest-scoring Grounding-DINO box ``[x0, y0, x1, y1]`` (pixels) for each phrase of ``words``."""
    words = _phrases(words)
    model, processor = _load(
        detector,
        "AutoModelForZeroShotObjectDetection",
        "AutoProcessor",
        device,
        "or give the masks as PNG files instead",
    )
    image = _image(image)
    width, height = image.size
    boxes = []
    for phrase in words:
        # Grounding-DINO expects lower-case phrases, each ended by a period.
        inputs = processor(images=image, text=phrase.strip(" .").lower() + ".", return_tensors="pt").to(_device(model))
        with torch.no_grad():
            outputs = model(**inputs)
        result = _post_process_detection(
            processor, outputs, inputs["input_ids"], box_threshold, text_threshold, (height, width)
        )
        if len(result["scores"]) == 0:
            raise FlexiMMTInputError(
                f"no {phrase!r} found in the image: lower box_threshold (now {box_threshold}) or text_threshold "
                f"(now {text_threshold}), name the object differently, or give its mask as a PNG file"
            )
        x0, y0, x1, y1 = result["boxes"][int(result["scores"].argmax())].tolist()
        boxes.append(
            [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        )
    return boxes


def _check_prompts(points, boxes, labels, size) -> None:
    if not points and not boxes:
        raise FlexiMMTInputError("give points (clicks [[x, y], ...]) or boxes ([[x0, y0, x1, y1], ...]) for SAM")
    width, height = size
    for point in points or []:
        if len(point) != 2:
            raise FlexiMMTInputError(f"a point is [x, y] in pixels, got {point!r}")
    for box in boxes or []:
        if len(box) != 4 or not (box[0] <= box[2] and box[1] <= box[3]):
            raise FlexiMMTInputError(f"a box is [x0, y0, x1, y1] in pixels with x0 <= x1 and y0 <= y1, got {box!r}")
    if points and boxes and len(boxes) > 1:
        raise FlexiMMTInputError(f"clicks refine one object: give at most one box with points, got {len(boxes)}")
    if labels is not None and (not points or len(labels) != len(points) or any(lab not in (0, 1) for lab in labels)):
        raise FlexiMMTInputError(
            f"labels are 1 (object) or 0 (background), one per point: got {labels!r} for {len(points or [])} points"
        )
    outside = [p for p in points or [] if not (0 <= p[0] <= width and 0 <= p[1] <= height)]
    if outside:
        raise FlexiMMTInputError(f"points {outside} lie outside the {width}x{height} image: give pixel coordinates")


def masks_from_points(
    image,
    points: list[list[float]] | None = None,
    boxes: list[list[float]] | None = None,
    labels: list[int] | None = None,
    segmenter: Any = SEGMENTER,
    device=None,
) -> torch.BoolTensor:
    """SAM masks ``[N, H, W]``: one per box, or one (N = 1) for the clicked points (with at most one box).

    ``points`` are ``[x, y]`` pixels, ``labels`` 1 (object) or 0 (background) per point (default all 1),
    ``boxes`` ``[x0, y0, x1, y1]`` pixels. Each mask is the best-scoring (predicted IoU) of SAM's three."""
    image = _image(image)
    _check_prompts(points, boxes, labels, image.size)
    model, processor = _load(segmenter, "SamModel", "SamProcessor", device, "or give the masks as PNG files instead")
    prompts: dict[str, Any] = {}
    if boxes:
        prompts["input_boxes"] = [[[float(c) for c in box] for box in boxes]]  # [image, box, 4]
    if points:
        prompts["input_points"] = [[[[float(c) for c in p] for p in points]]]  # [image, object, point, 2]
        prompts["input_labels"] = [[list(labels) if labels is not None else [1] * len(points)]]
    inputs = processor(images=image, return_tensors="pt", **prompts).to(_device(model))
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=True)
    masks = processor.image_processor.post_process_masks(
        outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
    )[0]  # [N, 3, H, W]
    best = outputs.iou_scores[0].argmax(-1).cpu()  # [N]
    return masks[torch.arange(masks.shape[0]), best].bool()


def masks_from_words(
    image,
    words: list[str],
    detector: Any = DETECTOR,
    segmenter: Any = SEGMENTER,
    box_threshold: float = 0.35,
    text_threshold: float = 0.25,
    device=None,
) -> torch.BoolTensor:
    """First-frame object masks ``[K, H, W]`` from K phrases (Grounded-SAM): the best Grounding-DINO
    box per phrase, then SAM's best mask inside it. A phrase with no box raises a ``ValueError``."""
    boxes = detect_boxes(image, words, detector, box_threshold, text_threshold, device)
    return masks_from_points(image, boxes=boxes, segmenter=segmenter, device=device)


# ---------------------------------------------------------------------------------------------- through a video


def _binary(masks, what: str) -> torch.Tensor:
    masks = torch.as_tensor(np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks))
    if masks.dtype != torch.bool:
        if masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
            raise FlexiMMTInputError(
                f"{what} must be boolean (or 0/1), got {masks.dtype} values in "
                f"[{masks.min().item()}, {masks.max().item()}]: threshold them first, e.g. mask > 127 for a PNG"
            )
        masks = masks.bool()
    return masks


def _check_video(frames, first_masks) -> tuple[np.ndarray, torch.Tensor]:
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise FlexiMMTInputError(
            f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}: "
            "convert floats in [0, 1] with (x * 255).round().astype(np.uint8)"
        )
    first = _binary(first_masks, "first-frame masks")
    if first.ndim == 2:
        first = first[None]
    if first.ndim != 3 or first.shape[0] == 0:
        raise FlexiMMTInputError(f"first-frame masks must be [K, H, W] (or one [H, W]), got {tuple(first.shape)}")
    if tuple(first.shape[1:]) != frames.shape[1:3]:
        raise FlexiMMTInputError(
            f"first-frame masks {tuple(first.shape)} do not match the frames' size {frames.shape[1:3]}: "
            "resize the masks (nearest) to the video"
        )
    return frames, first


def propagate_masks(
    frames, first_masks, method: str = "sam2", model: Any = VIDEO_SEGMENTER, device=None
) -> torch.BoolTensor:
    """Carry first-frame masks ``[K, H, W]`` through the video ``[T, H, W, 3]`` (uint8): ``[K, T, H, W]``.

    ``method="sam2"``: SAM 2's video propagation, as the release does (needs transformers with
    ``Sam2VideoModel``, torchvision, and the weights). ``method="flow"``: needs no weights; each mask
    is warped frame to frame along OpenCV DIS optical flow - an approximation: it drifts on long
    videos, spreads onto whatever moves with the object, and loses what an occluder hides.
    Frame 0 of the result is ``first_masks`` itself."""
    if method not in PROPAGATION_METHODS:
        raise FlexiMMTInputError(f"method={method!r}: choose 'sam2' (SAM 2 weights) or 'flow' (offline approximation)")
    frames, first = _check_video(frames, first_masks)
    if method == "flow":
        return _propagate_flow(frames, first)
    return _propagate_sam2(frames, first, model, device)


def _check_torchvision() -> None:
    """SAM 2's video processors need a torchvision that loads next to this torch."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise FlexiMMTInputError(
            "SAM 2's video processor needs torchvision, which is not installed: "
            "pip install 'fleximmt[vision]' (or torchvision), or use method='flow'"
        ) from None
    except RuntimeError as err:  # e.g. "operator torchvision::nms does not exist": built for another torch
        raise FlexiMMTInputError(
            f"SAM 2's video processor needs torchvision, which does not load next to this torch "
            f"({str(err).splitlines()[0]}): install the torchvision release built for your torch (make test-vision "
            "uses torch 2.14.1 + torchvision 0.29.1), or use method='flow'"
        ) from None


def _propagate_sam2(frames: np.ndarray, first: torch.Tensor, model: Any, device) -> torch.BoolTensor:
    if not isinstance(model, tuple):
        _check_torchvision()
    net, processor = _load(model, "Sam2VideoModel", "Sam2VideoProcessor", device, "or use method='flow'")
    height, width = frames.shape[1:3]
    session = processor.init_video_session(video=frames, inference_device=_device(net))
    obj_ids = list(range(1, first.shape[0] + 1))
    # the session keeps (and edits) the id list it is given: hand it a copy
    processor.add_inputs_to_inference_session(
        inference_session=session, frame_idx=0, obj_ids=list(obj_ids), input_masks=[m.numpy() for m in first]
    )
    out = torch.zeros(first.shape[0], len(frames), height, width, dtype=torch.bool)
    with torch.no_grad():
        for step in net.propagate_in_video_iterator(session, start_frame_idx=0):
            masks = processor.post_process_masks([step.pred_masks.cpu()], original_sizes=[[height, width]])[0]
            for obj_id, mask in zip(step.object_ids, masks):  # mask [1, H, W]
                out[obj_ids.index(obj_id), step.frame_idx] = mask[0].bool()
    out[:, 0] = first
    return out


def _propagate_flow(frames: np.ndarray, first: torch.Tensor) -> torch.BoolTensor:
    """Warp each mask frame to frame along backward DIS flow (``cv2.remap``, kept above 0.5).
    Two choices keep the mask from trailing behind a moving object: flow at full resolution
    (DIS's finest scale 0), and pixels whose backward flow the forward flow does not undo
    (newly uncovered background; Sundaram et al. 2010's check) leave the mask."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(0)
    gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    height, width = gray[0].shape
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    masks = [first.numpy().astype(np.float32)]  # per frame [K, H, W]
    for previous, current in itertools.pairwise(gray):
        back = dis.calc(current, previous, None)  # where each pixel of `current` was in `previous`
        map_x, map_y = grid_x + back[..., 0], grid_y + back[..., 1]
        there = cv2.remap(
            dis.calc(previous, current, None), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )  # forward flow at that place
        mismatch = ((back + there) ** 2).sum(-1)
        consistent = mismatch <= 0.01 * ((back**2).sum(-1) + (there**2).sum(-1)) + 0.5
        warped = [
            cv2.remap(m, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            for m in masks[-1]
        ]
        masks.append(((np.stack(warped) > 0.5) & consistent).astype(np.float32))
    return torch.from_numpy(np.stack(masks, axis=1) > 0.5)


# ---------------------------------------------------------------------------------------------- PNG files


def _check_prefix(prefix: str) -> None:
    if not prefix or not re.fullmatch(r"[\w.-]+", prefix):
        raise FlexiMMTInputError(f"prefix {prefix!r}: use letters, digits, '_', '-' or '.', e.g. 'object0'")


def _frame_paths(folder: Path, prefix: str) -> dict[int, Path]:
    pattern = re.compile(re.escape(prefix) + r"_(\d{4,})\.png")
    return {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.fullmatch(p.name))}


def save_mask_pngs(masks, folder: str | os.PathLike, prefix: str = "mask") -> list[Path]:
    """Write per-frame masks ``[T, H, W]`` as 8-bit PNGs (0 / 255) ``folder/prefix_0000.png`` ...

    Each file is written to a temporary file in ``folder`` and moved into place, so a crash never
    leaves a half-written mask; older ``prefix_NNNN.png`` files beyond frame T - 1 are removed."""
    from PIL import Image

    _check_prefix(prefix)
    masks = _binary(masks, "masks").numpy()
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise FlexiMMTInputError(
            f"masks must be [T, H, W] with T >= 1, got shape {masks.shape}: save one object at a time"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, mask in enumerate(masks):
        png = Image.fromarray(mask.astype(np.uint8) * 255)
        paths.append(atomic_write(folder / f"{prefix}_{t:04d}.png", lambda tmp, png=png: png.save(tmp, format="PNG")))
    for t, stale in _frame_paths(folder, prefix).items():
        if t >= len(masks):
            stale.unlink()
    return paths


def load_mask_pngs(folder: str | os.PathLike, prefix: str = "mask") -> torch.BoolTensor:
    """Read back what :func:`save_mask_pngs` wrote: ``[T, H, W]`` (a pixel is in the mask above 127)."""
    from PIL import Image

    _check_prefix(prefix)
    folder = Path(folder)
    if not folder.is_dir():
        raise FlexiMMTInputError(f"mask folder {str(folder)!r} does not exist: check the path")
    paths = _frame_paths(folder, prefix)
    if not paths:
        raise FlexiMMTInputError(f"no {prefix}_NNNN.png masks in {str(folder)!r}: check the folder and the prefix")
    missing = sorted(set(range(max(paths) + 1)) - set(paths))
    if missing:
        raise FlexiMMTInputError(
            f"{prefix} masks in {str(folder)!r} skip frames {missing[:5]}: every frame needs a PNG"
        )
    masks = [np.array(Image.open(paths[t]).convert("L")) > 127 for t in range(len(paths))]
    sizes = {m.shape for m in masks}
    if len(sizes) > 1:
        raise FlexiMMTInputError(f"{prefix} masks in {str(folder)!r} differ in size {sorted(sizes)}: resave them")
    return torch.from_numpy(np.stack(masks))
