"""Resumable training state in one safetensors file: named tensors, Adam moments, the LR
schedule and the RNG state, written atomically; refused when the fingerprints differ."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FlexiMMTInputError
from ..method.motion import atomic_write

_SCHEDULER_KEYS = ("last_epoch", "_step_count", "_last_lr", "base_lrs")


def save_checkpoint(
    path: Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer,
    scheduler,
    generator: torch.Generator,
    fingerprints: dict,
) -> None:
    from safetensors.torch import save_file

    tensors = {"rng": generator.get_state()}
    for name, param in params.items():
        tensors[f"param.{name}"] = param.detach().cpu().contiguous()
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"adam.{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    sched = {k: v for k, v in scheduler.state_dict().items() if k in _SCHEDULER_KEYS}
    meta = {"step": str(step), "scheduler": json.dumps(sched), **{k: str(v) for k, v in fingerprints.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(
    path: Path, params: dict[str, torch.Tensor], optimizer, scheduler, generator: torch.Generator, fingerprints: dict
) -> int:
    """Restore what :func:`save_checkpoint` wrote into ``params`` and the optimiser; returns the step."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:
        raise FlexiMMTInputError(f"checkpoint {str(path)!r} is not readable ({err}); delete it to start over") from None
    for key, want in fingerprints.items():
        if meta.get(key) != str(want):
            raise FlexiMMTInputError(
                f"checkpoint {str(path)!r} was written with a different {key.replace('_', ' ')} "
                f"({meta.get(key)!r}, now {want!r}): resume with the same model and settings, or delete it to start over"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param.{name}"])
            state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam.{name}.")}
            if state:
                optimizer.state[param] = {k: (v if k == "step" else v.to(param.device)) for k, v in state.items()}
    scheduler.load_state_dict({**scheduler.state_dict(), **json.loads(meta["scheduler"])})
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    generator.set_state(tensors["rng"])
    return int(meta["step"])
