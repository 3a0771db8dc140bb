"""The toy base model that ships with the package: it loads, it generates what its captions say,
and a motion learned on it moves the right sprite the right way."""

import numpy as np
import pytest
import torch
from PIL import Image

from fleximmt.toy.lab import TOY_MODEL, Case, learn_motions, load_toy_pipeline, transfer
from fleximmt.toy.world import Sprite, Trajectory, colour_track, render


@pytest.fixture(scope="module")
def toy_pipe():
    return load_toy_pipeline()


def test_the_shipped_weights_are_safetensors_and_small():
    files = [p for p in TOY_MODEL.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20


def test_the_toy_model_loads_in_float32_at_its_own_size(toy_pipe):
    assert toy_pipe.transformer.dtype == torch.float32 and toy_pipe.vae.dtype == torch.float32
    assert toy_pipe.default_size() == (64, 64, 17)


def _generate(pipe, image, prompt, seed=0):
    out = pipe(
        image=Image.fromarray(image),
        prompt=prompt,
        num_inference_steps=20,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )
    return (np.asarray(out.frames[0]) * 255).round().clip(0, 255).astype(np.uint8)


def test_the_toy_model_starts_from_the_image_and_moves_a_sprite_the_way_its_caption_says(toy_pipe):
    first = render(
        [Sprite("square", "red", 6.0, (32.0, 32.0), Trajectory("still"), texture_seed=3)], 17, 64, "plain", 11
    )
    image = first.frames[0]
    moved = {}
    for motion, words in (("right", "moves right"), ("left", "moves left")):
        frames = _generate(toy_pipe, image, f"A red square {words}.")
        assert (
            np.abs(frames[0].astype(float) - image).mean() < 20
        )  # starts from the image (VAE blur ~12; random weights: noise)
        centres, _ = colour_track(frames, "red", start=(32.0, 32.0))
        found = centres[~np.isnan(centres).any(-1)]
        moved[motion] = found[-1, 0] - found[0, 0]
    assert moved["right"] > 4 and moved["left"] < -4


def test_a_motion_learned_on_the_toy_model_moves_the_sprite_the_right_way(toy_pipe, tmp_path):
    motions = learn_motions(toy_pipe, ["right"], tmp_path, steps=150, seed=0)
    assert (tmp_path / "right.safetensors").is_file() and (tmp_path / "right.gif").is_file()
    # one sprite: the toy base model does not animate scenes of 2-3 sprites (BENCHMARKS.md, toy world)
    case = Case(
        [Sprite("square", "red", 6.0, (20.0, 32.0), Trajectory("still"), texture_seed=3)], ["right"], "plain", 2
    )
    frames, masks, _ = transfer(toy_pipe, case, motions, "fleximmt", steps=20)
    red, _ = colour_track(frames, "red", start=(20.0, 32.0))
    assert not np.isnan(red).any()
    moved = red[-1] - red[0]
    assert moved[0] > 12 and abs(moved[1]) < 5  # the reference moves 1.9 px a frame: 30 px right over 16 frames
    final = masks[-1][0, -1]  # RMPM's mask of the last latent frame follows the sprite to the right
    cols = final.nonzero()[:, 1].float().mean() if final.any() else torch.tensor(0.0)
    first_cols = masks[-1][0, 0].nonzero()[:, 1].float().mean()
    assert cols > first_cols
