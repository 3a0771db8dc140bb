"""Which video each row of the transformer's batch belongs to, and which rows feed RMPM.

A pipeline call batches several videos and, with classifier-free guidance, both branches: the model's
adapter declares the call's rows when the transfer is built (``ModelAdapter.batch_rows``). RMPM's
features come from the conditional branch only (docs/method.md#rmpm): from the declared feature rows of
every forward (CogVideoX, both branches in one batch), or of the first forward of each step only, where the
branches run as forwards of their own, the conditional first (Wan, HunyuanVideo 1.5), or where later forwards
of the step run the conditional rows alone (LTX-2's spatio-temporal and modality guidance). A driver whose rows
change from forward to forward (ComfyUI's native patch) gives them as each forward starts."""

from __future__ import annotations

import torch

from .tokens import TextKeys


class BatchRows:
    """The rows of the current forward: ``rows``, the video of each batch row (None: every row is video 0),
    and ``feature_rows``, per video the row its features come from (None: this forward captures none)."""

    def __init__(
        self, rows: list[int] | None = None, feature_rows: list[int] | None = None, first_forward_only: bool = False
    ) -> None:
        self.rows, self.feature_rows = rows, feature_rows
        self.declared = feature_rows  # the feature rows of a forward that captures
        self.first_forward_only = first_forward_only  # features from the first forward of each step only
        self.forwards = 0  # forwards of the transformer in this step
        self._index: dict = {}

    def begin_step(self) -> None:
        """A denoising step starts: its first forward comes next."""
        self.forwards = 0

    def begin_forward(self, rows=..., feature_rows=...) -> None:
        """A forward of the transformer starts (the adapter's hook says so), of the declared rows or of
        ``rows`` and ``feature_rows`` given (where they change from forward to forward; ``...``: as declared).
        With ``first_forward_only``, only the step's first forward captures features."""
        if rows is not ...:
            self.rows = rows
        if feature_rows is not ...:
            self.declared = feature_rows
        first = self.forwards == 0 or not self.first_forward_only
        self.feature_rows = self.declared if first else None
        self.forwards += 1

    def conditional_halves(self) -> bool:
        """Whether each forward holds both branches, the conditional rows last (what diffusers' FasterCache
        needs to approximate the unconditional half)."""
        rows, feature = self.rows, self.feature_rows
        return (
            rows is not None
            and feature is not None
            and len(rows) == 2 * len(feature)
            and feature == list(range(len(feature), len(rows)))
        )

    def of_batch(self, batch: int) -> tuple[list[int] | None, list[int] | None]:
        """``(rows, feature_rows)`` of a forward of ``batch`` rows: the current ones; or, for a forward of the
        feature rows alone when they are the batch's last rows (the conditional branch: diffusers' FasterCache
        runs it without the unconditional one on the steps it approximates that branch; LTX-2's guidance
        forwards after the first of a step), their videos, each video's features in its own row (None where this
        forward captures none)."""
        rows, feature, declared = self.rows, self.feature_rows, self.declared
        if (
            rows is not None
            and declared is not None
            and batch == len(declared) < len(rows)
            and declared == list(range(len(rows) - batch, len(rows)))
        ):
            return rows[-batch:], None if feature is None else list(range(batch))
        return rows, feature

    def videos(self, batch: int) -> list[int]:
        """The video of each of a forward's ``batch`` rows."""
        videos = self.of_batch(batch)[0] or [0] * batch
        if len(videos) != batch:
            raise ValueError(f"{len(videos)} batch rows declared, the transformer got {batch}")
        return videos

    def sets(
        self, batch: int, texts: list[TextKeys] | None, device: torch.device
    ) -> list[tuple[int, TextKeys | None, torch.Tensor | None]]:
        """``[(video, text, rows)]``: a forward's ``batch`` rows by video and by text form (``texts``, one per
        row, or None); rows None means all of them (index tensors on ``device``, made once per call)."""
        rows = self.of_batch(batch)[0]
        if texts is None and (rows is None or len(set(rows)) == 1):
            return [(0 if rows is None else rows[0], None, None)]
        rows = self.videos(batch)
        forms = list(zip(rows, texts or [None] * batch))
        if len(set(forms)) == 1:
            return [(*forms[0], None)]
        if tuple(forms) not in self._index:  # index tensors made once per call, not in every block
            self._index[tuple(forms)] = [
                (video, text, torch.tensor([r for r, f in enumerate(forms) if f == (video, text)], device=device))
                for video, text in dict.fromkeys(sorted(set(forms), key=forms.index))
            ]
        return self._index[tuple(forms)]

    def feature_row_within(self, video: int, batch: int) -> int:
        """The row, within a video's own ``batch`` rows, that DMEM reads (its conditional branch)."""
        if self.feature_rows is None:
            return batch - 1
        rows = [r for r, v in enumerate(self.rows or [0] * batch) if v == video]
        if len(rows) != batch:  # a forward of the conditional rows alone (of_batch): one row per video
            return batch - 1
        return rows.index(self.feature_rows[video]) if self.feature_rows[video] in rows else len(rows) - 1
