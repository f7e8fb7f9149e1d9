"""What every token-importance strategy sees, and the small helpers they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import QuantSpec


@dataclass
class ImportanceContext:
    """What a block-local strategy (vlmq, qig) sees of one shard's samples besides the block and its inputs."""

    spec: QuantSpec
    valid: list[torch.Tensor]                # per sample [T] float: 1 on real tokens, 0 on padding
    vision: list[torch.Tensor]               # per sample [T] bool: True on vision tokens


def normalize_per_sample(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """score / mean(score over real tokens); all-zero scores fall back to uniform (nothing to rank by)."""
    s = score * valid
    m = s.sum() / valid.sum().clamp(min=1)
    if not torch.isfinite(m) or m <= 0:
        return valid.clone()
    return s / m
