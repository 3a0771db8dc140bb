"""Automatic metrics of Sec. 4.1, as the authors' released evaluation scripts compute them
(METHOD.md section 7): TF (trajectory fidelity), FF (flow fidelity), and CLIP's AC / TC / TS.

Offline defaults need no weights: OpenCV DIS optical flow for FF and OpenCV pyramidal
Lucas-Kanade tracking for TF. ``flow="raft"`` (torchvision) and ``tracker="cotracker"`` are the
release's estimators, used when installed. Every ``*_result`` says which estimator produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FlexiMMTInputError

GRID = 55  # TF tracks a 55 x 55 grid inside the object's first-frame box
MAG_BINS, DIR_BINS = 20, 18


@dataclass(frozen=True)
class MetricResult:
    value: float
    estimator: str


# -- input checks --------------------------------------------------------------------------
def _video(frames, name: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise FlexiMMTInputError(f"{name} must be uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] < 2:
        raise FlexiMMTInputError(f"{name} has {frames.shape[0]} frame(s): motion metrics need at least 2")
    return frames


def _masks(masks, frames: np.ndarray, name: str, per_frame: bool) -> np.ndarray:
    masks = np.asarray(masks).astype(bool)
    want = frames.shape[:3] if per_frame else frames.shape[1:3]
    if masks.shape != want:
        shape = "[T, H, W] per frame" if per_frame else "[H, W] (first frame)"
        raise FlexiMMTInputError(f"{name} must be bool {shape} matching its video {want}, got {masks.shape}")
    return masks


def _resize_to(frames: np.ndarray, masks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference is resized to the generated size (frames bilinear, masks nearest)."""
    import cv2

    if frames.shape[1:3] == (height, width):
        return frames, masks
    frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames])
    if masks.ndim == 2:
        masks = cv2.resize(masks.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    else:
        masks = np.stack([cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
                          for m in masks])  # fmt: skip
    return frames, masks


# -- FF: flow fidelity -------------------------------------------------------------------------
def bhattacharyya(p: np.ndarray, q: np.ndarray) -> float:
    """Bhattacharyya coefficient of two histograms (each normalised to sum 1); 0 if either is empty."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return float(np.sqrt((p / p.sum()) * (q / q.sum())).sum())


def flow_similarity(flow_gen: np.ndarray, flow_ref: np.ndarray) -> float:
    """FF of one frame pair: flows ``[n, 2]`` (dx, dy) inside the object, histograms compared."""
    if len(flow_gen) == 0 or len(flow_ref) == 0:
        return 0.0
    mag_gen, mag_ref = np.linalg.norm(flow_gen, axis=1), np.linalg.norm(flow_ref, axis=1)
    mag_gen, mag_ref = mag_gen / (mag_gen.mean() + 1e-6), mag_ref / (mag_ref.mean() + 1e-6)
    top = max(np.percentile(mag_gen, 99), np.percentile(mag_ref, 99), 1e-6)
    magnitude = bhattacharyya(np.histogram(mag_gen, MAG_BINS, (0, top))[0], np.histogram(mag_ref, MAG_BINS, (0, top))[0])
    ang_gen = np.arctan2(flow_gen[:, 1], flow_gen[:, 0])
    ang_ref = np.arctan2(flow_ref[:, 1], flow_ref[:, 0])
    direction = bhattacharyya(np.histogram(ang_gen, DIR_BINS, (-np.pi, np.pi))[0],
                              np.histogram(ang_ref, DIR_BINS, (-np.pi, np.pi))[0])  # fmt: skip
    return (magnitude + direction) / 2


def optical_flows(frames: np.ndarray, flow: str = "dis") -> np.ndarray:
    """Flow of each consecutive pair ``[T-1, H, W, 2]`` (dx, dy)."""
    import cv2

    if flow == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        return np.stack([dis.calc(a, b, None) for a, b in zip(gray[:-1], gray[1:])])
    if flow == "raft":
        return _raft_flows(frames)
    raise FlexiMMTInputError(f"flow={flow!r}: choose 'dis' (OpenCV, offline) or 'raft' (torchvision)")


def _raft_flows(frames: np.ndarray) -> np.ndarray:  # pragma: no cover - needs torchvision and its weights
    try:
        import torch
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large
    except ImportError:
        raise FlexiMMTInputError("flow='raft' needs torchvision: pip install 'fleximmt[vision]', or use flow='dis'") from None
    weights = Raft_Large_Weights.DEFAULT
    model = raft_large(weights=weights).eval()
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    a, b = weights.transforms()(video[:-1], video[1:])
    with torch.no_grad():
        return model(a, b, num_flow_updates=20)[-1].permute(0, 2, 3, 1).numpy()


def flow_fidelity_result(gen, ref, gen_masks, ref_masks, flow: str = "dis") -> MetricResult:
    gen, ref = _video(gen, "gen"), _video(ref, "ref")
    gen_masks, ref_masks = _masks(gen_masks, gen, "gen_masks", True), _masks(ref_masks, ref, "ref_masks", True)
    ref, ref_masks = _resize_to(ref, ref_masks, *gen.shape[1:3])
    length = min(len(gen), len(ref))
    flows_gen, flows_ref = optical_flows(gen[:length], flow), optical_flows(ref[:length], flow)
    scores = [flow_similarity(flows_gen[t][gen_masks[t]], flows_ref[t][ref_masks[t]]) for t in range(length - 1)]
    return MetricResult(float(np.mean(scores)), {"dis": "opencv-dis", "raft": "raft-large-20it"}[flow])


def flow_fidelity(gen, ref, gen_masks, ref_masks, flow: str = "dis") -> float:
    """FF in [0, 1]: per frame, Bhattacharyya similarity of normalised flow-magnitude and
    flow-direction histograms inside the object's masks, averaged over frames."""
    return flow_fidelity_result(gen, ref, gen_masks, ref_masks, flow).value


# -- TF: trajectory fidelity -------------------------------------------------------------------
def grid_points(mask: np.ndarray, size: int = GRID) -> np.ndarray:
    """A ``size x size`` grid of (x, y) points over the bounding box of ``mask``."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise FlexiMMTInputError("the first-frame mask is empty: TF needs the object's region")
    gx, gy = np.meshgrid(np.linspace(xs.min(), xs.max(), size), np.linspace(ys.min(), ys.max(), size))
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)


def track_points(frames: np.ndarray, points: np.ndarray, tracker: str = "lk") -> np.ndarray:
    """Tracks ``[T, n, 2]`` of ``points`` through the video."""
    import cv2

    if tracker == "cotracker":
        raise FlexiMMTInputError("tracker='cotracker' needs the cotracker package and its weights; use tracker='lk'")
    if tracker != "lk":
        raise FlexiMMTInputError(f"tracker={tracker!r}: choose 'lk' (OpenCV, offline) or 'cotracker'")
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    tracks = [points.reshape(-1, 1, 2)]
    for a, b in zip(gray[:-1], gray[1:]):
        nxt, _, _ = cv2.calcOpticalFlowPyrLK(a, b, tracks[-1], None, winSize=(21, 21), maxLevel=3)
        tracks.append(nxt)
    return np.stack(tracks)[:, :, 0]


def track_similarity(tracks_gen: np.ndarray, tracks_ref: np.ndarray) -> float:
    """TF from tracks ``[T, n, 2]``: unit displacements, S[i, j] = mean_t v_gen_i . v_ref_j,
    mean over i of max over j."""
    length = min(len(tracks_gen), len(tracks_ref))

    def unit(tracks):
        v = np.diff(tracks[:length], axis=0)
        return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-8)

    v_gen, v_ref = unit(tracks_gen), unit(tracks_ref)  # [T-1, n, 2]
    similarity = np.einsum("tid,tjd->ij", v_gen, v_ref) / v_gen.shape[0]
    return float(similarity.max(axis=1).mean())


def trajectory_fidelity_result(gen, ref, gen_mask, ref_mask, tracker: str = "lk") -> MetricResult:
    gen, ref = _video(gen, "gen"), _video(ref, "ref")
    gen_mask, ref_mask = _masks(gen_mask, gen, "gen_mask", False), _masks(ref_mask, ref, "ref_mask", False)
    ref, ref_mask = _resize_to(ref, ref_mask, *gen.shape[1:3])
    length = min(len(gen), len(ref))
    tracks_gen = track_points(gen[:length], grid_points(gen_mask), tracker)
    tracks_ref = track_points(ref[:length], grid_points(ref_mask), tracker)
    return MetricResult(track_similarity(tracks_gen, tracks_ref), {"lk": "opencv-lk", "cotracker": "cotracker"}[tracker])


def trajectory_fidelity(gen, ref, gen_mask, ref_mask, tracker: str = "lk") -> float:
    """TF in [-1, 1]: how well the object's tracked point directions match the reference's."""
    return trajectory_fidelity_result(gen, ref, gen_mask, ref_mask, tracker).value


# -- CLIP: AC, TC, TS -------------------------------------------------------------------------
def load_clip(model: Any = "openai/clip-vit-base-patch32"):
    """``(CLIPModel, CLIPProcessor)`` from a hub id or local folder (or a pair passed through)."""
    if isinstance(model, tuple):
        return model
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(model, use_safetensors=True).eval(), CLIPProcessor.from_pretrained(model)
    except OSError as err:
        raise FlexiMMTInputError(f"could not load CLIP {model!r} ({str(err).splitlines()[0]}): give a local folder") from None


def clip_scores(frames, text: str, model: Any = "openai/clip-vit-base-patch32") -> dict:
    """AC: mean cos(frame 0, frame t), t >= 1; TC: mean cos over all frame pairs i < j;
    TS: mean cos(text, frame). Returns ``{"ac", "tc", "ts", "model"}``."""
    import torch

    frames = _video(frames, "frames")
    clip, processor = load_clip(model)
    with torch.no_grad():
        images = processor(images=list(frames), return_tensors="pt")
        image = clip.get_image_features(**images)
        image = getattr(image, "pooler_output", image)
        tokens = processor(text=[text], return_tensors="pt", padding=True, truncation=True,
                           max_length=clip.config.text_config.max_position_embeddings)  # fmt: skip
        words = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        words = getattr(words, "pooler_output", words)
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    words = torch.nn.functional.normalize(words.float(), dim=-1)
    cos = image @ image.T
    pairs = torch.triu_indices(len(frames), len(frames), offset=1)
    name = model if isinstance(model, str) else getattr(clip.config, "_name_or_path", "clip")
    return {"ac": float(cos[0, 1:].mean()), "tc": float(cos[pairs[0], pairs[1]].mean()),
            "ts": float((image @ words.T).mean()), "model": str(name)}  # fmt: skip
