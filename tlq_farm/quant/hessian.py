"""Token-weighted second-order statistics of a linear layer's inputs, as sums that shards can add up.

One calibration shard gives a partial (sums over its tokens); partials are reduced in shard order in
float64, and finalize_hessian turns the sums into GPTQ's normalisation H = 2 sum_t w_t x_t x_t^T / sum_t w_t
(all-ones weights give the paper's H = 2 X X^T / n).

Names: x_q (x~) is the layer input on the quantized chain, x_fp (x) the same input on the full-precision
chain; token_weights (w_t >= 0) say how much each token counts.
"""

from __future__ import annotations

import torch

_SUMMED_KEYS = ("H", "D", "Hfp", "w_sum", "tokens")


def _flatten_tokens(x: torch.Tensor, name: str) -> torch.Tensor:
    """[..., in] -> [tokens, in] float64."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., in_features], got a scalar")
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def _check_token_weights(token_weights: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
    """Validate token weights against the activations' leading dims -> flat float64 weights [tokens]."""
    if tuple(token_weights.shape) != tuple(leading_shape):
        raise ValueError(
            f"token_weights has shape {tuple(token_weights.shape)} but the activations' leading dims are "
            f"{tuple(leading_shape)}: give one weight per token (same shape as x without its last dim)"
        )
    w = token_weights.reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("token_weights contain NaN or inf: every token weight must be a finite number >= 0")
    if bool((w < 0).any()):
        raise ValueError(
            f"token_weights contain negative values (min {float(w.min()):.3g}): weights must be >= 0; "
            f"use 0 to leave a token out"
        )
    return w


def _weighted_gram(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_t w_t a_t b_t^T for rows a_t, b_t ([tokens, in]) -> [in, in]."""
    return (a * w.unsqueeze(1)).T @ b


def _symmetrized(m: torch.Tensor) -> torch.Tensor:
    """Exactly symmetric copy: (a*w)^T a rounds its two triangles differently."""
    return (m + m.T) * 0.5


def hessian_partial(x_q: torch.Tensor, token_weights: torch.Tensor, x_fp: torch.Tensor | None = None,
                    need_fp_gram: bool = False) -> dict[str, torch.Tensor]:
    """Sums over one shard's tokens, in float64.

    Args:
        x_q: layer inputs on the quantized chain, [..., in] (leading dims are flattened to tokens).
        token_weights: w_t >= 0, shape x_q.shape[:-1].
        x_fp: the same inputs on the full-precision chain (same shape as x_q), for GPTAQ's cross term.
        need_fp_gram: also return the full-precision Gram sum "Hfp" (needs x_fp), which makes the
            GPTAQ loss exact.

    Returns a dict of tensors:
        "H":      sum_t w_t x~_t x~_t^T, float64 [in, in]
        "D":      sum_t w_t (x_t - x~_t) x~_t^T, float64 [in, in] (only with x_fp)
        "Hfp":    sum_t w_t x_t x_t^T, float64 [in, in] (only with need_fp_gram)
        "w_sum":  sum_t w_t, float64 scalar
        "tokens": number of tokens with w_t > 0, int64 scalar

    Tokens of weight 0 are dropped before any arithmetic, so they leave the sums exactly as if absent.
    """
    if need_fp_gram and x_fp is None:
        raise ValueError("need_fp_gram=True needs x_fp, the full-precision chain's inputs to the same layer")
    if x_fp is not None and tuple(x_fp.shape) != tuple(x_q.shape):
        raise ValueError(
            f"x_fp has shape {tuple(x_fp.shape)} but x_q has {tuple(x_q.shape)}: both chains must give the "
            f"same tokens of the same layer"
        )
    Xq = _flatten_tokens(x_q, "x_q")
    w = _check_token_weights(token_weights, x_q.shape[:-1])
    kept = w > 0
    Xq, wk = Xq[kept], w[kept]
    if not bool(torch.isfinite(Xq).all()):
        raise ValueError("x_q contains NaN or inf on tokens of nonzero weight: check the quantized chain's "
                         "activations (an earlier block may have diverged)")
    stats = {"H": _symmetrized(_weighted_gram(Xq, Xq, wk))}
    if x_fp is not None:
        Xfp = _flatten_tokens(x_fp, "x_fp")[kept]
        if not bool(torch.isfinite(Xfp).all()):
            raise ValueError("x_fp contains NaN or inf on tokens of nonzero weight: check the full-precision "
                             "chain's activations")
        stats["D"] = _weighted_gram(Xfp - Xq, Xq, wk)
        if need_fp_gram:
            stats["Hfp"] = _symmetrized(_weighted_gram(Xfp, Xfp, wk))
    stats["w_sum"] = w.sum()
    stats["tokens"] = kept.sum().to(torch.int64)
    return stats


def reduce_partials(partials: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum partial statistics in list order (float64, so the result only depends on that order)."""
    if not partials:
        raise ValueError("no partial statistics to reduce: at least one shard's stats are needed")
    keys = set(partials[0])
    for k, p in enumerate(partials[1:], start=1):
        if set(p) != keys:
            raise ValueError(
                f"partial {k} has keys {sorted(p)} but partial 0 has {sorted(keys)}: all shards of a layer "
                f"must be computed with the same options (x_fp / need_fp_gram)"
            )
    total = {}
    for key in partials[0]:
        acc = partials[0][key].clone()
        acc = acc if key == "tokens" else acc.to(torch.float64)
        for p in partials[1:]:
            acc = acc + (p[key] if key == "tokens" else p[key].to(torch.float64))
        total[key] = acc
    return total


def finalize_hessian(stats: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Normalise summed stats -> (H, D, Hfp), each 2 * sum / w_sum in float64 (D, Hfp None when absent)."""
    w_sum = float(stats["w_sum"])
    if not w_sum > 0:
        raise ValueError(
            "no calibration token reached this layer with nonzero weight (sum of token weights is 0): "
            "use more calibration samples or an importance strategy that gives these tokens weight"
        )

    def normalise(key: str) -> torch.Tensor | None:
        return None if key not in stats else 2.0 * stats[key].to(torch.float64) / w_sum

    return normalise("H"), normalise("D"), normalise("Hfp")
