"""Motion training (DMEM, docs/method.md#dmem, docs/method.md#training) on the tiny random-weight model: the trainer's own
inputs, settings, checkpoints and messages. What training does on every family (only the tokens move,
the loss falls, checkpointing and resume give the same tokens) is in test_contract.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from helpers import run_killed

from fleximmt import MotionTokens
from fleximmt.toy import tiny_pipeline
from fleximmt.training.train import checkpoint_path, train_motion

CAPTION = "A red ball jumps up."


def moving_square(frames=9, size=32, step=2, seed=0):
    video = np.full((frames, size, size, 3), 90, np.uint8)
    texture = (np.random.RandomState(seed).rand(10, 10, 3) * 255).astype(np.uint8)
    for t in range(frames):
        video[t, 10:20, 2 + step * t : 12 + step * t] = texture
    return video


def train(pipe, out, **kw):
    kw.setdefault("steps", 6)
    kw.setdefault("tokens_per_motion", 4)
    kw.setdefault("lr_warmup_steps", 0)
    return train_motion(pipe, kw.pop("video", moving_square()), CAPTION, "ball", "jumps up", out, **kw)


@pytest.fixture()
def pipe():
    return tiny_pipeline(0)


def test_a_callback_that_raises_leaves_a_checkpoint_of_its_step_and_resume_continues_there(pipe, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "m.safetensors"
    run_killed(2, train, pipe, out, steps=5, checkpoint_every=100)
    with safe_open(str(checkpoint_path(out)), framework="pt") as f:
        assert f.metadata()["step"] == "2"  # not saved by checkpoint_every (100): saved because the run stopped
    steps = []
    train(pipe, out, steps=5, checkpoint_every=100, resume=True, callback=lambda step, loss: steps.append(step))
    assert steps == [3, 4, 5]


def test_a_motion_of_three_experts_round_trips_under_one_key_per_expert(tmp_path):
    from safetensors import safe_open

    sets = [torch.randn(2, 3, 8) for _ in range(3)]
    motion = MotionTokens(sets, name="three", family="wan")
    assert motion.num_experts == 3 and motion.tokens.shape == (3, 2, 3, 8)
    path = motion.save(tmp_path / "three.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"motion_tokens", "motion_tokens_2", "motion_tokens_3"}
    back = MotionTokens.load(path)
    assert back.num_experts == 3 and all(torch.equal(a, b) for a, b in zip(back.experts, sets))
    assert back.metadata == motion.metadata


@pytest.mark.parametrize("experts", [1, 2])
def test_motion_files_of_one_and_two_experts_written_before_load_unchanged(tmp_path, experts):
    # the file format as it was when at most two experts existed, written without MotionTokens.save
    from safetensors.torch import save_file

    sets = [torch.randn(2, 3, 8) for _ in range(experts)]
    tensors = dict(zip(("motion_tokens", "motion_tokens_2"), sets))
    meta = {
        "format": "fleximmt.method.motion/1",
        "d_m": "3",
        "experts": str(experts),
        "name": '"old"',
        "family": '"wan"',
    }
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    back = MotionTokens.load(tmp_path / "old.safetensors")
    assert back.num_experts == experts and all(torch.equal(a, b) for a, b in zip(back.experts, sets))
    assert back.name == "old" and back.family == "wan"


def test_a_motion_file_missing_an_expert_it_names_is_refused(tmp_path):
    from safetensors.torch import save_file

    meta = {"format": "fleximmt.method.motion/1", "d_m": "3", "experts": "3"}
    save_file(
        {"motion_tokens": torch.zeros(2, 3, 8), "motion_tokens_3": torch.zeros(2, 3, 8)},
        str(tmp_path / "gap.safetensors"),
        metadata=meta,
    )
    with pytest.raises(ValueError, match="holds 3 experts' tokens but has 1"):
        MotionTokens.load(tmp_path / "gap.safetensors")


def test_the_conditioning_modules_are_the_encoders_the_pipeline_has():
    from types import SimpleNamespace

    from fleximmt.method.adapter import ModelAdapter

    encoder = torch.nn.Linear(2, 2)
    assert ModelAdapter(SimpleNamespace(text_encoder=encoder, vae=encoder)).conditioning_modules() == ["text_encoder"]
    both = SimpleNamespace(text_encoder=encoder, text_encoder_2=encoder, image_encoder=None, vae=encoder)
    assert ModelAdapter(both).conditioning_modules() == ["text_encoder", "text_encoder_2"]


def test_a_second_text_encoder_is_frozen_and_offloaded_like_the_first(tmp_path, monkeypatch):
    import fleximmt.training.train as training
    from fleximmt.models.cogvideox import FlexiMMTPipeline
    from fleximmt.toy.tiny import tiny_components

    class TwoEncoders(FlexiMMTPipeline):  # a pipeline with a second text encoder, as HunyuanVideo 1.5 has
        def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, text_encoder_2):
            super().__init__(tokenizer, text_encoder, vae, transformer, scheduler)
            self.register_modules(text_encoder_2=text_encoder_2)

    pipe = TwoEncoders(**tiny_components(0), text_encoder_2=tiny_components(1)["text_encoder"])
    pipe.set_progress_bar_config(disable=True)
    moved = {name: [] for name in ("text_encoder", "text_encoder_2")}
    for name, calls in moved.items():
        module = getattr(pipe, name)
        monkeypatch.setattr(
            module, "to", lambda *a, _to=module.to, _calls=calls, **k: _calls.append((a, k)) or _to(*a, **k)
        )
    monkeypatch.setattr(training, "offload_target", lambda device: "cpu")  # as on a GPU: encoders wait on the CPU
    frozen = []

    def check(step, loss):
        frozen.append([all(not p.requires_grad for p in getattr(pipe, n).parameters()) for n in moved])

    train(pipe, tmp_path / "m.safetensors", steps=2, callback=check)
    assert frozen == [[True, True]] * 2
    assert moved["text_encoder"][0] == (("cpu",), {}) and moved["text_encoder_2"][0] == (("cpu",), {})
    assert all(p.requires_grad for p in pipe.text_encoder_2.parameters())  # as it was before the run


def test_frames_given_as_an_array_are_subsampled_from_their_own_rate(pipe):
    from fleximmt.training.train import load_reference

    video = np.repeat(moving_square(frames=9, step=1), 3, axis=0)  # 27 frames: each of 9 three times, as 24 fps
    assert np.array_equal(load_reference(video, num_frames=9, fps=8.0, video_fps=24.0), video[::3])
    assert len(load_reference(video, num_frames=9, fps=8.0)) == 27  # without video_fps: taken to be at 8 fps already
    with pytest.raises(ValueError, match="video_fps=0"):
        load_reference(video, num_frames=9, fps=8.0, video_fps=0)


def test_video_files_are_read_and_subsampled(pipe, tmp_path):
    import imageio.v3 as iio

    path = tmp_path / "ref.mp4"
    iio.imwrite(path, np.repeat(moving_square(frames=9, step=1), 3, axis=0), fps=24, codec="libx264")
    from fleximmt.training.train import load_reference

    frames = load_reference(str(path), num_frames=9, fps=8.0)  # 27 frames at 24 fps -> every third
    assert len(frames) == 9 and np.abs(frames.astype(int) - np.repeat(moving_square(9, step=1), 1, 0)).mean() < 12
    motion = train(pipe, tmp_path / "m.safetensors", steps=2, video=str(path))
    assert motion.tokens.shape[:2] == (2, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(concept_words="dog"), "'dog' were not found"),
        (dict(motion_words="flies away"), "'flies away' were not found"),
        (dict(video=moving_square(frames=5)), "has 5 frames but training needs 9"),
        (dict(height=48), "learned positional embeddings"),
        (dict(video=np.zeros((9, 32, 32), np.float32)), "uint8"),
        (dict(video="/nonexistent/ref.mp4"), "does not exist"),
        (dict(learning_rate=1.0), "unknown training setting"),
    ],
)
def test_bad_input_names_the_problem(pipe, tmp_path, kwargs, message):
    args = dict(video=moving_square(), caption=CAPTION, concept_words="ball", motion_words="jumps up")
    for key in list(kwargs):
        if key in args:
            args[key] = kwargs.pop(key)
    with pytest.raises(ValueError, match=message):
        train_motion(
            pipe,
            args["video"],
            args["caption"],
            args["concept_words"],
            args["motion_words"],
            tmp_path / "m.safetensors",
            steps=1,
            tokens_per_motion=2,
            **kwargs,
        )


def test_resume_refuses_a_checkpoint_from_other_settings(pipe, tmp_path):
    out = tmp_path / "m.safetensors"
    train(pipe, out, steps=2, checkpoint_every=1)
    with pytest.raises(ValueError, match="different settings"):
        train(pipe, out, steps=2, resume=True, lr=0.5)
    other = tiny_pipeline(seed=1)
    with pytest.raises(ValueError, match="different model"):
        train(other, out, steps=2, resume=True)


def test_unreadable_video_file_and_bf16_autocast(pipe, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(ValueError, match="could not be read"):
        train(pipe, tmp_path / "m.safetensors", video=str(tmp_path / "broken.mp4"))
    motion = train(pipe, tmp_path / "bf16.safetensors", steps=2, mixed_precision="bf16")
    assert motion.tokens.dtype == torch.float32 and torch.isfinite(motion.tokens).all()


def test_without_the_training_mask_motion_tokens_reach_all_video(pipe, tmp_path, monkeypatch):
    import fleximmt.method.kernels.grouped as grouped

    groups = []
    real = grouped.video_groups

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        groups.append(len(result))
        return result

    monkeypatch.setattr(grouped, "video_groups", spy)
    with_mask = train(pipe, tmp_path / "a.safetensors", steps=2, lr=0.05, dmem_drop=0.0)
    assert max(groups) == 2  # DMEM splits video into inside / outside the object
    groups.clear()
    without = train(pipe, tmp_path / "b.safetensors", steps=2, lr=0.05, train_mask=False)
    assert set(groups) == {1}  # one group: every video token reads the motion tokens
    assert not torch.allclose(with_mask.tokens, without.tokens)


def test_training_takes_the_mask_kernel_and_refuses_flex_before_encoding_on_a_cpu(pipe, tmp_path, monkeypatch):
    """``mask_kernel`` (TrainSettings) picks the kernel of training's attention: "dense" learns the tokens
    "auto" learns (in float32; a run resumes only with its own kernel, whose rounding differs in bf16);
    "flex", whose FlexAttention has no backward on a CPU, is refused before any encoding; the old name
    ``attention_backend`` warns and sets it."""
    from fleximmt.method.kernels.dense import DenseJoint
    from fleximmt.training.train import TrainSettings

    built, encoded = [], []
    real = DenseJoint.__init__
    monkeypatch.setattr(DenseJoint, "__init__", lambda self, *args: built.append(1) or real(self, *args))
    auto = train(pipe, tmp_path / "auto.safetensors", steps=3, checkpoint_every=1)
    assert not built
    dense = train(pipe, tmp_path / "dense.safetensors", steps=3, mask_kernel="dense")
    assert built and torch.allclose(dense.tokens, auto.tokens, atol=1e-5)
    with pytest.raises(ValueError, match="different settings"):
        train(pipe, tmp_path / "auto.safetensors", steps=3, resume=True, mask_kernel="dense")
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: encoded.append(1) or encode(*a, **k))
    with pytest.raises(ValueError, match=r"mask_kernel='flex' has no backward on a CPU .* train with 'auto'"):
        train(pipe, tmp_path / "flex.safetensors", mask_kernel="flex")
    assert encoded == []
    with pytest.raises(ValueError, match=r"mask_kernel='flash': choose from \['auto', 'dense', 'flex'\]"):
        train(pipe, tmp_path / "flash.safetensors", mask_kernel="flash")
    with pytest.warns(FutureWarning, match="use mask_kernel='dense'"):
        assert TrainSettings(attention_backend="dense").mask_kernel == "dense"
