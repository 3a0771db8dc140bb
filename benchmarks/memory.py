"""Peak GPU memory of FlexiMMT on CogVideoX-5B-I2V at 480x720x49, computed without a GPU.

Three kinds of figure, and the table says which each row uses:

- **parameters**: the real configs instantiated on the meta device (accelerate's
  ``init_empty_weights``): the transformer (CogVideoX-5B-I2V's config), the VAE
  (``AutoencoderKLCogVideoX``, CogVideoX's), the text encoder (T5 v1.1 XXL's encoder); bytes in bf16.
- **live tensor bytes on the meta device**: the real modules run on meta tensors (no compute, no
  memory) under a dispatch mode that adds each new storage's bytes when an op creates it and
  subtracts them when the last tensor on it is gone, and keeps the peak: what a GPU's
  ``max_memory_allocated`` counts for the same run, less allocator rounding and kernel workspaces
  (cuDNN, flash attention's few MB). Used for inference: the transformer step with CFG (diffusers'
  attention, and FlexiMMT K objects with its step's layout moved onto meta), the VAE decode with and
  without tiling, the VAE encode of a reference window, the T5 encoder. ``--validate`` checks the
  counter against the CPU allocator's own accounting (torch.profiler memory events) on a small real run.
- **measured per block on the CPU** (``benchmarks/block.py training --out FILE``, float32, restated in
  bf16 by halving every float tensor): the bytes one block saves for backward, with FlexiMMT's motion
  tokens and DMEM masks and without, and the peak RSS of one block's forward + backward above the
  pre-run level. Training rows combine them: 42 blocks' saved bytes (or, with gradient
  checkpointing, 42 blocks' inputs) + the last block's forward + backward peak + the weights + the
  motion tokens, their gradients and AdamW's two moments (float32).

    python benchmarks/memory.py [--training-json block-training.json] [--objects 3] [--validate]
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).parent))
from gpu import GEOMETRY, TRANSFORMER_CONFIGS, moving_masks, random_tokens, rotary, token_geometry, word_members  # noqa: E402
from gpu import config as transformer_config  # noqa: E402

GiB, MiB = 2**30, 2**20
BF16 = torch.bfloat16
# T5 v1.1 XXL (google/t5-v1_1-xxl, CogVideoX's text_encoder/config.json): only its encoder is loaded
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, dropout_rate=0.1, tie_word_embeddings=False)  # fmt: skip
# CogVideoX-5B(-I2V)'s vae/config.json: AutoencoderKLCogVideoX's defaults but for the scaling factor
VAE_5B = dict(scaling_factor=0.7)
# Measured with `benchmarks/block.py training --repeats 1 --out FILE` (2026-11-25, float32 on this CPU,
# commit a00cedf; BENCHMARKS.md): the MiB one block at 480x720x49, batch 1, saves for backward (and
# restated in bf16), its inputs, and the peak RSS above the pre-run level of its forward + backward.
# Overridden by --training-json.
MEASURED_BLOCK = {
    "block_inputs_mib": 208.3125,
    "runs": {
        "plain": {"saved_bf16_mib": 1262.53, "rss_extra_mib": [4220.7]},
        "fleximmt": {"saved_bf16_mib": 1377.27, "rss_extra_mib": [4451.66]},
        "plain +ckpt": {"saved_bf16_mib": 104.16, "rss_extra_mib": [4214.88]},
        "fleximmt +ckpt": {"saved_bf16_mib": 104.16, "rss_extra_mib": [4458.28]},
    },
}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create inside the mode while tensors on them live."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [bytes, tensors on it]

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [storage.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a GPU's fused kernels allocate it (flash / memory-efficient: the output, no N x N scores;
    a bool mask becomes a float bias of its own shape). On meta, torch would pick the math path."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)  # noqa: F841 (lives during the call)
    return query.new_empty(query.shape[:-1] + value.shape[-1:])


def measure_peak(fn, fused: bool = True) -> int:
    """Peak live bytes of the tensors ``fn`` creates (inputs and weights not included), with SDPA
    allocating what the fused GPU kernels allocate."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    if fused:
        F.scaled_dot_product_attention = fused_sdpa
    try:
        with torch.no_grad(), LiveBytes() as mode:
            out = fn()
            del out
    finally:
        F.scaled_dot_product_attention = original
    return mode.peak


def meta_models():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights(include_buffers=True):
        transformer = CogVideoXTransformer3DModel(**TRANSFORMER_CONFIGS["5b"]).to(BF16)
        vae = AutoencoderKLCogVideoX(**VAE_5B).to(BF16)
        text_encoder = T5EncoderModel(T5Config(**T5_XXL)).to(BF16)
    return transformer, vae, text_encoder


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def meta_layout(state, device="meta") -> None:
    """Move a state's step layout (built on the CPU from real masks) and tokens onto ``device``."""
    slot = state.videos[0]
    layout = slot.layout
    slot.motion_tokens = slot.motion_tokens.to(device)
    slot.member = slot.member.to(device)
    layout.order = layout.order.to(device)
    layout.masked_rows = layout.masked_rows.to(device)
    layout.masked_queries = layout.masked_queries.to(device)
    layout.groups = [(q.to(device), k.to(device), c) for q, k, c in layout.groups]


def transformer_step_peak(transformer, objects: int, d_m: int, batch: int = 2) -> int:
    """One denoising step's transformer call with CFG (batch 2) on meta, diffusers' attention (K = 0)
    or FlexiMMT with K objects (auto backend, RMPM features captured in the first 30 blocks)."""
    from fleximmt.attention import motion_state_for
    from fleximmt.models.cogvideox import FlexiMMTAttnProcessor

    cfg = transformer_config("5b")
    height, width, frames = GEOMETRY["5b"]
    geo = token_geometry(cfg, height, width, frames)
    latent_frames, channels, h, w = geo["latent_shape"]
    x = torch.empty(batch, latent_frames, 2 * channels, h, w, device="meta", dtype=BF16)
    text = torch.empty(batch, cfg.max_text_seq_length, cfg.text_embed_dim, device="meta", dtype=BF16)
    rot = tuple(r.to("meta") for r in rotary(cfg, height, width, latent_frames))
    kwargs = None
    if objects:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        member, _ = word_members(objects, cfg.max_text_seq_length)
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        tokens = random_tokens(objects, cfg.num_layers, d_m, dim).to(BF16)
        state = motion_state_for(tokens, member, form="joint", num_frames=geo["grid"][0],
                                 feature_blocks=frozenset(range(30)))  # fmt: skip
        state.set_video_masks(moving_masks(objects, geo["grid"]))
        state.rows, state.feature_rows = [0, 0], [1]
        meta_layout(state)
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn1.set_processor(FlexiMMTAttnProcessor(i))
        kwargs = {"fleximmt": state}
    else:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        transformer.set_attn_processor(CogVideoXAttnProcessor2_0())

    def run():
        return transformer(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((batch,), 500, device="meta"),
                           image_rotary_emb=rot, attention_kwargs=kwargs, return_dict=False)[0]  # fmt: skip

    peak = measure_peak(run)
    if objects:  # what lives on the device through the whole call: tokens, layout, RMPM's feature sum
        slot = state.videos[0]
        layout = slot.layout
        extra = slot.motion_tokens.numel() * 2 + layout.masked_rows.numel() + 8 * (
            layout.order.numel() + layout.masked_queries.numel() + sum(q.numel() + k.numel() for q, k, _ in layout.groups)
        )
        peak += extra
    return peak


def vae_peaks(vae) -> dict[str, int]:
    cfg = transformer_config("5b")
    height, width, frames = GEOMETRY["5b"]
    latent_frames, channels, h, w = token_geometry(cfg, height, width, frames)["latent_shape"]
    z = torch.empty(1, channels, latent_frames, h, w, device="meta", dtype=BF16)
    video = torch.empty(1, 3, frames, height, width, device="meta", dtype=BF16)
    out = {}
    for tiling in (False, True):
        vae.enable_tiling() if tiling else vae.disable_tiling()
        name = "tiled" if tiling else "untiled"
        out[f"decode_{name}"] = measure_peak(lambda: vae.decode(z).sample)
        out[f"encode_{name}"] = measure_peak(lambda: vae.encode(video).latent_dist.mean)
    vae.disable_tiling()
    return out


def t5_peak(text_encoder) -> int:
    ids = torch.zeros(1, 226, dtype=torch.long, device="meta")
    return measure_peak(lambda: text_encoder(ids)[0])


def validate() -> None:
    """LiveBytes against the CPU allocator's accounting (torch.profiler memory events) on a small real run."""
    from diffusers import AutoencoderKLCogVideoX
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).parent))
    from block import make_block

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=(32, 32, 32, 32), norm_num_groups=8, layers_per_block=1)
    z = torch.randn(1, 16, 5, 12, 16)
    cfg = transformer_config("5b", num_attention_heads=8)
    block = make_block(cfg, torch.float32)
    hidden, text, temb = torch.randn(2, 1000, 512), torch.randn(2, 226, 512), torch.randn(2, 512)
    for name, fn in (("VAE decode (small)", lambda: vae.decode(z).sample),
                     ("CogVideoX block (8 heads, 1,226 tokens)", lambda: block(hidden, text, temb)[0])):  # fmt: skip
        counted = measure_peak(fn, fused=False)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        live = peak = 0
        # allocations are booked to the op that made them (self memory), frees outside ops as "[memory]"
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        for e in events:
            live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
            peak = max(peak, live)
        print(f"validate {name}: LiveBytes {counted / MiB:.2f} MiB, CPU allocator (profiler) {peak / MiB:.2f} MiB, "
              f"ratio {counted / peak:.3f}")  # fmt: skip


def block_figures(path: Path | None) -> dict:
    """Per-block training figures in bf16 MiB: saved for backward (plain, FlexiMMT), inputs, fwd+bwd peaks."""
    data = json.loads(path.read_text()) if path else MEASURED_BLOCK
    if data is None:
        raise SystemExit("give --training-json FILE from `benchmarks/block.py training --out FILE`")
    runs = data["runs"]

    def rss(name):
        values = runs[name]["rss_extra_mib"]
        return sorted(values)[len(values) // 2] / 2  # median, float32 -> bf16

    out = {
        "saved_plain": runs["plain"]["saved_bf16_mib"], "saved_flexi": runs["fleximmt"]["saved_bf16_mib"],
        "inputs": data["block_inputs_mib"] / 2,
        "peak_plain": rss("plain"), "peak_flexi": rss("fleximmt"),
    }  # fmt: skip
    if "plain +ckpt" in runs:
        out["peak_plain_ckpt"], out["peak_flexi_ckpt"] = rss("plain +ckpt"), rss("fleximmt +ckpt")
    else:
        out["peak_plain_ckpt"], out["peak_flexi_ckpt"] = out["peak_plain"], out["peak_flexi"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-json", type=Path, help="output of `benchmarks/block.py training --out FILE`")
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=226)
    parser.add_argument("--validate", action="store_true", help="check the meta counter against the CPU allocator first")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    if args.validate:
        validate()
    transformer, vae, text_encoder = meta_models()
    n_tr, n_vae, n_t5 = (sum(p.numel() for p in m.parameters()) for m in (transformer, vae, text_encoder))
    w_tr, w_vae, w_t5 = param_bytes(transformer), param_bytes(vae), param_bytes(text_encoder)
    print(f"parameters (meta device, real configs): transformer {n_tr / 1e9:.3f}B ({w_tr / GiB:.2f} GiB bf16), "
          f"VAE {n_vae / 1e6:.1f}M ({w_vae / GiB:.2f} GiB), T5-XXL encoder {n_t5 / 1e9:.3f}B ({w_t5 / GiB:.2f} GiB)")  # fmt: skip
    step_plain = transformer_step_peak(transformer, 0, args.tokens)
    step_flexi = transformer_step_peak(transformer, args.objects, args.tokens)
    vae_p = vae_peaks(vae)
    t5 = t5_peak(text_encoder)
    print(f"live tensor peaks on meta (bf16): transformer step with CFG: diffusers {step_plain / GiB:.2f} GiB, FlexiMMT K = "
          f"{args.objects} {step_flexi / GiB:.2f} GiB ({step_flexi / step_plain:.3f}x); VAE decode {vae_p['decode_untiled'] / GiB:.2f} "
          f"GiB, tiled {vae_p['decode_tiled'] / GiB:.2f} GiB; VAE encode (49 frames) {vae_p['encode_untiled'] / GiB:.2f} GiB, "
          f"tiled {vae_p['encode_tiled'] / GiB:.2f} GiB; T5 encode {t5 / GiB:.3f} GiB")  # fmt: skip

    rows = []

    def row(name, total, how):
        rows.append((name, total, how))

    weights = w_tr + w_vae + w_t5
    for label, step in (("diffusers", step_plain), (f"FlexiMMT K={args.objects}", step_flexi)):
        row(f"inference, {label}, no offload", weights + max(step, vae_p["decode_untiled"], t5),
            "all weights + the largest of: transformer step, VAE decode, T5 encode (meta)")
        row(f"inference, {label}, enable_model_cpu_offload()",
            max(w_tr + step, w_vae + vae_p["decode_untiled"], w_t5 + t5),
            "one component on the GPU at a time: the largest of its weights + its peak (meta)")
        row(f"inference, {label}, model offload + vae.enable_tiling()",
            max(w_tr + step, w_vae + vae_p["decode_tiled"], w_t5 + t5), "as above, tiled VAE decode (meta)")

    blk = block_figures(args.training_json)
    layers = transformer.config.num_layers
    num_tokens = layers * args.tokens * transformer.config.num_attention_heads * transformer.config.attention_head_dim
    optim = num_tokens * 4 * 4  # float32 tokens, gradients, AdamW's exp_avg and exp_avg_sq
    stacked = num_tokens * 4  # torch.stack(experts) each step
    caching = max(weights + vae_p["encode_untiled"], weights + t5)
    caching_tiled = max(weights + vae_p["encode_tiled"], weights + t5)
    outside = 2 * 17776 * 3072 * 2  # patch embedding and final norm/projection activations (bf16, computed)
    base = w_tr + optim + stacked + outside
    nockpt = base + (layers - 1) * blk["saved_flexi"] * MiB + blk["peak_flexi"] * MiB
    ckpt = base + layers * blk["inputs"] * MiB + blk["peak_flexi_ckpt"] * MiB
    nockpt_plain = base + (layers - 1) * blk["saved_plain"] * MiB + blk["peak_plain"] * MiB
    ckpt_plain = base + layers * blk["inputs"] * MiB + blk["peak_plain_ckpt"] * MiB
    how_train = ("transformer weights + tokens/grads/AdamW (fp32) + 41 x a block's saved bytes + one block's fwd+bwd "
                 "peak (CPU-measured per block, bf16) ")  # fmt: skip
    row("training, caching phase (T5 + VAE encode, all weights on the GPU)", caching, "weights + VAE encode or T5 peak (meta)")
    row("training, caching phase, VAE tiling", caching_tiled, "weights + tiled VAE encode (meta)")
    row("training step, gradient_checkpointing=False, T5/VAE offloaded after caching", nockpt, how_train)
    row("training step, gradient_checkpointing=True, T5/VAE offloaded", ckpt,
        "transformer weights + tokens/grads/AdamW + 42 x block inputs + one block's recompute fwd+bwd peak (CPU-measured)")
    row("training step, gradient_checkpointing=True, T5/VAE left on the GPU (offload_after_caching=False)",
        ckpt + w_t5 + w_vae, "the row above + T5 and VAE weights")
    row("training, gradient_checkpointing=True + pipe.enable_model_cpu_offload() (caching and steps)",
        max(w_t5 + t5, w_vae + vae_p["encode_untiled"], ckpt),
        "one component on the GPU at a time: T5 encode, VAE encode (meta), or the checkpointed step")
    row("training, as above + vae_tiling=True", max(w_t5 + t5, w_vae + vae_p["encode_tiled"], ckpt),
        "as above, tiled VAE encode (meta)")
    row("plain forward+backward of the same model, no checkpointing (reference)", nockpt_plain, how_train + "diffusers' attention")
    row("plain forward+backward, checkpointing (reference)", ckpt_plain, "as above, diffusers' attention")
    print(f"\nper block (bf16, from {args.training_json or 'the recorded measurement'}): saved for backward plain "
          f"{blk['saved_plain']:.0f} MiB, FlexiMMT {blk['saved_flexi']:.0f} MiB; checkpointed inputs {blk['inputs']:.0f} MiB; "
          f"fwd+bwd peak plain {blk['peak_plain']:.0f} / FlexiMMT {blk['peak_flexi']:.0f} MiB, with checkpointing "
          f"{blk['peak_plain_ckpt']:.0f} / {blk['peak_flexi_ckpt']:.0f} MiB")  # fmt: skip
    print(f"motion tokens: {num_tokens:,} numbers; fp32 tokens + grads + AdamW moments {optim / MiB:.0f} MiB (an 8-bit "
          f"optimiser would save {num_tokens * 6 / MiB:.0f} MiB)")  # fmt: skip
    print("\n| configuration, CogVideoX-5B-I2V 480x720x49, bf16 | peak GPU memory | how |\n|---|---|---|")
    for name, total, how in rows:
        print(f"| {name} | {total / GiB:.1f} GiB | {how} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": [(n, t / GiB, h) for n, t, h in rows], "block": blk,
                                        "params": {"transformer": n_tr, "vae": n_vae, "t5": n_t5}}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
