"""One process of tests/test_context_parallel.py, started twice by ``torch.distributed.run`` (gloo, CPU).

Each process makes its tiny Wan pipelines, runs every call once without context parallelism (the
reference), then enables diffusers' context parallelism (``enable_parallelism``, Ulysses over the two
processes) and runs them again; it writes what it saw to ``<out>/rank<r>.json``.

diffusers needs an accelerator for ``enable_parallelism``: on a CPU its ``_resolve_parallel_config``
takes the process's device as ``rank % torch.accelerator.device_count()``, which is 0 here. This worker
says there is one device, the CPU; nothing else of diffusers' context parallelism is changed."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig
from PIL import Image

from fleximmt import ObjectMotion, train_motion
from fleximmt.method.attention import FlexiMMTState, VideoShard
from fleximmt.toy.tiny import random_motion, tiny_wan_pipeline

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]


def call(pipe, size, objects=True, **kw):
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))
    objs = []
    if objects:
        experts = 2 if getattr(pipe, "transformer_2", None) is not None else 1
        for k, (y0, y1, x0, x1) in enumerate(
            [(2, size // 2, 2, size // 2), (size // 3, size - 2, size // 3, size - 2)]
        ):
            mask = np.zeros((size, size), bool)
            mask[y0:y1, x0:x1] = True
            motion = random_motion(pipe.transformer, 4, seed=k + 1, scale=4.0, experts=experts)
            objs.append(ObjectMotion(mask, motion, WORDS[k]))
    out = pipe(
        image,
        PROMPT,
        height=size,
        width=size,
        num_frames=9,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        objects=objs,
        max_sequence_length=24,
        return_masks=objects,
        **kw,
    )
    return out.frames, (out.masks if objects else None)


def difference(a, b) -> float:
    return (a - b).abs().max().item()


def refusal(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return ""


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.accelerator.device_count = lambda: 1  # see the module's docstring
    rank = dist.get_rank()
    seen = {"rank": rank}
    shards, gathers = [], []
    check_shard, gather = FlexiMMTState.check_shard, VideoShard.gather

    def record_shard(self):  # every state checks the shard it is made with
        shard = self.shard
        shards.append(None if shard is None else [shard.start, shard.stop, list(shard.sizes)])
        return check_shard(self)

    def record_gather(self, local):
        gathers.append(local.shape[0])
        return gather(self, local)

    FlexiMMTState.check_shard, VideoShard.gather = record_shard, record_gather

    # Wan 2.1, 48 video tokens (64 x 64 x 9): Ulysses over two processes, 24 tokens each
    pipe = tiny_wan_pipeline(0, version="2.1")
    ref_plain, _ = call(pipe, 64, objects=False)
    ref, ref_masks = call(pipe, 64)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    shards.clear(), gathers.clear()
    plain, _ = call(pipe, 64, objects=False)
    frames, masks = call(pipe, 64)
    seen["ulysses"] = dict(
        plain=difference(plain, ref_plain),
        objects=difference(frames, ref),
        masks_equal=bool(torch.equal(masks, ref_masks)),
        objects_matter=difference(ref, ref_plain),
        shards=list(shards),
        gathers=list(gathers),
    )
    seen["qk"] = refusal(lambda: call(pipe, 64, mask_source="qk"))
    video = np.full((9, 64, 64, 3), 90, np.uint8)
    seen["train"] = refusal(
        lambda: train_motion(
            pipe,
            video,
            "A ball jumps up.",
            "ball",
            "jumps up",
            out / f"motion{rank}.safetensors",
            steps=1,
            tokens_per_motion=2,
            height=64,
            width=64,
            num_frames=9,
        )
    )

    # 27 video tokens (48 x 48 x 9) do not split in two: refused with the fix (ContextParallelConfig's
    # ulysses_anything cuts 14 + 13, but diffusers' own gather of unequal shares needs NCCL, not gloo);
    # RMPM's gather of unequal shares, as that cut makes them, runs on gloo
    seen["uneven"] = refusal(lambda: call(pipe, 48))
    shard = VideoShard.of(27, rank, 2)
    local = torch.arange(27 * 3, dtype=torch.float32).view(27, 3)[shard.start : shard.stop]
    seen["uneven_gather"] = dict(sizes=list(shard.sizes), gathered=gather(shard, local).tolist())

    # Wan 2.2 I2V-A14B: two experts, each with its own motion tokens; context parallelism on both or on none
    pipe = tiny_wan_pipeline(0, version="2.2")
    ref, ref_masks = call(pipe, 64)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    seen["one_expert"] = refusal(lambda: call(pipe, 64))
    pipe.transformer_2.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    frames, masks = call(pipe, 64)
    seen["experts"] = dict(objects=difference(frames, ref), masks_equal=bool(torch.equal(masks, ref_masks)))

    # Wan 2.2 TI2V-5B: per-token timesteps, which diffusers' plan splits with the video tokens
    pipe = tiny_wan_pipeline(0, version="2.2-ti2v")
    ref, ref_masks = call(pipe, 64)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    shards.clear()
    frames, masks = call(pipe, 64)
    seen["ti2v"] = dict(
        objects=difference(frames, ref), masks_equal=bool(torch.equal(masks, ref_masks)), shards=list(shards)
    )

    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
