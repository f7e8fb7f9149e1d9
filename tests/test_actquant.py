"""Per-token activation fake-quantization against a float64 row-by-row reference."""

from __future__ import annotations

import pytest
import torch

from tlq_farm.quant import fake_quant_per_token

torch.set_num_threads(1)


def reference_row(row: torch.Tensor, bits: int) -> torch.Tensor:
    top = 2 ** (bits - 1) - 1
    amax = float(row.abs().max())
    if amax == 0:
        return torch.zeros_like(row)
    scale = amax / top
    return torch.tensor([max(-top, min(top, round(float(v) / scale))) * scale for v in row], dtype=torch.float64)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_row_by_row_reference(bits):
    x = torch.randn(2, 3, 17, generator=torch.Generator().manual_seed(bits), dtype=torch.float64) * 3
    x[1, 2] = 0
    x_hat = fake_quant_per_token(x, bits=bits)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float64
    for row, row_hat in zip(x.reshape(-1, 17), x_hat.reshape(-1, 17)):
        assert torch.allclose(row_hat, reference_row(row, bits), rtol=1e-12, atol=1e-12)
    assert torch.equal(x_hat[1, 2], torch.zeros(17, dtype=torch.float64))
    # Each row's largest magnitude is on the grid, and no value moves by more than half a step.
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(x_hat.abs().amax(-1, keepdim=True), amax, rtol=1e-12)
    step = torch.where(amax == 0, torch.ones_like(amax), amax / (2 ** (bits - 1) - 1))
    assert torch.all((x_hat - x).abs() <= step / 2 + 1e-12)
    # At most 2^bits - 1 distinct levels per row.
    for row_hat in x_hat.reshape(-1, 17):
        assert torch.unique(row_hat).numel() <= 2**bits - 1


def test_keeps_dtype_and_zero_rows():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[2] = 0
    x_hat = fake_quant_per_token(x)
    assert x_hat.dtype == torch.bfloat16 and x_hat.shape == x.shape
    assert torch.all(x_hat[2] == 0)
    ref = fake_quant_per_token(x.float())
    assert torch.equal(x_hat, ref.to(torch.bfloat16))


def test_bad_bits_are_rejected():
    with pytest.raises(ValueError, match="bits=1 is not supported"):
        fake_quant_per_token(torch.ones(2, 2), bits=1)
    with pytest.raises(ValueError, match="floating-point"):
        fake_quant_per_token(torch.ones(2, 2, dtype=torch.int32))
