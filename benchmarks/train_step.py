"""One motion-training step against a plain forward + backward of the frozen model, as ratios.

Both run on the same random-weight medium CPU model (4 blocks, 8 heads x 64, 1,872 video tokens,
226 text tokens), interleaved in one process. The baseline is diffusers' own attention, with the
loss back-propagated to the noisy input (the same activations kept for backward); the training
step adds d_m motion tokens per block, DMEM's QK mask in every block and the loss of docs/method.md#training. Also
prints the number of trainable numbers for CogVideoX-5B-I2V.

    python benchmarks/train_step.py [--repeats 5] [--tokens 226]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from fleximmt.method.attention import motion_state_for
from fleximmt.training.train import TRAIN_PARTS, TrainSettings, prepare_conditions, training_step


def main() -> None:
    from overhead import interleave, medium_pipeline  # the same model and meter as benchmarks/overhead.py

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=226, help="motion tokens per block (d_m)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = medium_pipeline()
    height, width, frames = 96, 96, 49
    video = (np.random.RandomState(0).rand(frames, height, width, 3) * 255).astype(np.uint8)
    settings = TrainSettings(tokens_per_motion=args.tokens, max_windows=1)
    adapter = pipe.adapter
    cond = prepare_conditions(
        adapter, video, "A ball jumps up.", "ball", "jumps up", settings, (height, width, frames), None, 0
    )
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    tokens = torch.nn.Parameter(torch.randn(cfg.num_layers, args.tokens, dim) * 0.02)
    generator = torch.Generator().manual_seed(0)
    grid = pipe.token_grid(height, width, frames)
    state = motion_state_for(
        tokens[None, None],
        cond.member,
        parts=TRAIN_PARTS,
        num_frames=grid.frames,
        dmem=True,
        concept_member=cond.concept_member,
        dmem_drop=0.3,
        generator=generator,
    )
    video_latents, image_latents = cond.tensors["video_latents"], cond.tensors["image_latents"]
    rotary = pipe._prepare_rotary_positional_embeddings(height, width, video_latents.shape[1], "cpu")
    autocast = torch.autocast("cpu", enabled=False)

    def plain():
        transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
        x = torch.cat([video_latents[:1], image_latents[:1]], dim=2).requires_grad_(True)
        out = transformer(
            hidden_states=x,
            encoder_hidden_states=cond.tensors["prompt_embeds"],
            timestep=torch.tensor([500]),
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        ((out - video_latents[:1]) ** 2).mean().backward()

    def flexi():
        adapter.install_processors()
        tokens.grad = None
        state.set_motion_tokens(tokens[None, None])
        state.begin_step(grid.size, cfg.num_layers)
        with adapter.training_attached(state):
            loss, _ = training_step(adapter, state, cond, 0, generator, settings, lambda: autocast)
            loss.backward()

    m = interleave({"plain": plain, "training": flexi}, args.repeats)
    t_p, t_f = m["plain"]["time"], m["training"]["time"]
    m_p, m_f = m["plain"]["extra"], m["training"]["extra"]
    print(
        f"medium CPU model: 4 blocks, 8 heads x 64, {grid.size} video tokens, d_m = {args.tokens}, "
        f"threads={torch.get_num_threads()}, median of {args.repeats}"
    )
    print(f"time    plain {t_p:.3f} s   training step {t_f:.3f} s   ratio {t_f / t_p:.3f}x")
    print(
        f"working memory above the pre-step level: plain {m_p / 2**20:.1f} MiB, training step {m_f / 2**20:.1f} MiB, "
        f"ratio {m_f / m_p:.3f}x"
    )
    blocks, d_m, width_5b = 42, 226, 48 * 64
    count = blocks * d_m * width_5b
    print(
        f"CogVideoX-5B-I2V: {blocks} blocks x {d_m} tokens x {width_5b} = {count:,} trainable numbers "
        f"({count * 2 / 2**20:.1f} MiB in bf16); the optimiser holds exactly these"
    )


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
