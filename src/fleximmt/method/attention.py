"""Motion tokens (Eq. 2) and MDMA (Eqs. 3-11) inside attention, for any base model.

Two forms of attention host motion tokens, and each base model's adapter (``fleximmt.models``) uses one
of them:

- **joint**: text and video queries attend over ``[text | motion | video]`` keys (CogVideoX's MM-DiT
  blocks, HunyuanVideo 1.5's). Motion-token queries are never computed: their outputs would be dropped.
- **cross**: video queries attend over ``[text | motion]`` keys (Wan's ``attn2``); the video-video
  attention of such a model stays untouched.

Everything one generation (or one training step) needs in every block lives in :class:`FlexiMMTState`,
which the adapters hand to their attention processors. The state is made of parts of one concern each:
which batch rows are which video (``rows.BatchRows``), RMPM's feature capture (``capture.FeatureCapture``),
the MDMA layouts of each step and block (``layouts.Layouts``), each built and attended by the chosen mask
kernel (``kernels``). Nothing here knows any diffusers model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import opaque
from .capture import FeatureCapture
from .kernels import DEFAULT_KERNEL, Attention, check, mask_kernel, sdpa
from .layouts import Layouts
from .masks import PARTS
from .rows import BatchRows
from .tokens import BlockProcessor, TextKeys, VideoMotions, VideoShard, block_number, block_tokens

logger = logging.getLogger(__name__)

FORMS = ("joint", "cross")


@dataclass
class FlexiMMTState:
    """What the attention processors of every block read during one pipeline call (or one training
    step), for every video of the batch; every setting is given when it is made.

    ``videos`` hold each video's motion tokens and words. The model's adapter says which video each row of
    the transformer's batch belongs to and which rows feed RMPM (``rows``), what its attention form is and
    how its processors name their text keys (``form``, ``text_keys``, ``dmem_video_queries``:
    ``ModelAdapter.state_settings``). Masks are set once per step by :meth:`set_video_masks` (RMPM, static
    or all-open masks), or, with ``dmem=True``, extracted inside every block by DMEM's QK rule (training,
    and the ``mask_source="qk"`` ablation) with a fraction ``dmem_drop`` of positives dropped at random
    (``dmem_drop_exact``: exactly that share, :func:`masks.drop_positives`) (drawn once per step on the CPU
    from ``generator``, so runs repeat on any device).
    """

    videos: list[VideoMotions]
    form: str = "joint"
    parts: frozenset[str] = frozenset(PARTS)
    context_text: str = "open"
    mask_kernel: str = DEFAULT_KERNEL
    num_frames: int = 1  # token frames, for DMEM's per-frame threshold
    dmem: bool = False
    dmem_drop: float = 0.0
    dmem_drop_exact: bool = False  # drop exactly int(dmem_drop x the mask's tokens), at least one (the release)
    generator: torch.Generator | None = None
    feature_blocks: frozenset[int] = frozenset()  # the blocks whose attention outputs feed RMPM
    rows: BatchRows = field(default_factory=BatchRows)
    # the processors name each row's text keys (TextKeys): layouts are built per text form at first use
    text_keys: bool = False
    # joint form, DMEM: score video queries against the concept words' keys (docs/method.md#hunyuanvideo-15)
    # instead of the concept words' queries against the video keys (CogVideoX, docs/method.md#dmem)
    dmem_video_queries: bool = False
    # context parallelism: the video tokens this process's blocks see (None: all of them)
    shard: VideoShard | None = None
    _notes: set = field(default_factory=set, repr=False)
    # how opaque.py's operators find this state inside a compiled graph (auto kernel under torch.compile)
    handle: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form={self.form!r}: choose from {list(FORMS)}")
        self.kernel = mask_kernel(self.mask_kernel)
        shapes = {tuple(v.motion_tokens.shape[:1] + v.motion_tokens.shape[3:4]) for v in self.videos}
        if len(shapes) > 1:
            raise ValueError(f"every video of a batch needs the same number of objects and d_m, got {sorted(shapes)}")
        self.check_shard()
        self.capture = FeatureCapture(len(self.videos), self.feature_blocks, self.shard)
        self.layouts = Layouts(
            self.videos,
            self.form,
            self.kernel,
            self.parts,
            self.context_text,
            self.text_keys,
            self.shard,
            self.num_frames,
            self.dmem,
            self.dmem_drop,
            self.generator,
            self.dmem_drop_exact,
        )
        self.handle = opaque.register(self)

    def check_shard(self) -> None:
        """Only the cross form runs on one share of the video tokens (context parallelism): its masked
        attention has video queries alone, row by row, while a joint attention's video keys would span every
        process. DMEM's per-frame threshold needs every video query of a frame, so ``mask_source="qk"`` and
        motion training do not shard."""
        if self.shard is not None and self.form != "cross":
            raise ValueError(
                f"context parallelism with objects needs the cross form (Wan): this model's attention is "
                f"{self.form!r}, whose video keys every process would need"
            )
        if self.shard is not None and self.dmem:
            raise ValueError(
                "context parallelism with DMEM (mask_source='qk', or training a motion): its per-frame "
                "threshold needs every video token in one process; use mask_source='rmpm' or 'static', "
                "or train without enable_parallelism"
            )

    @property
    def num_objects(self) -> int:
        return self.videos[0].num_objects if self.videos else 0

    @property
    def tokens_per_motion(self) -> int:
        return self.videos[0].motion_tokens.shape[3]

    def note_once(self, message: str) -> None:
        """Log ``message`` as a warning the first time this call (or training run) meets it."""
        if message not in self._notes:
            self._notes.add(message)
            logger.warning(message)

    def set_motion_tokens(self, tokens: torch.Tensor, video: int = 0) -> None:
        """Swap a video's motion tokens ``[K, experts, blocks, d_m, dim]`` (training: each step's parameters)."""
        self.videos[video].motion_tokens = tokens

    def set_video_masks(self, video_masks: torch.Tensor, video: int = 0, parts=None) -> None:
        """Prepare MDMA for the next step from bool ``[K, N_v]`` object masks of one video (``parts``: the
        MDMA parts from now on; None: as they are)."""
        self.layouts.set_video_masks(video_masks, video, parts)

    def begin_step(self, num_video_tokens: int | None = None, num_blocks: int | None = None) -> None:
        """Start a denoising or training step: its first forward comes next, DMEM's masks are drawn anew."""
        self.rows.begin_step()
        self.layouts.begin_step(num_video_tokens, num_blocks)

    # -- RMPM features (captured during the ordinary forward) --------------------------------
    def capturing(self, block: int) -> bool:
        """Whether this forward captures RMPM features in ``block``."""
        return block in self.capture.blocks and self.rows.feature_rows is not None

    def observe(self, block: int | torch.Tensor, video_out: torch.Tensor, rows: list[int] | None = None) -> None:
        """Add a block's per-token video features ``[B, N_v, D]`` to each video's running sum; ``rows``:
        each video's row of ``video_out`` when it holds only the feature rows (default: the forward's feature
        rows). Inside a compiled graph, an opaque operator (``opaque.observe``) does it: which blocks capture
        is no part of the graph."""
        if torch.compiler.is_compiling():
            if self.capture.blocks:  # not the feature rows: a forward with them and one without share a graph
                opaque.observe(self, block, video_out, rows)
            return
        block = block_number(block)
        if self.capturing(block):
            self.capture.add(block, video_out, self.rows.of_batch(video_out.shape[0])[1] if rows is None else rows)

    # -- motion tokens through a block's frozen projections ------------------------------------
    def motion_projections(self, video: int, block: int | torch.Tensor, expert: int, project):
        """A video's motion keys and values for a cross-attention: ``project(tokens, kind)`` maps
        ``[n, dim]`` tokens to ``[1, H, n, d]`` through the block's ``to_k``/``to_v`` (and its key
        norm); kind is "k" or "v"."""
        tokens = block_tokens(self.videos[video].motion_tokens, expert, block)
        tokens = tokens.reshape(-1, tokens.shape[-1])
        return project(tokens, "k"), project(tokens, "v")

    def joint_motion_rows(self, block: int | torch.Tensor, expert: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The motion tokens of each batch row's video for one block, ``[B, K * d_m, dim]`` in ``like``'s
        device and dtype: a joint-attention processor appends them to its hidden states before its
        own projections (and QK-norm; no RoPE), so that they join the keys and values uncopied."""
        videos = self.rows.videos(batch)
        rows = {}
        for video in set(videos):
            tokens = block_tokens(self.videos[video].motion_tokens, expert, block)
            rows[video] = tokens.reshape(-1, tokens.shape[-1]).to(device=like.device, dtype=like.dtype)
        if len(rows) == 1:
            return rows[videos[0]].expand(batch, -1, -1)
        return torch.stack([rows[video] for video in videos])

    # -- the two forms of attention --------------------------------------------------------
    def joint_attention(
        self,
        block: int | torch.Tensor,
        query,
        key,
        value,
        text_len: int,
        attention: Attention = sdpa,
        texts: list[TextKeys] | None = None,
    ) -> torch.Tensor:
        """MDMA attention of text and video queries over text, motion and video keys.

        ``query/key/value`` ``[B, H, N_v + L_y + K * d_m, d]`` are the block's own projections (after
        QK-norm and RoPE) of ``[video | text | motion]`` tokens, the motion rows from
        :meth:`joint_motion_rows`; ``texts``: each row's :class:`TextKeys` (None: the text is the
        prompt's tokens); returns ``[B, H, N_v + L_y, d]`` (a layout's ``attend_video_first``). Inside a
        compiled graph a kernel that says so runs as one opaque operator (``opaque.mdma_joint``)."""
        if self.kernel.opaque_when_compiled and torch.compiler.is_compiling():
            return opaque.mdma_joint(self, block, query, key, value, text_len, texts, attention)
        return self._per_video(
            query,
            key,
            value,
            texts,
            lambda v, t, q, k, val: self._joint_one(v, t, block, q, k, val, text_len, attention),
        )

    def _joint_one(self, video, text, block, query, key, value, text_len, attention):
        row = self.rows.feature_row_within(video, query.shape[0])
        n_video = query.shape[2] - text_len - self.num_objects * self.tokens_per_motion
        words, places = (key, query) if self.dmem_video_queries else (query, key)
        layout = self.layouts.layout(
            video,
            block,
            lambda idx: words[row : row + 1, :, n_video + idx],
            places[row : row + 1, :, :n_video],
            text,
            text_len,
        )
        return layout.attend_video_first(query, key, value, text_len, attention)

    def cross_attention(
        self,
        block: int | torch.Tensor,
        expert: int,
        query,
        key,
        value,
        project,
        attention: Attention = sdpa,
        texts: list[TextKeys] | None = None,
    ) -> torch.Tensor:
        """MDMA cross-attention of video queries ``[B, H, N_v, d]`` over the text's keys/values
        ``[B, H, L_y, d]`` and the motion tokens; returns ``[B, H, N_v, d]`` (``project``: see
        :meth:`motion_projections`; ``texts``: as in :meth:`joint_attention`). Inside a compiled graph a
        kernel that says so runs as one opaque operator (``opaque.mdma_cross``)."""
        if self.kernel.opaque_when_compiled and torch.compiler.is_compiling():
            return opaque.mdma_cross(self, block, expert, query, key, value, project, texts, attention)
        return self.cross_with(
            block,
            query,
            key,
            value,
            lambda video: self.motion_projections(video, block, expert, project),
            attention,
            texts,
        )

    def cross_with(
        self,
        block: int | torch.Tensor,
        query,
        key,
        value,
        motion_of,
        attention: Attention = sdpa,
        texts: list[TextKeys] | None = None,
    ) -> torch.Tensor:
        """:meth:`cross_attention` with each video's motion keys and values given: ``motion_of(video)``
        -> ``[1, H, K * d_m, d]`` twice (already through the block's projections)."""
        return self._per_video(
            query,
            key,
            value,
            texts,
            lambda v, t, q, k, val: self._cross_one(v, t, block, q, k, val, motion_of, attention),
        )

    def _cross_one(self, video, text, block, query, key, value, motion_of, attention):
        row = self.rows.feature_row_within(video, query.shape[0])
        layout = self.layouts.layout(
            video, block, lambda idx: key[row : row + 1, :, idx], query[row : row + 1], text, key.shape[2]
        )
        m_k, m_v = motion_of(video)
        batch = query.shape[0]
        return layout.attend(query, key, value, m_k.expand(batch, -1, -1, -1), m_v.expand(batch, -1, -1, -1), attention)

    def _per_video(self, query, key, value, texts, attend_one) -> torch.Tensor:
        """Attend each video's rows (and text form's) with its layout, after the kernel's constraints."""
        tensors = (query, key, value, *(video.motion_tokens for video in self.videos))
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
        check(self.kernel, query.device, grad)
        groups = self.rows.sets(query.shape[0], texts, self.videos[0].member.device)
        if len(groups) == 1:
            return attend_one(groups[0][0], groups[0][1], query, key, value)
        out = None
        for video, text, rows in groups:
            part = attend_one(
                video, text, query.index_select(0, rows), key.index_select(0, rows), value.index_select(0, rows)
            )
            if out is None:
                _, heads, length, dim = part.shape
                out = part.new_empty(query.shape[0], length, heads, dim).transpose(1, 2)
            out.index_copy_(0, rows, part)
        return out


def motion_state_for(tokens: torch.Tensor, member: torch.Tensor, **kwargs) -> FlexiMMTState:
    """A one-video state from motion tokens ``[K, experts, blocks, d_m, dim]`` and words ``[K, L_y]``."""
    concept = kwargs.pop("concept_member", None)
    index = None if concept is None else [row.nonzero().squeeze(1) for row in concept]
    return FlexiMMTState(videos=[VideoMotions(tokens, member, index)], **kwargs)


__all__ = [
    "FORMS",
    "BlockProcessor",
    "FlexiMMTState",
    "TextKeys",
    "VideoMotions",
    "VideoShard",
    "motion_state_for",
]
