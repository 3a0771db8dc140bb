"""FlexiMMT Learn Motion (native) on ComfyUI 0.33's HunyuanVideo 1.5 (``fleximmt.apps.comfy.learn``), at the model
level: a tiny HunyuanVideo 1.5 I2V pipeline made by diffusers, its transformer saved under ComfyUI's (the original
checkpoint's) key names and loaded by ComfyUI's own loader. ComfyUI's double blocks add to their video and text
streams in place after their layer norms kept them for the backward pass, which autograd refuses once the text
depends on the motion tokens; the training patch hands those blocks their streams as tensors whose ``+=`` makes
a new tensor (``native.training.OutOfPlace``), so ComfyUI's block runs unchanged. The library's loop then trains
the tokens through ComfyUI's forward to ``train_motion``'s tokens on diffusers' pipeline of the same weights.
ComfyUI 0.33 only (0.3.64 has no HunyuanVideo 1.5)."""

import pytest
import torch
from comfy_hunyuan15 import comfy_model, comfy_shaped_components
from comfy_learn import jumping_square, library_and_native
from comfy_native import needs_native, relative_error
from comfy_wan import import_comfy

from fleximmt.training.train import Conditions

pytestmark = [pytest.mark.comfy, needs_native("HunyuanVideo 1.5")]

SIZE, FRAMES = 16, 9  # pixels (the tiny VAE's 4x: 4 x 4 latents and tokens); video frames (3 latent frames)
SETTINGS = dict(size=SIZE, frames=FRAMES, max_windows=2, seed=0)


@pytest.fixture(scope="module")
def pipe():
    from fleximmt.models.hunyuan15 import FlexiMMTHunyuanVideo15Pipeline

    import_comfy()
    pipe = FlexiMMTHunyuanVideo15Pipeline(**comfy_shaped_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def patcher(pipe):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(comfy_model(pipe.transformer), pipe.scheduler.config.shift)[0]


def vae():
    from comfy_learn import VaeShape

    return VaeShape(32, 4)


def valid(mask: torch.Tensor) -> int:
    """How many tokens a text mask keeps, checked to be its first ones (the padding at its end)."""
    count = int(mask.sum())
    assert bool(mask[0, :count].all()) and not bool(mask[0, count:].any())
    return count


def native_conditions(cond):
    """The library's encoded reference as ComfyUI's HunyuanVideo 1.5 takes it: diffusers pads the Qwen2.5 and ByT5
    features to fixed lengths and masks the padding, ComfyUI's encoder gives the valid tokens only (the motion
    words lie among them); the SigLIP features per window; the image latents and frame mask as the condition."""
    t = cond.tensors
    text, glyphs = valid(t["prompt_embeds_mask"]), valid(t["prompt_embeds_mask_2"])
    assert not cond.member[:, text:].any() and not cond.concept_member[:, text:].any()
    tensors = {
        "video_latents": t["video_latents"],
        "c_concat": t["condition"],
        "c_crossattn": t["prompt_embeds"][:, :text],
        "clip_fea": t["image_embeds"],
    }
    if glyphs:
        tensors["txt_byt5"] = t["prompt_embeds_2"][:, :glyphs]
    return Conditions(tensors, cond.member[:, :text], cond.concept_member[:, :text])


def test_comfyuis_double_blocks_refuse_the_backward_pass_without_the_training_patch(pipe, patcher):
    """Why the training patch hands the blocks out-of-place streams: ComfyUI's double block on its own, with a
    text stream that depends on a learnable tensor, cannot be differentiated."""
    block = patcher.model.diffusion_model.double_blocks[0]
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 16, 128, generator=gen), torch.randn(1, 5, 128, generator=gen)
    vec, learnable = torch.randn(1, 128, generator=gen), torch.zeros(1, 5, 128, requires_grad=True)
    pe = patcher.model.diffusion_model.pe_embedder(torch.zeros(1, 21, 3))
    out = block(img=img, txt=txt + learnable, vec=vec, pe=pe)
    with pytest.raises(RuntimeError, match="inplace operation"):
        (out[0].sum() + out[1].sum()).backward()


def test_tokens_learned_on_comfyuis_hunyuan15_equal_train_motions(pipe, patcher, tmp_path):
    """Three steps: DMEM's masks in every block (scored by the video queries, as HunyuanVideo 1.5's adapter
    scores them), two windows, image dropout, the frame-difference term, checkpointing through ComfyUI's
    blocks. The losses agree to 1e-5 and the tokens to 1e-4 (3.2e-5 measured): one forward of ComfyUI's model agrees
    with diffusers' to 2e-7 (the blocks sum in other orders), and AdamW divides each token's gradient by its own
    running size, which makes near-zero gradients' small differences whole steps."""
    video = jumping_square(SIZE, FRAMES + 4)
    library, native, first = library_and_native(
        pipe,
        [patcher],
        None,
        vae(),
        native_conditions,
        tmp_path,
        video,
        gradient_checkpointing=True,
        **SETTINGS,
    )
    assert relative_error(library.motion.tokens[None], first) > 1e-3
    assert relative_error(native.motion.tokens, library.motion.tokens) < 1e-4
    assert native.losses == pytest.approx(library.losses, rel=1e-5)
    assert native.motion.family == library.motion.family


def test_without_checkpointing_the_out_of_place_streams_alone_carry_the_gradient(pipe, patcher, tmp_path):
    """Checkpointing is no part of the way through the in-place adds: without it the tokens agree as well (2.5e-5)."""
    video = jumping_square(SIZE, FRAMES)
    library, native, _ = library_and_native(
        pipe,
        [patcher],
        None,
        vae(),
        native_conditions,
        tmp_path,
        video,
        steps=2,
        gradient_checkpointing=False,
        **SETTINGS,
    )
    assert relative_error(native.motion.tokens, library.motion.tokens) < 1e-4
