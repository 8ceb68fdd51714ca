"""GPU memory of a LoRA training step and of a generation batch, estimated before any weight loads.

A batch that cannot fit then fails in seconds, naming the knob to turn, instead of after minutes of loading
with CUDA's out-of-memory error. The estimate is

    weights + adapter (weights, gradients, AdamW moments in fp32) + activations + overhead,
    activations = sequences · tokens · layers · hidden · activation bytes,

with the activation bytes per (token, layer, hidden unit) the family's (`posttrain.models.family`), for
LLaVA-1.5 calibrated on llava-1.5-7b (sequence 705, LoRA r=16
on every linear layer of the language model, bf16 autocast) on one H100 (`bench/results/h100.json` and
`h100_baseline.json`): each extra sample of batch adds 4.8 GB with Liger's kernels, 5.7 GB without, and
0.54 GB with gradient checkpointing. The estimate reproduces the measured peaks within 1 GB (see
tests/test_memory.py).

A generation batch (`estimate_generation`) holds the model for inference (bf16, the adapter an fp32 layer)
and, per phase of the stage (sampling, a self-judge's or the evaluation's teacher-forced scoring):

    KV cache = rows · (prompt + new tokens) · layers · 2 · kv_heads · head_dim · 2 bytes · (1 + 1/layers),
    activations = prompts · prompt tokens · intermediate · `PREFILL_BYTES` + rows · vocab · `DECODE_BYTES`
                  + prompts · scored tokens · vocab · `SCORED_BYTES`,

the (1 + 1/layers) the one layer that exists twice while a dynamic cache grows, the activations those of
the prompt's forward pass (the MLP's intermediate tensors, the fp32 copy the adapter layer takes) and the
fp32 logits of the last position (or of every scored one). Cache and activations add up: the prompt's pass
writes the static cache as it goes (`posttrain.evaluate.generation._IntoSampleRows`), the only cache of
the prompt there is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from posttrain.core.errors import InputError
from posttrain.models.family import family_of

GB = 1e9
BUDGET = 0.95  # share of the GPU's memory a step's estimate may take
OVERHEAD_BYTES = 0.6 * GB  # CUDA context, cuBLAS workspaces, allocator slack
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit weights, an 8-bit scale per 64, fp32 scale per 256 scales
ADAPTER_BYTES = 4 + 4 + 8  # fp32 weight, gradient, two AdamW moments


# generation (`estimate_generation`): bytes per prompt token and intermediate unit of the prompt's forward
# pass (gate, up and their product in bf16, the fp32 input copy of down_proj's adapter layer), per row and
# vocab entry of a decoding step (fp32 logits, warped scores, noise), per scored token and vocab entry
PREFILL_BYTES = 12.0
DECODE_BYTES = 16.0
SCORED_BYTES = 12.0
AUTO_MAX_PROMPTS = 128  # generation batch_size auto: at most this many prompts a batch
CPU_AUTO_PROMPTS = 64  # ... and on the CPU, with no card to size it against, this many


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

    from posttrain.models.architectures import meta_model

    family = family_of(config)
    model = meta_model(config)
    pattern = re.compile(target_regex)
    weights = adapter = 0.0
    linear_ids = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if pattern.fullmatch(name):
                adapter += rank * (module.in_features + module.out_features) * ADAPTER_BYTES
            if quantized and family.in_language_model(name) and not name.endswith("lm_head"):
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
    bytes_per_unit = family_of(config).activation_bytes[(checkpointing, liger)]
    text = config.text_config
    per_sequence = seq_len * text.num_hidden_layers * text.hidden_size * bytes_per_unit
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


@dataclass(frozen=True)
class Phase:
    """One kind of batch a generation stage runs: `samples` rows a prompt of up to `prompt_tokens`, decoded
    for `new_tokens` (0: one forward pass that fills a cache), with `scored_tokens` positions' logits kept.
    """

    name: str
    samples: int
    prompt_tokens: int
    new_tokens: int
    scored_tokens: int = 0


@dataclass(frozen=True)
class InferenceEstimate:
    weights: float  # bytes
    cache: float
    activations: float
    overhead: float = OVERHEAD_BYTES

    @property
    def total(self) -> float:
        return self.weights + self.cache + self.activations + self.overhead

    def __str__(self) -> str:
        return (
            f"~{self.total / GB:.1f} GB (weights {self.weights / GB:.1f}, KV cache {self.cache / GB:.1f}, "
            f"activations {self.activations / GB:.1f}, overhead {self.overhead / GB:.1f})"
        )


def inference_weight_bytes(config, adapter_bytes: float = 0.0) -> float:
    """Bytes of the model as the stages decode with it: every weight in bf16 (an nf4 base is dequantized
    once, `posttrain.models.loading.load_model`), plus the adapter kept as a layer (`adapter_bytes`; 0 when
    merged).

    Counted on the meta device: nothing is allocated.
    """
    from posttrain.models.architectures import param_count

    return 2.0 * param_count(config) + adapter_bytes


def gpu_capacity() -> float | None:
    """The current CUDA device's memory in bytes; None on the CPU, where there is no card to size against."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Bytes of the KV cache a token takes over every decoder layer (keys and values)."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def estimate_generation(config, *, prompts: int, phase: Phase, weights: float) -> InferenceEstimate:
    """Peak memory of a batch of `prompts` prompts in `phase`, the model's `weights` bytes held (see the
    module doc).
    """
    text = config.text_config
    rows = prompts * phase.samples
    tokens = phase.prompt_tokens + phase.new_tokens
    cache = rows * tokens * kv_bytes_per_token(config) * (1 + 1 / text.num_hidden_layers)
    activations = (
        prompts * phase.prompt_tokens * text.intermediate_size * PREFILL_BYTES
        + rows * text.vocab_size * DECODE_BYTES
        + prompts * phase.scored_tokens * text.vocab_size * SCORED_BYTES
    )
    return InferenceEstimate(weights, cache, activations)


def choose_generation_batch(
    section: str,
    batch_size,
    phases: list[Phase],
    *,
    config,
    weights: float,
    prompts: int,
    capacity: float | None,
    processes: int = 1,
) -> tuple[int, str]:
    """The prompts a batch of a generating stage takes, and one line saying why.

    ``auto`` on CUDA: the largest batch, up to `AUTO_MAX_PROMPTS` and to an equal share of the `prompts` for
    each of the `processes`, whose every phase fits `BUDGET` of the GPU's `capacity`; the batches are then
    evened out (100 prompts at up to 64: two of 50). On the CPU (`capacity` None): `CPU_AUTO_PROMPTS`.
    An integer runs as given; where its estimate exceeds the GPU the line warns (a batch that runs out of
    memory is decoded again in halves, `posttrain.evaluate.generation.generate`) and names what ``auto`` would
    take.

    Raises:
        GenerationTooLargeError: ``auto`` and not even one prompt fits; nothing is loaded yet.
    """

    def worst(b: int) -> InferenceEstimate:
        return max(
            (estimate_generation(config, prompts=b, phase=ph, weights=weights) for ph in phases),
            key=lambda e: e.total,
        )

    shapes = ", ".join(
        f"{ph.name} {ph.samples}× up to {ph.prompt_tokens}+{ph.new_tokens} tokens" for ph in phases
    )
    share = max(-(-max(prompts, 1) // processes), 1)  # every process gets a batch to work on
    if isinstance(batch_size, int):  # not BatchSize.AUTO
        if capacity is None or within_budget(worst(batch_size), capacity):
            where = "" if capacity is None else f": {worst(batch_size)} of {capacity / GB:.1f} GB"
            return batch_size, f"{section}.batch_size {batch_size}{where} ({shapes})"
        fits = [b for b in range(1, min(batch_size, AUTO_MAX_PROMPTS)) if within_budget(worst(b), capacity)]
        return batch_size, (
            f"warning: {section}.batch_size {batch_size} needs {worst(batch_size)} by the estimate, more "
            f"than 95% of this GPU's {capacity / GB:.1f} GB ({shapes}); a batch that runs out of memory is "
            f"decoded again in halves, with the same answers. batch_size: auto would take "
            f"{max(fits) if fits else 'none: not even one prompt fits'}"
        )
    limit = min(AUTO_MAX_PROMPTS if capacity is not None else CPU_AUTO_PROMPTS, share)
    if capacity is None:
        batch = limit
        why = "on the CPU there is no GPU memory to size it against"
    else:
        fitting = [b for b in range(1, limit + 1) if within_budget(worst(b), capacity)]
        if not fitting:
            raise GenerationTooLargeError(
                f"{section}.batch_size auto: not even one prompt fits this GPU: {worst(1)} of "
                f"{capacity / GB:.1f} GB ({shapes}); lower {section}.max_new_tokens or use a "
                "larger GPU. Nothing was loaded."
            )
        batch = fitting[-1]
        why = (
            f"the largest that fits, up to {limit}: {worst(batch)} of {capacity / GB:.1f} GB"
            if batch < limit
            else f"{limit} fits ({worst(batch)} of {capacity / GB:.1f} GB)"
        )
    batch = -(-share // -(-share // batch))  # the same number of batches, evened out
    return batch, f"{section}.batch_size auto: {batch} prompts a batch ({why}; {shapes})"


class GenerationTooLargeError(InputError, RuntimeError):
    """Raised before loading when not even one prompt of a generating stage fits the GPU."""
