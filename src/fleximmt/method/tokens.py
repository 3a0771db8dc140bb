"""The tokens FlexiMMT's attention reads, and where they sit: each video's motion tokens and motion words
(:class:`VideoMotions`), one block's share of the motion tokens (:class:`BlockProcessor`,
:func:`block_tokens`), where a row's prompt sits among its text keys (:class:`TextKeys`), and which video
tokens this process holds under context parallelism (:class:`VideoShard`). Nothing here knows a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class VideoMotions:
    """One video of a batch: its objects' motion tokens, their motion words and concept words."""

    motion_tokens: torch.Tensor  # [K, experts, blocks, d_m, dim]
    member: torch.Tensor  # bool [K, L_y]: Y_mo^k
    concept_index: list[torch.Tensor] | None = None  # per object, its concept words' token indices (DMEM)

    @property
    def num_objects(self) -> int:
        return self.motion_tokens.shape[0]


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
    then padding; docs/method.md#hunyuanvideo-15): the prompt's first token at ``offset``, padding from
    ``valid`` on (closed to every query). A processor that passes none attends the prompt's tokens as
    ``member`` counts them (CogVideoX, Wan)."""

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
