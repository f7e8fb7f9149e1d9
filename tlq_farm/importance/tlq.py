"""tlq: gradient-guided token importance integrated with quantization error, and a token-level calibration set.

Our reading of TLQ (arXiv 2602.07899); the paper's code is not public, so docs/methods.md states exactly
what is computed here:
1. g^b_t = dL/dx^b_t: the gradient of the LM loss on answer tokens w.r.t. the input of block b, on the
   full-precision model (a forward chain, then a backward chain block by block: one farm task per block and
   shard each way).
2. An RTN copy of every block gives a quantized chain x~^b (the cheap stand-in for the final model), computed
   beside the full-precision chain by the forward tasks.
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

NEEDS_FP_CHAIN = False
# The weights come from a global gradient pass (tlq_farm.plan: forward, backward, importance tasks), not from
# each block on its own.
GLOBAL = True
LOCAL = False
# The chains the forward tasks carry besides the full-precision one.
EXTRA_CHAINS = ("rtn",)


def score_blocks(n_blocks: int) -> list[int]:
    """Blocks whose input gradient scores tokens: 1..n-1 (block 0 carries no quantization error); a one-block
    model scores by saliency at block 0."""
    return list(range(1, n_blocks)) if n_blocks > 1 else [0]


def first_order_scores(grads: list[torch.Tensor], xq: list[torch.Tensor], xf: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(g * (q - f)).sum(dim=-1).abs().reshape(-1).double() for g, q, f in zip(grads, xq, xf)]


def saliency(grads: list[torch.Tensor], xf: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(g * x).sum(dim=-1).abs().reshape(-1).double() for g, x in zip(grads, xf)]


def shard_scores(b: int, grads: list[torch.Tensor], xf: list[torch.Tensor], xq: list[torch.Tensor] | None,
                 vision: list[torch.Tensor], valid: list[torch.Tensor]) -> list[torch.Tensor]:
    """s^b_t of one shard's samples from g^b (grads), x^b (xf) and x~^b (xq, the RTN chain)."""
    return saliency(grads, xf) if b == 0 else first_order_scores(grads, xq, xf)


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


def reduce_scores(per_block: list[list[torch.Tensor]], vision: list[torch.Tensor], valid: list[torch.Tensor],
                  spec) -> dict[str, list[torch.Tensor]]:
    """Every scored block's per-sample scores (all samples of the set, in order) -> the token-level
    calibration set: scores, kept tokens, weights (steps 3-5 of the module docstring)."""
    scores = combine_blocks(per_block, valid)
    kept = token_selection(scores, vision, valid, spec.tlq_keep)
    return {"tlq_scores": scores, "tlq_kept": kept, "tlq_weights": weights_from_scores(scores, kept)}


def token_weights(b: int, valid: list[torch.Tensor], vision: list[torch.Tensor], state: dict) -> list[torch.Tensor]:
    """The same weights at every block."""
    return state["tlq_weights"]
