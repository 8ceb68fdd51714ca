"""posttrain: reproducible post-training and evaluation of LLaVA-style vision-language models."""

__version__ = "0.1.0"

from posttrain.core.runtime import pin_blas_numerics  # noqa: E402

pin_blas_numerics()  # before numpy loads: the same BLAS kernels on every x86 CPU (see posttrain.core.runtime)
