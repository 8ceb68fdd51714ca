"""Liger's fused kernels in the language model (``sft.common.liger``): whether they can run, the swap."""

from __future__ import annotations

import torch


def require_liger() -> None:
    """Fail before loading anything if Liger's kernels cannot run here (they are Triton kernels for CUDA)."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "sft.common.liger is true, but Liger's kernels need a CUDA GPU and none is visible. "
            "Set sft.common.liger: false on this machine."
        )
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "sft.common.liger is true, but liger-kernel is not installed: pip install -e '.[cuda]' "
            "(or set sft.common.liger: false)"
        ) from e


def apply_liger(model, family) -> None:
    """Swap the language model's RMSNorm, RoPE and SwiGLU for Liger's fused kernels, in place.

    `family` (`posttrain.models.family.Family`) names Liger's patch for its language model and where that
    sits in `model`; a family without one fails here, before training, naming the setting.

    Training only: under the static cache's torch.compile (generation) they fail to compile. The loss stays
    transformers' (no fused cross-entropy): the labels mask the prompt, and the logits are small next to the
    activations at LLaVA's sequence lengths.
    """
    if family.liger is None:
        raise RuntimeError(
            f"sft.common.liger is true, but Liger has no kernels for {family.name}'s language model; "
            "set sft.common.liger: false"
        )
    import liger_kernel.transformers

    getattr(liger_kernel.transformers, family.liger)(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=family.language_model_of(model),
    )
