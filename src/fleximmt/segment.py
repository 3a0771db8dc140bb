"""Object masks: from words (Grounding-DINO + SAM), from clicks or a box (SAM), and through a
video (SAM 2, or an offline optical-flow approximation), all through transformers.

Models take a hub id, a local folder, or an already-loaded ``(model, processor)`` pair; they load
with ``use_safetensors=True`` and never with ``trust_remote_code``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FlexiMMTInputError
from .motion import atomic_write

DETECTOR = "IDEA-Research/grounding-dino-tiny"
SEGMENTER = "facebook/sam-vit-base"
VIDEO_SEGMENTER = "facebook/sam2.1-hiera-tiny"


def _load(model: Any, model_cls: str, processor_cls: str):
    if isinstance(model, tuple):
        return model
    import transformers

    try:
        net = getattr(transformers, model_cls).from_pretrained(model, use_safetensors=True).eval()
        return net, getattr(transformers, processor_cls).from_pretrained(model)
    except OSError as err:
        raise FlexiMMTInputError(
            f"could not load {model!r} ({str(err).splitlines()[0]}): give a local folder with its files, "
            "or give the masks as PNG files instead"
        ) from None


def _image(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FlexiMMTInputError(f"image {str(image)!r} does not exist")
        return Image.open(image).convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise FlexiMMTInputError(f"an image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    return image.convert("RGB")


def detect_boxes(image, words: list[str], detector: Any = DETECTOR, box_threshold: float = 0.35,
                 text_threshold: float = 0.25) -> list[list[float]]:  # fmt: skip
    """The best Grounding-DINO box ``[x0, y0, x1, y1]`` for each phrase of ``words``."""
    if not words:
        raise FlexiMMTInputError("give at least one phrase naming an object, e.g. ['tiger']")
    model, processor = _load(detector, "AutoModelForZeroShotObjectDetection", "AutoProcessor")
    image = _image(image)
    boxes = []
    for phrase in words:
        inputs = processor(images=image, text=phrase.lower().rstrip(".") + ".", return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        result = processor.post_process_grounded_object_detection(
            outputs, inputs.input_ids, threshold=box_threshold, text_threshold=text_threshold,
            target_sizes=[image.size[::-1]],
        )[0]  # fmt: skip
        if len(result["scores"]) == 0:
            raise FlexiMMTInputError(
                f"no {phrase!r} found in the image: lower box_threshold (now {box_threshold}) or give a mask PNG"
            )
        boxes.append(result["boxes"][int(result["scores"].argmax())].tolist())
    return boxes


def masks_from_points(image, points: list[list[float]] | None = None, boxes: list[list[float]] | None = None,
                      labels: list[int] | None = None, segmenter: Any = SEGMENTER) -> torch.BoolTensor:  # fmt: skip
    """One SAM mask ``[H, W]`` per box (or one for the clicked points): the best-scoring of SAM's
    proposals. ``labels`` are 1 (object) / 0 (background) per point. Returns ``[N, H, W]``."""
    if not points and not boxes:
        raise FlexiMMTInputError("give points (clicks) or boxes for SAM to segment")
    model, processor = _load(segmenter, "SamModel", "SamProcessor")
    image = _image(image)
    kwargs: dict[str, Any] = {}
    if boxes:
        kwargs["input_boxes"] = [[list(map(float, b)) for b in boxes]]
    if points:
        kwargs["input_points"] = [[[list(map(float, p)) for p in points]]]
        kwargs["input_labels"] = [[labels if labels is not None else [1] * len(points)]]
    inputs = processor(images=image, return_tensors="pt", **kwargs)
    with torch.no_grad():
        outputs = model(**inputs)
    masks = processor.image_processor.post_process_masks(
        outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )[0]  # [N, 3, H, W]
    best = outputs.iou_scores[0].argmax(-1)  # [N]
    return torch.stack([masks[n, int(best[n])] for n in range(masks.shape[0])]).bool()


def masks_from_words(image, words: list[str], detector: Any = DETECTOR, segmenter: Any = SEGMENTER,
                     box_threshold: float = 0.35, text_threshold: float = 0.25) -> torch.BoolTensor:  # fmt: skip
    """First-frame masks ``[K, H, W]`` from words (Grounded-SAM): a box per phrase, then SAM."""
    boxes = detect_boxes(image, words, detector, box_threshold, text_threshold)
    return masks_from_points(image, boxes=boxes, segmenter=segmenter)


def _check_video(frames, first_masks) -> tuple[np.ndarray, torch.Tensor]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise FlexiMMTInputError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    first_masks = torch.as_tensor(np.asarray(first_masks)).bool()
    if first_masks.ndim == 2:
        first_masks = first_masks[None]
    if tuple(first_masks.shape[1:]) != frames.shape[1:3]:
        raise FlexiMMTInputError(f"first masks {tuple(first_masks.shape)} do not match the frames' size {frames.shape[1:3]}")
    return frames, first_masks


def propagate_masks(frames, first_masks, method: str = "sam2", model: Any = VIDEO_SEGMENTER) -> torch.BoolTensor:
    """Carry first-frame masks ``[K, H, W]`` through the video ``[T, H, W, 3]``: ``[K, T, H, W]``.

    ``method="sam2"`` is the release's SAM 2 video propagation; ``method="flow"`` needs no
    weights: each mask is warped frame to frame along OpenCV DIS optical flow (an approximation
    that drifts on long videos and cannot follow occlusions)."""
    frames, first = _check_video(frames, first_masks)
    if method == "flow":
        return _propagate_flow(frames, first)
    if method != "sam2":
        raise FlexiMMTInputError(f"method={method!r}: choose 'sam2' (weights needed) or 'flow' (offline)")
    import transformers

    if not hasattr(transformers, "Sam2VideoModel"):
        raise FlexiMMTInputError("this transformers has no SAM 2 video model: upgrade it or use method='flow'")
    net, processor = _load(model, "Sam2VideoModel", "Sam2VideoProcessor")
    session = processor.init_video_session(video=list(frames), inference_device="cpu")
    ids = list(range(1, first.shape[0] + 1))
    processor.add_inputs_to_inference_session(inference_session=session, frame_idx=0, obj_ids=ids,
                                              input_masks=[m.numpy() for m in first])  # fmt: skip
    out = torch.zeros(first.shape[0], len(frames), *frames.shape[1:3], dtype=torch.bool)
    with torch.no_grad():
        for step in net.propagate_in_video_iterator(session):
            masks = processor.post_process_masks([step.pred_masks], original_sizes=[list(frames.shape[1:3])])[0]
            out[:, step.frame_idx] = masks[:, 0].bool()
    out[:, 0] = first
    return out


def _propagate_flow(frames: np.ndarray, first: torch.Tensor) -> torch.BoolTensor:
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    height, width = gray[0].shape
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    masks = [first.numpy().astype(np.float32)]
    for previous, current in zip(gray[:-1], gray[1:]):
        back = dis.calc(current, previous, None)  # where each pixel of `current` came from
        map_x, map_y = grid_x + back[..., 0], grid_y + back[..., 1]
        masks.append(np.stack([cv2.remap(m, map_x, map_y, cv2.INTER_LINEAR, borderValue=0) for m in masks[-1]]))
        masks[-1] = (masks[-1] > 0.5).astype(np.float32)
    return torch.from_numpy(np.stack(masks, axis=1) > 0.5)


def save_mask_pngs(masks, folder: str | os.PathLike, prefix: str = "mask") -> list[Path]:
    """Write per-frame masks ``[T, H, W]`` as 8-bit PNGs ``prefix_0000.png`` ..., atomically."""
    from PIL import Image

    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 3:
        raise FlexiMMTInputError(f"masks must be [T, H, W], got shape {masks.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, mask in enumerate(masks):
        png = Image.fromarray(mask.astype(np.uint8) * 255)
        paths.append(atomic_write(folder / f"{prefix}_{t:04d}.png", lambda tmp, png=png: png.save(tmp, format="PNG")))
    return paths


def load_mask_pngs(folder: str | os.PathLike, prefix: str = "mask") -> torch.BoolTensor:
    """Read back what :func:`save_mask_pngs` wrote: ``[T, H, W]``."""
    from PIL import Image

    paths = sorted(Path(folder).glob(f"{prefix}_[0-9][0-9][0-9][0-9].png"))
    if not paths:
        raise FlexiMMTInputError(f"no {prefix}_NNNN.png masks in {str(folder)!r}")
    return torch.from_numpy(np.stack([np.array(Image.open(p).convert("L")) > 127 for p in paths]))
