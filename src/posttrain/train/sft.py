"""SFT: a LoRA (or QLoRA) adapter per variant on the study train split, optionally replaying pretrain."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from posttrain.core.distributed import barrier, is_main, per_process_batch
from posttrain.core.errors import InputError
from posttrain.data.examples import Example, group_conversations
from posttrain.models.loading import base_family, quantization_config
from posttrain.train.checkpoints import claim_checkpoints, file_digest
from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset
from posttrain.train.dropout import sparse_lora_dropout
from posttrain.train.liger import apply_liger, require_liger
from posttrain.train.preflight import check_target_modules, check_training_memory
from posttrain.train.trainer import ProgressCallback, run_trainer, training_arguments


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

    family = base_family(base_dir)  # an unknown model_type fails here, from the config alone
    qconfig = quantization_config(common.quantization, family)  # fails before loading anything if impossible
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
        target_regex=family.lora_regex(common.target_modules),
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
        apply_liger(model, family)
    lora = LoraConfig(
        r=common.rank,
        lora_alpha=variant.alpha,
        lora_dropout=variant.dropout,
        target_modules=family.lora_regex(common.target_modules),
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
