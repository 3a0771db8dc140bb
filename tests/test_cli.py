"""The command line and the video writers."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from fleximmt.cli import main
from fleximmt.toy import random_motion, tiny_pipeline
from fleximmt.video import mask_overlay, save_video


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command, options", [
    ("generate", ["--object", "--masks-out", "--cpu-offload", "--vae-tiling", "--gif", "--steps", "--seed", "--model"]),
    ("train", ["--video", "--caption", "--concept", "--motion-words", "--dataset", "--resume", "--mixed-precision",
               "--gradient-checkpointing", "--checkpoint-every", "--lr", "--tokens", "--frames", "--fps"]),
    ("inspect", ["--json"]),
    ("demo", ["--out"]),
])  # fmt: skip
def test_help_explains_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, option


@pytest.fixture()
def scene(tmp_path):
    pipe = tiny_pipeline(0)
    image = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    for k, (y, x) in enumerate([(2, 2), (16, 16)]):
        mask = np.zeros((32, 32), np.uint8)
        mask[y : y + 12, x : x + 12] = 255
        Image.fromarray(mask).save(tmp_path / f"mask{k}.png")
        random_motion(pipe.transformer, 4, seed=k, name=f"m{k}", motion_words="jumps up").save(tmp_path / f"m{k}.safetensors")
    return tmp_path


def test_generate_writes_a_video_and_a_mask_overlay(scene, capsys):
    code, out, err = run_cli(["generate", "--model", "tiny", "--image", scene / "image.png",
                              "--prompt", "A ball jumps up. A box slides left.", "--steps", 2,
                              "--object", f"{scene / 'mask0.png'}:{scene / 'm0.safetensors'}:jumps up",
                              "--object", f"{scene / 'mask1.png'}:{scene / 'm1.safetensors'}:slides left",
                              "--out", scene / "out.mp4", "--masks-out", scene / "masks.mp4", "--gif"], capsys)  # fmt: skip
    assert code == 0, err
    video = iio.imread(scene / "out.mp4")
    assert video.shape == (9, 32, 32, 3)
    assert iio.imread(scene / "masks.mp4").shape == (9, 32, 32, 3)
    assert iio.imread(scene / "out.gif").shape[0] == 9
    assert "wrote" in out


@pytest.mark.parametrize("spec, message", [
    ("only-two:parts", "MASK.png:MOTION.safetensors:motion words"),
    ("{d}/missing.png:{d}/m0.safetensors:jumps up", "does not exist"),
    ("{d}/mask0.png:{d}/missing.safetensors:jumps up", "does not exist"),
    ("{d}/mask0.png:{d}/m0.safetensors:flies away", "were not found"),
])  # fmt: skip
def test_bad_generate_input_exits_2_with_a_message(scene, capsys, spec, message):
    code, _, err = run_cli(["generate", "--model", "tiny", "--image", scene / "image.png", "--prompt",
                            "A ball jumps up.", "--object", spec.format(d=scene), "--out", scene / "o.mp4"], capsys)  # fmt: skip
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_inspect_prints_shape_and_metadata(scene, capsys):
    code, out, _ = run_cli(["inspect", scene / "m0.safetensors", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["blocks"] == 2 and info["d_m"] == 4 and info["dim"] == 32 and info["name"] == "m0"
    assert info["parameters"] == 2 * 4 * 32
    code, out, _ = run_cli(["inspect", scene / "m0.safetensors"], capsys)
    assert "jumps up" in out and "d_m" in out
    (scene / "junk.safetensors").write_bytes(b"junk")
    code, _, err = run_cli(["inspect", scene / "junk.safetensors"], capsys)
    assert code == 2 and "not a readable safetensors" in err


def test_train_from_the_command_line_and_missing_options(tmp_path, capsys):
    video = np.full((9, 32, 32, 3), 90, np.uint8)
    for t in range(9):
        video[t, 10:20, 2 + 2 * t : 12 + 2 * t] = 200
    iio.imwrite(tmp_path / "ref.mp4", video, fps=8, codec="libx264")
    code, out, err = run_cli(["train", "--model", "tiny", "--video", tmp_path / "ref.mp4", "--caption", "A ball jumps up.",
                              "--concept", "ball", "--motion-words", "jumps up", "--out", tmp_path / "m.safetensors",
                              "--steps", 3, "--tokens", 2], capsys)  # fmt: skip
    assert code == 0, err
    code, out, _ = run_cli(["inspect", tmp_path / "m.safetensors", "--json"], capsys)
    assert json.loads(out)["steps"] == 3 and json.loads(out)["concept_words"] == "ball"
    code, _, err = run_cli(["train", "--model", "tiny", "--video", tmp_path / "ref.mp4"], capsys)
    assert code == 2 and "--caption" in err


def test_demo_writes_its_outputs_and_says_the_weights_are_random(tmp_path, capsys):
    code, out, err = run_cli(["demo", "--out", tmp_path / "demo", "--steps", 2], capsys)
    assert code == 0, err
    for name in ("fleximmt.mp4", "masks.mp4", "input.png", "mask_0.png", "mask_1.png", "demo.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "RANDOM weights" in out
    assert iio.imread(tmp_path / "demo" / "fleximmt.mp4").shape == (17, 64, 64, 3)


def test_save_video_round_trips_and_is_atomic(tmp_path):
    frames = (np.random.RandomState(1).rand(9, 30, 34, 3) * 255).astype(np.uint8)
    assert iio.imread(save_video(frames, tmp_path / "a.gif")).shape[0] == 9
    assert iio.imread(save_video(frames, tmp_path / "a.mp4")).shape[:3] == (9, 30, 34)
    with pytest.raises(ValueError, match="\\[T, H, W, 3\\]"):
        save_video(np.zeros((9, 30, 34)), tmp_path / "bad.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.mp4"]  # no partial or temporary file


def test_mask_overlay_tints_exactly_the_mask_tokens():
    frames = np.full((9, 16, 16, 3), 100, np.uint8)
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 2, 1, 2] = True  # latent frame 2 = video frames 5..8, token (1, 2) = pixels rows 4-7, cols 8-11
    out = mask_overlay(frames, masks, temporal_factor=4)
    changed = (out != frames).any(-1)
    assert not changed[:5].any()
    expected = np.zeros((16, 16), bool)
    expected[4:8, 8:12] = True
    assert all((changed[t] == expected).all() for t in range(5, 9))
