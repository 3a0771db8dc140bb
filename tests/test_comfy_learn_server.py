"""The native example workflows learn their motions and transfer them, in a real ComfyUI server: each family's
example (``comfyui/example_workflows/api/native_*.json``) posted to ``/prompt`` as shipped, its two *FlexiMMT Learn Motion
(native)* nodes learning from the bundled reference videos (``fleximmt.apps.comfy.examples``: a red ball jumping
up, a blue box sliding left) on ComfyUI's own MODEL, CLIP and VAE, then *Apply FlexiMMT* sampling with them.

At test size, as ``test_comfy_native_server.py`` runs the same examples: tiny models of ComfyUI's format, the
VAEs full size with random weights, the text encoders ComfyUI's own classes at a tiny size (test-only nodes),
SigLIP's tokens random; here also the references scaled to the test size and two training steps of four tokens
on 9-frame windows. Wan 2.2 A14B runs on ComfyUI 0.33 and 0.3.64, CogVideoX 1.5, HunyuanVideo 1.5 and LTX-2 on
0.33."""

import copy

import pytest
import torch
from comfy_native import needs_native
from comfy_server import load_workflow
from test_comfy_native_server import (  # noqa: F401 - pytest fixtures, and the examples at test size
    SIZE,
    cogvideox_prompt,
    hunyuan15_prompt,
    ltx2_prompt,
    native_models,
    saved_motions,
    tiny_prompt,
    video_frames,
)

from fleximmt import MotionTokens

pytestmark = pytest.mark.comfy

LEARN = "FlexiMMTLearnMotionNative"
STEPS, TOKENS, FRAMES = 2, 4, 9


@pytest.fixture(scope="module")
def inputs(comfy_server):
    """The examples' inputs in the server's ``input/`` folder, as ``python -m fleximmt.apps.comfy.examples`` writes them."""
    from fleximmt.apps.comfy.examples import write_inputs

    return write_inputs(comfy_server.base / "input")


def learning(prompt: dict, workflow: str, tag: str) -> dict:
    """``prompt`` (an example at test size, its motions loaded) with the example's learning back: its Learn
    nodes and their reference videos, at test size (two steps, four tokens, 9-frame windows of the references
    scaled to the test size), each motion named ``tag-<name>`` so no other test's file is in its way."""
    api = load_workflow(workflow)
    only_learning = set(api) - set(saved_motions(api))  # the nodes the tests of sampling leave out
    prompt = copy.deepcopy(prompt)
    for node, spec in api.items():
        if node in only_learning or spec["class_type"] == LEARN:
            prompt[node] = copy.deepcopy(spec)
        if spec["class_type"] == LEARN:
            inputs = prompt[node]["inputs"]
            inputs.update(steps=STEPS, tokens=TOKENS, frames=FRAMES, name=f"{tag}-{inputs['name']}")
        elif node in only_learning and spec["class_type"] == "ImageScale":  # a reference, to the test size
            prompt[node]["inputs"].update(width=SIZE, height=SIZE)
        elif (
            node in only_learning and spec["class_type"] == "CLIPVisionEncode"
        ):  # Load CLIP Vision builds SigLIP-so400m: random tokens
            image = prompt[node]["inputs"]["image"]
            prompt[node] = {
                "class_type": "TestOnlyTinyVisionTokens",
                "inputs": {"image": image, "seed": 1, "tokens": 9},
            }
    return prompt


def learned(server, prompt: dict, run) -> list[MotionTokens]:
    """The motions the prompt's Learn nodes saved, checked: each in ``models/fleximmt_motions`` with no checkpoint
    left beside it, its loss graph drawn (ComfyUI's *Plot Loss Graph*)."""
    motions = []
    folder = server.base / "models" / "fleximmt_motions"
    for spec in prompt.values():
        if spec["class_type"] == LEARN:
            name = spec["inputs"]["name"]
            assert (folder / f"{name}.safetensors").is_file() and not (folder / f"{name}.ckpt.safetensors").exists()
            motion = MotionTokens.load(folder / f"{name}.safetensors")
            assert (motion.metadata["steps"], motion.d_m) == (STEPS, TOKENS)
            assert (motion.caption, motion.motion_words) == (spec["inputs"]["caption"], spec["inputs"]["motion_words"])
            motions.append(motion)
    graphs = [node for node, spec in prompt.items() if spec["class_type"] == "LossGraphNode"]
    assert len(graphs) == len(motions) == 2
    for node in graphs:
        assert run.outputs(node)["images"]  # the loss graph, as ComfyUI's trainer's
    return motions


def test_the_native_wan_example_learns_its_motions_on_both_experts_and_transfers_them(
    comfy_server,
    native_models,  # noqa: F811 - the fixture imported above
    inputs,
):
    prompt = learning(tiny_prompt(native_models), "native_wan22_i2v", "wan-learned")
    run = comfy_server.run(prompt)
    assert run.status == "success", (run.error, comfy_server.log()[-3000:])
    for motion in learned(comfy_server, prompt, run):
        assert motion.family == "wan" and motion.num_experts == 2  # one token set per expert
    assert video_frames(comfy_server, run).shape[1:] == (SIZE, SIZE, 3)


# each 0.33-only example: its prompt fixture (at test size), workflow, motion name tag, family and video output node.
# LTX-2's Learn nodes take the checkpoint's MODEL and video VAE and the audio text encoder's CLIP; nothing of the
# audio VAE (the reference has no sound: training gives the audio stream noise)
NATIVE_033_EXAMPLES = [
    pytest.param(
        "cogvideox_prompt", "native_cogvideox15_i2v", "cog-learned", "cogvideox", "21", marks=needs_native("CogVideoX")
    ),
    pytest.param(
        "hunyuan15_prompt",
        "native_hunyuan15_i2v",
        "hy-learned",
        "hunyuanvideo15",
        "26",
        marks=needs_native("HunyuanVideo 1.5"),
    ),
    pytest.param("ltx2_prompt", "native_ltx2_i2v", "ltx2-learned", "ltx2", "30", marks=needs_native("LTX-2")),
]


@pytest.mark.parametrize("fixture, workflow, tag, family, video", NATIVE_033_EXAMPLES)
def test_each_native_example_learns_its_motions_and_transfers_them(
    comfy_server, inputs, request, fixture, workflow, tag, family, video
):
    prompt = learning(request.getfixturevalue(fixture), workflow, tag)
    run = comfy_server.run(prompt)
    assert run.status == "success", (run.error, comfy_server.log()[-3000:])
    assert all(m.family == family for m in learned(comfy_server, prompt, run))
    assert video_frames(comfy_server, run, video).shape[1:] == (SIZE, SIZE, 3)


def learn_only(prompt: dict, node: str, name: str, steps: int) -> dict:
    """The part of ``prompt`` one Learn node needs (it is an output node: it runs alone), ``steps`` long."""
    needed, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo += [v[0] for v in prompt[current]["inputs"].values() if isinstance(v, list)]
    alone = {k: copy.deepcopy(v) for k, v in prompt.items() if k in needed}
    alone[node]["inputs"].update(name=name, steps=steps)
    return alone


def test_a_cancelled_learn_keeps_a_checkpoint_and_queued_again_ends_on_the_uninterrupted_motion(
    comfy_server,
    native_models,  # noqa: F811 - the fixture imported above
    inputs,
):
    """Cancel (``/interrupt``) stops the Learn node at its next step with a checkpoint of it; the same node queued
    again continues from there and saves the motion an uninterrupted run saves (every draw comes from the
    checkpoint's generator)."""
    full = learning(tiny_prompt(native_models), "native_wan22_i2v", "cancel")
    whole = comfy_server.run(learn_only(full, "10", "uninterrupted", 6))
    assert whole.status == "success", (whole.error, comfy_server.log()[-3000:])
    prompt = learn_only(full, "10", "interrupted", 6)
    prompt_id = comfy_server.submit(prompt)
    comfy_server.wait_for_progress(prompt_id, "10", 2)
    comfy_server.interrupt(prompt_id)
    assert comfy_server.finish(prompt_id).interrupted
    folder = comfy_server.base / "models" / "fleximmt_motions"
    assert (folder / "interrupted.ckpt.safetensors").is_file() and not (folder / "interrupted.safetensors").exists()
    again = comfy_server.run(prompt)
    assert again.status == "success", again.error
    resumed, uninterrupted = (MotionTokens.load(folder / f"{n}.safetensors") for n in ("interrupted", "uninterrupted"))
    assert torch.equal(resumed.tokens, uninterrupted.tokens)
    assert not (folder / "interrupted.ckpt.safetensors").exists()
