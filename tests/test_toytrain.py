"""The toy base model's trainers: they learn, resume exactly, and produce a loadable pipeline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from helpers import run_killed

from fleximmt import FlexiMMTPipeline
from fleximmt.toy.train import ToyConfig, train_transformer, train_vae

SMALL = ToyConfig(
    size=32,
    frames=9,
    vae_channels=(8, 8, 8),
    latent_channels=4,
    norm_groups=2,
    layers=1,
    heads=2,
    head_dim=16,
    time_embed_dim=16,
    text_dim=16,
    text_layers=1,
    text_len=24,
)


def test_vae_then_transformer_give_a_pipeline_that_generates(tmp_path):
    vae_losses = train_vae(tmp_path, steps=12, batch=1, cfg=SMALL, checkpoint_every=6)
    assert np.mean(vae_losses[-4:]) < np.mean(vae_losses[:4])
    losses = train_transformer(tmp_path, steps=4, batch=2, cfg=SMALL, checkpoint_every=2)
    assert all(np.isfinite(losses))
    pipe = FlexiMMTPipeline.from_pretrained(str(tmp_path / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    from fleximmt.toy.world import random_scene

    scene = random_scene(0, frames=9, size=32)
    video = pipe(
        image=Image.fromarray(scene.frames[0]),
        prompt=scene.caption,
        num_inference_steps=2,
        max_sequence_length=24,
        output_type="np",
    ).frames[0]
    assert video.shape == (9, 32, 32, 3)
    # sampling uses the training's target and noise schedule
    assert pipe.scheduler.config.prediction_type == "v_prediction" and not pipe.scheduler.config.clip_sample


def test_ship_writes_float16_safetensors_that_load_back_and_the_training_curves(tmp_path):
    import json

    from fleximmt.toy.lab import load_toy_pipeline
    from fleximmt.toy.train import ship

    train_vae(tmp_path, steps=2, batch=1, cfg=SMALL)
    train_transformer(tmp_path, steps=2, batch=1, cfg=SMALL)
    for stage, values in (("vae", [0.5, 0.3, 0.2]), ("transformer", [1.0, 0.5, 0.1])):
        (tmp_path / f"{stage}_losses.json").write_text(json.dumps(values))
    dest = ship(tmp_path, tmp_path / "shipped", tmp_path / "curves.png")
    weights = list(dest.rglob("*.safetensors"))
    assert len(weights) == 3 and not list(dest.rglob("*.bin"))
    from safetensors import safe_open

    with safe_open(str(dest / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    original = FlexiMMTPipeline.from_pretrained(str(tmp_path / "pipeline"))
    loaded = load_toy_pipeline(dest)
    assert loaded.transformer.dtype == torch.float32
    for a, b in zip(original.transformer.parameters(), loaded.transformer.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # float16 rounding only
    from PIL import Image

    assert Image.open(tmp_path / "curves.png").size[1] == 2 * 220  # one panel per stage


def test_an_interrupted_vae_run_resumes_to_the_same_weights(tmp_path):
    whole = tmp_path / "whole"
    train_vae(whole, steps=6, batch=1, cfg=SMALL, checkpoint_every=3)

    part = tmp_path / "part"
    run_killed(4, train_vae, part, steps=6, batch=1, cfg=SMALL, checkpoint_every=3)
    train_vae(part, steps=6, batch=1, cfg=SMALL, checkpoint_every=3, resume=True)
    from diffusers import AutoencoderKLCogVideoX

    a = AutoencoderKLCogVideoX.from_pretrained(whole / "vae").state_dict()
    b = AutoencoderKLCogVideoX.from_pretrained(part / "vae").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
