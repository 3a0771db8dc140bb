"""What the native patch does the same on every family: one sampling run's bookkeeping, written once.

A :class:`NativePatch` holds the objects and the options of one *FlexiMMT Apply* node and the
functions ComfyUI calls, registered on a clone of the MODEL through ComfyUI's patch points only:

- a ``DIFFUSION_MODEL`` wrapper sees every model call: it makes the run's state on the first (the
  token grid from the latent, the motion words' rows), tells which batch rows are which video and
  which carry the conditional branch (``cond_or_uncond``), and when the noise level changes - a new
  evaluation - ends the last step: RMPM's masks from the features captured during it
  (``pipeline.MaskSchedule``, as in fleximmt's own pipelines);
- ``optimized_attention_override`` sees every attention call of the model; a call made inside a
  block is handed, with the block's number and the call's kind, to the family
  (:class:`fleximmt.apps.comfy.native.family.Family`), which computes it;
- how a call learns its block is the family's: a ``dit`` / ``double_block`` replacement per block
  where the model has that hook, or the calls counted in the order the blocks make them;
- an ``OUTER_SAMPLE`` wrapper starts every sampling run from the first-frame masks.

ComfyUI may move, cast or re-create the model's weights between calls (dynamic VRAM, LoRA patching,
a fresh clone): the patch holds no weight and no module, only the motion tokens (on the CPU) and
per-run masks; every module it uses is looked up on the model of the current call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ....errors import FlexiMMTInputError
from ....method.adapter import TokenGrid
from ....method.attention import FlexiMMTState
from ....method.masks import mask_to_token_grid
from ....method.pipeline import MaskSchedule, TransferOptions, VideoObjects, build_transfer
from ....method.tokens import TextKeys

KEY = "fleximmt"  # transformer_options[KEY]: the run during a model call; the wrappers' and callbacks' key
CALLS_KEY = "fleximmt_calls"  # transformer_options[CALLS_KEY]: the attention calls still to come (Calls)


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


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool attention mask (True: may attend; the dense kernel's) as the additive float mask every ComfyUI
    attention function takes (its split and sub-quadratic attentions add the mask to the scores); a float
    mask or None as it is. Every row keeps a key (MDMA's rule), so no row is all -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


@dataclass
class Calls:
    """Attention calls still to come, as ``(block, kind)`` in the order the model makes them: one
    block's (given by its replacement) or a whole forward's (a family whose blocks have no hook)."""

    order: list[tuple[int, str]]
    made: int = 0

    def next(self) -> tuple[int, str]:
        if self.made >= len(self.order):
            raise FlexiMMTInputError(
                f"FlexiMMT Apply: the model made more than the {len(self.order)} attention calls its blocks make; "
                "another patch adds attention calls FlexiMMT cannot place: remove it or the FlexiMMT patch"
            )
        self.made += 1
        return self.order[self.made - 1]


@dataclass
class Call:
    """One model call as the family reads it: the latent, the text and the rows' text forms."""

    x: torch.Tensor
    prompt_len: int  # the prompt's tokens in this call's text (each row's prompt part)
    texts: list[TextKeys]  # each row's text keys: where the prompt's tokens sit, where padding starts
    features: bool = True  # whether RMPM reads this call's conditional rows (not in a guidance pass of its own)


@dataclass
class Run:
    """One sampling run of the patched model: its state, its masks' schedule and where it stands."""

    model: torch.nn.Module  # ComfyUI's diffusion model of this run
    grid: TokenGrid
    state: FlexiMMTState
    schedule: MaskSchedule | None  # None while motion tokens train (DMEM makes the masks in every block)
    videos: int
    expert: int = 0  # which of the state's token sets this model's blocks take (Wan 2.2 A14B training: 0 or 1)
    sigma: float | None = None
    steps: int = 0
    feature_index: torch.Tensor | None = None
    texts: list[TextKeys] | None = None  # this call's rows' text forms
    _rows: dict = field(default_factory=dict)

    def observe(self, index: int, features) -> None:
        """RMPM's features of block ``index`` when it captures: ``features(rows)`` gives the video
        tokens' features ``[len(rows), N_v, D]`` of the conditional rows (the family's read)."""
        if self.state.capturing(index):
            rows = self.feature_index
            self.state.observe(index, features(rows), rows=list(range(len(rows))))


class NativePatch:
    """FlexiMMT for one ComfyUI MODEL: the objects, their motion words' token spans, the options, the
    family that knows the model's attention, and the patch functions ComfyUI calls."""

    def __init__(
        self,
        family,
        objects: tuple,
        spans: list[list[int]],
        concept_spans: list[list[int]] | None,
        prompt_len: int,
        options: TransferOptions,
        expert: int = 0,
    ) -> None:
        self.family, self.objects, self.spans, self.concept_spans = family, objects, spans, concept_spans
        self.prompt_len, self.options, self.expert = prompt_len, options, expert
        self.run: Run | None = None
        self.previous_blocks: dict[int, object] = {}
        self.previous_override = None

    def __deepcopy__(self, memo) -> NativePatch:
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
        if self.family.block_hook:
            replaced = options.get("patches_replace", {}).get("dit", {})
            for index in range(len(self.family.blocks(patcher.model.diffusion_model))):
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

    def diffusion_model(self, executor, *args, **kwargs):
        if not self.active():
            return executor(*args, **kwargs)
        model = executor.class_obj
        bound = inspect.signature(model._forward).bind(*args, **kwargs)
        arguments = bound.arguments
        options = dict(arguments.get("transformer_options") or {})
        call = self.family.read_call(model, arguments)
        options[KEY] = self.call_run(model, call, options)
        if not self.family.block_hook:  # the blocks make their calls in order, one forward at a time
            options[CALLS_KEY] = Calls([c for i in range(len(self.family.blocks(model))) for c in self.kinds(model, i)])
        arguments["transformer_options"] = options
        return executor(*bound.args, **bound.kwargs)

    def active(self) -> bool:
        """Whether model calls run with FlexiMMT (without objects the patch is ComfyUI's model exactly)."""
        return bool(self.objects)

    def call_run(self, model, call: Call, options: dict) -> Run:
        """The run a model call belongs to, its rows assigned: the sampling run's, whose step ends when
        the noise level changes (a subclass, the training patch, gives its own)."""
        chunks = list(options.get("cond_or_uncond") or [0])
        if 0 in chunks and call.prompt_len != self.prompt_len:
            raise FlexiMMTInputError(
                f"FlexiMMT Apply: the conditional text has {call.prompt_len} tokens in this model call, the "
                f"prompt given to FlexiMMT Apply {self.prompt_len}: give FlexiMMT Apply the prompt of the positive "
                "text encode node exactly; and when positive and negative prompts differ in length, ComfyUI "
                "repeats their tokens to batch them, which FlexiMMT's masks do not cover (make the negative "
                "prompt shorter than the model's minimum text length, or the positive one as long as the negative)"
            )
        run = self.run_for(model, call, len(chunks))
        sigma = float(options["sigmas"].max()) if "sigmas" in options else None
        if run.sigma is not None and sigma != run.sigma:  # a new evaluation: the last step is done
            run.schedule.step_end(run.steps)
            run.steps += 1
        run.sigma, run.texts = sigma, call.texts
        self.assign_rows(run, chunks, call.x.shape[0], call.x.device)
        if not call.features:
            run.state.rows.feature_rows, run.feature_index = None, None
        return run

    def block(self, index: int):
        def replace(args, extra):
            options = args["transformer_options"]
            run = options.get(KEY)
            previous = self.previous_blocks.get(index)
            call = lambda args: previous(args, extra) if previous is not None else extra["original_block"](args)
            if run is None:
                return call(args)
            calls = Calls([(index, kind) for kind in self.family.block_kinds(run.model, index, args)])
            with self.family.block_context(run, index):
                return call({**args, "transformer_options": {**options, CALLS_KEY: calls}})

        return replace

    def kinds(self, model, index: int) -> list[tuple[int, str]]:
        return [(index, kind) for kind in self.family.call_kinds(model, index)]

    def attention(self, func, *args, **kwargs):
        previous = self.previous_override
        base = (lambda *a, **kw: previous(func, *a, **kw)) if previous is not None else func
        options = kwargs.get("transformer_options") or {}
        calls, run = options.get(CALLS_KEY), options.get(KEY)
        if calls is None or run is None:
            return base(*args, **kwargs)
        index, kind = calls.next()
        return self.family.attend(run, index, kind, base, *args, **kwargs)

    # -- the run ----------------------------------------------------------------------------
    def run_for(self, model, call: Call, chunks: int) -> Run:
        """This sampling run's state, made at its first model call (again if the latent's shape changes)."""
        grid = self.family.grid(model, call.x)
        videos = max(1, call.x.shape[0] // chunks)
        run = self.run
        if run is not None and run.model is model and run.grid == grid and run.videos == videos:
            return run
        self.run = run = self.new_run(model, grid, videos, call.x.device)
        return run

    def new_run(self, model, grid: TokenGrid, videos: int, device) -> Run:
        """The run's transfer, built as fleximmt's own pipelines build theirs (``pipeline.build_transfer``): every
        video of the batch moves the same objects, their masks cropped as ComfyUI crops the start image; this
        MODEL's expert's tokens; every call names its rows' text keys (``TextKeys``: the prompt's tokens may
        sit after others, or be padded), whatever the family's diffusers processors do."""
        firsts = [
            mask_to_token_grid(center_crop(obj.mask_tensor, grid.height, grid.width), grid.height, grid.width)
            for obj in self.objects
        ]
        video = VideoObjects(self.objects, self.spans, firsts, self.concept_spans)
        num_blocks = len(self.family.blocks(model))
        state, schedule = build_transfer(
            self.family.adapter,
            self.options,
            [video] * videos,
            grid,
            self.prompt_len,
            num_blocks,
            device,
            expert=self.expert,
            text_keys=True,
        )
        return Run(model, grid, state, schedule, videos)

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
        run.state.rows.begin_forward(rows, feature)
        run.feature_index = index
