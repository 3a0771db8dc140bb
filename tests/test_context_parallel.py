"""Context parallelism with objects (diffusers' ``enable_parallelism``), run for real: two CPU processes
over gloo (``torch.distributed.run``), diffusers' Ulysses attention and its model plan for Wan, which
splits the video tokens before the first block. Each process runs every call once without context
parallelism first: the expectation is that single-process video, bit for bit or to float32 rounding.

Ring attention needs a backend that returns the log-sum-exp (flash, sage, cuDNN: CUDA), so it does not
run on a CPU; FlexiMMT meets it exactly as it meets Ulysses (``attn1`` is diffusers' own processor, and
``attn2`` is not parallel in diffusers' Wan), but that is untested here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

WORKER = Path(__file__).with_name("context_parallel_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("context_parallel")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(out),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ulysses_with_objects_gives_the_single_process_video_and_masks(ranks):
    for seen in ranks:
        ulysses = seen["ulysses"]
        assert ulysses["plain"] == 0.0  # without objects: diffusers' context parallelism, untouched
        assert ulysses["objects_matter"] > 1e-2
        assert ulysses["objects"] < 1e-5
        assert ulysses["masks_equal"]  # RMPM's masks of every step, gathered from both shares
        assert ulysses["gathers"] == [24, 24, 24]  # one gather of this process's 24 tokens after each of 3 steps
    assert [seen["ulysses"]["shards"] for seen in ranks] == [[[0, 24, [24, 24]]], [[24, 48, [24, 24]]]]


def test_both_experts_of_wan22_and_ti2v_run_sharded(ranks):
    for seen in ranks:
        assert seen["experts"]["objects"] < 1e-5 and seen["experts"]["masks_equal"]
        assert seen["ti2v"]["objects"] < 1e-5 and seen["ti2v"]["masks_equal"]
    assert [seen["ti2v"]["shards"] for seen in ranks] == [[[0, 6, [6, 6]]], [[6, 12, [6, 6]]]]


def test_what_cannot_shard_is_refused_with_the_fix(ranks):
    seen = ranks[0]
    assert "mask_source='rmpm'" in seen["qk"] and "DMEM" in seen["qk"]
    assert "training a motion with context parallelism" in seen["train"]
    assert "27 video tokens" in seen["uneven"] and "ulysses_anything=True" in seen["uneven"]
    assert "transformer_2" in seen["one_expert"]


def test_unequal_shares_gather_in_token_order(ranks):
    for seen in ranks:
        gathered = seen["uneven_gather"]
        assert gathered["sizes"] == [14, 13]
        assert gathered["gathered"] == [[3.0 * t, 3.0 * t + 1, 3.0 * t + 2] for t in range(27)]
