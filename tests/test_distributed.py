"""Scale-out: `accelerate launch` runs the same training command in two processes.

On a machine without GPUs, accelerate's `--cpu` launcher starts one process unless MPI is set
up; `--multi_gpu --num_processes 2` starts two CPU processes through torchrun and gloo, which is
what these tests use (the training code sees the same `Accelerator` either way)."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from helpers import accelerate_launch, train_command
from safetensors import safe_open

from fleximmt.toy import tiny_pipeline


def launch(args, cwd):
    """``fleximmt -v ARGS`` in two processes, their output unbuffered (the log is read)."""
    return accelerate_launch(["-v", *args], cwd, env={"PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_pipeline(0).save_pretrained(root / "model")
    for k, step in enumerate((2, -2)):
        video = np.full((17, 32, 32, 3), 90, np.uint8)
        for t in range(17):
            x = 10 + step * t // 2
            video[t, 10:20, max(0, x) : max(0, x) + 10] = 200
        iio.imwrite(root / f"ref{k}.mp4", video, fps=8, codec="libx264")
    return root


def tokens_of(path):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("param.tokens"), f.get_tensor("rng")


def test_two_processes_share_one_motion_and_average_gradients(workspace):
    out = workspace / "shared.safetensors"
    result = launch(
        [*train_command(workspace / "model", workspace / "ref0.mp4", out, 4, 2), "--checkpoint-every", 2], workspace
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file()
    rank0, rng0 = tokens_of(out.with_name("shared.ckpt.safetensors"))
    rank1, rng1 = tokens_of(out.with_name("shared.ckpt.rank1.safetensors"))
    assert torch.equal(rank0, rank1)  # averaged gradients keep the replicas identical
    assert not torch.equal(rng0, rng1)  # while each process draws its own windows and noise
    with safe_open(str(out), framework="pt") as f:
        assert torch.equal(f.get_tensor("motion_tokens"), rank0)


def test_dataset_rows_are_shared_out_and_each_trained_once(workspace):
    rows = [
        {
            "video": "ref0.mp4",
            "caption": "A ball jumps up.",
            "concept_words": "ball",
            "motion_words": "jumps up",
            "name": "right",
        },
        {
            "video": "ref1.mp4",
            "caption": "A box slides left.",
            "concept_words": "box",
            "motion_words": "slides left",
            "name": "left",
        },
    ]
    (workspace / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = launch(
        [
            "train",
            "--model",
            workspace / "model",
            "--dataset",
            workspace / "rows.jsonl",
            "--out-dir",
            workspace / "motions",
            "--steps",
            2,
            "--tokens",
            2,
        ],
        workspace,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workspace / "motions" / "right.safetensors").is_file() and (
        workspace / "motions" / "left.safetensors"
    ).is_file()
    log = result.stderr
    assert log.count("trains") == 2
    assert "process 0 trains" in log and "process 1 trains" in log


def test_two_processes_train_one_wan_motion_with_two_experts(workspace):
    from fleximmt import FlexiMMTWanPipeline
    from fleximmt.toy.tiny import tiny_wan_components

    FlexiMMTWanPipeline(**tiny_wan_components(0, "2.2")).save_pretrained(workspace / "wan")
    out = workspace / "wan-shared.safetensors"
    result = launch(
        [
            *train_command(workspace / "wan", workspace / "ref0.mp4", out, 4, 2),
            "--checkpoint-every",
            2,
            "--height",
            32,
            "--width",
            32,
            "--frames",
            9,
        ],
        workspace,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = [out.with_name("wan-shared.ckpt.safetensors"), out.with_name("wan-shared.ckpt.rank1.safetensors")]
    for name in ("param.tokens", "param.tokens_2"):  # each expert's replicas stay identical across processes
        with safe_open(str(ckpts[0]), framework="pt") as a, safe_open(str(ckpts[1]), framework="pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"motion_tokens", "motion_tokens_2"} and f.metadata()["family"] == '"wan"'
