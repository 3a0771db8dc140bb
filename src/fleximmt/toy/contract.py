"""The rows of the contract suite (``tests/test_contract.py``), derived from the registered families: each
family's tiny components module, ``fleximmt.toy.tiny_<module>`` (``<module>`` as the family is registered),
declares its rows in ``CONTRACT_ROWS``; no list of families is written anywhere else. What each field means is
in the suite's docstring, where a family's author reads it beside the tests the fields switch on and off."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..models import FAMILIES, pipeline_class

LEARNING = dict(steps=60, lr=0.1, tokens_per_motion=16)  # enough for the loss to fall on every tiny model here


@dataclass(frozen=True, eq=False)  # hashed by identity: pytest groups a row's tests by it
class ContractRow:
    """One row of the contract suite's table (tests/test_contract.py's docstring says what each field means);
    ``family`` is the registered family whose tiny module declares the row, filled in by ``contract_rows``."""

    name: str
    components: Callable[[], dict]
    size: tuple[int, int, int]
    call: dict
    scale: float = 4.0
    fast_backends: tuple[str, ...] = ("auto",)
    model_defaults: frozenset[str] = frozenset()
    added_arguments: tuple[str, ...] = ()
    offloads: tuple[str, ...] = ("model", "sequential")
    fused_projections: bool = True
    learning: dict | None = field(default_factory=lambda: dict(LEARNING))
    family: str = ""

    @property
    def ours(self) -> type:
        """FlexiMMT's pipeline class, as the family is registered."""
        return pipeline_class(FAMILIES[self.family].pipeline)

    @property
    def diffusers(self) -> type:
        """diffusers' own pipeline class for these components, as the family's adapter names it."""
        return self.ours.adapter_class.pipeline_class


def tiny_module(module: str) -> str:
    """The name of the tiny components module of the family registered with ``module``."""
    return f"{__package__}.tiny_{module}"


def contract_rows() -> list[ContractRow]:
    """Every registered family's rows, in the order of registration, each with its family; imports each
    family's tiny components module."""
    rows = []
    for family in FAMILIES.values():
        declared = importlib.import_module(tiny_module(family.module)).CONTRACT_ROWS
        rows += [replace(row, family=family.family) for row in declared]
    return rows
