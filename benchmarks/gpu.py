"""FlexiMMT at CogVideoX-5B-I2V's true size on a GPU: seconds per denoising step and peak memory.

The real CogVideoX-5B-I2V transformer config (``--model 1.5``: CogVideoX1.5-5B-I2V's) with random
bf16 weights on the GPU, at 480x720x49 (17,550 video + 226 text tokens). Inference: the transformer
call of one denoising step exactly as diffusers' pipeline makes it (CFG on: batch 2, the image
latents concatenated on channels, RoPE, ``attention_kwargs``), for diffusers' own attention
(``CogVideoXAttnProcessor2_0``), FlexiMMT with K objects x 226 motion tokens (auto backend) and the
dense backend (an N x N mask; "does not fit" when it runs out of memory). A FlexiMMT step also
does what the pipeline does between steps: RMPM on the captured features (its result is not used:
random weights give meaningless features) and the next step's MDMA layout from moving ellipse
masks. Training: one motion-training step through ``fleximmt.training.train.training_step`` (DMEM on,
d_m = 226, AdamW on the float32 tokens) with gradient checkpointing off and on, and a plain forward
+ backward of the same model (diffusers' attention, gradient to the input latents) for reference.
Peak memory is ``torch.cuda.max_memory_allocated`` of each run (weights included; ``*_activations``
without them). JSON to ``--out``. Without CUDA it says so and exits 0; ``--device cpu --tiny`` runs
every code path on a tiny config (the test suite does).

Every model comes from the registered adapters (``fleximmt.models.adapters()``): ``--model`` takes the names of the
true sizes each adapter module declares (``ModelAdapter.true_sizes``: its checkpoints' transformer configs as
diffusers' conversion scripts write them, default video, VAE compression, text lengths, a tiny config for
``--tiny``), and one ``Bench`` builds the family's transformer class from it, its pipeline around it without
encoders (``pipeline_around``), a step's forwards (``random_forwards``) and a training window (``random_conditions``)
as the family's pipeline makes them. A new family's adapter module that declares them is benchmarked as these are:

``--model wan2.1`` / ``wan2.2-5b``: Wan2.1-I2V-14B-480P at 480x832x81 (32,760 video tokens) or
Wan2.2-TI2V-5B at 704x1280x121: a step is the pipeline's two batch-1 calls
(conditional, then unconditional; Wan 2.1 with 257 CLIP image tokens, TI2V with a timestep per
token), FlexiMMT in ``attn2`` through ``FlexiMMTWanPipeline``'s adapter, training through the same
``training_step`` inside ``adapter.training_attached``. Not yet run on a GPU.

``--model hunyuan1.5``: HunyuanVideo 1.5 I2V 480p (8.3B) at a 16:9 image's bucket,
480x848x121 (49,290 video tokens): a step is the guider's two batch-1 forwards (conditional with 120 valid of
1,000 prompt tokens, then the empty negative prompt's 6), each with 729 SigLIP image and 256 (empty) ByT5 glyph
tokens; diffusers' ``HunyuanVideo15AttnProcessor2_0`` builds its [N, N] bool padding mask in every block,
FlexiMMT's processors leave the padded keys out (``FlexiMMTHunyuanVideo15Pipeline``'s adapter, whose forward hook
reads each row's text form); training as for Wan. Not yet run on a GPU.

``--model ltx2``: LTX-2 19B at 512x768x121 (6,144 video tokens, a timestep each; 1,024
text and 126 audio tokens): a step is the pipeline's three forwards with its default guidance (CFG's batch-2
forward, then spatio-temporal guidance's at block 28 and modality guidance's, batch 1 each), FlexiMMT in ``attn2``
through ``FlexiMMTLTX2ImageToVideoPipeline``'s adapter (its forward hook sets each forward's rows and capture);
training through ``training_step`` inside ``adapter.training_attached`` (the image's frame clean, silent audio).
The weights alone are 35.2 GiB in bf16. Not yet run on a GPU.

It imports only torch, diffusers, transformers, accelerate, safetensors, numpy and fleximmt.

On the GPU machine (it has torch 2.11, transformers, accelerate, safetensors, numpy, pillow, tqdm,
imageio, opencv; not diffusers). Here, once, in the repository root:

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip wheel -q --no-deps -w .whl . diffusers==0.42.1 && rm -rf build

(two pure-Python wheels, about 20 MiB: fleximmt from this working tree, diffusers from the index;
diffusers' other needs are on that machine already), then run there (carry [".whl"]; one call):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --more-objects 1 5 \
         --time-limit 230 --out $OUT/gpu.json

The variants run in this order, the JSON rewritten after each: diffusers, FlexiMMT auto, diffusers
again (ratios are to the mean of its two runs), the four training variants, ``--more-objects``, the
dense backend. ``--time-limit`` starts no variant after that many seconds (``--skip-dense`` and
``--skip-training`` leave those out; ``--model 1.5`` for CogVideoX 1.5 at 768x1360x81).
``--attention-backend NAME`` (``set_attention_backend``: flash, sage, _flash_3_hub, flex, ...),
``--compile`` (``transformer.compile(fullgraph=True)``, two more warm-up steps) and ``--cache
first-block:T`` (diffusers' FirstBlockCache at threshold T, inference only) apply to every variant,
diffusers' and FlexiMMT's alike. diffusers' own CogVideoX processor calls SDPA directly and ignores
an attention backend; with one, CogVideoX's baseline is FlexiMMT's processor without objects
(diffusers' computation, through the chosen backend), and the JSON's ``baseline`` says so.
For the numbers' place in BENCHMARKS.md: the paper reports 17.4 s per step for the authors'
release on an A800 (dense float mask); diffusers' CogVideoX-5B-I2V step is the baseline here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from fleximmt.method.adapter import TrueSize


def true_sizes() -> dict[str, tuple[type, TrueSize]]:
    """Every registered family's released checkpoints at their true size (``ModelAdapter.true_sizes``), by the name
    ``--model`` takes, with the family's adapter class; a name declared by two families is refused."""
    from fleximmt.models import adapters

    found: dict[str, tuple[type, TrueSize]] = {}
    for adapter in adapters():
        for name, size in adapter.true_sizes.items():
            if name in found and found[name][1] is not size:
                raise ValueError(f"--model {name!r} is declared by {found[name][0].__name__} and {adapter.__name__}")
            found.setdefault(name, (adapter, size))  # a family's subclass may inherit another's sizes: listed once
    return found


CHECKPOINTS = true_sizes()


def model_help() -> str:
    """``--model``'s help: each checkpoint's name."""
    return ", ".join(f"{name} ({size.name})" for name, (_, size) in CHECKPOINTS.items())


def full_config(model_class: type, values: dict, **overrides) -> SimpleNamespace:
    """A transformer's whole config: ``model_class``'s defaults, then a checkpoint's ``values``, then ``overrides``."""
    import inspect

    params = inspect.signature(model_class.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return SimpleNamespace(**{**defaults, **values, **overrides})


def geometry(cfg, vae_scale: tuple[int, int], height: int, width: int, frames: int) -> dict:
    """Latent frames and token grid of a video through a causal VAE of ``vae_scale`` (spatial, temporal) and the
    transformer's patches (``patch_size``: (t, h, w), or h = w with ``patch_size_t``), as the pipelines make them:
    latent frames padded in front to whole temporal patches (CogVideoX 1.5's); ``latent_shape``: (frames, h, w)."""
    spatial, temporal = vae_scale
    patch = cfg.patch_size
    p_t, p_h, p_w = (
        patch if isinstance(patch, (tuple, list)) else (getattr(cfg, "patch_size_t", None) or 1, patch, patch)
    )
    latent = (frames - 1) // temporal + 1
    latent += (p_t - latent % p_t) % p_t
    grid = (latent // p_t, height // spatial // p_h, width // spatial // p_w)
    return {
        "latent_frames": latent,
        "grid": grid,
        "video_tokens": grid[0] * grid[1] * grid[2],
        "latent_shape": (latent, height // spatial, width // spatial),
    }


def moving_masks(objects: int, grid: tuple[int, int, int], low: float = 0.05, high: float = 0.30) -> torch.Tensor:
    """bool ``[K, N_v]``: K ellipses covering ``low``..``high`` of the frame (K = 1: their mean), each
    crossing the frame horizontally over the token frames (odd objects right to left), at rows spread
    over the frame height, so that neighbours overlap where they are large or cross."""
    frames, height, width = grid
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    fractions = [(low + high) / 2] if objects == 1 else torch.linspace(low, high, objects).tolist()
    masks = torch.zeros(objects, frames, height, width, dtype=torch.bool)
    for k, fraction in enumerate(fractions):
        ry = math.sqrt(fraction * height * width / (math.pi * 1.3))
        rx = 1.3 * ry
        cy = height * (k + 1) / (objects + 1)
        for t in range(frames):
            s = t / max(frames - 1, 1)
            cx = width * (0.25 + 0.5 * s if k % 2 == 0 else 0.75 - 0.5 * s)
            masks[k, t] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks.reshape(objects, -1)


def word_members(objects: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[K, L_y]`` motion words (3 tokens per object) and ``[K, L_y]`` concept words (2 tokens)."""
    member = torch.zeros(objects, text_len, dtype=torch.bool)
    concept = torch.zeros(objects, text_len, dtype=torch.bool)
    for k in range(objects):
        concept[k, 8 * k + 1 : 8 * k + 3] = True
        member[k, 8 * k + 4 : 8 * k + 7] = True
    return member, concept


def random_tokens(objects: int, blocks: int, d_m: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Motion tokens ``[K, 1, blocks, d_m, dim]``, kaiming-uniform-like as the release initialises them."""
    gen = torch.Generator().manual_seed(seed)
    bound = (3.0 / dim) ** 0.5
    return (torch.rand(objects, 1, blocks, d_m, dim, generator=gen) * 2 - 1) * bound


TINY_GEOMETRY = (64, 96, 9)  # --tiny's video, every model's
PAPER_RELEASE_S_PER_STEP = 17.4  # the paper's figure for the authors' release, A800, 480x720x49


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


class Bench:
    """The random-weight transformer of a checkpoint (``TrueSize``, its family's registered adapter's), the inputs of
    a denoising step as the family's pipeline makes them (``ModelAdapter.random_forwards``), and FlexiMMT's states."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if cuda else torch.float32
        adapter_class, true = CHECKPOINTS[args.model]
        self.name, self.size = true.name, TINY_GEOMETRY if args.tiny else true.size
        values = adapter_class.config_at({**true.config, **(true.tiny if args.tiny else {})}, self.size, true.vae_scale)
        self.cfg = full_config(adapter_class.transformer_class(), values)
        self.geo = geometry(self.cfg, true.vae_scale, *self.size)
        self.text = true.text_of(args.tiny)
        self.text_len = self.text["prompt"]  # the tokens motion words are counted in
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        torch.manual_seed(0)
        with torch.device(self.device):
            transformer = adapter_class.transformer_class()(**values)
        transformer = transformer.to(self.dtype).eval().requires_grad_(False)
        for name, param in transformer.named_parameters():  # as from_pretrained(torch_dtype=...) keeps them
            if any(k in name.split(".") for k in transformer._keep_in_fp32_modules or ()):
                param.data = param.data.float()
        self.transformer = transformer
        self.diffusers_processors = transformer.attn_processors  # as diffusers built them
        # diffusers' own processors call SDPA themselves (set_attention_backend: no effect) or dispatch
        self.diffusers_takes_backends = all(
            hasattr(p, "_attention_backend") for p in self.diffusers_processors.values()
        )
        self.weights_gib = sum(p.numel() * p.element_size() for p in transformer.parameters()) / 2**30
        # the transfer and training code reach the model through the pipeline; no encoder is needed for a step
        self.pipe = adapter_class.pipeline_around(transformer)
        self.adapter = adapter_class(self.pipe)
        latent = self.geo["latent_shape"]
        gen = torch.Generator().manual_seed(1)
        random = lambda guidance: adapter_class.random_forwards(
            transformer.config, self.size, latent, self.text, guidance, gen, self.device, self.dtype
        )
        self.forwards, self.plain_forwards = random(True), random(False)
        self.conditions = adapter_class.random_conditions(transformer.config, latent, self.text, gen)
        self.masks = self.object_masks()

    def object_masks(self) -> dict[int, torch.Tensor]:
        """The moving ellipse masks of every object count timed, on the device."""
        counts = {self.args.objects, *self.args.more_objects}
        return {k: moving_masks(k, self.geo["grid"]).to(self.device) for k in counts}

    def use_plain_attention(self) -> None:
        """diffusers' own attention processors, as the transformer was built with them; with
        ``--attention-backend``, FlexiMMT's without objects where diffusers' would ignore the backend."""
        if self.args.attention_backend and not self.diffusers_takes_backends:
            self.adapter.install_processors()
        else:
            self.transformer.set_attn_processor(dict(self.diffusers_processors))
        self.speed_tools()

    def baseline(self) -> str:
        processor = type(getattr(first_block(self.adapter, self.transformer), self.adapter.motion_attention).processor)
        if self.args.attention_backend and not self.diffusers_takes_backends:
            return (
                f"FlexiMMT's processor without objects (diffusers' own {processor.__name__} ignores attention backends)"
            )
        return f"diffusers' {processor.__name__}"

    def use_fleximmt_attention(self) -> None:
        self.adapter.install_processors()
        self.speed_tools()

    def speed_tools(self) -> None:
        """The attention backend and compilation asked for, on whatever processors are installed now."""
        if self.args.attention_backend:
            self.transformer.set_attention_backend(self.args.attention_backend)
        if self.args.compile and not getattr(self, "compiled", False):
            self.transformer.compile(fullgraph=True)
            self.compiled = True

    @contextlib.contextmanager
    def cache(self):
        """``--cache first-block:T`` for one inference variant (a fresh cache each time)."""
        if not self.args.cache:
            yield
            return
        from diffusers import FirstBlockCacheConfig

        kind, _, threshold = self.args.cache.partition(":")
        if kind != "first-block":
            raise SystemExit(f"--cache {self.args.cache!r}: give first-block:THRESHOLD, e.g. first-block:0.05")
        self.transformer.enable_cache(FirstBlockCacheConfig(threshold=float(threshold or 0.05)))
        try:
            yield
        finally:
            self.transformer.disable_cache()

    def step(self, i: int, state=None) -> None:
        """The transformer work of denoising step ``i`` with the pipeline's default guidance: its forwards,
        FlexiMMT's ``state`` attached to them as the family's adapter attaches it to a pipeline call."""
        attached = self.adapter.attach(state, {}) if state is not None else contextlib.nullcontext({})
        with attached as call:
            extra = {"attention_kwargs": call["attention_kwargs"]} if "attention_kwargs" in call else {}
            for branch, inputs in self.forwards(999.0 - 20 * i):
                with self.transformer.cache_context(branch):  # as the pipeline names it (for --cache)
                    self.transformer(**inputs, **extra, return_dict=False)

    def training_tensors(self, gen: torch.Generator) -> dict:
        """One reference window encoded as the adapter's ``encode_conditions`` returns it (random)."""
        return self.conditions

    def plain_forward_backward(self) -> None:
        """The frozen model's forward + backward to its input, diffusers' attention (the conditional branch alone)."""
        inputs = self.plain_forwards(500.0)[0][1]
        x = inputs["hidden_states"].detach().requires_grad_(True)
        out = self.transformer(**{**inputs, "hidden_states": x}, return_dict=False)[0]
        out.float().square().mean().backward()

    def flexi_state(self, backend: str, objects: int):
        from fleximmt.method.attention import motion_state_for

        k, blocks = objects, self.cfg.num_layers
        member, _ = word_members(k, self.text_len)
        tokens = random_tokens(k, blocks, self.args.tokens, self.dim).to(self.device, self.dtype)
        share = max(1, round(blocks * self.adapter.feature_share))
        state = motion_state_for(
            tokens,
            member.to(self.device),
            **self.adapter.state_settings(),
            parts=self.adapter.parts,
            num_frames=self.geo["grid"][0],
            mask_kernel=backend,
            feature_blocks=frozenset(range(share)),
            rows=self.adapter.batch_rows({"guidance_scale": 6.0}, 1),  # one video, with CFG
        )
        first = self.masks[k].view(k, *self.geo["grid"])[:, 0]
        state.set_video_masks(first[:, None].expand(-1, self.geo["grid"][0], -1, -1).reshape(k, -1))
        return state, first

    def between_steps(self, state, first) -> None:
        """What the pipeline does after a step: RMPM on the captured features, the next step's layout."""
        from fleximmt.method.masks import rmpm

        frames, h, w = self.geo["grid"]
        state.begin_step(self.geo["video_tokens"], self.cfg.num_layers)
        features = state.capture.take()
        if features is not None:
            rmpm(first, features.view(frames, h, w, -1), 3, "paper")  # computed as in a real run, not used
        state.set_video_masks(self.masks[len(first)])


def first_block(adapter, transformer: torch.nn.Module) -> torch.nn.Module:
    """The transformer's first block: the first module of the class its family compiles regionally."""
    kind = (adapter.repeated_blocks or transformer._repeated_blocks)[0]
    return next(m for m in transformer.modules() if type(m).__name__ == kind)


@contextlib.contextmanager
def _profiled(bench: Bench, name: str, on: bool):
    """With ``--profile DIR``: one more step under torch.profiler, its tables written to DIR/<name>.txt."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), with_stack=True
    ) as prof:
        yield
    device_sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    parts = [
        f"# {name}: one step under torch.profiler ({bench.device})",
        "## by self device time",
        prof.key_averages().table(sort_by=device_sort, row_limit=30),
        "## by self CPU time",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30),
        "## by self device time, grouped by Python stack (6 frames)",
        prof.key_averages(group_by_stack_n=6).table(sort_by=device_sort, row_limit=25),
        "## by self CPU time, grouped by Python stack (6 frames)",
        prof.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=25),
    ]
    bench.args.profile.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    (bench.args.profile / f"{slug}.txt").write_text("\n\n".join(parts))


def _finish(bench: Bench, name: str, result: dict, steps: int) -> dict:
    """The activations' peak (weights subtracted) and one printed line per variant."""
    if result["peak_gib"] is not None:
        result["peak_activations_gib"] = result["peak_gib"] - bench.weights_gib
    print(
        f"{name:<22} "
        + (
            f"{result['s_per_step']:.3f} s/step (median of {steps}), peak "
            f"{result['peak_gib'] if result['peak_gib'] is not None else float('nan'):.2f} GiB"
            if result["fits"]
            else result["error"]
        ),
        flush=True,
    )
    return result


def time_inference(bench: Bench, name: str, backend: str | None, objects: int | None = None) -> dict:
    args, device = bench.args, bench.device
    objects = (objects or args.objects) if backend else 0
    result = {
        "backend": backend,
        "objects": objects,
        "fits": True,
        "error": None,
        "steps_s": [],
        "between_s": [],
        "s_per_step": None,
        "peak_gib": None,
        "peak_activations_gib": None,
    }
    state = first = None
    try:
        if backend is None:
            bench.use_plain_attention()
        else:
            bench.use_fleximmt_attention()
        _reset_peak(device)
        if backend is not None:
            state, first = bench.flexi_state(backend, objects)
        warmup = warmup_steps(args)
        with torch.no_grad(), bench.cache():
            for i in range(args.steps + warmup + bool(args.profile)):  # warm-up first, the last profiled
                with _profiled(bench, name, i >= args.steps + warmup):
                    _sync(device)
                    start = time.perf_counter()
                    bench.step(i, state)
                    _sync(device)
                    between = time.perf_counter()
                    if state is not None:
                        bench.between_steps(state, first)
                    _sync(device)
                if i < warmup:
                    result["warmup_s"] = result.get("warmup_s", 0.0) + time.perf_counter() - start
                elif i < args.steps + warmup:
                    result["steps_s"].append(time.perf_counter() - start)
                    result["between_s"].append(time.perf_counter() - between)
        result["s_per_step"] = statistics.median(result["steps_s"])
        result["peak_gib"] = _peak_gib(device)
    except (RuntimeError, MemoryError) as error:
        if not _out_of_memory(error):
            raise
        result.update(fits=False, error=f"does not fit: {str(error).splitlines()[0][:300]}")
    finally:
        state = first = None
        _reset_peak(device)
    return _finish(bench, name, result, args.steps)


def time_training(bench: Bench, name: str, flexi: bool, checkpointing: bool) -> dict:
    from fleximmt.method.attention import motion_state_for
    from fleximmt.training.train import TRAIN_PARTS, Conditions, TrainSettings, training_step

    args, device, transformer = bench.args, bench.device, bench.transformer
    result = {
        "fleximmt": flexi,
        "gradient_checkpointing": checkpointing,
        "fits": True,
        "error": None,
        "steps_s": [],
        "s_per_step": None,
        "peak_gib": None,
        "peak_activations_gib": None,
    }
    gen = torch.Generator().manual_seed(2)
    member, concept = word_members(1, bench.text_len)
    cond = Conditions(bench.training_tensors(gen), member, concept)
    settings = TrainSettings(tokens_per_motion=args.tokens)
    transformer.enable_gradient_checkpointing() if checkpointing else transformer.disable_gradient_checkpointing()
    try:
        _reset_peak(device)
        blocks = bench.cfg.num_layers
        if flexi:
            bench.use_fleximmt_attention()
            tokens = torch.nn.Parameter(random_tokens(1, blocks, args.tokens, bench.dim)[0, 0].to(device))
            optimizer = torch.optim.AdamW(
                [tokens], lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
            )
            state = motion_state_for(
                torch.stack([tokens])[None],
                member.to(device),
                **bench.adapter.state_settings(),
                parts=TRAIN_PARTS & set(bench.adapter.parts),
                num_frames=bench.geo["grid"][0],
                dmem=True,
                concept_member=concept.to(device),
                dmem_drop=settings.dmem_drop,
                generator=gen,
            )
        else:
            bench.use_plain_attention()
        warmup = warmup_steps(args)
        for i in range(args.train_steps + warmup + bool(args.profile)):  # warm-up first, the last profiled
            with _profiled(bench, name, i >= args.train_steps + warmup):
                _sync(device)
                start = time.perf_counter()
                if flexi:
                    state.set_motion_tokens(torch.stack([tokens])[None])
                    state.begin_step(bench.geo["video_tokens"], blocks)
                    with bench.adapter.training_attached(state):  # through the backward's recomputation
                        loss, _ = training_step(bench.adapter, state, cond, 0, gen, settings, contextlib.nullcontext)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    torch.nn.utils.clip_grad_norm_([tokens], settings.max_grad_norm)
                    optimizer.step()
                else:
                    bench.plain_forward_backward()
                _sync(device)
            if i < warmup:
                result["warmup_s"] = result.get("warmup_s", 0.0) + time.perf_counter() - start
            elif i < args.train_steps + warmup:
                result["steps_s"].append(time.perf_counter() - start)
        result["s_per_step"] = statistics.median(result["steps_s"])
        result["peak_gib"] = _peak_gib(device)
    except (RuntimeError, MemoryError) as error:
        if not _out_of_memory(error):
            raise
        result.update(fits=False, error=f"does not fit: {str(error).splitlines()[0][:300]}")
    finally:
        transformer.disable_gradient_checkpointing()
        state = tokens = optimizer = None
        _reset_peak(device)
    return _finish(bench, name, result, args.train_steps)


def warmup_steps(args) -> int:
    """Untimed steps before the timed ones: one, and two more when compiling (the first layouts differ)."""
    return 3 if args.compile else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny config (a dry run of every code path, e.g. on a CPU)"
    )
    parser.add_argument(
        "--model",
        choices=sorted(CHECKPOINTS),
        default=next(iter(CHECKPOINTS)),
        help=model_help(),
    )
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument(
        "--more-objects",
        type=int,
        nargs="*",
        default=[],
        metavar="K",
        help="also time the auto backend with these object counts (after training, before dense)",
    )
    parser.add_argument("--tokens", type=int, default=226, help="motion tokens per object and block (d_m)")
    parser.add_argument("--steps", type=int, default=5, help="timed denoising steps per variant (after one warm-up)")
    parser.add_argument(
        "--train-steps", type=int, default=3, help="timed training steps per variant (after one warm-up)"
    )
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--checkpointing",
        choices=["off", "on", "both"],
        default="both",
        help="the training variants: without gradient checkpointing, with it, or both",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="profile one more step of each variant (torch.profiler); its tables to DIR/<variant>.txt",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="the weights' and inputs' dtype (default: bfloat16 on CUDA, float32 elsewhere)",
    )
    parser.add_argument(
        "--attention-backend",
        metavar="NAME",
        help="diffusers' attention backend for every variant (set_attention_backend: flash, sage, flex, ...)",
    )
    parser.add_argument("--compile", action="store_true", help="transformer.compile(fullgraph=True) for every variant")
    parser.add_argument(
        "--cache", metavar="first-block:T", help="diffusers' FirstBlockCache at threshold T on every inference variant"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="start no further variant once S seconds have passed (the JSON says which were skipped)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA (none here): nothing measured. For a dry run: --device cpu --tiny")
        return 0
    import diffusers

    bench = Bench(args)
    device = bench.device
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model": bench.name,
        "tiny": args.tiny,
        "dtype": str(bench.dtype).replace("torch.", ""),
        "size": list(bench.size),
        "video_tokens": bench.geo["video_tokens"],
        "text_tokens": bench.text_len,
        "objects": args.objects,
        "tokens_per_motion": args.tokens,
        "weights_gib": bench.weights_gib,
        "paper_release_s_per_step_a800": PAPER_RELEASE_S_PER_STEP,
        "attention_backend": args.attention_backend,
        "compile": args.compile,
        "cache": args.cache,
        "baseline": bench.baseline(),
    }
    print(
        f"{result['model']}{' (tiny config)' if args.tiny else ''} on {result['device']}, {bench.dtype}, "
        f"{bench.size[0]}x{bench.size[1]}x{bench.size[2]}: {bench.geo['video_tokens']:,} video tokens; weights "
        f"{bench.weights_gib:.2f} GiB",
        flush=True,
    )
    start = time.perf_counter()

    def save() -> None:  # after every variant, so a run stopped by its time limit keeps what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(args.out.suffix + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(args.out)

    def skipped(why: str, **fields) -> dict:
        return {
            **fields,
            "fits": None,
            "error": f"skipped: {why}",
            "steps_s": [],
            "s_per_step": None,
            "peak_gib": None,
            "peak_activations_gib": None,
        }

    def in_time(name: str) -> bool:
        elapsed = time.perf_counter() - start
        if args.time_limit is None or elapsed < args.time_limit:
            return True
        print(f"{name:<22} skipped: {elapsed:.0f} s spent, over --time-limit {args.time_limit:.0f} s", flush=True)
        return False

    def ratios() -> None:  # against the mean of diffusers' two runs (before and after FlexiMMT's: A B A)
        runs = [inference[k]["s_per_step"] for k in ("diffusers", "diffusers_again") if k in inference]
        base = statistics.mean(runs) if all(runs) else None
        for r in inference.values():
            r["ratio"] = r["s_per_step"] / base if r.get("s_per_step") and base else None

    # the order: what matters most first (diffusers vs FlexiMMT, then training), the dense backend last
    inference = result["inference"] = {}
    training = result["training"] = {}
    inference["diffusers"] = time_inference(bench, "diffusers", None)
    save()
    name = f"FlexiMMT K={args.objects} auto"
    inference["fleximmt_auto"] = (
        time_inference(bench, name, "auto") if in_time(name) else skipped("time", backend="auto")
    )
    save()
    if in_time("diffusers again"):
        inference["diffusers_again"] = time_inference(bench, "diffusers again", None)
    ratios()
    save()
    if not args.skip_training:
        for ckpt in {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]:
            key = "checkpointing_on" if ckpt else "checkpointing_off"
            for flexi, label in ((False, "plain fwd+bwd"), (True, "FlexiMMT train")):
                name, fields = label + (" +ckpt" if ckpt else ""), {"fleximmt": flexi, "gradient_checkpointing": ckpt}
                run = time_training(bench, name, flexi, ckpt) if in_time(name) else skipped("time", **fields)
                training[f"{'fleximmt' if flexi else 'plain'}_{key}"] = run
                save()
    for k in args.more_objects:
        name = f"FlexiMMT K={k} auto"
        inference[f"fleximmt_auto_k{k}"] = (
            time_inference(bench, name, "auto", k) if in_time(name) else skipped("time", backend="auto", objects=k)
        )
        ratios()
        save()
    name = f"FlexiMMT K={args.objects} dense"
    if args.skip_dense:
        inference["fleximmt_dense"] = skipped("--skip-dense", backend="dense")
    else:
        inference["fleximmt_dense"] = (
            time_inference(bench, name, "dense") if in_time(name) else skipped("time", backend="dense")
        )
    ratios()
    result["seconds"] = time.perf_counter() - start
    save()
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
