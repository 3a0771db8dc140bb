"""Motion tokens (Eq. 2) and MDMA (Eqs. 3-11) inside attention, for any base model.

Two forms of attention host motion tokens, and each base model's adapter (``fleximmt.models``)
uses one of them:

- **joint**: text and video queries attend over ``[text | motion | video]`` keys (CogVideoX's
  MM-DiT blocks). Motion-token queries are never computed: their outputs would be dropped.
- **cross**: video queries attend over ``[text | motion]`` keys (Wan's ``attn2``); the video-video
  attention of such a model stays untouched.

Both have an exact fast backend ("auto": video queries grouped by the objects they belong to, no
N x N mask; docs/method.md#attention-without-an-n-x-n-mask) and a dense reference ("dense"). Everything one generation (or one
training step) needs in every block lives in :class:`FlexiMMTState`; the adapters hand it to their
attention processors. Nothing here knows any diffusers model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import opaque
from .masks import (
    PARTS,
    code_masks,
    dmem_mask,
    drop_positives,
    group_keys,
    mdma_cross_dense,
    mdma_dense,
    mdma_text_rows,
    video_codes,
    video_groups,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "dense", "flex")
FORMS = ("joint", "cross")
# Video groups smaller than this run together in one masked SDPA call with the text queries (small
# query blocks are slow, on a CPU especially); their mask rows are capped so it never nears N x N.
MERGE_BELOW, MERGE_CAP = 768, 2048
# Layouts built inside every block (DMEM's) pad their group query counts up to a multiple of this,
# per device type. On CUDA, SDPA's cuDNN backend builds an execution plan for every new shape (15-20 ms
# of CPU each, measured on an H200: `benchmarks/gpu.py --profile`), and DMEM's group sizes change in
# every block, where its one synchronisation keeps the CPU from running ahead: without buckets a
# training step took 3.4x the plain one, with them 1.15x. The padded rows repeat a real query and
# their outputs are dropped (no gradient reaches them). A step's layout (RMPM's) is not padded: its
# blocks share one shape, the few plans it builds overlap the GPU's work, and padding measured 1.6%
# slower there. Elsewhere no plan is built and padding would only cost time.
QUERY_BUCKETS = {"cuda": 256}


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's SDPA over ``[B, H, N, d]``: the default ``attention`` of every call below. An adapter
    passes its own (diffusers' dispatcher with the user's backend, ComfyUI's attention function), taking
    the same arguments; ``mask`` (bool, or SDPA's additive float mask) only in the calls that need one."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


Attention = Callable[..., torch.Tensor]  # (query, key, value, mask=None) -> out, all [B, H, N, d]


class FlexMask(NamedTuple):
    """MDMA as FlexAttention's ``BlockMask`` (the "flex" backend): a small ``table`` over token classes
    (each video token's object combination, each text and motion token its own) and every token's
    class, for queries and keys; ``mask_mod`` reads ``table[q_class[q], k_class[k]]``. No N x N tensor:
    the block mask keeps one bit per 128 x 128 block, plus the table."""

    table: torch.Tensor
    q_class: torch.Tensor
    k_class: torch.Tensor

    def block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        table, q_class, k_class = self.table, self.q_class, self.k_class

        def mask_mod(b, h, q, k):
            return table[q_class[q], k_class[k]]

        return create_block_mask(mask_mod, None, None, q_class.numel(), k_class.numel(), device=table.device)


_COMPILED_FLEX = {}


def flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention over ``[B, H, N, d]``, compiled once per process (torch runs it compiled only; on a
    CPU torch has its forward and no backward: training with "flex" needs a GPU)."""
    if torch.is_grad_enabled() and query.device.type == "cpu" and any(x.requires_grad for x in (query, key, value)):
        raise ValueError("attention_backend='flex' has no backward on a CPU (torch's FlexAttention): train with 'auto'")
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside the caller's graph: compiled with it
        fn = flex_attention
    else:
        fn = _COMPILED_FLEX.get("fn") or _COMPILED_FLEX.setdefault("fn", torch.compile(flex_attention, dynamic=False))
    # contiguous inputs: inductor's FlexAttention lowering misreads some views' ranks (seen on Wan's attn2)
    return fn(query.contiguous(), key.contiguous(), value.contiguous(), block_mask=block_mask)


def padded_queries(queries: torch.Tensor, pad: bool) -> torch.Tensor:
    """``queries`` (a 1-D index, not empty), when ``pad``, with its first index repeated up to the device's bucket."""
    bucket = QUERY_BUCKETS.get(queries.device.type, 1) if pad else 1
    extra = -queries.numel() % bucket
    return torch.cat([queries, queries[:1].expand(extra)]) if extra else queries


class QueryGroup(NamedTuple):
    """Video queries that read the same keys besides video: their index (padded, see ``QUERY_BUCKETS``,
    unless the group is every video query), how many of them are real, and the keys. ``chained``
    (joint form): the keys are a prefix of the layout's key buffer tail, read as a slice."""

    queries: torch.Tensor
    count: int
    keys: torch.Tensor
    chained: bool = False

    @classmethod
    def of(
        cls, queries: torch.Tensor, num_video: int, keys: torch.Tensor, chained: bool = False, pad: bool = False
    ) -> QueryGroup:
        count = queries.numel()
        return cls(queries if count == num_video else padded_queries(queries, pad), count, keys, chained)


def chain_order(key_sets: list[tuple[int, ...]], num_small: int) -> tuple[list[int], list[bool]]:
    """An order of the ``num_small`` text and motion keys in which as many key sets as possible are
    prefixes (sets nested in one another), and for each set whether it is one. A group whose keys
    are a prefix reads a slice of one shared key buffer: no copy, nothing rewritten."""
    order: list[int] = []
    prefix: set[int] = set()
    in_chain = [False] * len(key_sets)
    for i in sorted(range(len(key_sets)), key=lambda i: len(key_sets[i])):
        keys = set(key_sets[i])
        if prefix <= keys:
            order += sorted(keys - prefix)
            prefix = keys
            in_chain[i] = True
    order += [k for k in range(num_small) if k not in prefix]
    return order, in_chain


@dataclass
class JointLayout:
    """MDMA of one video for a joint text-video attention, in the form the backend needs; built
    once per denoising step (or once per block when DMEM extracts masks inside attention)."""

    member: torch.Tensor  # bool [K, L_y]: Y_mo^k
    tokens_per_motion: int
    video_masks: torch.Tensor  # bool [K, N_v]: V^k
    parts: frozenset[str]
    context_text: str
    backend: str = "auto"
    key_cache: dict | None = None
    pad_queries: bool = False  # a layout built in every block (DMEM): see QUERY_BUCKETS
    text_valid: torch.Tensor | None = None  # bool [L_y]: the text keys that are not padding (None: all)
    # auto: keys live in one buffer [video | text and motion keys in `order`]; one masked call for the
    # text queries and the merged small video groups (rows over that buffer); every other group reads
    # the first `n_video + len(keys)` keys when its keys are a prefix of `order` (`prefix`), else gathers them
    order: torch.Tensor | None = None
    masked_rows: torch.Tensor | None = None
    text_queries: torch.Tensor | None = None  # with padded text: the valid text queries (padded ones output 0)
    masked_queries: torch.Tensor | None = None  # the merged video queries (padded, see QUERY_BUCKETS)
    num_merged: int = 0  # how many of them are real
    groups: list[QueryGroup] = field(default_factory=list)
    dense: torch.Tensor | None = None  # dense: bool [N, N] over [text | motion | video]
    flex_mask: object | None = None  # flex: FlexAttention's BlockMask over [video | text | motion]
    # masked_rows as SDPA's additive float mask, per (dtype, device): made at the layout's first call
    # instead of by SDPA in every block's call (0-3% faster on this CPU: `benchmarks/overhead.py --attention`)
    biases: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        args = (self.member, self.tokens_per_motion, self.video_masks, self.parts, self.context_text)
        valid = self.text_valid
        if self.backend in ("dense", "flex"):
            spans = [row.nonzero().squeeze(1).tolist() for row in self.member.cpu()]
            if self.backend == "dense":
                self.dense = mdma_dense(self.member.shape[1], spans, *args[1:], text_valid=valid)
            else:  # the mask over one stand-in video token per object combination, [text | motion | codes]
                num_objects, text_len = self.member.shape
                device, small = self.video_masks.device, text_len + num_objects * self.tokens_per_motion
                table = mdma_dense(
                    text_len,
                    spans,
                    self.tokens_per_motion,
                    code_masks(num_objects, device),
                    *args[3:],
                    text_valid=valid,
                )
                classes = torch.cat([small + video_codes(self.video_masks), torch.arange(small, device=device)])
                self.flex_mask = FlexMask(table, classes, classes).block_mask()
            return
        device = self.video_masks.device
        num_video = self.video_masks.shape[1]
        if valid is not None:  # a padded text query's output reaches nobody (its key is closed): not computed
            self.text_queries = valid.to(device).nonzero().squeeze(1)
        text_rows = mdma_text_rows(*args, text_valid=valid, queries=self.text_queries)
        small = text_rows.shape[1] - num_video
        merged, large, budget = [], [], min(MERGE_CAP, num_video // 2)
        groups = video_groups(*args, key_cache=self.key_cache, text_valid=valid)
        for queries, keys, key_tuple in sorted(groups, key=lambda g: g[0].numel()):
            if queries.numel() < MERGE_BELOW and queries.numel() <= budget:
                budget -= queries.numel()
                merged.append((queries, keys))
            else:
                large.append((queries, keys, key_tuple))
        cache = {} if self.key_cache is None else self.key_cache
        config = ("order", tuple(t for _, _, t in large), small)
        if config not in cache:  # the buffer's key order, kept for the next block or step with these groups
            order, in_chain = chain_order(list(config[1]), small)
            order = torch.tensor(order, dtype=torch.long, device=device)
            position = torch.empty(small, dtype=torch.long, device=device)
            position[order] = torch.arange(small, device=device)
            cache[config] = (order, position, in_chain)
        self.order, position, in_chain = cache[config]
        self.groups = [
            QueryGroup.of(q, num_video, k if chained else position[k], chained, self.pad_queries)
            for (q, k, _), chained in zip(large, in_chain)
        ]
        rows = [torch.cat([text_rows[:, small:], text_rows[:, :small][:, self.order]], dim=1)]
        for queries, keys in merged:
            row = torch.zeros(small, dtype=torch.bool, device=device)
            row[keys] = True
            video = torch.ones(num_video, dtype=torch.bool, device=device)
            rows.append(torch.cat([video, row[self.order]])[None].expand(queries.numel(), -1))
        self.masked_queries = self.video_masks.new_zeros(0, dtype=torch.long)
        if merged:
            real = torch.cat([q for q, _ in merged])
            self.num_merged, self.masked_queries = real.numel(), padded_queries(real, self.pad_queries)
            rows.append(rows[-1][-1:].expand(self.masked_queries.numel() - real.numel(), -1))  # the padded rows'
        self.masked_rows = torch.cat(rows)

    def attend(self, query, key, value, m_q, m_k, m_v, text_len: int, attention: Attention = sdpa) -> torch.Tensor:
        """``query/key/value`` ``[B, H, L_y + N_v, d]`` (the block's own, after QK-norm and RoPE),
        ``m_*`` the motion tokens' ``[B, H, K * d_m, d]``; returns ``[B, H, L_y + N_v, d]``. The
        layout diffusers' processor has; a processor that builds its tokens video first calls
        :meth:`attend_video_first` and copies nothing."""
        if self.backend == "dense":
            return self._attend_dense(query, key, value, m_q, m_k, m_v, text_len, attention)
        n_video = query.shape[2] - text_len
        if self.backend == "flex":
            out = self.attend_video_first(
                *(
                    torch.cat([x[:, :, text_len:], x[:, :, :text_len], m], dim=2)
                    for x, m in ((query, m_q), (key, m_k), (value, m_v))
                ),
                text_len,
            )
            return torch.cat([out[:, :, n_video:], out[:, :, :n_video]], dim=2)
        out = self._attend_grouped(
            torch.cat([query[:, :, text_len:], query[:, :, :text_len]], dim=2),
            torch.cat([key[:, :, text_len:], key[:, :, :text_len], m_k], dim=2),
            torch.cat([value[:, :, text_len:], value[:, :, :text_len], m_v], dim=2),
            text_len,
            attention,
        )
        return torch.cat([out[:, :, n_video:], out[:, :, :n_video]], dim=2)

    def attend_video_first(self, query, keys, values, text_len: int, attention: Attention = sdpa) -> torch.Tensor:
        """The same attention over tokens laid out ``[video | text | motion]``: ``keys/values``
        ``[B, H, N_v + L_y + K * d_m, d]``, ``query`` the same (its motion rows are never attended
        with: their outputs would be dropped). Returns ``[B, H, N_v + L_y, d]``, stored as
        ``[B, N_v + L_y, H, d]`` (what the block's output projection reads). The auto backend
        reorders the text and motion rows of ``keys`` and ``values`` in place into its key buffer
        (``order``): the video keys are never copied."""
        if self.backend == "auto":
            return self._attend_grouped(query, keys, values, text_len, attention)
        n_video = self.video_masks.shape[1]
        if self.backend == "flex":  # one call over every token; the motion rows' outputs are dropped
            return flex(query, keys, values, self.flex_mask)[:, :, : n_video + text_len]
        text = slice(n_video, n_video + text_len)
        motion = slice(n_video + text_len, None)
        out = self._attend_dense(
            *(torch.cat([x[:, :, text], x[:, :, :n_video]], dim=2) for x in (query, keys, values)),
            query[:, :, motion],
            keys[:, :, motion],
            values[:, :, motion],
            text_len,
            attention,
        )
        batch, heads, _, dim = out.shape
        first = out.new_empty(batch, out.shape[2], heads, dim).transpose(1, 2)
        first[:, :, :n_video], first[:, :, n_video:] = out[:, :, text_len:], out[:, :, :text_len]
        return first

    def _attend_dense(self, query, key, value, m_q, m_k, m_v, text_len: int, attention: Attention) -> torch.Tensor:
        q = torch.cat([query[:, :, :text_len], m_q, query[:, :, text_len:]], dim=2)
        k = torch.cat([key[:, :, :text_len], m_k, key[:, :, text_len:]], dim=2)
        v = torch.cat([value[:, :, :text_len], m_v, value[:, :, text_len:]], dim=2)
        out = attention(q, k, v, self.dense)
        motion_end = text_len + m_k.shape[2]
        return torch.cat([out[:, :, :text_len], out[:, :, motion_end:]], dim=2)

    def masked_bias(self, like: torch.Tensor) -> torch.Tensor:
        """``masked_rows`` as the float mask SDPA makes of a bool one (0 where allowed, -inf elsewhere),
        in ``like``'s dtype and device, made once per layout."""
        key = (like.dtype, like.device)
        if key not in self.biases:
            rows = self.masked_rows.to(like.device)
            self.biases[key] = torch.zeros(rows.shape, dtype=like.dtype, device=like.device).masked_fill_(
                ~rows, float("-inf")
            )
        return self.biases[key]

    def _attend_grouped(self, query, keys, values, text_len: int, attention: Attention) -> torch.Tensor:
        """``attend_video_first``'s auto backend (``keys``/``values`` rewritten in place)."""
        n_video = self.video_masks.shape[1]
        # the key buffer [video | text and motion in `order`]: only the few text and motion rows move
        small_k = keys[:, :, n_video:].index_select(2, self.order)
        small_v = values[:, :, n_video:].index_select(2, self.order)
        keys[:, :, n_video:], values[:, :, n_video:] = small_k, small_v
        batch, heads, _, dim = query.shape
        out = query.new_empty(batch, n_video + text_len, heads, dim).transpose(1, 2)
        video_q = query[:, :, :n_video]
        merged, num_merged = self.masked_queries, self.num_merged
        # the text queries' own rows (a view would keep the whole query alive for the backward pass)
        text_q, texts = self.text_queries, text_len
        if text_q is None:
            masked_q = query[:, :, n_video : n_video + text_len].contiguous()
        else:
            masked_q, texts = query[:, :, n_video : n_video + text_len].index_select(2, text_q), text_q.numel()
        if num_merged:
            masked_q = torch.cat([masked_q, video_q.index_select(2, merged)], dim=2)
        masked_out = attention(masked_q, keys, values, self.masked_bias(query))
        if text_q is None:
            out[:, :, n_video:] = masked_out[:, :, :text_len]
        else:
            out[:, :, n_video:] = 0
            out[:, :, n_video:].index_copy_(2, text_q, masked_out[:, :, :texts])
        video_out = out[:, :, :n_video]  # a view taken after `out` joined the autograd graph
        if num_merged:
            video_out.index_copy_(2, merged[:num_merged], masked_out[:, :, texts : texts + num_merged])
        # groups whose keys are a prefix of the buffer's tail read a slice of it; the others come last:
        # without gradients they overwrite the tail in place, with gradients they gather their own keys
        for queries, count, small, chained in sorted(self.groups, key=lambda g: not g.chained):
            if chained:
                group_k, group_v = keys[:, :, : n_video + small.numel()], values[:, :, : n_video + small.numel()]
            elif torch.is_grad_enabled():
                group_k = torch.cat([keys[:, :, :n_video], small_k.index_select(2, small)], dim=2)
                group_v = torch.cat([values[:, :, :n_video], small_v.index_select(2, small)], dim=2)
            else:
                end = n_video + small.numel()
                keys[:, :, n_video:end] = small_k.index_select(2, small)
                values[:, :, n_video:end] = small_v.index_select(2, small)
                group_k, group_v = keys[:, :, :end], values[:, :, :end]
            if count == n_video:
                video_out.copy_(attention(video_q, group_k, group_v))
            else:
                group_out = attention(video_q.index_select(2, queries), group_k, group_v)
                video_out.index_copy_(2, queries[:count], group_out[:, :, :count])
        return out


@dataclass
class CrossLayout:
    """MDMA of one video for a cross-attention of video queries over ``[text | motion]`` keys."""

    member: torch.Tensor  # bool [K, L_y]
    tokens_per_motion: int
    video_masks: torch.Tensor  # bool [K, N_v]
    parts: frozenset[str]
    context_text: str = "open"
    backend: str = "auto"
    key_cache: dict | None = None
    pad_queries: bool = False  # a layout built in every block (DMEM): see QUERY_BUCKETS
    text_valid: torch.Tensor | None = None  # bool [L_y]: the text keys that are not padding (None: all)
    groups: list[QueryGroup] = field(default_factory=list)
    dense: torch.Tensor | None = None  # bool [N_v, L_y + K * d_m]
    flex_mask: object | None = None  # flex: FlexAttention's BlockMask [N_v, L_y + K * d_m]

    def __post_init__(self) -> None:
        valid = self.text_valid
        if self.backend == "dense":
            self.dense = mdma_cross_dense(self.member, self.tokens_per_motion, self.video_masks, self.parts, valid)
            return
        if self.backend == "flex":  # rows of one stand-in video token per object combination
            num_objects, text_len = self.member.shape
            device = self.video_masks.device
            table = mdma_cross_dense(
                self.member.to(device), self.tokens_per_motion, code_masks(num_objects, device), self.parts, valid
            )
            keys = torch.arange(text_len + num_objects * self.tokens_per_motion, device=device)
            self.flex_mask = FlexMask(table, video_codes(self.video_masks), keys).block_mask()
            return
        text_len = self.member.shape[1]
        for queries, keys, _ in video_groups(
            self.member,
            self.tokens_per_motion,
            self.video_masks,
            self.parts,
            self.context_text,
            key_cache=self.key_cache,
            text_valid=valid,
        ):
            if keys.numel() == 0:  # nothing left to read: the whole (valid) text (mdma_cross_dense's rule)
                keys = torch.arange(text_len, device=keys.device)
                if valid is not None:
                    keys = keys[valid.to(keys.device)]
            self.groups.append(QueryGroup.of(queries, self.video_masks.shape[1], keys, pad=self.pad_queries))

    def attend(self, query, key, value, m_k, m_v, attention: Attention = sdpa) -> torch.Tensor:
        """``query`` ``[B, H, N_v, d]``, ``key/value`` ``[B, H, L_y, d]`` (the text's), ``m_*`` the
        motion tokens' ``[B, H, K * d_m, d]``; returns ``[B, H, N_v, d]``."""
        keys, values = torch.cat([key, m_k], dim=2), torch.cat([value, m_v], dim=2)
        if self.backend == "dense":
            return attention(query, keys, values, self.dense)
        if self.backend == "flex":
            return flex(query, keys, values, self.flex_mask)
        if len(self.groups) == 1 and self.groups[0].count == query.shape[2]:
            small = self.groups[0].keys
            return attention(query, keys.index_select(2, small), values.index_select(2, small))
        out = query.new_empty(query.shape)
        for queries, count, small, _ in self.groups:
            group_out = attention(
                query.index_select(2, queries), keys.index_select(2, small), values.index_select(2, small)
            )
            out.index_copy_(2, queries[:count], group_out[:, :, :count])
        return out


LAYOUTS = {"joint": JointLayout, "cross": CrossLayout}


class BlockProcessor:
    """An attention processor of one transformer block (``block_index``). What it hands the state's
    methods as its block is :attr:`block`: the index, or inside a compiled graph the same index as a
    one-element tensor (``block_tensor``), so that every block traces to one graph. As an int it would be
    a constant of each block's graph: regional compilation (``fleximmt.compile``) would compile every
    block anew, and a model of more blocks than dynamo's ``recompile_limit`` (8; CogVideoX-5B has 42)
    would not compile with ``fullgraph``. Inside the graph the tensor selects the block's motion tokens;
    the state's operators (``opaque.py``) read it back as an int."""

    def __init__(self, block_index: int) -> None:
        self.block_index = block_index
        self.block_tensor = torch.tensor([block_index])

    @property
    def block(self) -> int | torch.Tensor:
        return self.block_tensor if torch.compiler.is_compiling() else self.block_index


def block_number(block: int | torch.Tensor) -> int:
    """A block (see :class:`BlockProcessor`) as an int, outside a compiled graph."""
    return int(block.item()) if isinstance(block, torch.Tensor) else block


def block_tokens(tokens: torch.Tensor, expert: int, block: int | torch.Tensor) -> torch.Tensor:
    """One block's motion tokens ``[K, d_m, dim]`` of ``[K, experts, blocks, d_m, dim]``; a tensor
    ``block`` selects them in the graph (the same graph for every block). The block tensor stays on the
    CPU, where the operators read it without a device sync; its copy to the tokens' device is
    ``non_blocking`` (a blocking host-to-device copy would synchronise the stream in every block)."""
    if isinstance(block, torch.Tensor):
        return tokens[:, expert].index_select(1, block.to(tokens.device, non_blocking=True)).squeeze(1)
    return tokens[:, expert, block]


class TextKeys(NamedTuple):
    """Where a batch row's prompt tokens sit among the ``L`` text keys its attention gets, for a model
    whose text is more than the prompt (HunyuanVideo 1.5: image and glyph tokens first, then the prompt,
    then padding; docs/method.md#hunyuanvideo-15): the prompt's first token at ``offset``, padding from ``valid``
    on (closed to every query). A processor that passes none attends the prompt's tokens as ``member``
    counts them (CogVideoX, Wan)."""

    offset: int = 0
    valid: int | None = None

    def place(self, member: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``member`` ``[K, L_m]`` among ``text_len`` keys (motion words in padding dropped: padding is never
        a motion word) and the keys that are not padding (bool ``[text_len]``, None: all)."""
        num_objects, length = member.shape
        placed = member.new_zeros(num_objects, text_len)
        count = max(0, min(length, text_len - self.offset))
        placed[:, self.offset : self.offset + count] = member[:, :count]
        if self.valid is None:
            return placed, None
        valid = torch.arange(text_len, device=member.device) < self.valid
        return placed & valid, valid


class VideoShard(NamedTuple):
    """This process's share of the video tokens under context parallelism (diffusers'
    ``enable_parallelism``): tokens ``[start, stop)`` of every batch row are here, the other processes of
    ``group`` hold the rest (``sizes``: each process's count, in rank order). A cross-attention needs no
    video keys, so each process attends its own video queries with its rows of the masks; RMPM's features,
    captured per shard, are gathered once per step (:meth:`gather`) into every process's whole masks."""

    start: int
    stop: int
    sizes: tuple[int, ...]
    group: object = None  # a torch.distributed process group (None: the default one)

    @classmethod
    def of(cls, num_video: int, rank: int, world: int, group=None) -> VideoShard:
        """The shard of process ``rank`` of ``world`` as ``torch.tensor_split`` cuts ``num_video`` tokens
        (diffusers' sharders: ``chunk`` when they split evenly, which is the same cut, ``tensor_split``
        otherwise)."""
        sizes = tuple(num_video // world + (r < num_video % world) for r in range(world))
        start = sum(sizes[:rank])
        return cls(start, start + sizes[rank], sizes, group)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's ``[n_local, ...]`` shard, in token order: ``[N_v, ...]`` (a collective: every
        process of the group calls it at once). Shares of unequal size travel padded to the largest, which
        every backend takes (gloo's all-gather takes equal sizes only)."""
        import torch.distributed as dist

        largest = max(self.sizes)
        padded = local.new_zeros((largest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(parts, self.sizes)])


@dataclass
class VideoMotions:
    """One video of a batch: its objects' motion tokens and words, and the masks of this step."""

    motion_tokens: torch.Tensor  # [K, experts, blocks, d_m, dim]
    member: torch.Tensor  # bool [K, L_y]: Y_mo^k
    concept_index: list[torch.Tensor] | None = None  # per object, its concept words' token indices (DMEM)
    layout: JointLayout | CrossLayout | None = None  # this step's, over the prompt's tokens as `member` counts them
    video_masks: torch.Tensor | None = None  # bool [K, N_v]: this step's object masks
    key_cache: dict = field(default_factory=dict)
    text_layouts: dict = field(default_factory=dict)  # (TextKeys, L) -> this step's layout, built at first use
    text_caches: dict = field(default_factory=dict)  # (TextKeys, L) -> its key cache, kept across steps
    features: torch.Tensor | None = None
    feature_count: int = 0
    captures: dict[int, int] = field(default_factory=dict)  # block -> features captured there since the last take

    @property
    def num_objects(self) -> int:
        return self.motion_tokens.shape[0]


@dataclass
class FlexiMMTState:
    """What the attention processors of every block read during one pipeline call (or one training
    step), for every video of the batch.

    ``videos`` hold each video's motion tokens, words and current MDMA layout. The model's adapter
    says which video each row of the transformer's batch belongs to (``rows``) and which row of each
    video its RMPM features come from (``feature_rows``; ``None`` in a forward that captures none).
    Masks are set once per step by :meth:`set_video_masks` (RMPM, static or all-open masks), or,
    with ``dmem=True``, extracted inside every block by DMEM's QK rule (training, and the
    ``mask_source="qk"`` ablation) with a fraction ``dmem_drop`` of positives dropped at random
    (``dmem_drop_exact``: exactly that share, :func:`masks.drop_positives`)
    (drawn once per step on the CPU from ``generator``, so runs repeat on any device).
    """

    videos: list[VideoMotions]
    form: str = "joint"
    parts: frozenset[str] = frozenset(PARTS)
    context_text: str = "open"
    backend: str = "auto"
    num_frames: int = 1  # token frames, for DMEM's per-frame threshold
    dmem: bool = False
    dmem_drop: float = 0.0
    dmem_drop_exact: bool = False  # drop exactly int(dmem_drop x the mask's tokens), at least one (the release)
    generator: torch.Generator | None = None
    feature_blocks: frozenset[int] = frozenset()
    rows: list[int] | None = None  # video index of each batch row; None: all rows are video 0
    feature_rows: list[int] | None = None  # per video, the batch row its features come from
    # True: the processors name each row's text keys (TextKeys) and layouts are built per text form at
    # first use; False: the prompt's tokens are the text keys and each step's layout is built at once
    text_keys: bool = False
    # joint form, DMEM: score video queries against the concept words' keys (HunyuanVideo 1.5, docs/method.md#hunyuanvideo-15
    # ) instead of the concept words' queries against the video keys (CogVideoX, section 4)
    dmem_video_queries: bool = False
    # context parallelism: the video tokens this process's blocks see (None: all of them), see shard_video
    shard: VideoShard | None = None
    _dmem_layouts: dict = field(default_factory=dict)
    _drop: torch.Tensor | None = None
    _row_index: dict = field(default_factory=dict)
    _notes: set = field(default_factory=set)
    # how opaque.py's operators find this state inside a compiled graph (auto backend under torch.compile)
    handle: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.handle = opaque.register(self)
        if self.form not in FORMS:
            raise ValueError(f"form={self.form!r}: choose from {list(FORMS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"attention_backend={self.backend!r}: choose from {list(BACKENDS)}")
        shapes = {tuple(v.motion_tokens.shape[:1] + v.motion_tokens.shape[3:4]) for v in self.videos}
        if len(shapes) > 1:
            raise ValueError(f"every video of a batch needs the same number of objects and d_m, got {sorted(shapes)}")

    @property
    def num_objects(self) -> int:
        return self.videos[0].num_objects if self.videos else 0

    def note_once(self, message: str) -> None:
        """Log ``message`` as a warning the first time this call (or training run) meets it."""
        if message not in self._notes:
            self._notes.add(message)
            logger.warning(message)

    @property
    def tokens_per_motion(self) -> int:
        return self.videos[0].motion_tokens.shape[3]

    def set_motion_tokens(self, tokens: torch.Tensor, video: int = 0) -> None:
        """Swap a video's motion tokens ``[K, experts, blocks, d_m, dim]`` (training: each step's parameters)."""
        self.videos[video].motion_tokens = tokens

    def shard_video(self, shard: VideoShard | None) -> None:
        """Run on one share of the video tokens (context parallelism; None: all of them), before the first
        :meth:`set_video_masks`: each layout is built from this share's rows of the masks. Only the cross
        form shards: its masked attention has video queries alone, row by row, while a joint attention's
        video keys would span every process. DMEM's per-frame threshold needs every video query of a
        frame, so ``mask_source="qk"`` and motion training do not shard."""
        if shard is not None and self.form != "cross":
            raise ValueError(
                f"context parallelism with objects needs the cross form (Wan): this model's attention is "
                f"{self.form!r}, whose video keys every process would need"
            )
        if shard is not None and self.dmem:
            raise ValueError(
                "context parallelism with DMEM (mask_source='qk', or training a motion): its per-frame "
                "threshold needs every video token in one process; use mask_source='rmpm' or 'static', "
                "or train without enable_parallelism"
            )
        self.shard = shard

    def set_video_masks(self, video_masks: torch.Tensor, video: int = 0, per_block: bool = False) -> None:
        """Prepare MDMA for the next step (or, ``per_block``, for DMEM's current block) from bool
        ``[K, N_v]`` object masks of one video."""
        slot = self.videos[video]
        slot.video_masks, slot.text_layouts = video_masks.bool(), {}
        slot.layout = None if self.text_keys else self._build(slot, slot.video_masks, None, 0, per_block)

    def _build(
        self, slot: VideoMotions, video_masks: torch.Tensor, text: TextKeys | None, text_len: int, per_block: bool
    ) -> JointLayout | CrossLayout:
        if text is None:
            member, valid, cache = slot.member, None, slot.key_cache
        else:
            member, valid = text.place(slot.member, text_len)
            cache = slot.text_caches.setdefault((text, text_len), {})
        if self.shard is not None:  # this process's rows of the masks
            video_masks = video_masks[:, self.shard.start : self.shard.stop]
        return LAYOUTS[self.form](
            member,
            self.tokens_per_motion,
            video_masks,
            self.parts,
            self.context_text,
            self.backend,
            cache,
            per_block,
            valid,
        )

    def _step_layout(self, video: int, text: TextKeys | None, text_len: int) -> JointLayout | CrossLayout:
        slot = self.videos[video]
        if text is None:
            return slot.layout
        if (text, text_len) not in slot.text_layouts:
            slot.text_layouts[(text, text_len)] = self._build(slot, slot.video_masks, text, text_len, False)
        return slot.text_layouts[(text, text_len)]

    def begin_step(self, num_video_tokens: int | None = None, num_blocks: int | None = None) -> None:
        """Start a denoising or training step: forget the per-block DMEM masks of the previous one (a
        block recomputed by gradient checkpointing reuses its first pass's masks, random drop
        included) and draw this step's DMEM drop for every block and video at once."""
        self._dmem_layouts.clear()
        self._drop = None
        if self.dmem and self.dmem_drop > 0 and num_video_tokens and num_blocks:
            shape = (len(self.videos), num_blocks, self.num_objects, num_video_tokens)
            draw = torch.rand(shape, generator=self.generator)
            self._drop = draw.to(self.videos[0].member.device, non_blocking=True)

    # -- which rows belong to which video --------------------------------------------------
    def row_groups(self, batch: int) -> list[tuple[int, torch.Tensor | None]]:
        """``[(video, rows)]`` for a batch of ``batch`` rows; rows None means all of them."""
        return [(video, rows) for video, _, rows in self.row_sets(batch)]

    def row_sets(
        self, batch: int, texts: list[TextKeys] | None = None
    ) -> list[tuple[int, TextKeys | None, torch.Tensor | None]]:
        """``[(video, text, rows)]``: the rows of a batch of ``batch`` rows by video and by text form
        (``texts``, one per row, or None); rows None means all of them."""
        rows = self.batch_rows(batch)[0]
        if texts is None and (rows is None or len(set(rows)) == 1):
            return [(0 if rows is None else rows[0], None, None)]
        rows = rows or [0] * batch
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} batch rows declared, the transformer got {batch}")
        forms = list(zip(rows, texts or [None] * batch))
        if len(set(forms)) == 1:
            return [(*forms[0], None)]
        if tuple(forms) not in self._row_index:  # index tensors made once per call, not in every block
            device = self.videos[0].member.device
            self._row_index[tuple(forms)] = [
                (video, text, torch.tensor([r for r, f in enumerate(forms) if f == (video, text)], device=device))
                for video, text in dict.fromkeys(sorted(set(forms), key=forms.index))
            ]
        return self._row_index[tuple(forms)]

    def batch_rows(self, batch: int) -> tuple[list[int] | None, list[int] | None]:
        """``(rows, feature_rows)`` of a forward of ``batch`` rows: the declared ones; or, for a forward of the
        feature rows alone when they are the declared batch's last rows (the conditional branch: diffusers'
        FasterCache runs it without the unconditional one on the steps it approximates that branch), their
        videos, each video's features in its own row."""
        rows, feature = self.rows, self.feature_rows
        if (
            rows is not None
            and feature is not None
            and batch == len(feature) < len(rows)
            and feature == list(range(len(rows) - batch, len(rows)))
        ):
            return rows[-batch:], list(range(batch))
        return rows, feature

    # -- RMPM features (captured during the ordinary forward) --------------------------------
    def capturing(self, block: int) -> bool:
        """Whether this forward captures RMPM features in ``block``."""
        return block in self.feature_blocks and self.feature_rows is not None

    def observe(self, block: int | torch.Tensor, video_out: torch.Tensor, rows: list[int] | None = None) -> None:
        """Add a block's per-token video features ``[B, N_v, D]`` to each video's running sum; ``rows``:
        each video's row of ``video_out`` when it holds only the feature rows (default ``feature_rows``).
        Inside a compiled graph, an opaque operator (``opaque.observe``) does it: which blocks capture is
        no part of the graph."""
        if torch.compiler.is_compiling():
            if self.feature_blocks:  # not feature_rows: a forward with them and one without share a graph
                opaque.observe(self, block, video_out, rows)
            return
        block = block_number(block)
        if not self.capturing(block):
            return
        for slot, row in zip(self.videos, self.batch_rows(video_out.shape[0])[1] if rows is None else rows):
            feat = video_out[row].detach()
            if slot.features is None:  # one float32 sum per video, added to in place
                slot.features = feat.to(torch.float32, copy=True)
            else:
                slot.features.add_(feat)
            slot.feature_count += 1
            slot.captures[block] = slot.captures.get(block, 0) + 1

    def capture_complete(self, video: int = 0) -> bool:
        """Whether the features a video captured since the last :meth:`take_features` came from every
        feature block, each as often. A cache that skips blocks or reuses attention outputs (diffusers'
        FirstBlockCache after its first block, PAB, FasterCache, TaylorSeer) leaves the capture of its
        skipped steps partial or empty: a mean over fewer blocks is another feature, not RMPM's."""
        counts = self.videos[video].captures
        return bool(counts) and set(counts) == set(self.feature_blocks) and len(set(counts.values())) == 1

    def take_features(self, video: int = 0) -> torch.Tensor | None:
        """The mean captured feature per video token ``[N_v, D]`` since the last call, or None. With a
        :attr:`shard`, every process's shard gathered (every process calls it at once)."""
        slot = self.videos[video]
        if slot.features is None:
            return None
        mean = slot.features / slot.feature_count
        slot.features, slot.feature_count, slot.captures = None, 0, {}
        return mean if self.shard is None else self.shard.gather(mean)

    # -- motion tokens through a block's frozen projections ------------------------------------
    def motion_projections(self, video: int, block: int | torch.Tensor, expert: int, project):
        """A video's motion keys and values for a cross-attention: ``project(tokens, kind)`` maps
        ``[n, dim]`` tokens to ``[1, H, n, d]`` through the block's ``to_k``/``to_v`` (and its key
        norm); kind is "k" or "v"."""
        tokens = block_tokens(self.videos[video].motion_tokens, expert, block)
        tokens = tokens.reshape(-1, tokens.shape[-1])
        return project(tokens, "k"), project(tokens, "v")

    def _layout(
        self, video: int, block: int, concept_side, video_side, text: TextKeys | None = None, text_len: int = 0
    ):
        """This block's layout of one video (and text form): the step's, or DMEM's from this block's own
        attention (``concept_side(index)``: the concept words' queries or keys at text key ``index``)."""
        slot = self.videos[video]
        if not self.dmem:
            return self._step_layout(video, text, text_len)
        block = block_number(block)
        key = (video, block) if text is None else (video, block, text, text_len)
        if key not in self._dmem_layouts:
            offset = 0 if text is None else text.offset
            with torch.no_grad():  # the masks are a selection, not a path for gradients
                masks = torch.stack(
                    [
                        dmem_mask(concept_side(index + offset), video_side, self.num_frames)[0]
                        for index in slot.concept_index
                    ]
                )
                if self._drop is not None:  # the release's regulariser: drop positives, redrawn every call
                    masks = drop_positives(masks, self._drop[video, block], self.dmem_drop, self.dmem_drop_exact)
            if text is None:
                self.set_video_masks(masks, video, per_block=True)
                self._dmem_layouts[key] = slot.layout
            else:
                slot.video_masks = masks
                self._dmem_layouts[key] = self._build(slot, masks, text, text_len, True)
        return self._dmem_layouts[key]

    # -- the two forms of attention --------------------------------------------------------
    def joint_motion_rows(self, block: int | torch.Tensor, expert: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The motion tokens of each batch row's video for one block, ``[B, K * d_m, dim]`` in ``like``'s
        device and dtype: a joint-attention processor appends them to its hidden states before its
        own projections (and QK-norm; no RoPE), so that they join the keys and values uncopied."""
        videos = self.batch_rows(batch)[0] or [0] * batch
        if len(videos) != batch:
            raise ValueError(f"{len(videos)} batch rows declared, the transformer got {batch}")
        rows = {}
        for video in set(videos):
            tokens = block_tokens(self.videos[video].motion_tokens, expert, block)
            rows[video] = tokens.reshape(-1, tokens.shape[-1]).to(device=like.device, dtype=like.dtype)
        if len(rows) == 1:
            return rows[videos[0]].expand(batch, -1, -1)
        return torch.stack([rows[video] for video in videos])

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
        prompt's tokens); returns ``[B, H, N_v + L_y, d]`` (see ``JointLayout.attend_video_first``).
        Inside a compiled graph the auto backend runs as one opaque operator (``opaque.mdma_joint``)."""
        if self.backend == "auto" and torch.compiler.is_compiling():
            return opaque.mdma_joint(self, block, query, key, value, text_len, texts, attention)
        return self._per_video(
            query,
            key,
            value,
            texts,
            lambda v, t, q, k, val: self._joint_one(v, t, block, q, k, val, text_len, attention),
        )

    def _joint_one(self, video, text, block, query, key, value, text_len, attention):
        row = self._feature_row_within(video, query.shape[0])
        n_video = query.shape[2] - text_len - self.num_objects * self.tokens_per_motion
        words, places = (key, query) if self.dmem_video_queries else (query, key)
        layout = self._layout(
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
        ``[B, H, L_y, d]`` and the motion tokens; returns ``[B, H, N_v, d]`` (``attention``: see
        ``CrossLayout.attend``; ``texts``: as in :meth:`joint_attention`). Inside a compiled graph the
        auto backend runs as one opaque operator (``opaque.mdma_cross``)."""
        if self.backend == "auto" and torch.compiler.is_compiling():
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
        row = self._feature_row_within(video, query.shape[0])
        layout = self._layout(
            video, block, lambda idx: key[row : row + 1, :, idx], query[row : row + 1], text, key.shape[2]
        )
        m_k, m_v = motion_of(video)
        batch = query.shape[0]
        return layout.attend(query, key, value, m_k.expand(batch, -1, -1, -1), m_v.expand(batch, -1, -1, -1), attention)

    def _feature_row_within(self, video: int, batch: int) -> int:
        """The row, within this video's own rows, that DMEM reads (its conditional branch)."""
        if self.feature_rows is None:
            return batch - 1
        rows = [r for r, v in enumerate(self.rows or [0] * batch) if v == video]
        if len(rows) != batch:  # a forward of the conditional rows alone (batch_rows): one row per video
            return batch - 1
        return rows.index(self.feature_rows[video]) if self.feature_rows[video] in rows else len(rows) - 1

    def _per_video(self, query, key, value, texts, attend_one) -> torch.Tensor:
        groups = self.row_sets(query.shape[0], texts)
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
    "BACKENDS",
    "BlockProcessor",
    "CrossLayout",
    "FlexiMMTState",
    "JointLayout",
    "TextKeys",
    "VideoMotions",
    "VideoShard",
    "chain_order",
    "group_keys",
]
