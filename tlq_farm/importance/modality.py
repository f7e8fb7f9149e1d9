"""modality (MBQ, arXiv 2412.19509): one weight for all vision tokens of a layer, from gradient sensitivity.

r_l = mean |dL/dY_l| over vision tokens / mean |dL/dY_l| over text tokens, with L the LM loss on answer
tokens and Y_l the output of decoder block l, measured on the full-precision model. r_l is floored at the
median over layers (a layer whose vision gradients vanish still keeps some vision tokens in its Hessian).
Vision tokens weigh r_l, text tokens 1.
"""

from __future__ import annotations

import torch

from ..block import run_block
from .base import ImportanceContext, backward_chain, fp_chain_inputs, uniform_weights

NEEDS_FP_CHAIN = False


def modality_ratios(grads_out: list[list[torch.Tensor]], vision: list[torch.Tensor], valid: list[torch.Tensor]) -> torch.Tensor:
    """grads_out[l][i]: dL/dY_l of sample i -> r_l (before the median floor)."""
    ratios = []
    for per_sample in grads_out:
        v_sum = t_sum = 0.0
        v_n = t_n = 0
        for g, vis, ok in zip(per_sample, vision, valid):
            a = g.abs().mean(dim=-1).reshape(-1).double()
            vm = vis.reshape(-1) & (ok.reshape(-1) > 0)
            tm = (~vis.reshape(-1)) & (ok.reshape(-1) > 0)
            v_sum += float(a[vm].sum()); v_n += int(vm.sum())
            t_sum += float(a[tm].sum()); t_n += int(tm.sum())
        if v_n == 0 or t_n == 0 or t_sum == 0:
            ratios.append(1.0)
        else:
            ratios.append((v_sum / v_n) / (t_sum / t_n))
    return torch.tensor(ratios, dtype=torch.float64)


def floor_at_median(r: torch.Tensor) -> torch.Tensor:
    return torch.clamp(r, min=float(torch.quantile(r.double(), 0.5)))


def prepare(ctx: ImportanceContext) -> None:
    if not any(bool(v.any()) for v in ctx.vision):
        ctx.state["modality_ratio"] = torch.ones(len(ctx.blocks), dtype=torch.float64)
        return
    xs = fp_chain_inputs(ctx)
    with torch.no_grad():
        last = [run_block(ctx.blocks[-1], h, c.kwargs(len(ctx.blocks) - 1)) for h, c in zip(xs[-1], ctx.captured)]
    grads_in, grad_last = backward_chain(ctx, xs, last)
    grads_out = grads_in[1:] + [grad_last]
    raw = modality_ratios(grads_out, ctx.vision, ctx.valid)
    ctx.state["modality_ratio_raw"] = raw
    ctx.state["modality_ratio"] = floor_at_median(raw)


def block_weights(ctx: ImportanceContext, b, block, names, q_inputs, fp_inputs):
    r = float(ctx.state["modality_ratio"][b])
    return [ok * torch.where(vis.reshape(-1), torch.tensor(r, dtype=ok.dtype), torch.tensor(1.0, dtype=ok.dtype))
            for ok, vis in zip(uniform_weights(ctx), ctx.vision)]
