"""Every attention FlexiMMT computes goes through diffusers' dispatcher (``dispatch_attention_fn``) with
the backend the user chose: ``set_attention_backend`` before or after FlexiMMT's processors were
installed, the ``attention_backend(...)`` context manager, ``reset_attention_backend``; a call that
needs a mask goes to a backend that takes one (said once per call in the log). A spy wraps every
backend in diffusers' registry and records each call's backend and whether it had a mask."""

import logging

import numpy as np
import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from PIL import Image

from fleximmt import ObjectMotion
from fleximmt.errors import FlexiMMTInputError
from fleximmt.models.shared import MASK_FALLBACK
from fleximmt.toy.tiny import random_motion, tiny_pipeline, tiny_wan_pipeline

PROMPT = "A ball jumps up. A box slides left."
WORDS = ["jumps up", "slides left"]
FAMILIES = {
    "cogvideox": dict(size=32, frames=9, extra=dict(max_sequence_length=16)),
    "wan": dict(size=64, frames=9, extra=dict(max_sequence_length=24)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def pipe(family):
    """A fresh tiny pipeline per test (set_attention_backend changes its processors)."""
    return tiny_pipeline(0) if family == "cogvideox" else tiny_wan_pipeline(0, version="2.1")


@pytest.fixture(autouse=True)
def restore_active_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put it back."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture
def spy(monkeypatch):
    """[(backend, masked)] of every call that reaches a backend of diffusers' registry."""
    calls = []
    for name, fn in list(_AttentionBackendRegistry._backends.items()):

        def recorded(*args, _fn=fn, _name=name, **kwargs):
            calls.append((AttentionBackendName(_name).value, kwargs.get("attn_mask") is not None))
            return _fn(*args, **kwargs)

        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, recorded)
    return calls


def call(pipe, family, with_objects=True, **kw):
    cfg = FAMILIES[family]
    size = cfg["size"]
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))
    objects = []
    if with_objects:
        for k, (y0, y1, x0, x1) in enumerate(
            [(2, size // 2, 2, size // 2), (size // 3, size - 2, size // 3, size - 2)]
        ):
            mask = np.zeros((size, size), bool)
            mask[y0:y1, x0:x1] = True
            objects.append(ObjectMotion(mask, random_motion(pipe.transformer, 4, seed=k + 1, scale=4.0), WORDS[k]))
    return pipe(
        image,
        PROMPT,
        height=size,
        width=size,
        num_frames=cfg["frames"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        objects=objects,
        **cfg["extra"],
        **kw,
    ).frames


def test_every_call_takes_the_backend_set_on_the_model(pipe, family, spy):
    """Set before FlexiMMT's processors exist (they come with the first call with objects) and after."""
    pipe.transformer.set_attention_backend("_native_math")
    call(pipe, family)
    assert spy and {b for b, _ in spy} == {"_native_math"}
    assert any(masked for _, masked in spy) == (family == "cogvideox")  # Wan's cross-attention needs no mask
    spy.clear()
    pipe.transformer.set_attention_backend("native")  # after: the processors are FlexiMMT's now
    call(pipe, family)
    call(pipe, family, with_objects=False)
    assert spy and {b for b, _ in spy} == {"native"}


def test_the_context_manager_and_reset_reach_fleximmts_processors(pipe, family, spy):
    call(pipe, family)  # FlexiMMT's processors installed, no backend chosen
    spy.clear()
    with attention_backend("_native_math"):
        call(pipe, family)
    assert spy and {b for b, _ in spy} == {"_native_math"}
    pipe.transformer.set_attention_backend("_native_math")
    pipe.transformer.reset_attention_backend()
    processors = pipe.transformer.attn_processors.values()
    assert all(p._attention_backend is None for p in processors)
    spy.clear()
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    call(pipe, family)
    assert {b for b, _ in spy} == {"native"}


def test_a_backend_without_masks_gets_every_unmasked_call(pipe, family, spy, monkeypatch, caplog):
    """A stand-in for flash-attn (no GPU here): diffusers' FLASH slot holding SDPA that refuses masks,
    chosen on the processors as set_attention_backend does after its requirement checks."""

    def flash(query, key, value, attn_mask=None, **kwargs):  # [B, N, H, d], as diffusers' backends take them
        assert attn_mask is None, "flash-attn takes no mask"
        spy.append(("flash", False))
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    reference = call(pipe, family)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.FLASH, flash)
    monkeypatch.setitem(
        _AttentionBackendRegistry._supported_arg_names,
        AttentionBackendName.FLASH,
        {"query", "key", "value", "attn_mask"},
    )
    for processor in pipe.transformer.attn_processors.values():
        processor._attention_backend = AttentionBackendName.FLASH
    spy.clear()
    with caplog.at_level(logging.WARNING, logger="fleximmt"):
        frames = call(pipe, family)
    masked = [b for b, m in spy if m]
    assert {b for b, m in spy if not m} == {"flash"}
    assert set(masked) == ({MASK_FALLBACK} if family == "cogvideox" else set())
    notes = [r for r in caplog.records if "takes no attention mask" in r.getMessage()]
    assert len(notes) == (1 if family == "cogvideox" else 0)  # once per call, not once per block
    assert torch.allclose(frames, reference, atol=1e-5)


def test_objects_with_context_parallelism_are_refused_where_they_cannot_shard(pipe, family):
    """CogVideoX: its joint attention needs every video key in each process (diffusers has no context-parallel
    plan for it). Wan runs sharded (test_context_parallel.py, two processes), but refuses processors given a
    context-parallel config its model does not have: FlexiMMT's masks would be cut for the whole video (on the
    cross-attention ones: diffusers' own attn1 would fail on a config that is not one)."""
    call(pipe, family)
    for name, processor in pipe.transformer.attn_processors.items():
        if family == "cogvideox" or "attn2" in name:
            processor._parallel_config = object()  # what enable_parallelism leaves on them
    match = "joint attention needs every video key" if family == "cogvideox" else "not the share"
    with pytest.raises(FlexiMMTInputError, match=match):
        call(pipe, family)


def test_the_flex_option_runs_through_the_pipeline_as_dense_does(spy):
    """mask_kernel="flex" (FlexiMMT's own option: one FlexAttention call per attention, compiled)
    gives the dense reference's video through the whole CogVideoX pipeline (inference: a CPU has no
    FlexAttention backward); FlexAttention is torch's own kernel, so no call reaches diffusers' registry."""
    pipe = tiny_pipeline(0)
    flex = call(pipe, "cogvideox", mask_kernel="flex")
    masked_calls = list(spy)
    spy.clear()
    dense = call(pipe, "cogvideox", mask_kernel="dense")
    assert ((flex - dense).norm() / dense.norm()).item() < 1e-4
    assert not masked_calls
