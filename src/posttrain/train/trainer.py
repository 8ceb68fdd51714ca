"""The HF Trainer machinery shared by base training and SFT (DPO prints `ProgressCallback`'s line too).

`training_arguments`: the shared settings; `answer_loss` and `AnswerLossTrainer`: the loss from the first
answer on; `run_trainer`: one Trainer call through `posttrain.train.checkpoints.fit`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from posttrain.core.runtime import hide_bitsandbytes_without_cuda

hide_bitsandbytes_without_cuda()  # before transformers' Trainer imports it (see there)

from transformers import Trainer, TrainerCallback, TrainingArguments

from posttrain.models.template import IGNORE_INDEX, answer_start
from posttrain.train.checkpoints import fit


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
