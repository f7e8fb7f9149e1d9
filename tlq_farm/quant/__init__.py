"""Weight solvers (RTN, GPTQ / GPTAQ), their input statistics, and activation fake-quantization."""

from .actquant import fake_quant_per_token
from .gptq import HessianFactor, gptq_quantize
from .grid import QuantResult, dequantize_grouped
from .hessian import (add_tokens, finalize_hessian, finalize_stats, finish_sums, fold_cross_terms, hessian_partial,
                      reduce_partials, start_sums)
from .rtn import rtn_quantize

__all__ = [
    "HessianFactor",
    "QuantResult",
    "add_tokens",
    "dequantize_grouped",
    "fake_quant_per_token",
    "finalize_hessian",
    "finalize_stats",
    "finish_sums",
    "fold_cross_terms",
    "gptq_quantize",
    "hessian_partial",
    "reduce_partials",
    "rtn_quantize",
    "start_sums",
]
