"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) with the GPTAQ asymmetric target (Li et al. 2025, arXiv 2504.02692).

The solver quantizes W [out, in] column by column on the integer grid of grid.py, and after each column
spreads that column's rounding error over the columns not yet quantized, using rows of the upper Cholesky
factor U of H^-1 (the paper's Hinv, H^-1 = U^T U). Updates are applied lazily: inside a block of `blocksize`
columns at once, to the rest of the matrix once per block.

Factorisation. U comes from one Cholesky factorisation (float64) and one triangular inverse (in the work
dtype, float32 unless W is float64), in H's own storage: with J the reversal of the column order,
J H J = L L^T gives H = (J L J)(J L J)^T, J L J upper, so H^-1 = U^T U with U = J L^-1 J. That is 2 n^3 / 3
flops, against 4 n^3 / 3 for the textbook chain (Cholesky, inverse from it, Cholesky of the inverse), and
no [in, in] matrix besides H.

GPTAQ. With inputs X~ from the quantized chain and targets from the full-precision chain X, the layer's
objective is the weighted ||W X - W_hat X~||^2. With H = 2 X~ X~^T / n and D = 2 (X - X~) X~^T / n (so that
H + D = 2 X X~^T / n), it equals, up to a constant,
    tr(W_hat H W_hat^T) / 2 - tr(W_hat (H + D)^T W^T) = tr((W_hat - W*) H (W_hat - W*)^T) / 2 + const
with W* = W (H + D) H^-1 = W + W D H^-1, the least-squares solution. So the asymmetric problem is plain
GPTQ on (W*, H): same Hessian, shifted target, and the column-by-column updates stay exact. The solver
forms W* with the damped H_l = H + l I, the one GPTQ factorises: W* = W + W D H_l^-1 minimises the objective
plus the proximal term l ||W_hat - W||^2 / 2 (what damping adds in plain GPTQ too, whose target is W), and
that sum equals tr((W_hat - W*) H_l (W_hat - W*)^T) / 2 + const, so GPTQ on (W*, H_l) solves it.
D enters only through W D ([out, in]) and the full-precision Gram Hfp only through tr(W Hfp W^T), so
statistics can be reduced to those (hessian.reduce_partials with W) and W D H_l^-1 = ((W D) U^T) U.
With D = 0, W + 0 == W in floating point, so GPTAQ reduces bitwise to GPTQ.

Loss. With Err the column loop's scaled errors (err_j = (w_j - q_j) / U_jj), E = W_hat - W* = -Err U and
H_l = U^-1 U^-T, so tr(E H_l E^T) = ||Err||_F^2 and tr(E H E^T) = ||Err||_F^2 - l ||E||_F^2 in exact
arithmetic: the loss comes from the loop in O(out * in), not from a float64 product with H in O(out * in^2).
The GPTAQ objective adds terms of W D, tr(W Hfp W^T) and tr(W H W^T) (docs/methods.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .grid import QuantResult, check_grid_args, dequantize_contiguous, find_params, natural_g_idx, qmax

# How many times the damping is multiplied by 10 after a failed Cholesky, before giving up.
DAMP_ESCALATIONS = 3
# A damp of 0 that fails is retried from this value upwards.
DAMP_RETRY_FLOOR = 1e-3
# Columns per step of the float64 factorisations and triangular products: matrix products large enough to run
# near the BLAS peak, temporaries of [in, FACTOR_BLOCK] only.
FACTOR_BLOCK = 512


def _all_finite(M: torch.Tensor, rows: int = 64) -> bool:
    """Whether M has no NaN or inf: its sum first (one pass, no temporary); only when that is not finite (a NaN,
    an inf, or an overflowing sum of finite values), isfinite over row slabs, with no [in, in] temporary."""
    if bool(torch.isfinite(M.sum())):
        return True
    return all(bool(torch.isfinite(M[i:i + rows]).all()) for i in range(0, M.shape[0], rows))


def _check_square(name: str, M: torch.Tensor, columns: int) -> None:
    if tuple(M.shape) != (columns, columns):
        raise ValueError(
            f"{name} has shape {tuple(M.shape)} but the weight has {columns} input columns: {name} must be "
            f"[{columns}, {columns}] (statistics of this layer's inputs)"
        )
    if not _all_finite(M):
        raise ValueError(
            f"{name} contains NaN or inf, so the Hessian is not positive definite: check this layer's "
            f"calibration activations (an earlier block may have diverged)"
        )


def damp_schedule(damp: float, escalations: int = DAMP_ESCALATIONS) -> list[float]:
    """The relative dampings tried in order: damp, then x10 each time (from DAMP_RETRY_FLOOR if damp is 0)."""
    base = max(damp, DAMP_RETRY_FLOOR)
    return [damp] + [base * 10**k for k in range(1, escalations + 1)]


# ---- in-place reorderings of a square float64 matrix (no second [in, in] matrix) ---------------------------

def reverse_(M: torch.Tensor, chunk: int = 1 << 20) -> None:
    """M <- J M J (rows and columns in reverse order), in place: for a contiguous square matrix this is the
    reversal of its flat storage."""
    flat = M.view(-1)
    n = flat.numel()
    for start in range(0, n // 2, chunk):
        c = min(chunk, n // 2 - start)
        head, tail = flat[start:start + c], flat[n - start - c:n - start]
        saved = head.clone()
        head.copy_(tail.flip(0))
        tail.copy_(saved.flip(0))


def permute_rows_(M: torch.Tensor, order: list[int]) -> None:
    """M <- M[order] in place, following the permutation's cycles with one row of temporary."""
    done = [False] * len(order)
    for start in range(len(order)):
        if done[start]:
            continue
        done[start] = True
        if order[start] == start:
            continue
        saved = M[start].clone()
        i = start
        while order[i] != start:
            M[i].copy_(M[order[i]])
            i = order[i]
            done[i] = True
        M[i].copy_(saved)


def transpose_(M: torch.Tensor, tile: int = FACTOR_BLOCK) -> None:
    """M <- M^T in place, tile pair by tile pair."""
    n = M.shape[0]
    for i in range(0, n, tile):
        a = M[i:i + tile, i:i + tile]
        a.copy_(a.T.clone())
        for j in range(i + tile, n, tile):
            a, b = M[i:i + tile, j:j + tile], M[j:j + tile, i:i + tile]
            saved = a.clone()
            a.copy_(b.T)
            b.copy_(saved.T)


def permute_symmetric_(M: torch.Tensor, order: torch.Tensor) -> None:
    """M <- M[order][:, order] in place (rows, transpose, rows, transpose: exact for any square M)."""
    order_list = order.tolist()
    for _ in range(2):
        permute_rows_(M, order_list)
        transpose_(M)


def mirror_upper_(M: torch.Tensor, tile: int = FACTOR_BLOCK) -> None:
    """Strict lower triangle <- strict upper triangle transposed, in place. cholesky_lower_ leaves the strict
    upper triangle untouched, so this restores the matrix (but its diagonal) after a failed factorisation."""
    n = M.shape[0]
    for i in range(0, n, tile):
        a = M[i:i + tile, i:i + tile]
        a.copy_(torch.triu(a) + torch.triu(a, 1).T)
        for j in range(i + tile, n, tile):
            M[j:j + tile, i:i + tile] = M[i:i + tile, j:j + tile].T


# ---- float64 factorisations in place -----------------------------------------------------------------------

def cholesky_lower_(G: torch.Tensor, shift: float = 0.0, blocksize: int = FACTOR_BLOCK) -> int:
    """Factor G + shift I = L L^T in place (left-looking, block column by block column).

    Reads and writes only the lower triangle and the diagonal of G; the strict upper triangle is left as it
    was (mirror_upper_ restores G from it). Returns 0 on success, else the 1-based index of the first
    column whose pivot is not positive, or below n * eps of its diagonal entry: an exactly singular G can
    leave a rounding-sized positive pivot instead of 0, and its factor would amplify rounding noise. G then
    holds a partial factor in its lower triangle.
    """
    n = G.shape[0]
    tol = n * torch.finfo(G.dtype).eps
    for j0 in range(0, n, blocksize):
        j1 = min(j0 + blocksize, n)
        b = j1 - j0
        C = G[j0:, j0:j1].clone()
        if j0 > 0:
            C.addmm_(G[j0:, :j0], G[j0:j1, :j0].T, alpha=-1.0)
        if shift:
            C[:b].diagonal().add_(shift)
        Ljj, info = torch.linalg.cholesky_ex(C[:b])
        if int(info) != 0:
            return j0 + int(info)
        small = Ljj.diagonal().square() <= tol * (G[j0:j1, j0:j1].diagonal() + shift)
        if bool(small.any()):
            return j0 + 1 + int(small.nonzero()[0])
        if j1 < n:
            G[j1:, j0:j1] = torch.linalg.solve_triangular(Ljj, C[b:].T, upper=False).T
        diagonal_block = G[j0:j1, j0:j1]
        lower = torch.ones(b, b, dtype=torch.bool, device=G.device).tril()
        diagonal_block.copy_(torch.where(lower, Ljj, diagonal_block))
    return 0


def invert_lower_(L: torch.Tensor, blocksize: int = FACTOR_BLOCK) -> None:
    """L <- L^-1 in place for a lower-triangular L with zeros above the diagonal (n^3 / 3 flops).

    Block columns from the last: X_jj = L_jj^-1 and X_(>j),j = -X_(>j),(>j) L_(>j),j X_jj, where X_(>j),(>j)
    is already inverted in place and is multiplied one row block at a time up to its diagonal."""
    n = L.shape[0]
    for j0 in reversed(range(0, n, blocksize)):
        j1 = min(j0 + blocksize, n)
        b = j1 - j0
        eye = torch.eye(b, dtype=L.dtype, device=L.device)
        Xjj = torch.linalg.solve_triangular(L[j0:j1, j0:j1], eye, upper=False)
        if j1 < n:
            column = L[j1:, j0:j1]
            product = torch.empty(n - j1, b, dtype=L.dtype, device=L.device)
            for r0 in range(j1, n, blocksize):
                r1 = min(r0 + blocksize, n)
                torch.mm(L[r0:r1, j1:r1], column[:r1 - j1], out=product[r0 - j1:r1 - j1])
            column.copy_(product @ Xjj).neg_()
        L[j0:j1, j0:j1] = Xjj


def damped_cholesky_(G: torch.Tensor, damp: float, mean_diag: float) -> tuple[float, float]:
    """Factor G + lambda I = L L^T in place (G <- L, zeros above the diagonal), lambda = damp * mean_diag,
    escalating damp (damp_schedule) until the factorisation succeeds. G must be float64, contiguous.

    Only G's upper triangle and diagonal are read: a failed attempt is undone from them. Returns (damp used,
    lambda used)."""
    diagonal = G.diagonal().clone()
    for d in damp_schedule(damp):
        mirror_upper_(G)
        G.diagonal().copy_(diagonal)
        if cholesky_lower_(G, shift=d * mean_diag) == 0:
            G.tril_()
            return d, d * mean_diag
    mirror_upper_(G)
    G.diagonal().copy_(diagonal)
    tried = ", ".join(f"{d:g}" for d in damp_schedule(damp))
    raise ValueError(
        f"the Hessian is not positive definite even with damping {tried} (relative to mean diag H = "
        f"{mean_diag:.3g}): use more calibration samples for this layer, or a larger --damp"
    )


def _to_float32_in_place(M: torch.Tensor) -> torch.Tensor:
    """A float64 [n, n] matrix as float32 in the first half of its own storage, row by row (the same values
    as M.to(float32), without a second matrix beside it: 1.4 GB at 18944 columns). M is consumed."""
    n = M.shape[0]
    # A column-major matrix (a transposed view): work on its transpose, whose rows are contiguous.
    base = M if M.is_contiguous() else M.T
    if not base.is_contiguous():
        return M.to(torch.float32)
    out = base.view(-1).view(torch.float32)[: n * n].view(n, n)
    for i in range(n):
        # Row i's float32 bytes overlap float64 rows up to i / 2, all converted already; the row is
        # converted into a temporary first, so no copy reads what it writes.
        out[i] = base[i].to(torch.float32)
    return out if base is M else out.T


# ---- products with triangular factors, blocked so that only their nonzero half is multiplied ----------------

def times_upper(A: torch.Tensor, U: torch.Tensor, blocksize: int = FACTOR_BLOCK) -> torch.Tensor:
    """A U for an upper-triangular U (zeros below the diagonal), in A's dtype (U's blocks converted)."""
    out = torch.empty(A.shape[0], U.shape[1], dtype=A.dtype, device=A.device)
    for j0 in range(0, U.shape[1], blocksize):
        j1 = min(j0 + blocksize, U.shape[1])
        out[:, j0:j1] = A[:, :j1] @ U[:j1, j0:j1].to(A.dtype)
    return out


def times_upper_t(A: torch.Tensor, U: torch.Tensor, blocksize: int = FACTOR_BLOCK) -> torch.Tensor:
    """A U^T for an upper-triangular U (zeros below the diagonal), in A's dtype (U's blocks converted)."""
    out = torch.empty(A.shape[0], U.shape[0], dtype=A.dtype, device=A.device)
    for j0 in range(0, U.shape[0], blocksize):
        j1 = min(j0 + blocksize, U.shape[0])
        out[:, j0:j1] = A[:, j0:] @ U[j0:j1, j0:].T.to(A.dtype)
    return out


def sq_norm_times_lower(A: torch.Tensor, L: torch.Tensor, blocksize: int = FACTOR_BLOCK) -> float:
    """||A L||_F^2 for a lower-triangular L, one block column of A L at a time (= tr(A L L^T A^T))."""
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for j0 in range(0, L.shape[1], blocksize):
        j1 = min(j0 + blocksize, L.shape[1])
        total += (A[:, j0:] @ L[j0:, j0:j1]).square().sum()
    return float(total)


def quadratic_trace(A: torch.Tensor, M: torch.Tensor, B: torch.Tensor) -> float:
    """tr(A M B^T) in float64 without forming the product's full square (2 out in^2 flops)."""
    return float(((A @ M) * B).sum())


def plain_loss(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T) / 2, E = W_hat - W: the weighted mean squared output error when H = 2 X X^T / n."""
    E = W_hat.to(torch.float64) - W.to(torch.float64)
    return quadratic_trace(E, H, E) / 2


def asymmetric_loss(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor, WD: torch.Tensor, WHfpW: float) -> float:
    """(tr(W Hfp W^T) - 2 tr(W_hat (H + D)^T W^T) + tr(W_hat H W_hat^T)) / 2 == mean ||W x - W_hat x~||^2, with
    tr(W_hat D^T W^T) = <W_hat, W D>."""
    W_hat = W_hat.to(torch.float64)
    return (WHfpW - 2 * (quadratic_trace(W.to(torch.float64), H, W_hat) + inner(W_hat, WD))
            + quadratic_trace(W_hat, H, W_hat)) / 2


def sq_distance(A: torch.Tensor, B: torch.Tensor, rows: int = 256) -> float:
    """||A - B||_F^2 in float64, a slab of rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for i in range(0, A.shape[0], rows):
        total += (A[i:i + rows].to(torch.float64) - B[i:i + rows].to(torch.float64)).square().sum()
    return float(total)


def inner(A: torch.Tensor, B: torch.Tensor, rows: int = 256) -> float:
    """<A, B> = sum(A * B) = tr(A B^T) in float64, a slab of rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for i in range(0, A.shape[0], rows):
        total += (A[i:i + rows].to(torch.float64) * B[i:i + rows].to(torch.float64)).sum()
    return float(total)


# ---- the solver ------------------------------------------------------------------------------------------

def block_starts(columns: int, blocksize: int, group_size: int, dynamic_groups: bool) -> list[int]:
    """Column positions where a lazy block starts.

    Blocks are cut every `blocksize` columns and, when group grids are found during the solve, also at
    every group start: a group's grid is then taken when every column of it has received all updates.
    """
    starts = set(range(0, columns, blocksize))
    if dynamic_groups:
        starts |= set(range(0, columns, group_size))
    return sorted(starts)


def inverse_factor_(H: torch.Tensor, damp: float, perm: torch.Tensor | None,
                    before_inverse=None, inverse_dtype: torch.dtype = torch.float64
                    ) -> tuple[torch.Tensor, float, float]:
    """U, the upper Cholesky factor of (H[perm][:, perm] + lambda I)^-1, in H's own storage (H is consumed).

    H: float64, contiguous, symmetric (its lower triangle in the permuted order is what is factored, as LAPACK
    reads it). lambda = damp * mean(diag H), damp escalated on failure (damped_cholesky_).
    before_inverse(L, lambda): called with the Cholesky factor of J (H[perm][:, perm] + lambda I) J, J the
    reversal, before it is overwritten. inverse_dtype: float64, or float32 for the triangular inverse and U
    in the first half of H's storage. The Cholesky is float64 always: its rounding grows with cond(H), that
    of the inverse of its factor with cond(L) = cond(H)^(1/2), so a float32 inverse is as accurate as the
    float32 U that the column loop uses, at a third of the time. Returns (U, damp used, lambda used).
    """
    if perm is not None:
        permute_symmetric_(H, perm)
    mean_diag = float(torch.diagonal(H).mean())
    reverse_(H)
    damp_used, lam = damped_cholesky_(H, damp, mean_diag)
    if before_inverse is not None:
        before_inverse(H, lam)
    if inverse_dtype == torch.float32:
        H = _to_float32_in_place(H)
    invert_lower_(H)
    reverse_(H)
    return H, damp_used, lam


def gptaq_target(W: torch.Tensor, WD: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """W* = W + W D H_l^-1 = W + ((W D) U^T) U (float64 [out, in]; H_l^-1 = U^T U, module docstring)."""
    W_star = times_upper(times_upper_t(WD, U), U)
    W_star += W
    return W_star


def quantize_columns(W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int,
                     group_size: int, sym: bool, blocksize: int, group_of_position: list[int] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop (arXiv 2210.17323, Algorithm 1, with lazy batches) on W [out, in] in the processing
    order, in place (W is the work copy; it ends as the weights before their last column's rounding).

    U: the upper Cholesky factor of H_l^-1 in the same order, W's dtype. scale, zero [out, n_groups]: filled
    group by group when group_of_position is None (dynamic groups: a group's grid is found at its first
    column, on the updated weights), else given (static groups), group_of_position[j] being column j's group.
    Returns (codes int32 [out, in], ||Err||_F^2 in float64: tr(E H_l E^T), the damped loss times 2).
    """
    out_f, in_f = W.shape
    work = W.dtype
    top = float(qmax(bits))
    codes = torch.empty(out_f, in_f, dtype=torch.int32, device=W.device)
    err_sq = torch.zeros((), dtype=torch.float64, device=W.device)
    dynamic = group_of_position is None
    starts = block_starts(in_f, blocksize, group_size, dynamic_groups=dynamic)
    for i1, i2 in zip(starts, starts[1:] + [in_f]):
        count = i2 - i1
        # The block transposed: column i is row i, contiguous, so each step is a few in-place vector ops on
        # rows and one rank-1 update (addr_) of the rows after it, with no temporaries.
        W1 = W[:, i1:i2].T.contiguous()
        Err1 = torch.empty(count, out_f, dtype=work, device=W.device)
        C1 = torch.empty(count, out_f, dtype=work, device=W.device)  # the block's codes, as floats
        U1 = U[i1:i2, i1:i2]
        diag = U1.diagonal().tolist()
        if dynamic or len(set(group_of_position[i1:i2])) == 1:
            # One grid for the whole block: its columns are rounded on the grid's own scale.
            g = i1 // group_size if dynamic else group_of_position[i1]
            if dynamic and i1 % group_size == 0:
                scale[:, g], zero[:, g] = find_params(W[:, i1:i1 + group_size], bits, sym)
            _round_block_on_one_grid(W1, U1, diag, scale[:, g], zero[:, g].to(work), top, C1, Err1)
        else:
            _round_block_column_by_column(W1, U1, diag, i1, scale, zero, group_of_position, top, C1, Err1)
        codes[:, i1:i2] = C1.T  # whole numbers in [0, 2^bits - 1]: exact as int32
        if i2 < in_f:
            W[:, i2:].addmm_(Err1.T, U[i1:i2, i2:], alpha=-1)
        err_sq += Err1.to(torch.float64).square().sum()
    return codes, err_sq


def _round_block_on_one_grid(W1: torch.Tensor, U1: torch.Tensor, diag: list[float], s: torch.Tensor,
                             z: torch.Tensor, top: float, C1: torch.Tensor, Err1: torch.Tensor) -> None:
    """The column loop over one lazy block whose columns share a grid (s, z [out]), on the grid's scale:
    V = W1 / s + z, so that a column's code is clamp(round(v), 0, qmax) and its error (v - c) s / U_ii; the
    rank-1 updates are made in the same units (s is per row, the same for every column of the block), four
    vector operations per column instead of nine. W1 [count, out] (rows = columns) is consumed; C1 gets the
    codes as floats, Err1 the errors (w - q) / U_ii."""
    count = W1.shape[0]
    V = W1.div_(s).add_(z)
    rows, codes, errs = V.unbind(0), C1.unbind(0), Err1.unbind(0)
    for i in range(count):
        v, c, e = rows[i], codes[i], errs[i]
        torch.round(v, out=c)
        c.clamp_(0, top)
        torch.sub(v, c, out=e)
        if i + 1 < count:
            V[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1 / diag[i])
    Err1.mul_(s).div_(torch.tensor(diag, dtype=Err1.dtype, device=Err1.device)[:, None])


def _round_block_column_by_column(W1: torch.Tensor, U1: torch.Tensor, diag: list[float], i1: int,
                                  scale: torch.Tensor, zero: torch.Tensor, group_of_position: list[int],
                                  top: float, C1: torch.Tensor, Err1: torch.Tensor) -> None:
    """The column loop over a lazy block whose columns use several grids (static groups in act-order): each
    column rounded on its own group's grid."""
    work = W1.dtype
    grid_of = None
    for i in range(W1.shape[0]):
        g = group_of_position[i1 + i]
        if g != grid_of:
            s, z, grid_of = scale[:, g], zero[:, g].to(work), g
        w, c, err = W1[i], C1[i], Err1[i]
        torch.div(w, s, out=c)  # c = clamp(round(w / s) + z, 0, qmax): round_to_grid, in place
        c.round_().add_(z).clamp_(0, top)
        torch.sub(c, z, out=err)  # err = (w - s (c - z)) / U[i, i]
        err.mul_(s)
        torch.sub(w, err, out=err)
        err.div_(diag[i])
        if i + 1 < W1.shape[0]:
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)


def loop_loss(err_sq: float, lam: float, W_hat: torch.Tensor, W_target: torch.Tensor) -> float:
    """tr(E H E^T) / 2 = (||Err||_F^2 - lambda ||E||_F^2) / 2, E = W_hat - W_target (module docstring)."""
    return (err_sq - lam * sq_distance(W_hat, W_target)) / 2


def gptaq_loop_loss(err_sq: float, lam: float, W_hat: torch.Tensor, W: torch.Tensor, WHfpW: float, WHW: float,
                    cross: float) -> float:
    """mean ||W x - W_hat x~||^2 = (tr(W Hfp W^T) - tr(W H W^T) - <W + W*, W D>) / 2
                                  + (||Err||_F^2 - lambda ||W_hat - W||_F^2) / 2          (docs/methods.md)
    with WHfpW = tr(W Hfp W^T), WHW = tr(W H W^T), cross = <W + W*, W D>; W without its dead columns."""
    return (WHfpW - WHW - cross) / 2 + loop_loss(err_sq, lam, W_hat, W)


def _clock(timings: dict | None):
    """A function that adds the seconds since its last call to timings[phase] (nothing when timings is None)."""
    last = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        if timings is not None:
            timings[phase] = timings.get(phase, 0.0) + now - last[0]
        last[0] = now

    return lap


@dataclass
class HessianFactor:
    """What plain GPTQ's column loop needs of a Hessian, once factored: the upper Cholesky factor U of the
    damped (and, with act-order, permuted) inverse in the work dtype, the processing order, the inputs that
    never fire, and the damping used. Linears fed the same inputs (q/k/v, gate/up) share one."""

    U: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp_used: float
    lam: float


def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                  damp: float = 0.01, blocksize: int = 128, act_order: bool = False, static_groups: bool = False,
                  D: torch.Tensor | None = None, Hfp: torch.Tensor | None = None, WD: torch.Tensor | None = None,
                  WHfpW: float | torch.Tensor | None = None, overwrite_H: bool = False,
                  exact_loss: bool | None = None, timings: dict | None = None,
                  factor: HessianFactor | None = None, keep_factor: list | None = None) -> QuantResult:
    """Quantize one linear layer's weight with GPTQ (or GPTAQ when D or WD is given).

    Args:
        W: weight [out, in], any float dtype. Worked in float32 (float64 when W is float64); the Hessian's
            factorisations are computed in float64.
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
        WD, WHfpW: instead of D and Hfp, what the solver needs of them: W D ([out, in]) and tr(W Hfp W^T)
            (a number), as hessian.reduce_partials(..., W=W) and finalize_stats give them.
        overwrite_H: H is float64 and may be destroyed: the factorisation then runs in its storage, with no
            [in, in] copy (not with exact_loss, which keeps H).
        exact_loss: compute `loss` with the float64 formulas on H (2 out in^2 flops, and H kept) instead of
            from the column loop's errors. Default: exact when W is float64 (the reference-exact path).
        timings: when a dict, the seconds of each phase are added to it: "factor" (the float64 factorisation),
            "target" (GPTAQ's W D H^-1), "loop" (the column loop), "loss".
        factor: H already factored (a HessianFactor from keep_factor, for a linear fed the same inputs): H is
            then not read (pass None), and the result is the one H would give. Plain GPTQ with the loop's
            loss only (not GPTAQ, not exact_loss), with the same damp and act_order.
        keep_factor: when a list, the HessianFactor of this solve is appended to it (plain GPTQ with the
            loop's loss only; nothing otherwise): its U is not changed by the loop.

    Returns QuantResult in the original column order:
        weight: dequantized weight, float32 [out, in]; codes: int32 [out, in] in [0, 2^bits - 1];
        scale: float32 [out, n_groups]; zero: int32 [out, n_groups]; g_idx: int32 [in], group of each
        column (with act_order and dynamic groups, g_idx[j] = (position of j in perm) // group_size);
        loss: the weighted output error of `weight` with the undamped H (from the column loop's errors, float64
        sums of the loop's float32 errors, see the module docstring; or exact_loss):
            tr(E H E^T) / 2 with E = weight - W (plain GPTQ);
            mean ||W x - weight x~||^2 via H, D, Hfp (GPTAQ with Hfp or WHfpW);
            tr(E* H E*^T) / 2 with E* = weight - W* (GPTAQ without Hfp: the objective's excess over its
            optimum when the damping is negligible);
        perm: the processing order (int64 [in]) with act_order, else None; damp_used: the damping used.
    """
    lap = _clock(timings)
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
    if WD is not None and (D is not None or Hfp is not None):
        raise ValueError("WD was given with D or Hfp: pass either the Grams (D, Hfp) or the products (WD, WHfpW) "
                         "that hessian.reduce_partials(..., W=W) makes of them, not both")
    if WHfpW is not None and WD is None:
        raise ValueError("WHfpW was given without WD: tr(W Hfp W^T) only enters the GPTAQ loss; pass WD as well "
                         "(hessian.reduce_partials(..., W=W)) or neither")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains NaN or inf: the layer's weights must be finite before quantization")
    device = W.device
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    gptaq = D is not None or WD is not None
    exact = work == torch.float64 if exact_loss is None else bool(exact_loss)
    if factor is not None:
        if gptaq or exact:
            raise ValueError("a HessianFactor serves plain GPTQ with the loop's loss only: pass H for GPTAQ or "
                             "exact_loss")
        if tuple(factor.U.shape) != (in_f, in_f) or factor.U.dtype != work:
            raise ValueError(f"the HessianFactor is {tuple(factor.U.shape)} {factor.U.dtype}, not the {in_f} x {in_f} "
                             f"{work} this weight needs: it belongs to another layer")
    else:
        _check_square("H", H, in_f)
    # GPTAQ's target and loss terms are float64 products with W; plain GPTQ needs W only in the work dtype.
    W64 = W.to(torch.float64) if gptaq else None  # never written to: it is W itself when W is float64
    if D is not None:
        D = D.to(device=device, dtype=torch.float64)
        _check_square("D", D, in_f)
        WD = W64 @ D
        if Hfp is not None:
            Hfp = Hfp.to(device=device, dtype=torch.float64)
            _check_square("Hfp", Hfp, in_f)
            WHfpW = inner(W64 @ Hfp, W64)
        del D, Hfp
        lap("target")
    elif WD is not None:
        if tuple(WD.shape) != (out_f, in_f):
            raise ValueError(f"WD has shape {tuple(WD.shape)} but W has {(out_f, in_f)}: WD must be W D, "
                             f"[out, in] (hessian.reduce_partials(..., W=W))")
        WD = WD.to(device=device, dtype=torch.float64)
        if not _all_finite(WD):
            raise ValueError("WD contains NaN or inf: check this layer's full-precision calibration activations")
    if WHfpW is not None:
        WHfpW = float(WHfpW)

    H_exact = H.to(device=device, dtype=torch.float64) if exact else None
    if factor is not None:
        dead, perm = factor.dead, factor.perm
    else:
        if overwrite_H and not exact and H.dtype == torch.float64 and H.device == device and H.is_contiguous():
            Hw = H
        else:
            Hw = torch.empty(in_f, in_f, dtype=torch.float64, device=device)
            Hw.copy_(H)
        # Inputs that never fire (H_ii == 0) carry no information: H_ii = 1 and W[:, i] = 0.
        dead = torch.diagonal(Hw) == 0
        if bool(dead.any()):
            Hw.diagonal()[dead] = 1
        perm = torch.argsort(torch.diagonal(Hw), descending=True, stable=True) if act_order else None
    any_dead = bool(dead.any())

    def without_dead(M: torch.Tensor) -> torch.Tensor:
        if not any_dead:
            return M
        M = M.clone()
        M[:, dead] = 0
        return M

    def in_solver_order(M: torch.Tensor) -> torch.Tensor:
        return M[:, perm] if perm is not None else M

    loop_loss_terms = WHfpW is not None and not exact
    trace_WHW = None

    def measure_WHW(L: torch.Tensor, lam: float) -> None:
        # tr(W H W^T) for the GPTAQ loss, while the Cholesky factor of the (permuted, reversed) damped H is there:
        # tr(W0 (H + lambda I) W0^T) = ||W0 J L||^2 with W0 = W without its dead columns.
        nonlocal trace_WHW
        lap("factor")
        W0 = without_dead(W64)
        trace_WHW = sq_norm_times_lower(in_solver_order(W0).flip(1), L) - lam * inner(W0, W0)
        lap("loss")

    if factor is not None:
        U, damp_used, lam = factor.U, factor.damp_used, factor.lam
    else:
        U, damp_used, lam = inverse_factor_(Hw, damp, perm, measure_WHW if loop_loss_terms else None,
                                            inverse_dtype=work)
        del Hw
    lap("factor")

    cross = None
    if gptaq:
        # W X reads every full-precision input, also those dead on the quantized chain: W before zeroing.
        W_star_p = gptaq_target(in_solver_order(W64), in_solver_order(WD), U)
        if loop_loss_terms:
            cross = inner(W_star_p, in_solver_order(WD)) + inner(W64, WD)
        if any_dead:
            W_star_p[:, dead[perm] if perm is not None else dead] = 0
        if perm is not None:
            W_start = torch.empty_like(W_star_p)
            W_start[:, perm] = W_star_p
        else:
            W_start = W_star_p
        Wq_work = W_star_p.to(work, copy=True)  # the loop works in place; W_start stays the target
        del W_star_p
        if not exact:
            del WD
        lap("target")
    else:
        W_start = without_dead(W.to(work))  # W itself when nothing is dead: only read
        Wq_work = in_solver_order(W_start).to(work, copy=True)  # the loop works in place
    if keep_factor is not None and not gptaq and not exact:
        keep_factor.append(HessianFactor(U, perm, dead, damp_used, lam))

    gs = in_f if group_size == -1 else group_size
    n_groups = in_f // gs
    scale = torch.empty(out_f, n_groups, dtype=work, device=device)
    zero = torch.empty(out_f, n_groups, dtype=torch.int32, device=device)
    group_of_position = None
    if static_groups:
        W_natural = W_start.to(work)
        for g in range(n_groups):
            scale[:, g], zero[:, g] = find_params(W_natural[:, g * gs:(g + 1) * gs], bits, sym)
        del W_natural
        group_of_position = ((perm if perm is not None else torch.arange(in_f, device=device)) // gs).tolist()
    codes_p, err_sq = quantize_columns(Wq_work, U, scale, zero, bits=bits, group_size=gs, sym=sym,
                                       blocksize=blocksize, group_of_position=group_of_position)
    del U, Wq_work

    scale = scale.to(torch.float32)
    if static_groups:
        g_idx = natural_g_idx(in_f, group_size).to(device)
    else:
        g_idx = torch.empty(in_f, dtype=torch.int32, device=device)
        g_idx[perm if perm is not None else torch.arange(in_f, device=device)] = (
            torch.arange(in_f, device=device) // gs).to(torch.int32)
    if perm is None:
        codes = codes_p
        weight = dequantize_contiguous(codes, scale, zero)
    else:
        codes = torch.empty_like(codes_p)
        codes[:, perm] = codes_p
        if static_groups:
            weight = dequantize_contiguous(codes, scale, zero)
        else:  # groups are consecutive in the processing order
            weight = torch.empty(out_f, in_f, dtype=torch.float32, device=device)
            weight[:, perm] = dequantize_contiguous(codes_p, scale, zero)
    del codes_p
    lap("loop")

    if exact:
        if WHfpW is not None:
            loss = asymmetric_loss(weight, W, H_exact, WD, WHfpW)
        else:
            loss = plain_loss(weight, W_start if gptaq else W, H_exact)
    elif WHfpW is not None:
        loss = gptaq_loop_loss(float(err_sq), lam, weight, without_dead(W), WHfpW, trace_WHW, cross)
    else:
        loss = loop_loss(float(err_sq), lam, weight, W_start)
    lap("loss")
    return QuantResult(weight=weight, codes=codes, scale=scale, zero=zero, g_idx=g_idx, loss=loss, bits=bits,
                       group_size=group_size, sym=sym, perm=perm, damp_used=damp_used)
