"""Token-weighted second-order statistics of a linear layer's inputs, as sums that shards can add up.

Running sums are kept in place per linear input (start_sums / add_tokens / finish_sums), in float32 on
the device by default: consumer GPUs run FP64 at 1/64 of FP32. A partition of the calibration shards gives
one partial; partials are reduced in a fixed order in float64, and finalize_hessian turns the sums into
GPTQ's normalisation H = 2 sum_t w_t x_t x_t^T / sum_t w_t (all-ones weights give the paper's H = 2 X X^T / n).

Names: x_q (x~) is the layer input on the quantized chain, x_fp (x) the same input on the full-precision
chain; token_weights (w_t >= 0) say how much each token counts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

def _flatten_tokens(x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """[..., in] -> [tokens, in] in the accumulation dtype."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., in_features], got a scalar")
    return x.reshape(-1, x.shape[-1]).to(dtype)


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


# Rows of a Gram summed per product: a running sum gets only its upper block triangle (add_gram_), which
# saves up to half the flops (41 % at 2816 columns, nearly half at 18944) for a few more, still large, products.
GRAM_TILE = 1024


def add_gram_(S: torch.Tensor, A: torch.Tensor, B: torch.Tensor, tile: int = GRAM_TILE) -> None:
    """S += A^T B for a symmetric result (A = diag(w) B): only the block rows' upper part, [i:i+tile, i:]; the
    lower blocks are filled from the upper ones by finish_sums (the diagonal blocks hold both triangles)."""
    n = S.shape[0]
    if n <= tile:
        S.addmm_(A.T, B)
        return
    for i in range(0, n, tile):
        S[i:i + tile, i:].addmm_(A[:, i:i + tile].T, B[:, i:])


def _symmetrize_(m: torch.Tensor, tile: int = GRAM_TILE) -> None:
    """Make m exactly symmetric in place from its upper block triangle (add_gram_): each diagonal block
    averaged with its transpose ((a*w)^T a rounds its two triangles differently), each block below it the
    transpose of its mirror. No [in, in] temporary: a down_proj Gram at 7B is 1.4 GB."""
    for i in range(0, m.shape[0], tile):
        d = m[i:i + tile, i:i + tile]
        d.copy_((d + d.T) * 0.5)
    mirror_lower_(m, tile)


def upper_length(n: int, tile: int = GRAM_TILE) -> int:
    """Elements of an [n, n] Gram's upper block triangle (pack_upper_): each block row's [i:i+tile, i:]."""
    return sum(min(tile, n - i) * (n - i) for i in range(0, n, tile)) if n > tile else n * n


def _upper_side(length: int, tile: int = GRAM_TILE) -> int:
    """The n whose upper_length is `length` (it grows with n), refused where none is."""
    lo, hi = 0, int((2 * length) ** 0.5) + 2  # upper_length(n) >= n * n / 2
    while lo < hi:
        mid = (lo + hi) // 2
        if upper_length(mid, tile) < length:
            lo = mid + 1
        else:
            hi = mid
    if upper_length(lo, tile) != length:
        raise ValueError(f"{length} elements are no Gram's upper block triangle (tile {tile})")
    return lo


def pack_upper_(S: torch.Tensor, tile: int = GRAM_TILE) -> torch.Tensor:
    """The upper block triangle of a symmetric sum S (finish_sums), block row after block row ([i:i+tile, i:]
    for i = 0, tile, ...; the diagonal blocks whole), moved to the front of S's own storage and returned as a
    1-D view of it: nearly half the bytes of S to store and read (0.76 GB instead of 1.43 at 18944 columns),
    and no second copy while it is made. S is no longer a matrix after. add_upper_ and mirror_lower_ undo it."""
    n = S.shape[0]
    flat = S.view(-1)
    if n <= tile:
        return flat
    at = 0
    for i in range(0, n, tile):
        for r in range(i, min(i + tile, n)):
            start = r * n + i
            if at != start:  # moved towards the front, possibly over itself: through a copy of the row
                flat[at:at + n - i].copy_(flat[start:start + n - i].clone())
            at += n - i
    return flat[:at]


def add_upper_(total: torch.Tensor, packed: torch.Tensor, tile: int = GRAM_TILE) -> None:
    """total += the packed upper block triangle (pack_upper_) on total's upper blocks, a slab of rows at a time
    (_add_in_place_: no float64 copy of the partial); its lower blocks wait for mirror_lower_."""
    n = total.shape[0]
    if packed.numel() != upper_length(n, tile):
        raise ValueError(f"a packed Gram of {packed.numel()} elements does not fit a sum of {n} columns")
    if n <= tile:
        _add_in_place_(total, packed.view(n, n))
        return
    at = 0
    for i in range(0, n, tile):
        r = min(tile, n - i)
        _add_in_place_(total[i:i + r, i:], packed[at:at + r * (n - i)].view(r, n - i))
        at += r * (n - i)


def mirror_lower_(m: torch.Tensor, tile: int = GRAM_TILE) -> None:
    """Fill m's lower blocks with the transposes of its upper ones (the diagonal blocks are whole)."""
    n = m.shape[0]
    for i in range(0, n, tile):
        for j in range(i + tile, n, tile):
            m[j:j + tile, i:i + tile].copy_(m[i:i + tile, j:j + tile].T)


def _all_finite(x: torch.Tensor) -> bool:
    # A sum is finite only if every term is (NaN and inf propagate); one reduction without a [T, in] mask.
    # A finite sum can only be refused by overflow, which the exact test then settles.
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def start_sums(in_features: int, *, cross: bool = False, need_fp_gram: bool = False,
               dtype: torch.dtype = torch.float32, device="cpu", product_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Zeroed running sums for one linear's input (see add_tokens); cross: GPTAQ's D, need_fp_gram: Hfp.
    product_rows: the linear's out_features, for GPTAQ's terms summed as products with its weight (W D and
    tr(W Hfp W^T) token by token, add_tokens with `weight`) instead of through D and Hfp."""
    if need_fp_gram and not cross:
        raise ValueError("need_fp_gram=True needs the cross term too (x_fp, the full-precision chain's inputs)")
    if product_rows is not None and cross:
        raise ValueError("product_rows sums W D itself: start the sums without D and Hfp (cross=False)")
    sums = {"H": torch.zeros(in_features, in_features, dtype=dtype, device=device)}
    if cross:
        sums["D"] = torch.zeros_like(sums["H"])
    if need_fp_gram:
        sums["Hfp"] = torch.zeros_like(sums["H"])
    if product_rows is not None:
        sums["WD"] = torch.zeros(product_rows, in_features, dtype=dtype, device=device)
        sums["WHfpW"] = torch.zeros((), dtype=torch.float64, device=device)
    sums["w_sum"] = torch.zeros((), dtype=torch.float64, device=device)
    sums["tokens"] = torch.zeros((), dtype=torch.int64, device=device)
    return sums


def add_tokens(sums: dict[str, torch.Tensor], x_q: torch.Tensor, token_weights: torch.Tensor,
               x_fp: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> None:
    """Add one batch of tokens to running sums in place, in the sums' dtype (no per-batch partial is kept).

    x_q: layer inputs on the quantized chain, [..., in]; token_weights: w_t >= 0, shape x_q.shape[:-1];
    x_fp: the same inputs on the full-precision chain, needed when the sums hold D or W D. weight: the
    linear's W [out, in], for sums started with product_rows: W D += sum_t w_t (W dx_t) x~_t^T with
    dx_t = x_t - x~_t, and tr(W Hfp W^T) += sum_t w_t ||W x_t||^2 (3 out in multiply-adds a token against
    1.5 in^2 for D and Hfp: fewer where out < in / 2, as for down_proj). Tokens of weight 0 are dropped before
    any arithmetic, so they leave the sums exactly as if absent.
    """
    dtype = sums["H"].dtype
    crossed = "D" in sums or "WD" in sums
    if crossed != (x_fp is not None):
        raise ValueError("these sums were started with cross=%s but x_fp is %s: give x_fp exactly when the "
                         "GPTAQ cross term is accumulated" % (crossed, "missing" if x_fp is None else "given"))
    if ("WD" in sums) != (weight is not None):
        raise ValueError("give the linear's weight exactly when the sums hold W D (start_sums' product_rows)")
    if weight is not None and tuple(weight.shape) != tuple(sums["WD"].shape):
        raise ValueError(f"weight has shape {tuple(weight.shape)} but these sums hold W D of "
                         f"{tuple(sums['WD'].shape)}")
    if x_fp is not None and tuple(x_fp.shape) != tuple(x_q.shape):
        raise ValueError(
            f"x_fp has shape {tuple(x_fp.shape)} but x_q has {tuple(x_q.shape)}: both chains must give the "
            f"same tokens of the same layer"
        )
    if x_q.dim() >= 1 and x_q.shape[-1] != sums["H"].shape[0]:
        raise ValueError(f"x_q has {x_q.shape[-1]} input features but the sums hold {sums['H'].shape[0]}")
    Xq = _flatten_tokens(x_q, "x_q", dtype)
    w = _check_token_weights(token_weights, x_q.shape[:-1])
    kept = w > 0
    n_kept = int(kept.sum())
    whole = n_kept == w.numel()
    if not whole:
        Xq, w = Xq[kept], w[kept]
    if not _all_finite(Xq):
        raise ValueError("x_q contains NaN or inf on tokens of nonzero weight: check the quantized chain's "
                         "activations (an earlier block may have diverged)")
    ones = bool((w == 1).all())  # uniform weights: x * 1 is x, so the product and its copy can be skipped
    wc = w.to(dtype).unsqueeze(1)
    add_gram_(sums["H"], Xq if ones else Xq * wc, Xq)
    if x_fp is not None:
        Xfp = _flatten_tokens(x_fp, "x_fp", dtype)
        Xfp = Xfp if whole else Xfp[kept]
        if not _all_finite(Xfp):
            raise ValueError("x_fp contains NaN or inf on tokens of nonzero weight: check the full-precision "
                             "chain's activations")
        if weight is None:
            sums["D"].addmm_((Xfp - Xq).T if ones else ((Xfp - Xq) * wc).T, Xq)
            if "Hfp" in sums:
                add_gram_(sums["Hfp"], Xfp if ones else Xfp * wc, Xfp)
        else:
            W = weight.to(dtype)
            R = (Xfp - Xq) @ W.T  # W dx_t, [tokens, out]: the input difference taken before the product
            sums["WD"].addmm_(R.T if ones else (R * wc).T, Xq)
            del R
            squares = (Xfp @ W.T).square_().sum(1, dtype=torch.float64)
            sums["WHfpW"] += squares.sum() if ones else (squares * w).sum()
    sums["w_sum"] += w.sum()
    sums["tokens"] += n_kept


def finish_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sums as statistics: the Gram sums made exactly symmetric (in place), returned for chaining."""
    for key in ("H", "Hfp"):
        if key in sums:
            _symmetrize_(sums[key])
    return sums


def hessian_partial(x_q: torch.Tensor, token_weights: torch.Tensor, x_fp: torch.Tensor | None = None,
                    need_fp_gram: bool = False, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Sums over one batch of tokens (float64 unless `dtype` says otherwise).

    Args:
        x_q: layer inputs on the quantized chain, [..., in] (leading dims are flattened to tokens).
        token_weights: w_t >= 0, shape x_q.shape[:-1].
        x_fp: the same inputs on the full-precision chain (same shape as x_q), for GPTAQ's cross term.
        need_fp_gram: also return the full-precision Gram sum "Hfp" (needs x_fp), which makes the
            GPTAQ loss exact.

    Returns a dict of tensors:
        "H":      sum_t w_t x~_t x~_t^T, [in, in]
        "D":      sum_t w_t (x_t - x~_t) x~_t^T, [in, in] (only with x_fp)
        "Hfp":    sum_t w_t x_t x_t^T, [in, in] (only with need_fp_gram)
        "w_sum":  sum_t w_t, float64 scalar
        "tokens": number of tokens with w_t > 0, int64 scalar
    """
    if need_fp_gram and x_fp is None:
        raise ValueError("need_fp_gram=True needs x_fp, the full-precision chain's inputs to the same layer")
    if x_q.dim() < 1:
        raise ValueError("x_q must have shape [..., in_features], got a scalar")
    sums = start_sums(x_q.shape[-1], cross=x_fp is not None, need_fp_gram=need_fp_gram, dtype=dtype,
                      device=x_q.device)
    add_tokens(sums, x_q, token_weights, x_fp)
    return finish_sums(sums)


# Columns of a partial's D or Hfp converted to float64 at a time while it is multiplied by W.
PRODUCT_COLUMNS = 1024
# Order in which a partial's entries are added: H first, so its float32 copy can go before D and Hfp are read.
_REDUCE_ORDER = {"H": 0, "H_upper": 0, "D": 1, "Hfp": 2}


def _add_in_place_(total: torch.Tensor, t: torch.Tensor, rows: int = 256) -> None:
    """total += t, a slab of rows at a time: adding a float32 tensor to a float64 one converts it to a float64
    temporary first, which for a whole [in, in] partial is 2.9 GB at 18944 columns. The same sums, bit for bit
    (each element is rounded once either way)."""
    if total.dim() == 0:
        total += t
        return
    for i in range(0, total.shape[0], rows):
        total[i:i + rows] += t[i:i + rows]


def _add_products_(total: dict[str, torch.Tensor], key: str, M: torch.Tensor, W64: torch.Tensor) -> None:
    """Fold one partial's D into total["WD"] += W D, or its Hfp into total["WHfpW"] += tr(W Hfp W^T), in float64,
    PRODUCT_COLUMNS columns of M at a time (no float64 copy of M)."""
    for c0 in range(0, M.shape[1], PRODUCT_COLUMNS):
        block = W64 @ M[:, c0:c0 + PRODUCT_COLUMNS].to(torch.float64)
        if key == "D":
            total["WD"][:, c0:c0 + PRODUCT_COLUMNS] += block
        else:
            total["WHfpW"] += (block * W64[:, c0:c0 + PRODUCT_COLUMNS]).sum()


def fold_cross_terms(W: torch.Tensor, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One linear's share of a GPTAQ partial: its W D_p ([out, in], in the sums' dtype) and tr(W Hfp_p W^T)
    (float64), which are all the solve needs of D and Hfp (reduce_partials). Stored instead of the [in, in]
    sums: at Qwen2-VL-7B a block's partial then holds H and 0.9 GB of these instead of 4.8 GB of Grams, and the
    products are taken here, on the device that summed them, not in float64 by the solve."""
    Wf = W.to(sums["D"].dtype)
    return {"WD": Wf @ sums["D"], "WHfpW": (Wf @ sums["Hfp"]).mul_(Wf).sum(dtype=torch.float64)}


def reduce_partials(partials: Iterable[dict[str, torch.Tensor]], W: torch.Tensor | None = None,
                    consume: bool = False) -> dict[str, torch.Tensor]:
    """Sum partial statistics in iteration order, in float64, so the result only depends on that order.

    Partials are added as they come (a generator that reads each one from a store holds one at a time), each
    entry added in place into the running float64 total.

    A partial may hold its Gram H whole or as "H_upper", its upper block triangle (pack_upper_, as a stats task
    stores it): the total is then summed on its upper blocks and mirrored once at the end, the same float64
    numbers as from the whole partials (the lower blocks of each are the transposes of its upper ones).

    W: the layer's weight [out, in]. GPTAQ needs D only through W D and Hfp only through tr(W Hfp W^T)
    (gptq.gptq_quantize), so with W each partial's D and Hfp are multiplied by W as they come and the total
    holds "WD" = sum_p W D_p ([out, in], float64) and "WHfpW" = sum_p tr(W Hfp_p W^T) (a float64 scalar)
    instead of two float64 [in, in] sums: 5.7 GB less at 18944 columns. Normalise with finalize_stats.
    consume: each partial dict is emptied as its entries are added, so that a partial's tensors are freed
    as soon as they are summed (when nothing else holds them).
    """
    total: dict[str, torch.Tensor] | None = None
    keys: set[str] = set()
    packed = False
    W64 = None if W is None else W.to(torch.float64)

    def named(p) -> set[str]:
        return {"H" if name == "H_upper" else name for name in p}

    for k, p in enumerate(partials):
        if total is None:
            keys = named(p)
            total = {}
            if W64 is not None and "D" in keys:
                total["WD"] = torch.zeros_like(W64)
            if W64 is not None and "Hfp" in keys:
                total["WHfpW"] = torch.zeros((), dtype=torch.float64, device=W64.device)
        elif named(p) != keys:
            raise ValueError(
                f"partial {k} has keys {sorted(named(p))} but partial 0 has {sorted(keys)}: all shards of a layer "
                f"must be computed with the same options (x_fp / need_fp_gram)"
            )
        for key in sorted(p, key=lambda name: (_REDUCE_ORDER.get(name, 3), name)):
            t = p.pop(key) if consume else p[key]
            if W64 is not None and key in ("D", "Hfp"):
                if t.shape[0] != W64.shape[1]:
                    raise ValueError(f"partial {k} has {key} of shape {tuple(t.shape)} but W has "
                                     f"{W64.shape[1]} input columns: give the weight of the layer these "
                                     f"statistics were accumulated for")
                _add_products_(total, key, t, W64)
            elif key == "H_upper":
                if "H" not in total:
                    side = _upper_side(t.numel())
                    total["H"] = torch.zeros(side, side, dtype=torch.float64, device=t.device)
                add_upper_(total["H"], t)
                packed = True
            elif key not in total:
                total[key] = t.clone() if key == "tokens" else t.to(torch.float64, copy=True)
            else:
                _add_in_place_(total[key], t)
            del t
        del p
    if total is None:
        raise ValueError("no partial statistics to reduce: at least one shard's stats are needed")
    if packed:  # every partial is symmetric: the sum of their upper blocks, mirrored, is the whole sum
        mirror_lower_(total["H"])
    return total


def finalize_stats(stats: dict[str, torch.Tensor], inplace: bool = False) -> dict[str, torch.Tensor]:
    """Every sum in stats normalised to 2 * sum / w_sum in float64: "H", and as present "D", "Hfp", "WD",
    "WHfpW" (the last two from reduce_partials with W); w_sum and tokens are left out.

    inplace=True: the float64 sums themselves become the results (the same values; no second copy of a Gram
    that may take gigabytes); stats must not be used after."""
    w_sum = float(stats["w_sum"])
    if not w_sum > 0:
        raise ValueError(
            "no calibration token reached this layer with nonzero weight (sum of token weights is 0): "
            "use more calibration samples or an importance strategy that gives these tokens weight"
        )

    def normalise(key: str) -> torch.Tensor:
        if inplace and stats[key].dtype == torch.float64:
            return stats[key].mul_(2.0).div_(w_sum)
        return 2.0 * stats[key].to(torch.float64) / w_sum

    return {key: normalise(key) for key in ("H", "D", "Hfp", "WD", "WHfpW") if key in stats}


def finalize_hessian(stats: dict[str, torch.Tensor], inplace: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Normalise summed stats -> (H, D, Hfp), each 2 * sum / w_sum in float64 (D, Hfp None when absent).

    inplace=True: the float64 sums themselves become H, D, Hfp (the same values; no second copy of a Gram
    that may take gigabytes); stats must not be used after."""
    out = finalize_stats({k: v for k, v in stats.items() if k in ("H", "D", "Hfp", "w_sum")}, inplace)
    return out["H"], out.get("D"), out.get("Hfp")
