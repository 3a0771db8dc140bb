"""FlexiMMT on Wan image-to-video (METHOD.md section 9), on tiny random models shaped like Wan 2.1 I2V
(CLIP image tokens), Wan 2.2 I2V-A14B (two experts) and Wan 2.2 TI2V-5B (the image as the first latent
frame): diffusers' own result without objects, the dense reference with them, training, bad input."""

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from fleximmt import FlexiMMTPipeline, FlexiMMTWanPipeline, MotionTokens, ObjectMotion, load_pipeline, train_motion
from fleximmt.method.pipeline import OPTIONS
from fleximmt.models.wan import WanCrossAttnProcessor, WanSelfAttnProcessor
from fleximmt.toy.tiny import random_motion, tiny_wan_components

VERSIONS = ["2.1", "2.2", "2.2-ti2v"]
PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
SIZE = 64
CALL = dict(height=SIZE, width=SIZE, num_frames=9, num_inference_steps=2, max_sequence_length=24)


@pytest.fixture(scope="module", params=VERSIONS)
def version(request):
    return request.param


@pytest.fixture(scope="module")
def pipes(version):
    components = tiny_wan_components(0, version)
    ours = FlexiMMTWanPipeline(**components)
    theirs = WanImageToVideoPipeline(**components)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def picture(seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


def box(y0, y1, x0, x1):
    m = np.zeros((SIZE, SIZE), bool)
    m[y0:y1, x0:x1] = True
    return m


def objects(pipe, count=2, scale=30.0):
    experts = 2 if pipe.transformer_2 is not None else 1
    masks = [box(4, 30, 4, 30), box(20, 60, 28, 60)]
    return [ObjectMotion(masks[k], random_motion(pipe.transformer, 4, seed=k + 1, scale=scale, experts=experts), WORDS[k])
            for k in range(count)]  # fmt: skip


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return ((a - b).norm() / b.norm()).item()


def test_signature_is_diffusers_wan_then_fleximmt_keywords():
    ours = list(inspect.signature(FlexiMMTWanPipeline.__call__).parameters.values())[1:]
    theirs = list(inspect.signature(WanImageToVideoPipeline.__call__).parameters.values())[1:]
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [(p.name, p.kind, p.default) for p in theirs]
    assert [p.name for p in ours[len(theirs) :]] == list(OPTIONS)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(negative_prompt="blurry"), dict(guidance_scale=1.0), dict(output_type="pt"), dict(num_videos_per_prompt=2),
     dict(return_dict=False)],
    ids=["plain", "negative", "no-cfg", "pt", "two-per-prompt", "tuple"],
)
def test_without_objects_it_is_diffusers(pipes, extra):
    ours, theirs = pipes
    a = ours(picture(), PROMPT, generator=gen(), **CALL, **extra)
    if extra.get("num_videos_per_prompt", 1) > 1:  # diffusers' Wan 2.1 fails here; the same videos, repeated
        b = theirs(picture(), [PROMPT] * 2, generator=gen(), **CALL)
        assert theirs.transformer_2 is None or rel(a.frames, theirs(picture(), PROMPT, generator=gen(), **CALL, **extra).frames) < 1e-6
    else:
        b = theirs(picture(), PROMPT, generator=gen(), **CALL, **extra)
    a, b = (x[0] if isinstance(x, tuple) else x.frames for x in (a, b))
    assert np.asarray(a).shape == np.asarray(b).shape and rel(a, b) < 1e-6


@pytest.mark.parametrize("settings", [dict(), dict(mask_source="qk"), dict(parts=("m2v",)), dict(mask_source="static"),
                                      dict(rmpm_method="released", anchors=1), dict(initial_masks="none")])
def test_auto_equals_dense_with_two_objects_and_motion_tokens_act(pipes, settings):
    ours, _ = pipes
    objs = objects(ours)
    run = lambda **kw: ours(picture(), PROMPT, generator=gen(), objects=objs, return_masks=True, **CALL, **settings, **kw)  # noqa: E731
    auto, dense = run(), run(attention_backend="dense")
    grid = ours.token_grid(SIZE, SIZE, 9)
    assert auto.masks.shape == (1, 2, 2, grid.frames, grid.height, grid.width)
    assert rel(auto.frames, dense.frames) < 1e-4 and torch.equal(auto.masks, dense.masks)
    plain = ours(picture(), PROMPT, generator=gen(), **CALL).frames
    assert rel(auto.frames, plain) > 1e-5  # the motion tokens reach the video


def test_fused_projections_and_offload_keep_motion_tokens(version):
    """Diffusers' habits with a 14B model: fused projections, model offload and sequential offload
    (accelerate's hooks, the CPU as the "accelerator") give the same video and masks with objects."""
    from accelerate import cpu_offload

    def fresh():
        pipe = FlexiMMTWanPipeline(**tiny_wan_components(0, version))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(pipe):
        return pipe(picture(), PROMPT, generator=gen(), objects=objects(pipe), return_masks=True, **CALL)

    want = run(fresh())
    fused = fresh()
    for transformer in (fused.transformer, fused.transformer_2):
        if transformer is not None:
            transformer.fuse_qkv_projections()
    assert fused.transformer.blocks[0].attn2.fused_projections
    offloaded = fresh()
    offloaded.enable_model_cpu_offload(device="cpu")
    sequential = fresh()
    for module in (sequential.transformer, sequential.transformer_2, sequential.vae):
        if module is not None:
            cpu_offload(module, execution_device="cpu")
    assert sequential.transformer.blocks[0].attn2.to_k.weight.device.type == "meta"
    for pipe in (fused, offloaded, sequential):
        got = run(pipe)
        assert rel(got.frames, want.frames) < 1e-5 and torch.equal(got.masks, want.masks)


def test_processors_are_installed_on_every_expert_and_objects_empty_stays_diffusers(pipes):
    ours, theirs = pipes
    ours(picture(), PROMPT, generator=gen(), objects=objects(ours), **CALL)
    for transformer in filter(None, (ours.transformer, ours.transformer_2)):
        assert all(isinstance(b.attn1.processor, WanSelfAttnProcessor) and isinstance(b.attn2.processor, WanCrossAttnProcessor)
                   for b in transformer.blocks)  # fmt: skip
    assert rel(ours(picture(), PROMPT, generator=gen(), **CALL).frames, theirs(picture(), PROMPT, generator=gen(), **CALL).frames) < 1e-6


def test_rmpm_reads_the_conditional_pass_only(pipes):
    # Wan runs the conditional branch, then the unconditional one: features are captured in the first, every step
    ours, _ = pipes
    seen = []  # per transformer forward call, the feature rows its blocks were given
    real = ours.adapter_class.attach

    def spy(adapter, state, call):
        observe = state.observe
        state.observe = lambda block, out: seen[-1].add(None if state.feature_rows is None else tuple(state.feature_rows)) or observe(block, out)  # fmt: skip
        return real(adapter, state, call)

    experts = [t for t in (ours.transformer, ours.transformer_2) if t is not None]
    hooks = [t.register_forward_pre_hook(lambda module, args: seen.append(set())) for t in experts]
    ours.adapter_class.attach = spy
    try:
        ours(picture(), PROMPT, generator=gen(), objects=objects(ours), **CALL)
    finally:
        ours.adapter_class.attach = real
        for hook in hooks:
            hook.remove()
    assert seen == [{(0,)}, {None}] * CALL["num_inference_steps"]


def test_bad_input_on_wan_names_the_fix(pipes):
    ours, _ = pipes
    good = objects(ours)
    cases = [
        (dict(parts=("m2v", "m2m")), "'m2m'.*do not exist"),
        (dict(context_text="closed"), "context_text='closed' is not possible"),
        (dict(num_frames=10), "Wan makes 4k\\+1 frames; use 9 or 13"),
        (dict(height=40, width=40), "Wan needs multiples of (16|32); use (32 x 32)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(picture(), PROMPT, objects=good, **{**CALL, **kwargs})
    cogvideox = MotionTokens(torch.zeros(2, 4, 24), base_model="CogVideoX-5b-I2V@abc")
    with pytest.raises(ValueError, match="learned on CogVideoX image-to-video \\(CogVideoX-5b-I2V@abc\\).*Wan"):
        ours(picture(), PROMPT, objects=[ObjectMotion(box(0, 8, 0, 8), cogvideox, "jumps up")], **CALL)
    experts = 1 if ours.transformer_2 is not None else 2
    other = random_motion(ours.transformer, 4, experts=experts)
    with pytest.raises(ValueError, match="experts|train the motion on this model"):
        ours(picture(), PROMPT, objects=[ObjectMotion(box(0, 8, 0, 8), other, "jumps up")], **CALL)
    with pytest.raises(ValueError, match="one image per call"):
        ours([picture(), picture(1)], PROMPT, objects=good, **CALL)


def test_a_wan_motion_is_refused_on_cogvideox(pipes):
    from fleximmt.toy import tiny_pipeline

    ours, _ = pipes
    cog = tiny_pipeline(0)
    wan_motion = random_motion(ours.transformer, 4)
    with pytest.raises(ValueError, match="learned on Wan image-to-video.*CogVideoX"):
        cog(picture().resize((32, 32)), PROMPT, objects=[ObjectMotion(np.ones((32, 32), bool), wan_motion, "jumps up")],
            num_inference_steps=1, output_type="latent")  # fmt: skip


def moving_square(frames=9):
    video = np.full((frames, SIZE, SIZE, 3), 90, np.uint8)
    for t in range(frames):
        video[t, 20:36, 4 + 4 * t : 20 + 4 * t] = 220
    return video


def train(pipe, out, **kw):
    kw = {"steps": 4, "tokens_per_motion": 4, "lr_warmup_steps": 0, "height": SIZE, "width": SIZE, "num_frames": 9,
          "max_windows": 1, **kw}  # fmt: skip
    return train_motion(pipe, moving_square(), "A red ball jumps up.", "ball", "jumps up", out, **kw)


def test_random_motions_take_their_family_from_the_registry():
    from fleximmt.toy import tiny_pipeline
    from fleximmt.toy.tiny import family_of

    assert random_motion(tiny_pipeline(0).transformer).metadata["family"] == "cogvideox"
    assert random_motion(tiny_wan_components(0, "2.2-ti2v")["transformer"]).metadata["family"] == "wan"
    with pytest.raises(ValueError, match="Linear is the denoiser of no registered family"):
        family_of(torch.nn.Linear(2, 2))


def test_training_changes_only_the_motion_tokens_and_they_drive_the_pipeline(pipes, tmp_path):
    ours, _ = pipes
    models = [m for m in (ours.transformer, ours.transformer_2, ours.vae, ours.text_encoder) if m is not None]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    motion = train(ours, tmp_path / "m.safetensors", steps=3, lr=0.05)
    for model, state in zip(models, before):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    loaded = MotionTokens.load(tmp_path / "m.safetensors")
    experts = 2 if ours.transformer_2 is not None else 1
    assert loaded.family == "wan" and loaded.num_experts == experts and torch.equal(loaded.tokens, motion.tokens)
    assert loaded.experts[0].shape == (2, 4, 24)
    out = ours(picture(), "A ball jumps up.", objects=[ObjectMotion(box(20, 36, 4, 20), loaded, "jumps up")], **CALL)
    assert np.isfinite(out.frames).all()


def test_the_loss_falls_on_wan_2_1_against_a_frozen_run(tmp_path):
    pipe = FlexiMMTWanPipeline(**tiny_wan_components(0, "2.1"))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(steps=120, return_losses=True, dmem_drop=0.0, checkpoint_every=1000)
    frozen = np.array(train(pipe, tmp_path / "a.safetensors", lr=0.0, **kw).losses)
    learned = np.array(train(pipe, tmp_path / "b.safetensors", lr=0.05, **kw).losses)
    ratio = [float((learned[i : i + 40] / frozen[i : i + 40]).mean()) for i in range(0, 120, 40)]
    assert ratio[-1] < ratio[0] < 1.0001 and ratio[-1] < 0.999


def test_gradient_checkpointing_trains_the_same_tokens(pipes, tmp_path):
    """Real sizes train with checkpointing (the default above 8 GiB): a checkpointed block recomputed
    in the backward pass must see the motion tokens and DMEM masks its forward saw."""
    ours, _ = pipes
    plain = train(ours, tmp_path / "plain.safetensors", steps=3, lr=0.05, gradient_checkpointing=False)
    checkpointed = train(ours, tmp_path / "ckpt.safetensors", steps=3, lr=0.05, gradient_checkpointing=True)
    assert not torch.equal(plain.tokens, train(ours, tmp_path / "none.safetensors", steps=1, lr=0.0).tokens)
    assert torch.allclose(checkpointed.tokens, plain.tokens, atol=1e-6)
    assert all(not t.gradient_checkpointing for t in (ours.transformer, ours.transformer_2) if t is not None)


def test_resumed_training_equals_uninterrupted(tmp_path):
    pipe = FlexiMMTWanPipeline(**tiny_wan_components(0, "2.2"))
    pipe.set_progress_bar_config(disable=True)
    whole = train(pipe, tmp_path / "whole.safetensors", steps=6, checkpoint_every=2, lr=0.05)

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 3:
            raise Killed

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(Killed):
        train(pipe, out, steps=6, checkpoint_every=2, lr=0.05, callback=kill)
    resumed = train(pipe, out, steps=6, checkpoint_every=2, lr=0.05, resume=True)
    assert torch.allclose(resumed.tokens, whole.tokens, atol=1e-6)


def test_each_expert_trains_its_own_tokens_on_its_own_timesteps(tmp_path):
    pipe = FlexiMMTWanPipeline(**tiny_wan_components(0, "2.2"))
    pipe.set_progress_bar_config(disable=True)
    initial = train(pipe, tmp_path / "init.safetensors", steps=1, lr=0.0)
    results = {}
    for boundary in (0.0, 1.01, 0.875):  # every t high-noise / every t low-noise / the real split
        pipe.register_to_config(boundary_ratio=boundary)
        results[boundary] = train(pipe, tmp_path / f"b{boundary}.safetensors", steps=4, lr=0.05)
    pipe.register_to_config(boundary_ratio=0.875)
    high, low = results[0.0].experts, results[1.01].experts
    assert not torch.equal(high[0], initial.experts[0]) and torch.equal(high[1], initial.experts[1])
    assert torch.equal(low[0], initial.experts[0]) and not torch.equal(low[1], initial.experts[1])


def test_a_model_of_three_experts_trains_three_token_sets_and_resumes(tmp_path, monkeypatch):
    # nothing in the loop counts experts: a third transformer (never chosen by Wan's two-way split) gets
    # its own tokens, kept at their initial values, in the motion file and the checkpoint
    from safetensors import safe_open

    from fleximmt.models.wan import WanAdapter
    from fleximmt.training.train import checkpoint_path

    pipe = FlexiMMTWanPipeline(**tiny_wan_components(0, "2.2"))
    pipe.set_progress_bar_config(disable=True)
    third = tiny_wan_components(1, "2.2")["transformer"]
    monkeypatch.setattr(WanAdapter, "transformers", lambda self: [pipe.transformer, pipe.transformer_2, third])
    initial = train(pipe, tmp_path / "init.safetensors", steps=1, lr=0.0)
    whole = train(pipe, tmp_path / "whole.safetensors", steps=4, lr=0.05, checkpoint_every=2)
    assert whole.num_experts == 3 and torch.equal(whole.experts[2], initial.experts[2])
    assert not torch.equal(whole.experts[0], initial.experts[0])
    with safe_open(str(checkpoint_path(tmp_path / "whole.safetensors")), framework="pt") as f:
        assert {"param.tokens", "param.tokens_2", "param.tokens_3"} <= set(f.keys())

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 3:
            raise Killed

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(Killed):
        train(pipe, out, steps=4, lr=0.05, checkpoint_every=2, callback=kill)
    resumed = train(pipe, out, steps=4, lr=0.05, checkpoint_every=2, resume=True)
    assert torch.allclose(resumed.tokens, whole.tokens, atol=1e-6)
    assert torch.equal(MotionTokens.load(out).tokens, resumed.tokens)


def test_save_load_from_pipe_and_the_loader_picks_wan(pipes, tmp_path):
    ours, theirs = pipes
    ours.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    loaded = load_pipeline(tmp_path / "model")
    assert isinstance(loaded, FlexiMMTWanPipeline) and not isinstance(loaded, FlexiMMTPipeline)
    loaded.set_progress_bar_config(disable=True)
    want = ours(picture(), PROMPT, generator=gen(), objects=objects(ours), **CALL).frames
    assert rel(loaded(picture(), PROMPT, generator=gen(), objects=objects(ours), **CALL).frames, want) < 1e-5
    piped = FlexiMMTWanPipeline.from_pipe(theirs)
    assert rel(piped(picture(), PROMPT, generator=gen(), objects=objects(ours), **CALL).frames, want) < 1e-5


def test_a_text_to_video_wan_is_refused_with_the_checkpoints_to_use():
    from diffusers import WanTransformer3DModel

    components = tiny_wan_components(0, "2.2")
    cfg = dict(components["transformer"].config)
    cfg["in_channels"] = 16
    components.update(transformer=WanTransformer3DModel.from_config(cfg), transformer_2=None, boundary_ratio=None)
    pipe = FlexiMMTWanPipeline(**components)
    with pytest.raises(ValueError, match="text-to-video model.*Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"):
        pipe(picture(), PROMPT, objects=objects(pipe), **CALL)


def test_the_command_line_trains_and_generates_on_a_wan_folder(tmp_path, capsys):
    import imageio.v3 as iio

    from fleximmt.apps.cli import main

    FlexiMMTWanPipeline(**tiny_wan_components(0, "2.1")).save_pretrained(tmp_path / "wan")
    iio.imwrite(tmp_path / "ref.mp4", moving_square(17), fps=8, codec="libx264")
    picture().save(tmp_path / "image.png")
    Image.fromarray(box(4, 30, 4, 30).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    size = ["--height", SIZE, "--width", SIZE, "--frames", 9]
    code = main([str(a) for a in ["train", "--model", tmp_path / "wan", "--video", tmp_path / "ref.mp4", "--caption",
                                  "A ball jumps up.", "--concept", "ball", "--motion-words", "jumps up", "--out",
                                  tmp_path / "jump.safetensors", "--steps", 2, "--tokens", 4, *size]])  # fmt: skip
    assert code == 0 and MotionTokens.load(tmp_path / "jump.safetensors").family == "wan"
    code = main([str(a) for a in ["generate", "--model", tmp_path / "wan", "--image", tmp_path / "image.png", "--prompt",
                                  PROMPT, "--object", f"{tmp_path / 'mask.png'}:{tmp_path / 'jump.safetensors'}:jumps up",
                                  "--steps", 2, "--out", tmp_path / "out.mp4", "--masks-out", tmp_path / "masks.mp4", *size]])  # fmt: skip
    assert code == 0 and (tmp_path / "out.mp4").is_file() and (tmp_path / "masks.mp4").is_file()
    assert iio.imread(tmp_path / "out.mp4").shape[:3] == (9, SIZE, SIZE)


def test_train_motion_takes_diffusers_own_wan_pipeline(tmp_path):
    plain = WanImageToVideoPipeline(**tiny_wan_components(0, "2.2-ti2v"))
    plain.set_progress_bar_config(disable=True)
    motion = train(plain, tmp_path / "m.safetensors", steps=2, lr=0.05)
    assert motion.family == "wan" and motion.tokens.shape == (2, 4, 24)
    assert all(isinstance(b.attn2.processor, WanCrossAttnProcessor) for b in plain.transformer.blocks)
    ours = FlexiMMTWanPipeline.from_pipe(plain)
    out = ours(picture(), "A ball jumps up.", objects=[ObjectMotion(box(20, 36, 4, 20), motion, "jumps up")], **CALL)
    assert np.isfinite(out.frames).all()


def test_the_web_app_serves_a_wan_model(tmp_path):
    from fleximmt.apps.app import MotionLibrary, ObjectInput, TransferApp, build_app

    pipe = FlexiMMTWanPipeline(**tiny_wan_components(0, "2.1"))
    pipe.set_progress_bar_config(disable=True)
    library = tmp_path / "motions"
    library.mkdir()
    random_motion(pipe.transformer, 4, seed=1, scale=30.0, name="jump", motion_words="jumps up").save(library / "jump.safetensors")
    Image.fromarray(box(4, 30, 4, 30).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    demo = build_app(pipe, library)  # the page builds for Wan (its size, its motion library)
    assert "jump" in str(demo.config)
    app = TransferApp(pipe, MotionLibrary(library), tmp_path / "out")
    assert app.model_size == (832, 480)  # Wan's own size (diffusers' default), which the page fits images to
    slot = ObjectInput(mask_png=str(tmp_path / "mask.png"), motion="jump", motion_words="jumps up")
    preview = app.preview(np.asarray(picture()), [slot])  # the masks on Wan's token grid
    assert preview.ndim == 3 and (preview != 0).any()
