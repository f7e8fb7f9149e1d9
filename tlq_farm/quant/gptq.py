"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) with the GPTAQ asymmetric target (Li et al. 2025, arXiv 2504.02692).

The solver quantizes W [out, in] column by column on the integer grid of grid.py, and after each column
spreads that column's rounding error over the columns not yet quantized, using rows of the upper Cholesky
factor of H^-1 (the paper's Hinv). Updates are applied lazily: inside a block of `blocksize` columns at
once, to the rest of the matrix once per block.

GPTAQ. With inputs X~ from the quantized chain and targets from the full-precision chain X, the layer's
objective is the weighted ||W X - W_hat X~||^2. With H = 2 X~ X~^T / n and D = 2 (X - X~) X~^T / n (so that
H + D = 2 X X~^T / n), it equals, up to a constant,
    tr(W_hat H W_hat^T) / 2 - tr(W_hat (H + D)^T W^T) = tr((W_hat - W*) H (W_hat - W*)^T) / 2 + const
with W* = W (H + D) H^-1 = W + W D H^-1, the least-squares solution. So the asymmetric problem is plain
GPTQ on (W*, H): same Hessian, shifted target, and the column-by-column updates stay exact. The solver
forms W* with the damped H_l = H + l I, the one GPTQ factorises: W* = W + W D H_l^-1 minimises the objective
plus the proximal term l ||W_hat - W||^2 / 2 (what damping adds in plain GPTQ too, whose target is W), and
that sum equals tr((W_hat - W*) H_l (W_hat - W*)^T) / 2 + const, so GPTQ on (W*, H_l) solves it.
With D = 0, W + W @ 0 @ Hinv == W in floating point, so GPTAQ reduces bitwise to GPTQ.
"""

from __future__ import annotations

import torch

from .grid import QuantResult, check_grid_args, dequantize_grouped, find_params, natural_g_idx, quantize_codes

# How many times the damping is multiplied by 10 after a failed Cholesky, before giving up.
DAMP_ESCALATIONS = 3
# A damp of 0 that fails is retried from this value upwards.
DAMP_RETRY_FLOOR = 1e-3


def _check_square(name: str, M: torch.Tensor, columns: int) -> None:
    if tuple(M.shape) != (columns, columns):
        raise ValueError(
            f"{name} has shape {tuple(M.shape)} but the weight has {columns} input columns: {name} must be "
            f"[{columns}, {columns}] (statistics of this layer's inputs)"
        )
    if not bool(torch.isfinite(M).all()):
        raise ValueError(
            f"{name} contains NaN or inf, so the Hessian is not positive definite: check this layer's "
            f"calibration activations (an earlier block may have diverged)"
        )


def fix_dead_columns(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs that never fire (H_ii == 0) carry no information: H_ii = 1 and W[:, i] = 0 (copies).

    Returns (W, H, dead mask [in]); W and H themselves when no column is dead (never changed in place).
    """
    dead = torch.diagonal(H) == 0
    if not bool(dead.any()):
        return W, H, dead  # nothing to fix: no copy of a Gram that may take gigabytes
    H = H.clone()
    W = W.clone()
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, dead


def damp_schedule(damp: float, escalations: int = DAMP_ESCALATIONS) -> list[float]:
    """The relative dampings tried in order: damp, then x10 each time (from DAMP_RETRY_FLOOR if damp is 0)."""
    base = max(damp, DAMP_RETRY_FLOOR)
    return [damp] + [base * 10**k for k in range(1, escalations + 1)]


def damped_inverse_factor(H: torch.Tensor, damp: float, keep_inverse: bool = False
                          ) -> tuple[torch.Tensor | None, torch.Tensor, float]:
    """Add damp * mean(diag H) to diag H, escalating damp until H and H^-1 both have Cholesky factors.

    H must be float64 and symmetric. Returns (Hinv = (H + lambda I)^-1 when keep_inverse, else None;
    U = upper Cholesky factor of Hinv; damp used). The damping is added to H in place and its diagonal is
    put back exactly after, and the inverse and its factor overwrite the Cholesky factor: besides H, one
    [in, in] matrix (two with keep_inverse) instead of four, which at 18944 columns is 2.9 GB each.
    """
    mean_diag = float(torch.diagonal(H).mean())
    diagonal = torch.diagonal(H).clone()
    info = torch.empty((), dtype=torch.int32, device=H.device)
    try:
        for d in damp_schedule(damp):
            H.diagonal().add_(d * mean_diag)
            L, status = torch.linalg.cholesky_ex(H)
            H.diagonal().copy_(diagonal)
            if int(status) != 0:
                continue
            torch.cholesky_inverse(L, out=L)  # L holds Hinv now
            Hinv = L.clone() if keep_inverse else None
            U, _ = torch.linalg.cholesky_ex(L, upper=True, out=(L, info))
            if int(info) != 0:
                continue
            return Hinv, U, d
    finally:
        H.diagonal().copy_(diagonal)
    tried = ", ".join(f"{d:g}" for d in damp_schedule(damp))
    raise ValueError(
        f"the Hessian is not positive definite even with damping {tried} (relative to mean diag H = "
        f"{mean_diag:.3g}): use more calibration samples for this layer, or a larger --damp"
    )


def _to_float32_in_place(M: torch.Tensor) -> torch.Tensor:
    """A float64 [n, n] matrix as float32 in the first half of its own storage, row by row (the same values
    as M.to(float32), without a second matrix beside it: 1.4 GB at 18944 columns). M is consumed."""
    n = M.shape[0]
    # LAPACK leaves factors column-major: work on the transpose then, whose rows are contiguous.
    base = M if M.is_contiguous() else M.T
    if not base.is_contiguous():
        return M.to(torch.float32)
    out = base.view(-1).view(torch.float32)[: n * n].view(n, n)
    for i in range(n):
        # Row i's float32 bytes overlap float64 rows up to i / 2, all converted already; the row is
        # converted into a temporary first, so no copy reads what it writes.
        out[i] = base[i].to(torch.float32)
    return out if base is M else out.T


def block_starts(columns: int, blocksize: int, group_size: int, dynamic_groups: bool) -> list[int]:
    """Column positions where a lazy block starts.

    Blocks are cut every `blocksize` columns and, when group grids are found during the solve, also at
    every group start: a group's grid is then taken when every column of it has received all updates.
    """
    starts = set(range(0, columns, blocksize))
    if dynamic_groups:
        starts |= set(range(0, columns, group_size))
    return sorted(starts)


def gptaq_target(W: torch.Tensor, D: torch.Tensor, Hinv: torch.Tensor) -> torch.Tensor:
    """W* = W + W D H^-1, the minimiser of ||W X - W_hat X~||^2 over W_hat (see the module docstring)."""
    return W + (W @ D) @ Hinv


def quadratic_trace(A: torch.Tensor, M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """tr(A M B^T) without forming the product's full square."""
    return ((A @ M) * B).sum()


def plain_loss(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T) / 2, E = W_hat - W: the weighted mean squared output error when H = 2 X X^T / n."""
    E = W_hat - W
    return float(quadratic_trace(E, H, E) / 2)


def asymmetric_loss(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor, D: torch.Tensor,
                    Hfp: torch.Tensor) -> float:
    """(tr(W Hfp W^T) - 2 tr(W_hat (H + D)^T W^T) + tr(W_hat H W_hat^T)) / 2 == mean ||W x - W_hat x~||^2."""
    return float((quadratic_trace(W, Hfp, W) - 2 * quadratic_trace(W_hat, (H + D).T, W)
                  + quadratic_trace(W_hat, H, W_hat)) / 2)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                  damp: float = 0.01, blocksize: int = 128, act_order: bool = False, static_groups: bool = False,
                  D: torch.Tensor | None = None, Hfp: torch.Tensor | None = None) -> QuantResult:
    """Quantize one linear layer's weight with GPTQ (or GPTAQ when D is given).

    Args:
        W: weight [out, in], any float dtype. Worked in float32 (float64 when W is float64); the Hessian's
            Cholesky factors are computed in float64.
        H: 2 sum_t w_t x~_t x~_t^T / sum_t w_t, [in, in] (hessian.finalize_hessian), x~ the layer's inputs on
            the quantized chain.
        bits: 2, 3, 4 or 8.
        group_size: input columns per grid (scale/zero), a divisor of in; -1 for one grid per output row.
        sym: symmetric grid (zero fixed at 2^(bits-1)) or asymmetric min-max grid.
        damp: relative damping: damp * mean(diag H) is added to diag H. Escalated x10 (up to
            DAMP_ESCALATIONS times) when a Cholesky factorisation fails.
        blocksize: columns per lazy block.
        act_order: process columns by descending diag(H) (most active inputs first).
        static_groups: find every group's grid up front on the unquantized weights, in natural column
            order; with act_order this keeps each group's columns contiguous (g_idx stays natural).
            Otherwise a group's grid is found when the solver reaches its first column, on the updated
            weights, and with act_order groups follow the processing order.
        D: GPTAQ cross term 2 sum_t w_t (x_t - x~_t) x~_t^T / sum_t w_t, [in, in] (x the full-precision
            chain's inputs). The target becomes W* = W + W D H^-1 (module docstring).
        Hfp: 2 sum_t w_t x_t x_t^T / sum_t w_t, [in, in]; with D it makes `loss` the exact asymmetric
            objective.

    Returns QuantResult in the original column order:
        weight: dequantized weight, float32 [out, in]; codes: int32 [out, in] in [0, 2^bits - 1];
        scale: float32 [out, n_groups]; zero: int32 [out, n_groups]; g_idx: int32 [in], group of each
        column (with act_order and dynamic groups, g_idx[j] = (position of j in perm) // group_size);
        loss: the weighted output error of `weight`, in float64 with the undamped H:
            tr(E H E^T) / 2 with E = weight - W (plain GPTQ);
            mean ||W x - weight x~||^2 via H, D, Hfp (GPTAQ with Hfp);
            tr(E* H E*^T) / 2 with E* = weight - W* (GPTAQ without Hfp: the objective's excess over its
            optimum when the damping is negligible);
        perm: the processing order (int64 [in]) with act_order, else None; damp_used: the damping used.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D weight [out, in], got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point weight, got dtype {W.dtype}")
    out_f, in_f = W.shape
    check_grid_args(in_f, bits, group_size)
    if blocksize < 1:
        raise ValueError(f"blocksize={blocksize} is not valid: use a positive number of columns (e.g. 128)")
    if not (damp >= 0 and damp < float("inf")):
        raise ValueError(f"damp={damp} is not valid: use a finite relative damping >= 0 (e.g. 0.01)")
    if Hfp is not None and D is None:
        raise ValueError("Hfp was given without D: the full-precision Gram only enters the GPTAQ loss; "
                         "pass D as well (hessian.finalize_hessian with x_fp) or neither")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains NaN or inf: the layer's weights must be finite before quantization")
    device = W.device
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    H = H.to(device=device, dtype=torch.float64)
    _check_square("H", H, in_f)
    if D is not None:
        D = D.to(device=device, dtype=torch.float64)
        _check_square("D", D, in_f)
    if Hfp is not None:
        Hfp = Hfp.to(device=device, dtype=torch.float64)
        _check_square("Hfp", Hfp, in_f)

    W_orig = W.to(torch.float64)
    W_start, H_fixed, dead = fix_dead_columns(W_orig, H)
    perm = (torch.argsort(torch.diagonal(H_fixed), descending=True, stable=True) if act_order
            else torch.arange(in_f, device=device))
    Hp = H_fixed[perm][:, perm] if act_order else H_fixed
    Hinv, U, damp_used = damped_inverse_factor(Hp, damp, keep_inverse=D is not None)
    del Hp

    W_target = None  # W* in original order, for the loss without Hfp
    if D is not None:
        # W X reads every full-precision input, also those dead on the quantized chain: use W before zeroing.
        Wp_target = gptaq_target(W_orig[:, perm], D[perm][:, perm], Hinv)
        Wp_target[:, dead[perm]] = 0
        W_target = torch.empty_like(Wp_target)
        W_target[:, perm] = Wp_target
        W_start = W_target
    del Hinv
    Wq_work = W_start[:, perm].to(work)
    U = _to_float32_in_place(U) if work == torch.float32 else U

    gs = in_f if group_size == -1 else group_size
    n_groups = in_f // gs
    scale = torch.empty(out_f, n_groups, dtype=work, device=device)
    zero = torch.empty(out_f, n_groups, dtype=torch.int32, device=device)
    if static_groups:
        W_natural = W_start.to(work)
        for g in range(n_groups):
            scale[:, g], zero[:, g] = find_params(W_natural[:, g * gs:(g + 1) * gs], bits, sym)
        group_of_position = (perm // gs).tolist()
    else:
        group_of_position = [pos // gs for pos in range(in_f)]

    codes_p = torch.empty(out_f, in_f, dtype=torch.int32, device=device)
    starts = block_starts(in_f, blocksize, gs, dynamic_groups=not static_groups)
    for i1, i2 in zip(starts, starts[1:] + [in_f]):
        count = i2 - i1
        W1 = Wq_work[:, i1:i2].clone()
        Err1 = torch.zeros(out_f, count, dtype=work, device=device)
        U1 = U[i1:i2, i1:i2]
        for i in range(count):
            pos = i1 + i
            if not static_groups and pos % gs == 0:
                # pos == i1 (blocks are cut at group starts), so every column of the group is up to date.
                scale[:, pos // gs], zero[:, pos // gs] = find_params(Wq_work[:, pos:pos + gs], bits, sym)
            g = group_of_position[pos]
            s, z = scale[:, g], zero[:, g].to(work)
            w = W1[:, i]
            c = quantize_codes(w, s, zero[:, g], bits)
            codes_p[:, pos] = c
            q = s * (c.to(work) - z)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Wq_work[:, i2:] -= Err1 @ U[i1:i2, i2:]

    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    if static_groups:
        g_idx = natural_g_idx(in_f, group_size).to(device)
    else:
        g_idx = torch.empty(in_f, dtype=torch.int32, device=device)
        g_idx[perm] = (torch.arange(in_f, device=device) // gs).to(torch.int32)
    scale = scale.to(torch.float32)
    weight = dequantize_grouped(codes, scale, zero, g_idx)

    W_hat = weight.to(torch.float64)
    if D is None:
        loss = plain_loss(W_hat, W_orig, H)
    elif Hfp is not None:
        loss = asymmetric_loss(W_hat, W_orig, H, D, Hfp)
    else:
        loss = plain_loss(W_hat, W_target, H)
    return QuantResult(weight=weight, codes=codes, scale=scale, zero=zero, g_idx=g_idx, loss=loss, bits=bits,
                       group_size=group_size, sym=sym, perm=perm if act_order else None, damp_used=damp_used)
