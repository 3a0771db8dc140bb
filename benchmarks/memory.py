"""Peak GPU memory of FlexiMMT on every registered checkpoint (CogVideoX-5B-I2V at 480x720x49 by default), computed
without a GPU.

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

Every family's transformer is counted by one ``MetaRun``: the checkpoint's true size as its adapter module declares
it (``ModelAdapter.true_sizes``), the forwards of a denoising step and of a training step as its adapter draws them
(``random_forwards``), its processors installed and attached as the adapter does. ``--model`` takes every registered
checkpoint; a family's adapter module is all it takes to be counted (``transformer_report``: the transformer's rows).
CogVideoX-5B, Wan, HunyuanVideo 1.5 and LTX-2 also count their encoders and VAE (``COMPONENT_REPORTS``).

    python benchmarks/memory.py [--training-json block-training.json] [--objects 3] [--validate]
    python benchmarks/memory.py --model wan2.1 wan2.2-5b hunyuan1.5 --validate   # everything on meta, training too
    python benchmarks/memory.py --small-cards   # Wan 2.1 I2V 14B on 24 GB / 16 GB cards: quantized, group offload
    python benchmarks/memory.py --small-cards --comfyui ../shared/comfyui-0.33   # and Learn Motion (native) there
    python benchmarks/memory.py --model ltx2 --validate   # LTX-2: bf16 at 121/97/49 frames, and 24 GB / 16 GB cards
    python benchmarks/memory.py --model 1.5   # CogVideoX 1.5: the transformer's figures (no encoder/VAE report)
    python benchmarks/memory.py --model 5b 1.5 wan2.1 --tiny   # a dry run on each checkpoint's tiny config
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import typing
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).parent))
from block import SavedBytes, attention_processors
from gpu import CHECKPOINTS, TINY_GEOMETRY, full_config, geometry, moving_masks, word_members

from fleximmt.models import adapter_class
from fleximmt.models.ltx2 import AUDIO_PER_SECOND, FPS


# -- each family's names, configs and sizes as the builders below read them: views of the registered adapters'
# true sizes (ModelAdapter.true_sizes), nothing declared here
def family_sizes(family: str) -> dict:
    """The true sizes the registered ``family``'s adapter declares, by name."""
    return {name: true for name, (adapter, true) in CHECKPOINTS.items() if adapter.family == family}


_COGVIDEOX = family_sizes("cogvideox")
TRANSFORMER_CONFIGS = {name: true.config for name, true in _COGVIDEOX.items()}
GEOMETRY = {name: true.size for name, true in _COGVIDEOX.items()}
_WAN, _HUNYUAN, _LTX2 = family_sizes("wan"), family_sizes("hunyuanvideo15"), family_sizes("ltx2")
WAN_CONFIGS = {name: true.config for name, true in _WAN.items()}
WAN_GEOMETRY = {name: true.size for name, true in _WAN.items()}
WAN_NAMES = {name: true.name for name, true in _WAN.items()}
WAN_TEXT_TOKENS, WAN_IMAGE_TOKENS = _WAN["wan2.1"].text["prompt"], _WAN["wan2.1"].text["image"]
HUNYUAN_CONFIGS = {name: true.config for name, true in _HUNYUAN.items()}
HUNYUAN_NAMES = {name: true.name for name, true in _HUNYUAN.items()}
HUNYUAN_TEXT = {k: _HUNYUAN["hunyuan1.5"].text[k] for k in ("image", "glyph", "prompt")}
LTX2_CONFIGS = {name: true.config for name, true in _LTX2.items()}
LTX2_NAMES = {name: true.name for name, true in _LTX2.items()}
LTX2_GEOMETRY, LTX2_TEXT_TOKENS = _LTX2["ltx2"].size, _LTX2["ltx2"].text["prompt"]
LTX2_FPS = FPS


def model_config(model: str, **overrides) -> SimpleNamespace:
    """A checkpoint's full transformer config: its class's defaults, then the checkpoint's values, then ``overrides``."""
    adapter, true = CHECKPOINTS[model]
    return full_config(adapter.transformer_class(), true.config, **overrides)


wan_config = hunyuan_config = ltx2_config = transformer_config = model_config


def wan_geometry(model: str, cfg, height: int, width: int, frames: int) -> dict:
    return geometry(cfg, _WAN[model].vae_scale, height, width, frames)


def hunyuan_geometry(cfg, height: int, width: int, frames: int) -> dict:
    return geometry(cfg, _HUNYUAN["hunyuan1.5"].vae_scale, height, width, frames)


def ltx2_geometry(cfg, height: int, width: int, frames: int) -> dict:
    """The geometry and the audio tokens of the video's length (the audio stream's latents a forward takes)."""
    geo = geometry(cfg, _LTX2["ltx2"].vae_scale, height, width, frames)
    geo["audio_tokens"] = round(frames / LTX2_FPS * AUDIO_PER_SECOND)
    return geo


def hunyuan_size(cfg) -> tuple[int, int, int]:
    return _HUNYUAN["hunyuan1.5"].size


def make_wan_block(cfg, dtype: torch.dtype, seed: int = 0):
    """One block as ``WanTransformer3DModel.__init__`` builds it, random weights, frozen."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    torch.manual_seed(seed)
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    block = WanTransformerBlock(
        dim, cfg.ffn_dim, cfg.num_attention_heads, cfg.qk_norm, cfg.cross_attn_norm, cfg.eps, cfg.added_kv_proj_dim
    )
    return block.to(dtype).eval().requires_grad_(False)


def make_block(cfg, dtype: torch.dtype, seed: int = 0):
    """One block as ``CogVideoXTransformer3DModel.__init__`` builds it, random weights, frozen."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    torch.manual_seed(seed)
    block = CogVideoXBlock(
        dim=cfg.num_attention_heads * cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        time_embed_dim=cfg.time_embed_dim,
        dropout=cfg.dropout,
        activation_fn=cfg.activation_fn,
        attention_bias=cfg.attention_bias,
        norm_elementwise_affine=cfg.norm_elementwise_affine,
        norm_eps=cfg.norm_eps,
    )
    return block.to(dtype).eval().requires_grad_(False)


def wan_rotary(cfg, latent_shape: tuple[int, int, int]):
    """The transformer's own ``WanRotaryPosEmbed`` for this latent video, in float32."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).float()
    return rope(torch.empty(1, 1, *latent_shape, device="meta"))  # only its shape is read


LTX2_TINY = CHECKPOINTS["ltx2"][1].tiny


def token_geometry(cfg, height: int, width: int, frames: int) -> dict:
    """CogVideoX's geometry, its ``latent_shape`` with the VAE's 16 latent channels: (frames, 16, h, w)."""
    geo = geometry(cfg, _COGVIDEOX["5b"].vae_scale, height, width, frames)
    latent, h, w = geo["latent_shape"]
    return {**geo, "latent_shape": (latent, 16, h, w)}


def rotary(cfg, height: int, width: int, latent_frames: int, device="cpu"):
    """diffusers' own 3D RoPE for this geometry (its pipeline's method, without a pipeline)."""
    from diffusers import CogVideoXImageToVideoPipeline

    spatial = _COGVIDEOX["5b"].vae_scale[0]
    pipe = SimpleNamespace(vae_scale_factor_spatial=spatial, transformer=SimpleNamespace(config=cfg))
    return CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings(
        pipe, height, width, latent_frames, device
    )


GiB, MiB = 2**30, 2**20
BF16 = torch.bfloat16
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


class StorageBytes(LiveBytes):
    """``LiveBytes`` for runs with autograd: a storage is counted from the op that allocates it (outputs
    that alias an input - views, in-place and ``out=`` ops - are not new memory) until the storage
    itself is freed, which autograd's saved tensors delay until backward has used them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for i, t in enumerate(outputs):  # one return may be a list of tensors (split, unbind): its alias info
            aliased = returns[min(i, len(returns) - 1)].alias_info is not None if returns else False
            if isinstance(t, torch.Tensor) and not aliased:
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._storages:
                    self._storages[key] = [storage.nbytes(), 1]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live -= entry[0]


class _FlashAttention(torch.autograd.Function):
    """What flash attention keeps and allocates, on meta: the output and a float32 log-sum-exp per query
    row, q/k/v and both saved for backward; backward allocates the input gradients and a float32
    accumulator for dq (FlashAttention-2's). With a ``bias`` (a masked call: the memory-efficient
    kernel, which takes one) the bias is saved too."""

    @staticmethod
    def forward(ctx, query, key, value, bias=None):
        out = query.new_empty(query.shape[:-1] + value.shape[-1:])
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse, *([] if bias is None else [bias]))
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value = ctx.saved_tensors[:3]
        accum = torch.empty(query.shape, dtype=torch.float32, device=query.device)  # noqa: F841
        need = ctx.needs_input_grad
        return (*(torch.empty_like(t) if n else None for t, n in zip((query, key, value), need)), None)


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a GPU's fused kernels allocate it (flash / memory-efficient: the output, no N x N scores;
    a bool mask becomes a float bias of its own shape). On meta, torch would pick the math path.
    With gradients: what flash attention saves for backward (``_FlashAttention``; a masked call saves its
    float bias as well, as the memory-efficient kernel does)."""
    bias = attn_mask
    if (
        attn_mask is not None and attn_mask.dtype == torch.bool
    ):  # lives during the call (through backward with gradients)
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return _FlashAttention.apply(query, key, value, bias)
    return query.new_empty(query.shape[:-1] + value.shape[-1:])


def measure_peak(fn, fused: bool = True, counter: type = LiveBytes, grad: bool = False) -> int:
    """Peak live bytes of the tensors ``fn`` creates (inputs and weights not included), with SDPA
    allocating what the fused GPU kernels allocate. ``grad=True`` (with ``counter=StorageBytes``): ``fn``
    runs with autograd on, e.g. a forward and its backward."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    if fused:
        F.scaled_dot_product_attention = fused_sdpa
    try:
        with torch.set_grad_enabled(grad), counter() as mode:
            out = fn()
            del out
    finally:
        F.scaled_dot_product_attention = original
    return mode.peak


def component_class(pipeline_class: type, name: str) -> type:
    """The class a pipeline's ``__init__`` takes for its component ``name`` (of a union, the first: the one the
    checkpoints ship)."""
    annotation = inspect.signature(pipeline_class.__init__).parameters[name].annotation
    return typing.get_args(annotation)[0] if typing.get_args(annotation) else annotation


def meta_models(model: str) -> dict:
    """A checkpoint's transformer (``meta_transformer``) and the pipeline's other models its adapter's true size
    names (``TrueSize.components``: each one's config, its class the one the pipeline's ``__init__`` takes) on the
    meta device in bf16 as ``from_pretrained(torch_dtype=torch.bfloat16)`` leaves them, frozen as train_motion
    freezes them."""
    return {"transformer": meta_transformer(model), **meta_components(model)}


def meta_components(model: str) -> dict:
    """The pipeline's models other than the transformer, as :func:`meta_models` builds them."""
    from accelerate import init_empty_weights
    from transformers import PreTrainedModel

    adapter, true = CHECKPOINTS[model]
    models = {}
    with init_empty_weights(include_buffers=True):
        for name, values in true.components.items():
            cls = component_class(adapter.pipeline_class, name)
            module = cls(cls.config_class(**values)) if issubclass(cls, PreTrainedModel) else cls(**values)
            models[name] = module.to(BF16).requires_grad_(False)
    return models


def meta_transformer(model: str, config: dict | None = None) -> torch.nn.Module:
    """A checkpoint's transformer (its family's class, its true-size config or ``config``) on the meta device in bf16,
    the class's ``_keep_in_fp32_modules`` parameters in float32 (as ``from_pretrained(torch_dtype=torch.bfloat16)``
    keeps them), frozen as train_motion freezes it."""
    from accelerate import init_empty_weights

    adapter, true = CHECKPOINTS[model]
    with init_empty_weights(include_buffers=True):
        transformer = adapter.transformer_class()(**(config or true.config)).to(BF16).requires_grad_(False)
    keep = transformer._keep_in_fp32_modules or ()
    for name, param in transformer.named_parameters():
        if any(k in name.split(".") for k in keep):
            param.data = param.data.float()
    return transformer


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def step_layouts(state) -> list:
    """A one-video state's layouts of this step: the step's, or those built per text form (``text_keys``)."""
    layouts = state.layouts
    return [layout for layout in (layouts.step_layouts[0], *layouts.text_layouts[0].values()) if layout is not None]


def layout_tensors(layout) -> dict[str, torch.Tensor]:
    """The tensors a layout keeps on the device (joint or cross form, auto backend), by field."""
    fields = ("order", "masked_rows", "masked_queries", "text_queries")
    tensors = {name: getattr(layout, name, None) for name in fields}
    return {name: t for name, t in tensors.items() if t is not None}


def move_layout(layout, device="meta") -> None:
    """Move one layout's tensors onto ``device``."""
    for name, t in layout_tensors(layout).items():
        setattr(layout, name, t.to(device))
    layout.groups = [g._replace(queries=g.queries.to(device), keys=g.keys.to(device)) for g in layout.groups]


def meta_layout(state, device="meta") -> None:
    """Move a state's step layouts (built on the CPU from real masks), words and tokens onto ``device``."""
    slot = state.videos[0]
    slot.motion_tokens = slot.motion_tokens.to(device)
    slot.member = slot.member.to(device)
    for layout in step_layouts(state):
        move_layout(layout, device)


def layouts_on_meta(state) -> None:
    """A state whose tensors are on meta, its layouts built as the processors build them (the step's now; one per
    row's text form at its first use) from the masks' and words' values, which stay on the CPU, then moved."""
    layouts = state.layouts
    members = [motions.member for motions in layouts.videos]  # on the CPU, before meta_layout moves them
    build = layouts.build
    meta_layout(state)

    def build_on_cpu(video, video_masks, text, text_len, per_block):
        motions = layouts.videos[video]
        on_meta, motions.member = motions.member, members[video]
        try:
            layout = build(video, video_masks, text, text_len, per_block)
        finally:
            motions.member = on_meta
        move_layout(layout)
        return layout

    layouts.build = build_on_cpu


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


def allocator_peak(fn) -> int:
    """Peak bytes the CPU allocator holds while ``fn`` runs, from torch.profiler's memory events (inputs not included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    live = peak = 0
    # allocations are booked to the op that made them (self memory), frees outside ops as "[memory]"
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def validate() -> dict[str, float]:
    """LiveBytes against the CPU allocator's accounting (torch.profiler memory events) on a small real
    run; returns each check's ratio (counted / allocator)."""
    from diffusers import AutoencoderKLCogVideoX

    sys.path.insert(0, str(Path(__file__).parent))

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=(32, 32, 32, 32), norm_num_groups=8, layers_per_block=1)
    z = torch.randn(1, 16, 5, 12, 16)
    cfg = transformer_config("5b", num_attention_heads=8)
    block = make_block(cfg, torch.float32)
    hidden, text, temb = torch.randn(2, 1000, 512), torch.randn(2, 226, 512), torch.randn(2, 512)
    ratios = {}
    for name, fn in (
        ("VAE decode (small)", lambda: vae.decode(z).sample),
        ("CogVideoX block (8 heads, 1,226 tokens)", lambda: block(hidden, text, temb)[0]),
    ):
        counted = measure_peak(fn, fused=False)
        with torch.no_grad():
            peak = allocator_peak(fn)
        print(
            f"validate {name}: LiveBytes {counted / MiB:.2f} MiB, CPU allocator (profiler) {peak / MiB:.2f} MiB, "
            f"ratio {counted / peak:.3f}"
        )
        ratios[name] = counted / peak
    return ratios


def validate_wan() -> dict[str, float]:
    """Wan, on a small Wan 2.1 model: the meta block's saved bytes (flash attention's) against the same
    block run on the CPU (whose flash attention saves the same), and ``StorageBytes`` through a forward
    + backward against the CPU allocator's accounting (torch.profiler memory events). Returns the ratios."""
    from diffusers import WanTransformer3DModel

    small = dict(
        num_attention_heads=4, attention_head_dim=32, ffn_dim=256, added_kv_proj_dim=128, image_dim=64, text_dim=64
    )
    cfg, size = wan_config("wan2.1", **small), (64, 96, 9)
    ratios = {}
    for flexi in (False, True):
        kw = dict(cfg=cfg, size=size, dtype=torch.float32, rope_dtype=torch.float32)
        cpu = wan_block_saved("wan2.1", flexi, 16, device="cpu", **kw)["saved"]
        meta = wan_block_saved("wan2.1", flexi, 16, device="meta", **kw)["saved"]
        print(
            f"validate Wan block, saved for backward ({'FlexiMMT' if flexi else 'diffusers'}, 128 wide, 72 video tokens): "
            f"meta {meta / MiB:.3f} MiB, CPU {cpu / MiB:.3f} MiB, ratio {meta / cpu:.3f}"
        )
        ratios[f"block saved, {'FlexiMMT' if flexi else 'diffusers'}"] = meta / cpu
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**WAN_CONFIGS["wan2.1"], **small, "num_layers": 2}).requires_grad_(False)
    x = torch.randn(1, 36, 9, 8, 12, requires_grad=True)
    args = (x, torch.tensor([500.0]), torch.randn(1, WAN_TEXT_TOKENS, 64), torch.randn(1, WAN_IMAGE_TOKENS, 64))

    def step():
        x.grad = None
        model(*args, return_dict=False)[0].pow(2).mean().backward()

    counted = measure_peak(step, fused=False, counter=StorageBytes, grad=True)
    x.grad = None
    peak = allocator_peak(step)
    print(
        f"validate Wan transformer forward + backward (2 blocks, 128 wide, 216 video tokens): StorageBytes "
        f"{counted / MiB:.2f} MiB, CPU allocator (profiler) {peak / MiB:.2f} MiB, ratio {counted / peak:.3f}"
    )
    ratios["transformer forward + backward"] = counted / peak
    return ratios


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
        "saved_plain": runs["plain"]["saved_bf16_mib"],
        "saved_flexi": runs["fleximmt"]["saved_bf16_mib"],
        "inputs": data["block_inputs_mib"] / 2,
        "peak_plain": rss("plain"),
        "peak_flexi": rss("fleximmt"),
    }
    if "plain +ckpt" in runs:
        out["peak_plain_ckpt"], out["peak_flexi_ckpt"] = rss("plain +ckpt"), rss("fleximmt +ckpt")
    else:
        out["peak_plain_ckpt"], out["peak_flexi_ckpt"] = out["peak_plain"], out["peak_flexi"]
    return out


# -- every family's transformer, run as its pipeline runs it --------------------------------------------
class KnownMasks(TorchDispatchMode):
    """Lets HunyuanVideo 1.5's transformer forward run on meta tensors. The forward selects each row's valid
    image, glyph and prompt tokens with its bool masks (``text[text_mask]``: a shape that depends on the
    masks' values) and tests ``torch.all(image_embeds == 0)`` (text-to-video). Here the masks' True counts
    are given (``counts``: mask -> count, one row each) and followed through the ops the forward makes of
    them (negation, the image mask made of ones), a bool selection by a mask of known count becomes the
    index of as many rows, and the image test reads False (an image is given)."""

    def __init__(self, counts: dict[torch.Tensor, int]):
        super().__init__()
        self.counts = {mask.untyped_storage()._cdata: count for mask, count in counts.items()}
        for mask in counts:
            if mask.dim() != 2 or mask.shape[0] != 1:
                raise ValueError(f"KnownMasks follows one row per mask, got {tuple(mask.shape)}")

    def _count(self, t: torch.Tensor) -> int:
        key = t.untyped_storage()._cdata
        if key not in self.counts:
            raise NotImplementedError(f"a bool selection by a mask of unknown count, shape {tuple(t.shape)}")
        return self.counts[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].is_meta:
            return False  # torch.all(image_embeds == 0): an image is given
        if func is aten.index.Tensor and any(i is not None and i.is_meta and i.dtype == torch.bool for i in args[1]):
            indices = [
                torch.empty(self._count(i), dtype=torch.long, device="meta")
                if i is not None and i.dtype == torch.bool
                else i
                for i in args[1]
            ]
            out = func(args[0], indices)
        else:
            out = func(*args, **kwargs)
        # masks are bool or, as the pipeline hands them over, int64 (made bool in the forward): follow both
        if isinstance(out, torch.Tensor) and out.is_meta and not (out.is_floating_point() or out.is_complex()):
            key = out.untyped_storage()._cdata
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            known = source is not None and source.untyped_storage()._cdata in self.counts
            if func in (aten.bitwise_not.default, aten.logical_not.default) and known:
                self.counts[key] = source.numel() - self._count(source)
            elif func in (aten.ones.default, aten.new_ones.default):
                self.counts[key] = out.numel()
            elif func in (aten.zeros.default, aten.new_zeros.default):
                self.counts[key] = 0
            elif func is aten._to_copy.default and known:
                self.counts[key] = self._count(source)
        return out


class MetaRun:
    """A checkpoint's transformer (``meta_transformer``; or ``transformer`` as built, with diffusers' processors, e.g.
    a small one on the CPU for ``--validate``) run as its family's pipeline runs it: a denoising step's forwards, or a training step's forward
    and backward, with the inputs the family's adapter draws for them (``ModelAdapter.random_forwards``, drawn on the
    CPU and moved onto ``device``), diffusers' attention or FlexiMMT's as the adapter installs and attaches it (its
    forward hook reading the inputs' values, which meta tensors lack, from the CPU draws; the state's layouts built
    from the masks' values on the CPU, ``layouts_on_meta``). Every family's step and training peaks come from here:
    a family's adapter module that declares its true sizes is counted with no line of this file naming it."""

    def __init__(self, model: str, transformer=None, text: dict | None = None, device="meta", dtype=BF16):
        from fleximmt.models.shared import SlotAdapter

        self.adapter_class, self.true = CHECKPOINTS[model]
        self.transformer = meta_transformer(model) if transformer is None else transformer
        self.cfg, self.device, self.dtype = self.transformer.config, device, dtype
        self.text = dict(text or self.true.text)
        self.adapter = self.adapter_class(SimpleNamespace(transformer=self.transformer))
        self.slots = isinstance(self.adapter, SlotAdapter)
        self.diffusers_processors = dict(self.transformer.attn_processors)  # as it was built: diffusers' own

    def geometry(self, size) -> dict:
        return geometry(self.cfg, self.true.vae_scale, *size)

    def forwards(self, size, guidance: bool) -> list[tuple[str, dict]]:
        """The forwards of one step (with the pipeline's default guidance, or without: a training step's one) of a
        ``size`` video at timestep 500, their inputs on the CPU."""
        latent = self.geometry(size)["latent_shape"]
        gen = torch.Generator().manual_seed(0)
        draw = self.adapter_class.random_forwards(self.cfg, size, latent, self.text, guidance, gen, "cpu", self.dtype)
        return draw(500.0)

    def placed(self, values: dict) -> tuple[dict, dict]:
        """A forward's inputs on the run's device, and (on meta) the True counts of its one-row masks
        (``KnownMasks``)."""
        if self.device != "meta":
            return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in values.items()}, {}
        inputs, counts = {}, {}
        for name, value in values.items():
            if isinstance(value, (tuple, list)) and value and all(torch.is_tensor(v) for v in value):
                value = type(value)(v.to("meta") for v in value)
            elif torch.is_tensor(value):
                moved = value.to("meta")
                if value.dim() == 2 and value.shape[0] == 1 and not value.is_floating_point():
                    counts[moved] = int(value.bool().sum())
                value = moved
            inputs[name] = value
        return inputs, counts

    def state(self, objects: int, d_m: int, size, training: bool = False):
        """A FlexiMMT state for one video as the family's adapter sets one up (its settings and MDMA parts, its rows
        of a call with the pipeline's guidance): K objects' motion tokens ``[K, 1, blocks, d_m, dim]`` (bf16; in
        training one object's float32 tokens taking gradients, the training parts, no RMPM features), their words
        among the prompt's tokens, the step's masks (moving ellipses) and RMPM's features over the family's share of
        the blocks. In training the MDMA layout is one static object mask in place of DMEM's, which are drawn from
        the block's own scores and cannot be on meta: they are computed without gradients and only decide which
        queries form each group."""
        from fleximmt.method.attention import motion_state_for
        from fleximmt.training.train import TRAIN_PARTS

        adapter, cfg = self.adapter_class, self.cfg
        layers, dim = cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim
        grid = self.geometry(size)["grid"]
        member, _ = word_members(objects, self.text["prompt"])
        shape, dtype = (objects, 1, layers, d_m, dim), torch.float32 if training else BF16
        tokens = (
            torch.empty(shape, device="meta", dtype=dtype)
            if self.device == "meta"
            else torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype) * dim**-0.5
        )
        state = motion_state_for(
            tokens,
            member,
            **adapter.state_settings(),
            parts=frozenset(TRAIN_PARTS & set(adapter.parts) if training else adapter.parts),
            num_frames=grid[0],
            feature_blocks=frozenset(() if training else feature_share_blocks(adapter.family, layers)),
            # the rows of a call with the pipeline's default guidance; training's state declares none (train.py's)
            **({} if training else {"rows": adapter(None).batch_rows({"guidance_scale": 6.0}, 1)}),
        )
        state.set_video_masks(moving_masks(objects, grid))
        if self.device == "meta":
            layouts_on_meta(state)
        if training:
            state.videos[0].motion_tokens.requires_grad_(True)
        return state

    def use(self, state) -> None:
        """diffusers' attention (state None) or the family's FlexiMMT processors."""
        if state is None:
            self.transformer.set_attn_processor(dict(self.diffusers_processors))
        else:
            self.adapter.install_processors()

    def peak(self, state, size, guidance: bool = True, grad: bool = False, checkpointing: bool = False) -> int:
        """Peak bytes of the largest forward of the step (``grad``: a training step's forward + backward, gradients to
        the motion tokens, or with diffusers' attention to the input latents; a loss on the output), plus what the
        state keeps on the device through the call (in training, less the tokens: the optimiser's stacked copy)."""
        self.use(state)
        attached = self.adapter.attach(state, {}) if state is not None else contextlib.nullcontext({})
        if checkpointing:
            self.transformer.enable_gradient_checkpointing()
        drawn: dict = {}
        if self.slots:  # the adapter's forward hook reads the CPU draws: meta tensors have no values
            hook = type(self.adapter).before_forward
            self.adapter.before_forward = lambda state, slot, transformer, args, kwargs: hook(
                self.adapter, state, slot, transformer, (), drawn
            )
        peaks = []
        try:
            with attached as call:
                extra = {"attention_kwargs": call["attention_kwargs"]} if "attention_kwargs" in call else {}
                for _, values in self.forwards(size, guidance):
                    drawn.clear()
                    drawn.update(values)
                    peaks.append(self.forward_peak(values, extra, grad and state is None, grad))
        finally:
            self.transformer.disable_gradient_checkpointing()
            vars(self.adapter).pop("before_forward", None)
        return max(peaks) + (state_bytes(state, tokens=not grad) if state is not None else 0)

    def forward_peak(self, values: dict, extra: dict, input_grad: bool, grad: bool) -> int:
        """Peak bytes of one forward of ``values`` (and with ``grad`` its backward from a loss on the output; gradients
        to the input latents too with ``input_grad``)."""
        inputs, counts = self.placed(values)
        if input_grad:
            inputs["hidden_states"].requires_grad_(True)

        def run():
            with KnownMasks(counts) if self.device == "meta" else contextlib.nullcontext():
                out = self.transformer(**inputs, **extra, return_dict=False)[0]
                if not grad:
                    return out
                out.float().pow(2).mean().backward()  # the loss's own tensors are latents-sized
                return None

        return measure_peak(run, counter=StorageBytes, grad=grad)

    def step_peak(self, objects: int, d_m: int, size=None) -> int:
        """A denoising step's largest forward with the pipeline's default guidance: diffusers' attention (K = 0) or
        FlexiMMT with K objects, RMPM's features captured where the pipeline captures them."""
        size = size or self.true.size
        return self.peak(self.state(objects, d_m, size) if objects else None, size)

    def training_peak(self, flexi: bool, d_m: int, checkpointing: bool, size=None) -> int:
        """A motion-training step's forward + backward (batch 1, weights frozen; gradients to one object's float32
        motion tokens, or for diffusers' attention, the plain reference, to the input latents)."""
        size = size or self.true.size
        state = self.state(1, d_m, size, training=True) if flexi else None
        return self.peak(state, size, guidance=False, grad=True, checkpointing=checkpointing)


def validate_family(model: str) -> dict[str, float]:
    """``MetaRun``'s count on meta against the same run on the CPU: the checkpoint's family's tiny transformer (its true
    size's ``tiny`` config and text, ``gpu.py --tiny``'s video) through a training step's forward + backward with
    gradient checkpointing, diffusers' attention and FlexiMMT's (random values and real masks on the CPU; SDPA as the
    fused kernels allocate in both). Returns the ratios (meta / CPU)."""
    adapter, true = CHECKPOINTS[model]
    values = adapter.config_at({**true.config, **true.tiny}, TINY_GEOMETRY, true.vae_scale)
    ratios = {}
    for flexi in (False, True):
        peaks = {}
        for device in ("cpu", "meta"):
            torch.manual_seed(0)
            with torch.device(device):
                transformer = adapter.transformer_class()(**values).requires_grad_(False)
            run = MetaRun(model, transformer, true.text_of(True), device, torch.float32)
            peaks[device] = run.training_peak(flexi, 8, True, TINY_GEOMETRY)
        cfg, geo = run.cfg, run.geometry(TINY_GEOMETRY)
        name = f"{true.name} forward + backward, {'FlexiMMT' if flexi else 'diffusers'}"
        print(
            f"validate {name} (tiny: {cfg.num_layers} blocks, {cfg.num_attention_heads * cfg.attention_head_dim} wide, "
            f"{geo['video_tokens']} video tokens): meta {peaks['meta'] / MiB:.3f} MiB, CPU {peaks['cpu'] / MiB:.3f} MiB, "
            f"ratio {peaks['meta'] / peaks['cpu']:.3f}"
        )
        ratios[name] = peaks["meta"] / peaks["cpu"]
    return ratios


def amount(size: int) -> str:
    """Bytes as a table shows them: GiB, or MiB below one GiB (a tiny model's)."""
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / MiB:.1f} MiB"


def transformer_report(model: str, args) -> dict:
    """What every registered checkpoint gets with no line of this file naming its family (``--model`` takes each one
    its adapter declares): its transformer's parameters, the meta peaks of a denoising step (diffusers' attention and
    FlexiMMT with K objects) and of a training step, and the rows the transformer decides: its weights and its peak,
    the transformer's phase under ``enable_model_cpu_offload()``, and training's steps with the encoders and VAE
    offloaded after caching (or, where the true size names them, ``TrueSize.components``, left on the GPU: their
    weights). Their peaks are not counted: how each is called is a family's own (the reports below count them for
    Wan, HunyuanVideo 1.5, LTX-2 and CogVideoX-5B). ``--tiny``: the checkpoint's tiny config at ``gpu.py --tiny``'s
    video, the transformer alone (a dry run)."""
    adapter, true = CHECKPOINTS[model]
    size = TINY_GEOMETRY if args.tiny else true.size
    values = adapter.config_at({**true.config, **(true.tiny if args.tiny else {})}, size, true.vae_scale)
    transformer = meta_transformer(model, values)
    run = MetaRun(model, transformer, true.text_of(args.tiny))
    weights, count = param_bytes(transformer), sum(p.numel() for p in transformer.parameters())
    cfg = transformer.config
    num_tokens = cfg.num_layers * args.tokens * cfg.num_attention_heads * cfg.attention_head_dim
    optim = num_tokens * 4 * 4 + num_tokens * 4  # float32 tokens, gradients, AdamW's two moments, the stacked copy
    step_plain = run.step_peak(0, args.tokens, size)
    step_flexi = run.step_peak(args.objects, args.tokens, size)
    train = {
        (kind, ckpt): run.training_peak(kind == "flexi", args.tokens, ckpt, size)
        for kind in ("plain", "flexi")
        for ckpt in (True, False)
    }
    height, width, frames = size
    others = {} if args.tiny else meta_components(model)  # the true size's encoders and VAEs, where it names them
    other_weights = sum(param_bytes(m) for m in others.values())
    print(
        f"\n== {true.name}, {height}x{width}x{frames}{' (tiny)' if args.tiny else ''} ==\nparameters (meta device): "
        f"transformer {count / 1e9:.3f}B ({amount(weights)})"
        + "".join(
            f", {k} {sum(p.numel() for p in m.parameters()) / 1e9:.3f}B ({amount(param_bytes(m))})"
            for k, m in others.items()
        )
        + "; a step's largest forward: diffusers "
        f"{amount(step_plain)}, FlexiMMT K = {args.objects} {amount(step_flexi)} "
        f"({step_flexi / step_plain:.3f}x); training forward + backward: "
        + ", ".join(f"{k} {'ckpt' if c else 'no ckpt'} {amount(v)}" for (k, c), v in train.items())
    )
    rows = [
        (
            "inference, diffusers, the transformer's phase",
            weights + step_plain,
            "its weights + the step's largest forward",
        ),
        (f"inference, FlexiMMT K={args.objects}, the transformer's phase", weights + step_flexi, "as above, FlexiMMT"),
        (
            "training step, gradient_checkpointing=True, encoders/VAE offloaded after caching (the defaults)",
            weights + optim + train[("flexi", True)],
            "weights + tokens/grads/AdamW (fp32) + forward + backward",
        ),
        (
            "training step, gradient_checkpointing=False, encoders/VAE offloaded",
            weights + optim + train[("flexi", False)],
            "as above, no checkpointing",
        ),
        *(
            [
                (
                    "training step, gradient_checkpointing=True, everything left on the GPU (offload_after_caching=False)",
                    weights + other_weights + optim + train[("flexi", True)],
                    "the row above + the other models' weights",
                )
            ]
            if others
            else []
        ),
        (
            "plain forward + backward, checkpointing (reference)",
            weights + train[("plain", True)],
            "diffusers' attention",
        ),
        ("plain forward + backward, no checkpointing (reference)", weights + train[("plain", False)], "as above"),
    ]
    print(
        f"\n| configuration, {true.name} {height}x{width}x{frames}, bf16, the transformer's rows | peak GPU memory | how |"
        "\n|---|---|---|"
    )
    for label, total, how in rows:
        print(f"| {label} | {amount(total)} | {how} (meta) |")
    return {
        "model": model,
        "size": list(size),
        "params": {"transformer": count, **{k: sum(p.numel() for p in m.parameters()) for k, m in others.items()}},
        "rows": [(n, t / GiB, h) for n, t, h in rows],
        "peaks_gib": {
            "step_plain": step_plain / GiB,
            "step_flexi": step_flexi / GiB,
            **{f"train_{k}_{'ckpt' if c else 'nockpt'}": v / GiB for (k, c), v in train.items()},
        },
    }


# -- Wan 2.1 I2V 14B (480P) and Wan 2.2 TI2V-5B ---------------------------------------------------
def wan_meta_models(model: str) -> dict:
    """``meta_models`` with RoPE's non-persistent buffers in float64 (as the tables have always counted them;
    diffusers 0.42.1's ``get_1d_rotary_pos_embed`` returns them as float32 after computing in float64, so the RoPE
    rows may be counted high by a few MiB)."""
    models = meta_models(model)
    models["transformer"].rope.double()
    return models


def family_state(
    family: str,
    objects: int,
    d_m: int,
    blocks: int,
    dim: int,
    feature_blocks,
    grid: tuple[int, int, int],
    words: int,
    tokens_dtype=BF16,
    parts=None,
    device="meta",
    settings=None,
):
    """A FlexiMMT state for one video of a registered ``family`` (on meta by default) as its adapter sets one
    up (``state_settings``, or ``settings`` in their place; its MDMA parts): K objects' motion tokens
    ``[K, 1, blocks, d_m, dim]``, their words among the ``words`` text tokens they are counted in, and the
    step's masks (moving ellipses on ``grid``)."""
    from fleximmt.method.attention import motion_state_for

    adapter = adapter_class(family)
    member, _ = word_members(objects, words)
    shape = (objects, 1, blocks, d_m, dim)
    tokens = (
        torch.empty(shape, device="meta", dtype=tokens_dtype)
        if device == "meta"
        else torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(tokens_dtype) * dim**-0.5
    )
    state = motion_state_for(
        tokens,
        member,
        **(settings or adapter.state_settings()),
        parts=frozenset(parts or adapter.parts),
        num_frames=grid[0],
        feature_blocks=frozenset(feature_blocks),
    )
    state.set_video_masks(moving_masks(objects, grid))
    return state


def feature_share_blocks(family: str, layers: int) -> range:
    """RMPM's feature blocks of a model of ``layers`` blocks: the family's share of its first blocks."""
    return range(max(1, round(layers * adapter_class(family).feature_share)))


def wan_flexi_state(
    model: str,
    objects: int,
    d_m: int,
    blocks: int,
    feature_blocks,
    tokens_dtype=BF16,
    dmem_parts=None,
    cfg=None,
    size=None,
    device="meta",
    settings=None,
):
    """:func:`family_state` for a Wan model (its layout moved to ``device``)."""
    cfg = cfg or wan_config(model)
    geo = wan_geometry(model, cfg, *(size or WAN_GEOMETRY[model]))
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    state = family_state(
        "wan",
        objects,
        d_m,
        blocks,
        dim,
        feature_blocks,
        geo["grid"],
        WAN_TEXT_TOKENS,
        tokens_dtype,
        dmem_parts,
        device,
        settings,
    )
    if device == "meta":
        meta_layout(state)
    return state


def state_bytes(state, tokens: bool = True) -> int:
    """What a FlexiMMT state keeps on the device through a call: motion tokens (``tokens``; in training they are the
    optimiser's stacked copy, counted with it), words, layout indices and rows."""
    slot = state.videos[0]
    total = slot.motion_tokens.numel() * slot.motion_tokens.element_size() * tokens + slot.member.numel()
    for layout in step_layouts(state):
        total += sum(t.numel() * t.element_size() for t in layout_tensors(layout).values())
        total += 8 * sum(g.queries.numel() + g.keys.numel() for g in layout.groups)
    return total


def wan_block_saved(
    model: str, flexi: bool, d_m: int, cfg=None, size=None, device="meta", dtype=BF16, rope_dtype=torch.float64
) -> dict:
    """Bytes one block saves for backward (``block.py``'s ``SavedBytes``; on meta by default, SDPA as
    flash attention saves; ``device="cpu"``: the same block run for real, for ``--validate``) and its
    input, which is all gradient checkpointing keeps of it. Gradients go to the video states (and the
    motion tokens of one object, MDMA part m2v), not to the encoder states: Wan's are constants."""
    import torch.nn.functional as F

    from fleximmt.training.train import TRAIN_PARTS

    cfg = cfg or wan_config(model)
    geo = wan_geometry(model, cfg, *(size or WAN_GEOMETRY[model]))
    with torch.device(device):
        block = make_wan_block(cfg, dtype)
    dim, n = cfg.num_attention_heads * cfg.attention_head_dim, geo["video_tokens"]
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return (
            torch.empty(shape, device="meta", dtype=dtype)
            if device == "meta"
            else torch.randn(shape, generator=gen).to(dtype)
        )

    hidden = tensor(1, n, dim).requires_grad_(True)
    text = tensor(1, (WAN_IMAGE_TOKENS if cfg.added_kv_proj_dim else 0) + WAN_TEXT_TOKENS, dim)
    temb = tensor(*((1, n, 6, dim) if model == "wan2.2-5b" else (1, 6, dim)))
    # RoPE in the float64 from_pretrained leaves its buffers in
    rot = tuple(r.to(device, rope_dtype) for r in wan_rotary(cfg, geo["latent_shape"]))
    state = None
    params = list(block.parameters())
    if flexi:
        state = wan_flexi_state(
            model,
            1,
            d_m,
            1,
            (),
            tokens_dtype=torch.float32,
            dmem_parts=TRAIN_PARTS & {"m2v", "t2v"},
            cfg=cfg,
            size=size,
            device=device,
        )
        state.videos[0].motion_tokens.requires_grad_(True)
        params.append(state.videos[0].motion_tokens)
    _, flexi_processors, slot = attention_processors(adapter_class("wan"), block)
    for module, processor in flexi_processors.items():  # FlexiMMT's, the state None without objects: diffusers'
        module.set_processor(processor)
    slot.state = state
    original = F.scaled_dot_product_attention
    if device == "meta":
        F.scaled_dot_product_attention = fused_sdpa
    try:
        with torch.enable_grad(), SavedBytes(params) as counter:
            out = block(hidden, text, temb, rot)
    finally:
        F.scaled_dot_product_attention = original
    del out
    return {"saved": counter.total, "inputs": n * dim * torch.finfo(dtype).bits // 8, "largest": counter.largest(6)}


def video_vae_peaks(vae, channels: int, latent_shape, size) -> dict[str, int]:
    """VAE decode of the video's latents (``channels`` x ``latent_shape``), encode of a whole video of ``size``
    (height, width, frames: a training clip, Wan 2.1's condition video) and of one frame (the image
    condition), untiled and tiled."""
    height, width, frames = size
    z = torch.empty(1, channels, *latent_shape, device="meta", dtype=BF16)
    video = torch.empty(1, 3, frames, height, width, device="meta", dtype=BF16)
    frame = torch.empty(1, 3, 1, height, width, device="meta", dtype=BF16)
    out = {}
    for tiling in (False, True):
        vae.enable_tiling() if tiling else vae.disable_tiling()
        name = "tiled" if tiling else "untiled"
        out[f"decode_{name}"] = measure_peak(lambda: vae.decode(z).sample, counter=StorageBytes)
        out[f"encode_{name}"] = measure_peak(lambda: vae.encode(video).latent_dist.mode(), counter=StorageBytes)
        out[f"encode_frame_{name}"] = measure_peak(lambda: vae.encode(frame).latent_dist.mode(), counter=StorageBytes)
    vae.disable_tiling()
    return out


def wan_vae_peaks(model: str, vae) -> dict[str, int]:
    """:func:`video_vae_peaks` of Wan's VAE at the model's geometry (TI2V's image is its first frame)."""
    height, width, frames = WAN_GEOMETRY[model]
    latent = wan_geometry(model, wan_config(model), height, width, frames)["latent_shape"]
    return video_vae_peaks(vae, vae.config.z_dim, latent, WAN_GEOMETRY[model])


def wan_encoder_peaks(models: dict) -> dict[str, int]:
    """umT5 over 512 tokens (one prompt: diffusers encodes the negative one in a call of its own) and
    CLIP ViT-H/14 over one 224 px image with every hidden state kept (the pipeline reads the last but one)."""
    ids = torch.zeros(1, WAN_TEXT_TOKENS, dtype=torch.long, device="meta")
    # without the padding mask the pipeline passes (transformers reads its values; a 512 x 512 mask is 0.25 MiB)
    out = {"t5": measure_peak(lambda: models["text_encoder"](ids)[0], counter=StorageBytes)}
    if "image_encoder" in models:
        pixels = torch.empty(1, 3, 224, 224, device="meta", dtype=BF16)
        out["clip"] = measure_peak(
            lambda: models["image_encoder"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2],
            counter=StorageBytes,
        )
    return out


def wan_report(model: str, args) -> dict:
    """Parameters, meta peaks and the peak-memory table of one Wan model."""
    height, width, frames = WAN_GEOMETRY[model]
    name = WAN_NAMES[model]
    models = wan_meta_models(model)
    transformer, vae = models["transformer"], models["vae"]
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    weights = {k: param_bytes(m) for k, m in models.items()}
    print(
        f"\n== {name}, {height}x{width}x{frames} ==\nparameters (meta device, real configs): "
        + ", ".join(f"{k} {count[k] / 1e9:.3f}B ({weights[k] / GiB:.2f} GiB)" for k in models)
    )
    run = MetaRun(model, transformer)
    step_plain = run.step_peak(0, args.tokens)
    step_flexi = run.step_peak(args.objects, args.tokens)
    vae_p = wan_vae_peaks(model, vae)
    enc = wan_encoder_peaks(models)
    i2v = "image_encoder" in models
    # the image condition: Wan 2.1 encodes the image followed by black frames (a whole video), TI2V the image
    cond_key = "encode" if i2v else "encode_frame"
    print(
        f"live tensor peaks on meta (bf16): transformer call (one CFG branch): diffusers {step_plain / GiB:.2f} GiB, "
        f"FlexiMMT K = {args.objects} {step_flexi / GiB:.2f} GiB ({step_flexi / step_plain:.3f}x); VAE decode "
        f"{vae_p['decode_untiled'] / GiB:.2f} GiB, tiled {vae_p['decode_tiled'] / GiB:.2f} GiB; VAE encode of {frames} "
        f"frames {vae_p['encode_untiled'] / GiB:.2f} GiB, tiled {vae_p['encode_tiled'] / GiB:.2f} GiB; of one frame "
        f"{vae_p['encode_frame_untiled'] / GiB:.3f} GiB; umT5 encode {enc['t5'] / GiB:.3f} GiB"
        + (f"; CLIP encode {enc['clip'] / GiB:.3f} GiB" if i2v else "")
    )

    rows = []

    def row(label, total, how):
        rows.append((label, total, how))

    all_w = sum(weights.values())
    encoders = [(weights["text_encoder"], enc["t5"])] + ([(weights["image_encoder"], enc["clip"])] if i2v else [])
    for label, step in (("diffusers", step_plain), (f"FlexiMMT K={args.objects}", step_flexi)):
        for tiled in (False, True):
            t = "tiled" if tiled else "untiled"
            vae_peak = max(vae_p[f"decode_{t}"], vae_p[f"{cond_key}_{t}"])
            if not tiled:
                row(
                    f"inference, {label}, no offload",
                    all_w + max(step, vae_peak, *(e for _, e in encoders)),
                    "all weights + the largest of: transformer call, VAE encode/decode, text/image encode (meta)",
                )
            row(
                f"inference, {label}, enable_model_cpu_offload()" + (" + vae.enable_tiling()" if tiled else ""),
                max(weights["transformer"] + step, weights["vae"] + vae_peak, *(w + e for w, e in encoders)),
                "one component on the GPU at a time: the largest of its weights + its peak (meta)"
                + (", tiled VAE" if tiled else ""),
            )

    # training: the tokens, their gradients and AdamW's moments in float32, and the per-step stack
    layers = transformer.config.num_layers
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    num_tokens = layers * args.tokens * dim
    optim = num_tokens * 4 * 4 + num_tokens * 4
    blocks = {kind: wan_block_saved(model, kind == "flexi", args.tokens) for kind in ("plain", "flexi")}
    train = {
        (kind, ckpt): run.training_peak(kind == "flexi", args.tokens, ckpt)
        for kind in ("plain", "flexi")
        for ckpt in (False, True)
    }
    print(
        f"per block (bf16, meta): saved for backward plain {blocks['plain']['saved'] / MiB:.0f} MiB, FlexiMMT "
        f"{blocks['flexi']['saved'] / MiB:.0f} MiB ({blocks['flexi']['saved'] / blocks['plain']['saved']:.3f}x); "
        f"checkpointed input {blocks['plain']['inputs'] / MiB:.0f} MiB"
    )
    for kind in ("plain", "flexi"):
        print(f"  largest saved storages, {kind}: " + "; ".join(blocks[kind]["largest"]))
    print(
        "training forward + backward of the transformer on meta (activations, weights not included): "
        + ", ".join(f"{k} {'ckpt' if c else 'no ckpt'} {v / GiB:.2f} GiB" for (k, c), v in train.items())
    )
    print(
        f"motion tokens: {num_tokens:,} numbers; fp32 tokens + grads + AdamW moments + stacked copy {optim / MiB:.0f} MiB"
    )
    # caching encodes the text, (Wan 2.1) the image, each window of the reference video, and the image condition
    cache_peak = max(vae_p["encode_untiled"], *(e for _, e in encoders))
    cache_peak_tiled = max(vae_p["encode_tiled"], *(e for _, e in encoders))
    clip_w = weights.get("image_encoder", 0)  # train.py's offload_after_caching moves the text encoder and VAE only
    step_w = weights["transformer"] + optim + clip_w
    how_step = "transformer weights + tokens/grads/AdamW (fp32) + the transformer's forward + backward on meta"
    if i2v:
        how_step += " + CLIP weights (left on the GPU)"
    row(
        "training, caching phase (all weights on the GPU)",
        all_w + cache_peak,
        "weights + VAE encode, umT5 or CLIP peak (meta)",
    )
    row("training, caching phase, vae_tiling=True", all_w + cache_peak_tiled, "weights + tiled VAE encode (meta)")
    row(
        "training step, gradient_checkpointing=False, umT5/VAE offloaded after caching",
        step_w + train[("flexi", False)],
        how_step,
    )
    row("training step, gradient_checkpointing=True, umT5/VAE offloaded", step_w + train[("flexi", True)], how_step)
    row(
        "training step, gradient_checkpointing=True, everything left on the GPU (offload_after_caching=False)",
        all_w - weights["transformer"] - clip_w + step_w + train[("flexi", True)],
        "the row above + umT5 and VAE weights",
    )
    row(
        "training, gradient_checkpointing=True + pipe.enable_model_cpu_offload() (caching and steps)",
        max(
            weights["text_encoder"] + enc["t5"],
            weights["vae"] + vae_p["encode_untiled"],
            clip_w + enc.get("clip", 0),
            weights["transformer"] + optim + train[("flexi", True)],
        ),
        "one component on the GPU at a time: umT5, CLIP, VAE encode (meta), or the checkpointed step",
    )
    row(
        "training, as above + vae_tiling=True",
        max(
            weights["text_encoder"] + enc["t5"],
            weights["vae"] + vae_p["encode_tiled"],
            clip_w + enc.get("clip", 0),
            weights["transformer"] + optim + train[("flexi", True)],
        ),
        "as above, tiled VAE encode (meta)",
    )
    row(
        "plain forward+backward of the same model, no checkpointing (reference)",
        weights["transformer"] + train[("plain", False)],
        "transformer weights + forward + backward on meta, diffusers' attention",
    )
    row(
        "plain forward+backward, checkpointing (reference)",
        weights["transformer"] + train[("plain", True)],
        "as above, checkpointing",
    )
    print(f"\n| configuration, {name} {height}x{width}x{frames}, bf16 | peak GPU memory | how |\n|---|---|---|")
    for label, total, how in rows:
        print(f"| {label} | {total / GiB:.1f} GiB | {how} |")
    return {
        "model": model,
        "rows": [(n, t / GiB, h) for n, t, h in rows],
        "params": count,
        "weights_gib": {k: v / GiB for k, v in weights.items()},
        "peaks_gib": {
            "step_plain": step_plain / GiB,
            "step_flexi": step_flexi / GiB,
            **{k: v / GiB for k, v in vae_p.items()},
            **{k: v / GiB for k, v in enc.items()},
            **{f"train_{k}_{'ckpt' if c else 'nockpt'}": v / GiB for (k, c), v in train.items()},
        },
        "block_saved_mib": {k: v["saved"] / MiB for k, v in blocks.items()},
        "block_input_mib": blocks["plain"]["inputs"] / MiB,
    }


# -- HunyuanVideo 1.5 I2V 480p ----------------------------------------------------------------------
HUNYUAN_TEMPLATE_TOKENS = 108  # the chat template's tokens before the prompt, encoded and then cropped (crop_start)
HUNYUAN_FRAMES = (121, 61, 33)  # the default, and shorter videos / training windows


def diffusers_mask_bytes(tokens: int) -> dict[str, int]:
    """What diffusers' ``HunyuanVideo15AttnProcessor2_0`` allocates for its padding mask in every block call of
    one row over ``tokens`` tokens: the repeated bool rows, their AND with the transpose (both live until the
    call returns), and the bf16 bias a GPU's memory-efficient SDPA makes of a bool mask."""
    return {"bool_repeat": tokens**2, "bool_and": tokens**2, "bf16_bias": 2 * tokens**2}


def hunyuan_vae_peaks(vae, size) -> dict[str, int]:
    """:func:`video_vae_peaks` of HunyuanVideo 1.5's VAE at ``size``."""
    geo = hunyuan_geometry(hunyuan_config("hunyuan1.5"), *size)
    return video_vae_peaks(vae, vae.config.latent_channels, geo["latent_shape"], size)


def hunyuan_encoder_peaks(models: dict) -> dict[str, int]:
    """Qwen2.5-VL over the templated prompt (1,000 + 108 tokens, every hidden state kept: the pipeline reads the
    third from last), ByT5 over 256 glyph tokens, SigLIP over one 384 px image (without the padding masks the
    pipeline passes: transformers reads their values, and they are small)."""
    ids = torch.zeros(1, HUNYUAN_TEXT["prompt"] + HUNYUAN_TEMPLATE_TOKENS, dtype=torch.long, device="meta")
    glyphs = torch.zeros(1, HUNYUAN_TEXT["glyph"], dtype=torch.long, device="meta")
    pixels = torch.empty(1, 3, 384, 384, device="meta", dtype=BF16)
    return {
        "qwen": measure_peak(
            lambda: models["text_encoder"](input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-3],
            counter=StorageBytes,
        ),
        "byt5": measure_peak(lambda: models["text_encoder_2"](glyphs)[0], counter=StorageBytes),
        "siglip": measure_peak(
            lambda: models["image_encoder"](pixel_values=pixels).last_hidden_state, counter=StorageBytes
        ),
    }


def hunyuan_report(model: str, args) -> dict:
    """Parameters, meta peaks and the peak-memory table of HunyuanVideo 1.5 I2V 480p, at 121 frames and fewer."""
    name = HUNYUAN_NAMES[model]
    models = meta_models(model)
    transformer, vae = models["transformer"], models["vae"]
    run = MetaRun("hunyuan1.5", transformer)
    height, width, _ = hunyuan_size(transformer.config)
    sizes = {frames: (height, width, frames) for frames in HUNYUAN_FRAMES}
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    weights = {k: param_bytes(m) for k, m in models.items()}
    print(
        f"\n== {name}, {height}x{width} (a 16:9 image's bucket), frames {list(sizes)} ==\nparameters (meta device, real "
        "configs): " + ", ".join(f"{k} {count[k] / 1e9:.3f}B ({weights[k] / GiB:.2f} GiB)" for k in models)
    )
    enc = hunyuan_encoder_peaks(models)
    encoders = {
        k: (weights[m], enc[k])
        for k, m in (("qwen", "text_encoder"), ("byt5", "text_encoder_2"), ("siglip", "image_encoder"))
    }
    print("encoder peaks on meta: " + ", ".join(f"{k} {v / GiB:.3f} GiB" for k, v in enc.items()))
    layers = transformer.config.num_layers
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    num_tokens = layers * args.tokens * dim
    optim = num_tokens * 4 * 4 + num_tokens * 4  # float32 tokens, gradients, AdamW's two moments, the stacked copy
    all_w = sum(weights.values())
    encoder_w = all_w - weights["transformer"] - weights["vae"]
    columns: dict[str, dict[int, int]] = {}
    peaks: dict[int, dict] = {}
    for frames, size in sizes.items():
        geo = hunyuan_geometry(transformer.config, *size)
        tokens = geo["video_tokens"] + sum(HUNYUAN_TEXT.values())
        step_plain = run.step_peak(0, args.tokens, size)
        step_flexi = run.step_peak(args.objects, args.tokens, size)
        vae_p = hunyuan_vae_peaks(vae, size)
        train = {
            (kind, ckpt): run.training_peak(kind == "flexi", args.tokens, ckpt, size)
            for kind in ("plain", "flexi")
            for ckpt in (True, False)
        }
        mask = diffusers_mask_bytes(tokens)
        peaks[frames] = {
            "step_plain": step_plain,
            "step_flexi": step_flexi,
            **vae_p,
            "mask": mask,
            **{f"train_{k}_{'ckpt' if c else 'nockpt'}": v for (k, c), v in train.items()},
        }
        print(
            f"{frames} frames: {geo['grid'][0]} x {geo['grid'][1]} x {geo['grid'][2]} = {geo['video_tokens']:,} video + "
            f"{sum(HUNYUAN_TEXT.values())} text tokens; diffusers' padding mask per block call: "
            f"{mask['bool_repeat'] / GiB:.2f} + {mask['bool_and'] / GiB:.2f} GiB bool, {mask['bf16_bias'] / GiB:.2f} GiB as SDPA's "
            f"bf16 bias; transformer call (one guider branch): diffusers {step_plain / GiB:.2f} GiB, FlexiMMT K = "
            f"{args.objects} {step_flexi / GiB:.2f} GiB ({step_flexi / step_plain:.3f}x); VAE decode {vae_p['decode_untiled'] / GiB:.2f}"
            f" GiB, tiled {vae_p['decode_tiled'] / GiB:.2f} GiB; encode of the clip {vae_p['encode_untiled'] / GiB:.2f} GiB, "
            f"tiled {vae_p['encode_tiled'] / GiB:.2f} GiB, of the image {vae_p['encode_frame_untiled'] / GiB:.2f} GiB; training "
            "forward + backward: "
            + ", ".join(f"{k} {'ckpt' if c else 'no ckpt'} {v / GiB:.2f} GiB" for (k, c), v in train.items()),
            flush=True,
        )

        def row(label, total, frames=frames):
            columns.setdefault(label, {})[frames] = total

        biggest_encoder = max(w + e for w, e in encoders.values())
        for label, step in (("diffusers", step_plain), (f"FlexiMMT K={args.objects}", step_flexi)):
            image = vae_p["encode_frame_untiled"]
            row(
                f"inference, {label}, no offload",
                all_w + max(step, vae_p["decode_untiled"], image, *(e for _, e in encoders.values())),
            )
            for tiled in (False, True):
                t = "tiled" if tiled else "untiled"
                vae_peak = max(vae_p[f"decode_{t}"], vae_p[f"encode_frame_{t}"])
                row(
                    f"inference, {label}, enable_model_cpu_offload()" + (" + vae.enable_tiling()" if tiled else ""),
                    max(weights["transformer"] + step, weights["vae"] + vae_peak, biggest_encoder),
                )
        cache, cache_tiled = (
            max(vae_p[f"encode_{t}"], vae_p[f"encode_frame_{t}"], *(e for _, e in encoders.values()))
            for t in ("untiled", "tiled")
        )
        step_w = weights["transformer"] + optim
        row("training, caching phase (all weights on the GPU)", all_w + cache)
        row("training, caching phase, vae_tiling=True", all_w + cache_tiled)
        row(
            "training step, gradient_checkpointing=True, encoders/VAE offloaded after caching (the defaults)",
            step_w + train[("flexi", True)],
        )
        row(
            "training step, checkpointing, everything left on the GPU (offload_after_caching=False)",
            all_w + optim + train[("flexi", True)],
        )
        row(
            "training, checkpointing + pipe.enable_model_cpu_offload() (caching and steps), vae_tiling=True",
            max(
                biggest_encoder,
                weights["vae"] + max(vae_p["encode_tiled"], vae_p["encode_frame_tiled"]),
                step_w + train[("flexi", True)],
            ),
        )
        row("training step, gradient_checkpointing=False, encoders/VAE offloaded", step_w + train[("flexi", False)])
        row(
            "plain forward + backward of the same transformer, checkpointing (reference)",
            weights["transformer"] + train[("plain", True)],
        )
        row("plain forward + backward, no checkpointing (reference)", weights["transformer"] + train[("plain", False)])
    print(
        f"motion tokens: {num_tokens:,} numbers; fp32 tokens + grads + AdamW moments + stacked copy {optim / MiB:.0f} MiB; "
        f"encoders {encoder_w / GiB:.2f} GiB"
    )
    print(
        f"\n| {name} {height}x{width}, bf16, computed | "
        + " | ".join(f"{f} frames" for f in sizes)
        + " |\n|---|"
        + "---|" * len(sizes)
    )
    for label, values in columns.items():
        print(f"| {label} | " + " | ".join(f"{values[f] / GiB:.1f} GiB" for f in sizes) + " |")
    return {
        "model": model,
        "size": [height, width],
        "frames": list(sizes),
        "params": count,
        "weights_gib": {k: v / GiB for k, v in weights.items()},
        "encoder_peaks_gib": {k: v / GiB for k, v in enc.items()},
        "rows": {label: {f: v / GiB for f, v in values.items()} for label, values in columns.items()},
        "peaks_gib": {
            f: {k: ({m: b / GiB for m, b in v.items()} if isinstance(v, dict) else v / GiB) for k, v in p.items()}
            for f, p in peaks.items()
        },
    }


# -- Wan 2.1 I2V 14B on 24 GB and 16 GB cards: quantized weights, group offloading -----------------------
CARDS_GIB = {"24 GB": 24, "16 GB": 16}
CARD_RESERVE_GIB = 1.0  # the CUDA context, cuBLAS/cuDNN workspaces and allocator slack a card keeps from tensors
# bytes a Linear weight takes, per number: int8 weight-only (torchao 0.18's Int8WeightOnlyConfig: a float32 scale and
# an int8 zero point per output row; optimum-quanto's qint8 is no larger; GGUF Q8_0 is 34 bytes per 32); 4-bit (bitsandbytes NF4 without double quantization,
# GGUF Q4_0: 18 bytes per 32) keeps a float32 scale per 64 numbers. Everything but Linear weights stays as loaded.
WEIGHT_SCHEMES = {"bf16": None, "int8": (1.0, 5), "4-bit": (0.5 + 4 / 64, 0)}
TRAIN_FRAMES = (81, 49, 33, 17)


def scheme_bytes(module, scheme: str, schemes: dict = WEIGHT_SCHEMES) -> int:
    """``module``'s parameters and buffers in bytes, its Linear weights stored as ``schemes[scheme]`` says."""
    total = param_bytes(module)
    if schemes[scheme] is None:
        return total
    per_number, per_row = schemes[scheme]
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            weight = layer.weight
            total += (
                int(weight.numel() * per_number + weight.shape[0] * per_row) - weight.numel() * weight.element_size()
            )
    return total


def largest_linear_bf16(module) -> int:
    """One bf16 copy of the largest Linear weight: what a quantized layer dequantizes for its matmul."""
    return max((m.weight.numel() * 2 for m in module.modules() if isinstance(m, torch.nn.Linear)), default=0)


def group_resident(module, scheme: str, offload: str | None, stream: bool = True) -> int:
    """Weight bytes a component keeps on the GPU under diffusers' group offloading (``pipe.enable_group_offload``):
    block_level (one block a group) offloads the entries of the module's own ModuleLists and keeps every other
    parameter on the GPU while the module runs; leaf_level offloads each Linear, Conv and Embedding and keeps
    the rest (norms, modulation tables). With ``use_stream=True`` the next group loads while one computes: two
    groups are on the GPU. ``offload=None``: the whole component (model offload, or none)."""
    whole = scheme_bytes(module, scheme)
    if offload is None:
        return whole
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    if offload == "block_level":
        groups = [
            block
            for child in module.children()
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
            for block in child
        ]
    else:
        groups = [m for m in module.modules() if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS)]
    sizes = [scheme_bytes(g, scheme) for g in groups]
    if not sizes:
        return whole
    return whole - sum(sizes) + (2 if stream else 1) * max(sizes)


def card_fits(total: int) -> list[str]:
    """The cards of ``CARDS_GIB`` a peak of ``total`` bytes fits, each keeping ``CARD_RESERVE_GIB`` from tensors."""
    return [card for card, gib in CARDS_GIB.items() if total / GiB <= gib - CARD_RESERVE_GIB]


def training_table(title: str, frames, lines) -> None:
    """Print a training table titled ``title``: ``lines`` of (label, peaks in bytes at each of ``frames``), each
    cell naming the cards its peak fits."""
    print(f"\n| {title} | " + " | ".join(f"{f} frames" for f in frames) + " |\n|---|" + "---|" * len(frames))
    for label, totals in lines:
        cells = [
            f"{t / GiB:.1f} GiB" + (f" (fits {' and '.join(card_fits(t))})" if card_fits(t) else "") for t in totals
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")


def card_tables(name: str, size, objects: int, configs, label, peak, step: int, training: dict[int, int]) -> list:
    """Print a model's generation table (``size`` = height, width, frames; its transformer call ``step``) and its
    training table (``training``: frames -> the step's work) over ``configs`` of (weight scheme, offload), each
    row's peak from ``peak(scheme, offload, work)``, against 24 GB and 16 GB cards; returns the rows."""
    height, width, frames = size
    rows = []
    print(
        f"\n| {name}generation, {height}x{width}x{frames}, K = {objects}, computed | peak GPU memory | fits 24 GB | "
        "fits 16 GB |\n|---|---|---|---|"
    )
    for scheme, offload in configs:
        total = peak(scheme, offload, step)
        rows.append(("generation", scheme, offload, frames, total / GiB))
        cards = " | ".join("yes" if card in card_fits(total) else "no" for card in CARDS_GIB)
        print(f"| {label(scheme, offload)} | {total / GiB:.1f} GiB | {cards} |")
    lines = []
    for scheme, offload in configs:
        totals = [peak(scheme, offload, work) for work in training.values()]
        rows += [("training", scheme, offload, f, t / GiB) for f, t in zip(training, totals)]
        lines.append((label(scheme, offload), totals))
    training_table(f"{name}training, {height}x{width}, gradient checkpointing, 1 object, computed", training, lines)
    return rows


def wan_small_cards(args) -> dict:
    """Wan 2.1 I2V 14B 480P at 480x832: generation (81 frames, K objects) and motion training (gradient
    checkpointing, one object, shorter windows too) with the transformer's weights in bf16, int8 or 4-bit,
    and enable_model_cpu_offload() or pipe.enable_group_offload(...); the peak against 24 GB and 16 GB cards."""
    model = "wan2.1"
    height, width, frames = WAN_GEOMETRY[model]
    models = wan_meta_models(model)
    transformer, vae = models["transformer"], models["vae"]
    print(f"\n== {WAN_NAMES[model]} on small cards ==")
    run = MetaRun(model, transformer)
    step = run.step_peak(args.objects, args.tokens)
    vae_p = wan_vae_peaks(model, vae)
    enc = wan_encoder_peaks(models)
    train = {f: run.training_peak(True, args.tokens, True, (height, width, f)) for f in TRAIN_FRAMES}
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    optim = (
        transformer.config.num_layers * args.tokens * dim * 4 * 5
    )  # fp32 tokens, grads, 2 AdamW moments, stacked copy
    print(
        f"meta peaks (bf16): transformer call (one CFG branch, K = {args.objects}) {step / GiB:.2f} GiB; tiled VAE decode "
        f"{vae_p['decode_tiled'] / GiB:.2f}, encode of {frames} frames {vae_p['encode_tiled'] / GiB:.2f} GiB; umT5 "
        f"{enc['t5'] / GiB:.3f}, CLIP {enc['clip'] / GiB:.3f} GiB; training forward + backward with checkpointing: "
        + ", ".join(f"{f} frames {v / GiB:.2f} GiB" for f, v in train.items())
    )
    for scheme in WEIGHT_SCHEMES:
        print(
            f"transformer weights {scheme}: {scheme_bytes(transformer, scheme) / GiB:.2f} GiB; on the GPU under "
            f"group offloading (use_stream=True): block_level {group_resident(transformer, scheme, 'block_level') / GiB:.2f} "
            f"GiB, leaf_level {group_resident(transformer, scheme, 'leaf_level') / GiB:.2f} GiB"
        )
    others = {name: models[name] for name in ("text_encoder", "image_encoder", "vae")}
    peaks = {
        "text_encoder": enc["t5"],
        "image_encoder": enc["clip"],
        "vae": max(vae_p["decode_tiled"], vae_p["encode_tiled"]),
    }

    def peak(scheme: str, offload: str | None, work: int) -> int:
        """One component on the GPU at a time (model offload or group offloading), the largest phase."""
        transient = largest_linear_bf16(transformer) if WEIGHT_SCHEMES[scheme] else 0
        phases = [group_resident(transformer, scheme, offload) + work + transient]
        phases += [group_resident(m, "bf16", offload) + peaks[name] for name, m in others.items()]
        return max(phases)

    configs = [
        ("bf16", None),
        ("int8", None),
        ("4-bit", None),
        ("bf16", "block_level"),
        ("bf16", "leaf_level"),
        ("int8", "block_level"),
        ("4-bit", "block_level"),
    ]

    def label(scheme, offload):
        how = (
            "enable_model_cpu_offload()"
            if offload is None
            else f"pipe.enable_group_offload('cuda', offload_type='{offload}', use_stream=True)"
        )
        return f"transformer {scheme}, {how}, vae tiling"

    training = {f: optim + train[f] for f in TRAIN_FRAMES}
    rows = card_tables("", (height, width, frames), args.objects, configs, label, peak, step, training)
    return {"rows": rows, "reserve_gib": CARD_RESERVE_GIB, "train": train, "optim": optim}


# -- Learn Motion (native): a Wan 2.1 14B motion learned through ComfyUI's own model -----------------------------
# Wan 2.1 I2V 14B as ComfyUI's loader detects it from the checkpoint's weights (comfy/model_detection.py; WanModel's
# defaults give the 4,096-wide text and 512 text tokens)
COMFY_WAN21_14B = dict(
    image_model="wan2.1",
    model_type="i2v",
    patch_size=(1, 2, 2),
    in_dim=36,
    dim=5120,
    ffn_dim=13824,
    freq_dim=256,
    out_dim=16,
    num_heads=40,
    num_layers=40,
    window_size=(-1, -1),
    qk_norm=True,
    cross_attn_norm=True,
    eps=1e-6,
)
# ComfyUI's usual Wan 2.1 14B files, by the dtype their weights keep on the card; ComfyUI computes in bf16 with either.
# fp8_scaled: each Linear weight float8_e4m3fn (its one float32 scale left out: 4 bytes a tensor), the rest bf16.
COMFY_WEIGHTS = {"bf16": torch.bfloat16, "fp8_scaled": torch.float8_e4m3fn}
COMFY_WEIGHT_SCHEMES = {"bf16": None, "fp8_scaled": (1.0, 0)}
COMFY_STREAMS = 2  # comfy.model_management.NUM_STREAMS on an NVIDIA card: async weight offload on two streams


def import_comfyui(path: Path):
    """ComfyUI's ``comfy`` package from its source at ``path``, on the CPU (its requirements installed: 0.33 needs
    comfy-aimdo and comfy-kitchen, as ``make install-comfy`` puts them in .venv-vision)."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import comfy.ldm.modules.attention
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def comfy_wan_patcher(comfy, weights: str, config=COMFY_WAN21_14B, device="meta"):
    """ComfyUI's Wan 2.1 I2V model as its loader builds it for weights stored as ``weights`` (``model_base.WAN21``;
    its ``WanModel`` with the operations ComfyUI picks for them: bf16 weights used in place, fp8 ones cast to bf16
    by each layer at each call), on ``device`` (meta; the CPU with random weights), held by a ``ModelPatcher``."""
    model_config = comfy.supported_models.WAN21_I2V(dict(config))
    dtype = COMFY_WEIGHTS[weights]
    model_config.set_inference_dtype(dtype, None if dtype == BF16 else BF16)
    model = model_config.get_model({}, device=device)
    for module in model.modules():  # fp8_scaled files hold their Linear weights in fp8, the rest as bf16 files do
        for name, param in module.named_parameters(recurse=False):
            if param.dtype == dtype and not (isinstance(module, torch.nn.Linear) and name == "weight"):
                param.data = param.data.to(BF16)
    model.requires_grad_(False)  # as ComfyUI's loader leaves the weights it loads (0.3.64's BaseModel does not)
    if device != "meta":  # ComfyUI's layers leave their weights uninitialised until a checkpoint fills them
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_wan_trainer(patcher):
    """Learn's ``NativeTraining`` on the Wan model in ``patcher``, with the caption's 512 tokens and what ComfyUI's
    Wan 2.1 VAE reports of its latent (``comfy/sd.py``: 16 channels, 4x in time after the first frame, 8x in
    space); it encodes nothing."""
    from types import SimpleNamespace

    from fleximmt.apps.comfy.native.training import NativeTraining
    from fleximmt.apps.comfy.native.wan import Wan

    vae = SimpleNamespace(downscale_ratio=(lambda frames: max(0, (frames + 3) // 4), 8, 8), latent_channels=16)
    trainer = NativeTraining(Wan(), [patcher], clip=None, vae=vae)
    trainer.text_len = WAN_TEXT_TOKENS
    return trainer


@contextlib.contextmanager
def comfy_wan_training(patcher, d_m: int, checkpointing: bool, size, cfg=None, device="meta"):
    """One *Learn Motion (native)* step on ComfyUI's Wan model in ``patcher``, as a function to run: the MODEL
    cloned with the training patch as Learn does it (``NativeTraining.training``: the native patch's
    ``double_block`` replacement per block, whose ComfyUI block runs under ``torch.utils.checkpoint`` through the
    patcher's injection, applied here as ComfyUI's ``ModelPatcher.load`` applies it), the training state attached
    (one object's float32 tokens; ``cfg``: the Wan config the state's geometry is read from, the 14B's by default),
    ``BaseModel.apply_model`` called with the options ComfyUI's sampler makes (``call_options``) on a ``size``
    (height, width, frames) latent, and the backward from a loss on x0. ComfyUI's attention is its SDPA function
    (``attention_pytorch``, what it runs on an NVIDIA card). The MDMA layout is the library benchmark's (one static
    object mask in place of DMEM's, see ``MetaRun.state``)."""
    from comfy.ldm.modules.attention import attention_pytorch

    from fleximmt.apps.comfy.native.training import call_options
    from fleximmt.method.tokens import TextKeys
    from fleximmt.training.train import TRAIN_PARTS

    base = patcher.clone()
    base.model_options["transformer_options"]["optimized_attention_override"] = lambda func, *a, **kw: (
        attention_pytorch(*a, **kw)
    )
    trainer = comfy_wan_trainer(base)
    model = base.model.diffusion_model
    state = wan_flexi_state(
        "wan2.1",
        1,
        d_m,
        len(model.blocks),
        (),
        tokens_dtype=torch.float32,
        dmem_parts=TRAIN_PARTS & {"m2v", "t2v"},
        cfg=cfg,
        size=size,
        device="cpu",
        settings=trainer.state_settings(),
    )
    # the layout of the text form each native call names (every row's prompt where member counts it, 512 keys),
    # built here from the masks: on meta they hold no values to build it from at the call
    state.layouts.step_layout(0, TextKeys(), WAN_TEXT_TOKENS)
    if device == "meta":
        meta_layout(state)
    state.videos[0].motion_tokens.requires_grad_(True)
    height, width, frames = size
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)  # Wan 2.1's VAE: 4x in time, 8x in space
    generator = torch.Generator().manual_seed(0)

    def condition(*shape):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=generator)

    out_dim = model.out_dim
    x = condition(1, out_dim, *latent)  # the noised window, float32 as training_prediction makes it
    concat = condition(1, model.patch_embedding.in_channels - out_dim, *latent)  # frame mask and image latents
    context = condition(1, WAN_TEXT_TOKENS, model.text_embedding[0].in_features)  # umT5's features
    clip_fea = condition(1, WAN_IMAGE_TOKENS, 1280)  # CLIP ViT-H's penultimate states
    sigma = torch.full((1,), 0.5, device=device)
    with trainer.training(checkpointing), trainer.training_attached(state):
        clone = trainer.patchers[0]
        clone.inject_model()
        clone.pre_run()

        def step():
            state.videos[0].motion_tokens.grad = None
            options = call_options(clone, sigma)
            x0 = clone.model.apply_model(
                x, sigma, c_concat=concat, c_crossattn=context, clip_fea=clip_fea, transformer_options=options
            )
            x0.float().pow(2).mean().backward()

        yield step


def comfy_wan_training_peak(patcher, d_m: int, checkpointing: bool, size) -> int:
    """Peak bytes on meta of :func:`comfy_wan_training`'s step (weights and inputs not included; SDPA as flash
    attention allocates and saves)."""
    with comfy_wan_training(patcher, d_m, checkpointing, size) as step:
        return measure_peak(step, counter=StorageBytes, grad=True)


def comfy_offload_buffer(patcher, streams: int = COMFY_STREAMS) -> int:
    """Bytes ``ModelPatcher.load`` keeps free beside a partially loaded model for the layers it streams: the largest,
    over its load list by offload cost, of one layer's cast size and the next ``streams`` layers' sizes."""
    loading = sorted(patcher._load_list(), reverse=True)
    return max(entry[0] + sum(e[1] for e in loading[i + 1 : i + 1 + streams]) for i, entry in enumerate(loading))


# a small ComfyUI Wan 2.1 I2V model for the checks (ComfyUI's heads are 128 wide), the diffusers config its state's
# geometry is read from, and its video (height, width, frames: 3 x 4 x 6 tokens)
COMFY_WAN_SMALL = {**COMFY_WAN21_14B, "dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 4, "text_dim": 64}
COMFY_WAN_SMALL_CFG = dict(num_attention_heads=2, attention_head_dim=128)
COMFY_WAN_SMALL_SIZE = (64, 96, 9)


def validate_comfy_wan(comfyui: Path) -> dict[str, float]:
    """The native step's count, on a small ComfyUI Wan 2.1 I2V model (4 blocks, 2 heads of 128, fp8 weights cast to
    bf16 per layer, gradient checkpointing): ``StorageBytes`` against the CPU allocator's accounting (torch.profiler
    memory events) through the real step, and the meta count against the same count on the CPU (SDPA as the fused
    kernels allocate, both). Returns each check's ratio."""

    comfy = import_comfyui(comfyui)
    small, cfg, size = COMFY_WAN_SMALL, wan_config("wan2.1", **COMFY_WAN_SMALL_CFG), COMFY_WAN_SMALL_SIZE
    counted = {}
    for device in ("cpu", "meta"):
        patcher = comfy_wan_patcher(comfy, "fp8_scaled", small, device)
        with comfy_wan_training(patcher, 16, True, size, cfg, device) as step:
            counted[device] = measure_peak(step, counter=StorageBytes, grad=True)
    patcher = comfy_wan_patcher(comfy, "fp8_scaled", small, "cpu")
    with comfy_wan_training(patcher, 16, True, size, cfg, "cpu") as step:
        unfused = measure_peak(step, fused=False, counter=StorageBytes, grad=True)
        peak = allocator_peak(step)
    print(
        f"validate Learn Motion (native) step on ComfyUI's WanModel (4 blocks, 256 wide, fp8 cast, checkpointing): "
        f"StorageBytes {unfused / MiB:.2f} MiB, CPU allocator (profiler) {peak / MiB:.2f} MiB, ratio "
        f"{unfused / peak:.3f}; meta {counted['meta'] / MiB:.2f} MiB against the CPU's {counted['cpu'] / MiB:.2f} MiB"
    )
    return {
        "native step, CPU allocator": unfused / peak,
        "native step, meta against CPU": counted["meta"] / counted["cpu"],
    }


def comfy_small_cards(args, library: dict) -> dict:
    """*Learn Motion (native)* of a Wan 2.1 I2V 14B motion at 480x832 against 24 GB and 16 GB cards, through ComfyUI's
    own model (``--comfyui``'s source) with its weights bf16 or fp8_scaled, loaded whole or partially (ComfyUI's
    lowvram: every layer streamed, the least ComfyUI keeps on the card), beside the library's rows (``library``:
    :func:`wan_small_cards`' report)."""
    comfy = import_comfyui(args.comfyui)
    from fleximmt.apps.comfy.learn import training_memory  # imports ComfyUI's comfy_api

    height, width, _ = WAN_GEOMETRY["wan2.1"]
    patchers = {weights: comfy_wan_patcher(comfy, weights) for weights in COMFY_WEIGHTS}
    model = patchers["bf16"].model.diffusion_model
    # bf16 weights are used in place; fp8 ones - and any layer streamed in a partial load - reach each call as a new
    # bf16 copy, which the matmuls keep for the backward pass while their block is recomputed
    steps = {
        weights: {f: comfy_wan_training_peak(p, args.tokens, True, (height, width, f)) for f in TRAIN_FRAMES}
        for weights, p in patchers.items()
    }
    whole = {weights: scheme_bytes(model, weights, COMFY_WEIGHT_SCHEMES) for weights in COMFY_WEIGHTS}
    buffers = {weights: comfy_offload_buffer(p) for weights, p in patchers.items()}
    optim = library["optim"]
    # what Learn asks ComfyUI to keep free for the step, from its NativeTraining on each model
    trainers = {weights: comfy_wan_trainer(p) for weights, p in patchers.items()}
    asked = {
        weights: {f: training_memory(trainer, (height, width, f), True) for f in TRAIN_FRAMES}
        for weights, trainer in trainers.items()
    }
    library_step = library["train"]
    print(
        f"\n== Learn Motion (native): ComfyUI's WanModel (Wan 2.1 I2V 14B, {args.comfyui}) ==\n"
        f"weights on the card loaded whole: bf16 {whole['bf16'] / GiB:.2f} GiB, fp8_scaled "
        f"{whole['fp8_scaled'] / GiB:.2f} GiB; partially loaded, ModelPatcher.load's offload buffer (2 streams) bf16 "
        f"{buffers['bf16'] / MiB:.0f} MiB, fp8_scaled {buffers['fp8_scaled'] / MiB:.0f} MiB\n"
        "native step, forward + backward with checkpointing on meta (bf16 weights in place | each layer's weight a "
        "bf16 copy per call) against the library's diffusers model, and what Learn asks ComfyUI to keep free "
        "(learn.training_memory): "
        + "; ".join(
            f"{f} frames {steps['bf16'][f] / GiB:.2f} | {steps['fp8_scaled'][f] / GiB:.2f} GiB (library "
            f"{library_step[f] / GiB:.2f}, {steps['bf16'][f] / library_step[f]:.3f}x; asked "
            f"{asked['bf16'][f] / GiB:.2f} | {asked['fp8_scaled'][f] / GiB:.2f}, "
            f"{asked['fp8_scaled'][f] / steps['fp8_scaled'][f]:.3f}x the step with copies)"
            for f in TRAIN_FRAMES
        )
    )
    lines = {  # what the card holds besides the step: the weights ComfyUI keeps on it, the tokens and AdamW's state
        "bf16 weights, loaded whole": (whole["bf16"], steps["bf16"]),
        "fp8_scaled weights, loaded whole": (whole["fp8_scaled"], steps["fp8_scaled"]),
        "bf16 weights, partially loaded, every layer streamed": (buffers["bf16"], steps["fp8_scaled"]),
        "fp8_scaled weights, partially loaded, every layer streamed": (buffers["fp8_scaled"], steps["fp8_scaled"]),
        # ComfyUI's legacy loading streams layers until what Learn asks for is free beside the weights it loads
        "bf16 weights, partially loaded, every layer streamed, Learn's ask kept free": (buffers["bf16"], asked["bf16"]),
        "fp8_scaled weights, partially loaded, every layer streamed, Learn's ask kept free": (
            buffers["fp8_scaled"],
            asked["fp8_scaled"],
        ),
    }
    totals = {label: [held + optim + step[f] for f in TRAIN_FRAMES] for label, (held, step) in lines.items()}
    training_table(
        f"Learn Motion (native) on ComfyUI's Wan 2.1 I2V 14B, {height}x{width}, gradient checkpointing, 1 object, "
        "computed",
        TRAIN_FRAMES,
        totals.items(),
    )
    return {
        "rows": [
            ("native training", label, f, t / GiB) for label, ts in totals.items() for f, t in zip(TRAIN_FRAMES, ts)
        ],
        "step_gib": {weights: {f: v / GiB for f, v in by.items()} for weights, by in steps.items()},
        "weights_gib": {weights: v / GiB for weights, v in whole.items()},
        "offload_buffer_gib": {weights: v / GiB for weights, v in buffers.items()},
        "asked_gib": {weights: {f: v / GiB for f, v in by.items()} for weights, by in asked.items()},
    }


# -- LTX-2 (Lightricks/LTX-2, 19B) -------------------------------------------------------------------------------
LTX2_FRAMES = (121, 97, 49)  # the pipeline's default and shorter videos / training windows (8k+1)
LTX2_TRAIN_FRAMES = (121, 97, 49, 25)


def ltx2_encoder_peaks(models: dict, size) -> dict[str, int]:
    """Gemma 3 over 1,024 tokens, every hidden state kept and stacked as the pipeline stacks them (its logits too:
    diffusers calls the whole model; without the padding mask, whose values transformers reads: a bool row), the
    connectors over the prompt's and the negative prompt's stacked states (CFG), and the audio VAE decode with
    the vocoder at ``size``'s length."""
    ids = torch.zeros(1, LTX2_TEXT_TOKENS, dtype=torch.long, device="meta")
    gemma = models["text_encoder"]
    width = gemma.config.text_config.hidden_size * (gemma.config.text_config.num_hidden_layers + 1)
    states = torch.empty(2, LTX2_TEXT_TOKENS, width, device="meta", dtype=BF16)
    mask = torch.ones(2, LTX2_TEXT_TOKENS, dtype=torch.long, device="meta")
    audio_cfg = models["audio_vae"].config
    audio = torch.empty(
        1,
        audio_cfg.latent_channels,
        ltx2_geometry(ltx2_config("ltx2"), *size)["audio_tokens"],
        audio_cfg.mel_bins // 4,
        device="meta",
        dtype=BF16,
    )
    return {
        "gemma": measure_peak(
            lambda: torch.stack(gemma(input_ids=ids, output_hidden_states=True).hidden_states, -1).flatten(2, 3),
            counter=StorageBytes,
        ),
        "connectors": measure_peak(lambda: models["connectors"](states, mask)[0], counter=StorageBytes),
        "audio": measure_peak(
            lambda: models["vocoder"](models["audio_vae"].decode(audio).sample), counter=StorageBytes
        ),
    }


def ltx2_report(model: str, args) -> dict:
    """Parameters, meta peaks and LTX-2's peak-memory tables: bf16 at 121, 97 and 49 frames, and on 24 GB and 16 GB
    cards (the transformer and Gemma quantized, model offload or the transformer's group offloading)."""
    name = LTX2_NAMES[model]
    models = meta_models(model)
    transformer, vae = models["transformer"], models["vae"]
    run = MetaRun("ltx2", transformer)
    height, width, _ = LTX2_GEOMETRY
    sizes = {frames: (height, width, frames) for frames in LTX2_FRAMES}
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    weights = {k: param_bytes(m) for k, m in models.items()}
    print(
        f"\n== {name}, {height}x{width}, frames {list(sizes)} ==\nparameters (meta device, real configs): "
        + ", ".join(f"{k} {count[k] / 1e9:.3f}B ({weights[k] / GiB:.2f} GiB)" for k in models)
    )
    layers = transformer.config.num_layers
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    num_tokens = layers * args.tokens * dim
    optim = num_tokens * 4 * 4 + num_tokens * 4  # float32 tokens, gradients, AdamW's two moments, the stacked copy
    all_w = sum(weights.values())
    columns: dict[str, dict[int, int]] = {}
    peaks: dict[int, dict] = {}
    for frames, size in sizes.items():
        geo = ltx2_geometry(transformer.config, *size)
        step_plain = run.step_peak(0, args.tokens, size)
        step_flexi = run.step_peak(args.objects, args.tokens, size)
        vae_p = video_vae_peaks(vae, vae.config.latent_channels, geo["latent_shape"], size)
        enc = ltx2_encoder_peaks(models, size)
        train = {
            (kind, ckpt): run.training_peak(kind == "flexi", args.tokens, ckpt, size)
            for kind in ("plain", "flexi")
            for ckpt in (True, False)
        }
        peaks[frames] = {
            "step_plain": step_plain,
            "step_flexi": step_flexi,
            **vae_p,
            **enc,
            **{f"train_{k}_{'ckpt' if c else 'nockpt'}": v for (k, c), v in train.items()},
        }
        print(
            f"{frames} frames: {geo['grid'][0]} x {geo['grid'][1]} x {geo['grid'][2]} = {geo['video_tokens']:,} video + "
            f"{LTX2_TEXT_TOKENS} text + {geo['audio_tokens']} audio tokens; CFG forward (batch 2): diffusers "
            f"{step_plain / GiB:.2f} GiB, FlexiMMT K = {args.objects} {step_flexi / GiB:.2f} GiB "
            f"({step_flexi / step_plain:.3f}x); VAE decode {vae_p['decode_untiled'] / GiB:.2f} GiB, tiled "
            f"{vae_p['decode_tiled'] / GiB:.2f} GiB; encode of the clip {vae_p['encode_untiled'] / GiB:.2f} GiB, of the "
            f"image {vae_p['encode_frame_untiled'] / GiB:.2f} GiB; Gemma {enc['gemma'] / GiB:.2f} GiB, connectors "
            f"{enc['connectors'] / GiB:.2f} GiB, audio decode {enc['audio'] / GiB:.3f} GiB; training forward + "
            "backward: "
            + ", ".join(f"{k} {'ckpt' if c else 'no ckpt'} {v / GiB:.2f} GiB" for (k, c), v in train.items()),
            flush=True,
        )
        phases = {  # one component on the GPU at a time (enable_model_cpu_offload): its weights + its peak
            "text_encoder": weights["text_encoder"] + enc["gemma"],
            "connectors": weights["connectors"] + enc["connectors"],
            "audio": weights["audio_vae"] + weights["vocoder"] + enc["audio"],
        }

        def row(label, total, frames=frames):
            columns.setdefault(label, {})[frames] = total

        for label, step in (("diffusers", step_plain), (f"FlexiMMT K={args.objects}", step_flexi)):
            biggest = max(step, vae_p["decode_untiled"], vae_p["encode_frame_untiled"], *enc.values())
            row(f"inference, {label}, no offload", all_w + biggest)
            for tiled in (False, True):
                t = "tiled" if tiled else "untiled"
                row(
                    f"inference, {label}, enable_model_cpu_offload()" + (" + vae.enable_tiling()" if tiled else ""),
                    max(
                        weights["transformer"] + step,
                        weights["vae"] + max(vae_p[f"decode_{t}"], vae_p[f"encode_frame_{t}"]),
                        *phases.values(),
                    ),
                )
        step_w = weights["transformer"] + optim
        row(
            "training, caching phase (all weights on the GPU)",
            all_w + max(vae_p["encode_untiled"], vae_p["encode_frame_untiled"], enc["gemma"], enc["connectors"]),
        )
        row(
            "training step, gradient_checkpointing=True, encoders/VAE offloaded after caching (the defaults)",
            step_w + train[("flexi", True)],
        )
        row("training step, gradient_checkpointing=False, encoders/VAE offloaded", step_w + train[("flexi", False)])
        row(
            "training, checkpointing + pipe.enable_model_cpu_offload() (caching and steps), vae_tiling=True",
            max(
                phases["text_encoder"],
                phases["connectors"],
                weights["vae"] + max(vae_p["encode_tiled"], vae_p["encode_frame_tiled"]),
                step_w + train[("flexi", True)],
            ),
        )
        row(
            "plain forward + backward of the same transformer, checkpointing (reference)",
            weights["transformer"] + train[("plain", True)],
        )
        row("plain forward + backward, no checkpointing (reference)", weights["transformer"] + train[("plain", False)])
    print(
        f"motion tokens: {num_tokens:,} numbers; fp32 tokens + grads + AdamW moments + stacked copy {optim / MiB:.0f} MiB"
    )
    print(
        f"\n| {name} {height}x{width}, bf16, computed | "
        + " | ".join(f"{f} frames" for f in sizes)
        + " |\n|---|"
        + "---|" * len(sizes)
    )
    for label, values in columns.items():
        print(f"| {label} | " + " | ".join(f"{values[f] / GiB:.1f} GiB" for f in sizes) + " |")
    cards = ltx2_small_cards(args, run, models, weights, peaks, optim)
    return {
        "model": model,
        "size": [height, width],
        "frames": list(sizes),
        "params": count,
        "weights_gib": {k: v / GiB for k, v in weights.items()},
        "rows": {label: {f: v / GiB for f, v in values.items()} for label, values in columns.items()},
        "peaks_gib": {f: {k: v / GiB for k, v in p.items()} for f, p in peaks.items()},
        "cards": cards,
    }


def ltx2_small_cards(args, run: MetaRun, models: dict, weights: dict, peaks: dict, optim: int) -> dict:
    """LTX-2 on 24 GB and 16 GB cards: generation (121 frames, K objects) and motion training (gradient checkpointing,
    one object, windows of 121 to 25 frames), the transformer's and Gemma's Linear weights in bf16, int8 or 4-bit,
    one component on the GPU at a time (model offload) or the transformer under group offloading."""
    transformer, gemma = models["transformer"], models["text_encoder"]
    height, width, frames = LTX2_GEOMETRY
    train = {  # the checkpointed training step's forward + backward, at each window length
        f: peaks[f]["train_flexi_ckpt"]
        if f in peaks
        else run.training_peak(True, args.tokens, True, (height, width, f))
        for f in LTX2_TRAIN_FRAMES
    }
    vae_peak = max(peaks[frames]["decode_tiled"], peaks[frames]["encode_frame_tiled"], peaks[frames]["encode_tiled"])
    small = {
        "connectors": weights["connectors"] + peaks[frames]["connectors"],
        "vae": weights["vae"] + vae_peak,
        "audio": weights["audio_vae"] + weights["vocoder"] + peaks[frames]["audio"],
    }
    configs = [
        ("bf16", None),
        ("int8", None),
        ("4-bit", None),
        ("bf16", "block_level"),
        ("int8", "block_level"),
        ("4-bit", "block_level"),
    ]

    def peak(scheme: str, offload: str | None, work: int) -> int:
        transient = largest_linear_bf16(transformer) if WEIGHT_SCHEMES[scheme] else 0
        text = scheme_bytes(gemma, scheme) + peaks[frames]["gemma"] + (largest_linear_bf16(gemma) if transient else 0)
        return max(group_resident(transformer, scheme, offload) + work + transient, text, *small.values())

    def label(scheme, offload):
        how = (
            "enable_model_cpu_offload()"
            if offload is None
            else f"transformer.enable_group_offload('cuda', offload_type='{offload}', use_stream=True), the rest model offload"
        )
        return f"transformer and Gemma {scheme}, {how}, vae tiling"

    for scheme in WEIGHT_SCHEMES:
        print(
            f"weights {scheme}: transformer {scheme_bytes(transformer, scheme) / GiB:.2f} GiB (block_level group offload "
            f"keeps {group_resident(transformer, scheme, 'block_level') / GiB:.2f} GiB), Gemma "
            f"{scheme_bytes(gemma, scheme) / GiB:.2f} GiB"
        )
    training = {f: optim + train[f] for f in LTX2_TRAIN_FRAMES}
    step = peaks[frames]["step_flexi"]
    rows = card_tables("LTX-2 ", LTX2_GEOMETRY, args.objects, configs, label, peak, step, training)
    return {"rows": rows, "reserve_gib": CARD_RESERVE_GIB}


# the families whose reports count their encoders and VAE too (CogVideoX-5B's is main's own), and their keys in --out
COMPONENT_REPORTS = {"wan": wan_report, "hunyuanvideo15": hunyuan_report, "ltx2": ltx2_report}
REPORT_KEYS = {"hunyuanvideo15": "hunyuan"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-json", type=Path, help="output of `benchmarks/block.py training --out FILE`")
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=226)
    parser.add_argument(
        "--validate", action="store_true", help="check the meta counter against the CPU allocator first"
    )
    parser.add_argument(
        "--model",
        nargs="+",
        choices=list(CHECKPOINTS),
        default=["5b"],
        metavar="MODEL",
        help="the checkpoints to count, each registered family's true sizes: "
        + ", ".join(f"{name} ({true.name})" for name, (_, true) in CHECKPOINTS.items())
        + ". CogVideoX-5B-I2V (5b, the default), Wan, HunyuanVideo 1.5 and LTX-2 count their encoders and VAE too; "
        "any other (a family added by its adapter module alone) gets its transformer's figures",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a dry run: each checkpoint's tiny config (the transformer only)"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    parser.add_argument(
        "--comfyui",
        type=Path,
        help="with --small-cards: ComfyUI's source folder (0.33), for Learn Motion (native)'s rows through its own "
        "Wan model; its requirements must import",
    )
    parser.add_argument(
        "--small-cards",
        action="store_true",
        help="only Wan 2.1 I2V 14B on 24 GB and 16 GB cards: quantized weights, group offloading",
    )
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.small_cards:
        report = wan_small_cards(args)
        if args.comfyui:
            report["native"] = comfy_small_cards(args, report)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1, default=str))
        return report
    if args.validate:
        validate()
        if any(CHECKPOINTS[model][0].family == "wan" for model in args.model):
            validate_wan()
        for model in args.model:
            validate_family(model)
    reports: dict[str, list] = {}
    for model in args.model:
        family = CHECKPOINTS[model][0].family
        if model == "5b" and not args.tiny:
            continue  # below
        report = transformer_report if args.tiny else COMPONENT_REPORTS.get(family, transformer_report)
        reports.setdefault(REPORT_KEYS.get(family, family), []).append(report(model, args))
    if "5b" not in args.model or args.tiny:
        if args.out:
            args.out.write_text(json.dumps(reports, indent=1, default=str))
        return reports
    models = meta_models("5b")
    transformer, vae, text_encoder = models["transformer"], models["vae"], models["text_encoder"]
    n_tr, n_vae, n_t5 = (sum(p.numel() for p in m.parameters()) for m in (transformer, vae, text_encoder))
    w_tr, w_vae, w_t5 = param_bytes(transformer), param_bytes(vae), param_bytes(text_encoder)
    print(
        f"parameters (meta device, real configs): transformer {n_tr / 1e9:.3f}B ({w_tr / GiB:.2f} GiB bf16), "
        f"VAE {n_vae / 1e6:.1f}M ({w_vae / GiB:.2f} GiB), T5-XXL encoder {n_t5 / 1e9:.3f}B ({w_t5 / GiB:.2f} GiB)"
    )
    run = MetaRun("5b", transformer)
    step_plain = run.step_peak(0, args.tokens)
    step_flexi = run.step_peak(args.objects, args.tokens)
    vae_p = vae_peaks(vae)
    t5 = t5_peak(text_encoder)
    print(
        f"live tensor peaks on meta (bf16): transformer step with CFG: diffusers {step_plain / GiB:.2f} GiB, FlexiMMT K = "
        f"{args.objects} {step_flexi / GiB:.2f} GiB ({step_flexi / step_plain:.3f}x); VAE decode {vae_p['decode_untiled'] / GiB:.2f} "
        f"GiB, tiled {vae_p['decode_tiled'] / GiB:.2f} GiB; VAE encode (49 frames) {vae_p['encode_untiled'] / GiB:.2f} GiB, "
        f"tiled {vae_p['encode_tiled'] / GiB:.2f} GiB; T5 encode {t5 / GiB:.3f} GiB"
    )

    rows = []

    def row(name, total, how):
        rows.append((name, total, how))

    weights = w_tr + w_vae + w_t5
    for label, step in (("diffusers", step_plain), (f"FlexiMMT K={args.objects}", step_flexi)):
        row(
            f"inference, {label}, no offload",
            weights + max(step, vae_p["decode_untiled"], t5),
            "all weights + the largest of: transformer step, VAE decode, T5 encode (meta)",
        )
        row(
            f"inference, {label}, enable_model_cpu_offload()",
            max(w_tr + step, w_vae + vae_p["decode_untiled"], w_t5 + t5),
            "one component on the GPU at a time: the largest of its weights + its peak (meta)",
        )
        row(
            f"inference, {label}, model offload + vae.enable_tiling()",
            max(w_tr + step, w_vae + vae_p["decode_tiled"], w_t5 + t5),
            "as above, tiled VAE decode (meta)",
        )

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
    how_train = (
        "transformer weights + tokens/grads/AdamW (fp32) + 41 x a block's saved bytes + one block's fwd+bwd "
        "peak (CPU-measured per block, bf16) "
    )
    row(
        "training, caching phase (T5 + VAE encode, all weights on the GPU)",
        caching,
        "weights + VAE encode or T5 peak (meta)",
    )
    row("training, caching phase, VAE tiling", caching_tiled, "weights + tiled VAE encode (meta)")
    row("training step, gradient_checkpointing=False, T5/VAE offloaded after caching", nockpt, how_train)
    row(
        "training step, gradient_checkpointing=True, T5/VAE offloaded",
        ckpt,
        "transformer weights + tokens/grads/AdamW + 42 x block inputs + one block's recompute fwd+bwd peak (CPU-measured)",
    )
    row(
        "training step, gradient_checkpointing=True, T5/VAE left on the GPU (offload_after_caching=False)",
        ckpt + w_t5 + w_vae,
        "the row above + T5 and VAE weights",
    )
    row(
        "training, gradient_checkpointing=True + pipe.enable_model_cpu_offload() (caching and steps)",
        max(w_t5 + t5, w_vae + vae_p["encode_untiled"], ckpt),
        "one component on the GPU at a time: T5 encode, VAE encode (meta), or the checkpointed step",
    )
    row(
        "training, as above + vae_tiling=True",
        max(w_t5 + t5, w_vae + vae_p["encode_tiled"], ckpt),
        "as above, tiled VAE encode (meta)",
    )
    row(
        "plain forward+backward of the same model, no checkpointing (reference)",
        nockpt_plain,
        how_train + "diffusers' attention",
    )
    row("plain forward+backward, checkpointing (reference)", ckpt_plain, "as above, diffusers' attention")
    print(
        f"\nper block (bf16, from {args.training_json or 'the recorded measurement'}): saved for backward plain "
        f"{blk['saved_plain']:.0f} MiB, FlexiMMT {blk['saved_flexi']:.0f} MiB; checkpointed inputs {blk['inputs']:.0f} MiB; "
        f"fwd+bwd peak plain {blk['peak_plain']:.0f} / FlexiMMT {blk['peak_flexi']:.0f} MiB, with checkpointing "
        f"{blk['peak_plain_ckpt']:.0f} / {blk['peak_flexi_ckpt']:.0f} MiB"
    )
    print(
        f"motion tokens: {num_tokens:,} numbers; fp32 tokens + grads + AdamW moments {optim / MiB:.0f} MiB (an 8-bit "
        f"optimiser would save {num_tokens * 6 / MiB:.0f} MiB)"
    )
    print("\n| configuration, CogVideoX-5B-I2V 480x720x49, bf16 | peak GPU memory | how |\n|---|---|---|")
    for name, total, how in rows:
        print(f"| {name} | {total / GiB:.1f} GiB | {how} |")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows": [(n, t / GiB, h) for n, t, h in rows],
                    "block": blk,
                    "params": {"transformer": n_tr, "vae": n_vae, "t5": n_t5},
                    **reports,
                },
                indent=1,
                default=str,
            )
        )
    return reports


if __name__ == "__main__":
    main()
