"""Motion tokens (Sec. 3.1) and their file format, and ``ObjectMotion``: one object of the image,
its first-frame mask and the motion it should perform."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FlexiMMTInputError

FORMAT = "fleximmt.method.motion/1"
# base_loras: the LoRAs on the base model while the motion trained (train.base_loras; absent in older files)
_METADATA_KEYS = ("name", "caption", "concept_words", "motion_words", "base_model", "steps", "family", "base_loras")
EXPERT_KEY = (
    "motion_tokens"  # the first expert's tensor; expert e > 0 is "motion_tokens_{e + 1}" (Wan 2.2 A14B has two)
)
FIRST_FAMILY = "cogvideox"  # motion files from before families were recorded were all learned on CogVideoX


def expert_key(expert: int) -> str:
    """The safetensors key of expert ``expert``'s tokens (from 0): ``motion_tokens``, ``motion_tokens_2``, ..."""
    return EXPERT_KEY if expert == 0 else f"{EXPERT_KEY}_{expert + 1}"


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` only when it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class MotionTokens:
    """A learned motion: one set of ``d_m`` keys/values per transformer block, ``tokens`` float
    ``[num_blocks, d_m, dim]``, or for a model with several experts (Wan 2.2 A14B) one such set per
    expert (``tokens`` ``[experts, num_blocks, d_m, dim]``, ``experts`` the list); plus metadata (name,
    caption, concept and motion words, base model fingerprint and family, training steps, and the LoRAs
    the base model carried then)."""

    def __init__(self, tokens: torch.Tensor | list[torch.Tensor], **metadata: Any) -> None:
        sets = [torch.as_tensor(t) for t in tokens] if isinstance(tokens, (list, tuple)) else None
        tokens = torch.stack(sets) if sets and len(sets) > 1 else sets[0] if sets else torch.as_tensor(tokens)
        if tokens.ndim not in (3, 4) or not tokens.is_floating_point() or (tokens.ndim == 4 and tokens.shape[0] < 1):
            raise FlexiMMTInputError(
                f"motion tokens must be a float tensor [num_blocks, d_m, dim] (or [experts, num_blocks, d_m, dim]), "
                f"got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if tokens.ndim == 4 and tokens.shape[0] == 1:
            tokens = tokens[0]
        self.tokens = tokens
        unknown = set(metadata) - set(_METADATA_KEYS)
        if unknown:
            raise FlexiMMTInputError(f"unknown motion metadata {sorted(unknown)}: allowed are {list(_METADATA_KEYS)}")
        self.metadata: dict[str, Any] = dict(metadata)

    @property
    def experts(self) -> list[torch.Tensor]:
        """One ``[num_blocks, d_m, dim]`` token set per expert."""
        return list(self.tokens) if self.tokens.ndim == 4 else [self.tokens]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_tokens(self) -> torch.Tensor:
        """All experts' tokens as ``[experts, num_blocks, d_m, dim]``."""
        return self.tokens if self.tokens.ndim == 4 else self.tokens[None]

    @property
    def num_blocks(self) -> int:
        return self.tokens.shape[-3]

    @property
    def d_m(self) -> int:
        return self.tokens.shape[-2]

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    @property
    def family(self) -> str:
        """The model family the motion was learned on; files from before families were recorded are CogVideoX's."""
        return self.metadata.get("family") or FIRST_FAMILY

    def __getattr__(self, name: str) -> Any:
        if name in _METADATA_KEYS:
            return self.__dict__.get("metadata", {}).get(name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        meta = ", ".join(f"{k}={v!r}" for k, v in self.metadata.items())
        experts = f"experts={self.num_experts}, " if self.num_experts > 1 else ""
        return f"MotionTokens({experts}blocks={self.num_blocks}, d_m={self.d_m}, dim={self.dim}{', ' + meta if meta else ''})"

    def check_model(
        self,
        num_blocks: int,
        dim: int,
        family: str | None = None,
        experts: int = 1,
        source: str = "motion",
        family_name: Callable[[str], str] = str,
    ) -> None:
        """Raise if these tokens cannot go into a model of ``family`` with ``experts`` transformers of
        ``num_blocks`` blocks of width ``dim``; ``family_name`` names a family in the message (the
        registry's ``fleximmt.models.family_name``)."""
        made_for = self.metadata.get("base_model") or "an unknown model"
        if family is not None and self.family != family:
            raise FlexiMMTInputError(
                f"{source}: this motion was learned on {family_name(self.family)} ({made_for}), but the loaded model "
                f"is {family_name(family)}: a motion only works on the model family it was trained on; train it "
                "again on this model"
            )
        if (self.num_blocks, self.dim) != (num_blocks, dim) or self.num_experts != experts:
            expert_text = lambda n: f"{n} experts of " if n > 1 else ""
            raise FlexiMMTInputError(
                f"{source}: motion tokens are for a model with {expert_text(self.num_experts)}{self.num_blocks} blocks "
                f"of width {self.dim}, but the loaded model has {expert_text(experts)}{num_blocks} blocks of width {dim} "
                f"(trained on {made_for}); train the motion on this model or load the model it was trained on"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokens and metadata to a safetensors file, atomically."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "d_m": str(self.d_m), "experts": str(self.num_experts)}
        meta.update({k: json.dumps(v) for k, v in self.metadata.items()})
        tensors = {expert_key(e): t.detach().contiguous().cpu() for e, t in enumerate(self.experts)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> MotionTokens:
        """Read a motion file written by :meth:`save`; anything else raises ``ValueError``."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FlexiMMTInputError(
                f"motion file {str(path)!r} does not exist: give the path of a .safetensors motion"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if meta.get("format") != FORMAT or EXPERT_KEY not in keys:
                    raise FlexiMMTInputError(
                        f"{str(path)!r} is a safetensors file but not a fleximmt motion "
                        f"(format {meta.get('format')!r}); train one with `fleximmt train`"
                    )
                experts = []
                while expert_key(len(experts)) in keys:
                    experts.append(f.get_tensor(expert_key(len(experts))))
                if meta.get("experts", str(len(experts))) != str(len(experts)):
                    raise FlexiMMTInputError(
                        f"{str(path)!r} says it holds {meta['experts']} experts' tokens but has "
                        f"{len(experts)} ({', '.join(sorted(keys))}): re-save or retrain it"
                    )
        except FlexiMMTInputError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise FlexiMMTInputError(
                f"{str(path)!r} is not a readable safetensors motion file ({err}); re-save or retrain it"
            ) from None
        metadata = {k: json.loads(v) for k, v in meta.items() if k in _METADATA_KEYS}
        return cls(experts, **metadata)


MOTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")  # a motion's file name in a folder of motions


def check_motion_name(name: str) -> str:
    """``name`` (stripped) if it can name a motion file in a folder (no path, no hidden file), else raise."""
    name = (name or "").strip()
    if not MOTION_NAME.fullmatch(name):
        raise FlexiMMTInputError(
            f"motion name {name!r}: use letters, digits, spaces, '.', '_' or '-' (at most 64), "
            "starting with a letter or digit"
        )
    return name


def motion_metadata(motion: MotionTokens, markdown: bool = True) -> str:
    """A motion file's metadata (caption, words, shape, training steps): one Markdown line, or
    plain text with one item a line (``markdown=False``)."""
    meta = motion.metadata
    blocks, d_m, dim = motion.tokens.shape[-3:]
    em, code = ("*", "`") if markdown else ("", "")
    parts = [
        f"caption: {em}{meta['caption']}{em}" if meta.get("caption") else None,
        f"concept: {code}{meta['concept_words']}{code}" if meta.get("concept_words") else None,
        f"motion words: {code}{meta['motion_words']}{code}" if meta.get("motion_words") else None,
        f"{motion.num_experts} experts x " * (motion.num_experts > 1) + f"{blocks} blocks x {d_m} tokens x {dim}",
        f"{meta['steps']} training steps" if meta.get("steps") else None,
        f"base LoRAs: {lora_names(meta['base_loras'])}" if meta.get("base_loras") else None,
    ]
    return (" · " if markdown else "\n").join(p for p in parts if p)


def lora_names(loras: list[dict]) -> str:
    """``base_loras`` metadata as text: "style (0.8), speed (1.0, fused) on transformer_2"."""

    def one(lora: dict) -> str:
        weight = lora.get("weight")
        weight = ", ".join(f"{w:g}" for w in weight) if isinstance(weight, list) else f"{weight:g}"
        where = "" if lora.get("component", "transformer") == "transformer" else f" on {lora['component']}"
        return f"{lora.get('adapter')} ({weight}{', fused' if lora.get('fused') else ''}){where}"

    return ", ".join(one(lora) for lora in loras)


MaskLike = Any  # bool tensor / array, PIL image, or a path to a PNG


def load_mask(mask: MaskLike) -> torch.BoolTensor:
    """An object mask at image resolution as a bool tensor ``[H, W]`` (non-zero = object)."""
    from PIL import Image

    if isinstance(mask, (str, os.PathLike)):
        path = Path(mask)
        if not path.is_file():
            raise FlexiMMTInputError(f"mask file {str(path)!r} does not exist: give a PNG the size of the image")
        try:
            with Image.open(path) as img:
                mask = np.array(img.convert("L"))
        except Exception as err:
            raise FlexiMMTInputError(f"mask file {str(path)!r} is not a readable image ({err})") from None
    elif isinstance(mask, Image.Image):
        mask = np.array(mask.convert("L"))
    tensor = torch.as_tensor(np.asarray(mask))
    if tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4):
        tensor = tensor[..., 0]
    if tensor.ndim != 2:
        raise FlexiMMTInputError(f"an object mask must be 2-D [H, W], got shape {tuple(tensor.shape)}")
    return tensor > (127 if tensor.dtype == torch.uint8 else 0)


@dataclass
class ObjectMotion:
    """One object of the image: its first-frame ``mask`` (image resolution), the ``motion`` it should
    perform, and ``motion_text``, the words of the prompt that describe this object's motion.
    ``concept_text`` (optional) names the object in the prompt; only ``mask_source="qk"`` uses it."""

    mask: MaskLike
    motion: MotionTokens | str | os.PathLike
    motion_text: str
    concept_text: str | None = None
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.motion, (str, os.PathLike)):
            self.motion = MotionTokens.load(self.motion)
        if not isinstance(self.motion, MotionTokens):
            raise FlexiMMTInputError(
                f"motion must be a MotionTokens or a path to one, got {type(self.motion).__name__}"
            )
        if not isinstance(self.motion_text, str) or not self.motion_text.strip():
            raise FlexiMMTInputError(
                "motion_text must name the prompt's words for this object's motion, e.g. 'jumps up'"
            )
        self._mask = load_mask(self.mask)

    @property
    def mask_tensor(self) -> torch.BoolTensor:
        return self._mask
