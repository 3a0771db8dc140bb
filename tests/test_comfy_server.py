"""The FlexiMMT nodes in a real ComfyUI server (``tests/comfy_server.py``: ComfyUI's ``main.py --cpu``
on 127.0.0.1, the node pack linked into its custom_nodes/), driven as ComfyUI's frontend drives it:
prompts posted to ``/prompt``, progress, previews and errors read from ``/ws``, results from
``/history`` and the files the output nodes wrote; ``/interrupt`` as the cancel button. Every
expected value comes from fleximmt itself, called here in the test process with the same inputs (the
toy model that ships with fleximmt, on this CPU), the reference videos decoded by the server's own
ComfyUI code. Runs in `make test-comfy`, once against ComfyUI 0.33 and once against 0.3.64."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_server import (
    CURRENT,
    LEARN_STEPS,
    PromptRejected,
    comfy_video_frames,
    fresh_motions,
    load_workflow,
    needs_comfyui,
)
from PIL import Image

from fleximmt import MotionTokens, ObjectMotion, train_motion
from fleximmt.apps.comfy.examples import IMAGE, REFERENCES, mask_name, video_name, write_inputs
from fleximmt.evaluation.video import grid_preview, mask_overlay
from fleximmt.method.motion import load_mask
from fleximmt.toy.lab import load_toy_pipeline, reference_caption
from fleximmt.training.train import checkpoint_path

pytestmark = pytest.mark.comfy

PROMPT = "A red square zigzags right. A blue circle bounces."
WORDS = {"zigzag": "zigzags right", "bounce": "bounces"}
FLEXIMMT_NODES = {  # the class ids of the first release (saved workflows name them) and today's names
    "FlexiMMTLoadModel": "FlexiMMT Load Model",
    "FlexiMMTLearnMotion": "FlexiMMT Learn Motion",
    "FlexiMMTLoadMotion": "FlexiMMT Load Motion",
    "FlexiMMTObject": "FlexiMMT Object",
    "FlexiMMTTransfer": "FlexiMMT Transfer",
    "FlexiMMTPreviewMasks": "FlexiMMT Preview Masks",
    "FlexiMMTApply": "FlexiMMT Apply",
    "FlexiMMTLearnMotionNative": "FlexiMMT Learn Motion (native)",
}


@pytest.fixture(scope="module")
def toy():
    return load_toy_pipeline()


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session's server with the example workflows' inputs in its input/ folder."""
    write_inputs(comfy_server.base / "input")
    return comfy_server


def decoded(path: Path) -> np.ndarray:
    """A video's frames, 8-bit RGB as PyAV decodes them."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def reference_frames(path: Path) -> np.ndarray:
    """A reference video as the server's ComfyUI decodes it (its own Load Video code), rounded to bytes
    as the Learn node hands frames to ``train_motion``."""
    return (comfy_video_frames(path).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def saved_frames(server, run, node: str) -> np.ndarray:
    """The frames a SaveImage node wrote (lossless PNGs), in order."""
    return np.stack([np.asarray(Image.open(server.output_file(item))) for item in run.outputs(node)["images"]])


def as_saved(frames: np.ndarray) -> np.ndarray:
    """Float frames in 0-1 as ComfyUI's SaveImage writes them (x 255, clipped, truncated to uint8)."""
    return np.clip(255.0 * frames, 0, 255).astype(np.uint8)


def with_saved_images(prompt: dict, sources: dict[str, list]) -> dict:
    """``prompt`` plus a SaveImage node for each source (a link), so the test reads exact frames."""
    extra = {
        f"9{k}": {"class_type": "SaveImage", "inputs": {"images": link, "filename_prefix": f"check/{name}"}}
        for k, (name, link) in enumerate(sources.items())
    }
    return {**prompt, **extra}


def learn_prompt(name: str, steps: int, motion: str = "zigzag") -> dict:
    """Load FlexiMMT model -> Load Video -> Get Video Components -> Learn motion, alone (Learn is an output node)."""
    workflow = load_workflow("fleximmt_toy_learn_and_transfer")
    prompt = {key: workflow[key] for key in ("1", "2", "3", "4")}
    prompt["2"] = {**prompt["2"], "inputs": {"file": video_name(motion)}}
    caption, concept, words = reference_caption(motion)
    prompt["4"] = {
        **prompt["4"],
        "inputs": {
            **prompt["4"]["inputs"],
            "name": name,
            "steps": steps,
            "caption": caption,
            "concept_words": concept,
            "motion_words": words,
        },
    }
    return prompt


def expected_motion(toy, server, motion: str, steps: int, out: Path) -> MotionTokens:
    """fleximmt's own training on the reference as ComfyUI decodes it, with the example's settings."""
    caption, concept, words = reference_caption(motion)
    frames = reference_frames(server.base / "input" / video_name(motion))
    return train_motion(
        toy, frames, caption, concept, words, out, steps=steps, tokens_per_motion=16, seed=0, video_fps=8.0
    )


def expected_transfer(toy, server, motions: dict[str, MotionTokens], steps: int = 20):
    """fleximmt's own transfer of the example's two objects (its pipeline call, the example's settings)."""
    inputs = server.base / "input"
    objects = [
        ObjectMotion(load_mask(inputs / mask_name(k)), motions[name], WORDS[name])
        for k, name in enumerate(REFERENCES, 1)
    ]
    return toy(
        image=Image.open(inputs / IMAGE).convert("RGB"),
        prompt=PROMPT,
        height=64,
        width=64,
        num_frames=17,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        objects=objects,
        return_masks=True,
    )


@pytest.fixture(scope="module")
def example(server):
    """The example workflow (learn two motions on the toy model, transfer them onto two objects) run
    once through the server, its training steps cut to LEARN_STEPS; exact frames saved beside it."""
    fresh_motions(server.base, REFERENCES)  # learned here, whatever another module left
    prompt = load_workflow("fleximmt_toy_learn_and_transfer")
    for node in ("4", "7"):
        prompt[node]["inputs"]["steps"] = LEARN_STEPS
    run = server.run(with_saved_images(prompt, {"frames": ["15", 0], "overlay": ["15", 1]}))
    assert run.status == "success", run.error
    return run


def test_the_node_pack_loads_its_nodes_with_types_and_tooltips(server):
    info = server.object_info()
    loading = [line for line in server.log().splitlines() if "IMPORT FAILED" in line or "comfy_entrypoint" in line]
    assert loading == [], loading  # the pack loaded (V3: its comfy_entrypoint gave its nodes)
    for node, name in FLEXIMMT_NODES.items():  # one pattern, the first release's class ids
        spec = info[node]
        assert spec["display_name"] == name and spec["category"] == "FlexiMMT" and spec["description"]
        inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        assert inputs and all(options.get("tooltip") for _, options in inputs.values()), node
    assert info["FlexiMMTTransfer"]["output"] == ["IMAGE", "IMAGE"]
    assert info["FlexiMMTTransfer"]["output_name"] == ["frames", "mask_overlay"]
    assert info["FlexiMMTObject"]["output"] == ["FLEXIMMT_OBJECTS"]
    assert info["FlexiMMTLearnMotion"]["output_node"] is True  # queued alone, it runs
    assert info["FlexiMMTLoadModel"]["input"]["required"]["model"][1]["options"][0] == "toy"
    from fleximmt.models import SUPPORTED

    assert SUPPORTED in info["FlexiMMTLoadModel"]["description"]  # every family it loads, HunyuanVideo 1.5 too
    assert "GGUF models (ComfyUI-GGUF) are untested" in info["FlexiMMTApply"]["description"]  # as docs/comfyui.md says


def test_the_server_serves_the_frontend_its_version_pins(server):
    """0.3.64 finds its own frontend (1.27.10) ahead of 0.33's in the shared environment."""
    from comfy_server import COMFYUI

    pins = (COMFYUI / "requirements.txt").read_text()
    pinned = next(line.split("==")[1] for line in pins.splitlines() if line.startswith("comfyui-frontend-package=="))
    served = [line for line in server.log().splitlines() if "frontend" in line and "version" in line]
    assert any(line.rstrip().endswith(pinned) for line in served), served


def test_the_example_workflow_learns_two_motions_as_fleximmt_does(server, example, toy, tmp_path):
    folder = server.base / "models" / "fleximmt_motions"
    for name in REFERENCES:  # the motions, without training's leftovers (checkpoint, encoded reference)
        assert {p.name for p in folder.glob(f"{name}.*")} == {f"{name}.safetensors"}
    for node, name in (("4", "zigzag"), ("7", "bounce")):
        learned = MotionTokens.load(folder / f"{name}.safetensors")
        expected = expected_motion(toy, server, name, LEARN_STEPS, tmp_path / f"{name}.safetensors")
        torch.testing.assert_close(learned.tokens, expected.tokens, rtol=0, atol=1e-6)
        assert learned.metadata == expected.metadata
        assert example.progress(node) == list(range(1, LEARN_STEPS + 1))  # ComfyUI's progress bar, every step
        (info,) = example.outputs(node)["text"]  # shown on the node (web/fleximmt.js draws it)
        assert info == (
            f"caption: {reference_caption(name)[0]}\nconcept: white circle\nmotion words: {WORDS[name]}\n"
            f"4 blocks x 16 tokens x 256\n{LEARN_STEPS} training steps"
        )


def test_the_example_workflow_transfers_them_as_fleximmts_pipeline_does(server, example, toy):
    folder = server.base / "models" / "fleximmt_motions"
    motions = {name: MotionTokens.load(folder / f"{name}.safetensors") for name in REFERENCES}
    result = expected_transfer(toy, server, motions)
    frames, masks = result.frames[0], result.masks[0, -1]
    assert np.array_equal(saved_frames(server, example, "90"), as_saved(frames))
    overlay = mask_overlay(frames, masks, frame_index=toy.mask_frame_index(len(frames)))
    assert np.array_equal(saved_frames(server, example, "91"), overlay)
    assert example.progress("15") == list(range(1, 21))
    videos = {"17": as_saved(frames), "19": overlay}
    for node, other in (("17", "19"), ("19", "17")):  # Save Video's mp4s: lossy H.264 of those frames
        (item,) = example.outputs(node)["images"]
        video = decoded(server.output_file(item)).astype(int)
        assert video.shape == (17, 64, 64, 3)
        assert np.abs(video - videos[node]).mean() < min(10, np.abs(video - videos[other]).mean())
    (preview,) = example.outputs("14")["images"]  # Preview masks: the objects on the toy model's 8 x 8 token grid
    image = np.asarray(Image.open(server.base / "input" / IMAGE).convert("RGB"))
    masks = [load_mask(server.base / "input" / mask_name(k)) for k in (1, 2)]
    assert np.array_equal(np.asarray(Image.open(server.output_file(preview))), grid_preview(image, masks, 8, 8))


def test_the_saved_motions_workflow_loads_them_with_their_metadata_and_makes_the_same_video(server, example):
    run = server.run(with_saved_images(load_workflow("fleximmt_toy_saved_motions"), {"frames": ["15", 0]}))
    assert run.status == "success", run.error
    assert np.array_equal(saved_frames(server, run, "90"), saved_frames(server, example, "90"))
    info = run.outputs("5")["text"][0]  # Preview Any of Load motion's info
    assert info == (
        f"caption: A white circle zigzags right.\nconcept: white circle\nmotion words: zigzags right\n"
        f"4 blocks x 16 tokens x 256\n{LEARN_STEPS} training steps"
    )
    assert run.outputs("4")["text"] == [info]  # shown on the Load motion node too


def test_a_cancelled_learn_keeps_its_checkpoint_and_the_same_learn_resumes_it(server, toy, tmp_path):
    folder = server.base / "models" / "fleximmt_motions"
    prompt = learn_prompt("cancelled", steps=30)
    prompt_id = server.submit(prompt)
    seen = server.wait_for_progress(prompt_id, "4", at_least=3)
    server.interrupt(prompt_id)
    run = server.finish(prompt_id)
    assert run.interrupted and run.status == "error" and run.error is None
    stopped = max(run.progress("4"))
    assert seen <= stopped <= seen + 1  # the step running when cancelled was the last
    from safetensors import safe_open

    with safe_open(str(checkpoint_path(folder / "cancelled.safetensors")), framework="pt") as f:
        kept = int(f.metadata()["step"])
    assert kept == stopped + 1  # that step finished and was kept (its report raised ComfyUI's interruption)
    assert not (folder / "cancelled.safetensors").exists()

    resumed = server.run(prompt)
    assert resumed.status == "success", resumed.error
    assert resumed.progress("4") == list(range(kept + 1, 31))  # every step after the checkpoint, once
    expected = expected_motion(toy, server, "zigzag", 30, tmp_path / "whole.safetensors")
    torch.testing.assert_close(
        MotionTokens.load(folder / "cancelled.safetensors").tokens, expected.tokens, rtol=0, atol=1e-6
    )
    assert not checkpoint_path(folder / "cancelled.safetensors").exists()
    (folder / "cancelled.safetensors").unlink()


def transfer_prompt(example_prompt: dict, steps: int, frames: int = 0) -> dict:
    prompt = {k: v for k, v in example_prompt.items() if k in ("1", "4", "7", "8", "9", "10", "11", "12", "15")}
    prompt["15"] = {**prompt["15"], "inputs": {**prompt["15"]["inputs"], "steps": steps, "frames": frames}}
    return with_saved_images(prompt, {"frames": ["15", 0]})


def test_a_cancelled_transfer_stops_at_the_next_step_and_the_server_serves_the_next_prompt(server, example):
    saved = load_workflow("fleximmt_toy_saved_motions")
    prompt_id = server.submit(transfer_prompt(saved, steps=200, frames=129))  # 129 frames: a step takes about 0.6 s
    seen = server.wait_for_progress(prompt_id, "15", at_least=2)
    server.interrupt(prompt_id)
    run = server.finish(prompt_id)
    assert run.interrupted and not run.outputs("90")
    assert seen <= max(run.progress("15")) <= seen + 1
    assert server.queue() == {"queue_running": [], "queue_pending": []}  # nothing left running
    after = server.run(transfer_prompt(saved, steps=2))
    assert after.status == "success" and after.progress("15") == [1, 2] and len(after.outputs("90")["images"]) == 17


def bad(prompt: dict, node: str, **inputs) -> dict:
    changed = json.loads(json.dumps(prompt))
    changed[node]["inputs"].update(inputs)
    return changed


def test_bad_inputs_give_node_errors_numbered_by_object_and_the_server_stays_up(server, example, tmp_path):
    from fleximmt.toy import random_motion, tiny_pipeline

    inputs, motions = server.base / "input", server.base / "models" / "fleximmt_motions"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(inputs / "small_mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(inputs / "empty_mask.png")  # an object not painted
    random_motion(tiny_pipeline(0).transformer, 16, name="other").save(motions / "other model.safetensors")
    (motions / "broken.safetensors").write_bytes(b"\x00" * 64)
    saved = transfer_prompt(load_workflow("fleximmt_toy_saved_motions"), steps=2)
    cases = [
        (
            bad(saved, "10", image="small_mask.png"),
            "15",
            "object 2: the mask is 32 x 32 but the image is 64 x 64: give a mask of the image's size",
        ),
        (bad(saved, "12", motion_words=" "), "12", "object 2: write its motion words"),
        (bad(saved, "10", image="empty_mask.png"), "12", "object 2: the mask is empty (no pixel of the object is set)"),
        (bad(saved, "12", motion_words="flies away"), "15", "object 2: motion words 'flies away' were not found"),
        (bad(saved, "7", motion="other model.safetensors"), "15", "object 2: motion tokens are for a model with"),
        (
            bad(saved, "7", motion="broken.safetensors"),
            "7",
            f"'{motions / 'broken.safetensors'}' is not a readable safetensors",
        ),
        (bad(learn_prompt("x", 2), "4", name="../outside"), "4", "motion name '../outside': use letters, digits"),
        (bad(learn_prompt("x", 2), "4", motion_words=""), "4", "write the motion words"),
    ]
    for prompt, node, message in cases:
        run = server.run(prompt)
        assert run.status == "error" and run.error["node_id"] == node, (message, run.error)
        assert run.error["exception_message"].startswith(message), run.error["exception_message"]
        assert server.alive() and server.get("/system_stats")["system"]
    assert not list(motions.glob("x*")) and not (motions.parent / "outside.safetensors").exists()
    with pytest.raises(PromptRejected) as rejected:  # ComfyUI's own validation of a widget's range
        server.submit(bad(saved, "15", steps=0))
    (error,) = rejected.value.body["node_errors"]["15"]["errors"]
    assert error["type"] == "value_smaller_than_min" and "steps" in error["details"]
    for path in (motions / "other model.safetensors", motions / "broken.safetensors"):
        path.unlink()
    assert server.run(saved).status == "success"  # the next good prompt runs


def history_size(server) -> int:
    return len(server.get("/history"))


@pytest.mark.parametrize(
    "node, inputs, error_type",
    [
        ("15", {"steps": 10000}, "value_bigger_than_max"),  # Transfer: its widget's range
        ("8", {"image": "not_there.png"}, "custom_validation_failed"),  # Load Image: a missing file
    ],
)
def test_a_bad_widget_or_file_refuses_the_whole_prompt_before_anything_runs(server, node, inputs, error_type):
    """The learn example with one bad input: /prompt answers 400 with ComfyUI's node error and runs
    nothing (without the pack's rule, ComfyUI would run the Learn nodes and report success)."""
    folder = server.base / "models" / "fleximmt_motions"
    before, files = history_size(server), sorted(folder.glob("*")) if folder.is_dir() else []
    prompt = bad(load_workflow("fleximmt_toy_learn_and_transfer"), node, **inputs)
    for learn in ("4", "7"):
        prompt[learn]["inputs"]["name"] = f"never_{learn}"
    with pytest.raises(PromptRejected) as rejected:
        server.submit(prompt)
    body = rejected.value.body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert [error["type"] for error in body["node_errors"][node]["errors"]] == [error_type]
    time.sleep(2)  # anything queued would have started
    assert server.queue() == {"queue_running": [], "queue_pending": []} and history_size(server) == before
    assert sorted(folder.glob("*")) == files  # no motion learned


def test_a_prompt_without_fleximmt_nodes_keeps_comfyuis_own_rule(server):
    """ComfyUI runs the outputs that validate: the pack's rule leaves other prompts alone."""
    inputs = server.base / "input"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(inputs / "plain.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "plain.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "check/plain"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "not_there.png"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "check/never"}},
    }
    run = server.run(prompt)
    assert run.status == "success" and len(run.outputs("2")["images"]) == 1 and not run.outputs("4")


def test_the_learn_example_run_again_neither_retrains_nor_overwrites_and_makes_the_same_video(server, example):
    """Queued again from the frontend, the example's Load Video nodes carry the upload widget's value
    (``upload``), so ComfyUI's cache misses and the Learn nodes run again: they load the motions they
    saved, without a training step, and the same seed makes the same video."""
    folder = server.base / "models" / "fleximmt_motions"
    saved = {name: (folder / f"{name}.safetensors").read_bytes() for name in REFERENCES}
    stamps = {name: (folder / f"{name}.safetensors").stat().st_mtime_ns for name in REFERENCES}
    prompt = load_workflow("fleximmt_toy_learn_and_transfer")
    for node in ("4", "7"):
        prompt[node]["inputs"]["steps"] = LEARN_STEPS
    for node in ("2", "5"):
        prompt[node]["inputs"]["upload"] = "image"  # what the UI form queues beside the file
    again = server.run(with_saved_images(prompt, {"frames": ["15", 0], "overlay": ["15", 1]}))
    assert again.status == "success", again.error
    executed = {m["data"]["node"] for m in again.messages if m["type"] == "executing" and m["data"].get("node")}
    assert {"2", "4", "7", "15"} <= executed  # the cache missed: Learn and Transfer ran again
    assert again.progress("4") == [] and again.progress("7") == []  # no training step
    for node, name in (("4", "zigzag"), ("7", "bounce")):
        assert (folder / f"{name}.safetensors").read_bytes() == saved[name]
        assert (folder / f"{name}.safetensors").stat().st_mtime_ns == stamps[name]  # not even rewritten
        assert "already learned with these inputs" in again.outputs(node)["text"][0]
    assert np.array_equal(saved_frames(server, again, "90"), saved_frames(server, example, "90"))
    assert np.array_equal(saved_frames(server, again, "91"), saved_frames(server, example, "91"))


def test_a_learn_of_an_existing_name_with_other_inputs_is_refused_and_the_file_stays(server, example):
    folder = server.base / "models" / "fleximmt_motions"
    before = (folder / "zigzag.safetensors").read_bytes()
    prompt = learn_prompt("zigzag", steps=LEARN_STEPS, motion="bounce")  # another video under the same name
    run = server.run(prompt)
    assert run.status == "error" and run.error["node_id"] == "4"
    assert run.error["exception_message"].startswith(
        "a motion named 'zigzag' already exists (models/fleximmt_motions/zigzag.safetensors), learned from "
        "another video or with other words or settings: give this one another name, or delete that file"
    )
    assert run.progress("4") == [] and (folder / "zigzag.safetensors").read_bytes() == before


def test_learn_takes_the_toy_models_own_tokens_and_steps_for_0(server, toy):
    from comfy_wan import import_comfy

    import_comfy()
    from fleximmt.apps.comfy.nodes import is_toy, learn_defaults

    assert is_toy(toy) and learn_defaults(is_toy(toy)) == (300, 16)  # make demo's
    assert learn_defaults(False) == (2000, 226)  # the paper's, for any other model
    spec = server.object_info("FlexiMMTLearnMotion")["input"]["required"]
    assert spec["steps"][1]["default"] == 0 and spec["tokens"][1]["default"] == 0
    folder = server.base / "models" / "fleximmt_motions"
    run = server.run(bad(learn_prompt("own_tokens", steps=2), "4", tokens=0))
    assert run.status == "success", run.error
    assert MotionTokens.load(folder / "own_tokens.safetensors").d_m == 16
    for path in folder.glob("own_tokens*"):
        path.unlink()


def test_transfer_sends_a_latent_preview_each_step_that_shows_the_video(server, example):
    """ComfyUI's latent previewer (``--preview-method auto``) with factors fitted to the toy VAE:
    one preview a step, the last one looking like the video's frames of the middle latent frame."""
    previews = example.previews("15")
    assert len(previews) == 20  # one a denoising step
    frames = saved_frames(server, example, "90").astype(float)  # 17 frames; latent frame 2 covers 5..8
    last = np.asarray(previews[-1].convert("RGB").resize((64, 64), Image.BILINEAR)).astype(float)
    distance = lambda a, b: np.abs(a - b).mean()
    assert distance(last, frames[5:9].mean(0)) < 0.5 * distance(np.full_like(last, frames.mean()), frames[5:9].mean(0))
    assert distance(np.asarray(previews[0].convert("RGB").resize((64, 64))), frames[5:9].mean(0)) > distance(
        last, frames[5:9].mean(0)
    )  # the first step's preview is noise, the last the video


@needs_comfyui(CURRENT, "0.3.64 sets previews for the whole server only (--preview-method)")
def test_transfer_sends_no_preview_when_the_user_turns_previews_off(server, example):
    saved = transfer_prompt(load_workflow("fleximmt_toy_saved_motions"), steps=2)
    saved["15"]["inputs"]["seed"] = 1  # not ComfyUI's cached result
    run = server.run(saved, preview_method="none")  # the frontend's setting, sent with the prompt
    assert run.status == "success" and run.progress("15") == [1, 2] and run.previews("15") == []


def test_load_model_lists_the_supported_diffusers_folders_and_loads_cogvideox_and_wan(server):
    from fleximmt.toy import random_motion, tiny_pipeline
    from fleximmt.toy.tiny import tiny_wan_pipeline

    models = server.base / "models" / "diffusers"
    tiny_pipeline(0).save_pretrained(models / "tiny-cogvideox")
    tiny_wan_pipeline(0, version="2.2").save_pretrained(models / "family" / "tiny-wan")
    (models / "not-a-video-model").mkdir(parents=True)
    (models / "not-a-video-model" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    choices = server.object_info("FlexiMMTLoadModel")["input"]["required"]["model"][1]["options"]
    assert choices == ["toy", "family/tiny-wan", "tiny-cogvideox"]

    inputs = server.base / "input"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(inputs / "grey32.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(inputs / "mask32.png")
    for model in ("tiny-cogvideox", "family/tiny-wan"):
        pipe = tiny_pipeline(0) if model == "tiny-cogvideox" else tiny_wan_pipeline(0, version="2.2")
        random_motion(pipe.transformer, 4, name="random", experts=pipe.adapter.num_experts).save(
            server.base / "models" / "fleximmt_motions" / "tiny.safetensors"
        )
        prompt = {
            "1": {
                "class_type": "FlexiMMTLoadModel",
                "inputs": {"model": model, "dtype": "auto", "offload": "none", "vae_tiling": False},
            },
            "2": {"class_type": "LoadImage", "inputs": {"image": "grey32.png"}},
            "3": {"class_type": "LoadImageMask", "inputs": {"image": "mask32.png", "channel": "red"}},
            "4": {"class_type": "FlexiMMTLoadMotion", "inputs": {"motion": "tiny.safetensors"}},
            "5": {
                "class_type": "FlexiMMTObject",
                "inputs": {"mask": ["3", 0], "motion": ["4", 0], "motion_words": "jumps"},
            },
            "6": {
                "class_type": "FlexiMMTPreviewMasks",
                "inputs": {"pipe": ["1", 0], "image": ["2", 0], "objects": ["5", 0], "width": 32, "height": 32},
            },
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "check/tiny"}},
        }
        run = server.run(prompt)
        assert run.status == "success", run.error
        grid = pipe.token_grid(32, 32, 9)
        expected = grid_preview(
            np.full((32, 32, 3), 128, np.uint8), [torch.from_numpy(mask > 127)], grid.height, grid.width
        )
        assert np.array_equal(saved_frames(server, run, "7")[0], expected)  # each family's own token grid
    shutil.rmtree(models)
    (server.base / "models" / "fleximmt_motions" / "tiny.safetensors").unlink()
