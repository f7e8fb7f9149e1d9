"""Dynamic activation fake-quantization (quantize then dequantize), for W4A8-style inference paths."""

from __future__ import annotations

import torch


def per_token_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """max |x_row| / (2^(bits-1) - 1) per last-dim row, [..., 1]; all-zero rows get 1 (they stay zero)."""
    top = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True) / top
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def fake_quant_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-token integer fake quantization of x [..., features] -> x_hat, same dtype and shape.

    Each row is rounded onto scale * {-(2^(bits-1) - 1), ..., 2^(bits-1) - 1}, scale = max|row| / (2^(bits-1) - 1),
    so the row's largest magnitude is kept exactly (up to x's dtype). Worked in float32 (float64 for
    float64 input).
    """
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits} is not supported for activations: choose an integer from 2 to 16 (e.g. 8)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the features of each token)")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw = x.to(work)
    top = 2 ** (bits - 1) - 1
    scale = per_token_scale(xw, bits)
    x_hat = torch.clamp(torch.round(xw / scale), -top, top) * scale
    return x_hat.to(x.dtype)
