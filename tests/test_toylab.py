"""The toy lab's scoring against known answers, its scenes, and every variant on a tiny model."""

import dataclasses

import numpy as np
import pytest
import torch

from fleximmt.toy import random_motion, tiny_pipeline
from fleximmt.toy.lab import (
    FRAMES,
    REFERENCES,
    SIZE,
    VARIANTS,
    dilate,
    expected_path,
    learn_motions,
    mask_quality,
    random_case,
    reference_caption,
    reference_scene,
    score,
    transfer,
)
from fleximmt.toy.world import WORDS, colour_track


@pytest.mark.parametrize("seed", range(6))
def test_colour_tracking_finds_each_sprite_where_the_generator_drew_it(seed):
    case = random_case(seed)
    scene = case.scene(trajectories=True)
    for k, sprite in enumerate(case.sprites):
        centres, masks = colour_track(scene.frames, sprite.colour, start=sprite.start)
        assert not np.isnan(centres).any()
        mask_centres = np.stack([np.argwhere(m)[:, ::-1].mean(0) + 0.5 for m in scene.masks[k]])
        assert np.abs(centres - mask_centres).max() < 1.0  # the centroid of the drawn pixels
        assert (masks & scene.masks[k]).sum() / scene.masks[k].sum() > 0.85  # texture noise leaves a few pixels out


def test_tracking_reports_a_sprite_that_is_not_there_as_missing():
    still = random_case(0).scene(trajectories=False)
    centres, masks = colour_track(still.frames, "white", start=(32.0, 32.0))  # no white sprite in the scene
    assert np.isnan(centres).all() and not masks.any()
    with pytest.raises(ValueError, match="colour"):
        colour_track(still.frames, "pink")


@pytest.mark.parametrize("seed", range(5))
def test_the_ideal_transfer_scores_best_and_swapped_motions_count_as_leakage(seed):
    case = random_case(seed)
    ideal = score(case.scene(trajectories=True).frames, case)
    still = score(case.scene(trajectories=False).frames, case)
    swapped_case = dataclasses.replace(case, motions=case.motions[1:] + case.motions[:1])
    swapped = score(swapped_case.scene(trajectories=True).frames, case)
    assert ideal["traj_err"] < 2.0 and ideal["leak"] == 0.0
    assert swapped["leak"] == 1.0  # every object follows another object's reference
    assert swapped["traj_err"] > ideal["traj_err"] + 3 and still["traj_err"] > ideal["traj_err"] + 2
    assert ideal["tf"] > swapped["tf"] and ideal["tf"] > still["tf"]


def test_cases_keep_every_prescribed_path_inside_the_frame_and_apart():
    for seed in range(40):
        case = random_case(seed)
        assert 2 <= len(case.sprites) <= 3 and len(set(case.motions)) == len(case.motions)
        assert len({s.colour for s in case.sprites}) == len(case.sprites)
        paths = [expected_path(s.start, m) for s, m in zip(case.sprites, case.motions)]
        for sprite, path in zip(case.sprites, paths):
            assert (path - sprite.size >= 0).all() and (path + sprite.size <= SIZE).all()
        for i in range(len(paths)):
            for j in range(i):
                assert np.hypot(*(paths[i] - paths[j]).T).min() > case.sprites[i].size + case.sprites[j].size
    assert random_case(3).prompt == random_case(3).prompt


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_videos_show_the_whole_motion_and_caption_it_in_the_world_vocabulary(name):
    scene = reference_scene(name)
    assert scene.frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert scene.masks[0].any(axis=(1, 2)).all()  # visible on every frame
    moved = scene.positions[0] - scene.positions[0, :1]
    assert np.allclose(moved, expected_path((0.0, 0.0), name))
    caption, concept, words = reference_caption(name)
    assert concept in caption and words in caption
    assert set(caption.rstrip(".").split()) <= set(WORDS)


@pytest.fixture(scope="module")
def toy_sized_pipe():
    return tiny_pipeline(seed=0, height=SIZE, width=SIZE, num_frames=FRAMES, text_len=24, words=tuple(WORDS))


def test_every_variant_runs_and_plain_i2v_ignores_the_motions(toy_sized_pipe):
    pipe = toy_sized_pipe
    case = random_case(1)
    motions = {
        m: random_motion(pipe.transformer, tokens_per_motion=4, seed=i, scale=4.0) for i, m in enumerate(REFERENCES)
    }
    videos = {}
    for variant in VARIANTS:
        frames, masks, seconds = transfer(pipe, case, motions, variant, steps=2, guidance=1.0)
        assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == np.uint8 and seconds > 0
        assert (masks is None) == (variant == "plain_i2v")
        videos[variant] = frames
    out = pipe(
        image=__import__("PIL.Image").Image.fromarray(case.scene(False).frames[0]),
        prompt=case.prompt,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    plain = (np.asarray(out.frames[0]) * 255).round().clip(0, 255).astype(np.uint8)
    assert np.array_equal(videos["plain_i2v"], plain)
    assert not np.array_equal(videos["fleximmt"], videos["plain_i2v"])  # the motion tokens act
    assert not np.array_equal(videos["fleximmt"], videos["no_masks"])  # and the masks matter


def test_dilate_grows_a_mask_by_a_square_of_the_radius():
    mask = torch.zeros(9, 9, dtype=torch.bool)
    mask[4, 4] = True
    assert torch.equal(dilate(mask, 0), mask)
    grown = dilate(mask, 2)
    assert grown.sum() == 25 and grown[2:7, 2:7].all()


def test_the_dilated_variant_hands_the_pipeline_larger_masks(toy_sized_pipe):
    case = random_case(3)
    motions = {
        m: random_motion(toy_sized_pipe.transformer, tokens_per_motion=4, seed=i) for i, m in enumerate(REFERENCES)
    }
    _, plain_masks, _ = transfer(toy_sized_pipe, case, motions, "w/o RMPM (static)", steps=1, guidance=1.0)
    VARIANTS["static, dilated"] = {"mask_source": "static", "dilate": 8}
    try:
        _, grown_masks, _ = transfer(toy_sized_pipe, case, motions, "static, dilated", steps=1, guidance=1.0)
    finally:
        del VARIANTS["static, dilated"]
    before, after = plain_masks[0], grown_masks[0]
    assert before.shape == after.shape and (after | ~before).all() and after.sum() > before.sum()


def test_learned_motions_are_reused_only_on_the_model_they_were_learned_on(toy_sized_pipe, tmp_path):
    from fleximmt.method.motion import MotionTokens
    from fleximmt.training.train import model_fingerprint

    first = learn_motions(toy_sized_pipe, ["right"], tmp_path, steps=2, tokens=2)["right"]
    assert first.metadata["base_model"] == model_fingerprint(toy_sized_pipe)
    path = tmp_path / "right.safetensors"
    stamp = path.stat().st_mtime_ns
    learn_motions(toy_sized_pipe, ["right"], tmp_path, steps=2, tokens=2)
    assert path.stat().st_mtime_ns == stamp  # same model: reused
    stale = MotionTokens(first.tokens * 0, **{**first.metadata, "base_model": "another-model@0123456789ab"})
    stale.save(path)
    again = learn_motions(toy_sized_pipe, ["right"], tmp_path, steps=2, tokens=2)["right"]
    assert again.metadata["base_model"] == model_fingerprint(toy_sized_pipe)
    assert torch.equal(again.tokens, first.tokens)  # learned again, seeded: the same tokens as the first time


def test_a_local_model_is_named_by_its_folder_not_its_absolute_path(toy_sized_pipe, tmp_path):
    from fleximmt.training.train import model_fingerprint

    old = toy_sized_pipe.name_or_path
    try:
        for folder in (tmp_path / "a" / "toy-model", tmp_path / "b" / "toy-model"):
            folder.mkdir(parents=True)
            toy_sized_pipe.register_to_config(_name_or_path=str(folder))
            assert model_fingerprint(toy_sized_pipe).startswith("toy-model@")
        toy_sized_pipe.register_to_config(_name_or_path="THUDM/CogVideoX-5b-I2V")
        assert model_fingerprint(toy_sized_pipe).startswith("THUDM/CogVideoX-5b-I2V@")
    finally:
        toy_sized_pipe.register_to_config(_name_or_path=old)


def test_mask_quality_knows_a_perfect_an_empty_and_a_still_mask():
    from fleximmt.method.masks import mask_to_token_grid

    case = random_case(4)
    truth = case.scene(trajectories=True).masks
    perfect = torch.stack(
        [
            torch.stack([mask_to_token_grid(torch.from_numpy(truth[k, 4 * f]), 8, 8) for f in range(5)])
            for k in range(len(case.sprites))
        ]
    )
    best = mask_quality(case, perfect)
    assert best["iou"] == pytest.approx(1.0) and best["recall"] == pytest.approx(1.0)
    assert mask_quality(case, torch.zeros_like(perfect))["recall"] == 0.0
    still = perfect[:, :1].expand_as(perfect)  # the first-frame masks everywhere: sprites move out of them
    assert 0.0 <= mask_quality(case, still)["recall"] < 1.0
    with pytest.raises(ValueError, match="masks for"):
        mask_quality(case, perfect[:1])


def test_the_bundled_reference_videos_are_the_ones_the_code_draws():
    import imageio.v3 as iio

    from fleximmt.toy.lab import REFERENCE_DIR

    for name in REFERENCES:
        frames = iio.imread(REFERENCE_DIR / f"{name}.mp4")
        drawn = reference_scene(name).frames
        assert frames.shape == drawn.shape
        assert np.abs(frames.astype(float) - drawn).mean() < 8  # h264's loss only


def test_a_sprite_given_no_motion_is_scored_against_standing_still():
    from fleximmt.toy.lab import Case
    from fleximmt.toy.world import Sprite, Trajectory

    case = Case(
        [
            Sprite("square", "red", 6.0, (18.0, 20.0), Trajectory("still"), texture_seed=3),
            Sprite("circle", "blue", 6.0, (40.0, 46.0), Trajectory("still"), texture_seed=4),
        ],
        ["right", None],
    )
    result = score(case.scene(trajectories=True).frames, case)
    assert [o["motion"] for o in result["objects"]] == ["right", "still"]
    assert result["objects"][1]["traj_err"] < 1.0 and result["leak"] == 0.0
