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

``--model wan2.1`` / ``wan2.2-5b``: Wan2.1-I2V-14B-480P at 480x832x81 (32,760 video tokens) or
Wan2.2-TI2V-5B at 704x1280x121, configs from ``block.py``: a step is the pipeline's two batch-1 calls
(conditional, then unconditional; Wan 2.1 with 257 CLIP image tokens, TI2V with a timestep per
token), FlexiMMT in ``attn2`` through ``FlexiMMTWanPipeline``'s adapter, training through the same
``training_step`` inside ``adapter.training_attached``. Not yet run on a GPU.

``--model hunyuan1.5``: HunyuanVideo 1.5 I2V 480p (8.3B, config from ``block.py``) at a 16:9 image's bucket,
480x848x121 (49,290 video tokens): a step is the guider's two batch-1 forwards (conditional with 120 valid of
1,000 prompt tokens, then the empty negative prompt's 6), each with 729 SigLIP image and 256 (empty) ByT5 glyph
tokens; diffusers' ``HunyuanVideo15AttnProcessor2_0`` builds its [N, N] bool padding mask in every block,
FlexiMMT's processors leave the padded keys out (``FlexiMMTHunyuanVideo15Pipeline``'s adapter, whose forward hook
reads each row's text form); training as for Wan. Not yet run on a GPU.

``--model ltx2``: LTX-2 19B (config from ``block.py``) at 512x768x121 (6,144 video tokens, a timestep each; 1,024
text and 126 audio tokens): a step is the pipeline's three forwards with its default guidance (CFG's batch-2
forward, then spatio-temporal guidance's at block 28 and modality guidance's, batch 1 each), FlexiMMT in ``attn2``
through ``FlexiMMTLTX2ImageToVideoPipeline``'s adapter (its forward hook sets each forward's rows and capture);
training through ``training_step`` inside ``adapter.training_attached`` (the image's frame clean, silent audio).
The weights alone are 35.2 GiB in bf16. Not yet run on a GPU.

It imports only torch, diffusers, transformers, accelerate, safetensors, numpy, fleximmt and, for
Wan and HunyuanVideo 1.5, ``block.py`` beside it.

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

# The transformer configs of the real checkpoints (their transformer/config.json), used with random weights.
TRANSFORMER_CONFIGS = {
    "5b": dict(  # THUDM/CogVideoX-5b-I2V
        activation_fn="gelu-approximate",
        attention_bias=True,
        attention_head_dim=64,
        dropout=0.0,
        flip_sin_to_cos=True,
        freq_shift=0,
        in_channels=32,
        max_text_seq_length=226,
        norm_elementwise_affine=True,
        norm_eps=1e-5,
        num_attention_heads=48,
        num_layers=42,
        out_channels=16,
        patch_size=2,
        sample_frames=49,
        sample_height=60,
        sample_width=90,
        spatial_interpolation_scale=1.875,
        temporal_compression_ratio=4,
        temporal_interpolation_scale=1.0,
        text_embed_dim=4096,
        time_embed_dim=512,
        timestep_activation_fn="silu",
        use_learned_positional_embeddings=True,
        use_rotary_positional_embeddings=True,
    ),
    "1.5": dict(  # THUDM/CogVideoX1.5-5B-I2V: temporal patches of 2 latent frames, ofs embedding, no learned positions
        activation_fn="gelu-approximate",
        attention_bias=True,
        attention_head_dim=64,
        dropout=0.0,
        flip_sin_to_cos=True,
        freq_shift=0,
        in_channels=32,
        max_text_seq_length=226,
        norm_elementwise_affine=True,
        norm_eps=1e-5,
        num_attention_heads=48,
        num_layers=42,
        ofs_embed_dim=512,
        out_channels=16,
        patch_bias=False,
        patch_size=2,
        patch_size_t=2,
        sample_frames=81,
        sample_height=300,
        sample_width=300,
        spatial_interpolation_scale=1.875,
        temporal_compression_ratio=4,
        temporal_interpolation_scale=1.0,
        text_embed_dim=4096,
        time_embed_dim=512,
        timestep_activation_fn="silu",
        use_learned_positional_embeddings=False,
        use_rotary_positional_embeddings=True,
    ),
}
# Default video geometry (height, width, frames): 5B-I2V's 720x480x49 (its only size: learned positions);
# 1.5-I2V's model card: 1360x768 (min side 768, max side <= 1360), 81 frames.
GEOMETRY = {"5b": (480, 720, 49), "1.5": (768, 1360, 81)}
MODEL_NAMES = {"5b": "CogVideoX-5B-I2V", "1.5": "CogVideoX1.5-5B-I2V"}
VAE_SPATIAL, VAE_TEMPORAL = 8, 4


def full_config(model_class: type, values: dict, **overrides) -> SimpleNamespace:
    """A transformer's whole config: ``model_class``'s defaults, then a checkpoint's ``values``, then ``overrides``."""
    import inspect

    params = inspect.signature(model_class.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return SimpleNamespace(**{**defaults, **values, **overrides})


def config(model: str, **overrides) -> SimpleNamespace:
    """The full CogVideoX transformer config: ``CogVideoXTransformer3DModel``'s defaults, then the checkpoint's values."""
    from diffusers import CogVideoXTransformer3DModel

    return full_config(CogVideoXTransformer3DModel, TRANSFORMER_CONFIGS[model], **overrides)


def token_geometry(cfg, height: int, width: int, frames: int) -> dict:
    """Latent frames (padded to whole temporal patches, as diffusers' pipeline pads them) and the token grid."""
    latent = (frames - 1) // VAE_TEMPORAL + 1
    patch_t = getattr(cfg, "patch_size_t", None) or 1
    latent += (patch_t - latent % patch_t) % patch_t
    grid = (latent // patch_t, height // (VAE_SPATIAL * cfg.patch_size), width // (VAE_SPATIAL * cfg.patch_size))
    return {
        "latent_frames": latent,
        "grid": grid,
        "video_tokens": grid[0] * grid[1] * grid[2],
        "latent_shape": (latent, 16, height // VAE_SPATIAL, width // VAE_SPATIAL),
    }


def rotary(cfg, height: int, width: int, latent_frames: int, device="cpu"):
    """diffusers' own 3D RoPE for this geometry (its pipeline's method, without a pipeline)."""
    from diffusers import CogVideoXImageToVideoPipeline

    pipe = SimpleNamespace(vae_scale_factor_spatial=VAE_SPATIAL, transformer=SimpleNamespace(config=cfg))
    return CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings(
        pipe, height, width, latent_frames, device
    )


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


TINY = dict(
    num_attention_heads=2,
    attention_head_dim=64,
    num_layers=3,
    max_text_seq_length=32,
    text_embed_dim=64,
    time_embed_dim=32,
    sample_height=8,
    sample_width=12,
    sample_frames=9,
)
TINY_GEOMETRY = (64, 96, 9)
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
    """The random-weight transformer, the inputs of a denoising step and FlexiMMT's states."""

    diffusers_takes_backends = (
        False  # diffusers' CogVideoX processor calls SDPA itself (set_attention_backend: no effect)
    )

    def __init__(self, args):
        from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

        from fleximmt import FlexiMMTPipeline

        self.setup(args)
        overrides = (
            {} if not args.tiny else {**TINY, "ofs_embed_dim": TINY["time_embed_dim"]} if args.model == "1.5" else TINY
        )
        self.cfg = config(args.model, **overrides)
        self.size = TINY_GEOMETRY if args.tiny else GEOMETRY[args.model]
        self.geo = token_geometry(self.cfg, *self.size)
        torch.manual_seed(0)
        kwargs = dict(TRANSFORMER_CONFIGS[args.model].items())
        kwargs.update(overrides)
        with torch.device(self.device):
            transformer = CogVideoXTransformer3DModel(**kwargs)
        self.transformer = transformer.to(self.dtype).eval().requires_grad_(False)
        self.keep_diffusers_attention()
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.transformer.parameters()) / 2**30
        scheduler = CogVideoXDPMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
            snr_shift_scale=1.0,
            clip_sample=False,
        )
        # the transfer and training code reach the model through the pipeline; no VAE or T5 is needed for a step
        self.pipe = FlexiMMTPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=self.transformer, scheduler=scheduler
        )
        latent_frames, channels, h, w = self.geo["latent_shape"]
        gen = torch.Generator().manual_seed(1)
        self.latents = torch.randn(2, latent_frames, 2 * channels, h, w, generator=gen).to(self.device, self.dtype)
        text_len, text_dim = self.cfg.max_text_seq_length, self.cfg.text_embed_dim
        self.prompt_embeds = torch.randn(2, text_len, text_dim, generator=gen).to(self.device, self.dtype)
        self.rotary = rotary(self.cfg, self.size[0], self.size[1], latent_frames, self.device)
        self.ofs = None if getattr(self.cfg, "ofs_embed_dim", None) is None else self.latents.new_full((1,), 2.0)
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        self.text_len = self.cfg.max_text_seq_length
        self.name = MODEL_NAMES[args.model]
        self.masks = self.object_masks()

    def setup(self, args) -> None:
        """What every model's bench shares: the arguments, device and dtype."""
        self.args, self.device = args, torch.device(args.device)
        cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if cuda else torch.float32

    def keep_diffusers_attention(self) -> None:
        """Remember the transformer's attention processors as diffusers built it (before FlexiMMT's are installed)."""
        self.diffusers_processors = self.transformer.attn_processors

    def object_masks(self) -> dict[int, torch.Tensor]:
        """The moving ellipse masks of every object count timed, on the device."""
        counts = {self.args.objects, *self.args.more_objects}
        return {k: moving_masks(k, self.geo["grid"]).to(self.device) for k in counts}

    def use_plain_attention(self) -> None:
        """diffusers' own attention processors, as the transformer was built with them; with
        ``--attention-backend``, FlexiMMT's without objects where diffusers' would ignore the backend."""
        if self.args.attention_backend and not self.diffusers_takes_backends:
            self.pipe.adapter.install_processors()
        else:
            self.transformer.set_attn_processor(dict(self.diffusers_processors))
        self.speed_tools()

    def baseline(self) -> str:
        if self.args.attention_backend:
            return (
                "FlexiMMT's processor without objects (diffusers' own CogVideoX processor ignores attention backends)"
            )
        return "diffusers' CogVideoXAttnProcessor2_0"

    def use_fleximmt_attention(self) -> None:
        self.pipe.adapter.install_processors()
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
        """The transformer work of denoising step ``i`` (CFG on): its forwards (:meth:`forwards`), FlexiMMT's
        ``state`` attached to them as the family's adapter attaches it to a pipeline call."""
        attached = self.pipe.adapter.attach(state, {}) if state is not None else contextlib.nullcontext({})
        with attached as call:
            for branch, inputs in self.forwards(999 - 20 * i):
                with self.transformer.cache_context(branch):  # as the pipeline names it (for --cache)
                    self.transformer(**inputs, attention_kwargs=call.get("attention_kwargs"), return_dict=False)

    def forwards(self, timestep: float) -> list[tuple[str, dict]]:
        """The transformer forwards of one denoising step at ``timestep`` as diffusers' I2V pipeline makes them:
        (cache context name, inputs); CogVideoX's: one forward of both CFG branches."""
        t = torch.tensor(timestep, device=self.device)
        inputs = dict(
            hidden_states=self.latents,
            encoder_hidden_states=self.prompt_embeds,
            timestep=t.expand(2),
            ofs=self.ofs,
            image_rotary_emb=self.rotary,
        )
        return [("cond_uncond", inputs)]

    def training_tensors(self, gen: torch.Generator) -> dict:
        """One reference window encoded as the adapter's ``encode_conditions`` returns it (random)."""
        latent_frames, channels, h, w = self.geo["latent_shape"]
        return {
            "prompt_embeds": torch.randn(1, self.text_len, self.cfg.text_embed_dim, generator=gen),
            "video_latents": torch.randn(1, latent_frames, channels, h, w, generator=gen),
            "image_latents": torch.randn(1, latent_frames, channels, h, w, generator=gen),
            "padding": torch.tensor(0),
        }

    def plain_forward_backward(self) -> None:
        """The frozen model's forward + backward to its input, diffusers' attention (batch 1)."""
        x = self.latents[:1].detach().requires_grad_(True)
        t = torch.tensor([500], device=self.device)
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=self.prompt_embeds[:1],
            timestep=t,
            ofs=self.ofs,
            image_rotary_emb=self.rotary,
            return_dict=False,
        )[0]
        out.float().square().mean().backward()

    def flexi_state(self, backend: str, objects: int):
        from fleximmt.method.attention import motion_state_for

        k, blocks = objects, self.cfg.num_layers
        member, _ = word_members(k, self.text_len)
        tokens = random_tokens(k, blocks, self.args.tokens, self.dim).to(self.device, self.dtype)
        share = max(1, round(blocks * self.pipe.adapter.feature_share))
        state = motion_state_for(
            tokens,
            member.to(self.device),
            **self.pipe.adapter.state_settings(),
            parts=self.pipe.adapter.parts,
            num_frames=self.geo["grid"][0],
            mask_kernel=backend,
            feature_blocks=frozenset(range(share)),
            rows=self.pipe.adapter.batch_rows({"guidance_scale": 6.0}, 1),  # one video, with CFG
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


WAN_MODELS = ("wan2.1", "wan2.2-5b")  # block.py holds their configs, geometry and names
WAN_TINY = dict(num_attention_heads=2, attention_head_dim=32, num_layers=3, ffn_dim=128, text_dim=32, freq_dim=32)


def _benchmark_module(name: str):
    """A sibling script as a module (block.py imports this file; imported lazily, no cycle at load)."""
    sys.path.insert(0, str(Path(__file__).parent))
    return __import__(name)


class WanBench(Bench):
    """Wan image-to-video: the real transformer config (Wan 2.1 I2V 14B 480P or Wan 2.2 TI2V-5B) with random
    weights, a denoising step as ``WanImageToVideoPipeline`` makes it (CFG as two batch-1 calls,
    conditional first; Wan 2.1 with CLIP image tokens, TI2V with a timestep per token), FlexiMMT in
    ``attn2`` (the cross form) through ``FlexiMMTWanPipeline``'s adapter."""

    diffusers_takes_backends = True

    def __init__(self, args):
        from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

        from fleximmt import FlexiMMTWanPipeline

        block = _benchmark_module("block")
        self.setup(args)
        overrides = {}
        if args.tiny:
            overrides = dict(WAN_TINY)
            width = WAN_TINY["num_attention_heads"] * WAN_TINY["attention_head_dim"]
            if block.WAN_CONFIGS[args.model]["image_dim"]:
                overrides.update(image_dim=32, added_kv_proj_dim=width)
        self.cfg = block.wan_config(args.model, **overrides)
        self.size = TINY_GEOMETRY if args.tiny else block.WAN_GEOMETRY[args.model]
        self.geo = block.wan_geometry(args.model, self.cfg, *self.size)
        torch.manual_seed(0)
        with torch.device(self.device):
            transformer = WanTransformer3DModel(**{**block.WAN_CONFIGS[args.model], **overrides})
        transformer = transformer.to(self.dtype).eval().requires_grad_(False)
        for name, param in transformer.named_parameters():  # as from_pretrained(torch_dtype=...) keeps them
            if any(k in name.split(".") for k in transformer._keep_in_fp32_modules or ()):
                param.data = param.data.float()
        self.transformer = transformer
        self.keep_diffusers_attention()
        self.weights_gib = sum(p.numel() * p.element_size() for p in transformer.parameters()) / 2**30
        self.expand = args.model == "wan2.2-5b"
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        )
        self.pipe = FlexiMMTWanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            scheduler=scheduler,
            transformer=transformer,
            expand_timesteps=self.expand,
        )
        self.text_len, self.image_tokens = block.WAN_TEXT_TOKENS, block.WAN_IMAGE_TOKENS
        self.name = block.WAN_NAMES[args.model]
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        gen = torch.Generator().manual_seed(1)
        frames, h, w = self.geo["latent_shape"]
        channels = self.cfg.out_channels
        latents = torch.randn(1, channels, frames, h, w, generator=gen)
        condition = torch.randn(
            1, self.cfg.in_channels - channels if not self.expand else channels, frames, h, w, generator=gen
        )
        if self.expand:  # TI2V: frame 0 is the image's latent, a timestep of 0 there
            mask = torch.ones(1, 1, frames, h, w)
            mask[:, :, 0] = 0
            self.model_input = ((1 - mask) * condition + mask * latents).to(self.device, self.dtype)
            patch = self.cfg.patch_size
            self.token_mask = mask[0, 0][:, :: patch[1], :: patch[2]].flatten()[None].to(self.device)
        else:
            self.model_input = torch.cat([latents, condition], dim=1).to(self.device, self.dtype)
        self.prompt_embeds = torch.randn(2, self.text_len, self.cfg.text_dim, generator=gen).to(self.device, self.dtype)
        self.image_embeds = None
        if self.cfg.image_dim:
            self.image_embeds = torch.randn(1, self.image_tokens, self.cfg.image_dim, generator=gen).to(
                self.device, self.dtype
            )
        self.masks = self.object_masks()
        self.training_latents = (latents, condition)

    def baseline(self) -> str:
        return "diffusers' WanAttnProcessor"

    def timestep(self, t: float) -> torch.Tensor:
        t = torch.tensor([t], device=self.device)
        return self.token_mask * t if self.expand else t

    def forwards(self, timestep: float) -> list[tuple[str, dict]]:
        """The conditional forward, then the unconditional one (the negative prompt), batch 1 each."""
        t = self.timestep(timestep)
        return [
            (
                branch,
                dict(
                    hidden_states=self.model_input,
                    timestep=t,
                    encoder_hidden_states=self.prompt_embeds[row : row + 1],
                    encoder_hidden_states_image=self.image_embeds,
                ),
            )
            for row, branch in ((0, "cond"), (1, "uncond"))
        ]

    def training_tensors(self, gen: torch.Generator) -> dict:
        latents, condition = self.training_latents
        tensors = {
            "prompt_embeds": torch.randn(1, self.text_len, self.cfg.text_dim, generator=gen),
            "video_latents": latents,
            "condition": condition,
        }
        if self.image_embeds is not None:
            tensors["image_embeds"] = self.image_embeds.float().cpu()
        return tensors

    def plain_forward_backward(self) -> None:
        x = self.model_input.detach().requires_grad_(True)
        out = self.transformer(
            hidden_states=x,
            timestep=self.timestep(500.0),
            encoder_hidden_states=self.prompt_embeds[:1],
            encoder_hidden_states_image=self.image_embeds,
            return_dict=False,
        )[0]
        out.float().square().mean().backward()


HUNYUAN_MODELS = ("hunyuan1.5",)  # block.py holds its config, geometry, text layout and name
HUNYUAN_TINY = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    num_layers=3,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    text_embed_dim=32,
    text_embed_2_dim=16,
    image_embed_dim=24,
    rope_axes_dim=(8, 12, 12),
)
HUNYUAN_TINY_TEXT = {"image": 16, "glyph": 8, "prompt": 40}
# valid prompt tokens per guider branch: a prompt of about 90 words; the empty negative prompt leaves the template's
# closing tokens (" ", <|im_end|>, "\n", <|im_start|>, "assistant", "\n") after the pipeline's crop
HUNYUAN_VALID = {"pred_cond": 120, "pred_uncond": 6}
HUNYUAN_TINY_VALID = {"pred_cond": 12, "pred_uncond": 3}


class HunyuanBench(Bench):
    """HunyuanVideo 1.5 image-to-video 480p: the real 8.3B transformer config with random weights at a 16:9
    image's bucket (480x848) and 121 frames, a denoising step as ``HunyuanVideo15ImageToVideoPipeline`` makes
    it (its guider's two batch-1 forwards, conditional first, each with its own padded text: 729 SigLIP image
    tokens, 256 ByT5 glyph tokens, 1,000 Qwen2.5-VL prompt tokens, valid ones first), FlexiMMT in the joint
    attention through ``FlexiMMTHunyuanVideo15Pipeline``'s adapter (its forward hook reads each row's text form)."""

    diffusers_takes_backends = True

    def __init__(self, args):
        from diffusers import (
            AutoencoderKLHunyuanVideo15,
            FlowMatchEulerDiscreteScheduler,
            HunyuanVideo15Transformer3DModel,
        )
        from diffusers.guiders import ClassifierFreeGuidance

        from fleximmt import FlexiMMTHunyuanVideo15Pipeline

        block = _benchmark_module("block")
        self.setup(args)
        overrides = dict(HUNYUAN_TINY) if args.tiny else {}
        self.lengths = HUNYUAN_TINY_TEXT if args.tiny else block.HUNYUAN_TEXT
        valid = HUNYUAN_TINY_VALID if args.tiny else HUNYUAN_VALID
        self.cfg = block.hunyuan_config(args.model, **overrides)
        self.size = TINY_GEOMETRY if args.tiny else block.hunyuan_size(self.cfg)
        self.geo = block.hunyuan_geometry(self.cfg, *self.size)
        torch.manual_seed(0)
        with torch.device(self.device):
            transformer = HunyuanVideo15Transformer3DModel(**{**block.HUNYUAN_CONFIGS[args.model], **overrides})
        self.transformer = transformer.to(self.dtype).eval().requires_grad_(False)
        self.keep_diffusers_attention()
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.transformer.parameters()) / 2**30
        spatial, temporal = block.HUNYUAN_VAE_SCALE
        # the pipeline reads its VAE's scale factors and latent channels (it cannot be built without one): a tiny
        # one of the real VAE's shape; a denoising step never calls it
        vae = AutoencoderKLHunyuanVideo15(
            latent_channels=self.cfg.out_channels,
            block_out_channels=(8,) * 5,
            layers_per_block=1,
            spatial_compression_ratio=spatial,
            temporal_compression_ratio=temporal,
        )
        self.pipe = FlexiMMTHunyuanVideo15Pipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=self.transformer,
            vae=vae.to(self.device),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
            text_encoder_2=None,
            tokenizer_2=None,
            guider=ClassifierFreeGuidance(guidance_scale=6.0),
            image_encoder=None,
            feature_extractor=None,
        )
        self.text_len = self.lengths["prompt"]  # the tokens motion words are counted in (the adapter's text length)
        self.name = block.HUNYUAN_NAMES[args.model]
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        gen = torch.Generator().manual_seed(1)
        frames, h, w = self.geo["latent_shape"]
        channels = self.cfg.out_channels
        latents = torch.randn(1, channels, frames, h, w, generator=gen)
        condition = torch.zeros(1, channels + 1, frames, h, w)  # the image's latent frame and the frame mask
        condition[:, :channels, :1] = torch.randn(1, channels, 1, h, w, generator=gen)
        condition[:, channels:, :1] = 1.0
        self.model_input = torch.cat([latents, condition], dim=1).to(self.device, self.dtype)
        self.branches = {}
        for branch, count in valid.items():  # the guider's inputs, conditional first (what its prepare_inputs splits)
            mask = torch.zeros(1, self.lengths["prompt"], dtype=torch.long)
            mask[:, :count] = 1
            self.branches[branch] = {
                "encoder_hidden_states": torch.randn(1, self.lengths["prompt"], self.cfg.text_embed_dim, generator=gen),
                "encoder_attention_mask": mask,
                "encoder_hidden_states_2": torch.randn(
                    1, self.lengths["glyph"], self.cfg.text_embed_2_dim, generator=gen
                ),
                "encoder_attention_mask_2": torch.zeros(1, self.lengths["glyph"], dtype=torch.long),  # no quoted text
            }
            self.branches[branch] = {
                k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                for k, v in self.branches[branch].items()
            }
        self.image_embeds = torch.randn(1, self.lengths["image"], self.cfg.image_embed_dim, generator=gen).to(
            self.device, self.dtype
        )
        self.training_latents = (latents, condition)
        self.masks = self.object_masks()

    def baseline(self) -> str:
        return "diffusers' HunyuanVideo15AttnProcessor2_0 (its [N, N] bool padding mask in every block)"

    def forwards(self, timestep: float) -> list[tuple[str, dict]]:
        """The guider's forwards: conditional, then unconditional, each with its own padded text."""
        t = torch.tensor([timestep], device=self.device).to(self.dtype)
        return [
            (branch, dict(hidden_states=self.model_input, image_embeds=self.image_embeds, timestep=t, **inputs))
            for branch, inputs in self.branches.items()
        ]

    def training_tensors(self, gen: torch.Generator) -> dict:
        """One reference window as ``HunyuanVideo15Adapter.encode_conditions`` returns it (random)."""
        latents, condition = self.training_latents
        cond = self.branches["pred_cond"]
        return {
            "prompt_embeds": cond["encoder_hidden_states"].float().cpu(),
            "prompt_embeds_mask": cond["encoder_attention_mask"].cpu(),
            "prompt_embeds_2": cond["encoder_hidden_states_2"].float().cpu(),
            "prompt_embeds_mask_2": cond["encoder_attention_mask_2"].cpu(),
            "video_latents": latents,
            "condition": condition,
            "image_embeds": self.image_embeds.float().cpu(),
        }

    def plain_forward_backward(self) -> None:
        x = self.model_input.detach().requires_grad_(True)
        t = torch.tensor([500.0], device=self.device).to(self.dtype)
        out = self.transformer(
            hidden_states=x, image_embeds=self.image_embeds, timestep=t, return_dict=False, **self.branches["pred_cond"]
        )[0]
        out.float().square().mean().backward()


LTX2_MODELS = ("ltx2",)  # block.py holds its config, geometry and name
LTX2_TINY = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    cross_attention_dim=64,
    audio_num_attention_heads=2,
    audio_attention_head_dim=16,
    audio_cross_attention_dim=32,
    audio_in_channels=4,
    audio_out_channels=4,
    caption_channels=48,
    num_layers=3,
)
LTX2_TINY_TEXT = 64
LTX2_STG_BLOCK = 28  # the pipeline's default spatio_temporal_guidance_blocks=[28] (the last block of a tiny config)


class LTX2Bench(Bench):
    """LTX-2: the real 19B transformer config with random weights at the pipeline's default 512x768x121 (6,144 video
    tokens, a timestep each, the image's frame at 0; 1,024 text tokens; 126 audio tokens), a denoising step as
    ``LTX2ImageToVideoPipeline`` makes it with its default guidance: CFG's forward of rows ``[negative |
    positive]``, then spatio-temporal guidance's (block 28) and modality guidance's forwards of the positive
    prompt; FlexiMMT in ``attn2`` (the cross form) through ``FlexiMMTLTX2ImageToVideoPipeline``'s adapter, whose
    forward hook sets each forward's rows and RMPM's capture."""

    form = "cross"

    def __init__(self, args):
        from diffusers import AutoencoderKLLTX2Audio, FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel

        from fleximmt import FlexiMMTLTX2ImageToVideoPipeline

        block = _benchmark_module("block")
        self.setup(args)
        overrides = dict(LTX2_TINY) if args.tiny else {}
        self.cfg = block.ltx2_config(args.model, **overrides)
        self.size = TINY_GEOMETRY if args.tiny else block.LTX2_GEOMETRY
        self.geo = block.ltx2_geometry(self.cfg, *self.size)
        torch.manual_seed(0)
        with torch.device(self.device):
            transformer = LTX2VideoTransformer3DModel(**{**block.LTX2_CONFIGS[args.model], **overrides})
        self.transformer = transformer.to(self.dtype).eval().requires_grad_(False)
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.transformer.parameters()) / 2**30
        # the adapter reads the audio VAE's config for a training step's silent audio: one of the shape the
        # transformer takes (latent channels x mel bins / 4 = its audio input channels); a step never calls it
        mel_bins = 64 if not args.tiny else 8
        audio_vae = AutoencoderKLLTX2Audio(
            base_channels=4, latent_channels=self.cfg.audio_in_channels * 4 // mel_bins, mel_bins=mel_bins
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096
        )
        self.pipe = FlexiMMTLTX2ImageToVideoPipeline(
            scheduler=scheduler,
            vae=None,  # the pipeline's compression ratios are then the real VAE's: 32 and 8
            audio_vae=audio_vae.to(self.device),
            text_encoder=None,
            tokenizer=None,
            connectors=None,
            transformer=self.transformer,
            vocoder=None,
        )
        self.text_len = LTX2_TINY_TEXT if args.tiny else block.LTX2_TEXT_TOKENS
        self.name = block.LTX2_NAMES[args.model]
        self.dim = self.cfg.num_attention_heads * self.cfg.attention_head_dim
        self.stg_blocks = [min(LTX2_STG_BLOCK, self.cfg.num_layers - 1)]
        gen = torch.Generator().manual_seed(1)
        frames, h, w = self.geo["grid"]
        n, audio = self.geo["video_tokens"], self.geo["audio_tokens"]
        self.latents = torch.randn(1, self.cfg.in_channels, frames, h, w, generator=gen)  # [1, C, F, h, w]
        self.clean = torch.zeros(1, n, device=self.device)  # 1 on the image's frame: a timestep of 0 there
        self.clean[:, : h * w] = 1.0
        packed = self.latents.permute(0, 2, 3, 4, 1).reshape(1, n, -1)  # the pipeline's _pack_latents at patch 1
        self.hidden = packed.to(self.device, self.dtype)
        self.audio = torch.randn(1, audio, self.cfg.audio_in_channels, generator=gen).to(self.device, self.dtype)
        text = lambda: torch.randn(2, self.text_len, self.cfg.caption_channels, generator=gen)
        self.video_text, self.audio_text = (
            text().to(self.device, self.dtype) for _ in range(2)
        )  # [negative, positive]
        self.text_mask = torch.ones(2, self.text_len, device=self.device)  # the connectors' all-open mask
        self.masks = self.object_masks()

    def use_plain_attention(self) -> None:
        from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor

        self.transformer.set_attn_processor(LTX2AudioVideoAttnProcessor())
        self.speed_tools()

    def baseline(self) -> str:
        return "diffusers' LTX2AudioVideoAttnProcessor"

    def forward(self, rows: slice, t: float, **guidance):
        """One transformer forward of the batch rows ``rows`` of ``[negative, positive]`` at timestep ``t``."""
        batch = len(range(2)[rows])
        grid = self.geo["grid"]
        timestep = torch.full((batch,), t, device=self.device)
        return self.transformer(
            hidden_states=self.hidden.expand(batch, -1, -1),
            audio_hidden_states=self.audio.expand(batch, -1, -1),
            encoder_hidden_states=self.video_text[rows],
            audio_encoder_hidden_states=self.audio_text[rows],
            timestep=timestep[:, None] * (1 - self.clean),
            audio_timestep=timestep,
            sigma=timestep,
            encoder_attention_mask=self.text_mask[rows],
            audio_encoder_attention_mask=self.text_mask[rows],
            num_frames=grid[0],
            height=grid[1],
            width=grid[2],
            fps=24.0,
            audio_num_frames=self.geo["audio_tokens"],
            return_dict=False,
            **guidance,
        )

    def step(self, i: int, state=None) -> None:
        t = 999.0 - 20 * i
        with self.pipe.adapter.attach(state, {}) if state is not None else contextlib.nullcontext():
            with self.transformer.cache_context("cond_uncond"):  # as the pipeline names them (for --cache)
                self.forward(slice(None), t)
            with self.transformer.cache_context("uncond_stg"):
                self.forward(slice(1, 2), t, spatio_temporal_guidance_blocks=self.stg_blocks)
            with self.transformer.cache_context("uncond_modality"):
                self.forward(slice(1, 2), t, isolate_modalities=True)

    def training_tensors(self, gen: torch.Generator) -> dict:
        """One reference window as ``LTX2Adapter.encode_conditions`` returns it (random)."""
        return {
            "prompt_embeds": self.video_text[1:].float().cpu(),
            "audio_prompt_embeds": self.audio_text[1:].float().cpu(),
            "prompt_mask": self.text_mask[1:].long().cpu(),
            "video_latents": self.latents,
        }

    def plain_forward_backward(self) -> None:
        self.hidden.requires_grad_(True)
        try:
            video, _ = self.forward(slice(1, 2), 500.0)
            video.float().square().mean().backward()
        finally:
            self.hidden.requires_grad_(False)
            self.hidden.grad = None


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
                **bench.pipe.adapter.state_settings(),
                parts=TRAIN_PARTS & set(bench.pipe.adapter.parts),
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
                    with bench.pipe.adapter.training_attached(state):  # through the backward's recomputation
                        loss, _ = training_step(
                            bench.pipe.adapter, state, cond, 0, gen, settings, contextlib.nullcontext
                        )
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny config (a dry run of every code path, e.g. on a CPU)"
    )
    parser.add_argument(
        "--model",
        choices=[*sorted(GEOMETRY), *WAN_MODELS, *HUNYUAN_MODELS, *LTX2_MODELS],
        default="5b",
        help="CogVideoX-5B-I2V (5b), CogVideoX1.5-5B-I2V (1.5), Wan2.1-I2V-14B-480P (wan2.1), Wan2.2-TI2V-5B "
        "(wan2.2-5b), HunyuanVideo 1.5 I2V 480p (hunyuan1.5), LTX-2 19B (ltx2)",
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
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA (none here): nothing measured. For a dry run: --device cpu --tiny")
        return 0
    import diffusers

    benches = {**dict.fromkeys(WAN_MODELS, WanBench), **dict.fromkeys(HUNYUAN_MODELS, HunyuanBench)}
    bench = {**benches, **dict.fromkeys(LTX2_MODELS, LTX2Bench)}.get(args.model, Bench)(args)
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
