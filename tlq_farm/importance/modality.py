"""modality (MBQ, arXiv 2412.19509): one weight for all vision tokens of a layer, from gradient sensitivity.

r_l = mean |dL/dY_l| over vision tokens / mean |dL/dY_l| over text tokens, with L the LM loss on answer
tokens and Y_l the output of decoder block l, measured on the full-precision model (the backward task of
block l + 1, or of the head, sums |dL/dY_l| per shard; the importance task adds the shards in order). r_l is floored at the
median over layers (a layer whose vision gradients vanish still keeps some vision tokens in its Hessian).
Vision tokens weigh r_l, text tokens 1.
"""

from __future__ import annotations

import torch

NEEDS_FP_CHAIN = False
GLOBAL = True
LOCAL = False
EXTRA_CHAINS: tuple[str, ...] = ()


def score_blocks(n_blocks: int) -> list[int]:
    """The gradient at the input of block b (b = n: the head's) is dL/dY of block b - 1."""
    return list(range(1, n_blocks + 1))


def gradient_sums(grads: list[torch.Tensor], vision: list[torch.Tensor], valid: list[torch.Tensor]) -> torch.Tensor:
    """[sum of mean_c |g| over vision tokens, their count, the same over text tokens], float64."""
    out = torch.zeros(4, dtype=torch.float64)
    for g, vis, ok in zip(grads, vision, valid):
        a = g.abs().mean(dim=-1).reshape(-1).double()
        vm = vis.reshape(-1) & (ok.reshape(-1) > 0)
        tm = (~vis.reshape(-1)) & (ok.reshape(-1) > 0)
        out += torch.tensor([float(a[vm].sum()), int(vm.sum()), float(a[tm].sum()), int(tm.sum())], dtype=torch.float64)
    return out


def shard_scores(b: int, grads: list[torch.Tensor], xf, xq, vision: list[torch.Tensor],
                 valid: list[torch.Tensor]) -> list[torch.Tensor]:
    return [gradient_sums(grads, vision, valid)]


def ratio(sums: torch.Tensor) -> float:
    v_sum, v_n, t_sum, t_n = (float(x) for x in sums)
    if v_n == 0 or t_n == 0 or t_sum == 0:
        return 1.0
    return (v_sum / v_n) / (t_sum / t_n)


def floor_at_median(r: torch.Tensor) -> torch.Tensor:
    return torch.clamp(r, min=float(torch.quantile(r.double(), 0.5)))


def reduce_scores(per_block: list[list[torch.Tensor]], vision, valid, spec) -> dict[str, torch.Tensor]:
    """per_block[l]: the shards' gradient sums of block l's output, in shard order -> r_l, floored."""
    raw = torch.tensor([ratio(sum(shards, torch.zeros(4, dtype=torch.float64))) for shards in per_block],
                       dtype=torch.float64)
    return {"modality_ratio_raw": raw, "modality_ratio": floor_at_median(raw)}


def token_weights(b: int, valid: list[torch.Tensor], vision: list[torch.Tensor], state: dict) -> list[torch.Tensor]:
    """Vision tokens weigh r_b, text tokens 1 (uniform without a ratio: a set with no vision token)."""
    r = float(state["modality_ratio"][b]) if "modality_ratio" in state else 1.0
    return [ok * torch.where(vis.reshape(-1), torch.tensor(r, dtype=ok.dtype), torch.tensor(1.0, dtype=ok.dtype))
            for ok, vis in zip(valid, vision)]
