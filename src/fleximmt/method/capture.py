"""RMPM's features, captured during the ordinary forward (docs/method.md#rmpm): each video's per-token video
features, summed over the feature blocks of one denoising step, and which blocks gave them. RMPM reads
their mean after the step (:meth:`FeatureCapture.take`) - under context parallelism every process's
share gathered into the whole - unless the capture was partial (:meth:`FeatureCapture.complete`)."""

from __future__ import annotations

import torch

from .tokens import VideoShard


class FeatureCapture:
    """The running feature sums of ``num_videos`` videos over the ``blocks`` that feed RMPM."""

    def __init__(self, num_videos: int, blocks: frozenset[int] = frozenset(), shard: VideoShard | None = None) -> None:
        self.blocks, self.shard = frozenset(blocks), shard
        self.sums: list[torch.Tensor | None] = [None] * num_videos  # float32 [N_v, D], added to in place
        self.counts = [0] * num_videos
        self.captures: list[dict[int, int]] = [{} for _ in range(num_videos)]  # block -> captures since a take

    def stop(self) -> None:
        """No block captures from now on (dynamic RMPM froze the masks)."""
        self.blocks = frozenset()

    def add(self, block: int, features: torch.Tensor, rows: list[int]) -> None:
        """Add a block's per-token video features ``[B, N_v, D]`` to each video's sum: video ``v``'s are in row
        ``rows[v]``."""
        for video, row in zip(range(len(self.sums)), rows):
            feat = features[row].detach()
            if self.sums[video] is None:
                self.sums[video] = feat.to(torch.float32, copy=True)
            else:
                self.sums[video].add_(feat)
            self.counts[video] += 1
            self.captures[video][block] = self.captures[video].get(block, 0) + 1

    def complete(self, video: int = 0) -> bool:
        """Whether the features a video captured since the last :meth:`take` came from every feature block,
        each as often. A cache that skips blocks or reuses attention outputs (diffusers' FirstBlockCache after
        its first block, PAB, FasterCache, TaylorSeer) leaves the capture of its skipped steps partial or
        empty: a mean over fewer blocks is another feature, not RMPM's."""
        counts = self.captures[video]
        return bool(counts) and set(counts) == set(self.blocks) and len(set(counts.values())) == 1

    def take(self, video: int = 0) -> torch.Tensor | None:
        """The mean captured feature per video token ``[N_v, D]`` since the last call, or None. With a
        :attr:`shard`, every process's shard gathered (every process calls it at once)."""
        if self.sums[video] is None:
            return None
        mean = self.sums[video] / self.counts[video]
        self.sums[video], self.counts[video], self.captures[video] = None, 0, {}
        return mean if self.shard is None else self.shard.gather(mean)
