"""FlexiMMT on Wan image-to-video (docs/method.md#wan), on tiny random models shaped like Wan 2.1 I2V
(CLIP image tokens), Wan 2.2 I2V-A14B (two experts) and Wan 2.2 TI2V-5B (the image as the first latent
frame): what is particular to Wan - the cross form's parts, RMPM on the conditional pass, its sizes
and messages, each expert's own tokens, a text-to-video model refused, the CLI and the web app. What
every family does (diffusers' result without objects, auto against dense, training, resume, the
signature, offload, save and load) is in test_contract.py."""

import helpers
import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from helpers import run_killed, train_command
from PIL import Image

from fleximmt import FlexiMMTWanPipeline, MotionTokens, ObjectMotion, train_motion
from fleximmt.models.wan import WanCrossAttnProcessor
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
    ours = FlexiMMTWanPipeline(**tiny_wan_components(0, version))
    theirs = WanImageToVideoPipeline(**tiny_wan_components(0, version))  # its own components: diffusers' processors
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
    return [
        ObjectMotion(masks[k], random_motion(pipe.transformer, 4, seed=k + 1, scale=scale, experts=experts), WORDS[k])
        for k in range(count)
    ]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return ((a - b).norm() / b.norm()).item()


def test_two_videos_per_prompt_without_objects_are_diffusers_videos_of_the_prompt_given_twice(pipes):
    # diffusers' Wan 2.1 fails with num_videos_per_prompt=2 (test_contract.py: the inputs every family takes)
    ours, theirs = pipes
    a = ours(picture(), PROMPT, generator=gen(), num_videos_per_prompt=2, **CALL).frames
    b = theirs(picture(), [PROMPT] * 2, generator=gen(), **CALL).frames
    assert np.asarray(a).shape == np.asarray(b).shape and rel(a, b) < 1e-6
    if theirs.transformer_2 is not None:  # where diffusers' own runs it, the same videos
        assert rel(a, theirs(picture(), PROMPT, generator=gen(), num_videos_per_prompt=2, **CALL).frames) < 1e-6


def test_auto_equals_dense_with_the_m2v_part_alone(pipes):
    # the cross form's own parts (m2v, t2v), one of them off (test_contract.py: the settings of every family)
    ours, _ = pipes
    objs = objects(ours)
    auto, dense = (
        ours(
            picture(),
            PROMPT,
            generator=gen(),
            objects=objs,
            return_masks=True,
            parts=("m2v",),
            mask_kernel=backend,
            **CALL,
        )
        for backend in ("auto", "dense")
    )
    assert rel(auto.frames, dense.frames) < 1e-4 and torch.equal(auto.masks, dense.masks)


def test_rmpm_reads_the_conditional_pass_only(pipes):
    # Wan runs the conditional branch, then the unconditional one: features are captured in the first, every step
    ours, _ = pipes
    seen = []  # per transformer forward call, the feature rows its blocks were given
    real = ours.adapter_class.attach

    def spy(adapter, state, call):
        observe = state.observe
        state.observe = lambda block, out: (
            seen[-1].add(None if state.rows.feature_rows is None else tuple(state.rows.feature_rows))
            or observe(block, out)
        )
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
    with pytest.raises(ValueError, match="one image per call"):
        ours([picture(), picture(1)], PROMPT, objects=good, **CALL)


def moving_square(frames=9):
    return helpers.moving_square(frames, SIZE, top=20, side=16, start=4, step=4, value=220)


def train(pipe, out, **kw):
    kw = {
        "steps": 4,
        "tokens_per_motion": 4,
        "lr_warmup_steps": 0,
        "height": SIZE,
        "width": SIZE,
        "num_frames": 9,
        "max_windows": 1,
        **kw,
    }
    return train_motion(pipe, moving_square(), "A red ball jumps up.", "ball", "jumps up", out, **kw)


def test_random_motions_take_their_family_from_the_registry():
    from fleximmt.toy import tiny_pipeline
    from fleximmt.toy.tiny import family_of

    assert random_motion(tiny_pipeline(0).transformer).metadata["family"] == "cogvideox"
    assert random_motion(tiny_wan_components(0, "2.2-ti2v")["transformer"]).metadata["family"] == "wan"
    with pytest.raises(ValueError, match="Linear is the denoiser of no registered family"):
        family_of(torch.nn.Linear(2, 2))


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

    out = tmp_path / "resumed.safetensors"
    run_killed(3, train, pipe, out, steps=4, lr=0.05, checkpoint_every=2)
    resumed = train(pipe, out, steps=4, lr=0.05, checkpoint_every=2, resume=True)
    assert torch.allclose(resumed.tokens, whole.tokens, atol=1e-6)
    assert torch.equal(MotionTokens.load(out).tokens, resumed.tokens)


def test_a_text_to_video_wan_is_refused_with_the_checkpoints_to_use():
    from diffusers import WanTransformer3DModel

    components = tiny_wan_components(0, "2.2")
    cfg = dict(components["transformer"].config)
    cfg["in_channels"] = 16
    components.update(transformer=WanTransformer3DModel.from_config(cfg), transformer_2=None, boundary_ratio=None)
    pipe = FlexiMMTWanPipeline(**components)
    with pytest.raises(ValueError, match=r"text-to-video model.*Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"):
        pipe(picture(), PROMPT, objects=objects(pipe), **CALL)


def test_the_command_line_trains_and_generates_on_a_wan_folder(tmp_path, capsys):
    import imageio.v3 as iio

    from fleximmt.apps.cli import main

    FlexiMMTWanPipeline(**tiny_wan_components(0, "2.1")).save_pretrained(tmp_path / "wan")
    iio.imwrite(tmp_path / "ref.mp4", moving_square(17), fps=8, codec="libx264")
    picture().save(tmp_path / "image.png")
    Image.fromarray(box(4, 30, 4, 30).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    size = ["--height", SIZE, "--width", SIZE, "--frames", 9]
    train = train_command(tmp_path / "wan", tmp_path / "ref.mp4", tmp_path / "jump.safetensors", 2, 4)
    code = main([str(a) for a in [*train, *size]])
    assert code == 0 and MotionTokens.load(tmp_path / "jump.safetensors").family == "wan"
    code = main(
        [
            str(a)
            for a in [
                "generate",
                "--model",
                tmp_path / "wan",
                "--image",
                tmp_path / "image.png",
                "--prompt",
                PROMPT,
                "--object",
                f"{tmp_path / 'mask.png'}:{tmp_path / 'jump.safetensors'}:jumps up",
                "--steps",
                2,
                "--out",
                tmp_path / "out.mp4",
                "--masks-out",
                tmp_path / "masks.mp4",
                *size,
            ]
        ]
    )
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
    random_motion(pipe.transformer, 4, seed=1, scale=30.0, name="jump", motion_words="jumps up").save(
        library / "jump.safetensors"
    )
    Image.fromarray(box(4, 30, 4, 30).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    demo = build_app(pipe, library)  # the page builds for Wan (its size, its motion library)
    assert "jump" in str(demo.config)
    app = TransferApp(pipe, MotionLibrary(library), tmp_path / "out")
    assert app.model_size == (832, 480)  # Wan's own size (diffusers' default), which the page fits images to
    slot = ObjectInput(mask_png=str(tmp_path / "mask.png"), motion="jump", motion_words="jumps up")
    preview = app.preview(np.asarray(picture()), [slot])  # the masks on Wan's token grid
    assert preview.ndim == 3 and (preview != 0).any()
