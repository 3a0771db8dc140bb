"""CogVideoX 1.5 (THUDM/CogVideoX1.5-5B-I2V) on a tiny random model of its shape: tokens span 2 latent
frames (padded in front), no learned positional embeddings (sizes up to the rotary grid), an ofs
embedding and the inverted image-latent scale. What is particular to 1.5, against diffusers and the
dense reference; what every family does (at 64 x 64 x 17 here) is in test_contract.py."""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from helpers import moving_square
from PIL import Image

from fleximmt import FlexiMMTPipeline, ObjectMotion
from fleximmt.evaluation.video import mask_overlay
from fleximmt.toy import random_motion, tiny_components

PROMPT = "A ball jumps up. A box slides left."
BASE = dict(num_inference_steps=3, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe():
    flexi = FlexiMMTPipeline(**tiny_components(0, version="1.5", height=64, width=64, num_frames=17))
    flexi.set_progress_bar_config(disable=True)
    return flexi


def picture(height=64, width=64, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def objects(pipe, height=64, width=64):
    masks = [np.zeros((height, width), bool) for _ in range(2)]
    masks[0][4 : height // 2, 4 : width // 2] = True
    masks[1][height // 3 :, width // 2 :] = True
    return [
        ObjectMotion(m, random_motion(pipe.transformer, 4, seed=k + 1, scale=4.0), w)
        for k, (m, w) in enumerate(zip(masks, ["jumps up", "slides left"]))
    ]


def rel(a, b):
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return ((a - b).norm() / b.norm()).item()


def test_the_token_grid_pairs_latent_frames_padded_in_front(pipe):
    grid = pipe.token_grid(64, 64, 17)  # 5 latent frames -> 6 with one in front -> 3 token frames
    assert (grid.frames, grid.height, grid.width, grid.latent_frames, grid.patch_frames) == (3, 8, 8, 5, 2)
    # diffusers' layout: [copy of l0 | l0], [l1 | l2], [l3 | l4]; video frame 0 is l0, frames 4j-3..4j are l_j
    want = [0] + [(1 + (t - 1) // 4 + 1) // 2 for t in range(1, 17)]
    assert pipe.mask_frame_index(17).tolist() == want
    assert pipe.default_size() == (64, 64, 17)  # the model's largest size here (768 x 1360 on the real 1.5)


@pytest.mark.parametrize("size", [(48, 32, 9), (32, 64, 13)])  # test_contract.py: the model's own 64 x 64 x 17
def test_without_objects_it_is_diffusers_at_other_sizes(pipe, size):
    height, width, frames = size
    vanilla = CogVideoXImageToVideoPipeline(**pipe.components)
    vanilla.set_progress_bar_config(disable=True)
    call = dict(BASE, height=height, width=width, num_frames=frames, output_type="np")
    image = picture(height, width)
    ours = pipe(image, PROMPT, generator=torch.Generator().manual_seed(0), **call).frames
    ref = vanilla(image, PROMPT, generator=torch.Generator().manual_seed(0), **call).frames
    assert ours.shape == ref.shape and rel(ours, ref) < 1e-5


@pytest.mark.parametrize("settings", [dict(), dict(mask_source="qk"), dict(rmpm_method="released", anchors=1)])
def test_auto_equals_dense_with_masks_on_token_frames_padded_in_front(pipe, settings):
    # 9 frames: 3 latent frames, one of padding in front, 2 token frames (test_contract.py: 64 x 64 x 17)
    height, width, frames = 48, 32, 9
    call = dict(
        BASE, height=height, width=width, num_frames=frames, output_type="latent", return_masks=True, **settings
    )
    image, objs = picture(height, width), objects(pipe, height, width)
    auto = pipe(image, PROMPT, generator=torch.Generator().manual_seed(0), objects=objs, **call)
    dense = pipe(image, PROMPT, generator=torch.Generator().manual_seed(0), objects=objs, mask_kernel="dense", **call)
    grid = pipe.token_grid(height, width, frames)
    assert auto.masks.shape == (1, 3, 2, grid.frames, grid.height, grid.width)
    assert rel(auto.frames, dense.frames) < 1e-4 and torch.equal(auto.masks, dense.masks)
    plain = pipe(
        image,
        PROMPT,
        generator=torch.Generator().manual_seed(0),
        **{k: v for k, v in call.items() if k != "return_masks" and k not in settings},
    )
    assert rel(auto.frames, plain.frames) > 1e-3


def test_sizes_beyond_the_rotary_grid_are_refused(pipe):
    with pytest.raises(ValueError, match="larger than this model's rotary grid allows"):
        pipe(picture(96, 64), PROMPT, height=96, width=64, objects=objects(pipe, 96, 64), **BASE)


def test_masks_overlay_on_the_decoded_video(pipe):
    out = pipe(
        picture(),
        PROMPT,
        objects=objects(pipe),
        return_masks=True,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **BASE,
    )
    frames, masks = out.frames[0], out.masks[0, -1]
    drawn = mask_overlay(frames, masks, frame_index=pipe.mask_frame_index(len(frames)))
    assert drawn.shape == (17, 64, 64, 3)
    # frame 9 shows token frame 2's mask: pixels inside it changed, pixels outside every mask did not
    big = torch.nn.functional.interpolate(masks.float(), size=(64, 64), mode="nearest").bool()
    outside = ~big[:, 2].any(0).numpy()
    frame9 = (np.asarray(frames[9]) * 255).round().clip(0, 255).astype(np.uint8)
    assert np.array_equal(drawn[9][outside], frame9[outside])
    assert (drawn[9][big[0, 2].numpy()] != frame9[big[0, 2].numpy()]).any()


def test_the_image_condition_is_scaled_as_the_pipeline_scales_it(pipe, monkeypatch):
    # 1.5's VAE divides the image latents by the scaling factor (invert_scale_latents); the cached
    # training condition must be what prepare_latents hands the transformer
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from fleximmt.training.train import TrainSettings, prepare_conditions

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)  # no draws
    frames = moving_square(17, 64, top=20, side=16, value=220)
    cond = prepare_conditions(
        pipe.adapter,
        frames,
        "A ball jumps up.",
        "ball",
        "jumps up",
        TrainSettings(max_windows=1),
        (64, 64, 17),
        None,
        0,
    )
    image = torch.from_numpy(frames[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    _, want = pipe.prepare_latents(image, 1, 4, 17, 64, 64, torch.float32, "cpu", torch.Generator().manual_seed(0))
    got = cond.tensors["image_latents"][0]
    assert got.shape == want[0].shape and cond.tensors["video_latents"].shape[1] == want.shape[1] == 6
    assert torch.allclose(got, want[0], atol=1e-5) and got[:2].abs().sum() > 0 and not got[2:].any()


def test_training_leaves_the_padding_frames_out_of_the_loss(pipe):
    # 17 frames give 5 latent frames; 1.5 pairs them in token frames, so one copy of the first goes in
    # front: the reference has 5 frames, and the loss must compare those 5, not the copy
    import contextlib

    from fleximmt.method.attention import motion_state_for
    from fleximmt.training.train import TrainSettings, prepare_conditions

    frames = moving_square(17, 64, top=20, side=16, value=220)
    settings = TrainSettings(max_windows=1)
    cond = prepare_conditions(
        pipe.adapter, frames, "A ball jumps up.", "ball", "jumps up", settings, (64, 64, 17), None, 0
    )
    assert int(cond.tensors["padding"]) == 1 and cond.tensors["video_latents"].shape[1] == 6
    grid = pipe.token_grid(64, 64, 17)
    tokens = random_motion(pipe.transformer, 4, seed=1).expert_tokens()[None]
    state = motion_state_for(tokens, cond.member, form="joint", parts=frozenset(), num_frames=grid.frames)
    state.set_video_masks(torch.ones(1, grid.size, dtype=torch.bool))
    batch = pipe.adapter.training_prediction(
        state, cond.tensors, 0, torch.Generator().manual_seed(0), 0.0, contextlib.nullcontext
    )
    assert batch.x0.shape[1] == 6 and batch.x0[:, batch.loss_frames].shape[1] == 5
    assert torch.equal(batch.x0[:, batch.loss_frames], batch.x0[:, 1:])
