"""Weight solvers (RTN, GPTQ / GPTAQ), their input statistics, and activation fake-quantization."""

from .actquant import fake_quant_per_token
from .gptq import gptq_quantize
from .grid import QuantResult, dequantize_grouped
from .hessian import finalize_hessian, hessian_partial, reduce_partials
from .rtn import rtn_quantize

__all__ = [
    "QuantResult",
    "dequantize_grouped",
    "fake_quant_per_token",
    "finalize_hessian",
    "gptq_quantize",
    "hessian_partial",
    "reduce_partials",
    "rtn_quantize",
]
