"""FlexiMMT native on ComfyUI's own Wan model (``comfy/ldm/wan/model.py``): the *FlexiMMT Apply (Wan)* node.

It takes a MODEL from ComfyUI's loaders - with whatever LoRAs, GGUF or fp8 weights were loaded there
- and returns a clone that any sampler runs with FlexiMMT (docs/method.md#wan), through ComfyUI's
patch points only, never by editing its files:

- a ``DIFFUSION_MODEL`` wrapper sees every model call: it builds the run's ``FlexiMMTState`` on the
  first (the token grid from the latent, the text length from the conditioning), tells which batch
  rows are which video and which carry the conditional branch (``cond_or_uncond``), and when the
  noise level changes - a new evaluation - ends the last step: RMPM's masks from the features it
  captured (``pipeline.MaskSchedule``, as in fleximmt's own pipelines);
- a ``dit`` / ``double_block`` replacement per block names the block to the attention calls it makes
  (and calls the block ComfyUI would have called, or an earlier replacement);
- ``optimized_attention_override`` sees the block's attention calls in order: the self-attention
  runs as ComfyUI runs it, and lends RMPM its output (after ``o``, before the gate, in the conditional
  rows of the first 70% of blocks); the image tokens' call (Wan 2.1) runs as ComfyUI runs it; the text
  call becomes MDMA over ``[text | motion tokens]``, the motion tokens projected by that block's own
  ``k``/``norm_k``/``v`` modules (so LoRA, fp8 and GGUF weights apply to them as to the text), its
  unmasked groups computed by ComfyUI's own attention function;
- an ``OUTER_SAMPLE`` wrapper starts every sampling run from the first-frame masks.

A motion learned by fleximmt on diffusers' Wan works here unchanged: motion tokens are per block,
whatever the weights' key names. Each MODEL is one expert: for Wan 2.2 A14B patch the high-noise
model with expert 1 and the low-noise model with expert 2 (each run starts its masks anew).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from ...errors import FlexiMMTInputError, ObjectInputError
from ...method.adapter import TokenGrid
from ...method.attention import FlexiMMTState, VideoMotions
from ...method.masks import CROSS_PARTS, mask_to_token_grid, span_membership
from ...method.pipeline import (
    MASK_SOURCES,
    MaskSchedule,
    TransferOptions,
    about_object,
    object_token_spans,
    transfer_state,
)
from ...models import family_name
from .common import CATEGORY, OBJECTS, mask_source_input, rmpm_inputs

logger = logging.getLogger(__name__)

KEY = "fleximmt"  # transformer_options[KEY]: the run during a model call; the wrappers' and callbacks' key
BLOCK_KEY = "fleximmt_block"  # transformer_options[BLOCK_KEY]: the block whose attention calls follow
FEATURE_SHARE = 0.7  # as fleximmt's Wan adapter: RMPM reads the first 70% of the blocks
EXPERTS = ("auto", "1 (high noise)", "2 (low noise)")


def center_crop(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``mask [H, W]`` cropped to the aspect ratio ``width / height`` around its centre, exactly as
    ComfyUI's ``common_upscale(..., crop="center")`` crops the start image of its image-to-video nodes."""
    old_h, old_w = mask.shape
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return mask[y : old_h - y, x : old_w - x]


def clip_token_ids(clip, text: str) -> list[int]:
    """The token ids of ``text`` as a ComfyUI CLIP's tokenizer hands them to its encoder (weights
    syntax parsed, end token and padding included)."""
    batches = next(iter(clip.tokenize(text).values()))
    return [int(t[0]) for batch in batches for t in batch]


def clip_phrase_ids(clip, phrase: str) -> list[int]:
    """A phrase's ids as the prompt's tokenizer gives them, without special tokens."""
    outer = clip.tokenizer
    inner = getattr(outer, outer.clip) if hasattr(outer, "clip") else outer
    ids = inner.tokenizer(phrase)["input_ids"]
    return list(ids[inner.tokens_start : -1 if inner.tokenizer_adds_end_token else None])


@dataclass
class BlockCall:
    """The attention calls of one block, in the order ComfyUI's Wan block makes them."""

    index: int
    kinds: tuple[str, ...]
    made: int = 0

    def next(self) -> str:
        kind = self.kinds[self.made] if self.made < len(self.kinds) else "other"
        self.made += 1
        return kind


@dataclass
class Run:
    """One sampling run of the patched model: its state, its masks' schedule and where it stands."""

    model: torch.nn.Module  # ComfyUI's WanModel
    grid: TokenGrid
    state: FlexiMMTState | None
    schedule: MaskSchedule | None
    videos: int
    text_len: int
    sigma: float | None = None
    steps: int = 0
    feature_index: torch.Tensor | None = None
    _rows: dict = field(default_factory=dict)


class WanPatch:
    """FlexiMMT for one ComfyUI Wan MODEL (one expert): the objects, their motion words' token spans,
    the options, and the patch functions ComfyUI calls."""

    def __init__(
        self,
        objects: tuple,
        spans: list[list[int]],
        concept_spans: list[list[int]] | None,
        expert: int,
        options: TransferOptions,
    ) -> None:
        self.objects, self.spans, self.concept_spans, self.expert, self.options = (
            objects,
            spans,
            concept_spans,
            expert,
            options,
        )
        self.run: Run | None = None
        self.previous_blocks: dict[int, object] = {}
        self.previous_override = None

    def __deepcopy__(self, memo) -> WanPatch:
        """One patch for every clone of the MODEL (``ModelPatcher.clone`` deep-copies its options): the
        motions are not copied, and each sampling run starts afresh anyway."""
        return self

    # -- installing ------------------------------------------------------------------------
    def install(self, patcher) -> None:
        """Register the patch on ``patcher`` (a clone), after whatever patches it already has."""
        import comfy.patcher_extension as ext

        options = patcher.model_options.setdefault("transformer_options", {})
        self.previous_override = options.get("optimized_attention_override")
        options["optimized_attention_override"] = self.attention
        replaced = options.get("patches_replace", {}).get("dit", {})
        for index in range(len(patcher.model.diffusion_model.blocks)):
            self.previous_blocks[index] = replaced.get(("double_block", index))
            patcher.set_model_patch_replace(self.block(index), "dit", "double_block", index)
        patcher.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, KEY, self.outer_sample)
        patcher.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, KEY, self.diffusion_model)

    # -- ComfyUI's patch points ------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        """A sampling run: its masks start from the first frame's."""
        self.run = None
        try:
            return executor(*args, **kwargs)
        finally:
            self.run = None

    def diffusion_model(
        self,
        executor,
        x,
        timestep,
        context,
        clip_fea=None,
        time_dim_concat=None,
        transformer_options={},  # noqa: B006 - ComfyUI's signature
        **kwargs,
    ):
        if not self.objects:
            return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
        if time_dim_concat is not None or kwargs.get("reference_latent") is not None:
            raise FlexiMMTInputError(
                "FlexiMMT Apply: this graph adds frames or reference tokens to the Wan model's "
                "input (time_dim_concat / reference_latent), which FlexiMMT's masks do not cover; "
                "remove that conditioning or the FlexiMMT patch"
            )
        model = executor.class_obj
        chunks = list(transformer_options.get("cond_or_uncond") or [0])
        run = self.run_for(model, x, context, len(chunks))
        sigma = float(transformer_options["sigmas"].max()) if "sigmas" in transformer_options else None
        if run.sigma is not None and sigma != run.sigma:  # a new evaluation: the last step is done
            run.schedule.step_end(run.steps)
            run.steps += 1
        run.sigma = sigma
        self.assign_rows(run, chunks, x.shape[0], x.device)
        options = dict(transformer_options)
        options[KEY] = run
        return executor(x, timestep, context, clip_fea, time_dim_concat, options, **kwargs)

    def block(self, index: int):
        def replace(args, extra):
            options = args["transformer_options"]
            run = options.get(KEY)
            previous = self.previous_blocks.get(index)
            if run is not None:
                cross = run.model.blocks[index].cross_attn
                kinds = ("self", "image", "text") if hasattr(cross, "k_img") else ("self", "text")
                args = {**args, "transformer_options": {**options, BLOCK_KEY: BlockCall(index, kinds)}}
            return previous(args, extra) if previous is not None else extra["original_block"](args)

        return replace

    def attention(self, func, *args, **kwargs):
        previous = self.previous_override
        base = (lambda *a, **kw: previous(func, *a, **kw)) if previous is not None else func
        options = kwargs.get("transformer_options") or {}
        call, run = options.get(BLOCK_KEY), options.get(KEY)
        if call is None or run is None:
            return base(*args, **kwargs)
        kind = call.next()
        if kind == "self":
            out = base(*args, **kwargs)
            state = run.state
            if state.capturing(call.index):  # RMPM's features: attn1's output after `o`, before the gate
                rows = run.feature_index
                features = run.model.blocks[call.index].self_attn.o(out.index_select(0, rows))
                state.observe(call.index, features, rows=list(range(len(rows))))
            return out
        if kind != "text":
            return base(*args, **kwargs)
        return self.text_attention(run, call.index, base, *args, **kwargs)

    # -- the pieces -------------------------------------------------------------------------
    def text_attention(self, run: Run, index: int, base, q, k, v, *args, heads: int, **kwargs):
        """MDMA cross-attention of the video queries over the block's text keys and the motion tokens."""
        if args or kwargs.get("mask") is not None:
            raise FlexiMMTInputError(
                "FlexiMMT Apply: the Wan text attention got a mask of its own; FlexiMMT's MDMA "
                "is the mask - remove the other patch that adds one"
            )
        if k.shape[1] != run.text_len:
            raise FlexiMMTInputError(
                f"FlexiMMT Apply: the text has {k.shape[1]} tokens in block {index}, {run.text_len} in the conditioning"
            )
        attn = run.model.blocks[index].cross_attn
        to_heads = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
        kw = dict(kwargs, heads=heads, skip_reshape=True, skip_output_reshape=True)
        group = lambda qg, kg, vg, mask=None: base(qg, kg, vg, mask=mask, **kw)

        def project(tokens: torch.Tensor, kind: str) -> torch.Tensor:
            tokens = tokens.to(device=q.device, dtype=q.dtype)[None]
            x = attn.norm_k(attn.k(tokens)) if kind == "k" else attn.v(tokens)
            return to_heads(x)

        out = run.state.cross_attention(index, 0, to_heads(q), to_heads(k), to_heads(v), project, group)
        return out.transpose(1, 2).flatten(2).to(q.dtype)

    def run_for(self, model, x: torch.Tensor, context: torch.Tensor, chunks: int) -> Run:
        """This sampling run's state, made at its first model call."""
        patch = model.patch_size
        frames, height, width = (-(-size // p) for size, p in zip(x.shape[2:], patch))
        grid = TokenGrid(frames, height, width, x.shape[2], patch[0])
        videos = max(1, x.shape[0] // chunks)
        run = self.run
        if run is not None and (
            run.model is model and run.grid == grid and run.videos == videos and run.text_len == context.shape[1]
        ):
            return run
        self.run = run = self.new_run(model, grid, videos, context.shape[1], x.device)
        return run

    def new_run(self, model, grid: TokenGrid, videos: int, text_len: int, device) -> Run:
        num_blocks = len(model.blocks)
        bad = [k for k, span in enumerate(self.spans, 1) if max(span) >= text_len]
        if bad:
            raise ObjectInputError(
                bad[0],
                f"its motion words lie beyond the conditioning's {text_len} text tokens: "
                "give FlexiMMT Apply the prompt of the positive CLIP Text Encode",
            )
        member = span_membership(text_len, self.spans).to(device)
        tokens = torch.stack([obj.motion.expert_tokens()[self.expert] for obj in self.objects])[:, None].to(device)
        concept = None
        if self.concept_spans is not None:
            concept = [torch.tensor(span, dtype=torch.long, device=device) for span in self.concept_spans]
        firsts = []
        for obj in self.objects:
            mask = obj.mask_tensor
            firsts.append(mask_to_token_grid(center_crop(mask, grid.height, grid.width), grid.height, grid.width))
        first = torch.stack(firsts).to(device)
        slots = [VideoMotions(tokens, member, concept) for _ in range(videos)]
        state = transfer_state(slots, self.options, "cross", num_blocks, FEATURE_SHARE, grid.frames)
        schedule = MaskSchedule(state, [first] * videos, grid, self.options, num_blocks)
        return Run(model, grid, state, schedule, videos, text_len)

    @staticmethod
    def assign_rows(run: Run, chunks: list[int], batch: int, device) -> None:
        """Which video each batch row is (ComfyUI stacks ``cond_or_uncond``'s chunks of all videos),
        and the rows RMPM reads (the first conditional chunk's; none in a call of only unconditional)."""
        key = (tuple(chunks), batch)
        if key not in run._rows:
            per = batch // len(chunks)
            if per != run.videos:
                raise FlexiMMTInputError(
                    f"FlexiMMT Apply: {batch} batch rows for {len(chunks)} conditionings and {run.videos} videos"
                )
            rows = [v for _ in chunks for v in range(per)]
            feature = [chunks.index(0) * per + v for v in range(per)] if 0 in chunks else None
            index = None if feature is None else torch.tensor(feature, device=device)  # made once, not per block
            run._rows[key] = rows, feature, index
        rows, feature, index = run._rows[key]
        run.state.rows, run.state.feature_rows, run.feature_index = rows, feature, index


def apply_fleximmt(
    model,
    clip,
    prompt: str,
    objects: tuple | None,
    expert: str = "auto",
    mask_source: str = "rmpm",
    rmpm_method: str = "paper",
    anchors: int = 3,
    alpha: float = 0.0,
    initial_masks: str = "first_frame",
    parts: tuple[str, ...] = CROSS_PARTS,
    attention_backend: str = "auto",
):
    """A clone of ComfyUI's Wan ``model`` (a ModelPatcher) that samples with FlexiMMT: ``objects`` (the
    *Object* nodes' list) move with their motions, their motion words found in ``prompt`` as ``clip``
    tokenises it. ``alpha`` 0 updates RMPM's masks every step."""
    import comfy.ldm.wan.model as wan

    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if type(diffusion_model) is not wan.WanModel:
        name = type(diffusion_model).__name__
        raise FlexiMMTInputError(
            f"FlexiMMT Apply patches ComfyUI's Wan 2.1 / 2.2 models (WanModel); this MODEL is a "
            f"{name}: load a Wan image-to-video model with Load Diffusion Model"
        )
    objects = tuple(objects or ())
    if expert not in EXPERTS:
        raise FlexiMMTInputError(f"expert={expert!r}: choose from {list(EXPERTS)}")
    index = 0 if expert == "auto" else EXPERTS.index(expert) - 1
    for k, obj in enumerate(objects, 1):
        with about_object(k):
            obj.motion.check_model(
                len(diffusion_model.blocks),
                diffusion_model.dim,
                family="wan",
                experts=obj.motion.num_experts,
                source=f"object {k}",
                family_name=family_name,
            )
            if expert == "auto" and obj.motion.num_experts > 1:
                raise FlexiMMTInputError(
                    f"the motion holds {obj.motion.num_experts} experts' tokens (Wan 2.2 A14B): "
                    "set expert to 1 on the high-noise model, 2 on the low-noise model"
                )
            if index >= obj.motion.num_experts:
                raise FlexiMMTInputError(
                    f"the motion has one expert's tokens; expert={expert!r} needs a two-expert "
                    "motion (Wan 2.2 A14B): use expert 'auto'"
                )
    if mask_source not in MASK_SOURCES:
        raise FlexiMMTInputError(f"mask_source={mask_source!r}: choose from {list(MASK_SOURCES)}")
    options = TransferOptions(
        objects,
        mask_source,
        rmpm_method,
        anchors,
        alpha if alpha else None,
        None,
        parts,
        "open",
        attention_backend,
        False,
        initial_masks,
    )
    from ...models.wan import WanAdapter

    options.check(WanAdapter)
    spans = concept_spans = None
    if objects:
        ids = clip_token_ids(clip, prompt)
        encode = lambda phrase: clip_phrase_ids(clip, phrase)
        spans = object_token_spans(ids, [obj.motion_text for obj in objects], encode, prompt, len(ids))
        if mask_source == "qk":
            concepts = [o.concept_text or o.motion_text for o in objects]
            concept_spans = object_token_spans(ids, concepts, encode, prompt, len(ids))
    patched = model.clone()
    WanPatch(objects, spans or [], concept_spans, index, options).install(patched)
    return patched


class ApplyFlexiMMT(io.ComfyNode):
    """FlexiMMT Apply (Wan): patch a Wan MODEL so that any sampler moves each object with its own motion."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexiMMTApply",
            display_name="FlexiMMT Apply (Wan)",
            category=CATEGORY,
            description="FlexiMMT on ComfyUI's own Wan model: motion tokens and MDMA in its cross-attention, RMPM "
            "masks from its self-attention, for any sampler. Works with LoRA and fp8 models as loaded; GGUF "
            "models (ComfyUI-GGUF) are untested.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="A Wan 2.1 / 2.2 model from ComfyUI's loaders (LoRAs already applied)."
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The text encoder of the prompt (umT5): its tokenizer finds each object's motion words.",
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip="The positive prompt, exactly as given to CLIP Text Encode, with each object's "
                    "motion words in it.",
                ),
                OBJECTS.Input("objects", tooltip="The objects (chain FlexiMMT Object nodes), object 1 first."),
                io.Combo.Input(
                    "expert",
                    options=list(EXPERTS),
                    default="auto",
                    tooltip="Wan 2.2 A14B: 1 on the high-noise model, 2 on the low-noise model; auto for "
                    "one-expert motions.",
                ),
                mask_source_input(),
                *rmpm_inputs(optional=True),
            ],
            outputs=[io.Model.Output("model_out", display_name="model")],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        prompt,
        objects,
        expert="auto",
        mask_source="rmpm",
        rmpm_method="paper",
        anchors=3,
        alpha=0.0,
        initial_masks="first_frame",
    ) -> io.NodeOutput:
        return io.NodeOutput(
            apply_fleximmt(
                model, clip, prompt, objects, expert, mask_source, rmpm_method, anchors, alpha, initial_masks
            )
        )


NODES = [ApplyFlexiMMT]
