"""The tiny base's pretraining: a tiny LLaVA built from scratch, all of it trained on the pretrain pool."""

from __future__ import annotations

from pathlib import Path

from posttrain.core.distributed import barrier, is_main, per_process_batch
from posttrain.models.template import conversation_text
from posttrain.train.checkpoints import claim_checkpoints, file_digest
from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset
from posttrain.train.trainer import ProgressCallback, run_trainer, training_arguments


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
