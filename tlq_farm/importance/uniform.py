"""uniform: every real token weighs the same (plain GPTQ / GPTAQ)."""

from .base import ImportanceContext, uniform_weights

NEEDS_FP_CHAIN = False


def prepare(ctx: ImportanceContext) -> None:
    pass


def block_weights(ctx: ImportanceContext, b, block, names, q_inputs, fp_inputs):
    return uniform_weights(ctx)
