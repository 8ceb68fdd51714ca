"""DPO on the ensemble (SFTe_DPO) through TRL's `DPOTrainer`.

The policy is the SFTe adapter reloaded as the model's only adapter (``default``) and made trainable; TRL then
copies it into a frozen ``ref`` adapter that serves as the reference model (DESIGN.md trap 2). Batches are
built with the shared chat template (`posttrain.models.template`), not TRL's collator, which tokenizes without
special tokens and would drop the BOS every other stage sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from posttrain.core.config import Quantization
from posttrain.core.distributed import barrier, broadcast, is_main, per_process_batch
from posttrain.models.template import encode_completion, encode_prompt, pad_batch


def pair_history(row: dict) -> tuple[tuple[str, str], ...]:
    """The earlier turns a preference pair's prompt is asked after (``history`` of the pairs file)."""
    return tuple((q, a) for q, a in row.get("history", ()))


@dataclass
class PreferenceCollator:
    """(chosen, rejected) pairs -> one batch of 2B sequences, chosen first, as TRL's DPO loss expects.

    Each prompt is the turn after its conversation's earlier turns, as it was sampled. Keys: input_ids,
    attention_mask, completion_mask (1 on answer tokens and EOS), pixel_values.
    """

    tokenizer: object
    n_image_tokens: int
    pixels: dict[str, torch.Tensor]  # image path -> (3, H, W)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [
            encode_prompt(self.tokenizer, pair_history(r), r["prompt"], self.n_image_tokens) for r in rows
        ]
        seqs, masks = [], []
        for key in ("chosen", "rejected"):
            for p, r in zip(prompts, rows):
                completion = encode_completion(self.tokenizer, r[key])
                seqs.append(p + completion)
                masks.append([0] * len(p) + [1] * len(completion))
        pixel_values = torch.stack([self.pixels[r["image"]] for r in rows] * 2)  # (2B, 3, H, W)
        return {
            "input_ids": pad_batch(seqs, self.tokenizer.pad_token_id, "right"),  # (2B, T)
            "attention_mask": pad_batch([[1] * len(s) for s in seqs], 0, "right"),
            "completion_mask": pad_batch(masks, 0, "right"),
            "pixel_values": pixel_values,
        }


def policy_from_adapter(
    base_dir: Path, adapter_dir: Path, device: str, quantization: Quantization = Quantization.NONE
):
    """The base, held as `quantization` says, with `adapter_dir` as its only, trainable adapter."""
    from peft import PeftModel

    from posttrain.models.loading import base_family, load_base, quantization_config

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qconfig = quantization_config(quantization, base_family(base_dir))
    model, processor, _ = load_base(base_dir, device=device, dtype=dtype, quantization_config=qconfig)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    if quantization is Quantization.NONE:
        model = model.to(device)  # an nf4 base is already placed by its device_map
    if device == "cpu":
        from posttrain.train.dropout import sparse_lora_dropout

        sparse_lora_dropout(model)  # same dropout, a tenth of the random draws (bernoulli_ is slow on CPU)
    return model, processor


@torch.no_grad()
def completion_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) each sequence's summed log-probability of its completion tokens (answer and EOS), as DPO sums it.

    The logits at t − 1 predict the token at t; `batch` is a `PreferenceCollator` batch on the model's device.
    """
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    ).logits[:, :-1]  # (2B, T - 1, V)
    targets = batch["input_ids"][:, 1:].unsqueeze(-1)  # (2B, T - 1, 1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets).squeeze(-1)  # (2B, T - 1)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def heldout_rewards(
    model, collator, pairs: list[dict], beta: float, batch_size: int
) -> list[tuple[float, float]]:
    """Per held-out pair, (chosen reward, rejected reward): β · (log π − log π_ref) of each completion.

    π is the trained ``default`` adapter and π_ref the frozen ``ref`` copy TRL keeps (Rafailov et al. 2023,
    eq. 5, implicit reward). Every pair is counted once: under several processes batch k is scored by
    process k mod N and the rewards gathered in order, where TRL's evaluation counted the pairs accelerate
    repeats to even out the last batch (and averaged per-batch means, unequal under a short last batch).
    """
    from posttrain.core.distributed import gather_batches, my_batches

    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype  # the vision tower's (an nf4 base keeps it in bf16)
    active = model.active_adapter
    was_training = model.training
    model.eval()
    rewards: dict[int, list[tuple[float, float]]] = {}
    for k in my_batches(-(-len(pairs) // batch_size)):
        rows = pairs[k * batch_size : (k + 1) * batch_size]
        batch = {key: t.to(device) for key, t in collator(rows).items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        policy = completion_logps(model, batch)
        model.set_adapter("ref")
        reference = completion_logps(model, batch)
        model.set_adapter(active)
        delta = (beta * (policy - reference)).tolist()  # chosen rows first, then rejected
        rewards[k] = list(zip(delta[: len(rows)], delta[len(rows) :]))
    model.train(was_training)
    return gather_batches(rewards)


def reward_summary(rewards: list[tuple[float, float]]) -> dict:
    """Pairs, reward accuracy (chosen reward above rejected), mean margin and mean sigmoid DPO loss
    −log σ(margin) (Rafailov et al. 2023, eq. 7) of per-pair (chosen, rejected) rewards.
    """
    import math

    margins = [c - r for c, r in rewards]
    n = len(margins)
    return {
        "pairs": n,
        "loss": sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / n,
        "reward_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
    }


def split_heldout(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs: the pairs of a seeded `fraction` of the images are held out.

    By image, so a held-out pair's chart was never trained on (its other turns are held out with it); the
    held-out share of pairs is close to `fraction`, not exact. Order is kept on both sides.
    """
    if fraction <= 0:
        return list(pairs), []
    images = sorted({r["image"] for r in pairs})
    random.Random(seed).shuffle(images)
    held = set(images[: round(len(images) * fraction)])
    return [r for r in pairs if r["image"] not in held], [r for r in pairs if r["image"] in held]


def _dataset(pairs: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {**{k: r[k] for k in ("image", "prompt", "chosen", "rejected")}, "history": r.get("history", [])}
            for r in pairs
        ]
    )


def dpo_trainer(
    model,
    processor,
    pairs: list[dict],
    data_dir: Path,
    params,
    output_dir: Path,
    seed: int,
    callbacks: list,
    *,
    micro_batch: int,
    gradient_accumulation: int,
    heldout: list[dict] = (),
):
    """A configured TRL `DPOTrainer` for `pairs` (rows: image, prompt, chosen, rejected).

    `micro_batch` and `gradient_accumulation` are the ones `posttrain.train.preflight.check_training_memory`
    resolved from `params` (``batch_size: auto`` leaves them to the GPU). `heldout` pairs are never trained
    on; the collator holds their images too, for `heldout_rewards` after training.
    """
    from trl import DPOConfig, DPOTrainer

    from posttrain.models.images import load_pixels
    from posttrain.models.loading import image_token_count

    pixels = load_pixels(processor, data_dir, [r["image"] for r in [*pairs, *heldout]])
    collator = PreferenceCollator(processor.tokenizer, image_token_count(processor), pixels)
    args = DPOConfig(
        output_dir=str(output_dir),
        beta=params.beta,
        # with sft_weight, the chosen answers' mean token NLL is added (RPO: DPO that keeps the chosen likely)
        loss_type=[params.loss_type.value] + (["sft"] if params.sft_weight > 0 else []),
        loss_weights=[1.0, params.sft_weight] if params.sft_weight > 0 else None,
        label_smoothing=params.label_smoothing,
        learning_rate=params.learning_rate,
        num_train_epochs=params.epochs,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=gradient_accumulation,
        gradient_checkpointing=params.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if params.gradient_checkpointing else None,
        warmup_steps=params.warmup_steps,
        lr_scheduler_type="cosine",
        max_length=None,  # never truncate: image tokens would be cut (DESIGN.md trap 5)
        precompute_ref_log_probs=False,  # must stay False for VLMs
        remove_unused_columns=False,
        logging_steps=1,  # DPO runs are short: keep every step's rewards and margins
        save_strategy="steps" if params.save_steps > 0 else "no",
        save_steps=max(params.save_steps, 1),
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=_dataset(pairs),
        processing_class=processor,
        callbacks=callbacks,
    )
    keep_trainable_fp32(trainer.model)
    return trainer


def keep_trainable_fp32(model) -> None:
    """Cast every trainable parameter back to fp32.

    On a 4-bit base TRL's DPOTrainer casts the trainable parameters to bf16 (the QLoRA paper's recipe), so
    AdamW would keep bf16 weights and moments: at the study's lr 2e-5 many updates round away (2e-3 + 7e-6 is
    2e-3 in bf16), and a resumed run would be fp32 again (PEFT upcasts adapters as they load), so a kill would
    change the result. SFT's adapters train in fp32; so does DPO. The optimizer is built later, in `train()`.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def train_dpo(
    base_dir: Path,
    start_adapter: Path,
    pairs: list[dict],
    data_dir: Path,
    params,
    seed: int,
    out_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path | None,
    quantization: Quantization = Quantization.NONE,
) -> dict:
    """One DPO round: the adapter in `start_adapter` trained on `pairs`, saved to `out_dir`.

    The base is held as `quantization` says: nf4 (QLoRA DPO) when SFT trained the adapters on nf4.

    The caller makes `out_dir` atomic (it is a folder inside `posttrain.core.io.atomic_dir`).

    A run killed mid-training resumes from `checkpoint_dir` when its inputs are the same
    (`posttrain.train.checkpoints`).

    Returns:
        Training summary: steps, pairs, the batch that ran (micro-batch and gradient accumulation), the last
        logged rewards/margins/accuracies; under ``timing`` the wall time and the checkpoint resumed from (for
        logs, not provenance).
    """
    from posttrain.models.loading import base_family
    from posttrain.train.checkpoints import claim_checkpoints, file_digest, fit
    from posttrain.train.preflight import check_training_memory
    from posttrain.train.trainer import ProgressCallback

    adapter_config = json.loads((start_adapter / "adapter_config.json").read_text())
    target = adapter_config["target_modules"]  # PEFT stores a regex string or a list of layer names
    target = target if isinstance(target, str) else base_family(base_dir).lora_regex(tuple(target))
    micro_batch, accumulation = check_training_memory(
        base_dir,
        [(pair_history(r), r["prompt"], r[side]) for r in pairs for side in ("chosen", "rejected")],
        section="dpo",
        batch_size=params.batch_size,
        sequences_per_row=2,  # chosen and rejected
        target_regex=target,
        rank=adapter_config["r"],
        quantized=quantization is Quantization.NF4,
        checkpointing=params.gradient_checkpointing,
        liger=False,
        gradient_accumulation=params.gradient_accumulation,
        effective_batch=params.effective_batch,
    )
    batch = {"micro_batch": micro_batch, "gradient_accumulation": accumulation}
    # under N processes (launch.processes) each trains micro_batch / N pairs: the recipe's step is unchanged
    per_process = per_process_batch("dpo", micro_batch)
    from posttrain.core.config import to_dict
    from posttrain.models.loading import base_fingerprint

    if is_main():
        claim_checkpoints(
            checkpoint_dir,
            {
                "stage": "dpo",
                "params": {"dpo": to_dict(params), "seed": seed, "base_quantization": quantization.value},
                "pairs": hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest(),
                "start_adapter": file_digest(start_adapter / "adapter_model.safetensors"),
                "base": base_fingerprint(base_dir),
                "batch": batch,  # auto picks it per GPU: another card's checkpoints are another run
            },
        )
    barrier()  # every process looks for checkpoints only once the folder is claimed
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = policy_from_adapter(base_dir, start_adapter, device, quantization)
    callbacks = [ProgressCallback(every=5, batch_size=micro_batch * accumulation)]  # pairs per step
    train_pairs, heldout = split_heldout(pairs, params.heldout_fraction, seed)
    trainer = dpo_trainer(
        model,
        processor,
        train_pairs,
        data_dir,
        params,
        checkpoint_dir,
        seed,
        callbacks,
        micro_batch=per_process,
        gradient_accumulation=accumulation,
        heldout=heldout,
    )
    result = fit(trainer, live_dir)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    summary = {
        "steps": result["steps"],
        "pairs": len(train_pairs),
        # the pairs behind the last logged step's figures: a short last batch makes them noise
        "last_step_pairs": len(train_pairs) % (micro_batch * accumulation) or micro_batch * accumulation,
        "batch": batch,
        **{k: last[k] for k in last if k.startswith(("rewards/", "logps/")) or k == "loss"},
    }
    if heldout:  # what the trained policy prefers on pairs of charts it never saw, against its reference
        summary["heldout"] = reward_summary(
            heldout_rewards(trainer.model, trainer.data_collator, heldout, params.beta, per_process)
        )
        h = summary["heldout"]
        print(
            f"held-out pairs: {h['pairs']}, loss {h['loss']:.4f}, "
            f"reward accuracy {h['reward_accuracy']:.3f}, margin {h['reward_margin']:.3f}",
            flush=True,
        )
    if is_main():  # the processes hold the same weights after every step: one writes them
        trainer.model.save_pretrained(out_dir, selected_adapters=["default"])  # not the frozen "ref" copy
    barrier()  # a next round loads this adapter in every process
    return {**summary, "timing": result["timing"]}


ROUND_METRICS = ("relaxed_acc", "negative_acc", "critic", "rouge_l", "bleu", "loss", "retain_relaxed_acc")


def evaluate_round(
    base_dir: Path, adapter: Path, data_dir: Path, params, name: str, device: str, quantization: Quantization
) -> dict:
    """Evaluate an intermediate round's adapter like `evaluate@<model>`; items and metrics stay in its folder.

    Returns:
        The headline metrics (`ROUND_METRICS`, each with its CI bounds) for the report's rounds table.
    """
    from posttrain.evaluate.evaluation import evaluate_model

    model, processor = policy_from_adapter(base_dir, adapter, device, quantization)
    model.eval()
    metrics = evaluate_model(
        name, model, processor, data_dir, params, adapter / "eval", adapter / "eval" / "metrics.json"
    )
    return {k: metrics[k] for m in ROUND_METRICS for k in (m, f"{m}_ci_low", f"{m}_ci_high")}


def run_rounds(
    base_dir: Path,
    sfte_dir: Path,
    first_pairs: list[dict],
    first_stats: dict,
    data_dir: Path,
    params,
    seed: int,
    out_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path | None,
) -> list[dict]:
    """`params.dpo.rounds` rounds of DPO from SFTe; the last round's adapter is `out_dir`.

    Round 1 trains on the pairs of the `preferences` stage. Each later round samples from the previous round's
    model, judges with the same judge (``self`` is now that model), and trains on from its adapter
    (iterative DPO, as LLaVA-Critic's). Earlier rounds' adapters are kept in ``out_dir/rounds/round<k>``.

    Returns:
        One entry per round: its preference statistics, training summary and, for rounds before the last, the
        evaluation of that round's model.
    """
    from posttrain.core.config import downstream_quantization
    from posttrain.core.io import atomic_dir
    from posttrain.data.examples import load_split
    from posttrain.models.loading import (
        base_fingerprint,
        check_adapters,
        check_base_quantization,
        write_provenance,
    )
    from posttrain.train.preferences import make_preferences

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = downstream_quantization(params)
    check_adapters(base_dir, {"sfte": sfte_dir})
    check_base_quantization(sfte_dir, "ensemble", quantization)
    # later rounds sample and evaluate with the batches sized before any weight loads (the provenance keeps
    # the params as given)
    sampling, evaluating = params.preferences, params.evaluate
    if params.dpo.rounds > 1:
        from posttrain.evaluate.evaluation import evaluation_batch
        from posttrain.train.preferences import preference_batch

        prompts = load_split(data_dir, "study_train")
        if sampling.max_prompts:
            prompts = prompts[: sampling.max_prompts]
        sampling = replace(
            sampling, batch_size=preference_batch(sampling, base_dir, sfte_dir, False, prompts)
        )
        evaluating = replace(
            evaluating, batch_size=evaluation_batch(evaluating, base_dir, sfte_dir, False, data_dir)
        )
    rounds = []
    # under N processes one writes: the others train into (and load later rounds from) its temporary folder
    with atomic_dir(out_dir) if is_main() else contextlib.nullcontext() as tmp:
        tmp = broadcast(tmp)
        adapter, pairs, stats = sfte_dir, first_pairs, first_stats
        for r in range(1, params.dpo.rounds + 1):
            if r > 1:
                model, processor = policy_from_adapter(base_dir, adapter, device, quantization)
                examples = load_split(data_dir, "study_train")
                if params.preferences.max_prompts:
                    examples = examples[: params.preferences.max_prompts]
                pairs, stats = make_preferences(
                    model.eval(), processor, examples, data_dir, sampling, params.evaluate.critic
                )
                del model
            dest = tmp if r == params.dpo.rounds else tmp / "rounds" / f"round{r}"
            dest.mkdir(parents=True, exist_ok=True)
            print(f"DPO round {r}/{params.dpo.rounds}: {len(pairs)} pairs", flush=True)
            # the last round (sfte_dpo) logs to the declared DVCLive folder; earlier rounds' training
            # summaries are in the provenance
            live = live_dir if r == params.dpo.rounds else None
            summary = train_dpo(
                base_dir,
                adapter,
                pairs,
                data_dir,
                params.dpo,
                seed,
                dest,
                checkpoint_dir / f"round{r}",
                live,
                quantization,
            )
            timing = summary.pop("timing")
            print(
                f"DPO round {r}: {summary['steps']} steps in {timing['train_seconds']:.0f}s"
                + (f", resumed from {timing['resumed_from']}" if timing["resumed_from"] else ""),
                flush=True,
            )
            entry = {"round": r, "preferences": stats, "training": summary}
            if r < params.dpo.rounds:  # the last round is `sfte_dpo`, evaluated by evaluate@sfte_dpo
                entry["evaluation"] = evaluate_round(
                    base_dir, dest, data_dir, evaluating, f"round{r}", device, quantization
                )
            rounds.append(entry)
            adapter = dest
        from posttrain.core.config import to_dict

        if not is_main():
            return rounds
        write_provenance(
            tmp,
            kind="adapter",
            name="sfte_dpo",
            produced_by="stages/dpo.py",
            base=str(base_dir),
            base_fingerprint=base_fingerprint(base_dir),
            start_adapter=str(sfte_dir),
            base_quantization=quantization.value,  # how the base was held while DPO trained
            rounds=rounds,
            params={"dpo": to_dict(params.dpo), "preferences": to_dict(params.preferences), "seed": seed},
        )
    return rounds
