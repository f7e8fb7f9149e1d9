"""The farm's tasks against a plain reference (tests/oracle.py): a whole model in memory, one sample at a time,
float64 sums, the model's own autograd.

The job runs embedded on a folder store, in packed batches (samples of very different lengths, several to
a row), with statistics partitions and forwards stopped at a group's last input; what it stored (gradient
scores, importance state, statistics, chains, qweights) must be what the reference computes from the same
inputs, to float rounding.
"""

import json

import pytest
import torch

from tlq_farm import block as B
from tlq_farm import plan, steps
from tlq_farm.calib.data import load_calibration, model_inputs
from tlq_farm.models.adapter import find_layout, linear_names, load_model
from tlq_farm.quant import finalize_hessian, gptq_quantize, reduce_partials
from tlq_farm.spec import JobSpec, QuantSpec
from tlq_farm.staging import stage_job
from tlq_farm.store import LocalStore, keys
from tlq_farm.store.tensors import get_tensors_and_metadata

import oracle

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)

# Prompts of very different lengths, so that a row packs several short samples beside a long one.
PROMPTS = ["what?", "describe this picture, the colors, the shapes and where they are, left or right, top or "
           "bottom, and how many there are of each.", "how many?", "which color is on the left?"]
ANSWERS = ["a red cat.", "two blue cars, one green tree on the right and a yellow house on the left.", "three.",
           "red."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tlq_farm.models.tiny import make_tiny, write_image_calib

    root = tmp_path_factory.mktemp("oracle")
    model = make_tiny("qwen2_vl", root / "model", seed=0, num_hidden_layers=3)
    return model, write_image_calib(root / "calib", 8, size=56, prompts=PROMPTS, answers=ANSWERS)


def run_job(files, tmp_path_factory, **quant):
    model, calib = files
    spec = JobSpec(model=str(model), calib=str(calib), quant=QuantSpec(**{"group_size": 32, **quant}), samples=8,
                   seq_len=512, shard_tokens=130, partition_tokens=90)
    store = LocalStore(tmp_path_factory.mktemp("oracle-store"))
    job, _ = stage_job(store, spec)
    assert steps.run_embedded(store, job)
    return store, job, spec


@pytest.fixture(scope="module")
def reference(files):
    """The model in memory, its samples (in the job's order) and their block-0 inputs."""
    model_dir, calib = files
    model, proc = load_model(str(model_dir))
    model.requires_grad_(False)
    layout = find_layout(model)
    blocks = layout.decoder_blocks(model)
    samples = load_calibration(calib, proc, samples=8, seq_len=512, seed=0).samples
    captured = [B.capture(model, blocks, model_inputs(s)) for s in samples]
    valid = [s["attention_mask"].reshape(-1).float() for s in samples]
    vision = [s["vision_mask"].reshape(-1).bool() for s in samples]
    return model, blocks, samples, captured, valid, vision


@pytest.fixture(scope="module", params=[dict(importance="tlq", tlq_keep=0.5), dict(method="gptaq", importance="modality"),
                                        dict(importance="uniform", act_bits=8)],
                ids=["gptq-tlq", "gptaq-modality", "gptq-uniform-a8"])
def job(files, tmp_path_factory, request):
    return run_job(files, tmp_path_factory, **request.param)


def test_the_job_packs_several_samples_into_a_row(job, reference):
    store, job_id, _ = job
    ctx = steps.job_context(store, job_id)
    shards = ctx.manifest["shards"]
    packed = [B.make_batches([(c.hidden, c.kwargs(0)) for c in ctx.captured("q", 0, k)]) for k in range(len(shards))]
    # Some row holds more than one sample, and some batch more than one row.
    assert any(len({p[0] for p in b.places}) < b.size for bs in packed for b in bs)
    assert any(b.hidden.shape[0] > 1 for bs in packed for b in bs)
    assert len(plan.stat_partitions(ctx.manifest, ctx.groups, 0)) >= 2


def _all_samples(ctx, f):
    return [x for k in range(len(ctx.manifest["shards"])) for x in f(k)]


def test_the_importance_state_is_the_whole_models_autograd(job, reference):
    store, job_id, spec = job
    model, blocks, samples, captured, valid, vision = reference
    if spec.quant.importance not in plan.GLOBAL_IMPORTANCE:
        pytest.skip("no gradient pass")
    ctx = steps.job_context(store, job_id)
    grads = oracle.model_gradients(model, blocks, samples)
    if spec.quant.importance == "tlq":
        xq = oracle.rtn_chain(blocks, captured, spec.quant)
        want = oracle.tlq_weights(grads, xq, valid, vision, spec.quant)
        got = ctx.importance_state()["tlq_weights"]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
        # The selection is the same set of tokens (a score at the threshold could flip; none does here).
        kept = ctx.importance_state()["tlq_kept"]
        assert sum(int((g > 0).sum()) for g in got) == sum(int((w > 0).sum()) for w in want)
        assert all(torch.equal(k, w > 0) for k, w in zip(kept, want))
    else:
        torch.testing.assert_close(ctx.importance_state()["modality_ratio"],
                                   oracle.modality_ratio(grads, valid, vision), rtol=1e-4, atol=0)


def test_the_backward_chain_stores_the_models_own_gradients(job, reference):
    store, job_id, spec = job
    model, blocks, samples, *_ = reference
    if spec.quant.importance not in plan.GLOBAL_IMPORTANCE:
        pytest.skip("no gradient pass")
    ctx = steps.job_context(store, job_id)
    grads = oracle.model_gradients(model, blocks, samples)
    n = ctx.manifest["n_blocks"]
    stored = [b for b in range(n + 1) if keys.grads(job_id, b, 0) in steps.committed_keys(store, job_id)]
    assert stored == list(range(min(plan.score_blocks(ctx.manifest)) + 1, n + 1))
    for b in stored:
        got = _all_samples(ctx, lambda k: ctx.acts("grads", b, k))
        for i, g in enumerate(got):
            want = grads[i]["g_last"] if b == n else grads[i]["g_in"][b]
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7)


def test_the_chains_are_the_blocks_run_one_sample_at_a_time(job, reference):
    store, job_id, spec = job
    ctx = steps.job_context(store, job_id)
    n = ctx.manifest["n_blocks"]
    for b in range(n - 1):
        chains = ["q"] + (["fp"] if plan.needs_fp_chain(ctx.manifest) else [])
        for chain in chains:
            blk = ctx.block(b, ctx.names(b) if chain == "q" else [])
            ins = _all_samples(ctx, lambda k: ctx.captured(chain, b, k))
            got = _all_samples(ctx, lambda k: ctx.acts(chain, b + 1, k))
            with torch.no_grad(), B.act_fake_quant(blk, ctx.names(b), spec.quant.act_bits if chain == "q" else None):
                want = [B.run_block(blk, c.hidden, c.kwargs(b)) for c in ins]
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def close_to_reference(got: dict, want: dict, weight: torch.Tensor, gptaq: bool, where) -> None:
    """The stored sums against the reference's: H; for GPTAQ each linear's W D and tr(W Hfp W^T), which the
    partial holds instead of D and Hfp. A stored H is its upper block triangle: unpacked by the reduction."""
    if "H_upper" in got:
        got = {**got, "H": reduce_partials([{"H_upper": got["H_upper"]}])["H"]}
    W = weight.detach().double()
    pairs = [("H", want["H"])]
    if gptaq:
        pairs += [("WD", W @ want["D"]), ("WHfpW", ((W @ want["Hfp"]) * W).sum())]
    for name, ref in pairs:
        scale = float(ref.abs().max())
        assert float((got[name].double() - ref).abs().max()) <= 1e-5 * scale, (where, name)


def test_statistics_are_the_float64_per_sample_sums_and_the_solve_follows(job, reference):
    store, job_id, spec = job
    ctx = steps.job_context(store, job_id)
    gptaq = spec.quant.method == "gptaq"
    if gptaq:  # both ways of summing the GPTAQ terms are checked below: down_proj's from products with its weight
        blk0 = ctx.groups["blocks"][0]
        products = [plan.product_cross_terms(ctx.manifest["spec"]["quant"], members, blk0["inputs"], blk0["shapes"])
                    for members in blk0["groups"]]
        assert [m for p in products for m in p] == ["mlp.down_proj"]
    for b in range(ctx.manifest["n_blocks"]):
        groups = ctx.groups["blocks"][b]["groups"]
        q_in = [(c.hidden, c.kwargs(b)) for c in _all_samples(ctx, lambda k: ctx.captured("q", b, k))]
        fp_in = [(c.hidden, c.kwargs(b)) for c in _all_samples(ctx, lambda k: ctx.captured("fp", b, k))] if gptaq else None
        weights = _all_samples(ctx, lambda k: ctx.token_weights(b, k))
        for g, members in enumerate(groups):
            blk = ctx.block(b, [m for gg in range(g) for m in groups[gg]])
            want = oracle.group_statistics(blk, q_in, weights, members, act_bits=spec.quant.act_bits,
                                           fp_block=ctx.block(b) if gptaq else None, fp_inputs=fp_in)
            for m in members:
                parts = [steps.stored_partial(*get_tensors_and_metadata(store, keys.stats(job_id, b, g, p)), m)
                         for p in plan.stat_partitions(ctx.manifest, ctx.groups, b)]
                got = reduce_partials(parts)
                assert float(got["w_sum"]) == pytest.approx(want[m]["w_sum"], rel=1e-6)
                close_to_reference(got, want[m], blk.get_submodule(m).weight, gptaq, (b, m))
                # The solver on the reference statistics gives the stored codes (both sums agree closely).
                res, _ = steps.qresult_from_store(store, keys.qweights(job_id, b, m))
                if not gptaq:
                    H = finalize_hessian({"H": want[m]["H"], "w_sum": torch.tensor(want[m]["w_sum"])})[0]
                    W = blk.get_submodule(m).weight.detach().float()
                    ref = gptq_quantize(W, H, bits=spec.quant.bits, group_size=spec.quant.group_size,
                                        damp=spec.quant.damp)
                    assert float((ref.codes == res.codes).float().mean()) >= 0.99, (b, m)


def test_stopping_a_forward_at_the_groups_input_changes_nothing(job, reference):
    store, job_id, spec = job
    ctx = steps.job_context(store, job_id)
    assert ctx.groups["blocks"][0]["once"] is True
    blk = ctx.block(0)
    q_in = [(c.hidden, c.kwargs(0)) for c in ctx.captured("q", 0, 0)]
    w = ctx.token_weights(0, 0)
    names = ctx.groups["blocks"][0]["groups"][0]
    early = B.accumulate_stats(blk, q_in, w, names, act_bits=spec.quant.act_bits, act_names=ctx.names(0))
    full = B.accumulate_stats(blk, q_in, w, names, act_bits=spec.quant.act_bits, act_names=ctx.names(0),
                              stop_early=False)
    for m in names:
        assert torch.equal(early[m]["H"], full[m]["H"])


def test_one_sample_at_a_time_and_packed_batches_agree(reference):
    _, blocks, samples, captured, valid, _ = reference
    blk = blocks[0]
    names = linear_names(blk)
    inputs = [(c.hidden, c.kwargs(0)) for c in captured]
    alone = [B.Batch(h, kw, None, valid[i].reshape(h.shape[:-1]), index=[i]) for i, (h, kw) in enumerate(inputs)]
    packed = B.make_batches(inputs, valid)
    assert len(packed) < len(inputs)
    a = B.accumulate_stats(blk, alone, None, names)
    p = B.accumulate_stats(blk, packed, None, names)
    for n in names:
        torch.testing.assert_close(p[n]["H"], a[n]["H"], rtol=1e-5, atol=1e-5 * float(a[n]["H"].abs().max()))
        assert float(p[n]["w_sum"]) == float(a[n]["w_sum"])
    with torch.no_grad():
        one = [B.run_block(blk, h, kw) for h, kw in inputs]
    for x, y in zip(B.propagate(blk, inputs), one):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # The backward pass too: each sample's input gradient is its own.
    g_out = [torch.randn_like(h) for h, _ in inputs]
    for x, (h, kw), go in zip(B.block_vjp_batched(blk, inputs, g_out), inputs, g_out):
        torch.testing.assert_close(x, B.block_vjp(blk, h, kw, go), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def vision_job(files, tmp_path_factory):
    return run_job(files, tmp_path_factory, method="gptaq", quantize_vision=True)


def test_a_quantized_vision_tower_runs_as_tasks_and_matches_the_reference(vision_job, reference):
    store, job_id, spec = vision_job
    model, blocks, samples, captured, *_ = reference
    ctx = steps.job_context(store, job_id)
    kinds = {r["kind"] for r in steps.task_records(store, job_id)}
    assert {"reembed", "quantize"} <= kinds  # a vision tower's statistics take one partition: solved in place
    n_vision = ctx.manifest["n_vision_blocks"]
    assert n_vision == 2 and len(ctx.groups["vision"]) == 2
    # The vision tower's statistics: uniform weights over its tokens, the fp chain for GPTAQ's cross term.
    for b in range(n_vision):
        q_in = [(c.hidden, c.kwargs(b)) for c in _all_samples(ctx, lambda k: ctx.captured("q", b, k, "vision"))]
        fp_in = [(c.hidden, c.kwargs(b)) for c in _all_samples(ctx, lambda k: ctx.captured("fp", b, k, "vision"))]
        for g, members in enumerate(ctx.groups["vision"][b]["groups"]):
            blk = ctx.block(b, [m for gg in range(g) for m in ctx.groups["vision"][b]["groups"][gg]], "vision")
            want = oracle.group_statistics(blk, q_in, [torch.ones(h.shape[:-1]) for h, _ in q_in], members,
                                           fp_block=ctx.block(b, tower="vision"), fp_inputs=fp_in)
            # The sums the group's quantize task solved from (steps.group_sums: nothing of them is stored).
            sums, owners = steps.group_sums(ctx, plan.Task("quantize", block=b, group=g, tower="vision"))
            for m in members:
                got = steps.stored_partial(sums, {"tlq": json.dumps({"owners": owners})}, m)
                close_to_reference(got, want[m], blk.get_submodule(m).weight, True, (b, m))
    # The decoder's fp chain starts from the full-precision tower, its q chain from the quantized one.
    vision_path = find_layout(model).vision_blocks
    fp_first = [c.hidden for c in captured]
    quantized = __import__("copy").deepcopy(model)
    for b in range(n_vision):
        blk = quantized.get_submodule(f"{vision_path}.{b}")
        for m in ctx.names(b, "vision"):
            B.apply_qweight(blk, m, steps.qresult_from_store(store, keys.qweights(job_id, b, m, "vision"))[0])
    q_first = [B.capture(quantized, find_layout(quantized).decoder_blocks(quantized), model_inputs(s)).hidden
               for s in samples]
    got_fp = _all_samples(ctx, lambda k: ctx.acts("fp", 0, k))
    got_q = _all_samples(ctx, lambda k: ctx.acts("q", 0, k))
    for g, w in zip(got_fp, fp_first):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_q, q_first):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(got_q, got_fp))


def test_full_rows_of_one_sample_take_the_models_causal_path(reference):
    _, blocks, _, captured, _, _ = reference
    blk = blocks[0]
    same = [(captured[0].hidden * (1 + i), captured[0].kwargs(0)) for i in range(3)]  # one length, no padding
    (batch,) = B.make_batches(same)
    assert batch.hidden.shape[0] == 3 and batch.kwargs.get("attention_mask") is None
    with torch.no_grad():
        for x, (h, kw) in zip(B.propagate(blk, same), same):
            torch.testing.assert_close(x, B.run_block(blk, h, kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths", [[256] * 5, [601, 407, 407, 315, 601], [30, 90, 45, 20, 88, 60, 12, 70] * 9,
                                     [300, 300, 280, 100, 90, 40], [9000, 30, 30]])
def test_batches_hold_every_sample_once_with_little_padding(lengths):
    batches = B.plan_batches(lengths, batch_tokens=1024)
    placed = sorted(i for batch in batches for row in batch for i in row)
    assert placed == list(range(len(lengths)))
    for batch in batches:
        width = lengths[batch[0][0]]  # a batch is as wide as its first sample, its longest
        assert all(sum(lengths[i] for i in row) <= width for row in batch)
        assert len(batch) * width <= max(1024, width)
        long = [i for row in batch for i in row if lengths[i] >= B.PACK_BELOW]
        if long:  # a long sample shares a forward only with samples of its length, one per row: no padding
            assert all(len(row) == 1 and lengths[row[0]] == width for row in batch)
        else:  # at least half of the batch is tokens, not padding
            assert 2 * sum(lengths[i] for row in batch for i in row) >= len(batch) * width


def test_a_packed_batch_lays_out_each_sample_as_one_at_a_time_would():
    """Several samples to a row, padding, samples with a mask of their own (additive float or bool) beside
    plain causal ones: each sample's tokens, kwargs and mask block sit where Batch.places says, padding is
    zero and attends to itself only, and no token attends across samples."""
    g = torch.Generator().manual_seed(0)
    lengths = [40, 17, 9, 30, 12, 5, 33]
    inputs = []
    for i, n in enumerate(lengths):
        kw = {"position_embeddings": (torch.randn(1, n, 4, generator=g), torch.randn(1, n, 4, generator=g)),
              "position_ids": torch.arange(n).reshape(1, n), "attention_mask": None}
        if i % 3 == 1:  # an additive mask of its own: 0 where allowed (here: a window of 4 tokens back)
            allowed = torch.ones(n, n, dtype=torch.bool).tril() & ~torch.ones(n, n, dtype=torch.bool).tril(-4)
            kw["attention_mask"] = torch.where(allowed, 0.0, float("-inf")).reshape(1, 1, n, n)
        elif i % 3 == 2:  # a bool mask of its own: True where allowed (here: attending both ways)
            kw["attention_mask"] = torch.ones(1, 1, n, n, dtype=torch.bool)
        inputs.append((torch.randn(1, n, 8, generator=g), kw))
    batches = B.make_batches(inputs, batch_tokens=400)
    assert sum(b.size for b in batches) == len(inputs) and any(len(b.places) > b.hidden.shape[0] for b in batches)
    for batch in batches:
        rows, width = batch.hidden.shape[:2]
        mask = batch.kwargs["attention_mask"][:, 0]
        covered = torch.zeros(rows, width, dtype=torch.bool)
        for (r, s, n), i in zip(batch.places, batch.index):
            h, kw = inputs[i]
            assert torch.equal(batch.hidden[r, s:s + n], h[0])
            for j in range(2):
                assert torch.equal(batch.kwargs["position_embeddings"][j][r, s:s + n], kw["position_embeddings"][j][0])
            assert torch.equal(batch.kwargs["position_ids"][r, s:s + n], kw["position_ids"][0])
            own = kw["attention_mask"]
            want = torch.ones(n, n, dtype=torch.bool).tril() if own is None else (
                own.reshape(n, n) if own.dtype == torch.bool else own.reshape(n, n) == 0)
            assert torch.equal(mask[r, s:s + n, s:s + n], want)
            assert not mask[r, s:s + n, :s].any() and not mask[r, s:s + n, s + n:].any()
            covered[r, s:s + n] = True
        pad = ~covered
        assert not batch.hidden[pad].any()
        for r, t in pad.nonzero().tolist():
            assert mask[r, t].nonzero().reshape(-1).tolist() == [t]


def test_a_handed_out_batch_is_freed_once_its_forward_is_done():
    """block.handed_out: the list keeps no batch it has handed out, so a shard's packed copies do not all stay
    alive until its last forward; every batch comes once, in order."""
    import gc
    import weakref

    inputs = [(torch.randn(1, 256, 8), {"position_ids": torch.arange(256).reshape(1, 256)}) for _ in range(6)]
    batches = B.make_batches(inputs, batch_tokens=512)
    assert len(batches) == 3
    refs, order = [weakref.ref(b) for b in batches], []
    for batch in B.handed_out(batches):
        order.append(batch.index)
        del batch
        gc.collect()
        assert refs[len(order) - 1]() is None  # gone as soon as its consumer let go of it
    assert order == [[0, 1], [2, 3], [4, 5]] and batches == [None] * 3
