"""FlexiMMT's cost over plain CogVideoX image-to-video, measured as ratios in one process.

Runs diffusers' vanilla ``CogVideoXImageToVideoPipeline`` and ``FlexiMMTPipeline`` (K objects,
RMPM every step, no dynamic stop) on the same random-weight medium CPU model, interleaved, and
prints time and peak-memory ratios. Then, for the real CogVideoX-5B-I2V transformer config
(instantiated on the meta device) at 480x720x49, prints the sequence length N, the bytes a dense
float mask would take per block call, and the bytes the auto backend's mask structures take.

    python benchmarks/overhead.py [--repeats 3] [--steps 4] [--objects 3] [--memory-rounds 2]
    python benchmarks/overhead.py --attention [--repeats 15]   # one attention call, where the time goes

``--attention`` takes the MDMA layouts one FlexiMMT run of the medium model makes (one per denoising
step) and times, interleaved on the same random ``[2, 8, 2,098, 64]`` query/key/value: diffusers'
one SDPA call against the auto backend's grouped call (``GroupedJoint.attend_video_first`` on the
``[video | text | motion]`` tokens FlexiMMT's processor makes), the same layout with
the small groups not merged (each its own unmasked call), and the masked call alone with its mask as
bool rows (SDPA converts them in every call) or as the float mask the layout makes once.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import threading
import time

import numpy as np
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from PIL import Image

from fleximmt import FlexiMMTPipeline, ObjectMotion
from fleximmt.method.kernels import Mdma, grouped
from fleximmt.method.kernels.grouped import GroupedJoint
from fleximmt.method.masks import PARTS, span_membership
from fleximmt.toy import random_motion, tiny_components

_libc = ctypes.CDLL("libc.so.6")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        gc.collect()
        _libc.malloc_trim(0)  # hand freed memory back, so each run starts from the same floor
        self.base = self.peak = rss()
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def interleave(runs: dict, repeats: int, memory_rounds: int = 2) -> dict[str, dict[str, float]]:
    """Run each function once to warm up, then ``repeats`` timed rounds in turn (the order reversed
    every other round, so a drift of the machine's speed falls on both alike); medians of the wall
    time and of the process's CPU time. Peak RSS and the working memory above the pre-run level come
    from ``memory_rounds`` separate rounds: the 1 ms RSS sampler is a Python thread that competes for
    the GIL and the 2 cores, so it stays out of the timed runs."""
    samples = {name: {"time": [], "cpu": [], "peak": [], "extra": []} for name in runs}
    for fn in runs.values():
        fn()
    names = list(runs)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            gc.collect()
            start, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            samples[name]["time"].append(time.perf_counter() - start)
            samples[name]["cpu"].append(time.process_time() - cpu)
    for _ in range(memory_rounds):
        for name, fn in runs.items():
            with PeakRSS() as mem:
                fn()
            samples[name]["peak"].append(mem.peak)
            samples[name]["extra"].append(mem.extra)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def medium_pipeline() -> FlexiMMTPipeline:
    # 4 blocks of 8 heads x 64; 96x96x49 -> 13 x 12 x 12 = 1,872 video tokens; 226 text tokens
    comps = tiny_components(
        seed=0,
        height=96,
        width=96,
        num_frames=49,
        num_layers=4,
        heads=8,
        head_dim=64,
        text_len=226,
        vae_channels=(16, 32, 32),
        latent_channels=8,
    )
    pipe = FlexiMMTPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def objects_for(pipe, count: int, d_m: int) -> tuple[str, list[ObjectMotion]]:
    words = ["jumps up", "slides left", "spins around", "rolls down", "walks right"]
    names = ["ball", "box", "cat", "star", "dog"]
    prompt = " ".join(f"A {names[k]} {words[k]}." for k in range(count))
    masks = []
    for k in range(count):
        m = np.zeros((96, 96), bool)
        m[8 + 24 * k : 40 + 24 * k, 10 + 20 * k : 50 + 20 * k] = True
        masks.append(m)
    objs = [ObjectMotion(masks[k], random_motion(pipe.transformer, d_m, seed=k), words[k]) for k in range(count)]
    return prompt, objs


def measure(args) -> None:
    torch.manual_seed(0)
    pipe = medium_pipeline()
    image = Image.fromarray((np.random.RandomState(0).rand(96, 96, 3) * 255).astype(np.uint8))
    prompt, objs = objects_for(pipe, args.objects, args.tokens)
    common = dict(
        image=image,
        prompt=prompt,
        num_inference_steps=args.steps,
        guidance_scale=6.0,
        output_type="latent",
        max_sequence_length=226,
    )
    grid = pipe.token_grid(96, 96, 49)
    print(
        f"medium CPU model: 4 blocks, 8 heads x 64, {grid.size} video tokens, 226 text tokens, "
        f"K = {args.objects} x {args.tokens} motion tokens, {args.steps} steps with CFG, threads={torch.get_num_threads()}"
    )

    def vanilla():
        pipe.transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
        return super(FlexiMMTPipeline, pipe).__call__(generator=torch.Generator().manual_seed(0), **common)

    def flexi():
        pipe.adapter.install_processors()
        return pipe(generator=torch.Generator().manual_seed(0), objects=objs, alpha=None, **common)

    m = interleave({"vanilla": vanilla, "fleximmt": flexi}, args.repeats, args.memory_rounds)
    t_v, t_f = m["vanilla"]["time"], m["fleximmt"]["time"]
    p_v, p_f = m["vanilla"]["extra"], m["fleximmt"]["extra"]
    q_v, q_f = m["vanilla"]["peak"], m["fleximmt"]["peak"]
    c_v, c_f = m["vanilla"]["cpu"], m["fleximmt"]["cpu"]
    print(
        f"time      vanilla {t_v:7.2f} s   fleximmt {t_f:7.2f} s   ratio {t_f / t_v:.3f}x  (median of {args.repeats})"
    )
    print(f"CPU time  vanilla {c_v:7.2f} s   fleximmt {c_f:7.2f} s   ratio {c_f / c_v:.3f}x")
    print(
        f"peak RSS  vanilla {q_v / 2**20:7.1f} MiB fleximmt {q_f / 2**20:7.1f} MiB ratio {q_f / q_v:.3f}x  (median of {args.memory_rounds})"
    )
    print(
        f"working memory above the pre-run level: vanilla {p_v / 2**20:.1f} MiB, fleximmt {p_f / 2**20:.1f} MiB, "
        f"ratio {p_f / p_v:.3f}x"
    )


def real_model_sizes(objects: int = 3, d_m: int = 226) -> None:
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    with init_empty_weights():  # the CogVideoX-5B-I2V transformer config, no weights allocated
        model = CogVideoXTransformer3DModel(
            num_attention_heads=48,
            attention_head_dim=64,
            in_channels=32,
            out_channels=16,
            time_embed_dim=512,
            text_embed_dim=4096,
            num_layers=42,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
        )
    cfg = model.config
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
    h, w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    n_video = frames * h * w
    text = cfg.max_text_seq_length
    n = text + objects * d_m + n_video
    heads, batch = cfg.num_attention_heads, 2  # CFG doubles the batch
    dense_bytes = batch * heads * n * n * 2  # the release's bf16 [B, H, N, N] mask, every block call
    # the auto backend's structures for a realistic layout: K overlapping boxes on the token grid
    masks = torch.zeros(objects, frames, h, w, dtype=torch.bool)
    for k in range(objects):
        masks[k, :, 4 + 6 * k : 18 + 6 * k, 5 + 10 * k : 20 + 10 * k] = True
    spans = [list(range(3 + 5 * k, 6 + 5 * k)) for k in range(objects)]
    layout = GroupedJoint(Mdma(span_membership(text, spans), d_m, masks.reshape(objects, -1), frozenset(PARTS)))
    bias = layout.masked_bias(torch.empty(0, dtype=torch.bfloat16))  # the masked call's float mask, bf16 as on a GPU
    auto_bytes = (
        layout.masked_rows.numel() * layout.masked_rows.element_size()
        + layout.masked_queries.numel() * 8
        + sum(g.queries.numel() * 8 + g.keys.numel() * 8 for g in layout.groups)
        + bias.numel() * bias.element_size()
    )
    print(
        f"\nCogVideoX-5B-I2V at 480x720x49 (meta device), K = {objects}, d_m = {d_m}: "
        f"{cfg.num_layers} blocks, {heads} heads, {n_video} video tokens, N = {n}"
    )
    print(f"dense float mask per block call (bf16 [2, {heads}, N, N]): {dense_bytes / 2**30:.2f} GiB")
    print(
        f"auto backend mask structures (mask rows [{layout.masked_rows.shape[0]}, N], bool and as a bf16 float mask, for the text queries and "
        f"{layout.num_merged} queries of small groups + {len(layout.groups)} unmasked groups), once per step: "
        f"{auto_bytes / 2**20:.2f} MiB  ({dense_bytes / auto_bytes:.0f}x less)"
    )


def attention_calls(args) -> None:
    """Medians of ``args.repeats`` interleaved calls per layout; see the module's docstring."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    pipe = medium_pipeline()
    image = Image.fromarray((np.random.RandomState(0).rand(96, 96, 3) * 255).astype(np.uint8))
    prompt, objs = objects_for(pipe, args.objects, args.tokens)
    layouts = []  # (layout, the MDMA it was built from)
    built = GroupedJoint.__init__

    def keep(layout, mdma, *args):
        built(layout, mdma, *args)
        layouts.append((layout, mdma))

    GroupedJoint.__init__ = keep
    try:
        pipe.adapter.install_processors()
        pipe(
            image=image,
            prompt=prompt,
            num_inference_steps=args.steps,
            guidance_scale=6.0,
            output_type="latent",
            max_sequence_length=226,
            generator=torch.Generator().manual_seed(0),
            objects=objs,
            alpha=None,
        )
    finally:
        GroupedJoint.__init__ = built
    text, n_motion = 226, args.objects * args.tokens
    n_video = layouts[0][0].video_masks.shape[1]
    q, k, v = (torch.randn(2, 8, text + n_video, 64) for _ in range(3))
    # FlexiMMT's processor's tokens: [video | text | motion], the motion rows projected with the rest
    q_f, k_f, v_f = (torch.randn(2, 8, n_video + text + n_motion, 64) for _ in range(3))

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    print(
        f"one attention call of the medium model, [2, 8, {q.shape[2]}, 64], K = {args.objects} x {args.tokens} "
        f"motion tokens; medians of {args.repeats} calls, interleaved"
    )
    below = grouped.MERGE_BELOW
    with torch.no_grad():
        for step, (layout, mdma) in enumerate(layouts[1:], 1):  # step 0's layout comes from the first-frame masks
            try:
                grouped.MERGE_BELOW = 0
                unmerged = GroupedJoint(mdma)
            finally:
                grouped.MERGE_BELOW = below
            rows = layout.masked_rows
            masked_q = torch.randn(2, 8, rows.shape[0], 64)
            keys, values = (torch.randn(2, 8, rows.shape[1], 64) for _ in range(2))
            bias = layout.masked_bias(masked_q)
            runs = {
                "diffusers SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
                "grouped (auto)": lambda: layout.attend_video_first(q_f, k_f, v_f, text),
                "grouped, small groups unmerged": lambda: unmerged.attend_video_first(q_f, k_f, v_f, text),
                "masked call, bool rows": lambda: F.scaled_dot_product_attention(
                    masked_q, keys, values, attn_mask=rows
                ),
                "masked call, float mask": lambda: F.scaled_dot_product_attention(
                    masked_q, keys, values, attn_mask=bias
                ),
                "same queries, unmasked": lambda: F.scaled_dot_product_attention(masked_q, keys, values),
            }
            for fn in runs.values():
                fn()
            samples = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    samples[name].append(timed(fn))
            ms = {name: statistics.median(t) * 1000 for name, t in samples.items()}
            print(
                f"step {step}: groups {[g.count for g in layout.groups]}, masked call {rows.shape[0]} rows "
                f"(226 text + {layout.num_merged} video) x {rows.shape[1]} keys"
            )
            for name, value in ms.items():
                base = ms["same queries, unmasked"] if name.startswith("masked") else ms["diffusers SDPA"]
                print(f"  {name:32s} {value:7.1f} ms  {value / base:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16, help="motion tokens per object (d_m)")
    parser.add_argument("--skip-run", action="store_true", help="only print the real-model sizes")
    parser.add_argument(
        "--memory-rounds", type=int, default=2, help="separate rounds for peak memory (unsampled while timing)"
    )
    parser.add_argument(
        "--attention", action="store_true", help="time one attention call per layout instead (see above)"
    )
    args = parser.parse_args()
    if args.attention:
        attention_calls(args)
        return
    if not args.skip_run:
        measure(args)
    real_model_sizes(args.objects)


if __name__ == "__main__":
    main()
