"""Automatic metrics of Sec. 4.1, as the authors' released evaluation scripts compute them
(docs/method.md#evaluation): TF (trajectory fidelity), FF (flow fidelity), and CLIP's AC / TC / TS.

Offline defaults need no weights: OpenCV DIS optical flow for FF and OpenCV pyramidal
Lucas-Kanade tracking for TF. ``flow="raft"`` (torchvision's RAFT-large, 20 iterations; weights
from torchvision's cache or ``$RAFT_CHECKPOINT``, a .safetensors file) and ``tracker="cotracker"``
(``$COTRACKER_CHECKPOINT``) are the release's estimators, used when installed. Every ``*_result``
returns a :class:`MetricResult` that records which estimator produced the value.

Videos are uint8 RGB ``[T, H, W, 3]`` numpy arrays; masks are bool, ``[T, H, W]`` per frame (FF)
or ``[H, W]`` for the first frame (TF). The reference is resized to the generated size.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FlexiMMTInputError

logger = logging.getLogger(__name__)

GRID = 55  # TF tracks a 55 x 55 grid inside the object's first-frame box
MAG_BINS, DIR_BINS = 20, 18  # FF histograms: magnitudes on [0, R], directions on [-pi, pi]
MIN_SIDE = 16  # smallest frame side the flow/tracking estimators accept
FLOW_ESTIMATORS = {"dis": "opencv-dis", "raft": "raft-large-20it"}
TRACKERS = {"lk": "opencv-lk", "cotracker": "cotracker"}
CLIP = "openai/clip-vit-base-patch32"


@dataclass(frozen=True)
class MetricResult:
    """A metric's value and the estimator (flow or tracker) that produced it."""

    value: float
    estimator: str


# -- input checks --------------------------------------------------------------------------
def _video(frames: Any, name: str, min_side: int = 1) -> np.ndarray:
    """``frames`` as uint8 ``[T, H, W, 3]`` with T >= 2, or a ValueError that says how to fix it."""
    try:
        frames = np.asarray(frames)
    except ValueError:
        raise FlexiMMTInputError(f"{name} is ragged: give one array [T, H, W, 3] with equally sized frames") from None
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise FlexiMMTInputError(f"{name} must be RGB frames [T, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise FlexiMMTInputError(
            f"{name} must be uint8 (0-255), got {frames.dtype}: convert floats in [0, 1] with "
            "(frames * 255).round().astype(np.uint8)"
        )
    if frames.shape[0] < 2:
        raise FlexiMMTInputError(f"{name} has {frames.shape[0]} frame(s): these metrics need at least 2 frames")
    if min(frames.shape[1:3]) < min_side:
        size = f"{frames.shape[1]}x{frames.shape[2]}"
        raise FlexiMMTInputError(f"{name} frames are {size}: flow and tracking need at least {min_side} px a side")
    return frames


def _masks(masks: Any, frames: np.ndarray, name: str, per_frame: bool) -> np.ndarray:
    """``masks`` as bool, ``[T, H, W]`` (``per_frame``) or ``[H, W]``, matching ``frames``."""
    try:
        masks = np.asarray(masks)
    except ValueError:
        raise FlexiMMTInputError(f"{name} is ragged: give one bool array") from None
    want = frames.shape[:3] if per_frame else frames.shape[1:3]
    layout = "[T, H, W] (one mask per frame)" if per_frame else "[H, W] (the first frame's mask)"
    if masks.shape != want:
        raise FlexiMMTInputError(f"{name} must be {layout} matching its video, i.e. {want}; got {masks.shape}")
    if masks.dtype != bool:
        if not (np.issubdtype(masks.dtype, np.number) and np.isin(masks, (0, 1)).all()):
            raise FlexiMMTInputError(f"{name} must be bool (or 0/1), got {masks.dtype}: threshold it, e.g. mask > 0.5")
        masks = masks.astype(bool)
    return masks


def _resize_to(frames: np.ndarray, masks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference is resized to the generated size (frames bilinear, masks nearest)."""
    import cv2

    if frames.shape[1:3] == (height, width):
        return frames, masks
    frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames])

    def nearest(mask: np.ndarray) -> np.ndarray:
        return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0

    masks = nearest(masks) if masks.ndim == 2 else np.stack([nearest(m) for m in masks])
    return frames, masks


def _gray(frames: np.ndarray) -> list[np.ndarray]:
    import cv2

    return [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]


# -- FF: flow fidelity -------------------------------------------------------------------------
def bhattacharyya(p: np.ndarray, q: np.ndarray) -> float:
    """Bhattacharyya coefficient sum(sqrt(p * q)) of two histograms, each normalised to sum 1;
    0 if either is empty."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return float(np.sqrt((p / p.sum()) * (q / q.sum())).sum())


def flow_similarity(flow_gen: np.ndarray, flow_ref: np.ndarray) -> float:
    """FF of one frame: flow vectors ``[n, 2]`` (dx, dy) inside the object in each video.

    Magnitudes divided by their own mean, 20-bin histograms on [0, R] (R the larger 99th
    percentile); directions atan2(dy, dx) in 18 bins on [-pi, pi]; the mean of the two
    Bhattacharyya coefficients. An empty side scores 0.
    """
    if len(flow_gen) == 0 or len(flow_ref) == 0:
        return 0.0
    mag_gen, mag_ref = np.linalg.norm(flow_gen, axis=1), np.linalg.norm(flow_ref, axis=1)
    mag_gen, mag_ref = mag_gen / (mag_gen.mean() + 1e-6), mag_ref / (mag_ref.mean() + 1e-6)
    top = max(np.percentile(mag_gen, 99), np.percentile(mag_ref, 99), 1e-6)  # floor: no motion at all
    magnitude = bhattacharyya(
        np.histogram(mag_gen, MAG_BINS, (0, top))[0], np.histogram(mag_ref, MAG_BINS, (0, top))[0]
    )
    ang_gen = np.arctan2(flow_gen[:, 1], flow_gen[:, 0])
    ang_ref = np.arctan2(flow_ref[:, 1], flow_ref[:, 0])
    direction = bhattacharyya(
        np.histogram(ang_gen, DIR_BINS, (-np.pi, np.pi))[0], np.histogram(ang_ref, DIR_BINS, (-np.pi, np.pi))[0]
    )
    return (magnitude + direction) / 2


def optical_flows(frames: np.ndarray, flow: str = "dis") -> np.ndarray:
    """Flow of each consecutive frame pair, ``[T-1, H, W, 2]`` (dx, dy) in pixels."""
    if flow == "dis":
        import cv2

        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        gray = _gray(frames)
        return np.stack([dis.calc(a, b, None) for a, b in itertools.pairwise(gray)])
    if flow == "raft":
        return _raft_flows(frames)
    raise FlexiMMTInputError(f"flow={flow!r}: choose 'dis' (OpenCV, offline) or 'raft' (torchvision RAFT-large)")


RAFT_CHECKPOINT = "RAFT_CHECKPOINT"  # env var: RAFT-large weights as a local .safetensors file
RAFT_ITERATIONS = 20  # the release's number of flow updates
RAFT_MIN_SIDE = 128  # RAFT's correlation pyramid needs feature maps of 16 (1/8 of the image) a side


def _torchvision_raft():
    """torchvision's RAFT-large constructor and its weights enum, or a ValueError naming the fix."""
    try:
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large
    except ImportError:
        raise FlexiMMTInputError(
            "flow='raft' needs torchvision: pip install 'fleximmt[vision]' (or torchvision), or use flow='dis'"
        ) from None
    except (
        RuntimeError
    ) as err:  # e.g. "operator torchvision::nms does not exist": a torchvision built for another torch
        raise FlexiMMTInputError(
            f"torchvision does not load next to this torch ({str(err).splitlines()[0]}): install the torchvision "
            "release built for your torch (make test-vision uses torch 2.14.1 + torchvision 0.29.1), or use flow='dis'"
        ) from None
    return raft_large, Raft_Large_Weights


def _raft(device: str):
    """``(model, transforms)``: RAFT-large in eval mode on ``device`` and its input transform.

    Weights from ``$RAFT_CHECKPOINT`` (a ``.safetensors`` file of raft_large's state dict) when set,
    otherwise torchvision's release weights (``Raft_Large_Weights.DEFAULT``) from its cache
    (``$TORCH_HOME/hub/checkpoints``), downloaded there when online, hash-checked and read with
    torch's weights-only loader."""
    checkpoint = os.environ.get(RAFT_CHECKPOINT) or None
    stamp = None
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.suffix != ".safetensors":
            raise FlexiMMTInputError(
                f"{RAFT_CHECKPOINT}={checkpoint!r}: give RAFT-large weights as a .safetensors file "
                "(pickled .pth/.pt files are not loaded), or unset it to use torchvision's weights"
            )
        if not path.is_file():
            raise FlexiMMTInputError(f"{RAFT_CHECKPOINT}={checkpoint!r} does not exist: check the path, or unset it")
        checkpoint, stamp = str(path.resolve()), path.stat().st_mtime_ns
    return _raft_cached(device, checkpoint, stamp)


@functools.lru_cache(maxsize=1)
def _raft_cached(device: str, checkpoint: str | None, stamp: int | None):
    raft_large, weights_enum = _torchvision_raft()
    weights = weights_enum.DEFAULT
    model = raft_large(weights=None, progress=False)
    if checkpoint is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(checkpoint)
        except (SafetensorError, OSError) as err:
            raise FlexiMMTInputError(
                f"{RAFT_CHECKPOINT}={checkpoint!r} is not a readable safetensors file ({err}): resave the weights "
                "with safetensors.torch.save_file(model.state_dict(), path)"
            ) from None
        source = checkpoint
    else:
        try:
            state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
        except (OSError, RuntimeError) as err:  # offline: urllib's URLError is an OSError; a bad hash a RuntimeError
            raise FlexiMMTInputError(
                f"could not load RAFT-large weights ({str(err).splitlines()[0]}): put {Path(weights.url).name} in "
                f"$TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints), or set {RAFT_CHECKPOINT} to "
                "a .safetensors file of raft_large's weights, or use flow='dis'"
            ) from None
        source = str(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, wrong shapes: weights of another model
        raise FlexiMMTInputError(
            f"{source!r} does not hold torchvision raft_large weights ({str(err).splitlines()[0]} ...): "
            f"give the state dict of torchvision.models.optical_flow.raft_large"
        ) from None
    logger.info("FF flow: torchvision raft_large (%s) on %s", source, device)
    return model.eval().to(device), weights.transforms()


def _raft_flows(frames: np.ndarray, batch: int = 8) -> np.ndarray:
    """RAFT-large with the release's 20 flow updates, its own input transform (uint8 -> [-1, 1]);
    frames padded (edge pixels repeated, bottom and right) to a multiple of 8 and at least 128 px a
    side, as RAFT needs, and the flow cropped back: ``[T-1, H, W, 2]`` (dx, dy) in pixels."""
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, transforms = _raft(device)
    height, width = frames.shape[1:3]
    pad_h, pad_w = max(-height % 8, RAFT_MIN_SIDE - height), max(-width % 8, RAFT_MIN_SIDE - width)
    pad = (0, pad_w, 0, pad_h)  # F.pad order: left, right, top, bottom
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    pairs = len(frames) - 1
    flows = []
    with torch.no_grad():
        for start in range(0, pairs, batch):
            end = min(start + batch, pairs)
            a, b = transforms(video[start:end], video[start + 1 : end + 1])
            a, b = (F.pad(x.to(device), pad, mode="replicate") for x in (a, b))
            flow = model(a, b, num_flow_updates=RAFT_ITERATIONS)[-1][:, :, :height, :width]
            flows.append(flow.permute(0, 2, 3, 1).float().cpu().numpy())
    return np.concatenate(flows)


def flow_fidelity_result(
    gen: np.ndarray, ref: np.ndarray, gen_masks: np.ndarray, ref_masks: np.ndarray, flow: str = "dis"
) -> MetricResult:
    """FF with the estimator that produced it (see :func:`flow_fidelity`)."""
    if flow not in FLOW_ESTIMATORS:
        raise FlexiMMTInputError(f"flow={flow!r}: choose 'dis' (OpenCV, offline) or 'raft' (torchvision RAFT-large)")
    gen, ref = _video(gen, "gen", MIN_SIDE), _video(ref, "ref", MIN_SIDE)
    gen_masks, ref_masks = _masks(gen_masks, gen, "gen_masks", True), _masks(ref_masks, ref, "ref_masks", True)
    ref, ref_masks = _resize_to(ref, ref_masks, *gen.shape[1:3])
    length = min(len(gen), len(ref))
    flows_gen, flows_ref = optical_flows(gen[:length], flow), optical_flows(ref[:length], flow)
    scores = [flow_similarity(flows_gen[t][gen_masks[t]], flows_ref[t][ref_masks[t]]) for t in range(length - 1)]
    return MetricResult(float(np.mean(scores)), FLOW_ESTIMATORS[flow])


def flow_fidelity(
    gen: np.ndarray, ref: np.ndarray, gen_masks: np.ndarray, ref_masks: np.ndarray, flow: str = "dis"
) -> float:
    """FF in [0, 1]: per frame t, Bhattacharyya similarity of the normalised flow-magnitude and
    flow-direction histograms inside the object's masks of frame t (0 where either is empty),
    averaged over frames; identical videos score 1."""
    return flow_fidelity_result(gen, ref, gen_masks, ref_masks, flow).value


# -- TF: trajectory fidelity -------------------------------------------------------------------
def grid_points(mask: np.ndarray, size: int = GRID, name: str = "mask") -> np.ndarray:
    """A ``size x size`` grid of (x, y) points over the bounding box of ``mask``, ``[size**2, 2]``."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise FlexiMMTInputError(f"{name} is empty: TF needs the object's first-frame region")
    gx, gy = np.meshgrid(np.linspace(xs.min(), xs.max(), size), np.linspace(ys.min(), ys.max(), size))
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)


def track_points(frames: np.ndarray, points: np.ndarray, tracker: str = "lk") -> np.ndarray:
    """Tracks ``[T, n, 2]`` (x, y) of ``points`` (on frame 0) through the video."""
    if tracker == "cotracker":
        return _cotracker_tracks(frames, points)
    if tracker != "lk":
        raise FlexiMMTInputError(f"tracker={tracker!r}: choose 'lk' (OpenCV, offline) or 'cotracker'")
    import cv2

    gray = _gray(frames)
    tracks = [points.reshape(-1, 1, 2).astype(np.float32)]
    for a, b in itertools.pairwise(gray):
        nxt, found, _ = cv2.calcOpticalFlowPyrLK(a, b, tracks[-1], None, winSize=(21, 21), maxLevel=3)
        tracks.append(np.where(found[:, :, None] == 1, nxt, tracks[-1]))  # a lost point stays where it was
    return np.stack(tracks)[:, :, 0]


def _cotracker_tracks(frames: np.ndarray, points: np.ndarray) -> np.ndarray:  # pragma: no cover - needs cotracker
    """CoTracker (the release's tracker): queries on frame 0; checkpoint from $COTRACKER_CHECKPOINT."""
    try:
        from cotracker.predictor import CoTrackerPredictor
    except ImportError:
        raise FlexiMMTInputError(
            "tracker='cotracker' needs the cotracker package (pip install git+https://github.com/facebookresearch/"
            "co-tracker) and a checkpoint in $COTRACKER_CHECKPOINT; or use tracker='lk'"
        ) from None
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = os.environ.get("COTRACKER_CHECKPOINT")
    try:
        model = (CoTrackerPredictor(checkpoint=checkpoint) if checkpoint else CoTrackerPredictor()).eval().to(device)
    except (OSError, RuntimeError) as err:
        raise FlexiMMTInputError(
            f"could not load CoTracker ({str(err).splitlines()[0]}): set COTRACKER_CHECKPOINT to its .pth file, "
            "or use tracker='lk'"
        ) from None
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float().to(device)
    queries = torch.from_numpy(np.concatenate([np.zeros((len(points), 1), np.float32), points], 1))[None].to(device)
    with torch.no_grad():
        tracks, _ = model(video, queries=queries)
    return tracks[0].float().cpu().numpy()


def track_similarity(tracks_gen: np.ndarray, tracks_ref: np.ndarray) -> float:
    """TF from tracks ``[T, n, 2]``: unit displacements v = (p[t+1] - p[t]) / (|.| + 1e-8),
    S[i, j] = mean_t v_gen_i . v_ref_j, TF = mean over i of max over j; cut to the shorter."""
    length = min(len(tracks_gen), len(tracks_ref))

    def unit(tracks: np.ndarray) -> np.ndarray:
        v = np.diff(np.asarray(tracks[:length], np.float64), axis=0)
        return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-8)

    v_gen, v_ref = unit(tracks_gen), unit(tracks_ref)  # [T-1, n, 2]
    similarity = np.einsum("tid,tjd->ij", v_gen, v_ref) / v_gen.shape[0]
    return float(similarity.max(axis=1).mean())


def trajectory_fidelity_result(
    gen: np.ndarray, ref: np.ndarray, gen_mask: np.ndarray, ref_mask: np.ndarray, tracker: str = "lk"
) -> MetricResult:
    """TF with the estimator that produced it (see :func:`trajectory_fidelity`)."""
    if tracker not in TRACKERS:
        raise FlexiMMTInputError(f"tracker={tracker!r}: choose 'lk' (OpenCV, offline) or 'cotracker'")
    gen, ref = _video(gen, "gen", MIN_SIDE), _video(ref, "ref", MIN_SIDE)
    gen_mask, ref_mask = _masks(gen_mask, gen, "gen_mask", False), _masks(ref_mask, ref, "ref_mask", False)
    ref, ref_mask = _resize_to(ref, ref_mask, *gen.shape[1:3])
    points_gen, points_ref = grid_points(gen_mask, name="gen_mask"), grid_points(ref_mask, name="ref_mask")
    length = min(len(gen), len(ref))
    tracks_gen = track_points(gen[:length], points_gen, tracker)
    tracks_ref = track_points(ref[:length], points_ref, tracker)
    return MetricResult(track_similarity(tracks_gen, tracks_ref), TRACKERS[tracker])


def trajectory_fidelity(
    gen: np.ndarray, ref: np.ndarray, gen_mask: np.ndarray, ref_mask: np.ndarray, tracker: str = "lk"
) -> float:
    """TF in [-1, 1]: how well the directions of a 55 x 55 grid of tracked object points match
    the reference's (each video's grid spans its own first-frame mask's box)."""
    return trajectory_fidelity_result(gen, ref, gen_mask, ref_mask, tracker).value


# -- CLIP: AC, TC, TS -------------------------------------------------------------------------
def load_clip(model: Any = CLIP) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a hub id or local folder, or a loaded pair passed through."""
    if isinstance(model, (tuple, list)):
        if len(model) != 2:
            raise FlexiMMTInputError(f"model as a pair must be (CLIPModel, CLIPProcessor), got {len(model)} items")
        return tuple(model)
    if not isinstance(model, (str, os.PathLike)):
        raise FlexiMMTInputError(
            f"model must be a hub id, a local folder or a (model, processor) pair, got {type(model).__name__}"
        )
    from transformers import CLIPModel, CLIPProcessor

    try:
        clip = CLIPModel.from_pretrained(model, use_safetensors=True).eval()
        processor = CLIPProcessor.from_pretrained(model)
    except OSError as err:
        raise FlexiMMTInputError(
            f"could not load CLIP {str(model)!r} ({str(err).splitlines()[0]}): give a local folder with its "
            "safetensors weights and processor files"
        ) from None
    logger.info("CLIP: %s", model)
    return clip, processor


def clip_scores(frames: np.ndarray, text: str, model: Any = CLIP, batch: int = 32) -> dict[str, Any]:
    """CLIP scores of one video: AC = mean over t >= 1 of cos(frame 0, frame t); TC = mean cos
    over all frame pairs i < j; TS = mean over frames of cos(text, frame), the caption cut to
    CLIP's context. Returns ``{"ac", "tc", "ts", "model"}``."""
    import torch

    frames = _video(frames, "frames")
    if not isinstance(text, str):
        raise FlexiMMTInputError(f"text must be the caption as a str, got {type(text).__name__}")
    clip, processor = load_clip(model)
    device, dtype = clip.device, clip.dtype
    with torch.no_grad():
        image = []
        for start in range(0, len(frames), batch):
            pixels = processor(images=list(frames[start : start + batch]), return_tensors="pt")["pixel_values"]
            features = clip.get_image_features(pixel_values=pixels.to(device, dtype))
            image.append(getattr(features, "pooler_output", features))  # transformers 5: a model output
        image = torch.cat(image)
        tokens = processor(
            text=[text],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=clip.config.text_config.max_position_embeddings,
        )
        words = clip.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        words = getattr(words, "pooler_output", words)
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    words = torch.nn.functional.normalize(words.float(), dim=-1)
    cos = image @ image.T
    i, j = torch.triu_indices(len(frames), len(frames), offset=1)
    name = str(model) if isinstance(model, (str, os.PathLike)) else (clip.config._name_or_path or "clip")
    return {
        "ac": float(cos[0, 1:].mean()),
        "tc": float(cos[i, j].mean()),
        "ts": float((image @ words.T).mean()),
        "model": name,
    }
