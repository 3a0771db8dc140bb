"""Training the toy world's base image-to-video model on a CPU: the VAE, then the transformer
(with its small T5 text encoder), with the same diffusers classes as CogVideoX-5B-I2V.

Seeded and resumable (atomic checkpoints every N steps); the data are drawn on the fly from
``world.random_scene`` with seeds derived from the step, so a resumed run sees the same
videos. Sizes follow ``TOY-NOTES.md``. ``assemble`` writes a ``FlexiMMTPipeline`` folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..training.checkpoint import load_checkpoint, save_checkpoint
from .tiny import tiny_components
from .world import WORDS, random_scene

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyConfig:
    """The toy base model's shape (defaults: TOY-NOTES.md's measured configuration)."""

    size: int = 64
    frames: int = 17
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 8
    norm_groups: int = 4
    layers: int = 4
    heads: int = 4
    head_dim: int = 64
    time_embed_dim: int = 256
    text_dim: int = 128
    text_layers: int = 2
    text_len: int = 24

    def components(self, seed: int = 0) -> dict:
        return tiny_components(
            seed,
            height=self.size,
            width=self.size,
            num_frames=self.frames,
            num_layers=self.layers,
            heads=self.heads,
            head_dim=self.head_dim,
            text_len=self.text_len,
            vae_channels=self.vae_channels,
            latent_channels=self.latent_channels,
            text_dim=self.text_dim,
            text_layers=self.text_layers,
            time_embed_dim=self.time_embed_dim,
            norm_groups=self.norm_groups,
            words=tuple(WORDS),
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def scene_batch(step: int, batch: int, cfg: ToyConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Videos ``[B, 3, T, H, W]`` in [-1, 1], foreground masks ``[B, 1, T, H, W]`` and captions
    of the scenes for ``step`` (seeded by the step: a resumed run sees the same data)."""
    scenes = [random_scene(seed * 1_000_003 + step * batch + i, frames=cfg.frames, size=cfg.size) for i in range(batch)]
    video = torch.from_numpy(np.stack([s.frames for s in scenes])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    fg = torch.from_numpy(np.stack([s.masks.any(0) for s in scenes]))[:, None].float()
    return video, fg, [s.caption for s in scenes]


def _train(
    name: str,
    out_dir: Path,
    params: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    warmup: int,
    seed: int,
    fingerprint: str,
    resume: bool,
    checkpoint_every: int,
    callback: Callable[[int, float], None] | None,
) -> list[float]:
    """The shared loop: AdamW with warm-up, gradient clipping, atomic resumable checkpoints."""
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    generator = torch.Generator().manual_seed(seed)
    ckpt = out_dir / f"{name}.ckpt.safetensors"
    fingerprints = {"config": fingerprint, "stage": name, "lr": lr, "seed": seed}
    start = (
        load_checkpoint(ckpt, params, optimizer, scheduler, generator, fingerprints) if resume and ckpt.is_file() else 0
    )
    losses = []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"toy {name}")
    for step in bar:
        torch.manual_seed(seed * 7919 + step)  # the models' own sampling (VAE posterior) per step
        loss = loss_fn(step, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(ckpt, step + 1, params, optimizer, scheduler, generator, fingerprints)
        if callback is not None:
            callback(step + 1, losses[-1])
    return losses


def train_vae(
    out_dir: str | Path,
    steps: int = 1500,
    batch: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    cfg: ToyConfig = ToyConfig(),
    resume: bool = False,
    checkpoint_every: int = 100,
    callback=None,
) -> list[float]:
    """Stage 1: the VAE (L1 + L2 with foreground pixels weighted 5x, KL 1e-6). Writes ``out_dir/vae``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = cfg.components(seed)["vae"].train()
    params = dict(vae.named_parameters())

    def loss_fn(step, generator):
        video, fg, _ = scene_batch(step, batch, cfg, seed)
        posterior = vae.encode(video).latent_dist
        recon = vae.decode(posterior.sample()).sample
        weight = 1 + 4 * fg
        return (weight * ((recon - video).abs() + (recon - video) ** 2)).mean() + 1e-6 * posterior.kl().mean()

    losses = _train(
        "vae", out_dir, params, loss_fn, steps, lr, 50, seed, cfg.fingerprint(), resume, checkpoint_every, callback
    )
    with torch.no_grad():  # scale latents to unit spread, as CogVideoX's scaling_factor does
        video, _, _ = scene_batch(10**6, 8, cfg, seed + 1)
        std = vae.encode(video).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.eval().save_pretrained(out_dir / "vae")
    return losses


def train_transformer(
    out_dir: str | Path,
    steps: int = 4000,
    batch: int = 8,
    lr: float = 3e-4,
    seed: int = 0,
    cfg: ToyConfig = ToyConfig(),
    resume: bool = False,
    checkpoint_every: int = 200,
    empty_caption: float = 0.1,
    callback=None,
) -> list[float]:
    """Stage 2: transformer + T5 encoder on the frozen VAE's latents; v-prediction MSE, uniform t.
    Writes the whole pipeline to ``out_dir/pipeline``."""
    from diffusers import AutoencoderKLCogVideoX

    from ..models.cogvideox import FlexiMMTPipeline

    out_dir = Path(out_dir)
    parts = cfg.components(seed)
    vae = AutoencoderKLCogVideoX.from_pretrained(out_dir / "vae", use_safetensors=True).eval().requires_grad_(False)
    transformer, text_encoder, tokenizer, scheduler = (
        parts[k] for k in ("transformer", "text_encoder", "tokenizer", "scheduler")
    )
    transformer.train()
    text_encoder.train()
    pipe = FlexiMMTPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    params = {f"transformer.{k}": v for k, v in transformer.named_parameters()}
    params.update({f"text_encoder.{k}": v for k, v in text_encoder.named_parameters()})
    rotary = pipe._prepare_rotary_positional_embeddings(cfg.size, cfg.size, (cfg.frames - 1) // 4 + 1, "cpu")
    scale = vae.config.scaling_factor

    def loss_fn(step, generator):
        video, _, captions = scene_batch(step, batch, cfg, seed)
        drop = torch.rand(batch, generator=generator) < empty_caption
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            latents = vae.encode(video).latent_dist.sample() * scale  # [B, C, F, h, w]
            image = vae.encode(video[:, :, :1]).latent_dist.sample() * scale
        latents, image = latents.permute(0, 2, 1, 3, 4), image.permute(0, 2, 1, 3, 4)
        image = torch.cat([image, image.new_zeros(batch, latents.shape[1] - 1, *image.shape[2:])], dim=1)
        ids = tokenizer(captions, padding="max_length", max_length=cfg.text_len, truncation=True, return_tensors="pt")
        text = text_encoder(ids.input_ids)[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = transformer(
            hidden_states=torch.cat([noisy, image], dim=2),
            encoder_hidden_states=text,
            timestep=t,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        return F.mse_loss(pred, scheduler.get_velocity(latents, noise, t))

    losses = _train(
        "transformer",
        out_dir,
        params,
        loss_fn,
        steps,
        lr,
        100,
        seed,
        cfg.fingerprint(),
        resume,
        checkpoint_every,
        callback,
    )
    transformer.eval()
    text_encoder.eval()
    # sample as trained: the same noise schedule, v-prediction, no clipping, steps reaching t = 999
    scheduler.register_to_config(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")
    pipe.save_pretrained(out_dir / "pipeline")
    return losses


def plot_losses(curves: dict[str, list[float]], path: str | Path, window: int = 50) -> Path:
    """A PNG of moving-average training losses (log scale), one panel per stage, drawn with PIL."""
    from PIL import Image, ImageDraw

    width, height, pad = 480, 220, 36
    image = Image.new("RGB", (width, height * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    for row, (name, losses) in enumerate(curves.items()):
        top = row * height
        values = np.log10(
            np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) > window else losses
        )
        lo, hi = float(values.min()), float(values.max()) + 1e-9
        xs = pad + (width - 2 * pad) * np.arange(len(values)) / max(1, len(values) - 1)
        ys = top + height - pad - (height - 2 * pad) * (values - lo) / (hi - lo)
        draw.rectangle([pad, top + pad, width - pad, top + height - pad], outline="black")
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(40, 80, 200), width=2)
        draw.text(
            (pad, top + 8),
            f"{name}: {len(losses)} steps, loss {10 ** values[0]:.3f} -> {10 ** values[-1]:.3f} "
            f"(log scale, moving average of {window})",
            fill="black",
        )
    image.save(path)
    return Path(path)


def export(pipeline_dir: str | Path, dest: str | Path) -> Path:
    """Write the trained toy pipeline in float16 safetensors (what the repository ships)."""
    from ..models.cogvideox import FlexiMMTPipeline

    pipe = FlexiMMTPipeline.from_pretrained(str(pipeline_dir))
    for model in (pipe.vae, pipe.transformer, pipe.text_encoder):
        model.to(torch.float16)
    pipe.save_pretrained(dest, safe_serialization=True)
    return Path(dest)


def ship(out_dir: str | Path, dest: str | Path | None = None, curves: str | Path | None = None) -> Path:
    """Export ``out_dir/pipeline`` in float16 to the package's assets and draw the training curves."""
    from .lab import TOY_MODEL

    out_dir = Path(out_dir)
    dest = export(out_dir / "pipeline", dest or TOY_MODEL)
    losses = {
        stage: json.loads((out_dir / f"{stage}_losses.json").read_text())
        for stage in ("vae", "transformer")
        if (out_dir / f"{stage}_losses.json").is_file()
    }
    if losses:
        plot_losses(losses, curves or Path(__file__).parents[3] / "docs" / "toy-training.png")
    return dest


def main(argv: list[str] | None = None) -> None:
    """``python -m fleximmt.toy.train --stage vae|transformer|ship --out DIR [--steps N] [--resume]``"""
    import argparse

    parser = argparse.ArgumentParser(
        description="Train the toy world's base model on a CPU: the VAE first, then the "
        "transformer (run the stages one after another, never two at once); "
        "'ship' writes the float16 copy that the package carries and the "
        "training curves (docs/toy-training.png)."
    )
    parser.add_argument("--stage", choices=["vae", "transformer", "ship"], required=True)
    parser.add_argument("--out", required=True, help="model folder (vae/, pipeline/ and checkpoints)")
    parser.add_argument(
        "--steps", type=int, help="training steps (default: 1500 for the VAE, 4000 for the transformer)"
    )
    parser.add_argument("--batch", type=int, help="batch size (default: 2 / 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.stage == "ship":
        print(f"shipped to {ship(args.out)}")
        return
    train = train_vae if args.stage == "vae" else train_transformer
    kwargs = {k: v for k, v in (("steps", args.steps), ("batch", args.batch)) if v is not None}
    losses = train(args.out, seed=args.seed, resume=args.resume, **kwargs)
    path = Path(args.out) / f"{args.stage}_losses.json"
    if args.resume and path.is_file():  # a resumed run appends to the curve of the run it continues
        done = (args.steps or len(losses)) - len(losses)  # steps the earlier run took
        losses = json.loads(path.read_text())[:done] + losses
    path.write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
