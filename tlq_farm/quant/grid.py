"""Integer grids for weights: scale / zero point per output row and column group.

One convention everywhere (RTN, GPTQ, GPTAQ, export): codes are unsigned integers in [0, 2^bits - 1] and
    w_hat = scale * (code - zero).
Symmetric grids fix zero = 2^(bits-1), so code - zero is the signed value in [-2^(bits-1), 2^(bits-1) - 1]
that compressed-tensors stores for symmetric schemes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantResult:
    """Output of a weight quantizer for one linear layer (weight of shape [out, in]).

    weight: dequantized weight, float32 [out, in]
    codes:  integer codes, int32 [out, in], in [0, 2^bits - 1]
    scale:  float32 [out, n_groups]
    zero:   int32 [out, n_groups]
    g_idx:  int32 [in], the group of each input column (identity order unless act-order regrouped them)
    loss:   the weighted output error of the final weights, tr(E H E^T) / 2 with E = weight - W (GPTAQ: the
            asymmetric objective, see gptq_quantize); RTN: the same when H is given, else None (not measured)
    perm:   column order used by act-order (None when natural order)
    damp_used: the relative damping the solver actually used (after any escalation); 0 for RTN
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    loss: float | None
    bits: int
    group_size: int
    sym: bool
    perm: torch.Tensor | None = None
    damp_used: float = 0.0


def qmax(bits: int) -> int:
    return 2**bits - 1


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (reference-exact solvers); every other dtype is worked in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point for each row of w ([rows, cols]) -> (scale [rows], zero [rows]).

    scale is float32, or float64 when w is float64.
    """
    w = w.to(_work_dtype(w))
    wmin = torch.minimum(w.min(dim=1).values, torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    wmax = torch.maximum(w.max(dim=1).values, torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    top = qmax(bits)
    if sym:
        # Signed grid [-2^(b-1), 2^(b-1)-1]: the smallest scale that keeps the most negative weight on the
        # grid and every weight within half a step of a code. The largest weight may lie up to half a step
        # beyond the top code, where clipping moves it no further than rounding moves any other weight.
        half = 2 ** (bits - 1)
        scale = torch.maximum(-wmin / half, wmax / (half - 0.5))
        zero = torch.full_like(scale, half)
    else:
        scale = (wmax - wmin) / top
        zero = torch.zeros_like(scale)
    dead = scale == 0
    scale = torch.where(dead, torch.ones_like(scale), scale)
    if not sym:
        zero = torch.round(-wmin / scale)
    return scale, zero.to(torch.int32)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """clamp(round(w / scale) + zero, 0, 2^bits - 1): the codes of w as floats of w's dtype (scale and zero
    broadcast against w; zero may be int32 or float, the sum is the same)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax(bits))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round w ([rows] or [rows, cols]) onto the grid given per row -> int32 codes."""
    if w.dim() == 2:
        scale = scale.unsqueeze(1)
        zero = zero.unsqueeze(1)
    return round_to_grid(w.to(_work_dtype(w)), scale, zero, bits).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if codes.dim() == 2 and scale.dim() == 1:
        scale = scale.unsqueeze(1)
        zero = zero.unsqueeze(1)
    return scale * (codes.to(torch.float32) - zero.to(torch.float32))


def dequantize_contiguous(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Dequantize [out, in] codes whose groups are consecutive runs of in / n_groups columns (g_idx natural):
    the same values as dequantize_grouped, broadcast per group instead of gathered per column."""
    out_f, in_f = codes.shape
    n_groups = scale.shape[1]
    grouped = codes.reshape(out_f, n_groups, in_f // n_groups).to(torch.float32)
    return (scale.unsqueeze(2) * (grouped - zero.unsqueeze(2).to(torch.float32))).reshape(out_f, in_f)


def dequantize_grouped(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Dequantize [out, in] codes with per-group scale/zero [out, n_groups] selected by g_idx [in]."""
    in_f, n_groups = codes.shape[1], scale.shape[1]
    if in_f % n_groups == 0 and torch.equal(g_idx.long().cpu(), torch.arange(in_f) // (in_f // n_groups)):
        return dequantize_contiguous(codes, scale, zero)
    g = g_idx.long()
    return scale[:, g] * (codes.to(torch.float32) - zero[:, g].to(torch.float32))


def codes_per_byte(bits: int, columns: int) -> int:
    """How many codes pack_codes puts in one byte: 8 // bits for 2 and 4 bits when the columns divide
    evenly, else one (3-bit and 8-bit codes take a byte each)."""
    per = 8 // bits if bits in (2, 4) else 1
    return per if columns % per == 0 else 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [out, in] in [0, 2^bits - 1] -> uint8 [out, in / codes_per_byte]; code j of a byte sits
    at bits [j * bits, (j + 1) * bits)."""
    per = codes_per_byte(bits, codes.shape[-1])
    c = codes.to(torch.uint8)
    if per == 1:
        return c.contiguous()
    c = c.reshape(*c.shape[:-1], -1, per)
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (j * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """The inverse of pack_codes -> int32 codes [out, columns]."""
    per = codes_per_byte(bits, columns)
    if per == 1:
        return packed.to(torch.int32)
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    c = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], columns).to(torch.int32)


def natural_g_idx(columns: int, group_size: int) -> torch.Tensor:
    gs = columns if group_size <= 0 else group_size
    return (torch.arange(columns) // gs).to(torch.int32)


def check_grid_args(columns: int, bits: int, group_size: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits} is not supported: choose 2, 3, 4 or 8")
    if group_size == 0 or group_size < -1:
        raise ValueError(f"group size {group_size} is not valid: choose a positive divisor of {columns} "
                         f"or -1 for per-channel")
    if group_size > 0 and columns % group_size != 0:
        raise ValueError(
            f"group size {group_size} does not divide the layer's {columns} input columns: "
            f"choose a divisor of {columns} or -1 for per-channel"
        )
