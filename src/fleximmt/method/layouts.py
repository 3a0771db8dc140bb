"""The MDMA layouts of a call's videos: what each block's attention reads its masks from.

A layout is one mask kernel's form of MDMA for one video (``kernels``). Each denoising step has its own,
built once from that step's object masks (:meth:`Layouts.set_video_masks`: RMPM's, static or all-open);
a model whose rows carry text forms of their own (``text_keys``: padded text, docs/method.md#hunyuanvideo-15)
gets one per text form, built at its first use in the step. With DMEM (training, and
``mask_source="qk"``) the masks come instead from every block's own attention, with a share of the
positives dropped at random, drawn once per step (docs/method.md#dmem)."""

from __future__ import annotations

import torch

from .kernels import MaskKernel, Mdma
from .masks import dmem_mask, drop_positives
from .tokens import TextKeys, VideoMotions, VideoShard, block_number


class Layouts:
    """The layouts of ``videos``: this step's, per video (or per video and text form), and DMEM's, per block."""

    def __init__(
        self,
        videos: list[VideoMotions],
        form: str,
        kernel: MaskKernel,
        parts: frozenset[str],
        context_text: str = "open",
        text_keys: bool = False,
        shard: VideoShard | None = None,
        num_frames: int = 1,
        dmem: bool = False,
        dmem_drop: float = 0.0,
        generator: torch.Generator | None = None,
        dmem_drop_exact: bool = False,
    ) -> None:
        self.videos, self.form, self.kernel = videos, form, kernel
        self.parts, self.context_text = frozenset(parts), context_text
        # True: each row's text keys are named (TextKeys) and layouts are built per text form at first use;
        # False: the prompt's tokens are the text keys and each step's layout is built at once
        self.text_keys, self.shard = text_keys, shard
        self.num_frames = num_frames  # token frames, for DMEM's per-frame threshold
        self.dmem, self.dmem_drop, self.generator = dmem, dmem_drop, generator
        self.dmem_drop_exact = dmem_drop_exact  # drop exactly the share, at least one (masks.drop_positives)
        count = len(videos)
        self.video_masks: list[torch.Tensor | None] = [None] * count  # bool [K, N_v]: this step's (or block's)
        self.step_layouts: list = [None] * count  # this step's, over the prompt's tokens as `member` counts them
        self.text_layouts: list[dict] = [{} for _ in range(count)]  # (TextKeys, L) -> this step's layout
        self.key_caches: list[dict] = [{} for _ in range(count)]  # kept across steps
        self.text_caches: list[dict] = [{} for _ in range(count)]  # (TextKeys, L) -> its key cache, across steps
        self.dmem_layouts: dict = {}  # (video, block[, text, L]) -> this step's DMEM layout
        self.drop: torch.Tensor | None = None  # this step's DMEM draws, uniform [videos, blocks, K, N_v]

    def set_video_masks(self, video_masks: torch.Tensor, video: int = 0, parts=None, per_block: bool = False) -> None:
        """Prepare MDMA for the next step (or, ``per_block``, for DMEM's current block) from bool ``[K, N_v]``
        object masks of one video; ``parts``: the MDMA parts from now on (None: as they are)."""
        if parts is not None:
            self.parts = frozenset(parts)
        self.video_masks[video], self.text_layouts[video] = video_masks.bool(), {}
        masks = self.video_masks[video]
        self.step_layouts[video] = None if self.text_keys else self.build(video, masks, None, 0, per_block)

    def build(self, video: int, video_masks: torch.Tensor, text: TextKeys | None, text_len: int, per_block: bool):
        """The kernel's layout of one video's masks, over its text keys (``text``'s form, or the prompt's)."""
        motions = self.videos[video]
        if text is None:
            member, valid, cache = motions.member, None, self.key_caches[video]
        else:
            member, valid = text.place(motions.member, text_len)
            cache = self.text_caches[video].setdefault((text, text_len), {})
        if self.shard is not None:  # this process's rows of the masks
            video_masks = video_masks[:, self.shard.start : self.shard.stop]
        mdma = Mdma(member, motions.motion_tokens.shape[3], video_masks, self.parts, self.context_text, valid)
        return self.kernel.layout(self.form, mdma, cache, per_block)

    def step_layout(self, video: int, text: TextKeys | None = None, text_len: int = 0):
        """This step's layout of one video (and text form, built at its first use)."""
        if text is None:
            return self.step_layouts[video]
        if (text, text_len) not in self.text_layouts[video]:
            layout = self.build(video, self.video_masks[video], text, text_len, False)
            self.text_layouts[video][(text, text_len)] = layout
        return self.text_layouts[video][(text, text_len)]

    def begin_step(self, num_video_tokens: int | None = None, num_blocks: int | None = None) -> None:
        """Start a denoising or training step: forget the per-block DMEM layouts of the previous one (a block
        recomputed by gradient checkpointing reuses its first pass's masks, random drop included) and draw
        this step's DMEM drop for every block and video at once (on the CPU from ``generator``, so runs
        repeat on any device)."""
        self.dmem_layouts.clear()
        self.drop = None
        if self.dmem and self.dmem_drop > 0 and num_video_tokens and num_blocks:
            shape = (len(self.videos), num_blocks, self.videos[0].num_objects, num_video_tokens)
            draw = torch.rand(shape, generator=self.generator)
            self.drop = draw.to(self.videos[0].member.device, non_blocking=True)

    def layout(self, video: int, block, concept_side, video_side, text: TextKeys | None = None, text_len: int = 0):
        """This block's layout of one video (and text form): the step's, or with DMEM the one from this block's
        own attention (``concept_side(index)``: the concept words' queries or keys at text key ``index``;
        ``video_side``: the video keys or queries they are scored against)."""
        if not self.dmem:
            return self.step_layout(video, text, text_len)
        block = block_number(block)
        key = (video, block) if text is None else (video, block, text, text_len)
        if key not in self.dmem_layouts:
            offset = 0 if text is None else text.offset
            with torch.no_grad():  # the masks are a selection, not a path for gradients
                masks = torch.stack(
                    [
                        dmem_mask(concept_side(index + offset), video_side, self.num_frames)[0]
                        for index in self.videos[video].concept_index
                    ]
                )
                if self.drop is not None:  # the release's regulariser: drop positives, redrawn every call
                    masks = drop_positives(masks, self.drop[video, block], self.dmem_drop, self.dmem_drop_exact)
            if text is None:
                self.set_video_masks(masks, video, per_block=True)
                self.dmem_layouts[key] = self.step_layouts[video]
            else:
                self.video_masks[video] = masks
                self.dmem_layouts[key] = self.build(video, masks, text, text_len, True)
        return self.dmem_layouts[key]
