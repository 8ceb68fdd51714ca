"""Length-grouped batches and the CPU dropout: the two changes that make training here cheaper per row."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from posttrain.data import load_split
from posttrain.training import (
    AnswerLossTrainer,
    LengthGroupedBatches,
    MaskDropout,
    TeacherForcedCollator,
    TeacherForcedDataset,
    language_model_regex,
    training_arguments,
    use_mask_dropout,
)


def padding_share(lengths: list[int], order: list[int], batch: int) -> float:
    padded = real = 0
    for s in range(0, len(order), batch):
        rows = [lengths[i] for i in order[s : s + batch]]
        padded += max(rows) * len(rows)
        real += sum(rows)
    return 1 - real / padded


def contiguous(batch: list[int], group: list[int]) -> bool:
    """`batch` (lengths) is a run of `group` sorted: no other row of the group lies inside its range."""
    lo, hi = min(batch), max(batch)
    return sum(lo < v < hi for v in group) == sum(lo < v < hi for v in batch)


def test_length_grouped_batches_cover_every_row_once_and_depend_only_on_seed_and_epoch():
    lengths = [
        (7 * i) % 23 + 1 for i in range(103)
    ]  # 103 rows: the last group and the last batch are partial
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=3, group_batches=4)
    first = list(sampler)
    assert sorted(first) == list(range(103)) and len(sampler) == 103
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(LengthGroupedBatches(lengths, batch_size=8, seed=3, group_batches=4)) == first
    assert list(LengthGroupedBatches(lengths, batch_size=8, seed=4, group_batches=4)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(103)) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first, "an epoch's order is recomputed, not drawn on: a resumed run sees it again"


def test_length_grouped_batches_pad_less_and_keep_partial_batches_at_the_end():
    lengths = [(37 * i) % 97 + 10 for i in range(400)]
    grouped = list(LengthGroupedBatches(lengths, batch_size=16, seed=0, group_batches=4))
    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding_share(lengths, grouped, 16) < 0.5 * padding_share(lengths, shuffled, 16)
    # 400 = 6 groups of 64 + 16: batches never straddle two groups, so a batch's rows are of similar length
    for s in range(0, 400, 16):
        rows = [lengths[i] for i in grouped[s : s + 16]]
        group = [lengths[i] for i in grouped[(s // 64) * 64 : (s // 64) * 64 + 64]]
        assert contiguous(rows, group), "a batch is a run of its group's sorted lengths"


def test_length_grouped_batches_put_a_short_last_batch_last():
    lengths = list(range(1, 30))  # 29 rows, batches of 8: one group of 3 full batches and 5 rows
    for seed in range(10):
        order = list(LengthGroupedBatches(lengths, batch_size=8, seed=seed, group_batches=4))
        assert sorted(order) == list(range(29))
        batches = [[lengths[i] for i in order[s : s + 8]] for s in range(0, 29, 8)]
        assert [len(b) for b in batches] == [8, 8, 8, 5]
        assert all(contiguous(b, lengths) for b in batches), "the short batch too is a run of sorted lengths"


def test_the_trainer_batches_by_length_and_its_batches_pad_less(tiny, prepared, tmp_path):
    model, processor = tiny
    ds = TeacherForcedDataset(load_split(prepared, "pretrain_train"), prepared, processor)
    args = training_arguments(
        tmp_path / "ck", max_steps=1, batch_size=4, learning_rate=1e-3, warmup_steps=0, weight_decay=0.0,
        seed=5, save_steps=0,
    )  # fmt: skip
    trainer = AnswerLossTrainer(
        model=copy.deepcopy(model), args=args, train_dataset=ds,
        data_collator=TeacherForcedCollator(processor.tokenizer.pad_token_id),
    )  # fmt: skip
    loader = trainer.get_train_dataloader()
    loader.set_epoch(0)
    positions = real = 0
    for batch in loader:
        positions += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    order = list(LengthGroupedBatches(ds.lengths, batch_size=4, seed=5))
    assert real == ds.tokens
    assert positions == round(ds.tokens / (1 - padding_share(ds.lengths, order, 4)))
    shuffled = torch.randperm(len(ds), generator=torch.Generator().manual_seed(5)).tolist()
    assert padding_share(ds.lengths, order, 4) < padding_share(ds.lengths, shuffled, 4)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_dropout_keeps_each_element_with_probability_one_minus_p_and_keeps_the_mean(p):
    """Keep probability q = 1 − round(65536·p)/65536 (16 random bits an element), scale 1/q: E[out] = x."""
    torch.manual_seed(0)
    drop = MaskDropout(p).train()
    x = torch.full((400, 1000), 2.0)
    out = drop(x)
    kept = out != 0
    keep = 1 - round(65536 * p) / 65536
    n = x.numel()
    assert abs(kept.float().mean().item() - keep) < 5 * math.sqrt(keep * (1 - keep) / n)
    assert torch.allclose(out[kept], torch.tensor(2.0 / keep))
    assert abs(out.mean().item() - 2.0) < 5 * 2.0 / keep * math.sqrt(keep * (1 - keep) / n)
    # no position is favoured: the share kept is the same in each of the three 16-bit fields of a draw
    flat = kept.flatten()
    third = (n + 2) // 3
    for k in range(3):
        field = flat[k * third : (k + 1) * third].float().mean().item()
        assert abs(field - keep) < 5 * math.sqrt(keep * (1 - keep) / third)


def test_mask_dropout_is_the_identity_in_eval_and_masks_the_gradient_in_training():
    drop = MaskDropout(0.3)
    x = torch.randn(5, 7, 11, requires_grad=True)
    assert drop.eval()(x) is x
    torch.manual_seed(1)
    out = drop.train()(x)
    out.sum().backward()
    kept = out.detach() != 0
    assert torch.allclose(x.grad, kept.float() * drop.scale)
    torch.manual_seed(1)
    assert torch.equal(drop(x), out), "seeded like every other draw of the run (resumes restore the RNG)"


def test_use_mask_dropout_replaces_the_lora_dropouts(tiny, prepared, tmp_path):
    model, processor = tiny
    regex = language_model_regex(("q_proj", "v_proj", "down_proj"))
    peft = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=regex)
    )
    replaced = use_mask_dropout(peft)
    drops = [d for m in peft.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert replaced == len(drops) > 0 and all(isinstance(d, MaskDropout) and d.p == 0.1 for d in drops)
    no_dropout = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=regex))
    assert use_mask_dropout(no_dropout) == 0  # dropout 0 is PEFT's Identity: nothing to replace
