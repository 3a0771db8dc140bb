"""Metrics on synthetic videos whose right answers are known (METHOD.md section 7)."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fleximmt.metrics import (
    bhattacharyya,
    clip_scores,
    flow_fidelity,
    flow_fidelity_result,
    flow_similarity,
    load_clip,
    track_similarity,
    trajectory_fidelity,
    trajectory_fidelity_result,
)


def scene(velocity=(2, 0), frames=12, size=64, seed=0, start=(20, 24)):
    """A textured 16x16 square moving ``velocity`` px/frame over a textured background."""
    rng = np.random.RandomState(seed)
    background = (rng.rand(size, size, 3) * 60 + 60).astype(np.uint8)
    texture = (rng.rand(16, 16, 3) * 200 + 40).astype(np.uint8)
    video = np.repeat(background[None], frames, 0)
    masks = np.zeros((frames, size, size), bool)
    for t in range(frames):
        x, y = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        video[t, y : y + 16, x : x + 16] = texture
        masks[t, y : y + 16, x : x + 16] = True
    return video, masks


def test_identical_videos_score_one():
    video, masks = scene()
    assert flow_fidelity(video, video, masks, masks) == pytest.approx(1.0, abs=1e-6)
    assert trajectory_fidelity(video, video, masks[0], masks[0]) > 0.9


def test_opposite_motion_scores_below_zero_and_lower_flow_fidelity():
    right, right_masks = scene((2, 0))
    left, left_masks = scene((-2, 0), start=(40, 24))
    assert trajectory_fidelity(right, left, right_masks[0], left_masks[0]) < 0
    same = flow_fidelity(right, right, right_masks, right_masks)
    opposite = flow_fidelity(right, left, right_masks, left_masks)
    assert opposite < 0.8 * same


def test_still_object_against_moving_reference_scores_lower():
    moving, moving_masks = scene((2, 0))
    still, still_masks = scene((0, 0))
    same = flow_fidelity(moving, moving, moving_masks, moving_masks)
    assert flow_fidelity(still, moving, still_masks, moving_masks) < 0.8 * same


def test_empty_mask_frames_score_zero():
    video, masks = scene()
    half = masks.copy()
    half[1::2] = False  # frames 1, 3, 5, ... have no object: those frame pairs score 0
    got = flow_fidelity(video, video, half, masks)
    pairs = len(video) - 1
    assert got == pytest.approx(sum(1.0 for t in range(pairs) if half[t].any()) / pairs, abs=1e-6)


def test_bhattacharyya_by_hand():
    assert bhattacharyya([1, 1, 0], [0, 1, 1]) == pytest.approx(0.5)
    assert bhattacharyya([2, 0], [5, 0]) == pytest.approx(1.0)
    assert bhattacharyya([0, 0], [1, 0]) == 0.0


def test_results_record_their_estimator_and_reference_is_resized():
    video, masks = scene()
    big = np.repeat(np.repeat(video, 2, axis=1), 2, axis=2)
    big_masks = np.repeat(np.repeat(masks, 2, axis=1), 2, axis=2)
    ff = flow_fidelity_result(video, big, masks, big_masks)
    tf = trajectory_fidelity_result(video, big, masks[0], big_masks[0])
    assert ff.estimator == "opencv-dis" and tf.estimator == "opencv-lk"
    assert ff.value > 0.8 and tf.value > 0.8


def test_flow_similarity_by_hand():
    right, left = np.tile([2.0, 0.0], (50, 1)), np.tile([-2.0, 0.0], (50, 1))
    # same direction, different speed: magnitudes normalised by their mean -> identical histograms
    assert flow_similarity(right, right * 3) == pytest.approx(1.0)
    # opposite direction: magnitude histograms agree (1), direction bins are disjoint (0)
    assert flow_similarity(right, left) == pytest.approx(0.5)
    # half the gen points move right, half left, ref all right: direction sqrt(1/2 * 1) = 0.7071
    mixed = np.concatenate([right[:25], left[:25]])
    assert flow_similarity(mixed, right) == pytest.approx((1 + np.sqrt(0.5)) / 2)
    assert flow_similarity(right[:0], right) == 0.0


def test_track_similarity_by_hand():
    steps = np.arange(5)[:, None, None]
    right = np.concatenate([steps * [[1.0, 0.0]], steps * [[1.0, 0.0]]], axis=1)  # [T=5, n=2, 2]
    up = steps * np.array([[0.0, -1.0], [0.0, -1.0]])
    mixed = np.concatenate([steps * [[1.0, 0.0]], steps * [[0.0, -1.0]]], axis=1)
    assert track_similarity(right, right) == pytest.approx(1.0)
    assert track_similarity(right, -right) == pytest.approx(-1.0)
    assert track_similarity(right, up) == pytest.approx(0.0)
    assert track_similarity(right, mixed) == pytest.approx(1.0)  # max over j finds the matching point
    assert track_similarity(mixed, right) == pytest.approx(0.5)  # the 'up' point has no match
    assert track_similarity(right, right[:3]) == pytest.approx(1.0)  # cut to the shorter


def test_videos_of_different_lengths_are_cut_to_the_shorter():
    short, short_masks = scene(start=(10, 24))
    long, long_masks = scene(frames=16, start=(10, 24))
    for a, b, a_masks, b_masks in [(short, long, short_masks, long_masks), (long, short, long_masks, short_masks)]:
        assert flow_fidelity(a, b, a_masks, b_masks) == pytest.approx(1.0, abs=1e-6)
        assert trajectory_fidelity(a, b, a_masks[0], b_masks[0]) > 0.9


def test_masks_as_zero_one_integers_equal_bool_masks():
    video, masks = scene()
    assert flow_fidelity(video, video, masks.astype(np.uint8), masks) == flow_fidelity(video, video, masks, masks)


@pytest.mark.parametrize("call, message", [
    (lambda v, m: flow_fidelity(v.astype(np.float32), v, m, m), "uint8"),
    (lambda v, m: flow_fidelity(v[..., :2], v, m, m), r"\[T, H, W, 3\]"),
    (lambda v, m: flow_fidelity(v[0], v, m, m), r"\[T, H, W, 3\]"),
    (lambda v, m: flow_fidelity(v, v, m[0], m), "one mask per frame"),
    (lambda v, m: flow_fidelity(v, v, m[:, :32], m), "ref_masks|gen_masks"),
    (lambda v, m: flow_fidelity(v, v, m * 0.5, m), "threshold"),
    (lambda v, m: flow_fidelity([v[0], v[1, :32]], v, m, m), "ragged"),
    (lambda v, m: flow_fidelity(v[:, :8, :8], v[:, :8, :8], m[:, :8, :8], m[:, :8, :8]), "at least 16"),
    (lambda v, m: trajectory_fidelity(v[:1], v, m[0], m[0]), "at least 2"),
    (lambda v, m: trajectory_fidelity(v, v, m, m[0]), "first frame"),
    (lambda v, m: trajectory_fidelity(v, v, np.zeros_like(m[0]), m[0]), "gen_mask is empty"),
    (lambda v, m: flow_fidelity(v, v, m, m, flow="farneback"), "choose"),
    (lambda v, m: trajectory_fidelity(v, v, m[0], m[0], tracker="klt"), "choose"),
    (lambda v, m: clip_scores(v[:1], "a cat"), "at least 2"),
    (lambda v, m: clip_scores(v, ["a cat"]), "str"),
])  # fmt: skip
def test_bad_input_raises_value_error(call, message):
    video, masks = scene()
    with pytest.raises(ValueError, match=message):
        call(video, masks)


def test_release_estimators_missing_raise_value_error_naming_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # importing it now fails, installed or not
    monkeypatch.setitem(sys.modules, "cotracker", None)
    video, masks = scene(frames=3)
    with pytest.raises(ValueError, match="torchvision.*flow='dis'"):
        flow_fidelity(video, video, masks, masks, flow="raft")
    with pytest.raises(ValueError, match="cotracker.*tracker='lk'"):
        trajectory_fidelity(video, video, masks[0], masks[0], tracker="cotracker")


def test_clip_missing_model_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="could not load CLIP"):
        load_clip(str(tmp_path / "no-such-clip"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(root / "model")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root / "model")
    return str(root / "model")


def test_clip_scores_on_a_tiny_random_clip_loaded_from_disk(tiny_clip):
    still = np.repeat(scene()[0][:1], 5, axis=0)
    scores = clip_scores(still, "a ball jumps.", model=tiny_clip)
    assert scores["ac"] == pytest.approx(1.0, abs=1e-5) and scores["tc"] == pytest.approx(1.0, abs=1e-5)
    assert scores["model"] == tiny_clip
    changing = (np.random.RandomState(3).rand(5, 48, 48, 3) * 255).astype(np.uint8)
    scores = clip_scores(changing, "a ball jumps.", model=tiny_clip)
    assert scores["ac"] < 0.9999 and all(-1 <= scores[k] <= 1 for k in ("ac", "tc", "ts"))
    # TC against a brute force over all pairs i < j of the model's own image embeddings
    model, processor = load_clip(tiny_clip)
    with torch.no_grad():
        features = model.get_image_features(**processor(images=list(changing), return_tensors="pt"))
    features = getattr(features, "pooler_output", features)
    features = features / features.norm(dim=-1, keepdim=True)
    pairs = [float(features[i] @ features[j]) for i in range(5) for j in range(i + 1, 5)]
    assert scores["tc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    assert scores["ac"] == pytest.approx(sum(float(features[0] @ features[t]) for t in range(1, 5)) / 4, abs=1e-5)
    # TS against the text embedding of the caption
    with torch.no_grad():
        words = model.get_text_features(**processor.tokenizer(["a ball jumps."], return_tensors="pt"))
    words = getattr(words, "pooler_output", words)
    words = words[0] / words[0].norm()
    assert scores["ts"] == pytest.approx(float((features @ words).mean()), abs=1e-5)


def test_clip_scores_accept_a_loaded_pair_and_truncate_long_captions(tiny_clip):
    pair = load_clip(tiny_clip)
    video = scene(frames=3)[0]
    long_caption = " ".join(["a ball jumps."] * 40)  # far more tokens than the 32-token context
    by_path = clip_scores(video, long_caption, model=tiny_clip)
    by_pair = clip_scores(video, long_caption, model=pair)
    assert by_pair["ts"] == pytest.approx(by_path["ts"], abs=1e-6) and -1 <= by_pair["ts"] <= 1
    assert by_pair["model"] == tiny_clip  # the pair's own name_or_path
