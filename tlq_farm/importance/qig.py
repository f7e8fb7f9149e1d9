"""qig (QIG, arXiv 2603.17809): integrated gradients of the per-token quantization error.

E(x) = mean_t || f_q(x)_t - f(x)_t ||^2 is the block's output error when its weights are quantized (f_q: an
RTN copy of the block, f: the full-precision block) at input x (the quantized chain's input x~).
IG_t,c = (x - x')_t,c * (1/m) sum_k dE/dx_t,c (x' + a_k (x - x')), a_k = (k - 1/2)/m, baseline x' = 0,
m = --qig-steps (32). The token score is mean_c |IG_t,c|, normalized per sample to mean 1, then clipped
from above at Q3 + 1.5 IQR of that sample's scores (a few outlier tokens, often attention sinks, would
otherwise own the Hessian).
"""

from __future__ import annotations

import torch

from ..block import act_fake_quant, rtn_proxy, run_block
from .base import ImportanceContext, normalize_per_sample

NEEDS_FP_CHAIN = False
GLOBAL = False
# The weights need the block and its inputs on the quantized chain: a weights task per block and shard.
LOCAL = True


def iqr_clip(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    s = score[valid > 0]
    if s.numel() < 4:
        return score
    q1, q3 = torch.quantile(s.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return torch.clamp(score, max=float(q3 + 1.5 * (q3 - q1)))


def integrated_gradients(f_err, x: torch.Tensor, steps: int, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Midpoint Riemann sum of dE/dx along the straight path from the baseline to x, times (x - baseline)."""
    x0 = torch.zeros_like(x) if baseline is None else baseline
    total = torch.zeros_like(x)
    for k in range(steps):
        a = (k + 0.5) / steps
        xi = (x0 + a * (x - x0)).detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f_err(xi), xi)
        total += g
    return (x - x0) * total / steps


def block_weights(ctx: ImportanceContext, b, block, names, q_inputs, fp_inputs):
    spec = ctx.spec
    proxy = rtn_proxy(block, names, spec)
    weights = []
    for i, (x, kw) in enumerate(q_inputs):
        def err(xi):
            with act_fake_quant(proxy, names, spec.act_bits):
                yq = run_block(proxy, xi, kw)
            y = run_block(block, xi, kw)
            return ((yq - y) ** 2).sum(dim=-1).mean()

        ig = integrated_gradients(err, x.detach(), spec.qig_steps)
        score = ig.abs().mean(dim=-1).reshape(-1).to(ctx.valid[i].dtype)
        s = normalize_per_sample(score, ctx.valid[i])
        weights.append(iqr_clip(s, ctx.valid[i]) * ctx.valid[i])
    return weights
