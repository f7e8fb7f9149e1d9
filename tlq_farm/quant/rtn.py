"""Round-to-nearest baseline: each group's min-max grid, no error feedback."""

from __future__ import annotations

import torch

from .grid import QuantResult, check_grid_args, dequantize_grouped, find_params, natural_g_idx, quantize_codes


def rtn_quantize(W: torch.Tensor, *, bits: int = 4, group_size: int = 128, sym: bool = True,
                 H: torch.Tensor | None = None) -> QuantResult:
    """Quantize W [out, in] group by group. With H given, loss is the GPTQ objective tr(E H E^T) / 2; without
    it nothing measures the error, and loss is None."""
    out_f, in_f = W.shape
    check_grid_args(in_f, bits, group_size)
    W = W.to(torch.float32)
    gs = in_f if group_size <= 0 else group_size
    n_groups = in_f // gs
    scale = torch.empty(out_f, n_groups)
    zero = torch.empty(out_f, n_groups, dtype=torch.int32)
    codes = torch.empty(out_f, in_f, dtype=torch.int32)
    for g in range(n_groups):
        cols = slice(g * gs, (g + 1) * gs)
        s, z = find_params(W[:, cols], bits, sym)
        scale[:, g], zero[:, g] = s, z
        codes[:, cols] = quantize_codes(W[:, cols], s, z, bits)
    g_idx = natural_g_idx(in_f, group_size)
    Wq = dequantize_grouped(codes, scale, zero, g_idx)
    loss = None
    if H is not None:
        E = (Wq - W).to(torch.float64)
        loss = float(((E @ H.to(torch.float64)) * E).sum() / 2)
    return QuantResult(weight=Wq, codes=codes, scale=scale, zero=zero, g_idx=g_idx, loss=loss,
                       bits=bits, group_size=group_size, sym=sym)
