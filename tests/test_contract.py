"""What every base-model family must do, written once and run over a table of families (``FAMILIES``),
each on tiny random components: without objects it is diffusers' own pipeline; the fast attention
equals the dense reference; motion tokens act; training moves the motion tokens only, lowers the loss
and resumes exactly; ``__call__`` is diffusers' signature plus FlexiMMT's keywords; another family's
motion, or one of another shape, is refused with the fix; offload, fused projections, saving and
``from_pipe`` keep FlexiMMT working. Each expectation is independent: diffusers' own pipeline built
from the same seeded components, the dense reference, a run without the tool under test, a frozen run.
What is particular to one family stays in its own file (test_pipeline, test_diffusers_compat,
test_cogvideox15, test_wan, test_train).

Adding a family writes no line here: the table is every registered family's rows, in the order of
registration (``fleximmt.toy.contract.contract_rows()``), each family's declared in ``CONTRACT_ROWS`` of its
tiny components module, ``fleximmt.toy.tiny_<module>`` (``<module>`` as ``fleximmt/models/__init__.py``
registers the family; tests/test_registration.py proves that a probe family's row reaches the table).
A row is a ``ContractRow(...)`` (``fleximmt.toy.contract``):

- ``name``: the test id.
- ``components``: a function returning tiny random components, seeded, the same weights at every call
  (both pipelines are built from their own call, so diffusers' pipeline never shares FlexiMMT's
  processors); what the pipeline's ``__init__`` takes, config values (``boundary_ratio``) included
  (a pipeline's ``.components`` leaves those out, so a row gives components, not a pipeline).
- ``size`` (height, width, frames: the image's and the masks', the video's frames; passed as ``height``,
  ``width`` and ``num_frames`` where diffusers' ``__call__`` takes them) and ``call``: what every call passes
  besides (the text length, the steps; keep it small). The prompt is ``PROMPT`` (the tiny tokenizer's
  words); the inputs of ``NO_OBJECTS`` that diffusers' pipeline takes are compared with it.
- ``scale``: the spread of the random motion tokens, enough to move this model's output.
- flags and settings of the behaviours that apply: ``fast_backends`` (compared with "dense"; "flex"
  compiles, 10-20 s a row on a CPU, so it runs on one model of each form),
  ``model_defaults`` (``__call__`` arguments whose default is None, the model's own, not diffusers'),
  ``added_arguments`` (keyword-only arguments FlexiMMT's ``__call__`` adds where diffusers' has none, before
  its options),
  ``offloads`` and ``fused_projections`` (what diffusers has for this model), ``learning`` (the
  training settings of the loss-falls test, ``fleximmt.toy.contract.LEARNING`` by default; None leaves the
  row out of it).
  A test whose flag is off is not generated for that row (nothing is skipped).
- ``family``: not written in the row; ``contract_rows`` fills in the registered family whose tiny module
  declares it. The row reads FlexiMMT's pipeline class (``ours``) from its registration and diffusers' own
  (``diffusers``) from its adapter.

LTX-2's row (``fleximmt.toy.tiny_ltx2``), the last one added, as an example::

    CONTRACT_ROWS = (
        ContractRow("ltx-2", lambda: tiny_ltx2_components(0), size=(64, 64, 9),
                    call=dict(num_inference_steps=2, max_sequence_length=16, image_crf=0), scale=30.0,
                    fused_projections=False),
    )

(diffusers refuses sizes that are not multiples of 32; ``image_crf=0`` leaves out the image's H.264
re-compression, which needs PyAV; diffusers' ``fuse_qkv_projections`` fails on LTX-2's audio-video attentions,
whose query and key widths differ. HunyuanVideo 1.5's row shows ``added_arguments``: its pipeline has no step
callback, FlexiMMT's adds one.)

Motions come from ``fleximmt.toy.random_motion`` (shaped for the first expert, one set per expert of
the adapter, with the adapter's family); the tests check them against ``adapter.motion_shape()``.
Run: ``HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_contract.py`` (``-k wan-2.2`` for one row).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import run_killed, spy_optimiser
from PIL import Image

from fleximmt import MotionTokens, ObjectMotion, load_pipeline, train_motion
from fleximmt.method.pipeline import OPTIONS
from fleximmt.models import adapter_for, family_name
from fleximmt.toy.contract import ContractRow, contract_rows
from fleximmt.toy.tiny import random_motion
from fleximmt.training.train import checkpoint_path

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
CAPTION, CONCEPT = "A red ball jumps up.", "ball"


FAMILIES = contract_rows()  # every registered family's rows (see the module's docstring)


def each_family(applies: Callable[[ContractRow], bool] = lambda row: True):
    """Parametrise a test over the rows it applies to; ``row`` is module-scoped, so each row's
    pipelines (the fixtures below) are built once."""
    rows = [row for row in FAMILIES if applies(row)]
    return pytest.mark.parametrize("row", rows, ids=[row.name for row in rows], scope="module")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(row: ContractRow, cls: type | None = None):
    """A pipeline of class ``cls`` (FlexiMMT's by default) on freshly built components of ``row``."""
    pipe = (cls or row.ours)(**row.components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(row):
    """FlexiMMT's pipeline of the row, shared by the module's tests: read it, change nothing lasting."""
    return build(row)


@pytest.fixture(scope="module")
def untouched(row):
    """FlexiMMT's pipeline that never gets objects (diffusers' processors stay installed)."""
    return build(row)


@pytest.fixture(scope="module")
def theirs(row):
    """diffusers' own pipeline on components of its own (the same seeded weights)."""
    return build(row, row.diffusers)


def picture(row: ContractRow, seed: int = 0) -> Image.Image:
    height, width, _ = row.size
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def box(row: ContractRow, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    height, width, _ = row.size
    mask = np.zeros((height, width), bool)
    mask[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)] = True
    return mask


def motion(pipe, row: ContractRow, seed: int) -> MotionTokens:
    adapter = adapter_for(pipe)
    return random_motion(
        adapter.transformers()[0], 4, seed=seed, scale=row.scale, experts=adapter.num_experts, family=adapter.family
    )


def two_objects(pipe, row: ContractRow) -> list[ObjectMotion]:
    masks = [box(row, 0.05, 0.5, 0.05, 0.5), box(row, 0.3, 0.95, 0.4, 0.95)]
    return [ObjectMotion(masks[k], motion(pipe, row, seed=k + 1), WORDS[k]) for k in range(2)]


def takes(row: ContractRow, arguments) -> bool:
    """Whether diffusers' pipeline of the row takes every one of these ``__call__`` arguments."""
    return set(arguments) <= set(inspect.signature(row.diffusers.__call__).parameters)


def size_arguments(row: ContractRow) -> dict[str, int]:
    """The row's size as ``height``, ``width`` and ``num_frames``, those that diffusers' pipeline takes."""
    return {name: n for name, n in zip(("height", "width", "num_frames"), row.size) if takes(row, [name])}


def run(pipe, row: ContractRow, **kw):
    """One call of the row's image and prompt with its arguments, seed 0, latents out unless ``kw`` says otherwise."""
    call = {**size_arguments(row), "output_type": "latent", **row.call, **kw}
    return pipe(picture(row), PROMPT, generator=torch.Generator().manual_seed(0), **call)


def video_grid(pipe, row: ContractRow):
    """The token grid of the row's video, at the size the adapter reads from the row's call."""
    return pipe.token_grid(*pipe.adapter.call_size({"image": picture(row), **size_arguments(row)}))


def frames_of(output) -> np.ndarray:
    """The video of a pipeline's output (its dataclass or ``return_dict=False``'s tuple) as an array."""
    frames = output[0] if isinstance(output, tuple) else output.frames
    return frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return ((a - b).norm() / b.norm()).item()


def fleximmt_processors(pipe) -> list[dict[str, str]]:
    """Per expert, FlexiMMT's attention processors installed on it: name -> class."""
    return [
        {
            name: type(p).__qualname__
            for name, p in t.attn_processors.items()
            if type(p).__module__.startswith("fleximmt.")
        }
        for t in adapter_for(pipe).transformers()
    ]


@pytest.fixture(scope="module")
def with_objects(row, ours):
    """FlexiMMT with two objects and every default option ("auto" attention, RMPM), masks returned."""
    return run(ours, row, objects=two_objects(ours, row), return_masks=True)


@pytest.fixture(scope="module")
def installed(row, ours, with_objects):
    """FlexiMMT's processors on ``ours`` after its call with objects, per expert."""
    return fleximmt_processors(ours)


# -- (a) objects=[] is diffusers' own pipeline -------------------------------------------------------------
NO_OBJECTS = {
    "latent": {},
    "negative-prompt": dict(negative_prompt="blurry"),
    "no-guidance": dict(guidance_scale=1.0),
    "tuple": dict(return_dict=False),
    "decoded": dict(output_type="np"),
}


@pytest.mark.parametrize(
    ("row", "extra"),
    [(row, e) for row in FAMILIES for e in NO_OBJECTS.values() if takes(row, e)],
    ids=[f"{n}-{row.name}" for row in FAMILIES for n, e in NO_OBJECTS.items() if takes(row, e)],
    scope="module",
)
def test_without_objects_it_is_diffusers_own_pipeline(row, untouched, theirs, extra):
    # every input of NO_OBJECTS that diffusers' pipeline of the row takes
    ours, ref = frames_of(run(untouched, row, **extra)), frames_of(run(theirs, row, **extra))
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


@each_family()
def test_after_a_call_with_objects_objects_empty_is_still_diffusers(row, ours, theirs, installed):
    assert installed and all(installed)  # FlexiMMT's processors are on every expert
    assert torch.equal(run(ours, row).frames, run(theirs, row).frames)


# -- (b) the fast attention is the dense reference -------------------------------------------------------
SETTINGS = {
    "default": {},
    "static": dict(mask_source="static"),
    "qk": dict(mask_source="qk"),
    "released": dict(rmpm_method="released", anchors=1),
    "no-initial-masks": dict(initial_masks="none"),
}


@each_family()
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS)
def test_fast_attention_equals_the_dense_reference_with_two_objects(row, ours, settings):
    objects = two_objects(ours, row)
    dense = run(ours, row, objects=objects, return_masks=True, mask_kernel="dense", **settings)
    grid = video_grid(ours, row)
    assert dense.masks.shape == (1, row.call["num_inference_steps"], 2, grid.frames, grid.height, grid.width)
    for backend in row.fast_backends:
        fast = run(ours, row, objects=objects, return_masks=True, mask_kernel=backend, **settings)
        assert rel(fast.frames, dense.frames) < 1e-4, backend
        assert torch.equal(fast.masks, dense.masks), backend


# -- (c) motion tokens act ----------------------------------------------------------------------------------
@each_family()
def test_motion_tokens_change_the_output(row, ours, theirs, with_objects):
    assert rel(with_objects.frames, run(theirs, row).frames) > 1e-4
    other = two_objects(ours, row)
    other[0].motion = motion(ours, row, seed=99)
    assert rel(run(ours, row, objects=other).frames, with_objects.frames) > 1e-5


# -- (d) training moves the motion tokens only, and lowers the loss --------------------------------------------
def moving_square(row: ContractRow) -> np.ndarray:
    height, width, frames = row.size
    video = np.full((frames, height, width, 3), 90, np.uint8)
    side, step = height // 4, max(1, width // (2 * frames))
    for t in range(frames):
        video[t, height // 4 : height // 4 + side, step * (1 + t) : step * (1 + t) + side] = 220
    return video


def train(row: ContractRow, pipe, out, **kw):
    height, width, frames = row.size
    kw = {
        "steps": 2,
        "tokens_per_motion": 4,
        "lr": 0.05,
        "lr_warmup_steps": 0,
        "height": height,
        "width": width,
        "num_frames": frames,
        "max_windows": 1,
        **kw,
    }
    return train_motion(pipe, moving_square(row), CAPTION, CONCEPT, "jumps up", out, **kw)


def frozen_state(pipe) -> list[tuple[dict, list[bool]]]:
    """Every module component's weights and ``requires_grad`` flags."""
    return [
        ({k: v.detach().clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()])
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
    ]


@pytest.fixture
def optimised(monkeypatch) -> list[torch.Tensor]:
    """The parameters train_motion gives its optimiser, copied as training starts."""
    params_seen = []
    spy_optimiser(monkeypatch, lambda params: params_seen.extend(p.detach().clone() for p in params))
    return params_seen


@each_family()
def test_training_changes_only_the_motion_tokens_and_the_file_drives_the_pipeline(
    row, ours, theirs, installed, tmp_path, optimised
):
    before = frozen_state(ours)
    trained = train(row, ours, tmp_path / "m.safetensors")
    for (state, flags), (now, now_flags) in zip(before, frozen_state(ours)):
        assert all(torch.equal(v, now[k]) for k, v in state.items()) and flags == now_flags
    blocks, dim = ours.adapter.motion_shape()
    experts = ours.adapter.num_experts
    assert sum(p.numel() for p in optimised) == experts * blocks * 4 * dim  # the motion tokens, nothing else
    initial = torch.stack(optimised).reshape(trained.tokens.shape)
    assert not torch.equal(trained.tokens, initial)
    loaded = MotionTokens.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.tokens, trained.tokens) and loaded.family == ours.adapter.family
    assert loaded.num_experts == experts and all(e.shape == (blocks, 4, dim) for e in loaded.experts)
    assert fleximmt_processors(ours) == installed  # the pipeline generates with FlexiMMT's attention next
    mask = box(row, 0.25, 0.5, 0.05, 0.35)
    with_motion = run(ours, row, objects=[ObjectMotion(mask, str(tmp_path / "m.safetensors"), "jumps up")]).frames
    assert not torch.equal(with_motion, run(theirs, row).frames)


@each_family(lambda row: row.learning is not None)
def test_the_loss_falls_against_a_frozen_run_with_the_same_draws(row, ours, tmp_path):
    """lr = 0 sees exactly the same timesteps, noise and windows (same seed): the ratio isolates learning."""
    kw = dict(return_losses=True, dmem_drop=0.0, checkpoint_every=10_000, **row.learning)
    frozen = np.array(train(row, ours, tmp_path / "a.safetensors", **{**kw, "lr": 0.0}).losses)
    learned = np.array(train(row, ours, tmp_path / "b.safetensors", **kw).losses)
    third = len(learned) // 3
    first, last = (float((learned[s] / frozen[s]).mean()) for s in (slice(0, third), slice(-third, None)))
    assert last < first < 1.0001 and last < 0.999


@each_family()
def test_gradient_checkpointing_trains_the_same_tokens(row, ours, tmp_path):
    """A checkpointed block recomputed in the backward pass sees the motion tokens and DMEM masks its forward saw."""
    transformers = ours.adapter.transformers()
    on = []  # per step: was every expert checkpointing
    record = lambda step, loss: on.append(all(t.gradient_checkpointing for t in transformers))
    plain = train(row, ours, tmp_path / "plain.safetensors", gradient_checkpointing=False)
    checkpointed = train(row, ours, tmp_path / "ckpt.safetensors", gradient_checkpointing=True, callback=record)
    assert on and all(on)
    assert torch.allclose(checkpointed.tokens, plain.tokens, atol=1e-6)
    assert not any(t.gradient_checkpointing for t in transformers)  # put back as it was


# -- (e) resume --------------------------------------------------------------------------------------------
@each_family()
def test_resumed_training_equals_uninterrupted(row, ours, tmp_path):
    kw = dict(steps=6, checkpoint_every=2)
    whole = train(row, ours, tmp_path / "whole.safetensors", **kw)

    out = tmp_path / "resumed.safetensors"
    run_killed(3, train, row, ours, out, **kw)
    assert checkpoint_path(out).is_file() and not out.exists()
    encodes, steps = [], []
    real_encode = ours.vae.encode
    ours.vae.encode = lambda *a, **k: encodes.append(1) or real_encode(*a, **k)
    try:
        resumed = train(row, ours, out, resume=True, callback=lambda step, loss: steps.append(step), **kw)
    finally:
        del ours.vae.encode
    assert steps == [4, 5, 6]  # from the step the run stopped at (its callback raised: a checkpoint of it)
    assert encodes == []  # the reference latents came from the cache
    assert torch.allclose(resumed.tokens, whole.tokens, atol=1e-6, rtol=0)
    assert not torch.allclose(whole.tokens, train(row, ours, tmp_path / "short.safetensors", steps=3).tokens)


# -- (f) the signature ---------------------------------------------------------------------------------------
@each_family()
def test_call_signature_is_diffusers_own_then_fleximmt_keywords(row, ours):
    mine = list(inspect.signature(type(ours).__call__).parameters.values())[1:]
    theirs = list(inspect.signature(row.diffusers.__call__).parameters.values())[1:]
    assert [(p.name, p.kind) for p in mine[: len(theirs)]] == [(p.name, p.kind) for p in theirs]
    for p, q in zip(mine, theirs):
        assert p.default == (None if p.name in row.model_defaults else q.default), p.name
    rest = mine[len(theirs) :]
    assert [p.name for p in rest] == [*row.added_arguments, *OPTIONS]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)


# -- (g) a motion for another model is refused, naming the fix ------------------------------------------------
@each_family()
def test_a_motion_of_another_family_is_refused_naming_the_fix(row, ours):
    own = ours.adapter.family
    other = next(r.ours.adapter_class.family for r in FAMILIES if r.ours.adapter_class.family != own)
    tokens = motion(ours, row, seed=1).tokens
    foreign = MotionTokens(tokens, family=other, base_model="another-model@abc")
    with pytest.raises(ValueError) as err:
        run(ours, row, num_inference_steps=1, objects=[ObjectMotion(box(row, 0, 0.5, 0, 0.5), foreign, "jumps up")])
    message = str(err.value)
    assert message.startswith("object 1: ")
    assert f"learned on {family_name(other)} (another-model@abc), but the loaded model is {family_name(own)}" in message
    assert "train it again on this model" in message


@each_family()
@pytest.mark.parametrize("change", ["blocks", "width", "experts"])
def test_a_motion_of_another_shape_is_refused_naming_the_fix(row, ours, change):
    blocks, dim = ours.adapter.motion_shape()
    experts = ours.adapter.num_experts
    shape = {
        "blocks": (experts, blocks + 1, 4, dim),
        "width": (experts, blocks, 4, dim + 8),
        "experts": (1 if experts > 1 else 2, blocks, 4, dim),
    }[change]
    wrong = MotionTokens(list(torch.zeros(shape)), family=ours.adapter.family)
    message = "^object 1: motion tokens are for a model with .*train the motion on this model"
    with pytest.raises(ValueError, match=message):
        run(ours, row, num_inference_steps=1, objects=[ObjectMotion(box(row, 0, 0.5, 0, 0.5), wrong, "jumps up")])


# -- (h) offload and fused projections keep FlexiMMT's attention --------------------------------------------------
def sequential_offload(pipe) -> None:
    """``enable_sequential_cpu_offload`` for the denoisers and the VAE, with the CPU as the "accelerator":
    every weight waits on the meta device until its layer runs. (The whole pipeline's version fails inside
    transformers' T5 with accelerate on this machine, in diffusers' own pipeline too.)"""
    from accelerate import cpu_offload

    for module in (*pipe.adapter.transformers(), pipe.vae):
        cpu_offload(module, execution_device="cpu")
    assert any(p.device.type == "meta" for p in pipe.transformer.parameters())


def model_offload(pipe) -> None:
    """``enable_model_cpu_offload`` with the CPU as the "accelerator" (accelerate's hooks on every model)."""
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(t, "_hf_hook") for t in pipe.adapter.transformers())


OFFLOADS = {"model": model_offload, "sequential": sequential_offload}


@pytest.mark.parametrize(
    ("row", "offload"),
    [(row, o) for row in FAMILIES for o in row.offloads],
    ids=[f"{row.name}-{o}" for row in FAMILIES for o in row.offloads],
    scope="module",
)
def test_cpu_offload_gives_the_same_video_and_masks_with_objects(row, with_objects, installed, offload):
    pipe = build(row)
    OFFLOADS[offload](pipe)
    got = run(pipe, row, objects=two_objects(pipe, row), return_masks=True)
    assert rel(got.frames, with_objects.frames) < 1e-5 and torch.equal(got.masks, with_objects.masks)
    assert fleximmt_processors(pipe) == installed


def fuse(pipe):
    """``fuse_qkv_projections()`` on every expert (FlexiMMT's pipeline or diffusers')."""
    for transformer in adapter_for(pipe).transformers():
        transformer.fuse_qkv_projections()
        assert any(getattr(m, "fused_projections", False) for m in transformer.modules())
    return pipe


@each_family(lambda row: row.fused_projections)
def test_fused_projections_keep_the_motion_tokens_and_without_objects_are_diffusers(row, with_objects, installed):
    pipe = fuse(build(row))
    got = run(pipe, row, objects=two_objects(pipe, row), return_masks=True)
    assert rel(got.frames, with_objects.frames) < 1e-5 and torch.equal(got.masks, with_objects.masks)
    assert fleximmt_processors(pipe) == installed
    fused_diffusers = fuse(build(row, row.diffusers))
    assert rel(run(pipe, row).frames, run(fused_diffusers, row).frames) < 1e-5


# -- save, load and from_pipe ---------------------------------------------------------------------------------------
@each_family()
def test_a_saved_pipeline_is_diffusers_folder_and_loads_back_as_fleximmt(row, ours, with_objects, tmp_path):
    ours.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == row.diffusers.__name__  # any diffusers code loads the folder
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path / "model"))) is row.diffusers
    loaded = load_pipeline(tmp_path / "model")
    assert type(loaded) is row.ours
    loaded.set_progress_bar_config(disable=True)
    assert rel(run(loaded, row, objects=two_objects(loaded, row)).frames, with_objects.frames) < 1e-5


@each_family()
def test_from_pipe_both_ways(row, with_objects):
    theirs = build(row, row.diffusers)
    flexi = row.ours.from_pipe(theirs)
    assert rel(run(flexi, row, objects=two_objects(flexi, row)).frames, with_objects.frames) < 1e-5
    back = row.diffusers.from_pipe(flexi)  # FlexiMMT's processors left installed
    back.set_progress_bar_config(disable=True)
    assert rel(run(back, row).frames, run(build(row, row.diffusers), row).frames) < 1e-5
