"""tlq-farm: token-importance-weighted, layer-wise post-training quantization of vision-language models."""

__version__ = "0.1.0"
