"""Teacher-forced training data and the Trainer call shared by base training and SFT."""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from posttrain.core.runtime import hide_bitsandbytes_without_cuda

hide_bitsandbytes_without_cuda()  # before transformers' Trainer imports it (see there)

from transformers import Trainer, TrainerCallback, TrainingArguments

from posttrain.core.config import BatchSize
from posttrain.core.distributed import barrier, is_main, per_process_batch
from posttrain.core.errors import InputError
from posttrain.data.examples import Example, group_conversations
from posttrain.models.images import load_pixels
from posttrain.models.loading import image_token_count, quantization_config
from posttrain.models.memory import MemoryEstimate, gpu_capacity
from posttrain.models.template import (
    IGNORE_INDEX,
    answer_start,
    conversation_text,
    encode_conversation,
    pad_batch,
)
from posttrain.train.checkpoints import claim_checkpoints, file_digest, fit


class TeacherForcedDataset(torch.utils.data.Dataset):
    """One sequence per conversation: the image once, every turn, the loss on every answer.

    LLaVA-1.5's own SFT format (`posttrain.models.template.encode_conversation` with ``supervise_history``):
    labels are -100 on the image, the user turns and the template; each answer and its EOS are kept.
    """

    def __init__(self, examples: list[Example], data_dir: Path, processor):
        n_image_tokens = image_token_count(processor)
        self.conversations = group_conversations(examples)
        self.encoded = [
            encode_conversation(
                processor.tokenizer, c.turns[:-1], *c.turns[-1], n_image_tokens, supervise_history=True
            )
            for c in self.conversations
        ]
        self.images = [c.image for c in self.conversations]
        self.pixels = load_pixels(processor, data_dir, self.images)

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.encoded)

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.encoded[i]
        return {"input_ids": ids, "labels": labels, "pixel_values": self.pixels[self.images[i]]}


@dataclass
class TeacherForcedCollator:
    """Right-pads a list of `TeacherForcedDataset` items into a batch."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad_batch([it["input_ids"] for it in items], self.pad_token_id, "right")  # (B, T)
        labels = pad_batch([it["labels"] for it in items], IGNORE_INDEX, "right")  # (B, T)
        attention_mask = pad_batch([[1] * len(it["input_ids"]) for it in items], 0, "right")
        pixel_values = torch.stack([it["pixel_values"] for it in items])  # (B, 3, H, W)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "answer_start": answer_start(labels),  # an int, found here on the CPU: no device sync per step
        }


class ProgressCallback(TrainerCallback):
    """One line every `every` steps: step, loss, learning rate, samples/s, ETA."""

    def __init__(self, every: int, batch_size: int):
        self.every, self.batch_size, self.start = every, batch_size, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or state.global_step % self.every:
            return
        elapsed = time.perf_counter() - self.start
        done = max(state.global_step - self.first_step, 1)
        eta = elapsed / done * (state.max_steps - state.global_step)
        print(
            f"step {state.global_step:>5}/{state.max_steps}  loss {logs['loss']:.4f}  "
            f"lr {logs.get('learning_rate', 0):.2e}  "
            f"{done * self.batch_size / elapsed:6.1f} samples/s  eta {eta:5.0f}s",
            flush=True,
        )


def training_arguments(
    output_dir: Path,
    *,
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    save_steps: int,
    bf16: bool = False,
    logging_steps: int = 10,
    gradient_accumulation: int = 1,
    gradient_checkpointing: bool = False,
) -> TrainingArguments:
    """The Trainer settings every training run here shares (cosine schedule, checkpoints for resuming).

    The loss is logged every `logging_steps` or a divisor of `save_steps`, whichever divides it: a logged loss
    averages the steps since the last log, so a run resumed from a checkpoint logs the same curve as one that
    was never killed only if every checkpoint falls on a log. A run shorter than that logs its last step, so
    that it has a final loss.
    """
    if save_steps > 0:
        logging_steps = math.gcd(logging_steps, save_steps)
    logging_steps = min(logging_steps, max_steps)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=max(save_steps, 1),
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
    )


def answer_loss(model, inputs: dict, labels: torch.Tensor, num_items=None, start: int | None = None):
    """The causal LM loss of `labels`, with logits computed from the first supervised position on.

    The same loss as transformers' ``ForCausalLMLoss`` on all T positions (cross-entropy summed over the
    supervised next tokens, divided by `num_items`), but the language-model head and the fp32 log-softmax run
    on the last K = T − `start` positions: in LLaVA's SFT the 576 image tokens and the first question come
    before any answer and carry no loss. A contiguous slice, so its backward is a copy, not a scatter.

    Args:
        model: a causal LM (LLaVA, PEFT-wrapped or not) whose forward takes an int ``logits_to_keep``.
        inputs: the forward's inputs without ``labels``.
        labels: (B, T), `IGNORE_INDEX` where no loss is taken.
        num_items: the divisor, the supervised tokens of the whole accumulated batch (the Trainer's
            ``num_items_in_batch``); None: this batch's.
        start: `posttrain.models.template.answer_start` of the labels, found on the CPU by the collator; None:
            found here.

    Returns:
        (loss, outputs); ``outputs.logits`` is (B, K, V).
    """
    if start is None:
        start = answer_start(labels)
    outputs = model(**inputs, logits_to_keep=labels.shape[1] - start)  # logits (B, K, V)
    targets = F.pad(labels[:, start + 1 :], (0, 1), value=IGNORE_INDEX)  # (B, K): t predicts token t + 1
    loss = F.cross_entropy(
        outputs.logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if num_items is None:
        num_items = (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items):
        num_items = num_items.to(loss.device)
    return loss / num_items, outputs


class AnswerLossTrainer(Trainer):
    """HF Trainer whose loss is `answer_loss`: logits only where a label is supervised."""

    loss_is_scaled_for_ga = True  # divided by the supervised tokens of the whole accumulated batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        start = inputs.pop("answer_start", None)
        if num_items_in_batch is None:  # the Trainer counts them for models taking loss kwargs (LLaVA does)
            num_items_in_batch = (labels[:, 1:] != IGNORE_INDEX).sum() * self.args.gradient_accumulation_steps
        loss, outputs = answer_loss(model, inputs, labels, num_items_in_batch, start)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over the processes
        return (loss, outputs) if return_outputs else loss


def run_trainer(model, args: TrainingArguments, dataset, collator, callbacks: list, live_dir=None) -> dict:
    """One `AnswerLossTrainer` call through `posttrain.train.checkpoints.fit` (resumes a killed run's
    checkpoint in ``args.output_dir``; claim it with `claim_checkpoints` first).
    """
    trainer = AnswerLossTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )
    return fit(trainer, live_dir)


def train_tiny_base(
    params,
    data_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path | None,
) -> dict:
    """Build the tiny LLaVA, train every weight from scratch on the pretrain pool, save it to `out_dir`.

    Args:
        params: the validated ``base`` section (`posttrain.core.config.BaseParams`).
        data_dir: the prepared folder.
        out_dir: where the model, processor and provenance go (written atomically).
        checkpoint_dir: Trainer checkpoints; a rerun after a kill resumes from the newest one if its inputs
            are the same (`posttrain.train.checkpoints`).
        live_dir: DVCLive folder for the training curves, or None.

    Returns:
        Training summary (steps, seconds, losses, parameter count).
    """
    from posttrain.core.config import to_dict
    from posttrain.core.io import atomic_dir
    from posttrain.data.examples import load_split
    from posttrain.models.loading import (
        build_tiny_llava,
        count_params,
        train_tokenizer,
        write_provenance,
    )

    train = load_split(data_dir, "pretrain_train")
    if not train:
        raise ValueError(
            f"{data_dir}/pretrain_train.jsonl is empty: the tiny base needs the synthetic pretrain pool"
        )
    # The tokenizer sees the text of both train splits (never a test split): study words get tokens too.
    corpus = train + load_split(data_dir, "study_train")
    tokenizer = train_tokenizer(
        [conversation_text(e.history, e.question, e.answer) for e in corpus], params.tiny.vocab_size
    )
    model, processor = build_tiny_llava(tokenizer, params.tiny, params.seed)
    dataset = TeacherForcedDataset(train, data_dir, processor)
    t = params.train
    print(
        f"tiny LLaVA: {count_params(model) / 1e6:.2f} M params, all trainable; {len(dataset)} conversations "
        f"({dataset.turns} turns, {dataset.tokens:,} tokens); {t.max_steps} steps × batch {t.batch_size} = "
        f"{t.max_steps * t.batch_size / len(dataset):.1f} epochs",
        flush=True,
    )
    # under N processes (launch.processes) each trains batch_size / N rows: the recipe's step is unchanged
    per_process = per_process_batch("base.train", t.batch_size)
    if is_main():
        claim_checkpoints(
            checkpoint_dir,
            {
                "stage": "base",
                "params": to_dict(params),
                "data": file_digest(data_dir / "pretrain_train.jsonl", data_dir / "study_train.jsonl"),
            },
        )
    barrier()  # every process looks for checkpoints only once the folder is claimed
    args = training_arguments(
        checkpoint_dir,
        max_steps=t.max_steps,
        batch_size=per_process,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        seed=params.seed,
        save_steps=t.save_steps,
    )
    callbacks = [ProgressCallback(every=100, batch_size=t.batch_size)]
    collator = TeacherForcedCollator(tokenizer.pad_token_id)
    summary = run_trainer(model, args, dataset, collator, callbacks, live_dir)
    timing = summary.pop("timing")
    summary["params"] = count_params(model)
    if not is_main():  # the processes hold the same weights after every step: one writes them
        return {**summary, **timing}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_provenance(
            tmp,
            kind="local",
            produced_by="stages/base.py",
            architecture="LlavaForConditionalGeneration",
            params=to_dict(params),
            training=summary,
            train_conversations=len(dataset),
            train_turns=dataset.turns,
            train_tokens=dataset.tokens,
        )
    return {**summary, **timing}


def language_model_regex(target_modules: tuple[str, ...]) -> str:
    """PEFT `target_modules` regex: the named layers of the language model only.

    CLIP's attention layers share the names (``q_proj`` ...), so matching by name alone would also adapt
    the vision tower.
    """
    names = "|".join(re.escape(m) for m in target_modules)
    return rf"(.*\.)?language_model\..*\.({names})"


class TargetModulesError(InputError, ValueError):
    """A name in target_modules that no linear layer of the base's language model has."""


def check_target_modules(
    base_dir: Path, target_modules: tuple[str, ...], section: str = "sft.common"
) -> None:
    """Every name of `target_modules` names linear layers of the base's language model (as
    `language_model_regex` matches them): checked on the meta device from the base's config, no weight read.

    Raises:
        TargetModulesError: naming the names that match nothing and the layer names there are.
    """
    from posttrain.models.architectures import meta_model
    from posttrain.models.loading import base_config_and_processor

    config, _ = base_config_and_processor(base_dir)
    model = meta_model(config)
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    leaf = {name: name.rsplit(".", 1)[-1] for name in linear}  # q_proj of ...layers.0.self_attn.q_proj
    present = sorted({leaf[n] for n in linear if re.fullmatch(language_model_regex((leaf[n],)), n)})
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


def apply_liger(model) -> None:
    """Swap the Llama language model's RMSNorm, RoPE and SwiGLU for Liger's fused kernels, in place.

    Training only: under the static cache's torch.compile (generation) they fail to compile. The loss stays
    transformers' (no fused cross-entropy): the labels mask the prompt, and the logits are small next to the
    activations at LLaVA's sequence lengths.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model.model.language_model,
    )


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The positions dropout zeroes among `n` elements, each independently with probability `p`.

    Drawn as the gaps between successive dropped positions, which are i.i.d. Geometric(p) (Bernoulli
    trials until the first success; Devroye, *Non-Uniform Random Variate Generation*, 1986, §X.2), each
    ⌊log(1 − U) / log(1 − p)⌋ + 1 of a uniform U (P(gap > k) = (1 − p)^k): about n·p uniform draws instead
    of n. The same distribution as ``torch.bernoulli``, a different random stream.

    Returns:
        (k,) int64, strictly increasing, in [0, n); k ~ Binomial(n, p).
    """
    if n == 0 or p == 0:
        return torch.zeros(0, dtype=torch.long)
    sd = math.sqrt(n * p * (1 - p))
    chunks, end = [], 0  # end: one past the last position drawn so far
    while end < n:  # one pass unless the count lands 8 sd above its mean (~1e-15)
        m = math.ceil((n - end) * p + 8 * sd + 16)
        u = torch.rand(m, dtype=torch.float64, generator=generator)  # [0, 1)
        gaps = torch.floor(torch.log1p(-u) / math.log1p(-p)) + 1  # Geometric(p) by inversion: 1, 2, ...
        positions = end - 1 + gaps.cumsum(0).long()  # (m,)
        chunks.append(positions)
        end = int(positions[-1]) + 1
    positions = torch.cat(chunks)
    return positions[positions < n]


class _ScaleAndZero(torch.autograd.Function):
    """x·s with the elements at flat `positions` zeroed; the gradient likewise.

    Bit for bit x times a mask tensor holding s or 0 (an IEEE product is the same either way), without
    writing that mask: one pass over x and a scatter of the ~n·p zeros, forward and backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return _scale_and_zero(x, positions, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return _scale_and_zero(grad, positions, ctx.scale), None, None


def _scale_and_zero(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    # the scale in x's dtype, as the mask held it; contiguous so flat positions are row-major, as the mask's
    out = (x * torch.tensor(scale, dtype=x.dtype, device=x.device)).contiguous()
    out.view(-1).index_fill_(0, positions, 0)
    return out


class SparseDropout(torch.nn.Module):
    """`torch.nn.Dropout` that draws only the dropped positions (`dropped_positions`).

    On a CPU, ``bernoulli_`` draws one random number per element and took 27% of an SFT step of the tiny
    model (`bench/dropout.py`); at the study's dropouts (0.05, 0.10) this draws a tenth as many or fewer.
    Survivors are scaled by 1/(1 − p) as in ``torch.nn.Dropout``; in eval mode it is the identity.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _ScaleAndZero.apply(x, dropped_positions(x.numel(), self.p).to(x.device), 1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def sparse_lora_dropout(model) -> int:
    """Swap every LoRA dropout of a PEFT `model` for `SparseDropout` of the same p, in place.

    For CPU training: a GPU's fused dropout is already cheap. The adapter's saved weights and config are
    unchanged (dropout has no weights). Returns the number of modules swapped.
    """
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is torch.nn.Dropout:
                dropouts[name] = SparseDropout(layer.p)
                swapped += 1
    return swapped


def replay_examples(data_dir: Path, study: list[Example], fraction: float, seed: int) -> list[Example]:
    """Conversations of the pretrain pool to mix into SFT so they make up `fraction` of its conversations.

    A remedy for forgetting: the base's own families keep appearing while the adapter learns the study's
    (`sft.common.replay_fraction`; 0, the seed study's setting, replays nothing). Whole conversations are
    drawn without replacement, seeded, so every variant of a run replays the same ones and the Trainer's
    shuffle spreads them over the batches (each batch holds `fraction` of them in expectation).

    Raises:
        InputError: the pretrain pool has fewer conversations than the fraction asks for.
    """
    if fraction <= 0:
        return []
    from posttrain.data.examples import load_split

    n_study = len(group_conversations(study))
    pretrain = load_split(data_dir, "pretrain_train")
    pool = group_conversations(pretrain)
    wanted = round(n_study * fraction / (1 - fraction))
    if not pool:
        raise InputError(
            f"sft.common.replay_fraction {fraction}: the prepared data has no pretrain pool to replay "
            "(prepare.source: lrv_chart has none: the hub base was trained elsewhere); set it to 0"
        )
    if wanted > len(pool):
        raise InputError(
            f"sft.common.replay_fraction {fraction} asks for {wanted} pretrain conversations beside the "
            f"{n_study} of the study, but the pretrain pool has {len(pool)}; lower the fraction"
        )
    chosen = {c.id for c in random.Random(seed).sample(pool, wanted)}
    return [e for e in pretrain if e.conversation in chosen]


def train_sft_variant(
    name: str,
    common,
    variant,
    seed: int,
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path | None,
) -> dict:
    """Train one LoRA (or QLoRA) adapter on the study train split and save it with its provenance.

    Args:
        name: the variant's name (``sft1`` ...), a key of ``sft.variants``.
        common: `posttrain.core.config.SftCommon`, the settings every variant shares.
        variant: `posttrain.core.config.SftVariant`, this variant's alpha and dropout.
        seed: the shared seed.
        base_dir: the `base` stage's folder.
        data_dir: the prepared folder.
        out_dir: the adapter folder, written atomically.
        checkpoint_dir: Trainer checkpoints; a rerun after a kill resumes from the newest one if its inputs
            are the same (`posttrain.train.checkpoints`).
        live_dir: DVCLive folder for the curves, or None.

    Returns:
        Training summary.
    """
    from peft import LoraConfig, get_peft_model

    from posttrain.core.config import to_dict
    from posttrain.core.io import atomic_dir
    from posttrain.data.examples import load_split
    from posttrain.models.loading import base_fingerprint, count_params, load_base, write_provenance

    qconfig = quantization_config(common.quantization)  # fails before loading anything if impossible
    if common.liger:
        require_liger()
    check_target_modules(base_dir, common.target_modules)
    train = load_split(data_dir, "study_train")
    replay = replay_examples(data_dir, train, common.replay_fraction, seed)
    n_replayed = len(group_conversations(replay))
    train = train + replay
    micro_batch, accumulation = check_training_memory(
        base_dir,
        [(c.turns[:-1], *c.turns[-1]) for c in group_conversations(train)],
        section="sft.common",
        batch_size=common.batch_size,
        sequences_per_row=1,
        target_regex=language_model_regex(common.target_modules),
        rank=common.rank,
        quantized=qconfig is not None,
        checkpointing=common.gradient_checkpointing,
        liger=common.liger,
        gradient_accumulation=common.gradient_accumulation,
        effective_batch=common.effective_batch,
    )
    batch = {"micro_batch": micro_batch, "gradient_accumulation": accumulation}
    # under N processes (launch.processes) each trains micro_batch / N rows: the recipe's step is unchanged
    per_process = per_process_batch("sft.common", micro_batch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, processor, base_prov = load_base(base_dir, device=device, dtype=dtype, quantization_config=qconfig)
    # No peft.prepare_model_for_kbit_training for nf4: it upcasts every unquantized weight (vision tower,
    # projector, embeddings, lm_head) to fp32, which costs speed and memory; they stay bf16 and frozen.
    if common.liger:
        apply_liger(model)
    lora = LoraConfig(
        r=common.rank,
        lora_alpha=variant.alpha,
        lora_dropout=variant.dropout,
        target_modules=language_model_regex(common.target_modules),
        bias="none",
    )
    torch.manual_seed(seed)
    model = get_peft_model(model, lora)
    if device == "cpu":
        sparse_lora_dropout(model)
    dataset = TeacherForcedDataset(train, data_dir, processor)
    effective = micro_batch * accumulation
    print(
        f"{name}: LoRA r={common.rank} alpha={variant.alpha} dropout={variant.dropout}; "
        f"{count_params(model, trainable_only=True):,} trainable of {count_params(model):,} params; "
        f"{len(dataset)} conversations ({dataset.turns} turns, {dataset.tokens:,} tokens"
        + (f"; {n_replayed} replayed from the pretrain pool" if replay else "")
        + "), "
        f"{common.max_steps} steps × batch {micro_batch} × accumulation "
        f"{accumulation} = {common.max_steps * effective / len(dataset):.1f} epochs; "
        f"{'nf4' if qconfig else dtype}, checkpointing {common.gradient_checkpointing}, liger {common.liger}",
        flush=True,
    )
    if is_main():
        claim_checkpoints(
            checkpoint_dir,
            {
                "stage": f"sft@{name}",
                "params": {"common": to_dict(common), "variant": to_dict(variant), "seed": seed},
                "data": file_digest(data_dir / "study_train.jsonl", data_dir / "pretrain_train.jsonl"),
                "base": base_fingerprint(base_dir),
                "batch": batch,  # auto picks it per GPU: another card's checkpoints are another run
            },
        )
    barrier()  # every process looks for checkpoints only once the folder is claimed
    args = training_arguments(
        checkpoint_dir,
        max_steps=common.max_steps,
        batch_size=per_process,
        learning_rate=common.learning_rate,
        warmup_steps=common.warmup_steps,
        weight_decay=common.weight_decay,
        seed=seed,
        save_steps=common.save_steps,
        bf16=device == "cuda",
        gradient_accumulation=accumulation,
        gradient_checkpointing=common.gradient_checkpointing,
    )
    callbacks = [ProgressCallback(every=50, batch_size=effective)]
    collator = TeacherForcedCollator(processor.tokenizer.pad_token_id)
    summary = run_trainer(model, args, dataset, collator, callbacks, live_dir)
    timing = summary.pop("timing")
    summary["batch"] = batch  # what ran, where batch_size: auto leaves it to the GPU
    if not is_main():  # the processes hold the same weights after every step: one writes them
        return {**summary, **timing}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        write_provenance(
            tmp,
            kind="adapter",
            name=name,
            produced_by="stages/sft.py",
            base=str(base_dir),
            base_fingerprint=base_fingerprint(base_dir),
            base_provenance=base_prov,
            params={"common": to_dict(common), "variant": to_dict(variant), "seed": seed},
            base_quantization=common.quantization.value,  # how the base was held while it trained
            training=summary,
            train_conversations=len(dataset),
            replayed_conversations=n_replayed,
            train_turns=dataset.turns,
            train_tokens=dataset.tokens,
        )
    return {**summary, **timing}
