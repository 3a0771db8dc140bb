"""The toy world's ground truth matches what is drawn."""

import numpy as np
import pytest

from fleximmt.toy.world import MOTIONS, WORDS, Sprite, Trajectory, random_scene, render


def test_scenes_are_deterministic_from_the_seed():
    a, b, c = random_scene(3), random_scene(3), random_scene(4)
    assert np.array_equal(a.frames, b.frames) and a.caption == b.caption
    assert not np.array_equal(a.frames, c.frames)


@pytest.mark.parametrize("seed", range(12))
def test_masks_and_positions_match_the_drawn_pixels(seed):
    scene = random_scene(seed)
    background = render(
        [], frames=len(scene.frames), size=scene.frames.shape[1], background=scene.background, seed=seed
    ).frames
    changed = (scene.frames != background).any(-1)
    union = scene.masks.any(0)
    assert not (changed & ~union).any()  # nothing is drawn outside the masks
    extent = np.array([sp.size for sp in scene.sprites])[:, None] * scene.scales * 1.3  # [K, T]
    for k in range(len(scene.sprites)):
        for f in range(len(scene.frames)):
            ys, xs = np.nonzero(scene.masks[k, f])
            if len(xs) == 0:
                continue
            cx, cy = scene.positions[k, f]
            # every visible pixel lies within the sprite's extent around its position
            assert (
                np.abs(xs + 0.5 - cx).max() <= extent[k, f] + 0.5 and np.abs(ys + 0.5 - cy).max() <= extent[k, f] + 0.5
            )
            others = [j for j in range(len(scene.sprites)) if j != k]
            apart = all(
                np.hypot(*(scene.positions[j, f] - scene.positions[k, f])) > extent[j, f] + extent[k, f] + 1
                for j in others
            )
            inside = xs.min() > 0 and ys.min() > 0 and xs.max() < 63 and ys.max() < 63
            if apart and inside:  # unoccluded and uncut: the position is the centre of the drawn box
                assert abs((xs.min() + xs.max() + 1) / 2 - cx) <= 1.0
                assert abs((ys.min() + ys.max() + 1) / 2 - cy) <= 1.0


@pytest.mark.parametrize(
    "name, axis, sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1), ("zigzag", 0, 1)]
)
def test_named_motions_move_the_way_their_words_say(name, axis, sign):
    sprite = Sprite("square", "red", 6, (32, 32), Trajectory(name))
    scene = render([sprite], frames=9)
    ys, xs = np.nonzero(scene.masks[0, -1])
    ys0, xs0 = np.nonzero(scene.masks[0, 0])
    moved = (xs.mean() - xs0.mean(), ys.mean() - ys0.mean())[axis]
    assert sign * moved > 5


def test_size_changes_and_still_sprites():
    grow = render([Sprite("circle", "blue", 6, (32, 32), Trajectory("grow"))], frames=9)
    shrink = render([Sprite("circle", "blue", 6, (32, 32), Trajectory("shrink"))], frames=9)
    still = render([Sprite("circle", "blue", 6, (32, 32), Trajectory("still"))], frames=9)
    assert grow.masks[0, -1].sum() > 1.3 * grow.masks[0, 0].sum()
    assert shrink.masks[0, -1].sum() < 0.8 * shrink.masks[0, 0].sum()
    assert (still.masks[0] == still.masks[0, :1]).all()


def test_captions_name_every_sprite_in_the_world_vocabulary():
    for seed in range(20):
        scene = random_scene(seed)
        for sprite in scene.sprites:
            assert sprite.phrase in scene.caption and MOTIONS[sprite.trajectory.name] in scene.caption
        assert set(scene.caption.replace(".", " . ").split()) <= set(WORDS)
