"""posttrain: reproducible post-training and evaluation of LLaVA-style vision-language models."""

__version__ = "0.1.0"
