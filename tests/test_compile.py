"""``fleximmt.compile``: the pipeline's transformer blocks compiled (regional compilation, fullgraph),
with FlexiMMT's processors, on both families. With ``attention_backend="flex"`` the masks - which
RMPM changes at every step - never reach the graph's shapes: once warm, no step and no call with
other masks compiles again (torch._dynamo's own counters). Inference only: a CPU has no
FlexAttention backward."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

import fleximmt
from fleximmt import ObjectMotion
from fleximmt.toy.tiny import random_motion, tiny_pipeline, tiny_wan_pipeline

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]


def run(pipe, size, objects, graphs, extra):
    image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))

    def count(_pipe, step, timestep, kwargs):
        graphs.append(counters["stats"]["unique_graphs"])
        return {}

    return pipe(image, PROMPT, height=size, width=size, num_frames=9, num_inference_steps=4, output_type="pt",
                generator=torch.Generator().manual_seed(0), objects=objects, attention_backend="flex",
                callback_on_step_end=count, **extra).frames  # fmt: skip


def boxes(pipe, size, shift):
    out = []
    for k, (y0, y1, x0, x1) in enumerate([(2, size // 2, 2, size // 2), (size // 3, size - 2, size // 3 + shift, size - 2)]):
        mask = np.zeros((size, size), bool)
        mask[y0:y1, x0:x1] = True
        out.append(ObjectMotion(mask, random_motion(pipe.transformer, 4, seed=k + 1, scale=4.0), WORDS[k]))
    return out


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_compiled_blocks_with_flex_compile_once_across_steps_and_masks(family):
    pipe = tiny_pipeline(0) if family == "cogvideox" else tiny_wan_pipeline(0, version="2.1")
    size, extra = (32, dict(max_sequence_length=16)) if family == "cogvideox" else (64, dict(max_sequence_length=24))
    eager = run(pipe, size, boxes(pipe, size, 0), [], extra)
    torch._dynamo.reset()
    counters.clear()
    fleximmt.compile(pipe)  # CogVideoX: FlexiMMT names its repeated block; Wan: diffusers' own
    graphs = []
    compiled = run(pipe, size, boxes(pipe, size, 0), graphs, extra)
    run(pipe, size, boxes(pipe, size, 6), graphs, extra)  # other masks, RMPM's new masks at every step
    assert graphs[0] > 0 and not counters["graph_break"]
    assert graphs[1:] == [graphs[1]] * (len(graphs) - 1)  # warm after the first step: nothing compiles again
    assert ((compiled - eager).norm() / eager.norm()).item() < 1e-4
