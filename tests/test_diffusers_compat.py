"""FlexiMMTPipeline as a drop-in for diffusers' CogVideoXImageToVideoPipeline, where CogVideoX has its own
ways: positional calls, its own arguments and frame counts (objects=[] gives diffusers' own result),
batches and videos per prompt, callbacks, VAE tiling, dtypes, pickled weights - each keeps FlexiMMT
working or is refused with a clear message. What every family does (the signature, objects=[] on the
common inputs, offload, fused projections, save/load and from_pipe) is in test_contract.py."""

import logging
from typing import ClassVar

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from PIL import Image

from fleximmt import FlexiMMTPipeline, ObjectMotion
from fleximmt.toy import random_motion, tiny_components, tiny_pipeline

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def vanilla(pipe):
    ref = CogVideoXImageToVideoPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    return ref


def picture(seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(32, 32, 3) * 255).astype(np.uint8))


def box(y0, y1, x0, x1):
    m = np.zeros((32, 32), bool)
    m[y0:y1, x0:x1] = True
    return m


def objects(pipe, d_m=4):
    masks = [box(2, 14, 2, 14), box(10, 30, 12, 30)]
    return [
        ObjectMotion(masks[k], random_motion(pipe.transformer, d_m, seed=k + 1, scale=4.0), WORDS[k]) for k in range(2)
    ]


def rel(a, b):
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return ((a - b).norm() / b.norm()).item()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


BASE = dict(num_inference_steps=2, max_sequence_length=16, output_type="latent", num_frames=9)


def test_positional_calls_mean_what_they_mean_in_diffusers(pipe, vanilla):
    image = picture()
    ours = pipe(
        image, PROMPT, "blurry", None, None, 9, 2, generator=gen(), output_type="latent", max_sequence_length=16
    )
    ref = vanilla(
        image, PROMPT, "blurry", None, None, 9, 2, generator=gen(), output_type="latent", max_sequence_length=16
    )
    assert rel(ours.frames, ref.frames) < 1e-5
    other = vanilla(
        image, PROMPT, None, None, None, 9, 2, generator=gen(), output_type="latent", max_sequence_length=16
    )
    assert rel(other.frames, ref.frames) > 1e-4  # the third argument really is the negative prompt


@pytest.mark.parametrize(
    "extra",
    [  # CogVideoX's own arguments, output types and frame counts (test_contract.py: what every family takes)
        dict(use_dynamic_cfg=True),
        dict(eta=0.5),
        dict(output_type="pt"),
        dict(output_type="pil"),
        dict(num_frames=13),
        dict(num_frames=5),
        dict(num_frames=1),
    ],
    ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()),
)
def test_without_objects_every_input_gives_diffusers_result(pipe, vanilla, extra):
    image = picture()
    call = {**BASE, **extra}
    ours = pipe(image=image, prompt=PROMPT, generator=gen(), **call)
    ref = vanilla(image=image, prompt=PROMPT, generator=gen(), **call)
    ours, ref = (o[0] if isinstance(o, tuple) else o.frames for o in (ours, ref))
    if call["output_type"] == "pil":
        ours, ref = np.stack([np.asarray(f) for f in ours[0]]), np.stack([np.asarray(f) for f in ref[0]])
    assert np.asarray(ours).shape == np.asarray(ref).shape
    assert rel(ours, ref) < 1e-5


def test_what_diffusers_refuses_is_refused_the_same_way(pipe, vanilla):
    # CogVideoX's schedulers take no custom timesteps: diffusers says so, with or without objects
    for runner, extra in ((vanilla, {}), (pipe, {}), (pipe, {"objects": objects(pipe)})):
        with pytest.raises(ValueError, match="does not support custom timestep"):
            runner(picture(), PROMPT, timesteps=[999, 500], **BASE, **extra)


def test_without_objects_embeddings_and_latents_give_diffusers_result(pipe, vanilla):
    image = picture()
    embeds, negative = vanilla.encode_prompt(PROMPT, "blurry", max_sequence_length=16, device="cpu")
    latents = torch.randn(1, 3, 4, 8, 8, generator=gen(5))
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents, **BASE)
    ours = pipe(image, generator=gen(), **call).frames
    assert rel(ours, vanilla(image, generator=gen(), **call).frames) < 1e-5
    # with objects, the prompt's text is needed to find the motion words
    with pytest.raises(ValueError, match="pass prompt="):
        pipe(image, generator=gen(), objects=objects(pipe), **call)


def test_frame_counts_that_are_not_8k_plus_1_work_with_objects_as_in_diffusers(pipe, vanilla, caplog):
    image = picture()
    call = dict(BASE, num_frames=13, output_type="np")
    ref = vanilla(image=image, prompt=PROMPT, generator=gen(), **call).frames
    with caplog.at_level(logging.WARNING):
        out = pipe(image=image, prompt=PROMPT, generator=gen(), objects=objects(pipe), return_masks=True, **call)
    assert out.frames.shape == ref.shape  # diffusers decodes 16 frames for 13: so do we
    assert f"decodes {ref.shape[1]} frames" in caplog.text
    assert out.masks.shape[3] == 4  # (13 - 1) // 4 + 1 latent frames
    dense = pipe(
        image=image,
        prompt=PROMPT,
        generator=gen(),
        objects=objects(pipe),
        return_masks=True,
        mask_kernel="dense",
        **call,
    )
    assert rel(out.frames, dense.frames) < 1e-4


def test_num_videos_per_prompt_is_honoured_like_repeated_prompts(pipe, vanilla):
    image = picture()
    gens = lambda: [gen(1), gen(2)]
    # diffusers' CogVideoX I2V sets num_videos_per_prompt to 1; we repeat prompt and image instead
    ours = pipe(image, PROMPT, num_videos_per_prompt=2, generator=gens(), **BASE).frames
    ref = vanilla([image, image], [PROMPT, PROMPT], generator=gens(), **BASE).frames
    assert ours.shape[0] == 2 and rel(ours, ref) < 1e-5
    with_objects = pipe(
        image, PROMPT, num_videos_per_prompt=2, generator=gens(), objects=objects(pipe), return_masks=True, **BASE
    )
    assert with_objects.frames.shape[0] == 2 and with_objects.masks.shape[0] == 2


def test_a_batch_with_objects_equals_the_same_calls_one_by_one(pipe):
    images = [picture(0), picture(1)]
    prompts = [PROMPT, "A box slides left. A ball jumps up."]
    objs = objects(pipe)
    batch = pipe(images, prompts, generator=[gen(1), gen(2)], objects=objs, return_masks=True, **BASE)
    for v in range(2):
        alone = pipe(images[v], prompts[v], generator=gen(v + 1), objects=objs, return_masks=True, **BASE)
        assert rel(batch.frames[v : v + 1], alone.frames) < 1e-5
        assert torch.equal(batch.masks[v], alone.masks[0])
    # one image serves several prompts (diffusers needs one image per prompt)
    shared = pipe(images[0], prompts, generator=[gen(1), gen(2)], objects=objs, **BASE).frames
    assert rel(shared[:1], batch.frames[:1]) < 1e-5


def test_each_prompt_may_have_its_own_objects(pipe):
    image = picture()
    objs = objects(pipe)
    swapped = [
        ObjectMotion(objs[0].mask_tensor, objs[1].motion, WORDS[0]),
        ObjectMotion(objs[1].mask_tensor, objs[0].motion, WORDS[1]),
    ]
    batch = pipe([image, image], [PROMPT, PROMPT], generator=[gen(1), gen(1)], objects=[objs, swapped], **BASE).frames
    assert rel(batch[:1], pipe(image, PROMPT, generator=gen(1), objects=objs, **BASE).frames) < 1e-5
    assert rel(batch[1:], pipe(image, PROMPT, generator=gen(1), objects=swapped, **BASE).frames) < 1e-5
    assert rel(batch[:1], batch[1:]) > 1e-4
    with pytest.raises(ValueError, match="one list per prompt"):
        pipe(image, PROMPT, objects=[objs, swapped], **BASE)
    with pytest.raises(ValueError, match="as many objects"):
        pipe([image, image], [PROMPT, PROMPT], objects=[objs, objs[:1]], **BASE)


class ScaleLatents(PipelineCallback):
    """Multiplies the latents by ``factor`` after step ``at`` and records what it was given."""

    tensor_inputs: ClassVar[list[str]] = ["latents", "prompt_embeds"]

    def __init__(self, at=0, factor=0.5):
        super().__init__(cutoff_step_ratio=None, cutoff_step_index=at)
        self.at, self.factor, self.seen = at, factor, []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen.append(sorted(callback_kwargs))
        if step_index == self.at:  # diffusers' callbacks hand the (changed) kwargs on to the next one
            callback_kwargs["latents"] = callback_kwargs["latents"] * self.factor
        return callback_kwargs


def test_pipeline_callbacks_get_their_tensor_inputs_as_in_diffusers(pipe, vanilla):
    image = picture()
    for make in (lambda: ScaleLatents(), lambda: MultiPipelineCallbacks([ScaleLatents(), ScaleLatents(1, 2.0)])):
        ours_cb, ref_cb = make(), make()
        ours = pipe(image, PROMPT, generator=gen(), callback_on_step_end=ours_cb, **BASE).frames
        ref = vanilla(image, PROMPT, generator=gen(), callback_on_step_end=ref_cb, **BASE).frames
        assert rel(ours, ref) < 1e-5
        flexi_cb = make()
        out = pipe(image, PROMPT, generator=gen(), callback_on_step_end=flexi_cb, objects=objects(pipe), **BASE).frames
        plain_run = pipe(image, PROMPT, generator=gen(), objects=objects(pipe), **BASE).frames
        assert rel(out, plain_run) > 1e-3  # the callback's latents were used
        callbacks = flexi_cb.callbacks if isinstance(flexi_cb, MultiPipelineCallbacks) else [flexi_cb]
        assert callbacks[0].seen == [["latents", "prompt_embeds"]] * 2


def test_vae_tiling_and_slicing_give_diffusers_result():
    image = picture()
    flexi = tiny_pipeline(0)
    flexi.vae.enable_tiling(
        tile_sample_min_height=16,
        tile_sample_min_width=16,
        tile_overlap_factor_height=0.25,
        tile_overlap_factor_width=0.25,
    )  # tiles that really split a 32 x 32 video
    flexi.vae.enable_slicing()
    ref = CogVideoXImageToVideoPipeline(**flexi.components)
    ref.set_progress_bar_config(disable=True)
    call = dict(BASE, output_type="np")
    assert (
        rel(flexi(image, PROMPT, generator=gen(), **call).frames, ref(image, PROMPT, generator=gen(), **call).frames)
        < 1e-5
    )
    out = flexi(image, PROMPT, generator=gen(), objects=objects(flexi), **call).frames
    assert np.isfinite(out).all() and out.shape == (1, 9, 32, 32, 3)


def test_another_dtype_carries_the_motion_tokens_along():
    image = picture()
    flexi = tiny_pipeline(0)
    flexi.to(torch.float64)  # (noise drawn in float64 differs from float32's, so compare within float64)
    got = flexi(image, PROMPT, generator=gen(), objects=objects(flexi), **BASE).frames  # float32 motion files
    dense = flexi(image, PROMPT, generator=gen(), objects=objects(flexi), mask_kernel="dense", **BASE).frames
    plain = flexi(image, PROMPT, generator=gen(), **BASE).frames
    assert got.dtype == torch.float64 and rel(got, dense) < 1e-10 and rel(got, plain) > 1e-3


def test_a_text_to_video_transformer_is_refused_with_objects():
    comps = tiny_components(0)
    from diffusers import CogVideoXTransformer3DModel

    cfg = dict(comps["transformer"].config)
    cfg["in_channels"] = cfg["out_channels"]  # a text-to-video model's input
    comps["transformer"] = CogVideoXTransformer3DModel.from_config(cfg)
    flexi = FlexiMMTPipeline(**comps)
    with pytest.raises(ValueError, match="not the 8 of an image-to-video model"):
        flexi(picture(), PROMPT, objects=objects(flexi), **BASE)


def test_a_folder_of_pickled_weights_is_refused_with_how_to_convert(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model", safe_serialization=False)
    assert list((tmp_path / "model" / "transformer").glob("*.bin"))
    with pytest.raises(ValueError, match=r"pickled weights only.*safetensors only.*save_pretrained"):
        FlexiMMTPipeline.from_pretrained(str(tmp_path / "model"))
    with pytest.raises(ValueError, match="use_safetensors=False"):
        FlexiMMTPipeline.from_pretrained(str(tmp_path / "model"), use_safetensors=False)
