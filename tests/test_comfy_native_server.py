"""The native patch in a real ComfyUI server (0.33 and 0.3.64, as `make test-comfy` runs them): each
family's example workflow posted to ``/prompt`` on tiny models, with motions fleximmt's ``train_motion``
learned on the diffusers pipeline of the same weights.

``comfyui/example_workflows/api/native_wan22_i2v.json`` (Wan 2.2 I2V A14B: two experts, each patched by
*FlexiMMT Apply* with its own token set, ComfyUI's own loaders, WanImageToVideo, KSamplerAdvanced x 2,
VAE Decode, Create / Save Video); ``native_cogvideox15_i2v.json`` (CogVideoX 1.5 I2V: the image through
InstructPixToPixConditioning as the first latent frame, EmptyHunyuanLatentVideo, KSampler) and
``native_hunyuan15_i2v.json`` (HunyuanVideo 1.5 I2V as ComfyUI's own template builds it:
HunyuanVideo15ImageToVideo with the start image and SigLIP's tokens, CFGGuider, SamplerCustomAdvanced) and
``native_ltx2_i2v.json`` (LTX-2 I2V as the first stage of ComfyUI's own template builds it: one checkpoint
through *Load Checkpoint*, *Load LTXV Audio Text Encoder* and *Load LTXV Audio VAE*, the image put in place in
the video latent, an empty audio latent beside it, LTXVScheduler, CFGGuider, SamplerCustomAdvanced, video and
audio decoded into one video), all three ComfyUI 0.33 only.

Tiny stand-ins, said here as the issue asks: the two Wan experts are tiny (fleximmt's tiny diffusers
Wan 2.2 transformers saved under ComfyUI's key names, loaded by ComfyUI's own *Load Diffusion Model*);
the VAE is full size with random weights (ComfyUI's *Load VAE* reads a fixed config); *Load CLIP*
is replaced by the test-only ``TestOnlyTinyUMT5`` (ComfyUI's umT5 class at one layer:
tests/comfy_test_nodes.py), because its umT5-XXL config is fixed at 5.7B parameters. The same for the other
families: their VAEs full size with random weights, their text encoders ComfyUI's own classes at a tiny size
with the real tokenizers (``TestOnlyTinyCogVideoXT5``, ``TestOnlyTinyHunyuanVideo15TextEncoder``), SigLIP's
image tokens random (``TestOnlyTinyVisionTokens``: *Load CLIP Vision* builds SigLIP-so400m). LTX-2's checkpoint
holds the tiny transformer at ComfyUI's 128 latent channels and ComfyUI's own video VAE, audio VAE and vocoder at
the smallest sizes its loaders take (their settings in the file's metadata, as LTX-2 checkpoints carry them:
tests/comfy_ltx2.py); its Gemma 3 12B is ``TestOnlyTinyLTXAVGemma`` (ComfyUI's Gemma class at two layers, its LTX-2
tokenizer on fleximmt's tiny Gemma-style sentencepiece model: the real one ships inside the 12B checkpoint only)."""

import copy

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from comfy_native import needs_native
from comfy_server import load_workflow
from comfy_wan import SHAPE, comfy_state_dict, write_wan_vae
from PIL import Image

from fleximmt import train_motion
from fleximmt.toy.tiny import tiny_wan_components

pytestmark = pytest.mark.comfy

SIZE, LENGTH, STEPS = 64, 9, 4
WORKFLOW = "native_wan22_i2v"


def square_video(dy: int, dx: int, colour, length: int = LENGTH) -> np.ndarray:
    frames = np.full((length, SIZE, SIZE, 3), 90, np.uint8)
    for f in range(length):
        y, x = 24 + dy * f, 24 + dx * f
        frames[f, y : y + 16, x : x + 16] = colour
    return frames


def write_scene(base, api: dict, image_node: str, mask_nodes: tuple[str, str]) -> None:
    """The example's image (a red ball and a blue box on grey) and the two objects' masks, in the server's input/."""
    scene = np.full((SIZE, SIZE, 3), 90, np.uint8)
    scene[8:24, 8:24], scene[36:52, 36:52] = (220, 30, 30), (30, 30, 220)
    Image.fromarray(scene).save(base / "input" / api[image_node]["inputs"]["image"])
    for node, (y, x) in zip(mask_nodes, ((8, 8), (36, 36))):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[y - 4 : y + 20, x - 4 : x + 20] = 255
        Image.fromarray(mask).save(base / "input" / api[node]["inputs"]["image"])


def train_two_motions(pipe, folder, names: tuple[str, str], length: int = LENGTH, size: int = SIZE) -> None:
    """The example's two motions learned by ``train_motion`` on ``pipe``: a red ball jumping up, a blue box
    sliding left."""
    settings = dict(
        steps=2, tokens_per_motion=4, lr_warmup_steps=0, height=size, width=size, num_frames=length, max_windows=1
    )
    train_motion(
        pipe,
        square_video(-2, 0, (220, 30, 30), length),
        "A red ball jumps up.",
        "ball",
        "jumps up",
        folder / names[0],
        **settings,
    )
    train_motion(
        pipe,
        square_video(0, -2, (30, 30, 220), length),
        "A blue box slides left.",
        "box",
        "slides left",
        folder / names[1],
        **settings,
    )


def saved_motions(api: dict) -> dict:
    """The example with each *Learn Motion (native)* node a *Load Motion* of the motion it saves (these tests
    sample with motions ``train_motion`` learned; ``test_comfy_learn_server.py`` runs the learning), and the nodes
    only learning used (the reference videos, the loss graphs) left out."""
    prompt = copy.deepcopy(api)
    for node, spec in api.items():
        if spec["class_type"] == "FlexiMMTLearnMotionNative":
            prompt[node] = {
                "class_type": "FlexiMMTLoadMotion",
                "inputs": {"motion": spec["inputs"]["name"] + ".safetensors"},
            }
        elif spec["class_type"] == "LossGraphNode":
            del prompt[node]
    needed, todo = set(), [node for node, spec in prompt.items() if spec["class_type"] == "SaveVideo"]
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo += [value[0] for value in prompt[node]["inputs"].values() if isinstance(value, list)]
    return {node: spec for node, spec in prompt.items() if node in needed}


def model_folders(base):
    models = base / "models"
    for sub in ("diffusion_models", "vae", "fleximmt_motions"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    return models


@pytest.fixture(scope="module")
def native_models(comfy_server):
    """Tiny Wan 2.2 experts, the random VAE, two learned motions and the inputs, in the server's folders."""
    from diffusers import WanImageToVideoPipeline
    from safetensors.torch import save_file

    base = comfy_server.base
    models = model_folders(base)
    pipe = WanImageToVideoPipeline(**tiny_wan_components(0, "2.2", **SHAPE))
    pipe.set_progress_bar_config(disable=True)
    api = saved_motions(load_workflow(WORKFLOW))
    for node, transformer in (("1", pipe.transformer), ("2", pipe.transformer_2)):
        save_file(comfy_state_dict(transformer), str(models / "diffusion_models" / api[node]["inputs"]["unet_name"]))
    write_wan_vae(models / "vae" / api["4"]["inputs"]["vae_name"])
    train_two_motions(pipe, models / "fleximmt_motions", (api["10"]["inputs"]["motion"], api["11"]["inputs"]["motion"]))
    write_scene(base, api, "5", ("12", "13"))
    return api


def tiny_prompt(api: dict, flexi: bool = True) -> dict:
    """The example workflow at test size, with the test's tiny text encoder; ``flexi=False`` wires the
    loaders straight to the samplers (the same graph without FlexiMMT)."""
    prompt = copy.deepcopy(api)
    prompt["3"] = {"class_type": "TestOnlyTinyUMT5", "inputs": {"seed": 0}}
    prompt["9"]["inputs"].update(width=SIZE, height=SIZE, length=LENGTH)
    prompt["20"]["inputs"].update(steps=STEPS, end_at_step=STEPS // 2)
    prompt["21"]["inputs"].update(steps=STEPS, start_at_step=STEPS // 2)
    if not flexi:
        prompt["18"]["inputs"]["model"], prompt["19"]["inputs"]["model"] = ["1", 0], ["2", 0]
        for node in ("10", "11", "12", "13", "14", "15", "16", "17"):
            del prompt[node]
    return prompt


def video_frames(server, run, node: str = "24") -> np.ndarray:
    (item,) = run.outputs(node)["images"]
    return iio.imread(server.output_file(item), plugin="pyav")


def test_the_native_example_workflow_samples_with_fleximmt(comfy_server, native_models):
    run = comfy_server.run(tiny_prompt(native_models))
    assert run.status == "success", (run.error, comfy_server.log()[-3000:])
    frames = video_frames(comfy_server, run)
    assert frames.shape == (LENGTH, SIZE, SIZE, 3)
    for sampler in ("20", "21"):  # ComfyUI's own latent previews of the patched model, a step each
        assert len(run.previews(sampler)) == STEPS // 2
    plain = comfy_server.run(tiny_prompt(native_models, flexi=False))
    assert plain.status == "success", plain.error
    difference = np.abs(frames.astype(float) - video_frames(comfy_server, plain).astype(float)).mean()
    assert difference > 1.0  # the motion tokens changed the video (8-bit levels, mean over all pixels)


def test_a_bad_native_input_is_a_node_error_and_the_server_goes_on(comfy_server, native_models):
    prompt = tiny_prompt(native_models)
    prompt["15"]["inputs"]["motion_words"] = "dances wildly"
    run = comfy_server.run(prompt)
    assert run.status == "error" and run.error["node_id"] == "16"
    assert run.error["exception_message"].startswith("object 2: motion words 'dances wildly' were not found")
    assert comfy_server.alive()
    again = comfy_server.run(tiny_prompt(native_models))
    assert again.status == "success"


def test_an_empty_object_mask_is_a_node_error_before_sampling(comfy_server, native_models):
    base = comfy_server.base
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(base / "input" / "native_empty_mask.png")
    prompt = tiny_prompt(native_models)
    prompt["13"]["inputs"]["image"] = "native_empty_mask.png"
    run = comfy_server.run(prompt)
    assert run.status == "error" and run.error["node_id"] == "15"  # object 2's Object node
    assert run.error["exception_message"].startswith("object 2: the mask is empty (no pixel of the object is set)")
    assert run.progress("20") == [] and run.progress("21") == []  # nothing sampled


def sampled_latent(server, run):
    """The low-noise sampler's LATENT, as *Save Latent* (the test's node 90) wrote it."""
    from safetensors.torch import load_file

    (item,) = run.outputs("90")["latents"]
    return load_file(str(server.output_file(item)))["latent_tensor"]


def test_an_interrupted_native_run_leaves_nothing_behind(comfy_server, native_models):
    """The low-noise sampler interrupted mid-run; run again, it samples exactly the uninterrupted run's
    latent. Each run differs only in end_at_step, past the last step, so that ComfyUI's cache runs the
    low-noise sampler anew from the high-noise sampler's cached latent. The sampler's LATENT is
    compared, not the decoded video: ComfyUI 0.33's VAE Decode on this CPU now and then decodes the
    same latent differently (2 of 24 reruns of the plain graph without FlexiMMT, by up to 51 levels,
    the latents equal to the bit); 0.3.64 gave equal videos in every run tried."""
    prompt = tiny_prompt(native_models)
    prompt["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["21", 0], "filename_prefix": "check/native"}}
    prompt["21"]["inputs"]["end_at_step"] = 9997
    whole = comfy_server.run(prompt)
    assert whole.status == "success", whole.error
    prompt["21"]["inputs"]["end_at_step"] = 9998
    prompt_id = comfy_server.submit(prompt)
    comfy_server.wait_for_progress(prompt_id, "21", 1)
    comfy_server.interrupt(prompt_id)
    assert comfy_server.finish(prompt_id).interrupted
    prompt["21"]["inputs"]["end_at_step"] = 9999
    again = comfy_server.run(prompt)
    assert again.status == "success"
    assert torch.equal(sampled_latent(comfy_server, again), sampled_latent(comfy_server, whole))


# -- CogVideoX 1.5 and HunyuanVideo 1.5 (ComfyUI 0.33) ------------------------------------------------------
COG_LENGTH = 13  # 4 latent frames, 2 token frames
OBJECT_NODES = ("11", "12", "13", "14", "15", "16", "17")  # Load motion x 2, masks x 2, Object x 2, Apply


def without_fleximmt(prompt: dict, model_inputs: list[tuple[str, str]]) -> dict:
    """The same graph with the diffusion model wired straight past *FlexiMMT Apply* (node 17)."""
    prompt = copy.deepcopy(prompt)
    for node, name in model_inputs:
        prompt[node]["inputs"][name] = ["1", 0]
    for node in OBJECT_NODES:
        del prompt[node]
    return prompt


def assert_moves_with_fleximmt(server, prompt: dict, plain: dict, node: str, length: int) -> None:
    """The example runs, its video is at least ``length`` frames of the test size (ComfyUI's CogVideoX VAE
    decodes 4 latent frames into 16) as the graph without FlexiMMT makes, and differs from that one (the
    motion tokens changed it; 8-bit levels, mean over all pixels)."""
    run = server.run(prompt)
    assert run.status == "success", (run.error, server.log()[-3000:])
    frames = video_frames(server, run, node)
    without = server.run(plain)
    assert without.status == "success", without.error
    plain_frames = video_frames(server, without, node)
    assert frames.shape == plain_frames.shape and frames.shape[0] >= length and frames.shape[1:] == (SIZE, SIZE, 3)
    assert np.abs(frames.astype(float) - plain_frames.astype(float)).mean() > 1.0


@pytest.fixture(scope="module")
def cogvideox_prompt(comfy_server):
    """The CogVideoX example at test size (the tiny model, the random VAE, the tiny T5, two learned motions)."""
    from comfy_cogvideox import SHAPE as COG
    from comfy_cogvideox import comfy_state_dict as cog_state_dict
    from comfy_cogvideox import write_cogvideox_vae
    from safetensors.torch import save_file

    from fleximmt.models.cogvideox import FlexiMMTPipeline
    from fleximmt.toy.tiny import tiny_components

    base, api = comfy_server.base, saved_motions(load_workflow("native_cogvideox15_i2v"))
    models = model_folders(base)
    pipe = FlexiMMTPipeline(**tiny_components(0, height=SIZE, width=SIZE, num_frames=COG_LENGTH, text_len=226, **COG))
    pipe.set_progress_bar_config(disable=True)
    save_file(cog_state_dict(pipe.transformer), str(models / "diffusion_models" / api["1"]["inputs"]["unet_name"]))
    write_cogvideox_vae(models / "vae" / api["3"]["inputs"]["vae_name"])
    names = (api["11"]["inputs"]["motion"], api["12"]["inputs"]["motion"])
    train_two_motions(pipe, models / "fleximmt_motions", names, COG_LENGTH)
    write_scene(base, api, "4", ("13", "14"))
    prompt = copy.deepcopy(api)
    prompt["2"] = {"class_type": "TestOnlyTinyCogVideoXT5", "inputs": {"seed": 0, "width": COG["text_dim"]}}
    prompt["5"]["inputs"].update(width=SIZE, height=SIZE)
    prompt["10"]["inputs"].update(width=SIZE, height=SIZE, length=COG_LENGTH)
    prompt["18"]["inputs"].update(steps=3)
    return prompt


@pytest.fixture(scope="module")
def hunyuan15_prompt(comfy_server):
    """The HunyuanVideo 1.5 example at test size (the tiny model, the random VAE, the tiny Qwen2.5 + ByT5, random
    SigLIP tokens, two learned motions)."""
    from comfy_hunyuan15 import comfy_shaped_components, write_hunyuan15_vae
    from comfy_hunyuan15 import comfy_state_dict as hunyuan_state_dict
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from safetensors.torch import save_file

    base, api = comfy_server.base, saved_motions(load_workflow("native_hunyuan15_i2v"))
    models = model_folders(base)
    pipe = HunyuanVideo15ImageToVideoPipeline(**comfy_shaped_components(0))
    pipe.set_progress_bar_config(disable=True)
    save_file(hunyuan_state_dict(pipe.transformer), str(models / "diffusion_models" / api["1"]["inputs"]["unet_name"]))
    write_hunyuan15_vae(models / "vae" / api["3"]["inputs"]["vae_name"])
    names = (api["11"]["inputs"]["motion"], api["12"]["inputs"]["motion"])
    train_two_motions(pipe, models / "fleximmt_motions", names, LENGTH)
    write_scene(base, api, "5", ("13", "14"))
    prompt = copy.deepcopy(api)
    prompt["2"] = {"class_type": "TestOnlyTinyHunyuanVideo15TextEncoder", "inputs": {"seed": 0, "width": 16}}
    del prompt["4"]
    prompt["6"] = {"class_type": "TestOnlyTinyVisionTokens", "inputs": {"image": ["5", 0], "seed": 0, "tokens": 9}}
    prompt["10"]["inputs"].update(width=SIZE, height=SIZE, length=LENGTH)
    prompt["20"]["inputs"].update(steps=3)
    return prompt


@pytest.fixture(scope="module")
def ltx2_prompt(comfy_server):
    """The LTX-2 example at test size: its one checkpoint (the tiny transformer at ComfyUI's 128 latent channels with
    random text connectors, ComfyUI's video VAE, audio VAE and vocoder at the smallest sizes its loaders take,
    random weights), the tiny Gemma, two motions learned on diffusers' pipeline of the same transformer."""
    from comfy_ltx2 import comfy_shaped_components, write_ltx2_checkpoint
    from diffusers import LTX2ImageToVideoPipeline

    base, api = comfy_server.base, saved_motions(load_workflow("native_ltx2_i2v"))
    models = model_folders(base)
    (models / "checkpoints").mkdir(exist_ok=True)
    pipe = LTX2ImageToVideoPipeline(**comfy_shaped_components(0, latent_channels=128))
    pipe.set_progress_bar_config(disable=True)
    write_ltx2_checkpoint(models / "checkpoints" / api["1"]["inputs"]["ckpt_name"], pipe.transformer)
    names = (api["11"]["inputs"]["motion"], api["12"]["inputs"]["motion"])
    train_two_motions(pipe, models / "fleximmt_motions", names, LENGTH)
    write_scene(base, api, "5", ("13", "14"))
    prompt = copy.deepcopy(api)
    prompt["2"] = {"class_type": "TestOnlyTinyLTXAVGemma", "inputs": {"seed": 0, "width": 16}}
    prompt["18"]["inputs"].update(width=SIZE, height=SIZE, length=LENGTH)
    prompt["19"]["inputs"].update(frames_number=LENGTH)
    prompt["22"]["inputs"].update(steps=3)
    return prompt


@needs_native("CogVideoX")
def test_the_native_cogvideox_example_samples_with_fleximmt(comfy_server, cogvideox_prompt):
    plain = without_fleximmt(cogvideox_prompt, [("18", "model")])
    assert_moves_with_fleximmt(comfy_server, cogvideox_prompt, plain, "21", COG_LENGTH)


@needs_native("HunyuanVideo 1.5")
def test_the_native_hunyuan15_example_samples_with_fleximmt(comfy_server, hunyuan15_prompt):
    plain = without_fleximmt(hunyuan15_prompt, [("18", "model")])
    assert_moves_with_fleximmt(comfy_server, hunyuan15_prompt, plain, "26", LENGTH)


@needs_native("LTX-2")
def test_the_native_ltx2_example_samples_with_fleximmt(comfy_server, ltx2_prompt):
    plain = without_fleximmt(ltx2_prompt, [("21", "model")])
    assert_moves_with_fleximmt(comfy_server, ltx2_prompt, plain, "30", LENGTH)


@needs_native("CogVideoX")
@needs_native("HunyuanVideo 1.5")
def test_a_bad_native_input_is_refused_by_name_on_every_family(comfy_server, cogvideox_prompt, hunyuan15_prompt):
    for prompt in (cogvideox_prompt, hunyuan15_prompt):
        prompt = copy.deepcopy(prompt)
        prompt["16"]["inputs"]["motion_words"] = "dances wildly"
        run = comfy_server.run(prompt)
        assert run.status == "error" and run.error["node_id"] == "17"
        assert run.error["exception_message"].startswith("object 2: motion words 'dances wildly' were not found")
    assert comfy_server.alive()
