"""Token-importance strategies against direct computations on real (tiny) transformers models."""

import pytest
import torch

from tlq_farm import block as B
from tlq_farm.calib.data import load_calibration, model_inputs
from tlq_farm.importance import ImportanceContext, get_strategy
from tlq_farm.importance.base import backward_chain, fp_chain_inputs
from tlq_farm.importance.modality import floor_at_median, modality_ratios
from tlq_farm.importance.qig import integrated_gradients, iqr_clip
from tlq_farm.importance.tlq import token_selection, weights_from_scores
from tlq_farm.models.adapter import find_layout, linear_names, load_model
from tlq_farm.spec import QuantSpec


def make_ctx(tiny_models, calib_jsonl, arch="qwen2_vl", n=3, **spec_kw):
    spec_kw.setdefault("group_size", 32)
    model, proc = load_model(str(tiny_models(arch)))
    for p in model.parameters():
        p.requires_grad_(False)
    lay = find_layout(model)
    blocks = lay.decoder_blocks(model)
    samples = load_calibration(calib_jsonl, proc, samples=n, seq_len=512, seed=0).samples
    caps = [B.capture(model, blocks, model_inputs(s)) for s in samples]
    ctx = ImportanceContext(spec=QuantSpec(**spec_kw), blocks=blocks, norm=lay.get(model, lay.norm), head=lay.get(model, lay.head),
                            captured=caps, valid=[s["attention_mask"].reshape(-1).float() for s in samples],
                            vision=[s["vision_mask"].reshape(-1).bool() for s in samples],
                            labels=[s["labels"] for s in samples], names=[linear_names(b) for b in blocks])
    return model, samples, ctx


def test_backward_chain_equals_full_model_autograd(tiny_models, calib_jsonl):
    model, samples, ctx = make_ctx(tiny_models, calib_jsonl, n=2)
    xs = fp_chain_inputs(ctx)
    with torch.no_grad():
        last = [B.run_block(ctx.blocks[-1], h, c.kwargs(len(ctx.blocks) - 1)) for h, c in zip(xs[-1], ctx.captured)]
    grads, grad_last = backward_chain(ctx, xs, last)
    for i, s in enumerate(samples):
        leaf, outs = {}, []

        def pre(_m, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
            leaf["x"] = h
            return (h,) + tuple(args[1:]), kwargs

        def post(_m, _a, out):
            o = B.block_output(out)
            o.retain_grad()
            outs.append(o)

        hs = [ctx.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)] + [b.register_forward_hook(post) for b in ctx.blocks]
        try:
            loss = model(**model_inputs(s), labels=s["labels"]).loss
            loss.backward()
        finally:
            for h in hs:
                h.remove()
        torch.testing.assert_close(grads[0][i], leaf["x"].grad, rtol=1e-4, atol=1e-7)
        for b in range(len(ctx.blocks) - 1):
            torch.testing.assert_close(grads[b + 1][i], outs[b].grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(grad_last[i], outs[-1].grad, rtol=1e-4, atol=1e-7)


def test_modality_ratio_is_vision_over_text_gradient_mean():
    g = [[torch.tensor([[[2.0, 2.0], [1.0, 1.0], [4.0, 0.0]]])]]  # one layer, one sample, 3 tokens
    vision = [torch.tensor([True, False, True])]
    valid = [torch.ones(3)]
    r = modality_ratios(g, vision, valid)
    assert float(r[0]) == pytest.approx(((2 + 2) / 2) / 1.0)
    assert floor_at_median(torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)).tolist() == [0.5, 0.5, 2.0]


def test_modality_weights_vision_tokens_only(tiny_models, calib_jsonl):
    _, _, ctx = make_ctx(tiny_models, calib_jsonl, importance="modality")
    strat = get_strategy("modality")
    strat.prepare(ctx)
    r = ctx.state["modality_ratio"]
    raw = ctx.state["modality_ratio_raw"]
    assert torch.equal(r, torch.clamp(raw, min=float(torch.quantile(raw, 0.5)))) and (r > 0).all()
    w = strat.block_weights(ctx, 1, ctx.blocks[1], ctx.names[1], None, None)
    for wi, vis in zip(w, ctx.vision):
        assert torch.all(wi[~vis] == 1.0)
        assert torch.allclose(wi[vis], torch.full_like(wi[vis], float(r[1])))


def test_integrated_gradients_completeness_on_a_real_block(tiny_models, calib_jsonl):
    _, _, ctx = make_ctx(tiny_models, calib_jsonl, n=1)
    # float64, so that the check measures the quadrature, not float32 rounding.
    blk = ctx.blocks[0].double()
    proxy = B.rtn_proxy(blk, ctx.names[0], ctx.spec).double()
    kw = {k: (tuple(t.double() for t in v) if isinstance(v, tuple) else (v.double() if v.is_floating_point() else v))
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


def test_tlq_prepare_on_a_real_model(tiny_models, calib_jsonl):
    _, _, ctx = make_ctx(tiny_models, calib_jsonl, importance="tlq", tlq_keep=0.25)
    get_strategy("tlq").prepare(ctx)
    n_vis = sum(int(v.sum()) for v in ctx.vision)
    n_txt = sum(int((~v).sum()) for v in ctx.vision)
    kept = ctx.state["tlq_kept"]
    assert sum(int((k & ~v).sum()) for k, v in zip(kept, ctx.vision)) == n_txt
    kept_vis = sum(int((k & v).sum()) for k, v in zip(kept, ctx.vision))
    assert round(0.25 * n_vis) <= kept_vis <= n_vis // 2
    assert all(bool((s >= 0).all()) for s in ctx.state["tlq_scores"])


def test_vlmq_weights_are_per_projection_and_informative_at_block_0(tiny_models, calib_jsonl):
    _, _, ctx = make_ctx(tiny_models, calib_jsonl, importance="vlmq", bits=2)
    blk = ctx.blocks[0]
    inputs = [(c.hidden, c.kwargs(0)) for c in ctx.captured]
    w = get_strategy("vlmq").block_weights(ctx, 0, blk, ctx.names[0], inputs, inputs)
    assert set(w) == set(ctx.names[0])
    for n, per_sample in w.items():
        for wi, ok in zip(per_sample, ctx.valid):
            assert wi.shape == ok.shape and bool((wi >= 0).all())
            assert float(wi.sum()) == pytest.approx(float(ok.sum()), rel=1e-4)  # normalized to mean 1
    # At block 0 both chains agree; the RTN path still gives a non-uniform signal.
    assert not torch.allclose(w["self_attn.q_proj"][0], ctx.valid[0])
