"""Checks before any weight loads, for SFT and DPO: the LoRA targets and the training step's memory.

`check_target_modules`: every target names linear layers of the base's language model.
`check_training_memory`: the step fits the GPU, or with ``batch_size: auto`` the micro-batch that does.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from posttrain.core.config import BatchSize
from posttrain.core.errors import InputError
from posttrain.models.loading import image_token_count
from posttrain.models.memory import MemoryEstimate, gpu_capacity
from posttrain.models.template import encode_conversation


class TargetModulesError(InputError, ValueError):
    """A name in target_modules that no linear layer of the base's language model has."""


def check_target_modules(
    base_dir: Path, target_modules: tuple[str, ...], section: str = "sft.common"
) -> None:
    """Every name of `target_modules` names linear layers of the base's language model (as its family's
    `lora_regex` matches them): checked on the meta device from the base's config, no weight read.

    Raises:
        TargetModulesError: naming the names that match nothing and the layer names there are.
    """
    from posttrain.models.architectures import meta_model
    from posttrain.models.family import family_of
    from posttrain.models.loading import base_config

    config = base_config(base_dir)
    family = family_of(config)
    model = meta_model(config)
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    leaf = {name: name.rsplit(".", 1)[-1] for name in linear}  # q_proj of ...layers.0.self_attn.q_proj
    present = sorted({leaf[n] for n in linear if re.fullmatch(family.lora_regex((leaf[n],)), n)})
    missing = [m for m in target_modules if m not in present]
    if missing:
        verb = "names" if len(missing) == 1 else "name"
        raise TargetModulesError(
            f"{section}.target_modules: {', '.join(map(repr, missing))} {verb} no linear layer of the base's "
            f"language model; name some of {', '.join(present)}"
        )


def sequence_memory(base_dir: Path, sequences: list, **estimate_kwargs) -> tuple[MemoryEstimate, int]:
    """The step memory of one training sequence as long as the longest of `sequences`, and that length.

    Reads the base's config and processor, not its weights. A step over n such sequences takes the returned
    estimate with its activations times n (they grow linearly, `posttrain.models.memory.estimate_training`).
    `estimate_kwargs` are `estimate_training`'s (target_regex, rank, quantized, checkpointing, liger).
    """
    from posttrain.models.loading import base_config_and_processor
    from posttrain.models.memory import estimate_training

    config, processor = base_config_and_processor(base_dir)
    n_image = image_token_count(processor)
    seq_len = max(len(encode_conversation(processor.tokenizer, h, q, a, n_image)[0]) for h, q, a in sequences)
    return estimate_training(config, sequences=1, seq_len=seq_len, **estimate_kwargs), seq_len


def check_training_memory(
    base_dir: Path,
    sequences: list[tuple[tuple[tuple[str, str], ...], str, str]],
    *,
    section: str,
    batch_size: int | BatchSize,
    sequences_per_row: int,
    target_regex: str,
    rank: int,
    quantized: bool,
    checkpointing: bool,
    liger: bool,
    gradient_accumulation: int = 1,
    effective_batch: int | None = None,
) -> tuple[int, int]:
    """Before any weight loads: pick the micro-batch of ``batch_size: auto``, say when the batch exceeds the
    data, and on CUDA fail if the step cannot fit.

    An integer batch_size runs as given. One above the number of rows is clipped to them, as HF Trainer's
    DataLoader does (its one batch is short), and said, on every device; the memory estimate counts those
    rows. On CUDA, a step that cannot fit the GPU fails with the knob to turn.

    ``auto`` takes the largest divisor of `effective_batch` (so the effective batch stays exact) that is no
    more than the rows and, on CUDA, whose step fits 95% of the GPU
    (`posttrain.models.memory.choose_micro_batch`); on the CPU, with no card to size against, the whole
    effective batch. One line says what it chose and why.

    Args:
        base_dir: the `base` stage's folder (its config and processor are read, not its weights).
        sequences: (history, question, answer) of every training sequence, as `encode_conversation` takes
            them; the longest sets the sequence length.
        section: the params section, for the message (``sft.common`` or ``dpo``).
        batch_size: rows per micro-batch, or ``BatchSize.AUTO``.
        sequences_per_row: 1 for SFT, 2 for a DPO pair (chosen and rejected).
        target_regex: the LoRA adapter's layers (a PEFT regex).
        rank: its rank.
        quantized: nf4 weights for the language model's linear layers.
        checkpointing: gradient checkpointing on.
        liger: Liger's kernels on.
        gradient_accumulation: micro-batches per optimizer step, with an integer batch_size.
        effective_batch: rows per optimizer step, with ``auto``.

    Returns:
        (micro-batch, gradient accumulation) to train with.

    Raises:
        posttrain.models.memory.BatchTooLargeError: the estimate exceeds 95% of the GPU's memory (for
            ``auto``: even at a micro-batch of 1).
    """
    from posttrain.models.memory import GB, BatchTooLargeError, check_fits, choose_micro_batch, within_budget

    rows = len(sequences) // sequences_per_row
    unit = "conversations" if sequences_per_row == 1 else "preference pairs"
    capacity = gpu_capacity() if sequences else None
    estimate_kwargs = dict(
        target_regex=target_regex, rank=rank, quantized=quantized, checkpointing=checkpointing, liger=liger
    )
    if batch_size is BatchSize.AUTO:
        effective = effective_batch
        limit = rows if 0 < rows < effective else effective  # a micro-batch above the rows holds just them
        if limit < effective:
            print(
                f"{section}.effective_batch {effective} is more than the {rows} {unit} to train on: an "
                f"optimizer step sees all {rows} at most (an epoch ends first); set "
                f"{section}.effective_batch to {rows} or less to say what runs",
                flush=True,
            )
        within = f" within the {rows} {unit}" if limit < effective else ""
        if capacity is None:
            micro = choose_micro_batch(effective, lambda d: d <= limit, section=section)
            why = (
                f"on the CPU: the largest divisor of {effective}{within}"
                if within
                else "on the CPU there is no GPU memory to size it against: the whole effective batch"
            )
        else:
            one, seq_len = sequence_memory(base_dir, sequences, **estimate_kwargs)

            def step(d: int) -> MemoryEstimate:  # a micro-batch of d rows
                return replace(one, activations=one.activations * (d * sequences_per_row))

            try:
                micro = choose_micro_batch(
                    effective,
                    lambda d: d <= limit and within_budget(step(d), capacity),
                    section=section,
                    checkpointing=checkpointing,
                )
            except BatchTooLargeError as e:
                raise BatchTooLargeError(
                    f"{e} One row ({sequences_per_row} sequence(s) of up to {seq_len} tokens) needs "
                    f"{step(1)}, more than 95% of this GPU's {capacity / GB:.1f} GB. Nothing was loaded."
                ) from None
            why = (
                f"the largest divisor of {effective}{within} whose step fits: ~{step(micro).total / GB:.1f} "
                f"GB of {capacity / GB:.1f} GB, sequences up to {seq_len} tokens"
            )
        accumulation = effective // micro
        print(
            f"{section}.batch_size auto: {micro} × accumulation {accumulation} = effective batch {effective} "
            f"({why})",
            flush=True,
        )
        return micro, accumulation

    fitted = batch_size
    if 0 < rows < batch_size:
        print(
            f"{section}.batch_size {batch_size} is more than the {rows} {unit} to train on: every batch "
            f"holds all {rows} (the DataLoader's one, shorter batch), so each step sees all the data; set "
            f"{section}.batch_size to {rows} or less to say what runs",
            flush=True,
        )
        fitted = rows
    if capacity is None:
        return batch_size, gradient_accumulation
    one, seq_len = sequence_memory(base_dir, sequences, **estimate_kwargs)
    estimate = replace(one, activations=one.activations * (fitted * sequences_per_row))
    check_fits(
        estimate,
        capacity,
        section=section,
        batch_size=fitted,
        sequences_per_row=sequences_per_row,
        seq_len=seq_len,
        checkpointing=checkpointing,
    )
    print(f"{section}: step memory {estimate} of {capacity / 1e9:.1f} GB, sequences up to {seq_len} tokens")
    return batch_size, gradient_accumulation
