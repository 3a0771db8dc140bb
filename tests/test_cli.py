"""The command line and the video writers."""

import json
import logging
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from helpers import moving_square, train_command
from PIL import Image

from fleximmt.apps import cli
from fleximmt.apps.cli import main
from fleximmt.evaluation.video import PALETTE, mask_overlay, save_video
from fleximmt.method.masks import RMPM_METHODS
from fleximmt.method.motion import MotionTokens
from fleximmt.method.pipeline import INITIAL_MASKS, MASK_SOURCES
from fleximmt.method.presets import PRESETS
from fleximmt.toy import random_motion

PROMPT = "A ball jumps up. A box slides left."


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def subparser(name):
    return next(a for a in cli.build_parser()._subparsers._group_actions if a.dest == "command").choices[name]


# -- --help ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, options",
    [
        (
            "generate",
            [
                "--image",
                "--prompt",
                "--object",
                "--out",
                "--masks-out",
                "--steps",
                "--seed",
                "--guidance",
                "--model",
                "--cpu-offload",
                "--vae-tiling",
                "--gif",
                "--fps",
                "--frames",
                "--mask-source",
                "--anchors",
                "--alpha",
                "--rmpm-method",
                "--preset",
                "--mask-kernel",
                "--dtype",
                "MASK:MOTION:WORDS",
                "examples:",
            ],
        ),
        (
            "train",
            [
                "--video",
                "--caption",
                "--concept",
                "--motion-words",
                "--dataset",
                "--resume",
                "--mixed-precision",
                "--gradient-checkpointing",
                "--checkpoint-every",
                "--lr",
                "--tokens",
                "--frames",
                "--fps",
                "--preset",
                "--mask-kernel",
                "examples:",
            ],
        ),
        ("inspect", ["--json", "examples:"]),
        ("demo", ["--out", "--steps", "RANDOM", "examples:"]),
    ],
)
def test_help_of_each_command_exits_0_and_names_its_options(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, option


def test_top_level_help_lists_the_commands_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for command in ("generate", "train", "inspect", "demo", "examples:"):
        assert command in text, command


def test_the_default_model_is_the_first_registered_familys_and_help_shows_it(capsys):
    from fleximmt.models import adapters

    first = next(adapters())
    assert (
        subparser("generate")._option_string_actions["--model"].default
        == first.default_model
        == "THUDM/CogVideoX-5b-I2V"
    )
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {first.default_model};" in text


def test_generate_choices_are_the_pipelines_own():
    actions = {a.dest: a for a in subparser("generate")._actions}
    assert tuple(actions["mask_source"].choices) == MASK_SOURCES
    assert tuple(actions["rmpm_method"].choices) == RMPM_METHODS
    assert tuple(actions["initial_masks"].choices) == INITIAL_MASKS
    assert tuple(actions["preset"].choices) == PRESETS
    assert tuple(actions["dtype"].choices) == ("bfloat16", "float16", "float32")


def test_generate_and_train_take_the_mask_kernel(scene, capsys, monkeypatch):
    """--mask-kernel picks FlexiMMT's kernel (the pipeline's choices; "auto" when not given): generate builds
    the dense kernel's layouts with "dense"; train refuses "flex" on a CPU, naming the fix."""
    from fleximmt.method.kernels import MASK_KERNELS
    from fleximmt.method.kernels.dense import DenseJoint

    for command in ("generate", "train"):
        action = next(a for a in subparser(command)._actions if a.dest == "mask_kernel")
        assert tuple(action.choices) == MASK_KERNELS
    # not given: not passed, so the pipeline's default ("auto") or --preset's fills it
    assert subparser("generate").parse_args(["--image", "i", "--prompt", "p", "--out", "o.mp4"]).mask_kernel is None
    built = []
    real = DenseJoint.__init__
    monkeypatch.setattr(DenseJoint, "__init__", lambda self, *args: built.append(1) or real(self, *args))
    common = ["generate", "--model", "tiny", "--image", scene / "image.png", "--prompt", PROMPT, "--steps", 1]
    code, _, err = run_cli([*common, *objects(scene), "--out", scene / "auto.mp4"], capsys)
    assert code == 0 and not built, err
    code, _, err = run_cli([*common, *objects(scene), "--out", scene / "dense.mp4", "--mask-kernel", "dense"], capsys)
    assert code == 0 and built, err
    video = np.full((9, 32, 32, 3), 90, np.uint8)
    iio.imwrite(scene / "ref.mp4", video, fps=8, codec="libx264")
    train = ["train", "--model", "tiny", "--video", scene / "ref.mp4", "--caption", "A ball jumps up."]
    words = ["--concept", "ball", "--motion-words", "jumps up", "--out", scene / "m.safetensors", "--steps", 1]
    code, _, err = run_cli([*train, *words, "--mask-kernel", "flex"], capsys)
    assert code == 2 and "mask_kernel='flex' has no backward on a CPU" in err and "train with 'auto'" in err


def test_python_dash_m_fleximmt_runs_the_cli():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fleximmt", "inspect", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: fleximmt inspect" in result.stdout


# -- generate ---------------------------------------------------------------------------------
@pytest.fixture()
def scene(tmp_path, tiny_pipe):
    """A 32 x 32 image, two mask PNGs and two motion files for the tiny model."""
    image = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    for k, (y, x) in enumerate([(2, 2), (16, 16)]):
        mask = np.zeros((32, 32), np.uint8)
        mask[y : y + 12, x : x + 12] = 255
        Image.fromarray(mask).save(tmp_path / f"mask{k}.png")
        random_motion(tiny_pipe.transformer, 4, seed=k, name=f"m{k}", motion_words="jumps up").save(
            tmp_path / f"m{k}.safetensors"
        )
    return tmp_path


def objects(scene):
    return [
        "--object",
        f"{scene / 'mask0.png'}:{scene / 'm0.safetensors'}:jumps up",
        "--object",
        f"{scene / 'mask1.png'}:{scene / 'm1.safetensors'}:slides left",
    ]


def generate(scene, *args, prompt=PROMPT) -> list:
    """``fleximmt generate``'s arguments on the tiny model for the scene's image and ``prompt``, then ``args``."""
    return ["generate", "--model", "tiny", "--image", scene / "image.png", "--prompt", prompt, *args]


def test_generate_writes_a_video_a_gif_and_a_mask_overlay(scene, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli(
            generate(
                scene,
                "--steps",
                2,
                *objects(scene),
                "--out",
                scene / "out.mp4",
                "--masks-out",
                scene / "masks.mp4",
                "--gif",
            ),
            capsys,
        )
    assert code == 0, err
    video = iio.imread(scene / "out.mp4")
    overlay = iio.imread(scene / "masks.mp4")
    assert video.shape == (9, 32, 32, 3)
    assert overlay.shape == (9, 32, 32, 3)
    assert np.abs(overlay.astype(int) - video.astype(int)).mean() > 5  # the masks are drawn on it
    assert iio.imread(scene / "out.gif").shape[0] == 9
    assert all(f"wrote {scene / name}" in out for name in ("out.mp4", "out.gif", "masks.mp4"))
    assert "RANDOM weights" in caplog.text


def test_generate_shows_diffusers_progress_bar(scene, capsys):
    code, _, err = run_cli(generate(scene, "--steps", 2, *objects(scene), "--out", scene / "out.mp4"), capsys)
    assert code == 0, err
    assert "denoising" in err and "2/2" in err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("only-two:parts", "MASK.png:MOTION.safetensors:motion words"),
        ("{d}/mask0.png:{d}/m0.safetensors:", "MASK.png:MOTION.safetensors:motion words"),
        ("{d}/missing.png:{d}/m0.safetensors:jumps up", "missing.png' does not exist"),
        ("{d}/mask0.png:{d}/missing.safetensors:jumps up", "missing.safetensors' does not exist"),
        ("{d}/mask0.png:{d}/m0.safetensors:flies away", "were not found"),
    ],
)
def test_bad_object_exits_2_with_a_message_naming_it(scene, capsys, spec, message):
    code, _, err = run_cli(
        generate(scene, "--object", spec.format(d=scene), "--out", scene / "o.mp4", prompt="A ball jumps up."), capsys
    )
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (scene / "o.mp4").exists()


@pytest.mark.parametrize(
    "second, message",
    [
        (
            "{d}/mask1.png:{d}/missing.safetensors:slides left",
            "error: object 2: motion file '{d}/missing.safetensors' does not exist",
        ),
        ("{d}/mask1.png:{d}/m1.safetensors:flies away", "error: object 2: motion words 'flies away' were not found"),
        ("{d}/mask1.png", "error: object 2: --object '{d}/mask1.png': write MASK.png:MOTION.safetensors:motion words"),
    ],
)
def test_messages_name_the_object_by_its_place_among_the_object_options(scene, capsys, second, message):
    first = f"{scene / 'mask0.png'}:{scene / 'm0.safetensors'}:jumps up"
    code, _, err = run_cli(
        generate(scene, "--object", first, "--object", second.format(d=scene), "--out", scene / "o.mp4"), capsys
    )
    assert code == 2 and err.startswith(message.format(d=scene)), err


def test_an_empty_prompt_exits_2_saying_what_to_write(scene, capsys):
    code, _, err = run_cli(generate(scene, *objects(scene), "--out", scene / "o.mp4", prompt=""), capsys)
    assert code == 2 and err.startswith(
        "error: the prompt is empty, so the motion words 'jumps up' are not in it: "
        "write a prompt that describes the scene"
    )


def test_missing_image_and_bad_output_suffix_exit_2_before_loading_the_model(scene, capsys, monkeypatch):
    def no_model(args):
        raise AssertionError("the model was loaded although the input was bad")

    monkeypatch.setattr(cli, "load_pipeline", no_model)
    base = ["generate", "--model", "tiny", "--prompt", PROMPT, *objects(scene)]
    code, _, err = run_cli([*base, "--image", scene / "nope.png", "--out", scene / "o.mp4"], capsys)
    assert code == 2 and err.startswith("error: --image") and "does not exist" in err
    code, _, err = run_cli([*base, "--image", scene / "image.png", "--out", scene / "o.avi"], capsys)
    assert code == 2 and "o.avi" in err and ".mp4 or .gif" in err
    code, _, err = run_cli(
        [*base, "--image", scene / "image.png", "--out", scene / "o.mp4", "--masks-out", scene / "m"], capsys
    )
    assert code == 2 and ".mp4 or .gif" in err


def test_library_errors_exit_2_without_a_traceback(scene, capsys):
    code, _, err = run_cli(generate(scene, *objects(scene), "--alpha", 1.5, "--out", scene / "o.mp4"), capsys)
    assert code == 2 and err.startswith("error: alpha=1.5") and "Traceback" not in err


def test_an_empty_object_mask_exits_2_naming_the_object(scene, capsys):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(scene / "empty.png")
    code, _, err = run_cli(
        generate(
            scene,
            "--object",
            f"{scene / 'mask0.png'}:{scene / 'm0.safetensors'}:jumps up",
            "--object",
            f"{scene / 'empty.png'}:{scene / 'm1.safetensors'}:slides left",
            "--out",
            scene / "o.mp4",
        ),
        capsys,
    )
    assert code == 2 and err.startswith("error: object 2: the mask is empty") and "Traceback" not in err
    assert not (scene / "o.mp4").exists()


@pytest.mark.parametrize(
    "flags, passed",
    [
        ([], {}),
        (["--preset", "release"], {"preset": "release"}),
        (
            ["--preset", "release", "--rmpm-method", "paper", "--alpha", "0.1"],
            {"preset": "release", "rmpm_method": "paper", "alpha": 0.1},
        ),
        (["--anchors", "2", "--initial-masks", "none"], {"anchors": 2, "initial_masks": "none"}),
    ],
)
def test_generate_passes_fleximmts_options_only_as_given_so_a_preset_fills_the_rest(scene, capsys, flags, passed):
    from fleximmt.toy import tiny_pipeline

    pipe = tiny_pipeline(0)
    calls = []
    real_call = type(pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real_call(self, *args, **kwargs)

    options = ("mask_source", "anchors", "alpha", "rmpm_method", "initial_masks", "preset")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "load_pipeline", lambda args: pipe)
        patch.setattr(type(pipe), "__call__", spy)
        code, _, err = run_cli(generate(scene, "--steps", 1, *objects(scene), *flags, "--out", scene / "o.mp4"), capsys)
    assert code == 0, err
    assert {k: v for k, v in calls[0].items() if k in options} == passed


def test_an_unwritable_output_exits_2_without_a_traceback(scene, capsys):
    blocked = scene / "image.png" / "out.mp4"  # a file stands where the folder should be
    code, _, err = run_cli(generate(scene, "--steps", 1, *objects(scene), "--out", blocked), capsys)
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "image.png" in err and "Traceback" not in err


# -- inspect ----------------------------------------------------------------------------------
def test_inspect_prints_shape_and_metadata(scene, capsys):
    code, out, _ = run_cli(["inspect", scene / "m0.safetensors", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["blocks"] == 2 and info["d_m"] == 4 and info["dim"] == 32 and info["name"] == "m0"
    assert info["parameters"] == 2 * 4 * 32
    code, out, _ = run_cli(["inspect", scene / "m0.safetensors"], capsys)
    assert code == 0 and "jumps up" in out and "d_m" in out and "256" in out


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"junk", "not a readable safetensors")])
def test_inspect_of_a_bad_file_exits_2(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "m.safetensors").write_bytes(content)
    code, _, err = run_cli(["inspect", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and err.startswith("error: ") and message in err


# -- train ------------------------------------------------------------------------------------
def test_train_from_the_command_line_and_missing_options(tmp_path, capsys):
    iio.imwrite(tmp_path / "ref.mp4", moving_square(), fps=8, codec="libx264")
    code, out, err = run_cli(train_command("tiny", tmp_path / "ref.mp4", tmp_path / "m.safetensors", 3, 2), capsys)
    assert code == 0, err
    code, out, _ = run_cli(["inspect", tmp_path / "m.safetensors", "--json"], capsys)
    assert json.loads(out)["steps"] == 3 and json.loads(out)["concept_words"] == "ball"
    code, _, err = run_cli(["train", "--model", "tiny", "--video", tmp_path / "ref.mp4"], capsys)
    assert code == 2 and "--caption" in err


@pytest.mark.parametrize(
    "flags, passed",
    [
        ([], {}),
        (["--preset", "release"], {"preset": "release"}),
        (["--preset", "release", "--warmup-steps", "5"], {"preset": "release", "lr_warmup_steps": 5}),
        (["--vae-tiling", "--no-offload"], {"vae_tiling": True, "offload_after_caching": False}),
    ],
)
def test_train_passes_settings_only_as_given_so_a_preset_fills_the_rest(tmp_path, capsys, monkeypatch, flags, passed):
    from fleximmt.training import train

    calls = []
    monkeypatch.setattr(train, "train_motion", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cli, "load_pipeline", lambda args: None)
    code, _, err = run_cli(
        [*train_command("tiny", tmp_path / "ref.mp4", tmp_path / "m.safetensors", 3, 2), *flags], capsys
    )
    assert code == 0, err
    settings = {k: v for k, v in calls[0].items() if k not in ("steps", "tokens_per_motion", "seed", "resume")}
    assert settings == passed


# -- demo -------------------------------------------------------------------------------------
def test_demo_on_the_tiny_model_writes_its_outputs_and_says_the_weights_are_random(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(["demo", "--model", "tiny", "--out", out_dir, "--steps", 2], capsys)
    assert code == 0, err
    for name in ("fleximmt.mp4", "masks.mp4", "input.png", "mask_0.png", "mask_1.png", "demo.json"):
        assert (out_dir / name).is_file(), name
        assert str(out_dir / name) in out, name
    assert "RANDOM weights" in out and "noise" in out
    assert iio.imread(out_dir / "fleximmt.mp4").shape == (17, 64, 64, 3)
    assert iio.imread(out_dir / "masks.mp4").shape == (17, 64, 64, 3)
    assert [MotionTokens.load(out_dir / f"motion_{k}.safetensors").motion_words for k in (0, 1)] == [
        "jumps up",
        "slides left",
    ]


def test_demo_on_the_toy_model_learns_two_motions_and_compares_three_variants(tmp_path, capsys):
    import json

    out_dir = tmp_path / "demo"
    code, out, err = run_cli(["demo", "--out", out_dir, "--steps", 4, "--train-steps", 10], capsys)
    assert code == 0, err
    for name in (
        "fleximmt.mp4",
        "masks.mp4",
        "side_by_side.gif",
        "metrics.json",
        "input.png",
        "motions/zigzag.safetensors",
        "motions/bounce.safetensors",
    ):
        assert (out_dir / name).is_file(), name
        assert str(out_dir / name) in out, name
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"fleximmt", "no_masks", "plain_i2v"}
    for values in metrics["variants"].values():
        assert {"tf", "ff", "traj_err", "leak"} <= set(values) and len(values["objects"]) == 2
    gif = iio.imread(out_dir / "side_by_side.gif")
    assert gif.shape[0] == 17 and gif.shape[2] == 5 * 64 * 3  # references x2 | FlexiMMT | no masks | plain I2V
    assert "RANDOM" not in out
    code, out, err = run_cli(["demo", "--out", out_dir, "--steps", 4, "--train-steps", 10], capsys)
    assert code == 0 and "reusing the learned motion" in out


# -- save_video -------------------------------------------------------------------------------
FRAMES = (np.random.RandomState(1).rand(9, 30, 34, 3) * 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["a.gif", "a.mp4"])
def test_save_video_round_trips_frame_count_and_size(tmp_path, name):
    back = iio.imread(save_video(FRAMES, tmp_path / name))
    assert back.shape[:3] == (9, 30, 34)


def test_save_video_takes_pil_images_and_floats(tmp_path):
    pil = [Image.fromarray(f) for f in FRAMES[:4]]
    assert iio.imread(save_video(pil, tmp_path / "p.gif")).shape[0] == 4
    floats = FRAMES[:3].astype(np.float32) / 255
    assert iio.imread(save_video(floats, tmp_path / "f.mp4")).shape[:3] == (3, 30, 34)


def test_save_video_pads_odd_sizes_for_mp4(tmp_path):
    assert iio.imread(save_video(FRAMES[:, :29, :33], tmp_path / "odd.mp4")).shape[:3] == (9, 30, 34)


def test_save_video_rejects_bad_frames_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="\\[T, H, W, 3\\]"):
        save_video(np.zeros((9, 30, 34)), tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match=r".mp4 or .gif"):
        save_video(FRAMES, tmp_path / "bad.avi")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a.gif", "a.mp4"])
def test_save_video_failing_mid_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch, name):
    target = tmp_path / name
    target.write_bytes(b"the previous video")

    def crash(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a video")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(iio, "imwrite", crash)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        save_video(FRAMES, target)
    assert target.read_bytes() == b"the previous video"
    assert [p.name for p in tmp_path.iterdir()] == [name]


# -- mask_overlay -----------------------------------------------------------------------------
def test_mask_overlay_changes_exactly_the_pixels_of_the_mask_tokens():
    frames = np.full((9, 16, 16, 3), 100, np.uint8)
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 2, 1, 2] = True  # latent frame 2 = video frames 5..8, token (1, 2) = pixel rows 4-7, cols 8-11
    out = mask_overlay(frames, masks, temporal_factor=4)
    changed = (out != frames).any(-1)
    assert not changed[:5].any()
    expected = np.zeros((16, 16), bool)
    expected[4:8, 8:12] = True
    assert all((changed[t] == expected).all() for t in range(5, 9))


def test_mask_overlay_maps_frame_0_alone_then_4_frames_per_latent_frame():
    frames = np.zeros((9, 8, 8, 3), np.uint8)
    for latent, video_frames in [(0, [0]), (1, [1, 2, 3, 4]), (2, [5, 6, 7, 8])]:
        masks = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
        masks[0, latent] = True
        changed = (mask_overlay(frames, masks, temporal_factor=4) != 0).any(-1).any((1, 2))
        assert np.flatnonzero(changed).tolist() == video_frames


def test_mask_overlay_tints_each_object_in_its_own_colour_with_a_contour():
    frames = np.full((1, 12, 12, 3), 100, np.uint8)
    masks = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    masks[0, 0, 0, 0] = True  # pixels 0-3 x 0-3
    masks[1, 0, 2, 1:] = True  # pixels 8-11 x 4-11
    out = mask_overlay(frames, masks, alpha=0.5)[0].astype(float)
    assert np.allclose(out[1, 1], 0.5 * 100 + 0.5 * PALETTE[0], atol=0.5)  # inside: 50 % tint
    assert np.allclose(out[9, 6], 0.5 * 100 + 0.5 * PALETTE[1], atol=0.5)
    assert np.allclose(out[3, 1], PALETTE[0]) and np.allclose(out[8, 6], PALETTE[1])  # contours: full colour
    assert np.allclose(out[0, 1], 0.5 * 100 + 0.5 * PALETTE[0], atol=0.5)  # the frame's edge is no contour
    assert not np.allclose(PALETTE[0], PALETTE[1])
    assert (out[5, 5] == 100).all()  # outside every mask: unchanged
