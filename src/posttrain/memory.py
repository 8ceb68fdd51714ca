"""GPU memory of a LoRA training step, estimated before any weight loads.

A batch that cannot fit then fails in seconds, naming the knob to turn, instead of after minutes of loading
with CUDA's out-of-memory error. The estimate is

    weights + adapter (weights, gradients, AdamW moments in fp32) + activations + overhead,
    activations = sequences · tokens · layers · hidden · `ACTIVATION_BYTES`,

with the activation bytes per (token, layer, hidden unit) calibrated on llava-1.5-7b (sequence 705, LoRA r=16
on every linear layer of the language model, bf16 autocast) on one H100 (`bench/results/h100.json` and
`h100_baseline.json`): each extra sample of batch adds 4.8 GB with Liger's kernels, 5.7 GB without, and
0.54 GB with gradient checkpointing. The estimate reproduces the measured peaks within 1 GB (see
tests/test_memory.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from posttrain.errors import InputError

GB = 1e9
BUDGET = 0.95  # share of the GPU's memory a step's estimate may take
# bytes of saved activations per token, per decoder layer, per hidden unit
ACTIVATION_BYTES = {
    # (gradient checkpointing, liger)
    (False, False): 61.0,  # bf16 batch 8: 59.9 GB (h100_baseline.json)
    (False, True): 52.0,  # bf16 batch 8 -> 12: 53.0 -> 72.2 GB; nf4 8 -> 12: 43.4 -> 62.6 GB (h100.json)
    (True, False): 6.0,  # bf16 batch 16 with checkpointing: 23.3 GB (h100_baseline.json)
    (True, True): 6.0,  # 23.2 GB (h100.json)
}
OVERHEAD_BYTES = 0.6 * GB  # CUDA context, cuBLAS workspaces, allocator slack
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit weights, an 8-bit scale per 64, fp32 scale per 256 scales
ADAPTER_BYTES = 4 + 4 + 8  # fp32 weight, gradient, two AdamW moments


class BatchTooLargeError(InputError, RuntimeError):
    """Raised before loading when the estimated training memory exceeds the GPU's."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float  # bytes
    adapter: float
    activations: float
    overhead: float = OVERHEAD_BYTES

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.activations + self.overhead

    def __str__(self) -> str:
        return (
            f"~{self.total / GB:.1f} GB (weights {self.weights / GB:.1f}, adapter {self.adapter / GB:.1f}, "
            f"activations {self.activations / GB:.1f}, overhead {self.overhead / GB:.1f})"
        )


def weight_and_adapter_bytes(config, target_regex: str, rank: int, quantized: bool) -> tuple[float, float]:
    """Bytes of the weights (bf16; nf4 for the language model's linear layers) and of the LoRA training state.

    Counted on the meta device: nothing is allocated.
    """
    import re

    import torch

    from posttrain.architectures import model_class

    with torch.device("meta"):
        model = model_class(config)(config)
    pattern = re.compile(target_regex)
    weights = adapter = 0.0
    linear_ids = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if pattern.fullmatch(name):
                adapter += rank * (module.in_features + module.out_features) * ADAPTER_BYTES
            if quantized and ".language_model." in f".{name}" and not name.endswith("lm_head"):
                weights += module.weight.numel() * NF4_BYTES
                linear_ids.add(id(module.weight))
    seen = set(linear_ids)
    for p in model.parameters():
        if id(p) not in seen:
            weights += p.numel() * 2
            seen.add(id(p))
    return weights, adapter


def estimate_training(
    config,
    *,
    sequences: int,
    seq_len: int,
    target_regex: str,
    rank: int,
    quantized: bool,
    checkpointing: bool,
    liger: bool,
) -> MemoryEstimate:
    """Peak memory of one training step over `sequences` rows of `seq_len` tokens (see the module doc)."""
    weights, adapter = weight_and_adapter_bytes(config, target_regex, rank, quantized)
    text = config.text_config
    per_sequence = (
        seq_len * text.num_hidden_layers * text.hidden_size * ACTIVATION_BYTES[(checkpointing, liger)]
    )
    return MemoryEstimate(weights, adapter, sequences * per_sequence)


def within_budget(estimate: MemoryEstimate, capacity: float) -> bool:
    """Whether `estimate` fits `BUDGET` of a GPU of `capacity` bytes."""
    return estimate.total <= BUDGET * capacity


def choose_micro_batch(
    effective: int, fits: Callable[[int], bool], *, section: str = "sft.common", checkpointing: bool = False
) -> int:
    """The micro-batch of ``batch_size: auto``: the largest divisor of `effective` for which `fits` holds.

    A divisor keeps the effective batch exact: micro-batch × gradient accumulation = `effective`.

    Args:
        effective: rows per optimizer step (the section's ``effective_batch``).
        fits: whether a micro-batch of that many rows can run (its step fits the GPU, and so on).
        section: the params section, for the message (``sft.common`` or ``dpo``).
        checkpointing: whether gradient checkpointing is already on (then the advice leaves it out).

    Raises:
        BatchTooLargeError: not even a micro-batch of 1 fits; the message names the knobs.
    """
    for d in range(effective, 0, -1):
        if effective % d == 0 and fits(d):
            return d
    advice = []
    if not checkpointing:
        advice.append(
            f"set {section}.gradient_checkpointing: true (about 9× less activation memory, ~30% slower)"
        )
    advice.append("hold the base in 4 bits (sft.common.quantization: nf4) or use a larger GPU")
    raise BatchTooLargeError(
        f"{section}.batch_size auto: not even a micro-batch of 1 fits (effective_batch {effective}); "
        + "; or ".join(advice)
        + "."
    )


def check_fits(
    estimate: MemoryEstimate,
    capacity: float,
    *,
    section: str,
    batch_size: int,
    sequences_per_row: int,
    seq_len: int,
    checkpointing: bool,
) -> None:
    """Raise `BatchTooLargeError` naming the knobs if `estimate` exceeds `BUDGET` (95%) of `capacity` bytes.

    Args:
        estimate: the estimate at `batch_size`.
        capacity: the GPU's memory in bytes.
        section: the params section, e.g. ``sft.common`` or ``dpo``.
        batch_size: its batch_size.
        sequences_per_row: sequences per batch row (1 for SFT, 2 for a DPO pair).
        seq_len: the longest sequence, in tokens.
        checkpointing: whether gradient checkpointing is already on.
    """
    if within_budget(estimate, capacity):
        return
    budget = BUDGET * capacity
    fixed = estimate.weights + estimate.adapter + estimate.overhead
    per_row = estimate.activations / batch_size
    fits = int((budget - fixed) // per_row) if budget > fixed else 0
    advice = []
    if fits >= 1:
        # the largest divisor of batch_size that fits keeps the effective batch exact
        smaller = max(d for d in range(1, min(fits, batch_size) + 1) if batch_size % d == 0)
        advice.append(
            f"set {section}.batch_size: {smaller} and multiply {section}.gradient_accumulation by "
            f"{batch_size // smaller} (same effective batch; up to {fits} rows fit)"
        )
    if not checkpointing:
        advice.append(
            f"set {section}.gradient_checkpointing: true (about 9× less activation memory, ~30% slower)"
        )
    if fits < 1 and checkpointing:
        advice.append("the weights alone do not fit: use sft.common.quantization: nf4 or a larger GPU")
    raise BatchTooLargeError(
        f"{section}.batch_size {batch_size} ({batch_size * sequences_per_row} sequences of up to {seq_len} "
        f"tokens) needs {estimate}, more than this GPU's {capacity / GB:.1f} GB allows; "
        + "; or ".join(advice)
        + ". Nothing was loaded."
    )
