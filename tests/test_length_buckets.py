"""Length-bucketed batches (`base.train.length_buckets`): every conversation once an epoch, less padding."""

import random

from posttrain.data import load_split
from posttrain.training import (
    AnswerLossTrainer,
    LengthBucketSampler,
    TeacherForcedCollator,
    TeacherForcedDataset,
    training_arguments,
)


def padded_tokens(order: list[int], lengths: list[int], batch: int) -> int:
    """Tokens a batch padded to its longest row computes, summed over the consecutive batches of `order`."""
    cuts = [order[i : i + batch] for i in range(0, len(order), batch)]
    return sum(len(c) * max(lengths[j] for j in c) for c in cuts)


def test_every_epoch_is_a_permutation_with_similar_lengths_in_each_batch():
    rng = random.Random(0)
    lengths = [rng.randint(40, 160) for _ in range(1003)]  # 125 full batches of 8 and one of 3
    sampler = LengthBucketSampler(lengths, batch_size=8, bucket=4, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(1003)), "each conversation exactly once"
    assert len(sampler) == 1003
    # the partial batch comes last: each cut of 8 before it lies within one sorted span, so it is sorted
    # (a cut straddling a shuffled batch boundary would not be, almost surely)
    cuts = [[lengths[j] for j in first[i : i + 8]] for i in range(0, 1000, 8)]
    assert all(c == sorted(c) for c in cuts)
    shuffled = first[:]
    random.Random(1).shuffle(shuffled)
    assert padded_tokens(first, lengths, 8) < 0.85 * padded_tokens(shuffled, lengths, 8)
    # a function of (seed, epoch): the same epoch replays, another epoch or seed draws anew
    assert list(LengthBucketSampler(lengths, 8, 4, seed=0)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(1003)) and second != first
    assert list(LengthBucketSampler(lengths, 8, 4, seed=1)) != first


def test_one_bucket_spanning_everything_cuts_the_sorted_order():
    """With a span of the whole dataset each batch is a run of the lengths sorted: the least padding."""
    lengths = [5, 1, 4, 2, 8, 7, 3, 6]
    order = list(LengthBucketSampler(lengths, batch_size=2, bucket=4, seed=3))
    batches = [sorted(lengths[j] for j in order[i : i + 2]) for i in range(0, 8, 2)]
    assert sorted(batches) == [[1, 2], [3, 4], [5, 6], [7, 8]]


def test_the_trainer_batches_through_the_bucket_sampler(tiny, prepared, tmp_path):
    model, processor = tiny
    ds = TeacherForcedDataset(load_split(prepared, "pretrain_train"), prepared, processor)
    args = training_arguments(
        tmp_path,
        max_steps=1,
        batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        weight_decay=0.0,
        seed=0,
        save_steps=0,
    )
    collator = TeacherForcedCollator(processor.tokenizer.pad_token_id)

    def widths(buckets: int) -> list[int]:
        trainer = AnswerLossTrainer(
            model=model, args=args, train_dataset=ds, data_collator=collator, length_buckets=buckets
        )
        return [b["input_ids"].shape[1] for b in trainer.get_train_dataloader()]

    bucketed, plain = widths(len(ds)), widths(0)
    assert len(bucketed) == len(plain) == -(-len(ds) // 4)
    assert sum(bucketed) < sum(plain)
    assert isinstance(
        AnswerLossTrainer(model=model, args=args, train_dataset=ds, length_buckets=2)._get_train_sampler(),
        LengthBucketSampler,
    )
