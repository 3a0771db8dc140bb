"""Metrics on synthetic videos whose right answers are known (docs/method.md#evaluation)."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from helpers import break_torchvision, forget_torchvision

from fleximmt.evaluation import metrics
from fleximmt.evaluation.metrics import (
    bhattacharyya,
    clip_scores,
    flow_fidelity,
    flow_fidelity_result,
    flow_similarity,
    load_clip,
    optical_flows,
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


@pytest.mark.parametrize(
    "call, message",
    [
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
    ],
)
def test_bad_input_raises_value_error(call, message):
    video, masks = scene()
    with pytest.raises(ValueError, match=message):
        call(video, masks)


def test_release_estimators_missing_raise_value_error_naming_the_fix(monkeypatch):
    forget_torchvision(monkeypatch)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # importing it now fails, installed or not
    monkeypatch.setitem(sys.modules, "cotracker", None)
    video, masks = scene(frames=3)
    with pytest.raises(ValueError, match=r"torchvision.*flow='dis'"):
        flow_fidelity(video, video, masks, masks, flow="raft")
    with pytest.raises(ValueError, match=r"cotracker.*tracker='lk'"):
        trajectory_fidelity(video, video, masks[0], masks[0], tracker="cotracker")


def test_raft_with_a_torchvision_built_for_another_torch_names_the_fix(monkeypatch):
    forget_torchvision(monkeypatch)
    break_torchvision(monkeypatch)
    video, masks = scene(frames=3)
    with pytest.raises(ValueError, match=r"does not load next to this torch \(operator torchvision::nms.*flow='dis'"):
        flow_fidelity(video, video, masks, masks, flow="raft")


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
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
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


# ------------------------------------------------------------------------------------------- RAFT (the release's FF)
# Tests marked `vision` need torchvision: `make test-vision` runs them in .venv-vision (tests/conftest.py).


@pytest.fixture
def fresh_raft(monkeypatch):
    """No RAFT kept from an earlier test, no $RAFT_CHECKPOINT from outside, an empty torch cache."""
    monkeypatch.delenv("RAFT_CHECKPOINT", raising=False)
    metrics._raft_cached.cache_clear()
    yield
    metrics._raft_cached.cache_clear()


class FlowStandIn(torch.nn.Module):
    """Stands in for RAFT: records what it is given and returns ``field(image1, image2)`` as the last
    of its ``num_flow_updates`` flow estimates (the earlier ones are NaN: only the last may be used)."""

    def __init__(self, field):
        super().__init__()
        self.field, self.calls = field, []

    def forward(self, image1, image2, num_flow_updates=12):
        self.calls.append((image1.clone(), image2.clone(), num_flow_updates))
        final = self.field(image1, image2)
        return [torch.full_like(final, float("nan"))] * (num_flow_updates - 1) + [final]


@pytest.fixture
def raft_stand_in(monkeypatch, fresh_raft):
    """Put a :class:`FlowStandIn` where RAFT-large would be, with torchvision's own RAFT input transform."""
    from torchvision.models.optical_flow import Raft_Large_Weights

    def install(field):
        model = FlowStandIn(field)
        monkeypatch.setattr(metrics, "_raft", lambda device: (model, Raft_Large_Weights.DEFAULT.transforms()))
        return model

    return install


def true_flow(image1, image2):
    """The flow OpenCV DIS finds between RAFT's inputs ([-1, 1] back to uint8 grey), as RAFT lays it
    out: ``[N, 2, H, W]``, channel 0 horizontal (dx), channel 1 vertical (dy)."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def grey(x):
        return ((x.mean(1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()

    flows = [dis.calc(a, b, None) for a, b in zip(grey(image1), grey(image2))]
    return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2)


@pytest.mark.vision
@pytest.mark.parametrize(("height", "width", "padded"), [(60, 70, (128, 128)), (136, 150, (136, 152))])
def test_raft_gets_normalised_padded_frames_20_updates_and_its_flow_comes_back_cropped_as_dx_dy(
    raft_stand_in, height, width, padded
):
    frames = (np.random.RandomState(1).rand(12, height, width, 3) * 255).astype(np.uint8)
    # the stand-in's "flow": dx = frame t's channel mean, dy = frame t+1's, each pixel where RAFT saw it
    model = raft_stand_in(lambda image1, image2: torch.stack([image1.mean(1), image2.mean(1)], dim=1))
    flows = optical_flows(frames, "raft")
    level = frames.astype(np.float64).mean(-1) / 127.5 - 1  # RAFT's input range: uint8 0..255 -> [-1, 1]
    assert flows.shape == (11, height, width, 2) and flows.dtype == np.float32
    np.testing.assert_allclose(flows[..., 0], level[:-1], atol=1e-5)  # pair t is (frame t, frame t+1) ...
    np.testing.assert_allclose(flows[..., 1], level[1:], atol=1e-5)  # ... and channel 1 is dy
    assert [len(call[0]) for call in model.calls] == [8, 3]  # 11 pairs in batches of 8
    assert all(call[2] == 20 for call in model.calls)  # the release's 20 flow updates
    for image1, image2, _ in model.calls:
        assert image1.shape[-2:] == image2.shape[-2:] == padded  # multiples of 8, at least 128 a side
        assert image1.dtype == torch.float32 and image1.min() >= -1 and image1.max() <= 1
        # the padding repeats the last row and column of each frame
        assert torch.equal(
            image1[:, :, height:, :width],
            image1[:, :, height - 1 : height, :width].expand_as(image1[:, :, height:, :width]),
        )
        assert torch.equal(
            image1[:, :, :, width:], image1[:, :, :, width - 1 : width].expand_as(image1[:, :, :, width:])
        )
    first = torch.from_numpy(frames[:8]).permute(0, 3, 1, 2).double() / 127.5 - 1
    torch.testing.assert_close(model.calls[0][0][:, :, :height, :width].double(), first, atol=1e-6, rtol=0)


@pytest.mark.vision
def test_raft_path_gives_the_known_answers_with_a_true_flow_in_place_of_raft(raft_stand_in):
    raft_stand_in(true_flow)
    right, right_masks = scene((2, 0))
    left, left_masks = scene((-2, 0), start=(40, 24))
    still, still_masks = scene((0, 0))
    flows = optical_flows(right, "raft")  # inside the square: 2 px right, 0 px down, frame after frame
    inside = np.concatenate([flows[t][right_masks[t]] for t in range(len(flows))])
    assert np.median(inside[:, 0]) == pytest.approx(2.0, abs=0.3) and np.median(inside[:, 1]) == pytest.approx(
        0, abs=0.3
    )
    same = flow_fidelity_result(right, right, right_masks, right_masks, flow="raft")
    assert same.value == pytest.approx(1.0, abs=1e-6) and same.estimator == "raft-large-20it"
    assert flow_fidelity(right, left, right_masks, left_masks, flow="raft") < 0.8 * same.value
    assert flow_fidelity(still, right, still_masks, right_masks, flow="raft") < 0.8 * same.value


@pytest.fixture(scope="module")
def random_raft(tmp_path_factory):
    """torchvision's RAFT-large with random weights (no checkpoint can be downloaded here), saved as safetensors."""
    from safetensors.torch import save_file
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_large.safetensors"
    save_file(raft_large(weights=None).state_dict(), path)
    return path


@pytest.mark.vision
def test_release_raft_loads_from_raft_checkpoint_and_scores_identical_videos_one(random_raft, fresh_raft, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("RAFT_CHECKPOINT", str(random_raft))
    video, masks = scene(frames=4)
    result = flow_fidelity_result(video, video, masks, masks, flow="raft")  # whatever random weights find
    assert result.value == pytest.approx(1.0, abs=1e-6) and result.estimator == "raft-large-20it"
    model, _ = metrics._raft("cpu")
    assert not model.training
    state = model.state_dict()
    assert all(torch.equal(state[name], weights) for name, weights in load_file(random_raft).items())
    # the flow is the real model's 20-update estimate on the frames mapped to [-1, 1], padded to 128 x 128
    flows = optical_flows(video, "raft")
    pixels = torch.nn.functional.pad(
        torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1, (0, 64, 0, 64), mode="replicate"
    )
    with torch.no_grad():
        estimates = model(pixels[:-1], pixels[1:], num_flow_updates=20)
    expected = estimates[-1][:, :, :64, :64].permute(0, 2, 3, 1).numpy()
    assert flows.shape == (3, 64, 64, 2) and np.isfinite(flows).all()
    np.testing.assert_allclose(flows, expected, atol=1e-4)
    assert np.abs(flows - estimates[11][:, :, :64, :64].permute(0, 2, 3, 1).numpy()).max() > 1e-3  # not 12 updates


@pytest.mark.vision
def test_release_raft_default_weights_are_torchvisions_hash_checked_and_read_weights_only(fresh_raft, monkeypatch):
    from torchvision.models._api import WeightsEnum
    from torchvision.models.optical_flow import Raft_Large_Weights

    asked = []

    def offline(self, *args, **kwargs):
        asked.append((self, kwargs))
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    video, masks = scene(frames=2)
    with pytest.raises(
        ValueError,
        match=r"could not load RAFT-large.*raft_large_C_T_SKHT_V2-ff5fadd5\.pth.*"
        r"TORCH_HOME.*RAFT_CHECKPOINT.*flow='dis'",
    ):
        flow_fidelity(video, video, masks, masks, flow="raft")
    assert asked == [(Raft_Large_Weights.DEFAULT, {"progress": False, "check_hash": True, "weights_only": True})]


@pytest.mark.vision
def test_raft_checkpoint_of_another_model_or_not_safetensors_names_the_fix(tmp_path, fresh_raft, monkeypatch):
    from safetensors.torch import save_file
    from torchvision.models.optical_flow import raft_small

    video, masks = scene(frames=2)
    small = tmp_path / "raft_small.safetensors"
    save_file(raft_small(weights=None).state_dict(), small)
    monkeypatch.setenv("RAFT_CHECKPOINT", str(small))
    with pytest.raises(ValueError, match="does not hold torchvision raft_large weights"):
        flow_fidelity(video, video, masks, masks, flow="raft")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    monkeypatch.setenv("RAFT_CHECKPOINT", str(garbage))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        flow_fidelity(video, video, masks, masks, flow="raft")


@pytest.mark.parametrize(
    ("name", "message"), [("raft_large.pth", r"\.safetensors file.*pickled"), ("missing.safetensors", "does not exist")]
)
def test_raft_checkpoint_must_be_an_existing_safetensors_file(tmp_path, fresh_raft, monkeypatch, name, message):
    if name.endswith(".pth"):
        (tmp_path / name).write_bytes(b"not loaded")
    monkeypatch.setenv("RAFT_CHECKPOINT", str(tmp_path / name))
    video, masks = scene(frames=2)
    with pytest.raises(ValueError, match=f"RAFT_CHECKPOINT=.*{message}"):
        flow_fidelity(video, video, masks, masks, flow="raft")
