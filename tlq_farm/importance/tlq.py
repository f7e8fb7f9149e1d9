"""tlq: gradient-guided token importance integrated with quantization error, and a token-level calibration set.

Our reading of TLQ (arXiv 2602.07899); the paper's code is not public, so docs/methods.md states exactly
what is computed here:
1. g^b_t = dL/dx^b_t: the gradient of the LM loss on answer tokens w.r.t. the input of block b, on the
   full-precision model (a forward chain, then a backward chain block by block).
2. An RTN copy of every block gives a quantized chain x~^b (the cheap stand-in for the final model).
3. s^b_t = | g^b_t . (x~^b_t - x^b_t) |: the first-order change of the loss caused by quantization error
   reaching token t at block b. Each block's scores are divided by their mean over the calibration set,
   and the token score is the mean over blocks (block 0 carries no error, so it adds nothing; a one-block
   model falls back to the saliency | g^0_t . x^0_t |).
4. Token-level calibration set: every text token is kept; vision tokens are kept when their score is in the
   top --tlq-keep fraction of all vision tokens of the set; the others get weight 0.
5. Weight of a kept token: 1/2 + 1/2 * s_t / mean(s over kept tokens) (half uniform, so that the Hessian
   stays well-conditioned when a few tokens dominate the scores). The same weights serve every block.
"""

from __future__ import annotations

import torch

from ..block import act_fake_quant, rtn_proxy, run_block
from .base import ImportanceContext, backward_chain, fp_chain_inputs

NEEDS_FP_CHAIN = False


def first_order_scores(grads: list[torch.Tensor], xq: list[torch.Tensor], xf: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(g * (q - f)).sum(dim=-1).abs().reshape(-1).double() for g, q, f in zip(grads, xq, xf)]


def combine_blocks(per_block: list[list[torch.Tensor]], valid: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean over blocks of each block's scores divided by its mean over all real tokens of the set."""
    n = len(valid)
    total = [torch.zeros_like(valid[i], dtype=torch.float64) for i in range(n)]
    used = 0
    for scores in per_block:
        num = sum(float((s * v).sum()) for s, v in zip(scores, valid))
        den = sum(float(v.sum()) for v in valid)
        if num <= 0:
            continue
        mean = num / den
        for i in range(n):
            total[i] += scores[i] / mean
        used += 1
    return [t / max(used, 1) for t in total]


def token_selection(scores: list[torch.Tensor], vision: list[torch.Tensor], valid: list[torch.Tensor], keep: float) -> list[torch.Tensor]:
    """Keep every text token and the top `keep` fraction of vision tokens by score (ties broken by order)."""
    vis_scores = torch.cat([s[(v.reshape(-1)) & (ok > 0)] for s, v, ok in zip(scores, vision, valid)])
    kept = []
    if vis_scores.numel() == 0:
        return [ok > 0 for ok in valid]
    k = max(1, int(round(keep * vis_scores.numel())))
    thresh = torch.sort(vis_scores, descending=True).values[k - 1]
    for s, v, ok in zip(scores, vision, valid):
        vm = v.reshape(-1)
        kept.append((ok > 0) & (~vm | (s >= thresh)))
    return kept


def weights_from_scores(scores: list[torch.Tensor], kept: list[torch.Tensor]) -> list[torch.Tensor]:
    num = sum(float(s[k].sum()) for s, k in zip(scores, kept))
    den = sum(int(k.sum()) for k in kept)
    mean = num / den if den and num > 0 else 0.0
    out = []
    for s, k in zip(scores, kept):
        rel = s / mean if mean > 0 else torch.ones_like(s)
        out.append(((0.5 + 0.5 * rel) * k).float())
    return out


def prepare(ctx: ImportanceContext) -> None:
    spec = ctx.spec
    n = len(ctx.blocks)
    xs = fp_chain_inputs(ctx)
    with torch.no_grad():
        last = [run_block(ctx.blocks[-1], h, c.kwargs(n - 1)) for h, c in zip(xs[-1], ctx.captured)]
    grads, _ = backward_chain(ctx, xs, last)
    per_block = []
    xq = [c.hidden for c in ctx.captured]
    for b in range(n):
        if b > 0:
            per_block.append(first_order_scores(grads[b], xq, xs[b]))
        if b < n - 1:
            proxy = rtn_proxy(ctx.blocks[b], ctx.names[b], spec)
            with torch.no_grad(), act_fake_quant(proxy, ctx.names[b], spec.act_bits):
                xq = [run_block(proxy, h, c.kwargs(b)) for h, c in zip(xq, ctx.captured)]
    if not per_block:
        per_block = [[(g * x).sum(dim=-1).abs().reshape(-1).double() for g, x in zip(grads[0], xs[0])]]
    scores = combine_blocks(per_block, ctx.valid)
    kept = token_selection(scores, ctx.vision, ctx.valid, spec.tlq_keep)
    ctx.state["tlq_scores"] = scores
    ctx.state["tlq_kept"] = kept
    ctx.state["tlq_weights"] = weights_from_scores(scores, kept)


def block_weights(ctx: ImportanceContext, b, block, names, q_inputs, fp_inputs):
    return ctx.state["tlq_weights"]
