"""Training memory estimated before loading (posttrain.models.memory), against the peaks measured on an
H100."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.core.config import BatchSize
from posttrain.data.examples import load_split
from posttrain.models.architectures import load_config
from posttrain.models.family import LLAVA_15
from posttrain.models.memory import (
    GB,
    BatchTooLargeError,
    MemoryEstimate,
    check_fits,
    choose_micro_batch,
    estimate_training,
)
from posttrain.train.preflight import check_training_memory

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def measured_runs():
    """(key, quantized, checkpointing, liger, batch, peak GB) of every SFT run in the committed benches."""
    for name, liger_default in (("h100.json", True), ("h100_baseline.json", False)):
        bench = json.loads((ROOT / "bench" / "results" / name).read_text())
        liger = bench.get("liger", liger_default)
        for key, run in bench.items():
            if key.startswith(("sft_lora_bf16_b", "sft_qlora_nf4_b")) and "peak_memory_gb" in run:
                if "upcast" in key or (key.startswith("sft_qlora") and name == "h100_baseline.json"):
                    continue  # nf4 with PEFT's fp32 upcast of the other weights: the old path, not used now
                yield (
                    key,
                    key.startswith("sft_qlora"),
                    run["gradient_checkpointing"],
                    liger,
                    run["batch"],
                    run["peak_memory_gb"],
                )


@pytest.mark.parametrize("run", list(measured_runs()), ids=lambda r: r[0])
def test_estimate_matches_the_measured_peaks(run):
    _, quantized, checkpointing, liger, batch, peak = run
    estimate = estimate_training(
        load_config("llava-1.5-7b"),
        sequences=batch,
        seq_len=705,
        target_regex=LLAVA_15.lora_regex(LINEAR),
        rank=16,
        quantized=quantized,
        checkpointing=checkpointing,
        liger=liger,
    )
    assert peak - 0.5 <= estimate.total / GB <= peak + 1.5  # never much below the measured peak


def test_weights_count_nf4_for_the_language_models_linear_layers_only():
    config = load_config("llava-1.5-7b")
    kwargs = dict(
        sequences=1,
        seq_len=1,
        target_regex=LLAVA_15.lora_regex(LINEAR),
        rank=16,
        checkpointing=False,
        liger=False,
    )
    bf16 = estimate_training(config, quantized=False, **kwargs)
    nf4 = estimate_training(config, quantized=True, **kwargs)
    assert bf16.weights / GB == pytest.approx(2 * 7_063_427_072 / GB, rel=1e-6)
    # 32 layers × (4·4096² + 3·4096·11008) linear weights go from 2 bytes to ~0.508
    linear = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert (bf16.weights - nf4.weights) / linear == pytest.approx(
        2 - 0.5 - 0.5 / 64 - 4 / (64 * 256), rel=1e-6
    )
    # LoRA r=16: 32 layers × 16 × (in+out) over the 7 layers; 16 bytes each (fp32 weight, grad, 2 moments)
    lora = 32 * 16 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert bf16.adapter == lora * 16 == nf4.adapter


def test_check_fits_names_the_batch_that_fits_and_the_other_knobs():
    # 10 GB fixed + 8 rows × 5 GB = 50 GB on a 40 GB card: budget 38 GB -> (38 - 10) // 5 = 5 rows fit
    estimate = MemoryEstimate(weights=9.0 * GB, adapter=0.4 * GB, activations=40 * GB, overhead=0.6 * GB)
    with pytest.raises(BatchTooLargeError) as e:
        check_fits(
            estimate,
            40 * GB,
            section="sft.common",
            batch_size=8,
            sequences_per_row=1,
            seq_len=705,
            checkpointing=False,
        )
    msg = str(e.value)
    assert "sft.common.batch_size 8 (8 sequences of up to 705 tokens) needs ~50.0 GB" in msg
    # 5 rows fit; 4 is the largest divisor of 8 that does, so accumulation doubles
    assert "set sft.common.batch_size: 4 and multiply sft.common.gradient_accumulation by 2" in msg
    assert "up to 5 rows fit" in msg
    assert "sft.common.gradient_checkpointing: true" in msg and "Nothing was loaded" in msg
    check_fits(
        estimate, 60 * GB, section="dpo", batch_size=8, sequences_per_row=2, seq_len=705, checkpointing=False
    )


def test_weights_that_cannot_fit_say_so():
    estimate = MemoryEstimate(weights=30 * GB, adapter=0.0, activations=1 * GB)
    with pytest.raises(BatchTooLargeError, match="weights alone do not fit"):
        check_fits(
            estimate,
            24 * GB,
            section="dpo",
            batch_size=1,
            sequences_per_row=2,
            seq_len=700,
            checkpointing=True,
        )


def test_check_training_memory_reads_the_base_without_its_weights(base_dir, prepared, monkeypatch):
    """With CUDA faked and a 1 MB card, the tiny base fails the check before any weight loads."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=10**6))
    loaded = []
    import posttrain.models.loading as models

    monkeypatch.setattr(models, "load_base", lambda *a, **k: loaded.append(a))
    texts = [(e.history, e.question, e.answer) for e in load_split(prepared, "study_train")]
    with pytest.raises(
        BatchTooLargeError, match=r"sft\.common\.batch_size 4 \(4 sequences of up to \d+ tokens\)"
    ):
        check_training_memory(
            base_dir,
            texts,
            section="sft.common",
            batch_size=4,
            sequences_per_row=1,
            target_regex=LLAVA_15.lora_regex(LINEAR),
            rank=4,
            quantized=False,
            checkpointing=False,
            liger=False,
        )
    assert loaded == []


def _conversations(prepared) -> list:
    from posttrain.data.examples import group_conversations

    return [(c.turns[:-1], *c.turns[-1]) for c in group_conversations(load_split(prepared, "study_train"))]


def _check(base_dir, sequences, batch_size, sequences_per_row=1, section="sft.common", effective_batch=None):
    return check_training_memory(
        base_dir,
        sequences,
        section=section,
        batch_size=batch_size,
        sequences_per_row=sequences_per_row,
        target_regex=LLAVA_15.lora_regex(LINEAR),
        rank=4,
        quantized=False,
        checkpointing=False,
        liger=False,
        effective_batch=effective_batch,
    )


def test_a_batch_larger_than_the_data_is_clipped_and_said_on_the_cpu(base_dir, prepared, monkeypatch, capsys):
    """HF Trainer's DataLoader hands out one short batch of every row: say so instead of staying silent."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = _conversations(prepared)
    _check(base_dir, rows, batch_size=10**6)
    out = capsys.readouterr().out
    assert f"sft.common.batch_size 1000000 is more than the {len(rows)} conversations to train on" in out
    assert f"every batch holds all {len(rows)}" in out
    pairs = rows[:5] * 2  # chosen and rejected of 5 pairs
    _check(base_dir, pairs, batch_size=6, sequences_per_row=2, section="dpo")
    assert "dpo.batch_size 6 is more than the 5 preference pairs to train on" in capsys.readouterr().out
    _check(base_dir, rows, batch_size=len(rows))
    assert capsys.readouterr().out == ""


def test_on_cuda_the_estimate_counts_the_rows_a_batch_can_hold(base_dir, prepared, monkeypatch, capsys):
    """Batch 10⁶ over a few dozen conversations is a batch of those conversations: it fits a 1 GB card."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=10**9))
    _check(base_dir, _conversations(prepared), batch_size=10**6)
    assert "step memory" in capsys.readouterr().out


@pytest.mark.parametrize(
    "effective, largest_fitting, chosen",
    [
        (12, 7, 6),  # divisors 12, 6, 4, 3, 2, 1: 6 is the largest at most 7
        (16, 16, 16),
        (16, 15, 8),
        (12, 4, 4),
        (7, 6, 1),  # a prime: 1 × accumulation 7
    ],
)
def test_choose_micro_batch_is_the_largest_divisor_that_fits(effective, largest_fitting, chosen):
    assert choose_micro_batch(effective, lambda d: d <= largest_fitting) == chosen


def test_choose_micro_batch_asks_only_down_to_the_first_fit_and_names_the_knobs_when_none_fits():
    asked = []
    assert choose_micro_batch(12, lambda d: asked.append(d) or d <= 5) == 4
    assert asked == [12, 6, 4]  # divisors only, largest first
    with pytest.raises(BatchTooLargeError) as e:
        choose_micro_batch(12, lambda d: False, section="dpo")
    msg = str(e.value)
    assert msg.startswith("dpo.batch_size auto: not even a micro-batch of 1 fits (effective_batch 12)")
    assert "dpo.gradient_checkpointing: true" in msg and "sft.common.quantization: nf4" in msg
    with pytest.raises(BatchTooLargeError) as e:
        choose_micro_batch(12, lambda d: False, checkpointing=True)
    assert "gradient_checkpointing" not in str(e.value) and "larger GPU" in str(e.value)


def _auto(base_dir, sequences, effective, sequences_per_row=1, section="sft.common"):
    return _check(base_dir, sequences, BatchSize.AUTO, sequences_per_row, section, effective_batch=effective)


@pytest.fixture()
def card_of_40_gb(monkeypatch):
    """CUDA faked: a 40 GB card (budget 38 GB), and a step of 10 GB fixed plus 5 GB per sequence."""
    from types import SimpleNamespace

    import posttrain.models.memory as memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=40 * GB))
    asked = []

    def estimate(config, *, sequences, **kwargs):
        asked.append(sequences)
        return MemoryEstimate(weights=9.0 * GB, adapter=0.4 * GB, activations=sequences * 5 * GB)

    monkeypatch.setattr(memory, "estimate_training", estimate)
    return asked


def test_auto_on_cuda_picks_the_largest_divisor_whose_step_fits(base_dir, prepared, card_of_40_gb, capsys):
    """(38 - 10) // 5 = 5 conversations fit, so 12 runs as 4 × 3; a DPO pair is 10 GB: 2 fit, 16 = 2 × 8."""
    rows = _conversations(prepared)
    assert len(rows) >= 16
    assert _auto(base_dir, rows, 12) == (4, 3)
    out = capsys.readouterr().out
    assert out.startswith(
        "sft.common.batch_size auto: 4 × accumulation 3 = effective batch 12 (the largest divisor of 12 "
        "whose step fits: ~30.0 GB of 40.0 GB, sequences up to "
    )
    assert out.count("\n") == 1
    assert _auto(base_dir, rows[:32], 16, sequences_per_row=2, section="dpo") == (2, 8)
    assert "dpo.batch_size auto: 2 × accumulation 8 = effective batch 16" in capsys.readouterr().out
    assert card_of_40_gb == [1, 1]  # one estimate per call (the activations scale with the rows)


def test_auto_on_cuda_fails_with_the_knobs_when_one_row_cannot_fit(base_dir, prepared, monkeypatch):
    from types import SimpleNamespace

    import posttrain.models.memory as memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=12 * GB))
    monkeypatch.setattr(
        memory,
        "estimate_training",
        lambda config, *, sequences, **k: MemoryEstimate(9.0 * GB, 0.4 * GB, sequences * 5 * GB),
    )
    with pytest.raises(BatchTooLargeError) as e:
        _auto(base_dir, _conversations(prepared), 12)
    msg = str(e.value)
    assert "sft.common.batch_size auto: not even a micro-batch of 1 fits (effective_batch 12)" in msg
    assert "sft.common.gradient_checkpointing: true" in msg
    assert "One row (1 sequence(s) of up to" in msg and "needs ~15.0 GB" in msg and "12.0 GB" in msg
    assert msg.endswith("Nothing was loaded.")


def test_auto_on_the_cpu_takes_the_effective_batch_within_the_rows(base_dir, prepared, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = _conversations(prepared)
    assert _auto(base_dir, rows, 12) == (12, 1)
    assert capsys.readouterr().out == (
        "sft.common.batch_size auto: 12 × accumulation 1 = effective batch 12 (on the CPU there is no GPU "
        "memory to size it against: the whole effective batch)\n"
    )
    # 5 pairs: a micro-batch above them holds just them, so 16 runs as 4 × 4 and says why
    pairs = rows[:5] * 2
    assert _auto(base_dir, pairs, 16, sequences_per_row=2, section="dpo") == (4, 4)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dpo.effective_batch 16 is more than the 5 preference pairs to train on")
    assert out[1] == (
        "dpo.batch_size auto: 4 × accumulation 4 = effective batch 16 (on the CPU: the largest divisor of 16 "
        "within the 5 preference pairs)"
    )


def test_an_integer_batch_runs_as_given(base_dir, prepared, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = _conversations(prepared)
    got = check_training_memory(
        base_dir,
        rows,
        section="sft.common",
        batch_size=10**6,
        sequences_per_row=1,
        target_regex=LLAVA_15.lora_regex(LINEAR),
        rank=4,
        quantized=False,
        checkpointing=False,
        liger=False,
        gradient_accumulation=3,
    )
    assert got == (10**6, 3)  # clipped by the DataLoader, not here: the Trainer gets what params.yaml says
