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


def test_comfyuis_audio_video_gates_read_the_other_streams_level_where_the_library_reads_its_own():
    """Where native and library training part on real weights (docs/comfyui.md): one block with the audio-to-video
    gate open (one block: the video-to-audio attention's order cannot reach the video), ComfyUI's video against
    diffusers' ``use_cross_timestep`` False (the library's training) and True (its I2V sampling). With the audio
    and the video at one noise level, as in sampling, the noised frames agree with both; at the library's training
    levels (the audio at 1, the video at 0.6) with neither: ComfyUI modulates by each stream's own timestep and
    gates by the other's (measured: 2.7e-6 and 2.7e-6 at one level; 4.3e-2 against False, 1.2e-2 against True)."""
    from comfy_ltx2 import tiny_transformer
    from comfy_native import model_call

    transformer = tiny_transformer(0, num_layers=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the gate open again (tiny_transformer closes it)
        gate = transformer.av_cross_attn_video_a2v_gate.linear
        for param in (gate.weight, gate.bias, transformer.transformer_blocks[0].video_a2v_cross_attn_scale_shift_table):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    patcher = comfy_model(transformer)
    frames, side, audio_frames = 3, 4, 5
    video, audio = (
        torch.randn(1, 4, frames, side, side, generator=gen),
        torch.randn(1, 8, audio_frames, 16, generator=gen),
    )
    context = torch.randn(1, 1024, 32, generator=gen)
    image = torch.zeros(1, 1, frames, side, side)
    image[:, :, 0] = 1
    video_t = (0.6 * (1 - image)).flatten(1)
    errors = {}
    for audio_level in (0.6, 1.0):
        audio_t = torch.tensor([audio_level])
        ours = model_call(patcher, [video, audio], (video_t, audio_t), context, None, frame_rate=24.0)[0]
        for cross in (False, True):
            with torch.no_grad():
                theirs = transformer(
                    hidden_states=video.flatten(2).transpose(1, 2),
                    audio_hidden_states=audio.permute(0, 2, 1, 3).flatten(2),
                    encoder_hidden_states=context[..., :16],
                    audio_encoder_hidden_states=context[..., 16:],
                    timestep=video_t * 1000,
                    audio_timestep=audio_t * 1000,
                    sigma=torch.tensor([600.0]),
                    audio_sigma=audio_t * 1000,
                    num_frames=frames,
                    height=side,
                    width=side,
                    fps=24.0,
                    audio_num_frames=audio_frames,
                    use_cross_timestep=cross,
                    return_dict=False,
                )[0]
            theirs = theirs.transpose(1, 2).unflatten(2, (frames, side, side))
            errors[audio_level, cross] = relative_error(ours[:, :, 1:], theirs[:, :, 1:])  # the noised frames
    assert errors[0.6, False] < 1e-5 and errors[0.6, True] < 1e-5
    assert errors[1.0, False] > 1e-2 and errors[1.0, True] > 1e-2
