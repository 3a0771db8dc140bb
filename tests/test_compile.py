"""``fleximmt.compile``: the pipeline's transformer blocks compiled (regional compilation, fullgraph),
with FlexiMMT's processors, on both families. The masks - which RMPM changes at every step, and DMEM in
every block of every training step - never reach the graph's shapes: with ``mask_kernel="flex"``
they are a block mask of fixed size; with "auto" the video query groups, whose sizes follow the masks,
run inside opaque operators (``fleximmt.method.opaque``). Once warm, no step, no call with other masks
and no training step compiles again (torch._dynamo's own counters), and the compiled results equal eager.

Every block is the same graph (the processors hand the state their block as a tensor inside it), so a
model of more blocks than torch._dynamo's ``recompile_limit`` compiles regionally, once."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

import fleximmt
from fleximmt import ObjectMotion
from fleximmt.method.attention import FlexiMMTState, motion_state_for
from fleximmt.method.kernels.grouped import GroupedJoint
from fleximmt.method.masks import span_membership
from fleximmt.models import adapter_for
from fleximmt.toy.tiny import random_motion, tiny_pipeline, tiny_wan_pipeline
from fleximmt.training.train import TRAIN_PARTS

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]


def pipeline(family, **config):
    return tiny_pipeline(0, **config) if family == "cogvideox" else tiny_wan_pipeline(0, version="2.1", **config)


def sizes(family):
    """(height = width, text length) of a call."""
    return (32, 16) if family == "cogvideox" else (64, 24)


def run(pipe, family, objects, graphs, backend="flex", output_type="pt"):
    size, text_len = sizes(family)
    image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))

    def count(_pipe, step, timestep, kwargs):
        graphs.append(counters["stats"]["unique_graphs"])
        return {}

    return pipe(
        image,
        PROMPT,
        height=size,
        width=size,
        num_frames=9,
        num_inference_steps=4,
        output_type=output_type,
        generator=torch.Generator().manual_seed(0),
        objects=objects,
        mask_kernel=backend,
        callback_on_step_end=count,
        max_sequence_length=text_len,
    ).frames


def boxes(pipe, size, shift):
    out = []
    for k, (y0, y1, x0, x1) in enumerate(
        [(2, size // 2, 2, size // 2), (size // 3, size - 2, size // 3 + shift, size - 2)]
    ):
        mask = np.zeros((size, size), bool)
        mask[y0:y1, x0:x1] = True
        out.append(ObjectMotion(mask, random_motion(pipe.transformer, 4, seed=k + 1, scale=4.0), WORDS[k]))
    return out


def group_sizes(layout) -> tuple[int, ...]:
    """How many real video queries each of an auto layout's attention calls has: what a traced graph's shapes would follow."""
    merged = (layout.num_merged,) if isinstance(layout, GroupedJoint) else ()
    return tuple(sorted(group.count for group in layout.groups)) + merged


def relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_compiled_blocks_with_flex_compile_once_across_steps_and_masks(family):
    pipe = pipeline(family, num_layers=1)
    size = sizes(family)[0]
    eager = run(pipe, family, boxes(pipe, size, 0), [])
    torch._dynamo.reset()
    counters.clear()
    fleximmt.compile(pipe)  # CogVideoX: FlexiMMT names its repeated block; Wan: diffusers' own
    graphs = []
    compiled = run(pipe, family, boxes(pipe, size, 0), graphs)
    run(pipe, family, boxes(pipe, size, 6), graphs)  # other masks, RMPM's new masks at every step
    assert graphs[0] > 0 and not counters["graph_break"]
    assert graphs[1:] == [graphs[1]] * (len(graphs) - 1)  # warm after the first step: nothing compiles again
    assert relative(compiled, eager) < 1e-4


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_compiled_blocks_with_auto_compile_once_though_the_groups_change_shape(family, monkeypatch):
    """The auto backend's groups change size with RMPM's masks at every step and with the objects' masks
    between calls; inside the compiled graph they are an opaque operator's business: once warm nothing
    compiles again, and the latents are eager's."""
    pipe = pipeline(family, num_layers=1)
    size = sizes(family)[0]
    seen = []
    set_video_masks = FlexiMMTState.set_video_masks

    def spy(self, video_masks, video=0, parts=None):
        set_video_masks(self, video_masks, video, parts)
        seen.append(group_sizes(self.layouts.step_layouts[video]))

    monkeypatch.setattr(FlexiMMTState, "set_video_masks", spy)
    calls = [boxes(pipe, size, 0), boxes(pipe, size, 6)]
    eager = [run(pipe, family, objects, [], "auto", "latent") for objects in calls]
    assert len(set(seen)) > 2  # the groups' shapes changed from step to step and call to call
    torch._dynamo.reset()
    counters.clear()
    fleximmt.compile(pipe)
    graphs = []
    compiled = [run(pipe, family, objects, graphs, "auto", "latent") for objects in calls]
    assert graphs[0] > 0 and not counters["graph_break"]
    assert graphs == [graphs[0]] * len(graphs), graphs  # warm after the first step: nothing compiles again
    assert seen[len(seen) // 2 :] == seen[: len(seen) // 2]  # the compiled calls' RMPM found eager's groups
    for ours, theirs in zip(compiled, eager):
        assert relative(ours, theirs) < 1e-5
    assert relative(eager[1], eager[0]) > 1e-3  # the second call's masks made another video


def train_steps(pipe, steps: int, graphs: list, seen: list) -> list[torch.Tensor]:
    """``steps`` training steps (DMEM's masks in every block, with its random drop) of one motion's tokens,
    from the same start and noise each time; the tokens' gradient of each step."""
    adapter = adapter_for(pipe)
    size, text_len = sizes(adapter.family)
    adapter.install_processors()
    for transformer in adapter.transformers():
        transformer.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    clip = torch.rand(3, 9, size, size, generator=gen) * 2 - 1
    with torch.no_grad():
        cond = adapter.encode_conditions([clip], "A ball jumps up.", text_len, gen)
    member, concept = (
        span_membership(text_len, adapter.word_spans("A ball jumps up.", [words], text_len))
        for words in ("jumps up", "ball")
    )
    grid = adapter.token_grid(size, size, 9)
    blocks, dim = adapter.motion_shape()
    tokens = torch.nn.Parameter(torch.randn(blocks, 4, dim, generator=gen) * 0.5)
    state = motion_state_for(
        tokens[None, None],
        member,
        **adapter.state_settings(),
        parts=TRAIN_PARTS & set(adapter.parts),
        num_frames=grid.frames,
        dmem=True,
        concept_member=concept,
        dmem_drop=0.2,
        generator=torch.Generator().manual_seed(1),
    )
    noise, grads = torch.Generator().manual_seed(2), []
    with adapter.training_attached(state):
        for _ in range(steps):
            state.set_motion_tokens(tokens[None, None])
            state.begin_step(grid.size, blocks)
            batch = adapter.training_prediction(state, cond, 0, noise, 0.0, contextlib.nullcontext)
            loss = (batch.weight * (batch.x0_hat - batch.x0) ** 2).mean()
            tokens.grad = None
            loss.backward()
            grads.append(tokens.grad.clone())
            graphs.append(counters["stats"]["unique_graphs"])
            seen.append(tuple(group_sizes(layout) for layout in state.layouts.dmem_layouts.values()))
    return grads


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_a_compiled_training_step_with_auto_compiles_once_and_gives_eager_gradients(family):
    """Training through compiled blocks (two: the second block's queries carry the first block's tokens'
    gradient): DMEM's per-block masks, new at every step, stay inside the operator, whose backward
    recomputes it; after the first step nothing compiles again, and the motion tokens' gradients are eager's."""
    pipe = pipeline(family)
    seen = []
    eager = train_steps(pipe, 3, [], seen)
    assert len(set(seen)) > 1  # DMEM's groups changed shape between steps
    torch._dynamo.reset()
    counters.clear()
    fleximmt.compile(pipe)
    graphs, seen_compiled = [], []
    compiled = train_steps(pipe, 3, graphs, seen_compiled)
    assert graphs[0] > 0 and not counters["graph_break"]
    assert graphs == [graphs[0]] * len(graphs), graphs  # warm after the first step: nothing compiles again
    assert seen_compiled == seen  # DMEM, inside the operator, found eager's groups in every block
    for ours, theirs in zip(compiled, eager):
        assert theirs.norm() > 0 and relative(ours, theirs) < 1e-5


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_a_model_with_more_blocks_than_dynamos_recompile_limit_compiles_once_regionally(family, backend):
    """Every block traces to one graph: the processors hand the state their block as a tensor inside the
    graph (``BlockProcessor.block``) and RMPM's capture is an operator, so a model with more blocks than
    ``torch._dynamo.config.recompile_limit`` (8; CogVideoX-5B has 42, Wan 2.1 14B 40) compiles regionally
    with ``fullgraph=True`` - none again over steps and a call with other masks - and its latents are
    eager's. At most two graphs, whatever the number of blocks: CogVideoX's first block takes its input in
    other strides than the rest (a second graph, FlexiMMT or not); Wan's conditional and unconditional
    forwards, RMPM's features from the first only, may trace apart."""
    num_layers = torch._dynamo.config.recompile_limit + 1
    pipe = pipeline(family, num_layers=num_layers)
    size = sizes(family)[0]
    eager = run(pipe, family, boxes(pipe, size, 0), [], backend, "latent")
    torch._dynamo.reset()
    counters.clear()
    fleximmt.compile(pipe, backend="eager")  # dynamo alone: the graphs are its business
    plain = []
    run(pipe, family, [], plain, backend, "latent")
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    compiled = run(pipe, family, boxes(pipe, size, 0), graphs, backend, "latent")
    run(pipe, family, boxes(pipe, size, 6), graphs, backend, "latent")
    assert graphs == [graphs[0]] * len(graphs) and plain[-1] <= graphs[0] <= 2 < num_layers, (graphs, plain)
    assert not counters["graph_break"]
    assert relative(compiled, eager) < 1e-5


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_a_training_step_through_more_blocks_than_the_recompile_limit_compiles_once_regionally(family):
    """DMEM's masks in every one of recompile_limit + 1 blocks, each block's motion tokens selected in the
    one graph: after the first step nothing compiles again and the gradients are eager's."""
    pipe = pipeline(family, num_layers=torch._dynamo.config.recompile_limit + 1)
    eager = train_steps(pipe, 2, [], [])
    torch._dynamo.reset()
    counters.clear()
    fleximmt.compile(pipe, backend="aot_eager")  # dynamo and AOT autograd: the backward's graph too
    graphs = []
    compiled = train_steps(pipe, 2, graphs, [])
    assert graphs == [graphs[0]] * len(graphs) and graphs[0] <= 2 and not counters["graph_break"], graphs
    for ours, theirs in zip(compiled, eager):
        assert theirs.norm() > 0 and relative(ours, theirs) < 1e-5


def test_whole_model_compilation_of_more_blocks_than_the_recompile_limit_compiles_once():
    """The way round it today: ``regional=False`` traces the blocks' loop once, each block's index a
    constant of one graph, and with "auto" nothing compiles again over steps and calls with other masks."""
    pipe = tiny_pipeline(0, num_layers=torch._dynamo.config.recompile_limit + 1)
    torch._dynamo.reset()
    counters.clear()
    fleximmt.compile(pipe, regional=False, backend="aot_eager")  # dynamo and AOT autograd (inductor: shown above)
    graphs = []
    for shift in (0, 6):
        run(pipe, "cogvideox", boxes(pipe, 32, shift), graphs, "auto", "latent")
    assert graphs == [1] * len(graphs) and not counters["graph_break"]


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_inside_the_operators_the_groups_take_the_backend_set_on_the_model(family, monkeypatch):
    """The attention a processor passes crosses into the opaque operators by name: compiled with "auto",
    the grouped calls run on the backend chosen with ``set_attention_backend``, as eager's do."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    calls = []
    math = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]

    def recorded(*args, **kwargs):
        if not torch.compiler.is_compiling():  # the calls run by the operators (traced ones are the graph's)
            calls.append(kwargs.get("attn_mask") is not None)
        return math(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, recorded)
    pipe = pipeline(family, num_layers=2)
    size = sizes(family)[0]
    try:
        pipe.transformer.set_attention_backend("_native_math")
        eager = run(pipe, family, boxes(pipe, size, 0), [], "auto", "latent")
        eager_calls = len(calls)
        torch._dynamo.reset()
        fleximmt.compile(pipe, backend="eager")
        calls.clear()
        compiled = run(pipe, family, boxes(pipe, size, 0), [], "auto", "latent")
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
    assert eager_calls and calls  # before, the operators' calls went to SDPA directly: none here
    if family == "cogvideox":  # every attention of its blocks is inside the operator: all of eager's calls
        assert len(calls) == eager_calls
    assert relative(compiled, eager) < 1e-5
