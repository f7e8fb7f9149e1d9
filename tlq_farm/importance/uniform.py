"""uniform: every real token weighs the same (plain GPTQ / GPTAQ)."""

import torch

NEEDS_FP_CHAIN = False
GLOBAL = False
LOCAL = False


def token_weights(b: int, valid: list[torch.Tensor], vision: list[torch.Tensor], state: dict) -> list[torch.Tensor]:
    return [v.clone() for v in valid]
