"""Token-importance strategies, one per module; each gives token weights w_t >= 0 for a block's Hessians."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..spec import IMPORTANCE
from .base import ImportanceContext

__all__ = ["ImportanceContext", "get_strategy"]


def get_strategy(name: str) -> ModuleType:
    if name not in IMPORTANCE:
        raise ValueError(f"unknown importance strategy {name!r}: choose one of {', '.join(IMPORTANCE)}")
    return importlib.import_module(f"{__name__}.{name}")
