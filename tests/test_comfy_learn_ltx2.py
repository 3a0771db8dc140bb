"""FlexiMMT Learn Motion (native) on ComfyUI 0.33's LTX-2 (``fleximmt.apps.comfy.learn``), at the model level: a
tiny LTX-2 image-to-video pipeline made by diffusers around a transformer of ComfyUI's shape
(``comfy_ltx2.comfy_shaped_components``), the transformer saved under ComfyUI's key names and loaded by ComfyUI's own
loader. The library's loop trains the tokens through ComfyUI's forward with ``train_motion``'s objective: the image's
first latent frame clean at timestep 0 and out of the loss, the audio pure noise at noise level 1, the noise level
shifted by the video's token count, DMEM's masks in every block. ComfyUI's audio-video blocks change their streams
in place after reading them (``vx.addcmul_`` after ``rms_norm(vx)``), which autograd refuses once the video depends
on the motion tokens; the training patch hands the blocks copies that keep what autograd saved
(``native.training.CopyOnRead``). The tokens end on ``train_motion``'s, on diffusers' pipeline of the same weights.
ComfyUI 0.33 only (0.3.64 has no LTX-2)."""

import pytest
import torch
from comfy_learn import VaeShape, jumping_square, library_and_native, pipeline_moved
from comfy_ltx2 import SHAPE, comfy_model, comfy_shaped_components
from comfy_native import needs_native, relative_error
from comfy_wan import import_comfy

from fleximmt import MotionTokens
from fleximmt.training.train import Conditions

pytestmark = [pytest.mark.comfy, needs_native("LTX-2")]

SIZE, FRAMES = 32, 9  # pixels (the tiny VAE's 8x: 4 x 4 latents and tokens); video frames (its 2x: 5 latent frames)
SETTINGS = dict(size=SIZE, frames=FRAMES, max_windows=2, seed=0)


@pytest.fixture(scope="module")
def pipe():
    from fleximmt.models.ltx2 import FlexiMMTLTX2ImageToVideoPipeline

    import_comfy()
    pipe = FlexiMMTLTX2ImageToVideoPipeline(**comfy_shaped_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def patcher(pipe):
    return comfy_model(pipe.transformer)


def vae():
    return VaeShape(SHAPE["in_channels"], 8, 2)  # the tiny diffusers VAE's compression


def native_conditions(cond):
    """The library's encoded reference as ComfyUI's LTX-2 takes it: the latents as they are (``[W, C, F, h, w]``,
    the image's own encoding as the first frame), the connectors' video and audio text side by side (ComfyUI's
    ``c_crossattn``), whose keys the registers leave all open (ComfyUI passes no mask then)."""
    t = cond.tensors
    assert bool(t["prompt_mask"].all())
    tensors = {
        "video_latents": t["video_latents"],
        "c_crossattn": torch.cat([t["prompt_embeds"], t["audio_prompt_embeds"]], dim=-1),
    }
    return Conditions(tensors, cond.member, cond.concept_member)


def test_comfyuis_audio_video_block_refuses_the_backward_pass_without_the_training_patch(patcher):
    """Why the training patch hands the blocks copies: ComfyUI's block on its own, with a video stream that depends
    on a learnable tensor, cannot be differentiated (it changes the stream in place after its norm kept it)."""
    import comfy.model_management as mm

    block = patcher.model.diffusion_model.transformer_blocks[0]
    gen = torch.Generator().manual_seed(0)
    video, audio = torch.randn(1, 16, 16, generator=gen), torch.randn(1, 5, 8, generator=gen)
    learnable = torch.zeros(1, 16, 16, requires_grad=True)
    table = lambda rows: torch.randn(1, 1, rows.numel(), generator=gen)  # a modulation per row of the block's table
    mm.in_training, was = True, mm.in_training
    try:
        vx, _ = block(
            (video + learnable, audio),
            v_context=torch.randn(1, 6, 16, generator=gen),
            a_context=torch.randn(1, 6, 8, generator=gen),
            v_timestep=table(block.scale_shift_table),
            a_timestep=table(block.audio_scale_shift_table),
            transformer_options={"run_ax": False, "a2v_cross_attn": False},  # the video stream alone
        )
        with pytest.raises(RuntimeError, match="inplace operation"):
            vx.sum().backward()
    finally:
        mm.in_training = was


@pytest.mark.parametrize("checkpointing", [True, False])
def test_tokens_learned_on_comfyuis_ltx2_equal_train_motions(pipe, patcher, tmp_path, monkeypatch, checkpointing):
    """Three steps: DMEM's masks in every block, two windows, the frame-difference term, image dropout at 0.5 (its
    draws drop the image in steps 1 and 3: LTX-2's own text-to-video, the image's frame noised and scored too, and
    keep it in step 2), with and without checkpointing through ComfyUI's blocks. The tiny models close the
    audio-to-video gate (comfy_ltx2's docstring), so the video's prediction does not depend on the audio stream,
    where ComfyUI's and diffusers' forwards differ. The losses agree to 1e-5 (4.8e-7 measured) and the tokens to
    1e-5 (2.9e-6 measured): ComfyUI's blocks and diffusers' sum in other orders, and AdamW's normalised steps carry
    that into the tokens."""
    from fleximmt.apps.comfy.native.training import NativeTraining

    scored, predict = [], NativeTraining.training_prediction

    def spy(self, *args, **kwargs):
        batch = predict(self, *args, **kwargs)
        scored.append(batch.loss_frames.start)
        return batch

    monkeypatch.setattr(NativeTraining, "training_prediction", spy)
    video = jumping_square(SIZE, FRAMES + 4)
    library, native, first = library_and_native(
        pipe,
        [patcher],
        None,
        vae(),
        native_conditions,
        tmp_path,
        video,
        image_dropout=0.5,
        gradient_checkpointing=checkpointing,
        **SETTINGS,
    )
    assert scored == [0, 1, 0]  # the image's frame scored where it was dropped, left out where it was given
    assert relative_error(library.motion.tokens[None], first) > 1e-3  # the tokens moved
    assert relative_error(native.motion.tokens, library.motion.tokens) < 1e-5
    assert native.losses == pytest.approx(library.losses, rel=1e-5)
    assert native.motion.family == library.motion.family == "ltx2"
    assert "forward" not in vars(patcher.model.diffusion_model.transformer_blocks[0])  # the injection is undone


def test_a_motion_learned_natively_drives_fleximmts_diffusers_ltx2_pipeline(pipe, patcher, tmp_path):
    """(A motion ``train_motion`` learned drives ComfyUI's patched LTX-2: test_comfy_native_ltx2.py.)"""
    video = jumping_square(SIZE, FRAMES)
    library_and_native(pipe, [patcher], None, vae(), native_conditions, tmp_path, video, steps=2, **SETTINGS)
    motion = MotionTokens.load(tmp_path / "native.safetensors")
    assert motion.family == "ltx2" and motion.metadata["base_model"].startswith("comfyui-ltx2@")
    assert pipeline_moved(pipe, video, motion) > 1e-4  # the motion changed the video
