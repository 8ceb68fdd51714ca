"""SFTe_DPO is the ensemble plus DPO (DESIGN.md trap 2): checked on the real classes, shrunk."""

import copy

import pytest
import torch
from conftest import make_adapter
from peft import PeftModel

from posttrain.core.config import DpoParams
from posttrain.data.examples import load_split
from posttrain.models.images import load_pixels
from posttrain.models.loading import image_token_count, load_base
from posttrain.train.dpo import PreferenceCollator, dpo_trainer, policy_from_adapter, train_dpo


@pytest.fixture(scope="module")
def sfte(base_dir):
    return make_adapter(base_dir, base_dir.parent / "dpo_sfte", alpha=16, rank=8, seed=3)


@pytest.fixture(scope="module")
def pairs(prepared):
    rows = []
    train = load_split(prepared, "study_train")
    followups = [e for e in train if e.history][:2]  # the first two pairs are asked after earlier turns
    for e in followups + [e for e in train if e not in followups][:6]:
        rows.append(
            {
                "image": e.image,
                "prompt": e.question,
                "history": [list(t) for t in e.history],
                "chosen": e.answer,
                "rejected": "I do not know.",
            }
        )
    return rows


PARAMS = DpoParams(
    beta=0.1, learning_rate=5e-3, epochs=1.0, batch_size=4, warmup_steps=0, heldout_fraction=0.1
)


def trainer_for(model, processor, pairs, prepared, tmp_path):
    """`dpo_trainer` on `pairs` with PARAMS, one micro-batch of 4 pairs a step, checkpoints in tmp_path/ck."""
    return dpo_trainer(
        model,
        processor,
        pairs,
        prepared,
        PARAMS,
        tmp_path / "ck",
        0,
        [],
        micro_batch=4,
        gradient_accumulation=1,
    )


def batch(processor, prepared, pairs):
    """The first two pairs collated as the DPO trainer sees them."""
    pixels = load_pixels(processor, prepared, [p["image"] for p in pairs])
    return PreferenceCollator(processor.tokenizer, image_token_count(processor), pixels)(pairs[:2])


def test_collator_marks_only_the_completions(base_dir, prepared, pairs):
    _, processor, _ = load_base(base_dir)
    b = batch(processor, prepared, pairs)
    assert b["input_ids"].shape[0] == 4 and b["pixel_values"].shape[0] == 4
    tok = processor.tokenizer
    for i, key in enumerate(["chosen", "chosen", "rejected", "rejected"]):
        kept = b["input_ids"][i][b["completion_mask"][i].bool()]
        assert tok.decode(kept) == f" {pairs[i % 2][key]}</s>"
        assert b["input_ids"][i][0] == tok.bos_token_id
        # the prompt is the turn after its conversation's earlier turns, as it was sampled
        in_prompt = ~b["completion_mask"][i].bool() & b["attention_mask"][i].bool()
        prompt = tok.decode(b["input_ids"][i][in_prompt])
        (q, a), row = pairs[i % 2]["history"][-1], pairs[i % 2]
        assert prompt.endswith(f"{q} ASSISTANT: {a}</s>USER: {row['prompt']} ASSISTANT:")


def test_policy_and_reference_equal_sfte_before_any_step(base_dir, sfte, prepared, pairs, tmp_path):
    model, processor = policy_from_adapter(base_dir, sfte, "cpu")
    trainer = trainer_for(model, processor, pairs, prepared, tmp_path)
    assert set(trainer.model.peft_config) == {"default", "ref"}
    b = batch(processor, prepared, pairs)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    ensemble = PeftModel.from_pretrained(load_base(base_dir)[0], str(sfte)).eval()
    policy = trainer.model.eval()
    with torch.no_grad():
        expected = ensemble(**inputs).logits
        got = policy(**inputs).logits
        policy.set_adapter("ref")
        ref = policy(**inputs).logits
        policy.set_adapter("default")
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(ref, expected, atol=1e-5)


def test_qlora_dpo_keeps_the_trainable_adapter_in_fp32_also_after_a_resume(
    base_dir, sfte, prepared, pairs, tmp_path
):
    """TRL casts every trainable parameter of a 4-bit model to bf16 (its QLoRA recipe), where AdamW's updates
    at lr 2e-5 round to nothing (2e-3 + 7e-6 is 2e-3 in bf16). The flag an nf4 base carries is set here on
    the CPU model: the policy must stay fp32 as SFT's adapters are, and loading a checkpoint (a resume, which
    PEFT upcasts) must change no dtype."""
    model, processor = policy_from_adapter(base_dir, sfte, "cpu")
    model.base_model.model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit model
    trainer = trainer_for(model, processor, pairs, prepared, tmp_path)

    def trainable():
        return {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}

    built = trainable()
    assert built and set(built.values()) == {torch.float32}, {d for d in built.values()}
    trainer.model.save_pretrained(tmp_path / "resume", selected_adapters=["default"])
    trainer._load_from_checkpoint(str(tmp_path / "resume"))
    assert trainable() == built


def test_dpo_moves_the_adapter_not_the_base_and_differs_from_dpo_from_scratch(
    base_dir, sfte, prepared, pairs, tmp_path
):
    out = tmp_path / "sfte_dpo"
    out.mkdir()
    summary = train_dpo(base_dir, sfte, pairs, prepared, PARAMS, 0, out, tmp_path / "ck", None)
    assert summary["steps"] == 2 and "rewards/margins" in summary
    base_before = load_base(base_dir)[0].state_dict()
    tuned = PeftModel.from_pretrained(load_base(base_dir)[0], str(out))
    start = PeftModel.from_pretrained(load_base(base_dir)[0], str(sfte))
    assert list(tuned.peft_config) == ["default"]
    lora_now = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    lora_start = {k: v for k, v in start.state_dict().items() if "lora_" in k}
    assert any(not torch.equal(lora_now[k], lora_start[k]) for k in lora_now), "DPO must train the adapter"
    merged_free = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in tuned.state_dict().items()
        if "lora_" not in k
    }
    assert all(torch.equal(merged_free[k], v) for k, v in base_before.items() if k in merged_free)

    # The same DPO from a fresh (zero-B) adapter on the base is a different model: the ensemble matters.
    scratch = make_adapter(base_dir, tmp_path / "fresh", alpha=16, rank=8, seed=3, scale=None)
    out2 = tmp_path / "scratch_dpo"
    out2.mkdir()
    train_dpo(base_dir, scratch, pairs, prepared, PARAMS, 0, out2, tmp_path / "ck2", None)
    _, processor, _ = load_base(base_dir)
    b = batch(processor, prepared, pairs)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    from_scratch = PeftModel.from_pretrained(load_base(base_dir)[0], str(out2)).eval()
    with torch.no_grad():
        assert not torch.allclose(tuned.eval()(**inputs).logits, from_scratch(**inputs).logits, atol=1e-3)
    assert copy.copy(summary)["pairs"] == 8


def test_two_rounds_sample_from_the_first_round_and_keep_both_adapters(
    base_dir, sfte, prepared, pairs, tmp_path, micro_params_file
):
    """Iterative DPO: round 2 judges fresh samples of the round-1 model and trains on from its adapter."""
    import dataclasses
    import json

    from posttrain.core.config import Judge, load_params
    from posttrain.train.dpo import run_rounds

    params = load_params(micro_params_file)
    params = dataclasses.replace(
        params,
        dpo=dataclasses.replace(PARAMS, rounds=2),
        preferences=dataclasses.replace(
            params.preferences, judge=Judge.REFERENCE, max_prompts=12, min_pairs=1
        ),
    )
    stats = {"pairs_kept": len(pairs)}
    out = tmp_path / "sfte_dpo"
    try:
        rounds = run_rounds(base_dir, sfte, pairs, stats, prepared, params, 0, out, tmp_path / "ck", None)
    except Exception as e:  # noqa: BLE001 - a random policy can leave no pair in round 2; the error must say so
        from posttrain.train.preferences import NoPairsError

        assert isinstance(e, NoPairsError) and not out.exists()
        return
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["preferences"] == stats and rounds[1]["preferences"]["prompts"] == 12
    assert (out / "adapter_model.safetensors").exists() and (
        out / "rounds/round1/adapter_model.safetensors"
    ).exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["rounds"]) == 2 and prov["start_adapter"] == str(sfte)
    assert prov["base_quantization"] == "none"  # trained on the base as the preset holds it after SFT
    # round 1 is evaluated on the way (round 2 is sfte_dpo, evaluated by evaluate@sfte_dpo)
    assert "relaxed_acc_ci_high" in rounds[0]["evaluation"] and "evaluation" not in rounds[1]
    assert (out / "rounds/round1/eval/study_test/round1.jsonl").exists()
    from posttrain.report.report import rounds_table

    final = {k: 50.0 for k in rounds[0]["evaluation"]}
    table = rounds_table(prov["rounds"], final).splitlines()
    assert len(table) == 4 and table[2].startswith("| 1 | 8 |") and table[3].startswith("| 2 |")


def test_robust_loss_gets_its_label_smoothing(base_dir, sfte, prepared, pairs, tmp_path):
    """dpo.label_smoothing reaches TRL: robust DPO without it would be plain DPO."""
    from dataclasses import replace

    from posttrain.core.config import DpoLoss

    model, processor = policy_from_adapter(base_dir, sfte, "cpu")
    params = replace(PARAMS, loss_type=DpoLoss.ROBUST, label_smoothing=0.1)
    trainer = dpo_trainer(
        model,
        processor,
        pairs,
        prepared,
        params,
        tmp_path / "ck",
        0,
        [],
        micro_batch=2,
        gradient_accumulation=3,
    )
    assert trainer.args.loss_type == ["robust"] and trainer.args.label_smoothing == 0.1
    # the resolved batch, not params.batch_size, reaches TRL
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 3)


def test_dpo_with_batch_size_auto_trains_with_the_resolved_batch_and_records_it(
    base_dir, sfte, prepared, pairs, tmp_path, monkeypatch, capsys
):
    """On the CPU auto takes the whole effective batch (4 of the 8 pairs): two steps, recorded as 4 × 1."""
    import json
    from dataclasses import replace

    from posttrain.core.config import BatchSize

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = replace(PARAMS, batch_size=BatchSize.AUTO, effective_batch=4)
    out = tmp_path / "sfte_dpo"
    out.mkdir()
    summary = train_dpo(base_dir, sfte, pairs, prepared, params, 0, out, tmp_path / "ck", None)
    assert (
        "dpo.batch_size auto: 4 × accumulation 1 = effective batch 4 (on the CPU" in capsys.readouterr().out
    )
    batch = {"micro_batch": 4, "gradient_accumulation": 1}
    assert summary["batch"] == batch and summary["steps"] == 2
    assert json.loads((tmp_path / "ck" / "fingerprint.json").read_text())["batch"] == batch


def test_heldout_pairs_are_whole_images_never_trained_on():
    from posttrain.train.dpo import split_heldout

    rows = [{"image": f"images/{i % 10}.png", "n": i} for i in range(40)]  # 10 images, 4 pairs each
    train, held = split_heldout(rows, 0.2, seed=0)
    assert len(held) == 8 and len(train) == 32
    assert not {r["image"] for r in train} & {r["image"] for r in held}
    assert [r["n"] for r in train] == sorted(r["n"] for r in train)  # order kept
    assert split_heldout(rows, 0.2, seed=0) == (train, held)
    assert {r["image"] for r in split_heldout(rows, 0.2, seed=1)[1]} != {r["image"] for r in held}
    assert split_heldout(rows, 0.0, seed=0) == (rows, [])


def test_dpo_measures_its_rewards_on_heldout_pairs(base_dir, sfte, prepared, pairs, tmp_path):
    """The held-out pairs are not trained on (the training pairs are fewer) and after training the policy's
    reward accuracy on them is measured: the rejected answer is the same refusal in every pair, so a policy
    that learned anything prefers the chosen answers on charts it never saw."""
    from dataclasses import replace

    from posttrain.train.dpo import split_heldout

    params = replace(PARAMS, heldout_fraction=0.4, epochs=3.0, batch_size=2)
    train, held = split_heldout(pairs, 0.4, 0)
    assert held and train
    out = tmp_path / "dpo"
    out.mkdir()
    summary = train_dpo(base_dir, sfte, pairs, prepared, params, 0, out, tmp_path / "ck", None)
    assert summary["pairs"] == len(train)
    assert summary["last_step_pairs"] == (len(train) % 2 or 2)  # batch 2: the last step's pairs
    h = summary["heldout"]
    assert h["pairs"] == len(held) and h["loss"] < 0.6931  # below ln 2: the policy moved the right way
    assert h["reward_accuracy"] > 0.5 and h["reward_margin"] > 0


def test_heldout_rewards_are_trls_on_one_full_batch_and_count_each_pair_once(
    base_dir, sfte, prepared, pairs, tmp_path
):
    """On one batch that is the whole held-out set, TRL's evaluation (its per-batch means) and the per-pair
    rewards agree: loss, accuracy, margin. Then on 3 pairs scored in batches of 2 (a short last batch) the
    accuracy is exactly the share of the 3 pairs whose margin is positive, as TRL's mean of batch means is not
    under a short batch or accelerate's padding."""
    from posttrain.train.dpo import _dataset, heldout_rewards, reward_summary

    train, held = pairs[:4], pairs[4:8]
    model, processor = policy_from_adapter(base_dir, sfte, "cpu")
    trainer = trainer_for(model, processor, pairs, prepared, tmp_path)
    trainer.train_dataset = _dataset(train)
    trainer.train()
    ours = reward_summary(heldout_rewards(trainer.model, trainer.data_collator, held, PARAMS.beta, 4))
    theirs = trainer.evaluate(eval_dataset=_dataset(held))
    assert ours["pairs"] == 4 and ours["reward_margin"] != 0
    assert ours["loss"] == pytest.approx(theirs["eval_loss"], abs=1e-4)
    assert ours["reward_accuracy"] == pytest.approx(theirs["eval_rewards/accuracies"], abs=1e-6)
    assert ours["reward_margin"] == pytest.approx(theirs["eval_rewards/margins"], abs=1e-4)
    rewards = heldout_rewards(trainer.model, trainer.data_collator, held[:3], PARAMS.beta, 2)
    assert len(rewards) == 3
    whole = heldout_rewards(trainer.model, trainer.data_collator, held[:3], PARAMS.beta, 3)
    assert [x for r in rewards for x in r] == pytest.approx([x for r in whole for x in r], abs=1e-5)
    assert reward_summary(rewards)["reward_accuracy"] == sum(c > r for c, r in rewards) / 3


def test_sft_weight_adds_the_chosen_nll_and_keeps_the_chosen_answers_likelier(
    base_dir, sfte, prepared, pairs, tmp_path
):
    """`dpo.sft_weight` (RPO) trains on DPO + w · the chosen answers' token NLL: TRL gets both losses, and
    from the same start, seed and pairs the chosen answers end likelier than under plain DPO."""
    from dataclasses import replace

    params = replace(PARAMS, heldout_fraction=0.0, epochs=2.0, batch_size=2)
    _, processor, _ = load_base(base_dir)
    model, processor = policy_from_adapter(base_dir, sfte, "cpu")
    trainer = dpo_trainer(
        model, processor, pairs, prepared, replace(params, sft_weight=0.5), tmp_path / "t", 0, [],
        micro_batch=2, gradient_accumulation=1,
    )  # fmt: skip
    assert trainer.args.loss_type == ["sigmoid", "sft"] and trainer.args.loss_weights == [1.0, 0.5]
    summaries = {}
    for w in (0.0, 1.0):
        out = tmp_path / f"w{w}"
        out.mkdir()
        summaries[w] = train_dpo(
            base_dir, sfte, pairs, prepared, replace(params, sft_weight=w), 0, out, tmp_path / f"ck{w}", None
        )
    assert summaries[1.0]["logps/chosen"] > summaries[0.0]["logps/chosen"]
