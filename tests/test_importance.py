"""Token-importance strategies against direct computations on real (tiny) transformers models."""

import pytest
import torch

from tlq_farm import block as B
from tlq_farm.calib.data import load_calibration, model_inputs
from tlq_farm.importance import ImportanceContext, get_strategy, modality, tlq
from tlq_farm.importance.qig import integrated_gradients, iqr_clip
from tlq_farm.importance.tlq import token_selection, weights_from_scores
from tlq_farm.models.adapter import find_layout, linear_names, load_model
from tlq_farm.spec import QuantSpec


def make_ctx(tiny_models, calib_jsonl, arch="qwen2_vl", n=3, **spec_kw):
    """(model, samples, a namespace: spec, blocks, names, captured, and the ImportanceContext of the samples)."""
    from types import SimpleNamespace

    spec_kw.setdefault("group_size", 32)
    model, proc = load_model(str(tiny_models(arch)))
    for p in model.parameters():
        p.requires_grad_(False)
    lay = find_layout(model)
    blocks = lay.decoder_blocks(model)
    samples = load_calibration(calib_jsonl, proc, samples=n, seq_len=512, seed=0).samples
    caps = [B.capture(model, blocks, model_inputs(s)) for s in samples]
    spec = QuantSpec(**spec_kw)
    ictx = ImportanceContext(spec, [s["attention_mask"].reshape(-1).float() for s in samples],
                             [s["vision_mask"].reshape(-1).bool() for s in samples])
    ns = SimpleNamespace(spec=spec, blocks=blocks, names=[linear_names(b) for b in blocks], captured=caps,
                         valid=ictx.valid, vision=ictx.vision, importance=ictx)
    return model, samples, ns


def test_modality_ratio_is_vision_over_text_gradient_mean():
    g = [torch.tensor([[[2.0, 2.0], [1.0, 1.0], [4.0, 0.0]]])]  # one sample, 3 tokens
    vision = [torch.tensor([True, False, True])]
    valid = [torch.ones(3)]
    sums = modality.gradient_sums(g, vision, valid)
    assert sums.tolist() == [4.0, 2.0, 1.0, 1.0]
    assert modality.ratio(sums) == pytest.approx(((2 + 2) / 2) / 1.0)
    # Shards add up: two shards' sums give the ratio of the whole set.
    state = modality.reduce_scores([[sums, modality.gradient_sums(g, vision, valid)], [sums, sums]], vision, valid, None)
    assert state["modality_ratio_raw"].tolist() == [2.0, 2.0]
    assert modality.floor_at_median(torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)).tolist() == [0.5, 0.5, 2.0]


def test_modality_weights_vision_tokens_only():
    valid = [torch.tensor([1.0, 1.0, 1.0, 0.0])]
    vision = [torch.tensor([True, False, True, True])]
    state = {"modality_ratio": torch.tensor([0.5, 3.0], dtype=torch.float64)}
    w = modality.token_weights(1, valid, vision, state)[0]
    assert w.tolist() == [3.0, 1.0, 3.0, 0.0]
    # No ratio (no vision token in the set): uniform.
    assert modality.token_weights(1, valid, vision, {})[0].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_integrated_gradients_completeness_on_a_real_block(tiny_models, calib_jsonl):
    _, _, ctx = make_ctx(tiny_models, calib_jsonl, n=1)
    # float64, so that the check measures the quadrature, not float32 rounding.
    blk = ctx.blocks[0].double()
    proxy = B.rtn_proxy(blk, ctx.names[0], ctx.spec).double()
    kw = {k: (tuple(t.double() for t in v) if isinstance(v, tuple) else (v.double() if v is not None and v.is_floating_point() else v))
          for k, v in ctx.captured[0].kwargs(0).items()}
    x = ctx.captured[0].hidden.double()

    def err(xi):
        return ((B.run_block(proxy, xi, kw) - B.run_block(blk, xi, kw)) ** 2).sum(dim=-1).mean()

    ig = integrated_gradients(err, x, steps=256)
    with torch.no_grad():
        delta = float(err(x) - err(torch.zeros_like(x)))
    # Completeness: the attributions sum to E(x) - E(baseline); midpoint rule with 256 steps
    # (the RMSNorm makes the integrand steep near the zero baseline, so few steps would be coarse).
    assert float(ig.sum()) == pytest.approx(delta, rel=1e-2)


def test_integrated_gradients_exact_on_a_quadratic():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.tensor([0.3, 1.5, -2.0], dtype=torch.float64)
    ig = integrated_gradients(lambda z: (a * z * z).sum(), x, steps=4)
    torch.testing.assert_close(ig, a * x * x)


def test_iqr_clip_caps_outliers_only():
    s = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 50.0])
    out = iqr_clip(s, torch.ones(6))
    assert torch.equal(out[:5], s[:5]) and out[5] < 2.0


def test_tlq_keeps_every_text_token_and_the_top_vision_fraction():
    scores = [torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0], dtype=torch.float64)]
    vision = [torch.tensor([True, True, True, True, False])]
    valid = [torch.ones(5)]
    kept = token_selection(scores, vision, valid, keep=0.5)
    assert kept[0].tolist() == [True, False, True, False, True]
    w = weights_from_scores(scores, kept)[0]
    assert w[1] == 0 and w[3] == 0  # a dropped token is removed from the Hessian exactly
    mean_kept = (5 + 3 + 9) / 3
    assert float(w[0]) == pytest.approx(0.5 + 0.5 * 5 / mean_kept)


def test_tlq_reduce_keeps_every_text_token_and_the_vision_fraction():
    g = torch.Generator().manual_seed(0)
    vision = [torch.rand(40, generator=g) < 0.7 for _ in range(3)]
    valid = [torch.ones(40) for _ in range(3)]
    per_block = [[torch.rand(40, generator=g, dtype=torch.float64) for _ in range(3)] for _ in range(2)]
    state = tlq.reduce_scores(per_block, vision, valid, QuantSpec(tlq_keep=0.25))
    kept = state["tlq_kept"]
    n_vis = sum(int(v.sum()) for v in vision)
    assert sum(int((k & ~v).sum()) for k, v in zip(kept, vision)) == sum(int((~v).sum()) for v in vision)
    assert sum(int((k & v).sum()) for k, v in zip(kept, vision)) == round(0.25 * n_vis)
    assert all(bool((w[~k] == 0).all()) and bool((w[k] >= 0.5).all()) for w, k in zip(state["tlq_weights"], kept))


def test_vlmq_weights_are_per_projection_and_informative_at_block_0(tiny_models, calib_jsonl):
    _, _, ctx = make_ctx(tiny_models, calib_jsonl, importance="vlmq", bits=2)
    blk = ctx.blocks[0]
    inputs = [(c.hidden, c.kwargs(0)) for c in ctx.captured]
    w = get_strategy("vlmq").block_weights(ctx.importance, 0, blk, ctx.names[0], inputs, inputs)
    assert set(w) == set(ctx.names[0])
    for n, per_sample in w.items():
        for wi, ok in zip(per_sample, ctx.valid):
            assert wi.shape == ok.shape and bool((wi >= 0).all())
            assert float(wi.sum()) == pytest.approx(float(ok.sum()), rel=1e-4)  # normalized to mean 1
    # At block 0 both chains agree; the RTN path still gives a non-uniform signal.
    assert not torch.allclose(w["self_attn.q_proj"][0], ctx.valid[0])
