"""GPTQ / GPTAQ solver against a naive float64 reference, brute force and exact identities."""

from __future__ import annotations

import itertools

import pytest
import torch

from tlq_farm.quant import finalize_hessian, gptq_quantize, hessian_partial, rtn_quantize
from tlq_farm.quant.grid import find_params, quantize_codes

torch.set_num_threads(1)


def correlated_inputs(in_f: int, tokens: int, seed: int) -> torch.Tensor:
    """Activations [tokens, in] with correlated features (a random mixing of iid noise) and uneven scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    mix += torch.eye(in_f, dtype=torch.float64)
    feature_scale = torch.rand(in_f, generator=g, dtype=torch.float64) * 2 + 0.2
    return (torch.randn(tokens, in_f, generator=g, dtype=torch.float64) @ mix) * feature_scale


def problem(out_f: int, in_f: int, seed: int, tokens: int | None = None):
    """(W float64 [out, in], H = 2 X X^T / n float64, X [tokens, in])."""
    X = correlated_inputs(in_f, tokens or 4 * in_f, seed)
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)
    H = 2 * X.T @ X / X.shape[0]
    return W, H, X


def reference_gptq(W, H, *, bits, group_size, sym, damp=0.01, act_order=False, static_groups=False):
    """Column-by-column OBS in float64: invert the remaining sub-Hessian at every step; no Cholesky, no blocks.

    Returns (codes [out, in] in original order, W_hat float64 [out, in]).
    """
    W = W.to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    out_f, in_f = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(in_f, dtype=torch.float64)
    order = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
             else torch.arange(in_f)).tolist()
    gs = in_f if group_size == -1 else group_size
    static = {}
    if static_groups:
        for g in range(in_f // gs):
            static[g] = find_params(W[:, g * gs:(g + 1) * gs], bits, sym)
    codes = torch.zeros(out_f, in_f, dtype=torch.int32)
    W_hat = torch.zeros(out_f, in_f, dtype=torch.float64)
    grid = None
    for k, col in enumerate(order):
        remaining = order[k:]
        if static_groups:
            grid = static[col // gs]
        elif k % gs == 0:
            grid = find_params(W[:, order[k:k + gs]], bits, sym)
        scale, zero = grid
        c = quantize_codes(W[:, col], scale, zero, bits)
        q = scale * (c.to(torch.float64) - zero.to(torch.float64))
        codes[:, col], W_hat[:, col] = c, q
        Hinv_remaining = torch.linalg.inv(H[remaining][:, remaining])
        err = (W[:, col] - q) / Hinv_remaining[0, 0]
        W[:, remaining] -= err.unsqueeze(1) * Hinv_remaining[0].unsqueeze(0)
    return codes, W_hat


def weighted_error(W_hat, W, H):
    E = W_hat.to(torch.float64) - W.to(torch.float64)
    return float(((E @ H) * E).sum() / 2)


def loop_loss_rtol(bits: int) -> float:
    """How far the loss from a float32 column loop may be from the float64 formula, relative.

    The loop's identity tr(E H_l E^T) = ||Err||^2 holds up to the float32 rounding of the weights being updated,
    eps32 * |w| per entry, against a rounding error of ~|w| / 2^bits that the loss measures: a relative error of
    ~2^bits * eps32. 200 random layers (2 to 8 bits, up to 1024 columns, rank-deficient and dead-column Hessians,
    act-order, plain and GPTAQ) stayed within 1.1 x that; the bound leaves 16x."""
    return 16 * 2**bits * torch.finfo(torch.float32).eps


CASES = [
    # (out, in, bits, group_size, sym, act_order, static_groups, blocksize)
    (8, 16, 2, -1, True, False, False, 128),
    (8, 16, 3, 8, False, False, False, 4),
    (16, 32, 4, 16, True, True, False, 8),
    (16, 32, 4, 8, False, True, True, 8),
    (12, 48, 8, 16, True, False, False, 5),
    (16, 64, 2, 8, False, True, False, 12),
    (16, 64, 3, 16, True, True, True, 16),
    (8, 64, 4, -1, False, True, False, 7),
    (10, 32, 8, 8, False, True, False, 32),
    (8, 32, 2, 16, True, False, True, 3),
]


@pytest.mark.parametrize("out_f,in_f,bits,group_size,sym,act_order,static_groups,blocksize", CASES)
def test_codes_equal_naive_reference_in_float64(out_f, in_f, bits, group_size, sym, act_order, static_groups,
                                               blocksize):
    # In float64 both solvers round the same numbers up to ~1e-13; an exact tie within that is improbable
    # on random data, so every code must agree.
    W, H, _ = problem(out_f, in_f, seed=out_f * 100 + in_f + bits)
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                        static_groups=static_groups, blocksize=blocksize)
    ref_codes, ref_W_hat = reference_gptq(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                                          static_groups=static_groups)
    assert torch.equal(res.codes, ref_codes)
    assert torch.allclose(res.weight.double(), ref_W_hat, rtol=1e-6, atol=1e-6)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 2**bits - 1
    assert res.weight.dtype == torch.float32 and res.weight.shape == W.shape
    assert res.loss == pytest.approx(weighted_error(res.weight, W, H), rel=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_scale_is_the_smallest_that_keeps_the_minimum_on_the_grid_and_all_within_half_a_step(bits):
    # Brute force: for each row, scan scales upward from 0.9x of the found one in fine steps; the first scale
    # at which the most negative weight is not clipped and every weight lies within half a step of a signed
    # code in [-2^(b-1), 2^(b-1) - 1] must be the found scale (up to the scan's resolution).
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 32, generator=g, dtype=torch.float64)
    W[0] = W[0].abs()  # a row with no negative weight
    W[1] = -W[1].abs()  # a row with no positive weight
    W[2, 0], W[2, 1] = 3.0, -3.0  # equal extremes: the positive side, one code shorter, sets the scale
    scale, zero = find_params(W, bits, sym=True)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert torch.equal(zero, torch.full((64,), 2 ** (bits - 1), dtype=torch.int32))
    wmin, wmax = W.min(dim=1).values.clamp(max=0), W.max(dim=1).values.clamp(min=0)

    def fits(s: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(W / s[:, None]), lo, hi)
        within = ((W - q * s[:, None]).abs() / s[:, None]).amax(dim=1) <= 0.5 + 1e-12
        return within & (-wmin <= -lo * s * (1 + 1e-12))

    assert bool(fits(scale).all())
    ratios = torch.linspace(0.9, 1.0, 2001, dtype=torch.float64)
    for r in range(W.shape[0]):
        ok = [bool(fits(scale * t)[r]) for t in ratios]
        assert abs(float(ratios[ok.index(True)]) - 1.0) <= 1e-4, r
    # Never coarser than the grid that never clips, max(-min / 2^(b-1), max / (2^(b-1) - 1)), nor than
    # absmax / (2^(b-1) - 1/2); strictly finer than the first wherever the maximum sets the scale.
    never_clips = torch.maximum(-wmin / -lo, wmax / hi)
    assert bool((scale <= never_clips + 1e-15).all())
    assert bool((scale <= torch.maximum(-wmin, wmax) / (hi + 0.5) + 1e-15).all())
    assert bool((scale[0] < never_clips[0]) & (scale[2] < never_clips[2]))


def test_group_indices_follow_processing_order_with_act_order():
    W, H, _ = problem(8, 32, seed=3)
    res = gptq_quantize(W, H, bits=4, group_size=8, act_order=True)
    position = torch.empty(32, dtype=torch.long)
    position[res.perm] = torch.arange(32)
    assert torch.equal(res.perm, torch.argsort(torch.diagonal(H), descending=True, stable=True))
    assert torch.equal(res.g_idx.long(), position // 8)
    # The weight is reproducible from codes and per-group params selected by g_idx.
    g = res.g_idx.long()
    assert torch.equal(res.weight, res.scale[:, g] * (res.codes.float() - res.zero[:, g].float()))
    static = gptq_quantize(W, H, bits=4, group_size=8, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx.long(), torch.arange(32) // 8)
    assert gptq_quantize(W, H, bits=4, group_size=8).perm is None


def test_float32_input_matches_reference_closely():
    # float32 work rounds ~1e-7 apart from float64; a code sitting on a rounding boundary may flip and its
    # error feedback then shifts the rest of the row, so compare the objective, and most codes.
    W, H, _ = problem(16, 64, seed=11)
    res = gptq_quantize(W.float(), H.float(), bits=4, group_size=16, act_order=True, blocksize=16)
    ref_codes, ref_W_hat = reference_gptq(W, H, bits=4, group_size=16, sym=True, act_order=True)
    assert (res.codes == ref_codes).float().mean() > 0.95
    assert res.loss == pytest.approx(weighted_error(ref_W_hat, W, H), rel=0.02)


def test_bfloat16_weight_is_accepted():
    W, H, _ = problem(8, 32, seed=12)
    res = gptq_quantize(W.to(torch.bfloat16), H, bits=4, group_size=16)
    assert res.weight.dtype == torch.float32 and res.weight.shape == (8, 32)
    # The loss is measured against the weight as given (bf16). Worked in float32, it comes from the column
    # loop (float32 rounding, loop_loss_rtol); exact_loss gives the float64 formula itself.
    assert res.loss == pytest.approx(weighted_error(res.weight, W.to(torch.bfloat16), H), rel=loop_loss_rtol(4))
    exact = gptq_quantize(W.to(torch.bfloat16), H, bits=4, group_size=16, exact_loss=True)
    assert torch.equal(exact.codes, res.codes)
    assert exact.loss == pytest.approx(weighted_error(res.weight, W.to(torch.bfloat16), H), rel=1e-9)


def test_brute_force_bound_on_tiny_problem():
    # 1 row x 3 columns, 2 bits: 4^3 code vectors on GPTQ's own grid; GPTQ is greedy, so it can only be at
    # or above the optimum, and it must equal the naive reference exactly.
    W, H, _ = problem(1, 3, seed=5, tokens=6)
    damp = 0.0
    res = gptq_quantize(W, H, bits=2, group_size=-1, sym=False, damp=damp)
    scale, zero = float(res.scale[0, 0]), int(res.zero[0, 0])
    best = min(weighted_error(torch.tensor([[scale * (c - zero) for c in cs]], dtype=torch.float64), W, H)
               for cs in itertools.product(range(4), repeat=3))
    ref_codes, ref_W_hat = reference_gptq(W, H, bits=2, group_size=-1, sym=False, damp=damp)
    assert torch.equal(res.codes, ref_codes)
    assert res.loss >= best - 1e-12
    assert res.loss == pytest.approx(weighted_error(ref_W_hat, W, H), rel=1e-6)
    assert res.damp_used == 0.0


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, True), (4, False)])
def test_rtn_is_not_better_than_gptq_on_correlated_inputs(bits, sym):
    W, H, _ = problem(32, 64, seed=21 + bits)
    gptq = gptq_quantize(W, H, bits=bits, group_size=16, sym=sym)
    rtn = rtn_quantize(W, bits=bits, group_size=16, sym=sym, H=H)
    assert rtn.loss >= gptq.loss
    assert gptq.loss < 0.9 * rtn.loss


def test_dead_column_is_zeroed_and_ignored():
    W, _, X = problem(8, 16, seed=7)
    X[:, 5] = 0
    H = 2 * X.T @ X / X.shape[0]
    res = gptq_quantize(W, H, bits=4, group_size=8)
    assert torch.all(res.weight[:, 5] == 0)
    ref_codes, _ = reference_gptq(W, H, bits=4, group_size=8, sym=True)
    assert torch.equal(res.codes, ref_codes)
    # The loss sees the original W: a dead input contributes nothing to the output error.
    assert res.loss == pytest.approx(weighted_error(res.weight, W, H), rel=1e-12)


def test_damping_escalates_on_rank_deficient_hessian():
    # Inputs 1 and 0 identical: H has two equal rows, so the second Cholesky pivot is exactly 0 at damp 0.
    g = torch.Generator().manual_seed(8)
    X = torch.randint(-3, 4, (10, 8), generator=g).to(torch.float64)
    X[:, 1] = X[:, 0]
    H = X.T @ X
    W = torch.randn(4, 8, generator=g, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(H)
    res = gptq_quantize(W, H, bits=4, group_size=-1, damp=0.0)
    assert res.damp_used == pytest.approx(0.01)
    assert torch.isfinite(res.weight).all()
    ref_codes, _ = reference_gptq(W, H, bits=4, group_size=-1, sym=True, damp=res.damp_used)
    assert torch.equal(res.codes, ref_codes)
    assert gptq_quantize(W, H, bits=4, group_size=-1, damp=0.05).damp_used == 0.05


def test_damping_escalation_gives_up_with_a_clear_error():
    H = torch.tensor([[1.0, 100.0], [100.0, 1.0]], dtype=torch.float64)  # eigenvalue -99
    with pytest.raises(ValueError, match="not positive definite.*more calibration samples.*--damp"):
        gptq_quantize(torch.ones(2, 2), H, bits=4, group_size=-1)
    H_nan = torch.eye(4, dtype=torch.float64)
    H_nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*not positive definite"):
        gptq_quantize(torch.ones(3, 4), H_nan, bits=4, group_size=-1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(group_size=5), "does not divide"),
    (dict(group_size=0), "not valid"),
    (dict(bits=5), "bits=5 is not supported"),
    (dict(group_size=-1, blocksize=0), "blocksize=0"),
    (dict(group_size=-1, damp=-1.0), "damp=-1.0"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    W, H, _ = problem(4, 16, seed=9)
    with pytest.raises(ValueError, match=message):
        gptq_quantize(W, H, **kwargs)


def test_bad_shapes_are_rejected():
    W, H, _ = problem(4, 16, seed=9)
    with pytest.raises(ValueError, match=r"H has shape \(8, 8\)"):
        gptq_quantize(W, H[:8, :8], group_size=-1)
    with pytest.raises(ValueError, match="Hfp was given without D"):
        gptq_quantize(W, H, group_size=-1, Hfp=H)


# ---- GPTAQ -----------------------------------------------------------------------------------------------

def two_chains(in_f: int, tokens: int, seed: int, noise: float = 0.3):
    """(X full-precision chain, X~ = X + error: the quantized chain), both [tokens, in]."""
    X = correlated_inputs(in_f, tokens, seed)
    g = torch.Generator().manual_seed(seed + 7)
    X_q = X + noise * torch.randn(tokens, in_f, generator=g, dtype=torch.float64) * X.std(0)
    return X, X_q


def test_gptaq_with_zero_cross_term_is_bitwise_gptq():
    for W, H in [problem(8, 32, seed=31)[:2], (problem(8, 32, seed=32)[0].float(), problem(8, 32, seed=32)[1])]:
        plain = gptq_quantize(W, H, bits=3, group_size=8, act_order=True, blocksize=8)
        gptaq = gptq_quantize(W, H, bits=3, group_size=8, act_order=True, blocksize=8,
                              D=torch.zeros_like(H))
        for field in ("weight", "codes", "scale", "zero", "g_idx", "perm"):
            assert torch.equal(getattr(plain, field), getattr(gptaq, field)), field
        assert plain.loss == gptaq.loss


def asymmetric_objective(W, W_hat, X, X_q, weights=None):
    """sum_t w_t ||W x_t - W_hat x~_t||^2 / sum_t w_t, directly from the activations."""
    residual = X @ W.double().T - X_q @ W_hat.double().T
    w = torch.ones(X.shape[0], dtype=torch.float64) if weights is None else weights
    return float((w * (residual**2).sum(1)).sum() / w.sum())


def test_gptaq_lands_near_least_squares_and_beats_gptq_on_the_asymmetric_objective():
    in_f, out_f = 32, 16
    X, X_q = two_chains(in_f, 512, seed=41)
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    H, D, Hfp = finalize_hessian(hessian_partial(X_q, torch.ones(X.shape[0]), x_fp=X, need_fp_gram=True))
    # min_{W_hat} ||X W^T - X~ W_hat^T||: the unconstrained asymmetric optimum.
    W_ls = torch.linalg.lstsq(X_q, X @ W.T).solution.T
    gptaq = gptq_quantize(W, H, bits=8, group_size=8, D=D, Hfp=Hfp, damp=1e-4)
    gptq = gptq_quantize(W, H, bits=8, group_size=8, damp=1e-4)
    assert torch.linalg.norm(gptaq.weight.double() - W_ls) < 0.02 * torch.linalg.norm(W_ls)
    assert torch.linalg.norm(gptq.weight.double() - W_ls) > 0.1 * torch.linalg.norm(W_ls)
    objective_gptaq = asymmetric_objective(W, gptaq.weight, X, X_q)
    objective_gptq = asymmetric_objective(W, gptq.weight, X, X_q)
    objective_ls = asymmetric_objective(W, W_ls, X, X_q)
    # The chains' noise leaves an irreducible residual (objective_ls); compare what each solver adds to it.
    assert objective_ls <= objective_gptaq < objective_gptq
    assert objective_gptaq - objective_ls < 0.01 * (objective_gptq - objective_ls)
    assert gptaq.loss == pytest.approx(objective_gptaq, rel=1e-9)
    # Without Hfp the loss drops the objective's constant: it is the excess over the (lightly damped)
    # least-squares target W*, close to the excess over the exact optimum.
    no_fp = gptq_quantize(W, H, bits=8, group_size=8, D=D, damp=1e-4)
    assert torch.equal(no_fp.codes, gptaq.codes)
    assert no_fp.loss == pytest.approx(objective_gptaq - objective_ls, rel=0.1)


def test_gptaq_loss_is_the_weighted_asymmetric_objective():
    in_f, out_f = 16, 8
    X, X_q = two_chains(in_f, 200, seed=51)
    weights = torch.rand(200, generator=torch.Generator().manual_seed(52), dtype=torch.float64)
    weights[:20] = 0
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(53)).float()
    H, D, Hfp = finalize_hessian(hessian_partial(X_q, weights, x_fp=X, need_fp_gram=True))
    res = gptq_quantize(W, H, bits=4, group_size=8, sym=False, act_order=True, D=D, Hfp=Hfp)
    # W is float32: the loss comes from the column loop (loop_loss_rtol); exact_loss is the float64 formula.
    assert res.loss == pytest.approx(asymmetric_objective(W, res.weight, X, X_q, weights), rel=loop_loss_rtol(4))
    exact = gptq_quantize(W, H, bits=4, group_size=8, sym=False, act_order=True, D=D, Hfp=Hfp, exact_loss=True)
    assert torch.equal(exact.codes, res.codes)
    assert exact.loss == pytest.approx(asymmetric_objective(W, res.weight, X, X_q, weights), rel=1e-9)
    # Plain GPTQ's loss is the same weighted objective with the two chains equal.
    plain = gptq_quantize(W, H, bits=4, group_size=8, sym=False)
    assert plain.loss == pytest.approx(asymmetric_objective(W, plain.weight, X_q, X_q, weights), rel=loop_loss_rtol(4))
    plain_exact = gptq_quantize(W, H, bits=4, group_size=8, sym=False, exact_loss=True)
    assert plain_exact.loss == pytest.approx(asymmetric_objective(W, plain.weight, X_q, X_q, weights), rel=1e-9)


def test_gptaq_matches_reference_on_shifted_target():
    # GPTAQ == the naive reference GPTQ applied to W* = W + W D (H + lambda I)^-1.
    in_f, out_f = 32, 8
    X, X_q = two_chains(in_f, 256, seed=61)
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(62), dtype=torch.float64)
    H, D, _ = finalize_hessian(hessian_partial(X_q, torch.ones(256), x_fp=X))
    H_damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(in_f, dtype=torch.float64)
    W_star = W + W @ D @ torch.linalg.inv(H_damped)
    res = gptq_quantize(W, H, bits=4, group_size=8, act_order=True, D=D, blocksize=8)
    ref_codes, _ = reference_gptq(W_star, H, bits=4, group_size=8, sym=True, act_order=True)
    assert torch.equal(res.codes, ref_codes)


# ---- the float64 factorisation in place, the loss from the loop, memory ------------------------------------

from tlq_farm.quant.gptq import (asymmetric_loss, cholesky_lower_, inverse_factor_, invert_lower_,  # noqa: E402
                                 permute_symmetric_, plain_loss, reverse_, times_upper, times_upper_t)


def test_in_place_reorderings_are_exact():
    M = torch.randn(37, 37, generator=torch.Generator().manual_seed(71), dtype=torch.float64)  # not symmetric
    order = torch.randperm(37, generator=torch.Generator().manual_seed(72))
    permuted = M.clone()
    permute_symmetric_(permuted, order)
    assert torch.equal(permuted, M[order][:, order])
    reversed_ = M.clone()
    reverse_(reversed_)
    assert torch.equal(reversed_, M.flip(0).flip(1))


def test_blocked_cholesky_and_inverse_match_lapack_and_keep_the_upper_triangle():
    _, H, _ = problem(4, 70, seed=73)
    G = H.clone()
    assert cholesky_lower_(G, shift=0.5, blocksize=16) == 0
    L = torch.linalg.cholesky(H + 0.5 * torch.eye(70, dtype=torch.float64))
    assert torch.allclose(G.tril(), L, rtol=0, atol=1e-12 * float(L.abs().max()))
    assert torch.equal(G.triu(1), H.triu(1))  # only the lower triangle and the diagonal are written
    X = G.tril()
    invert_lower_(X, blocksize=16)
    assert torch.allclose(X, torch.linalg.inv(L), rtol=0, atol=1e-12 * float(torch.linalg.inv(L).abs().max()))
    # A singular matrix fails (also when rounding leaves a tiny positive pivot) and its upper triangle survives.
    S = torch.ones(5, 5, dtype=torch.float64)
    assert cholesky_lower_(S, blocksize=2) == 2
    assert torch.equal(S.triu(1), torch.ones(5, 5, dtype=torch.float64).triu(1))


@pytest.mark.parametrize("act_order", [False, True])
def test_inverse_factor_is_the_textbook_factor_in_the_storage_of_H(act_order):
    # U = J chol(J H J)^-1 J equals the chain cholesky -> cholesky_inverse -> upper cholesky, in float64 rounding.
    _, H, _ = problem(4, 96, seed=74, tokens=80)  # rank-deficient: the damping makes it definite
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    Hp = H[perm][:, perm] if act_order else H
    damped = Hp + 0.01 * float(torch.diagonal(Hp).mean()) * torch.eye(96, dtype=torch.float64)
    U_ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    Hw = H.clone()
    U, damp_used, lam = inverse_factor_(Hw, 0.01, perm)
    assert U.data_ptr() == Hw.data_ptr() and damp_used == 0.01
    assert lam == pytest.approx(0.01 * float(torch.diagonal(H).mean()), rel=1e-15)
    assert torch.allclose(U, U_ref, rtol=0, atol=1e-10 * float(U_ref.abs().max()))
    assert torch.equal(U, U.triu())


def test_gptaq_target_through_U_is_the_inverse_formula():
    # W* = W + (W D) H_l^-1 = W + ((W D) U^T) U; against the formula with an explicit inverse, in float64.
    in_f, out_f = 64, 12
    X, X_q = two_chains(in_f, 256, seed=75)
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(76), dtype=torch.float64)
    H, D, _ = finalize_hessian(hessian_partial(X_q, torch.ones(256), x_fp=X))
    U, _, lam = inverse_factor_(H.clone(), 0.01, None)
    WD = W @ D
    old = W + WD @ torch.linalg.inv(H + lam * torch.eye(in_f, dtype=torch.float64))
    new = W + times_upper(times_upper_t(WD, U, blocksize=16), U, blocksize=16)
    assert torch.allclose(new, old, rtol=0, atol=1e-11 * float(old.abs().max()))


@pytest.mark.parametrize("bits,act_order,static_groups,dead", [(2, False, False, False), (3, True, False, True),
                                                               (4, True, True, False), (8, False, False, True)])
def test_loss_from_the_loop_matches_the_float64_formula(bits, act_order, static_groups, dead):
    in_f, out_f = 128, 24
    X, X_q = two_chains(in_f, 384, seed=77 + bits)
    if dead:
        X_q[:, [3, 70]] = 0
    weights = torch.rand(384, generator=torch.Generator().manual_seed(78), dtype=torch.float64)
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(79)).float()
    H, D, Hfp = finalize_hessian(hessian_partial(X_q, weights, x_fp=X, need_fp_gram=True))
    kw = dict(bits=bits, group_size=32, act_order=act_order, static_groups=static_groups)
    W64 = W.double()
    plain = gptq_quantize(W, H, **kw)
    assert plain.loss == pytest.approx(plain_loss(plain.weight, W, H), rel=loop_loss_rtol(bits))
    gptaq = gptq_quantize(W, H, D=D, Hfp=Hfp, **kw)
    reference = asymmetric_loss(gptaq.weight, W64, H, W64 @ D, float(((W64 @ Hfp) * W64).sum()))
    assert reference == pytest.approx(asymmetric_objective(W, gptaq.weight, X, X_q, weights), rel=1e-9)
    assert gptaq.loss == pytest.approx(reference, rel=loop_loss_rtol(bits))
    no_fp = gptq_quantize(W, H, D=D, **kw)
    exact = gptq_quantize(W, H, D=D, exact_loss=True, **kw)
    assert torch.equal(no_fp.codes, exact.codes)
    assert no_fp.loss == pytest.approx(exact.loss, rel=loop_loss_rtol(bits))
    # In float64 the loop's identity is exact up to float64 rounding (and the float32 weight it returns).
    plain64 = gptq_quantize(W64, H, exact_loss=False, **kw)
    assert plain64.loss == pytest.approx(plain_loss(plain64.weight, W64, H), rel=1e-6 * 2**bits / 256)


def test_gptaq_from_products_is_gptaq_from_grams():
    # W D and tr(W Hfp W^T) (what the low-memory reduction gives) instead of D and Hfp: the same solve.
    in_f, out_f = 48, 10
    X, X_q = two_chains(in_f, 200, seed=81)
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(82)).float()
    H, D, Hfp = finalize_hessian(hessian_partial(X_q, torch.ones(200), x_fp=X, need_fp_gram=True))
    W64 = W.double()
    grams = gptq_quantize(W, H, bits=4, group_size=16, act_order=True, D=D, Hfp=Hfp)
    products = gptq_quantize(W, H, bits=4, group_size=16, act_order=True, WD=W64 @ D,
                             WHfpW=float(((W64 @ Hfp) * W64).sum()))
    for field in ("weight", "codes", "scale", "zero", "g_idx", "perm"):
        assert torch.equal(getattr(grams, field), getattr(products, field)), field
    assert products.loss == pytest.approx(grams.loss, rel=1e-12)
    with pytest.raises(ValueError, match="WD was given with D"):
        gptq_quantize(W, H, group_size=-1, D=D, WD=W64 @ D)
    with pytest.raises(ValueError, match="WHfpW was given without WD"):
        gptq_quantize(W, H, group_size=-1, WHfpW=1.0)
    with pytest.raises(ValueError, match=r"WD has shape \(10, 24\)"):
        gptq_quantize(W, H, group_size=-1, WD=(W64 @ D)[:, :24])


class LargeAllocations:
    """Counts the new tensors of at least `nbytes` that torch operations create inside the `with` block."""

    def __init__(self, nbytes: int):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if (isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= nbytes
                            and t.untyped_storage().data_ptr() not in inputs):
                        counter.count += 1
                return out

        self.count = 0
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_the_solve_allocates_no_in_by_in_matrix_when_it_may_overwrite_H(method):
    # A memory bound that does not depend on timing: with overwrite_H, the factorisation, the float32 factor
    # and GPTAQ's target live in H's storage or in [out, in] / [in, FACTOR_BLOCK] buffers (in = 2048 here, four
    # times FACTOR_BLOCK); not one new tensor the size of a float32 [in, in].
    in_f, out_f = 2048, 16
    g = torch.Generator().manual_seed(83)
    A = torch.randn(in_f, 64, generator=g, dtype=torch.float64)
    H = A @ A.T / 64 + torch.diag(torch.rand(in_f, generator=g, dtype=torch.float64) + 0.1)
    W = torch.randn(out_f, in_f, generator=g)
    products = {}
    if method == "gptaq":
        products = dict(WD=0.1 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64), WHfpW=1e3)
    kw = dict(bits=4, group_size=128, act_order=True, **products)
    with LargeAllocations(4 * in_f * in_f) as copied:
        gptq_quantize(W, H, **kw)
    assert copied.count == 1  # without overwrite_H: one float64 copy of H to factor
    with LargeAllocations(4 * in_f * in_f) as in_place:
        res = gptq_quantize(W, H, overwrite_H=True, **kw)
    assert in_place.count == 0
    assert torch.isfinite(res.weight).all()


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
def test_a_kept_hessian_factor_gives_another_linear_the_result_its_h_gives(act_order, static_groups):
    """Linears fed the same inputs (q/k/v) share H: the factor kept from one solve, given to the next, yields
    exactly what factoring H again yields (dead columns and act-order included); H is not read then."""
    from tlq_farm.quant.gptq import HessianFactor

    W1, H = problem(24, 64, seed=11)[:2]
    H = H.clone()
    H[5, :] = H[:, 5] = 0  # an input that never fires
    W2 = torch.randn(16, 64, generator=torch.Generator().manual_seed(12))
    kwargs = dict(bits=4, group_size=16, sym=False, act_order=act_order, static_groups=static_groups)
    kept: list = []
    first = gptq_quantize(W1.float(), H.clone(), keep_factor=kept, **kwargs)
    assert len(kept) == 1 and isinstance(kept[0], HessianFactor)
    again = gptq_quantize(W1.float(), None, factor=kept[0], **kwargs)  # the loop leaves U as it was
    second = gptq_quantize(W2, None, factor=kept[0], **kwargs)
    fresh = gptq_quantize(W2, H.clone(), **kwargs)
    same = lambda a, b: (a is None and b is None) or torch.equal(a, b)  # noqa: E731 (perm: None without act-order)
    for field in ("weight", "codes", "scale", "zero", "g_idx", "perm"):
        assert same(getattr(again, field), getattr(first, field)), field
        assert same(getattr(second, field), getattr(fresh, field)), field
    assert second.loss == fresh.loss and second.damp_used == fresh.damp_used
    assert bool((second.weight[:, 5] == 0).all())
    with pytest.raises(ValueError, match="plain GPTQ"):
        gptq_quantize(W2.double(), None, factor=kept[0], **kwargs)  # float64: the exact loss needs H
    with pytest.raises(ValueError, match="another layer"):
        gptq_quantize(torch.randn(16, 32), None, factor=kept[0], **kwargs)
