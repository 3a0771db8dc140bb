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

Every model comes from the registered adapters (``fleximmt.models.adapters()``): ``--model`` takes the names of the
true sizes each adapter module declares (``ModelAdapter.true_sizes``). The block is the first of a one-block
transformer that the family's transformer class builds from the checkpoint's config; its inputs are what that
transformer's forward hands it for the family's random forward of one denoising step (``random_forwards``, the
conditional one, or CFG's where one forward holds both branches), caught by a hook before the block runs; the
attention FlexiMMT changes is the adapter's ``motion_attention``, its inputs caught in a block call as well. A new
family's adapter module that declares them is benchmarked as these are:

``--model wan2.1`` (``wan2.2-5b``): one ``WanTransformerBlock`` built exactly as
``WanTransformer3DModel.__init__`` builds it from Wan2.1-I2V-14B-480P's (Wan2.2-TI2V-5B's) transformer
config, at 480x832x81 (704x1280x121): 21 latent frames x 30 x 52 = 32,760 video tokens, encoder states
of 257 CLIP image + 512 text tokens at width 5120 (TI2V: 31 x 22 x 40 = 27,280 tokens, text only, a
timestep embedding per token), RoPE from ``WanRotaryPosEmbed``. Wan runs the conditional and
unconditional branches as two forward calls of batch 1, so one block call is batch 1. Baseline:
diffusers' ``WanAttnProcessor`` on ``attn1`` and ``attn2``; FlexiMMT: ``WanSelfAttnProcessor`` (RMPM's
capture on) and ``WanCrossAttnProcessor`` sharing one ``StateSlot``, K objects x d_m motion tokens in
``attn2``, parts m2v and t2v. ``--scope attention`` times ``attn2`` alone (the only part that changes).
Training: gradients to the block's video input (Wan's encoder states are constant over the blocks and
need none) and the motion tokens, DMEM on ``attn2``'s scores (part m2v).

``--model hunyuan1.5``: one ``HunyuanVideo15TransformerBlock`` built as ``HunyuanVideo15Transformer3DModel``
builds it from the 8.3B config (2048 = 16 heads x 128, mlp_ratio 4, QK RMSNorm; the 480p I2V checkpoint's
target_size 640), at the bucket of a 16:9 image (480x848) and 121 frames: 31 latent frames x 30 x 53 = 49,290
video tokens (16x spatial, 4x temporal VAE, patch 1), text of 729 SigLIP image + 256 ByT5 glyph + 1,000
Qwen2.5-VL prompt tokens per row, laid out as the transformer's forward lays them (valid first: all 729 image
tokens, ``--valid-glyphs`` 0, ``--valid-text`` 120 prompt tokens; the rest padding), RoPE from
``HunyuanVideo15RotaryPosEmbed``. Batch 1: the guider runs each CFG branch as its own forward (this is the
conditional one, RMPM's capture on). Baseline: diffusers' ``HunyuanVideo15AttnProcessor2_0`` (its padding as a
full [N, N] bool mask); FlexiMMT: ``FlexiMMTHunyuanAttnProcessor`` with K objects x d_m motion tokens after the
text, the padded keys left out (``TextKeys``); the step's layout of the row's text form is built before the
timed call, as the processor builds it at its first block. ``--scope attention`` times ``attn`` alone.

``--model ltx2``: one ``LTX2VideoTransformerBlock`` of Lightricks/LTX-2 (19B), built by
``LTX2VideoTransformer3DModel`` itself from the 2.0 config diffusers' scripts/convert_ltx2_to_diffusers.py writes
(video 4096 = 32 heads x 128, audio 2048 = 32 x 64, cross-attention 4096 / 2048, 48 blocks; a one-block model),
at diffusers' default 512x768x121: 16 latent frames x 16 x 24 = 6,144 video tokens, 1,024 text tokens (the
prompt, then the connectors' registers: every key attended), 126 audio tokens (5.04 s at 25 latents per second).
The block's inputs are what that model's forward hands its first block (a timestep per video token: the image's
frame at 0; RoPE, modulation and the audio stream's inputs included). Batch 2: CFG's ``[negative | positive]``
forward, RMPM's capture on the positive row. Baseline: diffusers' ``LTX2AudioVideoAttnProcessor`` on every
attention; FlexiMMT: ``LTX2SelfAttnProcessor`` (capture) and ``LTX2CrossAttnProcessor`` (K objects x d_m motion
tokens in ``attn2``, parts m2v and t2v) sharing one ``StateSlot``, the audio stream's and the audio-video
attentions diffusers'. ``--scope attention`` times ``attn2`` alone.

Float32 by default (this CPU has no fast bf16); bf16 halves every float tensor (masks and indices stay).

    python benchmarks/block.py inference [--objects 1 3 5] [--repeats 2] [--scope block] [--out r.json]   # 20 min quiet
    python benchmarks/block.py training [--repeats 1] [--checkpointing off on]                          # 25-40 min
    python benchmarks/block.py inference --model 1.5 --scope attention --batch 1 --objects 3 --repeats 1
    python benchmarks/block.py profile --objects 3
    python benchmarks/block.py profile --model wan2.1 --objects 3 [--profile-block]                 # attn2 / block
    python benchmarks/block.py inference --height 96 --width 96 --frames 9 --repeats 1   # a quick try
    python benchmarks/block.py inference --model wan2.1 --objects 3 --repeats 2                        # 30 min quiet
    python benchmarks/block.py inference --model wan2.1 --objects 3 --scope attention --repeats 3      # attn2 alone
    python benchmarks/block.py inference --model hunyuan1.5 --objects 3 --frames 33 --repeats 2        # 8 min quiet
    python benchmarks/block.py inference --model hunyuan1.5 --objects 3 --repeats 1                    # 121 frames
    python benchmarks/block.py inference --model ltx2 --objects 3 --repeats 3 --warmup                 # LTX-2
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from gpu import CHECKPOINTS, first_block, full_config, geometry, model_help, moving_masks, random_tokens, word_members
from overhead import PeakRSS

from fleximmt.method.attention import motion_state_for
from fleximmt.method.kernels import DEFAULT_KERNEL, MASK_KERNELS
from fleximmt.method.kernels.grouped import GroupedCross, GroupedJoint
from fleximmt.models.shared import SlotAdapter, slot_of
from fleximmt.training.train import TRAIN_PARTS

MiB = 2**20


class OneBlock(torch.nn.Module):
    """A transformer of one block, for its family's adapter to install FlexiMMT's processors on (under every
    name the adapters read a transformer's blocks by)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.blocks = self.transformer_blocks = torch.nn.ModuleList([block])


def attention_processors(adapter, block: torch.nn.Module) -> tuple[dict, dict, object]:
    """``block``'s attention processors, diffusers' own (as the block was built) and FlexiMMT's (as the
    family's adapter installs them), by attention module, and the slot FlexiMMT's read their state from
    (None: the state travels in ``attention_kwargs``)."""
    one = OneBlock(block)
    processors = lambda: {m: m.processor for m in one.modules() if hasattr(m, "processor")}
    plain = processors()
    adapter(SimpleNamespace(transformer=one)).install_processors()
    flexi, slot = processors(), slot_of(one)
    for module, processor in plain.items():  # diffusers' own back until a run asks for FlexiMMT's
        module.set_processor(processor)
    return plain, flexi, slot


class Caught(Exception):
    """Raised by :func:`caught_inputs`' hook: the module's inputs are caught, the rest of the run is not needed."""


def caught_inputs(module: torch.nn.Module, run) -> dict:
    """The arguments ``module`` is called with when ``run()`` reaches it, by the names of its ``forward`` (the run
    stops there, without gradients)."""
    caught = {}

    def hook(mod, args, kwargs):
        bound = inspect.signature(mod.forward).bind(*args, **kwargs)
        params = inspect.signature(mod.forward).parameters
        for name, value in bound.arguments.items():
            kind = params[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                caught.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                caught[name] = value
        raise Caught

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    except Caught:
        return caught
    finally:
        handle.remove()
    raise RuntimeError(f"{type(module).__name__} was not called")


class SavedBytes:
    """Bytes autograd saves for backward inside the ``with`` block: unique storages, the given
    parameters excluded; ``as_bf16`` restates float32 figures for bf16. Storages are told apart by
    their StorageImpl (``_cdata``), so this counts meta tensors too (``benchmarks/memory.py``)."""

    def __init__(self, exclude):
        self.exclude = {p.untyped_storage()._cdata for p in exclude}
        self.storages: dict[int, tuple[int, torch.dtype, tuple]] = {}

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if storage.nbytes() and key not in self.exclude and key not in self.storages:
            self.storages[key] = (storage.nbytes(), t.dtype, tuple(t.shape))
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
    """The block, its inputs, its attention processors and FlexiMMT's states for one model and geometry. The block
    is the first of a one-block transformer built by the family's transformer class from the checkpoint's config
    (``TrueSize``); its inputs are what that transformer's forward hands it for the family's random forward of one
    denoising step (``ModelAdapter.random_forwards``), caught before it runs."""

    def __init__(self, args):
        self.adapter, self.true = CHECKPOINTS[args.model]
        self.name = self.true.name
        given = {"valid": args.valid_text, "valid_glyphs": args.valid_glyphs}
        self.text_lengths = {
            **self.true.text,
            **{k: v for k, v in given.items() if v is not None and k in self.true.text},
        }
        self.size = tuple(
            given or default for given, default in zip((args.height, args.width, args.frames), self.true.size)
        )
        self.dtype = getattr(torch, args.dtype)
        self.d_m = args.tokens
        self.cfg = full_config(self.adapter.transformer_class(), self.true.config)
        self.geo = geometry(self.cfg, self.true.vae_scale, *self.size)
        self.grid, self.n_video = self.geo["grid"], self.geo["video_tokens"]
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        self.words = self.text_lengths["prompt"]  # the tokens motion words are counted in
        torch.manual_seed(0)
        config = self.adapter.config_at({**self.true.config, "num_layers": 1}, self.size, self.true.vae_scale)
        self.model = self.adapter.transformer_class()(**config).to(self.dtype).eval().requires_grad_(False)
        self.block = first_block(self.adapter, self.model)
        # the family's adapter: its processors on the block (reading the state from their slot, or from
        # attention_kwargs: slot None), its state settings and MDMA parts
        self.plain_procs, self.flexi_procs, self.slot = attention_processors(self.adapter, self.block)
        self.train_parts = TRAIN_PARTS & set(self.adapter.parts)
        self.kwargs, self.texts, self.text, self.rotary = {}, [], 0, ()

    @property
    def branch_calls(self) -> bool:
        """Whether the pipeline runs each CFG branch as a forward of its own (a block call is then batch 1)."""
        return len(self.adapter(None).batch_rows({"guidance_scale": 6.0}, 1).rows) == 1

    def state_options(self) -> dict:
        """A state's settings as the model's adapter gives them (e.g. HunyuanVideo 1.5's processors name each
        row's text form and DMEM scores video queries against the concept words' keys) and its MDMA parts."""
        return {**self.adapter.state_settings(), "parts": frozenset(self.adapter.parts)}

    def step_layout(self, state):
        """The MDMA layout of this step's masks that the block's attention uses (a model whose rows name their text
        form: the one of its row's, which the processor would otherwise build at its first call in the step)."""
        if self.texts:
            return state.layouts.step_layout(0, self.texts[0], self.text)
        return state.layouts.step_layouts[0]

    def inputs(self, batch: int, seed: int = 1):
        """The video states, encoder states and timestep embedding the block takes (the rest of its inputs kept in
        ``kwargs``) from the one-block transformer's forward of ``batch`` rows: CFG's two (of one forward) or the
        conditional branch's one; each row's text form for the processors' slot."""
        forwards = self.adapter.random_forwards(
            self.model.config,
            self.size,
            self.geo["latent_shape"],
            self.text_lengths,
            batch == 2,
            torch.Generator().manual_seed(seed),
            dtype=self.dtype,
        )
        forward = forwards(500.0)[0][1]
        self.kwargs = caught_inputs(self.block, lambda: self.model(**forward, return_dict=False))
        adapter = self.adapter(SimpleNamespace(transformer=self.model))
        self.texts = adapter.row_texts(self.model, (), forward) if isinstance(adapter, SlotAdapter) else []
        self.text = self.kwargs["encoder_hidden_states"].shape[1]  # every text key of a row
        self.rotary = tuple(
            t
            for name, value in self.kwargs.items()
            if "rotary" in name and value is not None
            for t in (value if isinstance(value, tuple) else (value,))
        )
        return self.kwargs["hidden_states"], self.kwargs["encoder_hidden_states"], self.kwargs["temb"]

    def install(self, state) -> None:
        """diffusers' processors (state None) or FlexiMMT's with ``state``."""
        for module, processor in (self.plain_procs if state is None else self.flexi_procs).items():
            module.set_processor(processor)
        if self.slot is not None:
            self.slot.state, self.slot.texts = state, list(self.texts)

    def attention_kwargs(self, state) -> dict:
        """The ``attention_kwargs`` that carry ``state`` to processors without a slot, as the adapter attaches it
        to a pipeline call (none for the others, and without a state)."""
        if state is None or self.slot is not None:
            return {}
        with self.adapter(SimpleNamespace()).attach(state, {}) as call:
            return call["attention_kwargs"]

    def call(self, hidden, text, temb, state):
        """One block call with the processors ``install(state)`` set: its outputs (the video's alone where the text
        takes no gradient: the cross form)."""
        kwargs = {**self.kwargs, "hidden_states": hidden, "encoder_hidden_states": text, "temb": temb}
        if state is not None and self.slot is None:
            kwargs["attention_kwargs"] = self.attention_kwargs(state)
        out = self.block(**kwargs)
        if self.adapter.form == "cross" and isinstance(out, tuple):
            return out[0]
        return out

    @property
    def attention_module(self) -> torch.nn.Module:
        return getattr(self.block, self.adapter.motion_attention)

    def attention_inputs(self, hidden, text, temb):
        """The inputs of the attention FlexiMMT changes, as the block hands them to it (after its norms; the block's
        work before it is left out: the same in both), caught in a block call with diffusers' processors."""
        self.install(None)
        self.attention_call = caught_inputs(self.attention_module, lambda: self.call(hidden, text, temb, None))
        return self.attention_call["hidden_states"], self.attention_call["encoder_hidden_states"]

    def attention(self, hidden, text, state):
        kwargs = {**self.attention_call, "hidden_states": hidden, "encoder_hidden_states": text}
        return self.attention_module(**kwargs, **self.attention_kwargs(state))

    @property
    def attention_name(self) -> str:
        form = "cross-attention" if self.adapter.form == "cross" else "joint attention"
        return f"{self.adapter.motion_attention} ({form})"

    def describe(self) -> str:
        h, w, f = self.size
        text = ", ".join(f"{n} {kind}" for kind, n in self.text_lengths.items())
        return (
            f"{self.name} block, {h}x{w}x{f}: {self.geo['latent_frames']} latent frames, token grid {self.grid[0]} x "
            f"{self.grid[1]} x {self.grid[2]} = {self.n_video:,} video tokens; text tokens: {text}; "
            f"{self.cfg.num_attention_heads} heads x {self.cfg.attention_head_dim}; {self.dtype}; "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}"
        )


def inference_states(setup: Setup, objects: list[int], batch: int, backend: str = "auto") -> dict[int, dict]:
    """A FlexiMMT state per K as the pipeline prepares one step (CogVideoX: CFG rows ``[uncond | cond]``
    of one video; Wan and HunyuanVideo 1.5: one branch per call, features captured as in the conditional one)."""
    states = {}
    for k in objects:
        member, _ = word_members(k, setup.words)
        tokens = random_tokens(k, 1, setup.d_m, setup.dim, seed=k).to(setup.dtype)
        masks = moving_masks(k, setup.grid)
        state = motion_state_for(
            tokens,
            member,
            num_frames=setup.grid[0],
            mask_kernel=backend,
            feature_blocks=frozenset({0}),
            rows=setup.adapter(None).batch_rows({"guidance_scale": 6.0 if batch == 2 else 1.0}, 1),  # one video
            **setup.state_options(),
        )
        start = time.perf_counter()
        state.set_video_masks(masks)
        layout = setup.step_layout(state)
        layout_s = time.perf_counter() - start
        coverage = masks.view(k, setup.grid[0], -1).float().mean(-1)  # per object and token frame
        states[k] = {
            "state": state,
            "layout_s": layout_s,
            "coverage": [round(c, 3) for c in coverage.mean(1).tolist()],
            "coverage_range": [round(coverage.min().item(), 3), round(coverage.max().item(), 3)],
        }
        if not isinstance(layout, (GroupedJoint, GroupedCross)):  # only the grouped kernel has groups to report
            states[k]["backend"] = backend
        elif setup.adapter.form == "cross":
            states[k].update(
                {
                    "groups": [g.count for g in layout.groups],
                    "group_keys": [int(g.keys.numel()) for g in layout.groups],
                }
            )
        else:
            states[k].update(
                {
                    "groups": [g.count for g in layout.groups],
                    "groups_chained": [g.chained for g in layout.groups],
                    "masked_rows": int(layout.masked_rows.shape[0]),
                    "text_queries": setup.text if layout.text_queries is None else int(layout.text_queries.numel()),
                    "merged_video_queries": layout.num_merged,
                    "keys": [setup.n_video + int(g.keys.numel()) for g in layout.groups],
                }
            )
    return states


def describe_layout(setup: Setup, k: int, s: dict) -> str:
    head = (
        f"  K={k}: object coverage {s['coverage']} of the frame (per frame {s['coverage_range'][0]:.0%}-"
        f"{s['coverage_range'][1]:.0%}); "
    )
    if "backend" in s:
        return head + f"{s['backend']} backend: one attention call; layout built in {s['layout_s']:.3f} s once per step"
    if setup.adapter.form == "cross":
        pairs = ", ".join(f"{q:,} x {n}" for q, n in zip(s["groups"], s["group_keys"]))
        return (
            head + f"{len(s['groups'])} SDPA calls in attn2 (video queries x keys of [text | motion]): {pairs}; "
            f"layout built in {s['layout_s']:.3f} s once per step"
        )
    return (
        head + f"unmasked groups {s['groups']} (chained {s['groups_chained']}) over {s['keys']} keys; masked call "
        f"{s['masked_rows']} rows ({s['text_queries']} text + {s['merged_video_queries']} merged video queries); layout "
        f"built in {s['layout_s']:.3f} s once per step" + (" and text form" if setup.texts else "")
    )


def interleave(runs: dict, repeats: int, warmup: bool) -> dict[str, dict[str, list[float]]]:
    """Wall time, and the CPU time of this process (all its threads): on a machine whose cores others
    share, the CPU time a call needs moves far less with their load than its wall time does. The order is
    reversed every other round (as ``overhead.py`` does), so that a run is not always the one after another."""
    samples = {name: {"time": [], "cpu": [], "rss_extra": []} for name in runs}
    if warmup:
        for fn in runs.values():
            fn()
    for r in range(repeats):
        for name, fn in list(runs.items())[:: -1 if r % 2 else 1]:
            with PeakRSS() as mem:
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                samples[name]["time"].append(time.perf_counter() - start)
                samples[name]["cpu"].append(time.process_time() - cpu)
            samples[name]["rss_extra"].append(mem.extra)
            print(
                f"  round {r + 1}: {name:<28} {samples[name]['time'][-1]:8.2f} s wall {samples[name]['cpu'][-1]:8.2f} s CPU"
                f"  peak RSS +{mem.extra / MiB:7.0f} MiB",
                flush=True,
            )
    return samples


def ratios(samples: dict, base: str) -> dict[str, dict]:
    """Per variant: median time, and the ratio to the baseline of the same round (median, min, max)."""
    out = {}
    for name, s in samples.items():
        per_round = [t / b for t, b in zip(s["time"], samples[base]["time"])]
        per_round_cpu = [t / b for t, b in zip(s["cpu"], samples[base]["cpu"])]
        mem = [m / b if b else float("nan") for m, b in zip(s["rss_extra"], samples[base]["rss_extra"])]
        out[name] = {
            "time_s": s["time"],
            "median_s": statistics.median(s["time"]),
            "ratio": statistics.median(per_round),
            "ratio_min": min(per_round),
            "ratio_max": max(per_round),
            "cpu_s": s["cpu"],
            "cpu_ratio": statistics.median(per_round_cpu),
            "cpu_ratio_min": min(per_round_cpu),
            "cpu_ratio_max": max(per_round_cpu),
            "rss_extra_mib": [m / MiB for m in s["rss_extra"]],
            "rss_ratio": statistics.median(mem),
            "ratio_rounds": per_round,
            "cpu_ratio_rounds": per_round_cpu,
        }
    return out


def run_inference(args, setup: Setup) -> dict:
    batch = args.batch
    hidden, text, temb = setup.inputs(batch)
    states = inference_states(setup, args.objects, batch, args.backend)
    if args.scope == "attention":
        with torch.no_grad():
            hidden, text = setup.attention_inputs(hidden, text, temb)

    def call(state):
        setup.install(state)
        with torch.no_grad():
            if args.scope == "attention":
                return setup.attention(hidden, text, state)
            return setup.call(hidden, text, temb, state)

    def plain():
        call(None)

    def flexi(k):
        def run():
            call(states[k]["state"])
            states[k]["state"].capture.take()  # what RMPM reads after the step; resets the running sum

        return run

    runs = {
        "diffusers": plain,
        **{
            f"fleximmt K={k}{'' if args.backend == DEFAULT_KERNEL else ' ' + args.backend}": flexi(k)
            for k in args.objects
        },
    }
    scope = f"attention call: {setup.attention_name}" if args.scope == "attention" else "block"
    branch = " = CFG" if batch == 2 else ""
    if setup.branch_calls:
        branch = " (the conditional branch: the pipeline runs each CFG branch as its own forward)"
    print(
        f"inference ({scope}, batch {batch}{branch}), d_m = {setup.d_m}, "
        f"{args.repeats} rounds{' after a warm-up round' if args.warmup else ''}:"
    )
    for k in args.objects:
        print(describe_layout(setup, k, states[k]))
    samples = interleave(runs, args.repeats, args.warmup)
    result = ratios(samples, "diffusers")
    for name, r in result.items():
        rounds = " / ".join(f"{a:.3f}x, CPU {b:.3f}x" for a, b in zip(r["ratio_rounds"], r["cpu_ratio_rounds"]))
        print(
            f"  {name:<16} median {r['median_s']:8.2f} s  ratio {r['ratio']:.3f}x (rounds {r['ratio_min']:.3f}-"
            f"{r['ratio_max']:.3f}); CPU time ratio {r['cpu_ratio']:.3f}x ({r['cpu_ratio_min']:.3f}-{r['cpu_ratio_max']:.3f}); "
            f"peak RSS extra {statistics.median(r['rss_extra_mib']):.0f} MiB ({r['rss_ratio']:.3f}x); per round: {rounds}"
        )
    for k in args.objects:
        states[k].pop("state")
    return {"runs": result, "layouts": {str(k): v for k, v in states.items()}}


def run_training(args, setup: Setup) -> dict:
    block = setup.block
    hidden, text, temb = setup.inputs(1, seed=2)
    gen = torch.Generator().manual_seed(3)
    grad_h = torch.randn(hidden.shape, generator=gen).to(setup.dtype)
    grad_t = torch.randn(text.shape, generator=gen).to(setup.dtype)
    member, concept = word_members(1, setup.words)
    tokens = torch.nn.Parameter(random_tokens(1, 1, setup.d_m, setup.dim).to(setup.dtype))
    options = {**setup.state_options(), "parts": setup.train_parts}
    state = motion_state_for(
        tokens,
        member,
        num_frames=setup.grid[0],
        dmem=True,
        concept_member=concept,
        dmem_drop=0.3,
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    params = [*list(block.parameters()), tokens]
    saved: dict[str, SavedBytes] = {}
    dmem_cover: list[float] = []
    # CogVideoX and HunyuanVideo 1.5 update their text in every block (gradients flow to it); Wan's encoder
    # states are the same constants for every block (the condition embedder's output, frozen): no gradient to them
    text_grad = setup.adapter.form != "cross"

    def step(flexi: bool, ckpt: bool, name: str):
        def run():
            setup.install(state if flexi else None)
            if flexi:
                tokens.grad = None
                state.begin_step(setup.n_video, 1)
            x = hidden.detach().requires_grad_(True)
            y = text.detach().requires_grad_(text_grad)

            def fn(a, b):
                return setup.call(a, b, temb, state if flexi else None)

            with SavedBytes(params) as counter:
                out = checkpoint(fn, x, y, use_reentrant=False) if ckpt else fn(x, y)
            saved[name] = counter
            if text_grad:
                torch.autograd.backward(out, (grad_h, grad_t))
            else:
                torch.autograd.backward(out, grad_h)
            assert x.grad is not None and (not flexi or tokens.grad is not None)
            if flexi:
                dmem_cover.append(next(iter(state.layouts.dmem_layouts.values())).video_masks.float().mean().item())

        return run

    runs = {}
    for ckpt in [c == "on" for c in args.checkpointing]:
        suffix = " +ckpt" if ckpt else ""
        runs[f"plain{suffix}"] = step(False, ckpt, f"plain{suffix}")
        runs[f"fleximmt{suffix}"] = step(True, ckpt, f"fleximmt{suffix}")
    print(
        f"training (batch 1, forward + backward, weights frozen), d_m = {setup.d_m}, DMEM drop 0.3, parts "
        f"{sorted(setup.train_parts)}, {args.repeats} rounds{' after a warm-up round' if args.warmup else ''}:"
    )
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
    # what checkpointing keeps per block: its inputs (Wan: the video states only; the encoder states,
    # timestep embedding and RoPE are one set of tensors shared by every block)
    inputs_bytes = (hidden.numel() + (text.numel() if text_grad else 0)) * hidden.element_size()
    shared = 0 if text_grad else sum(t.numel() * t.element_size() for t in (text, temb, *setup.rotary))
    for name, r in result.items():
        base = result["plain +ckpt" if "ckpt" in name else "plain"]
        if "ckpt" in name:  # checkpoint keeps the block's inputs (its own hooks hide the rest from ours)
            r["held_mib"], r["held_bf16_mib"] = inputs_bytes / MiB, inputs_bytes / 2 / MiB
        else:
            r["held_mib"], r["held_bf16_mib"] = r["saved_mib"], r["saved_bf16_mib"]
        r["held_ratio"] = r["held_mib"] / base["held_mib"]
        print(
            f"  {name:<16} median {r['median_s']:8.2f} s  ratio {r['ratio']:.3f}x (rounds {r['ratio_min']:.3f}-"
            f"{r['ratio_max']:.3f}); CPU time ratio {r['cpu_ratio']:.3f}x;  held for backward {r['held_mib']:.0f} MiB ({r['held_ratio']:.3f}x; bf16 "
            f"{r['held_bf16_mib']:.0f} MiB)  peak RSS extra {statistics.median(r['rss_extra_mib']):.0f} MiB "
            f"({r['rss_ratio']:.3f}x)"
        )
    for name in ("plain", "fleximmt"):
        if name in saved:
            print(f"  largest saved storages, {name}: " + "; ".join(saved[name].largest(6)))
    if shared:
        print(f"  shared by every block (encoder states, timestep embedding, RoPE): {shared / MiB:.0f} MiB")
    print(f"  DMEM masks covered {statistics.mean(dmem_cover):.0%} of the video tokens (after the 30% drop)")
    return {
        "runs": result,
        "block_inputs_mib": inputs_bytes / MiB,
        "shared_inputs_mib": shared / MiB,
        "dmem_coverage": statistics.mean(dmem_cover),
    }


def run_profile(args, setup: Setup) -> dict:
    """torch.profiler over one call of the attention FlexiMMT changes (``--scope block``: of the whole
    block), baseline and FlexiMMT with the first K."""
    from torch.profiler import ProfilerActivity, profile

    batch, k = args.batch, args.objects[0]
    hidden, text, temb = setup.inputs(batch)
    state = inference_states(setup, [k], batch)[k]["state"]
    block = args.profile_block
    if not block:
        with torch.no_grad():
            hidden, text = setup.attention_inputs(hidden, text, temb)
    out = {}
    for name, run_state in (("diffusers", None), (f"fleximmt K={k}", state)):
        setup.install(run_state)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start, cpu = time.perf_counter(), time.process_time()
            setup.call(hidden, text, temb, run_state) if block else setup.attention(hidden, text, run_state)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
            state.capture.take()
        rows = []
        for ev in sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[
            : args.top
        ]:
            shapes = ", ".join(str(s) for s in ev.input_shapes[:3] if s)
            rows.append({"op": ev.key, "calls": ev.count, "self_s": ev.self_cpu_time_total / 1e6, "shapes": shapes})
        out[name] = {"total_s": total, "cpu_s": cpu, "ops": rows}
        what = "block" if block else setup.attention_name
        print(f"{name}: {what} call {total:.2f} s ({cpu:.2f} s CPU); self time by op and input shapes:")
        for r in rows:
            print(f"  {r['self_s']:8.3f} s  {r['calls']:3d}x  {r['op']:<55} {r['shapes'][:110]}")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["inference", "training", "profile"])
    parser.add_argument("--model", choices=sorted(CHECKPOINTS), default=next(iter(CHECKPOINTS)), help=model_help())
    parser.add_argument("--height", type=int), parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int, help="video frames (default: the model's own)")
    parser.add_argument("--objects", type=int, nargs="+", default=[1, 3, 5], help="K values (profile: the first)")
    parser.add_argument("--tokens", type=int, default=226, help="motion tokens per object and block (d_m)")
    parser.add_argument(
        "--mask-kernel",
        "--backend",  # its old name
        dest="backend",
        choices=MASK_KERNELS,
        default=DEFAULT_KERNEL,
        help="inference: FlexiMMT's mask kernel (flex: one compiled FlexAttention call)",
    )
    parser.add_argument("--repeats", type=int, help="rounds (default: inference 2, training 1)")
    parser.add_argument("--warmup", action="store_true", help="one untimed round first")
    parser.add_argument(
        "--batch",
        type=int,
        choices=[1, 2],
        help="inference rows (2 = CFG, the default where one forward holds both branches; 1 where the pipeline "
        "runs each branch as its own forward)",
    )
    parser.add_argument(
        "--valid-text",
        type=int,
        help="where the pipeline pads the prompt (HunyuanVideo 1.5): its tokens that are not padding (default: the "
        "model's, a prompt of about 90 words)",
    )
    parser.add_argument(
        "--valid-glyphs",
        type=int,
        help="where the pipeline pads glyph tokens (HunyuanVideo 1.5): those that are not padding (default: the "
        "model's, 0: no quoted text)",
    )
    parser.add_argument("--scope", choices=["block", "attention"], default="block")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top", type=int, default=14, help="profile: rows shown")
    parser.add_argument("--profile-block", action="store_true", help="profile: the whole block call, not the attention")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.what == "inference" else 1
    setup = Setup(args)
    if args.batch is None:
        args.batch = 1 if setup.branch_calls else 2
    elif args.batch == 2 and setup.branch_calls:
        parser.error(f"--batch 2: {setup.name} runs its conditional and unconditional branches as two calls of batch 1")
    print(setup.describe(), flush=True)
    result = {
        "what": args.what,
        "model": args.model,
        "size": setup.size,
        "video_tokens": setup.n_video,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    result.update(
        {"inference": run_inference, "training": run_training, "profile": run_profile}[args.what](args, setup)
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
