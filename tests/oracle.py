"""A small reference for the farm's arithmetic, written the plain way (no tests here).

Everything runs one sample at a time, in float64 where the farm sums, on a whole model in memory: the
gradient pass through the model's own forward and `loss.backward()`, the statistics of a group as a per-sample
sum of x^T diag(w) x from hooks that let every block run to its end. The farm's tasks (packed batches, a
forward stopped at the group's last input, float32 running sums, partitions, one task per block and shard)
must agree with it to float rounding.
"""

from __future__ import annotations

import torch

from tlq_farm import block as B
from tlq_farm.calib.data import model_inputs


def model_gradients(model, blocks, samples: list[dict]) -> list[dict]:
    """Per sample: 'x' the input of every block on the full-precision model, 'g_in' dL/d(input of block b),
    'g_last' dL/d(output of the last block), with L the model's own loss on the sample's labels."""
    out = []
    for s in samples:
        xs, outs, leaf = [], [], {}

        def pre(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if not xs:
                h = h.detach().requires_grad_(True)
                leaf["x"] = h
            h.retain_grad()
            xs.append(h)
            return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        def post(_m, _a, o):
            o = B.block_output(o)
            o.retain_grad()
            outs.append(o)

        handles = [blk.register_forward_pre_hook(pre, with_kwargs=True) for blk in blocks]
        handles += [blk.register_forward_hook(post) for blk in blocks]
        try:
            with torch.enable_grad():
                model(**model_inputs(s), labels=s["labels"]).loss.backward()
        finally:
            for h in handles:
                h.remove()
        out.append({"x": [x.detach() for x in xs], "g_in": [x.grad.detach() for x in xs],
                    "g_last": outs[-1].grad.detach()})
    return out


@torch.no_grad()
def rtn_chain(blocks, captured: list[B.Captured], spec) -> list[list[torch.Tensor]]:
    """x~^b per block and sample: the inputs through round-to-nearest copies of the blocks before b."""
    from tlq_farm.models.adapter import linear_names

    chain = [[c.hidden for c in captured]]
    for b, blk in enumerate(blocks[:-1]):
        names = linear_names(blk)
        proxy = B.rtn_proxy(blk, names, spec)
        with B.act_fake_quant(proxy, names, spec.act_bits):
            chain.append([B.run_block(proxy, h, c.kwargs(b)) for h, c in zip(chain[-1], captured)])
    return chain


def tlq_weights(grads: list[dict], xq: list[list[torch.Tensor]], valid, vision, spec) -> list[torch.Tensor]:
    """TLQ's token weights from the whole model's gradients (tlq_farm.importance.tlq, steps 3-5)."""
    from tlq_farm.importance import tlq

    n = len(xq)
    if n == 1:
        per_block = [tlq.saliency([g["g_in"][0] for g in grads], [g["x"][0] for g in grads])]
    else:
        per_block = [tlq.first_order_scores([g["g_in"][b] for g in grads], xq[b], [g["x"][b] for g in grads])
                     for b in range(1, n)]
    return tlq.reduce_scores(per_block, vision, valid, spec)["tlq_weights"]


def modality_ratio(grads: list[dict], valid, vision) -> torch.Tensor:
    """MBQ's r_l from dL/dY_l of the whole model, floored at the median."""
    from tlq_farm.importance import modality

    n = len(grads[0]["x"])
    outs = [[g["g_in"][b + 1] if b + 1 < n else g["g_last"] for g in grads] for b in range(n)]
    raw = torch.tensor([modality.ratio(modality.gradient_sums(o, vision, valid)) for o in outs], dtype=torch.float64)
    return modality.floor_at_median(raw)


@torch.no_grad()
def group_statistics(block, q_inputs, weights, names, *, act_bits=None, fp_block=None, fp_inputs=None) -> dict:
    """float64 sums per linear over the samples, one at a time: H = sum_t w_t x~_t x~_t^T, with the fp chain
    also D = sum_t w_t (x_t - x~_t) x~_t^T and Hfp = sum_t w_t x_t x_t^T; and w_sum."""
    from tlq_farm.models.adapter import linear_names

    seen_q, seen_fp = {}, {}

    def keep(store):
        return lambda n: (lambda _m, args: store.__setitem__(n, args[0].detach().double()))

    all_names = linear_names(block)
    out = {n: {"H": 0.0, "D": 0.0, "Hfp": 0.0, "w_sum": 0.0} for n in names}
    with B.act_fake_quant(block, all_names, act_bits):
        hq = [block.get_submodule(n).register_forward_pre_hook(keep(seen_q)(n)) for n in names]
        hf = [fp_block.get_submodule(n).register_forward_pre_hook(keep(seen_fp)(n)) for n in names] if fp_block else []
        try:
            for i, (h, kw) in enumerate(q_inputs):
                if fp_block is not None:
                    B.run_block(fp_block, *fp_inputs[i])
                B.run_block(block, h, kw)
                w = weights[i].reshape(-1).double()
                for n in names:
                    xq = seen_q[n].reshape(-1, seen_q[n].shape[-1])
                    out[n]["H"] = out[n]["H"] + (xq * w[:, None]).T @ xq
                    out[n]["w_sum"] += float(w.sum())
                    if fp_block is not None:
                        xf = seen_fp[n].reshape(-1, seen_fp[n].shape[-1])
                        out[n]["D"] = out[n]["D"] + ((xf - xq) * w[:, None]).T @ xq
                        out[n]["Hfp"] = out[n]["Hfp"] + (xf * w[:, None]).T @ xf
        finally:
            for h in hq + hf:
                h.remove()
    return out
