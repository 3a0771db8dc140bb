"""One real-size CogVideoX transformer block: FlexiMMT against diffusers' attention, on this CPU.

diffusers' ``CogVideoXBlock`` built exactly as ``CogVideoXTransformer3DModel`` builds its blocks from
the real checkpoint's config (3072 = 48 heads x 64, time_embed_dim 512, QK-norm, attention bias),
with random weights, at the model's true sequence length (CogVideoX-5B-I2V at 480x720x49: 17,550
video + 226 text tokens; ``--model 1.5``: CogVideoX1.5-5B-I2V at 768x1360x81, 44,880 video tokens).
Everything runs in one process, interleaved (baseline, then each FlexiMMT variant, round after
round), and ratios are taken against the baseline of the same round.

- inference: one block call with CFG (batch 2), diffusers' ``CogVideoXAttnProcessor2_0`` against
  ``FlexiMMTAttnProcessor`` (auto backend) with K objects x d_m motion tokens, ellipse masks
  covering 5-30% of the frame that cross the frame over the token frames, features captured as in
  RMPM's blocks. ``--scope attention`` times the attention call alone (the only part that differs).
- training: one block's forward + backward (batch 1, weights frozen, gradients to the block's
  inputs; FlexiMMT: to the motion tokens too, DMEM's masks on with a 30% drop), with and without
  gradient checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``). Memory: the bytes
  autograd saves for backward (``saved_tensors_hooks``, unique storages, parameters excluded: what a
  GPU would hold between forward and backward) and the peak RSS above the pre-run level.
- ``--profile K``: torch.profiler's breakdown of one attention call, baseline and FlexiMMT K.

Float32 by default (this CPU has no fast bf16); bf16 halves every float tensor (masks and indices stay).

    python benchmarks/block.py inference [--objects 1 3 5] [--repeats 2] [--scope block] [--out r.json]   # 20 min quiet
    python benchmarks/block.py training [--repeats 1] [--checkpointing off on]                          # 25-40 min
    python benchmarks/block.py inference --model 1.5 --scope attention --batch 1 --objects 3 --repeats 1
    python benchmarks/block.py profile --objects 3
    python benchmarks/block.py inference --height 96 --width 96 --frames 9 --repeats 1   # a quick try
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from gpu import GEOMETRY, MODEL_NAMES, config, moving_masks, random_tokens, rotary, token_geometry, word_members  # noqa: E402
from overhead import PeakRSS  # noqa: E402

from fleximmt.attention import motion_state_for  # noqa: E402
from fleximmt.models.cogvideox import FlexiMMTAttnProcessor  # noqa: E402
from fleximmt.train import TRAIN_PARTS  # noqa: E402

MiB = 2**20


def make_block(cfg, dtype: torch.dtype, seed: int = 0) -> CogVideoXBlock:
    """One block as ``CogVideoXTransformer3DModel.__init__`` builds it, random weights, frozen."""
    torch.manual_seed(seed)
    block = CogVideoXBlock(
        dim=cfg.num_attention_heads * cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim, time_embed_dim=cfg.time_embed_dim, dropout=cfg.dropout,
        activation_fn=cfg.activation_fn, attention_bias=cfg.attention_bias,
        norm_elementwise_affine=cfg.norm_elementwise_affine, norm_eps=cfg.norm_eps,
    )  # fmt: skip
    return block.to(dtype).eval().requires_grad_(False)


class SavedBytes:
    """Bytes autograd saves for backward inside the ``with`` block: unique storages, the given
    parameters excluded; ``by_dtype`` splits them so float32 figures can be restated for bf16."""

    def __init__(self, exclude):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: dict[int, tuple[int, torch.dtype, tuple]] = {}

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude and ptr not in self.storages:
            self.storages[ptr] = (storage.nbytes(), t.dtype, tuple(t.shape))
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.storages.values())

    def as_bf16(self) -> int:
        """The same storages with every float tensor in bf16."""
        return sum(n // (t.itemsize // 2) if t.is_floating_point else n for n, t, _ in self.storages.values())

    def largest(self, count: int = 8) -> list[str]:
        rows = sorted(self.storages.values(), key=lambda r: -r[0])[:count]
        return [f"{n / MiB:.1f} MiB {str(t).replace('torch.', '')} {list(s)}" for n, t, s in rows]


class Setup:
    """The block, its inputs and FlexiMMT's states for one model and geometry."""

    def __init__(self, args):
        self.cfg = config(args.model)
        self.cfg_name = args.model
        height, width, frames = args.height or GEOMETRY[args.model][0], args.width or GEOMETRY[args.model][1], \
            args.frames or GEOMETRY[args.model][2]  # fmt: skip
        self.size = (height, width, frames)
        self.geo = token_geometry(self.cfg, height, width, frames)
        self.grid = self.geo["grid"]
        self.n_video = self.geo["video_tokens"]
        self.text = self.cfg.max_text_seq_length
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        self.dtype = getattr(torch, args.dtype)
        self.block = make_block(self.cfg, self.dtype)
        self.rotary = rotary(self.cfg, height, width, self.geo["latent_frames"])
        self.d_m = args.tokens

    def inputs(self, batch: int, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.randn(batch, self.n_video, self.dim, generator=gen).to(self.dtype)
        text = torch.randn(batch, self.text, self.dim, generator=gen).to(self.dtype)
        temb = torch.randn(batch, self.cfg.time_embed_dim, generator=gen).to(self.dtype)
        return hidden, text, temb

    def describe(self) -> str:
        h, w, f = self.size
        return (f"{MODEL_NAMES[self.cfg_name]} block, {h}x{w}x{f}: {self.geo['latent_frames']} latent frames, token grid "
                f"{self.grid[0]} x {self.grid[1]} x {self.grid[2]} = {self.n_video:,} video + {self.text} text tokens; "
                f"{self.cfg.num_attention_heads} heads x {self.cfg.attention_head_dim}; {self.dtype}; "
                f"torch {torch.__version__}, threads {torch.get_num_threads()}")  # fmt: skip


def inference_states(setup: Setup, objects: list[int], batch: int) -> dict[int, dict]:
    """A FlexiMMT state per K as the pipeline prepares one step (CFG rows ``[uncond | cond]`` of one video)."""
    states = {}
    for k in objects:
        member, _ = word_members(k, setup.text)
        tokens = random_tokens(k, 1, setup.d_m, setup.dim, seed=k).to(setup.dtype)
        masks = moving_masks(k, setup.grid)
        state = motion_state_for(tokens, member, form="joint", num_frames=setup.grid[0], feature_blocks=frozenset({0}))
        start = time.perf_counter()
        state.set_video_masks(masks)
        layout_s = time.perf_counter() - start
        state.rows, state.feature_rows = ([0, 0], [1]) if batch == 2 else (None, [0])
        layout = state.videos[0].layout
        coverage = masks.view(k, setup.grid[0], -1).float().mean(-1)  # per object and token frame
        states[k] = {
            "state": state, "layout_s": layout_s,
            "coverage": [round(c, 3) for c in coverage.mean(1).tolist()],
            "coverage_range": [round(coverage.min().item(), 3), round(coverage.max().item(), 3)],
            "groups": [int(q.numel()) for q, _, _ in layout.groups],
            "groups_chained": [bool(c) for _, _, c in layout.groups],
            "masked_rows": int(layout.masked_rows.shape[0]),
            "merged_video_queries": int(layout.masked_queries.numel()),
        }  # fmt: skip
    return states


def interleave(runs: dict, repeats: int, warmup: bool) -> dict[str, dict[str, list[float]]]:
    """Wall time, and the CPU time of this process (all its threads): on a machine whose cores others
    share, the CPU time a call needs moves far less with their load than its wall time does."""
    samples = {name: {"time": [], "cpu": [], "rss_extra": []} for name in runs}
    if warmup:
        for fn in runs.values():
            fn()
    for r in range(repeats):
        for name, fn in runs.items():
            with PeakRSS() as mem:
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                samples[name]["time"].append(time.perf_counter() - start)
                samples[name]["cpu"].append(time.process_time() - cpu)
            samples[name]["rss_extra"].append(mem.extra)
            print(f"  round {r + 1}: {name:<28} {samples[name]['time'][-1]:8.2f} s wall {samples[name]['cpu'][-1]:8.2f} s CPU"
                  f"  peak RSS +{mem.extra / MiB:7.0f} MiB", flush=True)  # fmt: skip
    return samples


def ratios(samples: dict, base: str) -> dict[str, dict]:
    """Per variant: median time, and the ratio to the baseline of the same round (median, min, max)."""
    out = {}
    for name, s in samples.items():
        per_round = [t / b for t, b in zip(s["time"], samples[base]["time"])]
        per_round_cpu = [t / b for t, b in zip(s["cpu"], samples[base]["cpu"])]
        mem = [m / b if b else float("nan") for m, b in zip(s["rss_extra"], samples[base]["rss_extra"])]
        out[name] = {
            "time_s": s["time"], "median_s": statistics.median(s["time"]),
            "ratio": statistics.median(per_round), "ratio_min": min(per_round), "ratio_max": max(per_round),
            "cpu_s": s["cpu"], "cpu_ratio": statistics.median(per_round_cpu), "cpu_ratio_min": min(per_round_cpu),
            "cpu_ratio_max": max(per_round_cpu),
            "rss_extra_mib": [m / MiB for m in s["rss_extra"]], "rss_ratio": statistics.median(mem),
        }  # fmt: skip
    return out


def run_inference(args, setup: Setup) -> dict:
    block, batch = setup.block, args.batch
    hidden, text, temb = setup.inputs(batch)
    states = inference_states(setup, args.objects, batch)
    plain_proc = CogVideoXAttnProcessor2_0()
    flexi_proc = FlexiMMTAttnProcessor(0)
    if args.scope == "attention":
        with torch.no_grad():
            hidden, text, _, _ = block.norm1(hidden, text, temb)

    def call(kwargs):
        with torch.no_grad():
            if args.scope == "attention":
                return block.attn1(hidden_states=hidden, encoder_hidden_states=text, image_rotary_emb=setup.rotary, **kwargs)
            return block(hidden, text, temb, setup.rotary, attention_kwargs=kwargs or None)

    def plain():
        block.attn1.set_processor(plain_proc)
        call({})

    def flexi(k):
        def run():
            block.attn1.set_processor(flexi_proc)
            call({"fleximmt": states[k]["state"]})
            states[k]["state"].take_features()  # what RMPM reads after the step; resets the running sum

        return run

    runs = {"diffusers": plain, **{f"fleximmt K={k}": flexi(k) for k in args.objects}}
    print(f"inference ({args.scope}, batch {batch}{' = CFG' if batch == 2 else ''}), d_m = {setup.d_m}, "
          f"{args.repeats} rounds{' after a warm-up round' if args.warmup else ''}:")  # fmt: skip
    for k in args.objects:
        s = states[k]
        print(f"  K={k}: object coverage {s['coverage']} of the frame (per frame {s['coverage_range'][0]:.0%}-"
              f"{s['coverage_range'][1]:.0%}); unmasked groups {s['groups']} (chained {s['groups_chained']}); masked call "
              f"{s['masked_rows']} rows (226 text + {s['merged_video_queries']} merged video queries); layout built in "
              f"{s['layout_s']:.3f} s once per step")  # fmt: skip
    samples = interleave(runs, args.repeats, args.warmup)
    result = ratios(samples, "diffusers")
    for name, r in result.items():
        print(f"  {name:<16} median {r['median_s']:8.2f} s  ratio {r['ratio']:.3f}x (rounds {r['ratio_min']:.3f}-"
              f"{r['ratio_max']:.3f}); CPU time ratio {r['cpu_ratio']:.3f}x ({r['cpu_ratio_min']:.3f}-{r['cpu_ratio_max']:.3f}); "
              f"peak RSS extra {statistics.median(r['rss_extra_mib']):.0f} MiB ({r['rss_ratio']:.3f}x)")  # fmt: skip
    for k in args.objects:
        states[k].pop("state")
    return {"runs": result, "layouts": {str(k): v for k, v in states.items()}}


def run_training(args, setup: Setup) -> dict:
    block = setup.block
    hidden, text, temb = setup.inputs(1, seed=2)
    gen = torch.Generator().manual_seed(3)
    grad_h = torch.randn(hidden.shape, generator=gen).to(setup.dtype)
    grad_t = torch.randn(text.shape, generator=gen).to(setup.dtype)
    member, concept = word_members(1, setup.text)
    tokens = torch.nn.Parameter(random_tokens(1, 1, setup.d_m, setup.dim).to(setup.dtype))
    state = motion_state_for(tokens, member, form="joint", parts=TRAIN_PARTS, num_frames=setup.grid[0], dmem=True,
                             concept_member=concept, dmem_drop=0.3, generator=torch.Generator().manual_seed(0))  # fmt: skip
    plain_proc, flexi_proc = CogVideoXAttnProcessor2_0(), FlexiMMTAttnProcessor(0)
    params = list(block.parameters()) + [tokens]
    saved: dict[str, SavedBytes] = {}
    dmem_cover: list[float] = []

    def step(flexi: bool, ckpt: bool, name: str):
        def run():
            block.attn1.set_processor(flexi_proc if flexi else plain_proc)
            kwargs = None
            if flexi:
                tokens.grad = None
                state.begin_step(setup.n_video, 1)
                kwargs = {"fleximmt": state}
            x = hidden.detach().requires_grad_(True)
            y = text.detach().requires_grad_(True)

            def fn(a, b):
                return block(a, b, temb, setup.rotary, attention_kwargs=kwargs)

            with SavedBytes(params) as counter:
                out = checkpoint(fn, x, y, use_reentrant=False) if ckpt else fn(x, y)
            saved[name] = counter
            torch.autograd.backward(out, (grad_h, grad_t))
            assert x.grad is not None and (not flexi or tokens.grad is not None)
            if flexi:
                dmem_cover.append(state._dmem_layouts[(0, 0)].video_masks.float().mean().item())

        return run

    runs = {}
    for ckpt in [c == "on" for c in args.checkpointing]:
        suffix = " +ckpt" if ckpt else ""
        runs[f"plain{suffix}"] = step(False, ckpt, f"plain{suffix}")
        runs[f"fleximmt{suffix}"] = step(True, ckpt, f"fleximmt{suffix}")
    print(f"training (batch 1, forward + backward, weights frozen), d_m = {setup.d_m}, DMEM drop 0.3, "
          f"{args.repeats} rounds{' after a warm-up round' if args.warmup else ''}:")  # fmt: skip
    samples = interleave(runs, args.repeats, args.warmup)
    result = {}
    for ckpt in args.checkpointing:
        suffix = " +ckpt" if ckpt == "on" else ""
        part = ratios({k: samples[k] for k in (f"plain{suffix}", f"fleximmt{suffix}")}, f"plain{suffix}")
        result.update(part)
    for name, r in result.items():
        counter = saved[name]
        r["saved_mib"], r["saved_bf16_mib"] = counter.total / MiB, counter.as_bf16() / MiB
        r["saved_largest"] = counter.largest()
    inputs_bytes = (hidden.numel() + text.numel()) * hidden.element_size()
    for name, r in result.items():
        base = result["plain +ckpt" if "ckpt" in name else "plain"]
        if "ckpt" in name:  # checkpoint keeps the block's inputs (its own hooks hide the rest from ours)
            r["held_mib"], r["held_bf16_mib"] = inputs_bytes / MiB, inputs_bytes / 2 / MiB
        else:
            r["held_mib"], r["held_bf16_mib"] = r["saved_mib"], r["saved_bf16_mib"]
        r["held_ratio"] = r["held_mib"] / base["held_mib"]
        print(f"  {name:<16} median {r['median_s']:8.2f} s  ratio {r['ratio']:.3f}x (rounds {r['ratio_min']:.3f}-"
              f"{r['ratio_max']:.3f}); CPU time ratio {r['cpu_ratio']:.3f}x;  held for backward {r['held_mib']:.0f} MiB ({r['held_ratio']:.3f}x; bf16 "
              f"{r['held_bf16_mib']:.0f} MiB)  peak RSS extra {statistics.median(r['rss_extra_mib']):.0f} MiB "
              f"({r['rss_ratio']:.3f}x)")  # fmt: skip
    for name in ("plain", "fleximmt"):
        if name in saved:
            print(f"  largest saved storages, {name}: " + "; ".join(saved[name].largest(6)))
    print(f"  DMEM masks covered {statistics.mean(dmem_cover):.0%} of the video tokens (after the 30% drop)")
    return {"runs": result, "block_inputs_mib": inputs_bytes / MiB, "dmem_coverage": statistics.mean(dmem_cover)}


def run_profile(args, setup: Setup) -> dict:
    """torch.profiler over one attention call (CFG batch), baseline and FlexiMMT with the first K."""
    from torch.profiler import ProfilerActivity, profile

    block, batch, k = setup.block, args.batch, args.objects[0]
    hidden, text, temb = setup.inputs(batch)
    state = inference_states(setup, [k], batch)[k]["state"]
    with torch.no_grad():
        hidden, text, _, _ = block.norm1(hidden, text, temb)
    out = {}
    for name, proc, kwargs in (("diffusers", CogVideoXAttnProcessor2_0(), {}),
                               (f"fleximmt K={k}", FlexiMMTAttnProcessor(0), {"fleximmt": state})):  # fmt: skip
        block.attn1.set_processor(proc)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            block.attn1(hidden_states=hidden, encoder_hidden_states=text, image_rotary_emb=setup.rotary, **kwargs)
            total = time.perf_counter() - start
        state.take_features()
        rows = []
        for ev in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[: args.top]:
            shapes = ", ".join(str(s) for s in ev.input_shapes[:3] if s)
            rows.append({"op": ev.key, "calls": ev.count, "self_s": ev.self_cpu_time_total / 1e6, "shapes": shapes})
        out[name] = {"total_s": total, "ops": rows}
        print(f"{name}: attention call {total:.2f} s; self time by op and input shapes:")
        for r in rows:
            print(f"  {r['self_s']:8.3f} s  {r['calls']:3d}x  {r['op']:<55} {r['shapes'][:110]}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["inference", "training", "profile"])
    parser.add_argument("--model", choices=sorted(GEOMETRY), default="5b")
    parser.add_argument("--height", type=int), parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int, help="video frames (default: the model's own)")
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 3, 5], help="K values (profile: the first)")
    parser.add_argument("--tokens", type=int, default=226, help="motion tokens per object and block (d_m)")
    parser.add_argument("--repeats", type=int, help="rounds (default: inference 2, training 1)")
    parser.add_argument("--warmup", action="store_true", help="one untimed round first")
    parser.add_argument("--batch", type=int, default=2, choices=[1, 2], help="inference rows (2 = CFG)")
    parser.add_argument("--scope", choices=["block", "attention"], default="block")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top", type=int, default=14, help="profile: rows shown")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.what == "inference" else 1
    setup = Setup(args)
    print(setup.describe(), flush=True)
    result = {"what": args.what, "model": args.model, "size": setup.size, "video_tokens": setup.n_video,
              "dtype": args.dtype, "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    result.update({"inference": run_inference, "training": run_training, "profile": run_profile}[args.what](args, setup))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
