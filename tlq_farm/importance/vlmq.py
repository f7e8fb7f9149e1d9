"""vlmq (VLMQ, arXiv 2508.03351): block-local, gradient-driven token weights per projection.

For block b, the full-precision path runs the FP block on the FP chain's input x; the quantized path runs
the block with its weights quantized on the quantized chain's input x~. The loss is the mean squared error
between the two paths' attention sub-block outputs (the attention output projection's output); for the MLP
projections, which lie after it, the loss is the MSE of the whole block's outputs. For each projection p with
output Z^p, g_n = mean_c |dL/dZ^p_cn| and token n weighs g_n^2 in the Hessian of p (normalized per sample).

Block 0 and the weights used on the quantized path: at block 0 both chains carry the same input, so with
the block's own full-precision weights both paths would be equal, the loss identically zero and every
gradient zero. We therefore evaluate the quantized path with an RTN copy of the block (the same grid as the
solve), which makes the signal nonzero at every block, block 0 included. Should the loss still be exactly
zero (e.g. an 8-bit grid that reproduces the weights), the weights fall back to uniform.
"""

from __future__ import annotations

import torch

from ..block import act_fake_quant, rtn_proxy, run_block
from .base import ImportanceContext, normalize_per_sample

NEEDS_FP_CHAIN = True
GLOBAL = False
# The weights need the block and its inputs on the quantized chain: a weights task per block and shard.
LOCAL = True


def projection_weights(grad_z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """dL/dZ [.., T, c] -> normalized g_n^2 per token."""
    g = grad_z.abs().mean(dim=-1).reshape(-1).double()
    return normalize_per_sample((g * g).to(valid.dtype), valid)


def block_weights(ctx: ImportanceContext, b, block, names, q_inputs, fp_inputs):
    spec = ctx.spec
    proxy = rtn_proxy(block, names, spec)
    attn = [n for n in names if "attn" in n or "attention" in n]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i, ((xq, kw), (xf, fkw)) in enumerate(zip(q_inputs, fp_inputs)):
        ref: dict[str, torch.Tensor] = {}
        hooks = [block.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: ref.__setitem__(n, o.detach())) for n in names]
        try:
            with torch.no_grad():
                y_fp = run_block(block, xf, fkw)
        finally:
            for h in hooks:
                h.remove()
        z: dict[str, torch.Tensor] = {}

        def keep(n):
            def hook(_m, _a, o):
                z[n] = o
                return o
            return hook

        hooks = [proxy.get_submodule(n).register_forward_hook(keep(n)) for n in names]
        try:
            with torch.enable_grad(), act_fake_quant(proxy, names, spec.act_bits):
                y_q = run_block(proxy, xq.detach().requires_grad_(True), kw)
                attn_out = [n for n in attn if n in z][-1:] if attn else []
                losses = {}
                if attn_out:
                    losses["attn"] = torch.nn.functional.mse_loss(z[attn_out[0]], ref[attn_out[0]])
                losses["block"] = torch.nn.functional.mse_loss(y_q, y_fp)
                for n in names:
                    if n not in z:
                        out[n].append(ctx.valid[i].clone())
                        continue
                    key = "attn" if (n in attn and "attn" in losses) else "block"
                    loss = losses[key]
                    if float(loss.detach()) == 0.0 or not z[n].requires_grad:
                        out[n].append(ctx.valid[i].clone())
                        continue
                    (gz,) = torch.autograd.grad(loss, z[n], retain_graph=True, allow_unused=True)
                    out[n].append(ctx.valid[i].clone() if gz is None else projection_weights(gz, ctx.valid[i]))
        finally:
            for h in hooks:
                h.remove()
    return out
