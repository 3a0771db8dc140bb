"""FlexiMMT Learn Motion (native) (``fleximmt.apps.comfy.learn``): motion tokens trained through ComfyUI's own
CogVideoX 1.5, at the model level. A tiny CogVideoX 1.5 I2V made by diffusers and saved under ComfyUI's key
names is loaded by ComfyUI's own loader; the library's loop (``fit_tokens``) trains the tokens through
ComfyUI's forward (``BaseModel.apply_model``, the training patch, gradient checkpointing through ComfyUI's
blocks) and ends on the tokens ``train_motion`` learns on diffusers' model of the same weights. A run
stopped by its callback leaves a checkpoint a second run resumes; the motion file is the library's.
ComfyUI 0.33 only (0.3.64 has no CogVideoX); Wan and HunyuanVideo 1.5: ``test_comfy_learn_wan.py``,
``test_comfy_learn_hunyuan15.py``; through a server: ``test_comfy_learn_server.py``."""

import pytest
import torch
from comfy_cogvideox import SHAPE, TEXT, T5Clip, comfy_model
from comfy_learn import CAPTION, CONCEPT, MOTION, VaeShape, jumping_square, library_and_native, pipeline_moved
from comfy_native import needs_native, relative_error

from fleximmt import MotionTokens
from fleximmt.errors import FlexiMMTInputError
from fleximmt.models.cogvideox import FlexiMMTPipeline
from fleximmt.toy.tiny import tiny_components
from fleximmt.training.train import Conditions

pytestmark = [pytest.mark.comfy, needs_native("CogVideoX")]

SIZE, FRAMES = 32, 9  # pixels (the tiny VAE's 4x: 8 x 8 latents); video frames (3 latent frames, one padded in front)
SETTINGS = dict(size=SIZE, frames=FRAMES, max_windows=2, seed=0)


@pytest.fixture(scope="module")
def pipe():
    """A tiny CogVideoX 1.5 I2V pipeline with CogVideoX 1.5's scheduler (zero terminal SNR, no SNR shift), the
    schedule ComfyUI's CogVideoX samples with."""
    from diffusers import CogVideoXDDIMScheduler

    pipe = FlexiMMTPipeline(**tiny_components(0, height=SIZE, width=SIZE, num_frames=13, text_len=TEXT, **SHAPE))
    pipe.scheduler = CogVideoXDDIMScheduler(snr_shift_scale=1.0, rescale_betas_zero_snr=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def patcher(pipe):
    return comfy_model(pipe.transformer)


@pytest.fixture(scope="module")
def clip():
    return T5Clip()


def vae():
    return VaeShape(SHAPE["latent_channels"], 4)


def native_conditions(cond):
    """The library's encoded reference as ComfyUI's CogVideoX takes it: latents [W, C, F, h, w] (the library's
    are frames second), the image latents as the concatenated condition, the T5 features as the cross
    attention's text, CogVideoX 1.5's ofs, and the latent frames CogVideoX 1.5's padding put in front (left
    out of the loss, as the library leaves them)."""
    t = cond.tensors
    tensors = {
        "video_latents": t["video_latents"].permute(0, 2, 1, 3, 4),
        "c_concat": t["image_latents"].permute(0, 2, 1, 3, 4),
        "c_crossattn": t["prompt_embeds"],
        "ofs": torch.tensor([2.0]),
        "loss_from": t["padding"],
    }
    return Conditions(tensors, cond.member, cond.concept_member)


def test_comfyuis_cogvideox_schedule_is_the_one_the_library_trains_with(pipe, patcher):
    """ComfyUI's sigmas are CogVideoX 1.5's alphas (its terminal one kept just above 0, diffusers' 0)."""
    sigmas = patcher.get_model_object("model_sampling").sigmas.double()
    ours, theirs = 1 / (1 + sigmas**2), pipe.scheduler.alphas_cumprod.double()
    assert ((ours[:-1] - theirs[:-1]).abs() / theirs[:-1]).max() < 1e-6
    assert theirs[-1] == 0 and 0 < ours[-1] < 1e-7


def test_tokens_learned_on_comfyuis_cogvideox_equal_train_motions(pipe, patcher, clip, tmp_path):
    """Three steps from the same tokens, seed and reference: DMEM's masks in every block, two windows, image
    dropout and the frame-difference term, gradient checkpointing through ComfyUI's blocks (the library's run
    keeps its activations). The tokens agree to 1e-5: ComfyUI's blocks and diffusers' sum in other orders
    (one forward agrees to about 2e-7), which AdamW's normalised steps carry into the tokens."""
    video = jumping_square(SIZE, FRAMES + 4)
    library, native, first = library_and_native(
        pipe, [patcher], clip, vae(), native_conditions, tmp_path, video, gradient_checkpointing=True, **SETTINGS
    )
    assert relative_error(library.motion.tokens[None], first) > 1e-3  # the tokens moved
    assert relative_error(native.motion.tokens, library.motion.tokens) < 1e-5
    assert native.losses == pytest.approx(library.losses, rel=1e-5)
    loaded = MotionTokens.load(tmp_path / "native.safetensors")  # the library's motion file
    assert torch.equal(loaded.tokens, native.motion.tokens)
    assert loaded.family == "cogvideox" and loaded.metadata["base_model"].startswith("comfyui-cogvideox@")
    assert (loaded.caption, loaded.concept_words, loaded.motion_words) == (CAPTION, CONCEPT, MOTION)
    assert not (tmp_path / "native.ckpt.safetensors").with_name("native.latents.safetensors").exists()


def test_gradient_checkpointing_recomputes_comfyuis_blocks_and_changes_no_gradient(pipe, patcher, clip, tmp_path):
    """With checkpointing each block runs twice a step (its forward, then again in the backward pass), without it
    once; the tokens are the same (float32 on a CPU: the recomputation is exact)."""
    video = jumping_square(SIZE, FRAMES)
    calls = []
    block = patcher.model.diffusion_model.blocks[0]
    hook = block.ff_out.register_forward_hook(lambda *_: calls.append(1))  # a layer inside ComfyUI's block
    try:
        runs = {}
        for checkpointing in (False, True):
            calls.clear()
            _, native, _ = library_and_native(
                pipe,
                [patcher],
                clip,
                vae(),
                native_conditions,
                tmp_path / str(checkpointing),
                video,
                steps=2,
                gradient_checkpointing=checkpointing,
                **SETTINGS,
            )
            runs[checkpointing] = native.motion.tokens, len(calls)
    finally:
        hook.remove()
    assert runs[False][1] == 2 and runs[True][1] == 4  # two steps: one forward each, or a forward and its recomputation
    assert torch.equal(runs[True][0], runs[False][0])
    assert "forward" not in vars(block)  # the training patch's injection is undone when the run ends


def test_a_stopped_run_leaves_a_checkpoint_and_a_second_run_ends_on_the_uninterrupted_tokens(
    pipe, patcher, clip, tmp_path
):
    from fleximmt.apps.comfy.learn import learn_native
    from fleximmt.models import adapter_for
    from fleximmt.training.train import TrainSettings, prepare_conditions

    video = jumping_square(SIZE, FRAMES)
    settings = dict(steps=4, tokens_per_motion=4, lr_warmup_steps=0, height=SIZE, width=SIZE, num_frames=FRAMES)
    cond = prepare_conditions(
        adapter_for(pipe), video, CAPTION, CONCEPT, MOTION, TrainSettings(**settings), (SIZE, SIZE, FRAMES), None, 0
    )
    conditions = native_conditions(cond)

    def learn(path, **kw):
        return learn_native(
            [patcher], clip, vae(), None, CAPTION, CONCEPT, MOTION, path, conditions=conditions, **settings, **kw
        )

    whole = learn(tmp_path / "whole.safetensors")

    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt  # what ComfyUI's cancel raises in the node's callback (an exception)

    with pytest.raises(KeyboardInterrupt):
        learn(tmp_path / "stopped.safetensors", callback=stop)
    assert (tmp_path / "stopped.ckpt.safetensors").is_file() and not (tmp_path / "stopped.safetensors").exists()
    resumed = learn(tmp_path / "stopped.safetensors", resume=True)
    assert len(resumed.losses) == 2  # steps 3 and 4 only
    assert torch.equal(resumed.motion.tokens, whole.motion.tokens)
    assert resumed.losses == whole.losses[2:]
    with pytest.raises(FlexiMMTInputError, match="different settings"):  # a checkpoint of other settings is refused
        learn_native(
            [patcher],
            clip,
            vae(),
            None,
            CAPTION,
            CONCEPT,
            MOTION,
            tmp_path / "stopped.safetensors",
            conditions=conditions,
            resume=True,
            **{**settings, "lr": 1e-2},
        )


def test_training_with_comfyui_streaming_the_weights_ends_on_the_same_tokens(
    pipe, patcher, clip, tmp_path, monkeypatch
):
    """When the weights do not fit, ComfyUI loads the model partially (``lowvram_model_memory``): every layer then
    casts its weights in each call. Training asks ComfyUI's model management for each step's model; loaded that
    way, forward and checkpointed backward, it ends on the tokens of a full load."""
    import comfy.model_management as mm

    video = jumping_square(SIZE, FRAMES)
    full = library_and_native(
        pipe, [patcher], clip, vae(), native_conditions, tmp_path / "a", video, steps=2, **SETTINGS
    )
    loaded, streamed_layers = [], []

    def partial_load(models, *args, **kwargs):  # LoadedModel.model_load's partial load, a CPU has no VRAM to run out of
        for model in models:
            if model not in loaded:
                model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1, load_weights=True)
                loaded.append(model)
        layers = loaded[-1].model.diffusion_model.modules()
        streamed_layers.append(sum(bool(getattr(m, "comfy_cast_weights", False)) for m in layers))

    monkeypatch.setattr(mm, "load_models_gpu", partial_load)
    try:
        _, streamed, _ = library_and_native(
            pipe, [patcher], clip, vae(), native_conditions, tmp_path / "b", video, steps=2, **SETTINGS
        )
    finally:
        for model in loaded:
            model.unpatch_model()
    assert len(streamed_layers) == 2 and min(streamed_layers) > 10  # every step ran with its layers streamed
    assert relative_error(streamed.motion.tokens, full[1].motion.tokens) < 1e-6


def test_a_motion_learned_natively_drives_fleximmts_diffusers_pipeline_and_inspect_reads_it(
    pipe, clip, tmp_path, capsys
):
    import json

    from fleximmt.apps.cli import main

    video = jumping_square(SIZE, FRAMES)
    patcher = comfy_model(pipe.transformer)
    library_and_native(pipe, [patcher], clip, vae(), native_conditions, tmp_path, video, steps=2, **SETTINGS)
    motion = MotionTokens.load(tmp_path / "native.safetensors")
    assert pipeline_moved(pipe, video, motion) > 1e-4  # the motion changed the video
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "native.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["blocks"], info["d_m"], info["dim"]) == (SHAPE["num_layers"], 4, 128)


def test_bad_inputs_are_refused_by_name(pipe, patcher, clip, tmp_path):
    from fleximmt.apps.comfy.learn import learn_native

    video = jumping_square(SIZE, FRAMES)

    def learn(models=(patcher,), frames=video, **kw):
        return learn_native(
            list(models), clip, vae(), frames, CAPTION, CONCEPT, MOTION, tmp_path / "m.safetensors", **kw
        )

    with pytest.raises(FlexiMMTInputError, match="multiples of 8"):  # the tiny VAE's 4x, CogVideoX's patch of 2
        learn(height=20, width=SIZE, num_frames=FRAMES)
    with pytest.raises(FlexiMMTInputError, match="4k\\+1"):
        learn(num_frames=8)
    with pytest.raises(FlexiMMTInputError, match="low-noise expert"):
        learn(models=(patcher, patcher, patcher), num_frames=FRAMES)
    with pytest.raises(FlexiMMTInputError, match="unknown training setting"):
        learn(num_frames=FRAMES, warmup=3)
    with pytest.raises(FlexiMMTInputError, match="frames but training needs"):
        learn(frames=video[:5], num_frames=FRAMES)

    class FrameByFrame(VaeShape):  # as ComfyUI's image VAEs (HunyuanImage 2.1's) encode a video: each frame apart
        def encode(self, image):
            return torch.zeros(image.shape[0], self.latent_channels, 1, image.shape[1] // 4, image.shape[2] // 4)

    with pytest.raises(FlexiMMTInputError, match=r"not one video's .*load CogVideoX.*own video VAE"):
        learn_native(
            [patcher],
            clip,
            FrameByFrame(SHAPE["latent_channels"], 4),
            video,
            CAPTION,
            CONCEPT,
            MOTION,
            tmp_path / "m.safetensors",
            num_frames=FRAMES,
        )


def test_a_model_loaded_and_learned_on_inside_inference_mode_trains_as_outside(pipe, clip, tmp_path):
    """ComfyUI runs its loaders and nodes under ``torch.inference_mode()``, whose weights autograd refuses to keep
    for a backward pass: the MODEL loaded there, its reference encoded there, Learn run there, gives the tokens
    of the same run outside it."""
    from fleximmt.apps.comfy.learn import learn_native
    from fleximmt.models import adapter_for
    from fleximmt.training.train import TrainSettings, prepare_conditions

    video = jumping_square(SIZE, FRAMES)
    settings = dict(steps=2, tokens_per_motion=4, lr_warmup_steps=0, height=SIZE, width=SIZE, num_frames=FRAMES)
    runs = []
    for inference in (False, True):
        with torch.inference_mode(inference):
            patcher = comfy_model(pipe.transformer)
            cfg, geometry = TrainSettings(**settings), (SIZE, SIZE, FRAMES)
            cond = prepare_conditions(adapter_for(pipe), video, CAPTION, CONCEPT, MOTION, cfg, geometry, None, 0)
            assert next(patcher.model.diffusion_model.parameters()).is_inference() == inference
            path = tmp_path / f"{inference}.safetensors"
            conditions = native_conditions(cond)
            result = learn_native(
                [patcher], clip, vae(), None, CAPTION, CONCEPT, MOTION, path, conditions=conditions, **settings
            )
        runs.append(result.motion.tokens)
    assert torch.equal(runs[0], runs[1])


def test_the_mask_kernel_reaches_the_training_state_and_the_node_offers_it(pipe, patcher, clip, tmp_path, monkeypatch):
    """Learn (native) takes ``TrainSettings.mask_kernel``: with ``dense`` its training state builds the N x N
    layouts (none with ``auto``) and ends on auto's tokens to 1e-6 (4.1e-8 measured: the same attention, summed in
    another order); ``flex``, which has no backward on a CPU, is refused by name before the VAE encodes anything,
    through the node too, whose ``mask_kernel`` input offers the registered kernels as Learn Motion and FlexiMMT
    Apply do."""
    from fleximmt.apps.comfy import learn
    from fleximmt.method.kernels import MASK_KERNELS
    from fleximmt.method.kernels.dense import DenseJoint
    from fleximmt.models import adapter_for
    from fleximmt.training.train import TrainSettings, prepare_conditions

    video = jumping_square(SIZE, FRAMES)
    settings = dict(steps=2, tokens_per_motion=4, lr_warmup_steps=0, height=SIZE, width=SIZE, num_frames=FRAMES)
    cond = prepare_conditions(
        adapter_for(pipe), video, CAPTION, CONCEPT, MOTION, TrainSettings(**settings), (SIZE, SIZE, FRAMES), None, 0
    )
    built, real = [], DenseJoint.__init__
    monkeypatch.setattr(DenseJoint, "__init__", lambda self, *args, **kw: built.append(1) or real(self, *args, **kw))
    runs = {}
    for kernel in ("auto", "dense"):
        built.clear()
        path = tmp_path / f"{kernel}.safetensors"
        conditions = native_conditions(cond)
        runs[kernel] = learn.learn_native(
            [patcher],
            clip,
            vae(),
            None,
            CAPTION,
            CONCEPT,
            MOTION,
            path,
            conditions=conditions,
            mask_kernel=kernel,
            **settings,
        ).motion.tokens
        runs[kernel, "built"] = len(built)
    assert runs["auto", "built"] == 0 and runs["dense", "built"] > 0
    assert relative_error(runs["dense"], runs["auto"]) < 1e-6

    class Unused(VaeShape):
        def encode(self, image):
            raise AssertionError("the reference was encoded before the kernel was checked")

    with pytest.raises(FlexiMMTInputError, match="mask_kernel='flex' has no backward on a CPU"):
        learn.learn_native(
            [patcher],
            clip,
            Unused(SHAPE["latent_channels"], 4),
            video,
            CAPTION,
            CONCEPT,
            MOTION,
            tmp_path / "flex.safetensors",
            mask_kernel="flex",
            **settings,
        )
    (given,) = [i for i in learn.LearnMotionNative.define_schema().inputs if i.id == "mask_kernel"]
    assert given.optional and given.options == list(MASK_KERNELS) and given.default == "auto"
    monkeypatch.setattr(learn, "motions_dir", lambda: tmp_path)
    node = dict(caption=CAPTION, concept_words=CONCEPT, motion_words=MOTION, name="flex", steps=2, tokens=4)
    with pytest.raises(FlexiMMTInputError, match="mask_kernel='flex' has no backward on a CPU"):
        learn.LearnMotionNative.execute(
            model=patcher,
            clip=clip,
            vae=Unused(SHAPE["latent_channels"], 4),
            video=torch.rand(FRAMES, SIZE, SIZE, 3),
            learning_rate=3e-3,
            seed=0,
            frames=FRAMES,
            mask_kernel="flex",
            **node,
        )
