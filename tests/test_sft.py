"""SFT: LoRA on the language model only, base frozen, QLoRA refused without CUDA, killed runs resume."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_stage
from peft import LoraConfig, get_peft_model

from posttrain.core.config import Quantization
from posttrain.core.errors import InputError
from posttrain.data.examples import load_split
from posttrain.models.family import LLAVA_15
from posttrain.models.loading import quantization_config
from posttrain.models.template import answer_start
from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset
from posttrain.train.trainer import answer_loss, run_trainer, training_arguments


def test_lora_adapts_the_language_model_only_and_base_stays_frozen(tiny, prepared, tmp_path):
    model, processor = tiny
    model = copy.deepcopy(model)
    regex = LLAVA_15.lora_regex(("q_proj", "v_proj", "up_proj"))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=regex))
    adapted = [n for n, m in peft.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all("language_model" in n for n in adapted)
    assert any("q_proj" in n for n in adapted) and not any("k_proj" in n for n in adapted)
    frozen_before = {n: p.clone() for n, p in peft.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.clone() for n, p in peft.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable_before)
    with torch.no_grad():  # B starts at zero: make the gradient reach A too
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    ds = TeacherForcedDataset(load_split(prepared, "study_train")[:16], prepared, processor)
    args = training_arguments(
        tmp_path / "ck",
        max_steps=2,
        batch_size=8,
        learning_rate=1e-2,
        warmup_steps=0,
        weight_decay=0.0,
        seed=0,
        save_steps=0,
    )
    run_trainer(peft, args, ds, TeacherForcedCollator(processor.tokenizer.pad_token_id), [])
    params = dict(peft.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen_before.items()), "the base must not change"
    assert sum(not torch.equal(params[n], p) for n, p in trainable_before.items()) == len(trainable_before)


def test_answer_start_is_the_first_position_whose_next_token_is_supervised():
    labels = torch.tensor([[-100, -100, -100, 6, -100, -100], [-100, -100, 4, -100, -100, 9]])
    # row 0 supervises token 3 (predicted at 2), row 1 tokens 2 and 5 (predicted at 1 and 4)
    assert answer_start(labels) == 1
    assert answer_start(torch.full((2, 5), -100)) == 4  # nothing supervised: only the last position


def test_answer_loss_equals_the_full_logits_loss_and_its_gradients(tiny, prepared):
    """The loss on the answer positions only is transformers' own loss over all T positions: same value,
    same LoRA gradients (fp32 on the CPU: equal to rounding), while the head runs on K < T positions."""
    model, processor = tiny
    peft = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=LLAVA_15.lora_regex(("q_proj",)))
    )
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ds = TeacherForcedDataset(load_split(prepared, "study_train")[:6], prepared, processor)
    batch = TeacherForcedCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    assert batch["answer_start"] == answer_start(batch["labels"]) > 0
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_start")}

    def grads(loss):
        peft.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}

    full = peft(**inputs, labels=batch["labels"])
    full_grads = grads(full.loss)
    sliced, outputs = answer_loss(peft, inputs, batch["labels"])
    sliced_grads = grads(sliced)
    t = batch["input_ids"].shape[1]
    assert outputs.logits.shape[1] < t / 2, "the head must not run on every position"
    assert sliced.item() == pytest.approx(full.loss.item(), rel=1e-6)
    for n, g in full_grads.items():
        torch.testing.assert_close(sliced_grads[n], g, rtol=1e-5, atol=1e-7)
    # the check can fail: a loss over other positions differs
    shifted, _ = answer_loss(peft, inputs, torch.roll(batch["labels"], 1, dims=1))
    assert abs(shifted.item() - full.loss.item()) > 1e-3


def test_nf4_without_cuda_fails_before_loading():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="nf4.*needs a CUDA GPU.*quantization: none"):
        quantization_config(Quantization.NF4, LLAVA_15)
    assert quantization_config(Quantization.NONE, LLAVA_15) is None


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_params_file):
    import yaml

    root = tmp_path_factory.mktemp("sftproject")
    params = yaml.safe_load(micro_params_file.read_text())
    params["sft"]["common"].update(max_steps=40, save_steps=4, batch_size=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage("prepare.py", cwd=root)
    run_stage("base.py", cwd=root)
    return root


def test_killed_sft_resumes_from_its_checkpoint(project):
    """Kill a real run after its first checkpoint; the rerun resumes there and finishes the same steps."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "stages/sft.py"), "--variant", "sft2"]
    proc = subprocess.Popen(
        cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    ckpts = project / "checkpoints/sft2"
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckpts.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "models/sft/sft2").exists(), "a killed run must leave no adapter for DVC to cache"
    done = max(
        int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if (p / "trainer_state.json").exists()
    )
    assert 0 < done < 40

    out = run_stage("sft.py", "--variant", "sft2", cwd=project)
    assert "resuming from" in out
    prov = json.loads((project / "models/sft/sft2/provenance.json").read_text())
    assert prov["training"]["steps"] == 40
    assert "resumed_from" not in prov["training"], "outputs hold nothing that differs between identical runs"
    assert json.loads((project / "logs/sft2.json").read_text())["resumed_from"].endswith(f"checkpoint-{done}")
    assert (project / "models/sft/sft2/adapter_model.safetensors").exists()
    assert not ckpts.exists()
    shutil.rmtree(project / "models/sft/sft2")


def test_liger_without_cuda_fails_before_loading():
    from posttrain.train.liger import require_liger

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="liger is true.*CUDA GPU.*liger: false"):
        require_liger()


def test_sft_with_batch_size_auto_trains_with_the_resolved_batch_and_records_it(
    base_dir, prepared, tmp_path, monkeypatch, capsys
):
    """On the CPU auto takes the whole effective batch: Trainer, fingerprint and provenance all say 6 × 1."""
    import posttrain.train.sft as sft
    from posttrain.core.config import parse_params

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    arguments = []
    real = sft.training_arguments

    def recorded(*args, **kwargs):
        arguments.append(real(*args, **kwargs))
        return arguments[-1]

    monkeypatch.setattr(sft, "training_arguments", recorded)
    p = parse_params(
        {
            "sft": {
                "common": {
                    "batch_size": "auto",
                    "effective_batch": 6,
                    "rank": 4,
                    "max_steps": 2,
                    "warmup_steps": 0,
                    "save_steps": 0,
                }
            }
        }
    )
    out, ck = tmp_path / "sft1", tmp_path / "ck"
    sft.train_sft_variant("sft1", p.sft.common, p.sft.variants["sft1"], 0, base_dir, prepared, out, ck, None)
    printed = capsys.readouterr().out
    assert "sft.common.batch_size auto: 6 × accumulation 1 = effective batch 6 (on the CPU" in printed
    assert "2 steps × batch 6 × accumulation 1 = " in printed
    (args,) = arguments
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (6, 1)
    batch = {"micro_batch": 6, "gradient_accumulation": 1}
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["training"]["batch"] == batch and prov["training"]["steps"] == 2
    assert (
        prov["params"]["common"]["batch_size"] == "auto" and prov["params"]["common"]["effective_batch"] == 6
    )
    assert json.loads((ck / "fingerprint.json").read_text())["batch"] == batch

    # the same params on a card where auto picked 3 × 2: its checkpoints are not resumed
    fingerprint = json.loads((ck / "fingerprint.json").read_text())
    (ck / "fingerprint.json").write_text(
        json.dumps({**fingerprint, "batch": {"micro_batch": 3, "gradient_accumulation": 2}})
    )
    (ck / "checkpoint-1").mkdir()
    shutil.rmtree(out)
    sft.train_sft_variant("sft1", p.sft.common, p.sft.variants["sft1"], 0, base_dir, prepared, out, ck, None)
    assert "left by a run with other inputs (its batch changed); starting over" in capsys.readouterr().out


def test_a_run_shorter_than_the_log_interval_records_its_final_loss(base_dir, prepared, tmp_path, capsys):
    """The GPU e2e's 2-step SFT printed "final loss nan": the loss was logged every 10 steps and a 2-step run
    never logged one, which read as a diverged run. The last step is now always logged."""
    import math

    from posttrain.core.config import parse_params
    from posttrain.train.sft import train_sft_variant

    common = {"rank": 4, "max_steps": 3, "warmup_steps": 0, "save_steps": 0, "batch_size": 4}
    p = parse_params({"sft": {"common": common}})
    out = tmp_path / "sft1"
    train_sft_variant(
        "sft1", p.sft.common, p.sft.variants["sft1"], 0, base_dir, prepared, out, tmp_path / "ck", None
    )
    final = json.loads((out / "provenance.json").read_text())["training"]["final_loss"]
    assert math.isfinite(final) and final > 0
    assert "final loss nan" not in capsys.readouterr().out


def test_replay_mixes_whole_pretrain_conversations_at_the_asked_share(prepared):
    """`sft.common.replay_fraction` draws whole pretrain conversations, seeded, so they are that share of
    the SFT conversations; 0 draws none; a share the pool cannot fill names the key."""
    from posttrain.data.examples import group_conversations, load_split
    from posttrain.train.sft import replay_examples

    study = load_split(prepared, "study_train")
    pretrain = load_split(prepared, "pretrain_train")
    n_study = len(group_conversations(study))
    assert replay_examples(prepared, study, 0.0, 0) == []
    replay = replay_examples(prepared, study, 0.25, 0)
    conversations = group_conversations(replay)
    assert len(conversations) == round(n_study / 3)  # 1/4 of study + replay
    assert {e.id for e in replay} <= {e.id for e in pretrain}
    for c in conversations:  # every turn of a chosen conversation comes with it
        assert len(c.turns) == sum(e.conversation == c.id for e in pretrain)
    assert replay_examples(prepared, study, 0.25, 0) == replay
    assert {e.conversation for e in replay_examples(prepared, study, 0.25, 1)} != {
        e.conversation for e in replay
    }
    n_pool = len(group_conversations(pretrain))
    too_much = n_pool / (n_pool + n_study) + 0.05
    with pytest.raises(InputError, match=r"sft.common.replay_fraction .* pretrain pool has \d+"):
        replay_examples(prepared, study, too_much, 0)


def test_replay_fraction_is_validated():
    from posttrain.core.config import ParamsError, parse_params

    with pytest.raises(ParamsError, match=r"sft.common.replay_fraction: 0.95 is not in \[0, 0.9\]"):
        parse_params({"sft": {"common": {"replay_fraction": 0.95}}})
    with pytest.raises(ParamsError, match=r"sft.common.replay_fraction: -0.1 is not in"):
        parse_params({"sft": {"common": {"replay_fraction": -0.1}}})
    assert parse_params({"sft": {"common": {"replay_fraction": 0.3}}}).sft.common.replay_fraction == 0.3


def test_target_modules_the_model_lacks_are_refused_before_training(base_dir, prepared, tmp_path):
    """A layer name the language model lacks would adapt nothing: refused from the base's config (built on
    the meta device) before any data or weight loads, naming the layers that exist."""
    from posttrain.core.config import SftCommon, SftVariant
    from posttrain.train.sft import train_sft_variant

    common = SftCommon(target_modules=("q_proj", "nonexistent_proj"), max_steps=2, batch_size=4)
    out, checkpoints, live = tmp_path / "sft1", tmp_path / "checkpoints", tmp_path / "live"
    with pytest.raises(InputError) as e:
        train_sft_variant("sft1", common, SftVariant(), 0, base_dir, prepared, out, checkpoints, live)
    assert str(e.value) == (
        "sft.common.target_modules: 'nonexistent_proj' names no linear layer of the base's language model; "
        "name some of down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )
    assert not any(p.exists() for p in (out, checkpoints, live))
