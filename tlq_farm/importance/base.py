"""What every token-importance strategy sees, and the small helpers they share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..block import Captured, SampleInput
from ..spec import QuantSpec


@dataclass
class ImportanceContext:
    """Everything about the calibration set that a strategy may need, independent of the current block."""

    spec: QuantSpec
    blocks: nn.ModuleList
    norm: nn.Module | None
    head: nn.Module
    captured: list[Captured]                 # per sample: block-0 input and the kwargs of every block
    valid: list[torch.Tensor]                # per sample [T] float: 1 on real tokens, 0 on padding
    vision: list[torch.Tensor]               # per sample [T] bool: True on vision tokens
    labels: list[torch.Tensor]               # per sample [1, T] with -100 outside answers
    names: list[list[str]]                   # per block: its quantizable linears
    state: dict = field(default_factory=dict)  # what a global pass leaves for the per-block step

    @property
    def n_samples(self) -> int:
        return len(self.captured)


def uniform_weights(ctx: ImportanceContext) -> list[torch.Tensor]:
    return [v.clone() for v in ctx.valid]


def normalize_per_sample(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """score / mean(score over real tokens); all-zero scores fall back to uniform (nothing to rank by)."""
    s = score * valid
    m = s.sum() / valid.sum().clamp(min=1)
    if not torch.isfinite(m) or m <= 0:
        return valid.clone()
    return s / m


@torch.no_grad()
def fp_chain_inputs(ctx: ImportanceContext, upto: int | None = None) -> list[list[torch.Tensor]]:
    """Inputs of every block along the full-precision chain: result[b][i] for sample i."""
    from ..block import run_block

    n = len(ctx.blocks) if upto is None else upto
    chain = [[c.hidden for c in ctx.captured]]
    for b in range(n - 1):
        chain.append([run_block(ctx.blocks[b], h, c.kwargs(b)) for h, c in zip(chain[-1], ctx.captured)])
    return chain


def backward_chain(ctx: ImportanceContext, inputs: list[list[torch.Tensor]], outputs_last: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """dL/d(input of block b) for every block and sample, from the LM loss on answer tokens.

    Returns (grads_in[b][i], grad_out_last[i]); dL/d(output of block b) is grads_in[b + 1] (or grad_out_last).
    Blocks are recomputed one at a time, so only one block's activations are alive for autograd.
    """
    from ..block import block_vjp, head_grad

    n = len(ctx.blocks)
    grad_last = [head_grad(ctx.norm, ctx.head, h, lab)[0] for h, lab in zip(outputs_last, ctx.labels)]
    grads: list[list[torch.Tensor]] = [None] * n  # type: ignore[list-item]
    g = grad_last
    for b in reversed(range(n)):
        g = [block_vjp(ctx.blocks[b], x, c.kwargs(b), go) for x, c, go in zip(inputs[b], ctx.captured, g)]
        grads[b] = g
    return grads, grad_last
