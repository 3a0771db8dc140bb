"""Motion tokens (Sec. 3.1) and their file format, and ``ObjectMotion``: one object of the image,
its first-frame mask and the motion it should perform."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FlexiMMTInputError

FORMAT = "fleximmt.motion/1"
_METADATA_KEYS = ("name", "caption", "concept_words", "motion_words", "base_model", "steps")


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
    """A learned motion: ``tokens`` float ``[num_blocks, d_m, dim]``, one set of ``d_m`` keys/values
    per transformer block, plus metadata (name, caption, concept and motion words, base model
    fingerprint, training steps)."""

    def __init__(self, tokens: torch.Tensor, **metadata: Any) -> None:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 3 or not tokens.is_floating_point():
            raise FlexiMMTInputError(
                f"motion tokens must be a float tensor [num_blocks, d_m, dim], got {tuple(tokens.shape)} {tokens.dtype}"
            )
        self.tokens = tokens
        unknown = set(metadata) - set(_METADATA_KEYS)
        if unknown:
            raise FlexiMMTInputError(f"unknown motion metadata {sorted(unknown)}: allowed are {list(_METADATA_KEYS)}")
        self.metadata: dict[str, Any] = dict(metadata)

    @property
    def num_blocks(self) -> int:
        return self.tokens.shape[0]

    @property
    def d_m(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def __getattr__(self, name: str) -> Any:
        if name in _METADATA_KEYS:
            return self.__dict__.get("metadata", {}).get(name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        meta = ", ".join(f"{k}={v!r}" for k, v in self.metadata.items())
        return f"MotionTokens(blocks={self.num_blocks}, d_m={self.d_m}, dim={self.dim}{', ' + meta if meta else ''})"

    def check_model(self, num_blocks: int, dim: int, source: str = "motion") -> None:
        """Raise if these tokens cannot go into a transformer with ``num_blocks`` blocks of width ``dim``."""
        if (self.num_blocks, self.dim) != (num_blocks, dim):
            raise FlexiMMTInputError(
                f"{source}: motion tokens are for a model with {self.num_blocks} blocks of width {self.dim}, "
                f"but the loaded transformer has {num_blocks} blocks of width {dim} "
                f"(trained on {self.metadata.get('base_model') or 'an unknown model'}); "
                "train the motion on this model or load the model it was trained on"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokens and metadata to a safetensors file, atomically."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "d_m": str(self.d_m)}
        meta.update({k: json.dumps(v) for k, v in self.metadata.items()})
        tokens = self.tokens.detach().contiguous().cpu()
        return atomic_write(path, lambda tmp: save_file({"motion_tokens": tokens}, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> MotionTokens:
        """Read a motion file written by :meth:`save`; anything else raises ``ValueError``."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FlexiMMTInputError(f"motion file {str(path)!r} does not exist: give the path of a .safetensors motion")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or "motion_tokens" not in f.keys():
                    raise FlexiMMTInputError(
                        f"{str(path)!r} is a safetensors file but not a fleximmt motion "
                        f"(format {meta.get('format')!r}); train one with `fleximmt train`"
                    )
                tokens = f.get_tensor("motion_tokens")
        except FlexiMMTInputError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise FlexiMMTInputError(
                f"{str(path)!r} is not a readable safetensors motion file ({err}); re-save or retrain it"
            ) from None
        metadata = {k: json.loads(v) for k, v in meta.items() if k in _METADATA_KEYS}
        return cls(tokens, **metadata)


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
            raise FlexiMMTInputError(f"motion must be a MotionTokens or a path to one, got {type(self.motion).__name__}")
        if not isinstance(self.motion_text, str) or not self.motion_text.strip():
            raise FlexiMMTInputError("motion_text must name the prompt's words for this object's motion, e.g. 'jumps up'")
        self._mask = load_mask(self.mask)

    @property
    def mask_tensor(self) -> torch.BoolTensor:
        return self._mask
