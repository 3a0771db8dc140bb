"""Defects of the real-size path that a GPU would show, checked on the CPU: component placement after
training, and no host-device synchronisation in the per-block hot path."""

import numpy as np
import pytest
import torch
from helpers import moving_square
from PIL import Image

import fleximmt.training.train as train_module
from fleximmt import ObjectMotion, train_motion
from fleximmt.method.adapter import module_placement
from fleximmt.toy import random_motion, tiny_pipeline

CAPTION = "A red ball jumps up."
PROMPT = "A ball jumps up. A box slides left."


def test_training_puts_every_component_back_and_the_pipeline_generates_next(tmp_path, monkeypatch):
    pipe = tiny_pipeline(0)
    before = module_placement(pipe)
    moves = []
    for name in ("text_encoder", "vae"):
        module = pipe.components[name]
        real_to = module.to

        def spy(*args, _name=name, _real=real_to, **kwargs):
            moves.append((_name, args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "to", spy)
    # the offload a GPU run does (text encoder and VAE wait on the CPU while the tokens train)
    monkeypatch.setattr(train_module, "offload_target", lambda device: "cpu")
    seen_during = []
    train_motion(
        pipe,
        moving_square(),
        CAPTION,
        "ball",
        "jumps up",
        tmp_path / "m.safetensors",
        steps=2,
        tokens_per_motion=4,
        lr_warmup_steps=0,
        callback=lambda step, loss: seen_during.append(len(moves)),
    )
    offloaded = [m for m in moves[: seen_during[0]] if m[1] == ("cpu",)]
    assert {name for name, *_ in offloaded} == {"text_encoder", "vae"}  # offloaded while training
    restores = moves[seen_during[-1] :]
    # back to their devices; no dtype given where it did not change (a cast would also reach the
    # buffers a model keeps in another dtype on purpose)
    assert {(name, kw.get("device"), kw.get("dtype")) for name, _, kw in restores} == {
        ("text_encoder", before["text_encoder"][0], None),
        ("vae", before["vae"][0], None),
    }
    assert module_placement(pipe) == before
    assert not pipe.transformer.training and not pipe.transformer.gradient_checkpointing
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    obj = ObjectMotion(mask, str(tmp_path / "m.safetensors"), "jumps up")
    out = pipe(image, "A ball jumps up.", num_inference_steps=1, output_type="latent", objects=[obj])
    assert torch.isfinite(out.frames).all()


def test_training_settings_do_not_outlive_the_call(tmp_path):
    pipe = tiny_pipeline(0)
    train_motion(
        pipe,
        moving_square(),
        CAPTION,
        "ball",
        "jumps up",
        tmp_path / "m.safetensors",
        steps=1,
        tokens_per_motion=4,
        gradient_checkpointing=True,
        vae_tiling=True,
        vae_slicing=True,
    )
    assert not pipe.transformer.gradient_checkpointing
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing


SYNCS = ("item", "tolist", "nonzero", "unique", "cpu", "__bool__", "__int__", "__float__")


class SyncCounter:
    """Counts the tensor methods that wait for the device (and host RNG draws) while ``active``."""

    def __init__(self, monkeypatch):
        self.active, self.calls = False, []
        for name in SYNCS:
            self._wrap(monkeypatch, torch.Tensor, name)
        self._wrap(monkeypatch, torch, "nonzero")
        self._wrap(monkeypatch, torch, "rand")

    def _wrap(self, monkeypatch, owner, name):
        real = getattr(owner, name)

        def spy(*args, **kwargs):
            if self.active:
                self.calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)

    def around(self, module):
        def start(*args):
            self.calls.append("|")
            self.active = True

        def stop(*args):
            self.active = False

        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop)

    def per_block(self) -> list[list[str]]:
        """The calls of each block call, in order."""
        return [part.split() for part in " ".join(self.calls).split("|")[1:]]


def objects(pipe):
    masks = [np.zeros((32, 32), bool) for _ in range(2)]
    masks[0][2:14, 2:14] = True
    masks[1][10:30, 12:30] = True
    return [
        ObjectMotion(m, random_motion(pipe.transformer, 4, seed=k + 1), w)
        for k, (m, w) in enumerate(zip(masks, ["jumps up", "slides left"]))
    ]


@pytest.mark.parametrize("mask_source, prompts", [("rmpm", 1), ("static", 1), ("rmpm", 2)])
def test_inference_blocks_add_no_host_device_synchronisation(monkeypatch, mask_source, prompts):
    pipe = tiny_pipeline(0)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    counter = SyncCounter(monkeypatch)
    for block in pipe.transformer.transformer_blocks:
        counter.around(block)
    call = dict(num_inference_steps=2, output_type="latent")
    pipe(image, [PROMPT] * prompts, **call)
    plain = counter.per_block()  # what diffusers' own blocks do
    counter.calls.clear()
    pipe(image, [PROMPT] * prompts, objects=objects(pipe), mask_source=mask_source, **call)
    # FlexiMMT adds nothing: masks are prepared once per step and row indices once per call, outside the blocks
    assert counter.per_block()[1:] == plain[1:] == [[]] * (len(plain) - 1)


def test_training_blocks_synchronise_once_each_for_the_group_sizes(monkeypatch, tmp_path):
    pipe = tiny_pipeline(0)
    counter = SyncCounter(monkeypatch)
    blocks = pipe.transformer.transformer_blocks
    for block in blocks:
        counter.around(block)
    train_motion(
        pipe,
        moving_square(),
        CAPTION,
        "ball",
        "jumps up",
        tmp_path / "m.safetensors",
        steps=2,
        tokens_per_motion=4,
        dmem_drop=0.3,
    )
    # DMEM's masks come from each block's own attention: the group sizes cross to the host once per
    # block (bincount(...).tolist()); key lists are cached after the first block; the random drop is
    # drawn once per step, before the blocks
    calls = counter.per_block()
    assert len(calls) == 2 * len(blocks) and calls[1:] == [["tolist"]] * (len(calls) - 1)


def test_a_call_leaves_no_fleximmt_state_behind():
    pipe = tiny_pipeline(0)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    pipe(
        image,
        PROMPT,
        objects=objects(pipe),
        num_inference_steps=1,
        output_type="latent",
        attention_kwargs={"scale": 1.0},
    )
    assert pipe.attention_kwargs == {"scale": 1.0}  # the user's own, without the call's motion tokens and masks


def test_gradient_checkpointing_is_on_by_default_at_real_size_and_off_for_small_models(tmp_path, monkeypatch):
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    from fleximmt.models.cogvideox import CogVideoXAdapter
    from fleximmt.training.train import checkpointing_needed

    class Meta:  # CogVideoX-5B-I2V's transformer, no weights
        vae_scale_factor_spatial, vae_scale_factor_temporal = 8, 4
        with init_empty_weights():
            transformer = CogVideoXTransformer3DModel(
                num_attention_heads=48,
                attention_head_dim=64,
                in_channels=32,
                out_channels=16,
                time_embed_dim=512,
                text_embed_dim=4096,
                num_layers=42,
                sample_width=90,
                sample_height=60,
            )

    real = CogVideoXAdapter(Meta())
    assert checkpointing_needed(real, real.token_grid(480, 720, 49), 226)
    small = tiny_pipeline(0)
    assert not checkpointing_needed(small.adapter, small.token_grid(32, 32, 9), 16)
    enabled = []
    monkeypatch.setattr(
        type(small.transformer), "enable_gradient_checkpointing", lambda self, *a, **k: enabled.append(1)
    )
    monkeypatch.setattr(train_module, "checkpointing_needed", lambda *a: True)  # as at real size
    train_motion(
        small, moving_square(), CAPTION, "ball", "jumps up", tmp_path / "m.safetensors", steps=1, tokens_per_motion=4
    )
    assert enabled == [1]
    enabled.clear()
    train_motion(
        small,
        moving_square(),
        CAPTION,
        "ball",
        "jumps up",
        tmp_path / "n.safetensors",
        steps=1,
        tokens_per_motion=4,
        gradient_checkpointing=False,
    )
    assert enabled == []
