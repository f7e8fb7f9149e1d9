"""Token-weighted Hessian statistics: float64 references, exact token removal, shard reduction, errors."""

from __future__ import annotations

import pytest
import torch

from tlq_farm.quant import finalize_hessian, finalize_stats, hessian_partial, reduce_partials

torch.set_num_threads(1)


def activations(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_all_ones_weights_give_gptq_hessian():
    x = activations((3, 7, 16), seed=1)
    H, D, Hfp = finalize_hessian(hessian_partial(x, torch.ones(3, 7)))
    X = x.reshape(-1, 16).double()
    assert torch.allclose(H, 2 * X.T @ X / X.shape[0], rtol=1e-13, atol=1e-14)
    assert H.dtype == torch.float64 and torch.equal(H, H.T)
    assert D is None and Hfp is None


def test_weighted_sums_match_explicit_float64_loops():
    x_q = activations((2, 5, 6), seed=2)
    x_fp = x_q + 0.1 * activations((2, 5, 6), seed=3)
    w = torch.rand(2, 5, generator=torch.Generator().manual_seed(4))
    w[0, 1] = 0
    stats = hessian_partial(x_q, w, x_fp=x_fp, need_fp_gram=True)
    H_ref = torch.zeros(6, 6, dtype=torch.float64)
    D_ref = torch.zeros(6, 6, dtype=torch.float64)
    Hfp_ref = torch.zeros(6, 6, dtype=torch.float64)
    for wt, xq, xf in zip(w.reshape(-1).double(), x_q.reshape(-1, 6).double(), x_fp.reshape(-1, 6).double()):
        H_ref += wt * torch.outer(xq, xq)
        D_ref += wt * torch.outer(xf - xq, xq)
        Hfp_ref += wt * torch.outer(xf, xf)
    assert torch.allclose(stats["H"], H_ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(stats["D"], D_ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(stats["Hfp"], Hfp_ref, rtol=1e-12, atol=1e-14)
    assert float(stats["w_sum"]) == pytest.approx(float(w.double().sum()), rel=1e-15)
    assert stats["tokens"].dtype == torch.int64 and int(stats["tokens"]) == 9
    H, D, Hfp = finalize_hessian(stats)
    total = float(w.double().sum())
    assert torch.allclose(H, 2 * H_ref / total, rtol=1e-12, atol=1e-14)
    assert torch.allclose(D, 2 * D_ref / total, rtol=1e-12, atol=1e-14)
    assert torch.allclose(Hfp, 2 * Hfp_ref / total, rtol=1e-12, atol=1e-14)
    # H + D is the cross Gram 2 sum w x x~^T / sum w that the asymmetric objective needs.
    cross = sum(wt * torch.outer(xf, xq) for wt, xq, xf in
                zip(w.reshape(-1).double(), x_q.reshape(-1, 6).double(), x_fp.reshape(-1, 6).double()))
    assert torch.allclose(H + D, 2 * cross / total, rtol=1e-12, atol=1e-14)


def test_zero_weight_removes_a_token_exactly():
    x = activations((9, 8), seed=5)
    x_fp = activations((9, 8), seed=6)
    w = torch.rand(9, generator=torch.Generator().manual_seed(7)) + 0.1
    w_zeroed = w.clone()
    w_zeroed[4] = 0
    x_with_huge_masked_token = x.clone()
    x_with_huge_masked_token[4] = 1e30  # a padding token's garbage must not leak in through rounding
    kept = torch.tensor([i for i in range(9) if i != 4])
    masked = hessian_partial(x_with_huge_masked_token, w_zeroed, x_fp=x_fp, need_fp_gram=True)
    removed = hessian_partial(x[kept], w[kept], x_fp=x_fp[kept], need_fp_gram=True)
    for key in ("H", "D", "Hfp"):
        rel = (masked[key] - removed[key]).abs().max() / removed[key].abs().max()
        assert rel <= 1e-12, key
    assert float(masked["w_sum"]) == pytest.approx(float(removed["w_sum"]), rel=1e-15)
    assert int(masked["tokens"]) == 8 == int(removed["tokens"])


def test_shards_reduce_to_the_whole_in_list_order():
    x_q = activations((12, 10), seed=8)
    x_fp = activations((12, 10), seed=9)
    w = torch.rand(12, generator=torch.Generator().manual_seed(10))
    whole = hessian_partial(x_q, w, x_fp=x_fp, need_fp_gram=True)
    shards = [hessian_partial(x_q[s], w[s], x_fp=x_fp[s], need_fp_gram=True)
              for s in (slice(0, 5), slice(5, 6), slice(6, 12))]
    total = reduce_partials(shards)
    for key in ("H", "D", "Hfp", "w_sum"):
        assert torch.allclose(total[key], whole[key], rtol=1e-12, atol=1e-13), key
        assert total[key].dtype == torch.float64
    assert int(total["tokens"]) == 12 and total["tokens"].dtype == torch.int64
    again = reduce_partials(shards)
    for key in total:
        assert torch.equal(total[key], again[key])
    # In-order summation: ((a + b) + c), exactly.
    assert torch.equal(total["H"], (shards[0]["H"] + shards[1]["H"]) + shards[2]["H"])
    # The inputs are not modified by the reduction.
    assert not torch.equal(shards[0]["H"], total["H"])


def test_errors_say_what_is_wrong():
    x = activations((4, 3), seed=11)
    with pytest.raises(ValueError, match="negative"):
        hessian_partial(x, torch.tensor([1.0, -0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        hessian_partial(x, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        hessian_partial(x, torch.tensor([1.0, float("inf"), 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"token_weights has shape \(3,\)"):
        hessian_partial(x, torch.ones(3))
    with pytest.raises(ValueError, match="x_fp has shape"):
        hessian_partial(x, torch.ones(4), x_fp=x[:2])
    with pytest.raises(ValueError, match="need_fp_gram=True needs x_fp"):
        hessian_partial(x, torch.ones(4), need_fp_gram=True)
    with pytest.raises(ValueError, match="no calibration token reached this layer with nonzero weight"):
        finalize_hessian(hessian_partial(x, torch.zeros(4)))
    with pytest.raises(ValueError, match="same options"):
        reduce_partials([hessian_partial(x, torch.ones(4)), hessian_partial(x, torch.ones(4), x_fp=x)])
    with pytest.raises(ValueError, match="no partial statistics"):
        reduce_partials([])


def gptaq_shards(in_f: int, seed: int, tokens: int = 30, parts: int = 3):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randn(tokens, in_f, generator=g)
    x_fp = x_q + 0.2 * torch.randn(tokens, in_f, generator=g)
    w = torch.rand(tokens, generator=g)
    cuts = torch.linspace(0, tokens, parts + 1).long().tolist()
    return [hessian_partial(x_q[a:b], w[a:b], x_fp=x_fp[a:b], need_fp_gram=True, dtype=torch.float32)
            for a, b in zip(cuts, cuts[1:])]


def test_low_memory_gptaq_reduction_equals_products_of_the_reduced_grams():
    shards = gptaq_shards(24, seed=12)
    W = torch.randn(7, 24, generator=torch.Generator().manual_seed(13))
    plain = finalize_stats(reduce_partials(shards))
    folded = finalize_stats(reduce_partials(shards, W=W))
    assert set(folded) == {"H", "WD", "WHfpW"}
    assert torch.equal(folded["H"], plain["H"])  # H is reduced the same way either way
    W64 = W.double()
    WD = W64 @ plain["D"]
    assert torch.allclose(folded["WD"], WD, rtol=0, atol=1e-13 * float(WD.abs().max()))
    WHfpW = ((W64 @ plain["Hfp"]) * W64).sum()
    assert float(folded["WHfpW"]) == pytest.approx(float(WHfpW), rel=1e-13)
    with pytest.raises(ValueError, match="give the weight of the layer"):
        reduce_partials(shards, W=W[:, :20])


def test_consumed_partials_are_emptied_and_the_sum_is_the_float64_sum():
    shards = gptaq_shards(16, seed=14)
    kept = reduce_partials(shards)
    copies = [{k: v.clone() for k, v in p.items()} for p in shards]
    consumed = reduce_partials(iter(copies), consume=True)
    assert all(p == {} for p in copies)
    for key in kept:
        assert torch.equal(consumed[key], kept[key]), key
    # In place, float32 added to the float64 total: the same bits as adding its float64 copy.
    expected = (shards[0]["D"].double() + shards[1]["D"].double()) + shards[2]["D"].double()
    assert torch.equal(kept["D"], expected)


def test_the_low_memory_reduction_allocates_one_in_by_in_matrix():
    # Deterministic memory bound: two GPTAQ partials reduced with W create one [in, in] tensor (the float64 H
    # total), against three (H, D, Hfp totals) without W. in = 4096: W D is formed 1024 columns at a time.
    from test_gptq import LargeAllocations

    in_f, out_f = 4096, 8
    g = torch.Generator().manual_seed(15)

    def partials():
        for _ in range(2):
            A = torch.randn(in_f, 4, generator=g)
            yield {"H": A @ A.T, "D": 0.1 * A @ A.T, "Hfp": 2 * A @ A.T,
                   "w_sum": torch.tensor(3.0, dtype=torch.float64), "tokens": torch.tensor(4)}

    W = torch.randn(out_f, in_f, generator=g)
    made = list(partials())
    with LargeAllocations(4 * in_f * in_f) as folded:
        reduce_partials(iter([dict(p) for p in made]), W=W, consume=True)
    assert folded.count == 1
    with LargeAllocations(4 * in_f * in_f) as grams:
        reduce_partials(iter([dict(p) for p in made]), consume=True)
    assert grams.count == 3


@pytest.mark.parametrize("n", [300, 2100])
def test_partials_stored_as_their_upper_block_triangle_reduce_to_the_same_numbers(n):
    """A stats task stores each Gram as its upper block triangle (pack_upper_, in place); the reduction of
    such partials, alone or mixed with whole ones, is the whole partials' float64 sum, bit for bit."""
    from tlq_farm.quant.hessian import GRAM_TILE, finish_sums, pack_upper_, start_sums, add_tokens, upper_length

    g = torch.Generator().manual_seed(n)
    whole = []
    for p in range(3):
        sums = start_sums(n)
        add_tokens(sums, torch.randn(40, n, generator=g), torch.rand(40, generator=g))
        whole.append(finish_sums(sums))
    expected = reduce_partials([dict(p) for p in whole])

    def packed(p):
        q = {k: v.clone() for k, v in p.items()}
        return {"H_upper": pack_upper_(q.pop("H")), **q}

    # The packed values are the Gram's entries on and above its block diagonal, row by row.
    block = torch.arange(n) // GRAM_TILE
    upper = block[:, None] <= block[None, :]
    assert torch.equal(packed(whole[0])["H_upper"], whole[0]["H"][upper])
    assert upper_length(n) == int(upper.sum()) < (n * n if n > GRAM_TILE else n * n + 1)
    for parts in ([packed(p) for p in whole], [whole[0], packed(whole[1]), packed(whole[2])],
                  [packed(whole[0]), whole[1], packed(whole[2])]):
        total = reduce_partials(parts)
        assert set(total) == set(expected)
        assert all(torch.equal(total[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="no Gram's upper block triangle"):
        reduce_partials([{"H_upper": torch.zeros(upper_length(n) + 1), "w_sum": torch.tensor(1.0),
                          "tokens": torch.tensor(1)}])


@pytest.mark.parametrize("uniform", [True, False])
def test_products_with_the_weight_give_the_folded_cross_terms(uniform):
    """W D and tr(W Hfp W^T) summed token by token (start_sums' product_rows) against float64 loops over the
    tokens, and against the [in, in] sums D and Hfp folded with W (fold_cross_terms); a token of weight 0 leaves
    them as if absent."""
    from tlq_farm.quant import add_tokens, finish_sums, fold_cross_terms, start_sums

    g = torch.Generator().manual_seed(3)
    out_f, in_f = 24, 80
    W = torch.randn(out_f, in_f, generator=g)
    batches = []
    for n in (17, 9):
        xq = torch.randn(2, n, in_f, generator=g)
        xf = xq + 0.05 * torch.randn(2, n, in_f, generator=g)
        w = torch.ones(2, n) if uniform else torch.rand(2, n, generator=g)
        if not uniform:
            w[0, 3] = 0.0
            xf[0, 3] = 1e3  # weight 0: must leave no trace
        batches.append((xq, xf, w))
    direct = start_sums(in_f, product_rows=out_f)
    grams = start_sums(in_f, cross=True, need_fp_gram=True)
    for xq, xf, w in batches:
        add_tokens(direct, xq, w, xf, W)
        add_tokens(grams, xq, w, xf)
    finish_sums(direct), finish_sums(grams)
    W64 = W.double()
    wd = torch.zeros(out_f, in_f, dtype=torch.float64)
    whw = torch.zeros((), dtype=torch.float64)
    for xq, xf, w in batches:
        for x_q, x_f, wt in zip(xq.reshape(-1, in_f).double(), xf.reshape(-1, in_f).double(), w.reshape(-1).double()):
            if wt > 0:
                wd += wt * torch.outer(W64 @ (x_f - x_q), x_q)
                whw += wt * (W64 @ x_f).square().sum()
    assert set(direct) == {"H", "WD", "WHfpW", "w_sum", "tokens"}
    torch.testing.assert_close(direct["H"], grams["H"], rtol=0, atol=0)
    torch.testing.assert_close(direct["WD"].double(), wd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(direct["WHfpW"], whw, rtol=1e-6, atol=0)
    folded = fold_cross_terms(W, grams)
    torch.testing.assert_close(direct["WD"], folded["WD"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(direct["WHfpW"], folded["WHfpW"], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="weight exactly when"):
        add_tokens(direct, *batches[0][:3])
    with pytest.raises(ValueError, match="weight has shape"):
        add_tokens(direct, *batches[0][:3], W[:-1])
    with pytest.raises(ValueError, match="cross=False"):
        start_sums(in_f, cross=True, product_rows=out_f)
