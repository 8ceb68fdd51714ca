"""One launcher for every stage (`posttrain.launch`): `launch.processes` read when the stage runs; the
generation stages shard their prompts over the processes and give the same outputs as one process."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, kill_after_first_checkpoint, make_adapter, run_stage

from posttrain.launch import SHARDED, command, params_path


def test_one_process_runs_the_script_itself_and_several_go_through_torchrun():
    assert command("stages/evaluate.py", ["--model", "base"], 1) == [
        sys.executable,
        "stages/evaluate.py",
        "--model",
        "base",
    ]
    several = command("stages/evaluate.py", ["--model", "base"], 2)
    assert several[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert several[5:] == ["stages/evaluate.py", "--model", "base"]
    assert command("stages/report.py", [], 4) == [sys.executable, "stages/report.py"]  # not sharded
    assert SHARDED == {"base.py", "sft.py", "dpo.py", "evaluate.py", "preferences.py"}


def test_the_params_file_is_the_stages_own():
    assert params_path(["--model", "base"]) == "params.yaml"
    assert params_path(["--params", "x.yaml", "--model", "base"]) == "x.yaml"
    assert params_path(["--params=y.yaml"]) == "y.yaml"


def test_no_stage_depends_on_launch_and_every_command_goes_through_the_launcher():
    """Changing launch.processes must rerun nothing: it is in no stage's params and no command's text."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("python -m posttrain.launch stages/"), name
        assert "launch" not in body["cmd"].split("posttrain.launch", 1)[1], name
        for entry in body.get("params", []):
            keys = entry if isinstance(entry, str) else " ".join(str(v) for v in entry.values())
            assert "launch" not in str(keys), name


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def launch(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.launch", str(ROOT / "stages" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    if proc.returncode:
        pytest.fail(f"launch {script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, micro_params_file):
    root = tmp_path_factory.mktemp("launch")
    shutil.copy(micro_params_file, root / "params.yaml")
    run_stage("prepare.py", cwd=root)
    run_stage("base.py", cwd=root)
    # no dropout: its draws differ per process, which would be the DPO comparison's noise
    make_adapter(root / "models" / "base", root / "models" / "sfte", alpha=16.0, dropout=0.0)
    return root


def set_processes(root: Path, n: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["launch"] = {"processes": n}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def outputs(root: Path) -> dict[str, bytes]:
    files = [*(root / "data" / "eval").rglob("*.json*"), *(root / "data" / "preferences").rglob("*.jsonl")]
    files += [root / "metrics" / "base.json", root / "metrics" / "preferences.json"]
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


def test_two_processes_give_the_outputs_of_one(project):
    """Evaluation (greedy) and preference sampling (seeded per batch) under 2 gloo processes write the same
    bytes as one process: batch k goes to process k mod 2, results are gathered in order, one writes."""
    set_processes(project, 1)
    launch("evaluate.py", "--model", "base", cwd=project)
    launch("preferences.py", cwd=project)
    one = outputs(project)
    assert any("study_test" in k for k in one) and any("pairs" in k for k in one)
    for folder in ("data/eval", "data/preferences"):
        shutil.rmtree(project / folder)
    set_processes(project, 2)
    log = launch("evaluate.py", "--model", "base", cwd=project)
    log += launch("preferences.py", cwd=project)
    assert "generated" in log and " here" in log, "the work must have been split"
    assert outputs(project) == one


ECHO = """import json, os, sys
from pathlib import Path
Path(sys.argv[0]).with_name(f"argv{os.environ.get('RANK', '-')}.json").write_text(json.dumps(sys.argv[1:]))
"""


def test_torchrun_never_parses_the_stage_arguments(tmp_path, micro_params_file):
    """Under N processes every worker gets the stage's arguments as given, even those that look like
    abbreviations of torchrun's own options (``--logs`` of ``--logs-specs``) or are its options by name."""
    shutil.copy(micro_params_file, tmp_path / "params.yaml")
    set_processes(tmp_path, 2)
    script = tmp_path / "evaluate.py"  # a sharded stage's name
    script.write_text(ECHO)
    args = ["--logs", "logs/x", "--nproc_per_node", "3", "--standalone", "--", "-m", "--max", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.launch", str(script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    assert sorted(p.name for p in tmp_path.glob("argv*.json")) == ["argv0.json", "argv1.json"]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"argv{rank}.json").read_text()) == args


def test_a_failing_worker_fails_the_launch(tmp_path, micro_params_file):
    shutil.copy(micro_params_file, tmp_path / "params.yaml")
    set_processes(tmp_path, 2)
    script = tmp_path / "sft.py"
    script.write_text("import sys; sys.exit(3)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.launch", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "error: sft.py failed in 2 processes (rank 0 exit 3" in proc.stderr


def sft_params(root: Path, processes: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["launch"] = {"processes": processes}
    params["sft"]["common"].update(max_steps=6, batch_size=8, save_steps=0, warmup_steps=0)
    params["sft"]["variants"]["sft1"]["dropout"] = 0.0  # dropout draws differ per process: the test's noise
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_sft_in_two_processes_trains_the_adapter_of_one(project, tmp_path):
    """Data-parallel SFT (gloo, 2 processes of 4 rows) against one process of 8 rows, same 6 steps.

    Each step sees the same 8 conversations (the Trainer's sampler permutes once; process r takes every
    other micro-batch of 4 of that order) and the loss is divided by the supervised tokens of all 8, so the
    gradients agree up to float rounding (a sum over two processes; rows padded to their own process's
    longest). The weights do not agree to rounding: AdamW divides each gradient by its running size, so an
    entry whose gradient is near zero moves a full step in the direction rounding gives it (measured: up to
    30% of the largest lora_B entry). As models they agree: the test loss of the two adapters differs by
    less than 5% of what SFT moved it from the base (measured: 1.3%).
    """
    from posttrain.data.examples import load_split
    from posttrain.models.loading import load_model
    from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset
    from posttrain.train.trainer import answer_loss

    losses = {}
    for n in (1, 2):
        sft_params(project, n)
        shutil.rmtree(project / "models" / "sft" / "sft1", ignore_errors=True)
        log = launch("sft.py", "--variant", "sft1", cwd=project)
        assert "6 steps" in log
        models = tmp_path / f"models{n}"
        shutil.copytree(project / "models", models)
        for name in ("sft1", "base"):
            model, processor = load_model(name, models, "cpu")
            ds = TeacherForcedDataset(
                load_split(project / "data/prepared", "study_test"), project / "data/prepared", processor
            )
            batch = TeacherForcedCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_start")}
            with torch.no_grad():
                losses[name if name == "base" else n] = answer_loss(model, inputs, batch["labels"])[0].item()
    moved = abs(losses["base"] - losses[1])
    assert moved > 0.01, losses
    assert abs(losses[2] - losses[1]) < 0.05 * moved, losses


def curve(live: Path, name: str = "loss") -> list[tuple[int, float]]:
    with open(live / "plots" / "metrics" / f"{name}.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    return [(int(r[0]), float(r[1])) for r in rows]


def test_dpo_in_two_processes_takes_the_steps_of_one(project):
    """DPO (TRL's DDP, gloo) with 2 processes of 2 pairs against one process of 4, same pairs, same steps.

    Each step's logged loss is the mean over the processes of each one's mean over its pairs: with the same
    pairs per step it is one process's mean over the 4. The first step's is ln 2 in both (the policy is its
    reference); the next steps follow weights that AdamW moved from gradients summed in another order, so
    they may drift apart by rounding amplified as in SFT: every step's loss stays within 0.1% of one
    process's (measured: within 1e-6 over 13 steps), while the policy leaves its reference (some step's loss
    more than 0.02 from ln 2; another split of the pairs would give other losses). A last, partial batch
    (pairs not a multiple of 4) differs: accelerate pads it with pairs from the start so that every process
    has one (its `even_batches`), one process does not.
    """
    # pairs by hand: the micro base's samples mostly run to max_new_tokens, which are never pairs; 26 pairs
    # leave a short last batch in training and in the held-out rewards
    from posttrain.data.examples import load_split

    rows = [
        {
            "image": e.image,
            "prompt": e.question,
            "history": [list(t) for t in e.history],
            "chosen": e.answer,
            "rejected": "I do not know.",
        }
        for e in load_split(project / "data" / "prepared", "study_train")[:26]
    ]
    (project / "data" / "preferences").mkdir(parents=True, exist_ok=True)
    (project / "data" / "preferences" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics" / "preferences.json").write_text(json.dumps({"pairs_kept": len(rows)}))
    curves = {}
    for n in (1, 2):
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["launch"] = {"processes": n}
        params["dpo"].update(batch_size=4, gradient_accumulation=1, save_steps=0, warmup_steps=0)
        params["dpo"]["learning_rate"] = 0.001  # far enough from the start for the losses to move
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        live = project / f"dvclive{n}"
        log = launch("dpo.py", "--live", str(live), "--out", str(project / f"dpo{n}"), cwd=project)
        curves[n] = curve(live)
        assert (project / f"dpo{n}" / "adapter_model.safetensors").exists()
        assert not list(project.glob(".dpo*.tmp-*")), "only the main process writes, and renamed its folder"
    assert "one process" not in log, "DPO must have run in two processes"
    one, two = curves[1], curves[2]
    assert [s for s, _ in two] == [s for s, _ in one] and len(one) >= 4
    assert max(abs(a - one[0][1]) for _, a in one) > 0.02, "the policy must have left its reference"
    pairs = len((project / "data" / "preferences" / "pairs.jsonl").read_text().splitlines())
    if pairs % 4:  # a last, partial batch is padded under DDP with pairs repeated from the start
        one, two = one[:-1], two[:-1]
    off = [(step, a, b) for (step, a), (_, b) in zip(one, two) if abs(b - a) >= 1e-3 * a]
    assert not off, off
    # the held-out rewards count every held-out pair once under two processes too (no accelerate padding):
    # the same pairs, and a margin within the weights' rounding drift of one process's
    held = {
        n: json.loads((project / f"dpo{n}" / "provenance.json").read_text())["rounds"][-1]["training"][
            "heldout"
        ]
        for n in (1, 2)
    }
    assert held[1]["pairs"] == held[2]["pairs"] > 0
    assert held[2]["reward_margin"] == pytest.approx(held[1]["reward_margin"], rel=1e-2, abs=1e-4)
    assert abs(held[2]["reward_accuracy"] - held[1]["reward_accuracy"]) <= 1 / held[1]["pairs"] + 1e-9


def test_base_in_two_processes_trains_the_model_of_one(project):
    """The tiny base trained from scratch (all weights) by 2 processes of 4 rows against 1 of 8, 6 steps: the
    same first-step loss (same rows, same initialisation), and a test loss within 2% of what training moved
    it from the untrained model's (the rest is rounding amplified by AdamW, as in the SFT test)."""
    from posttrain.core.config import load_params
    from posttrain.models.loading import build_tiny_llava, load_base

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["train"].update(max_steps=6, batch_size=8, save_steps=1, warmup_steps=0)  # logs every step
    losses, first = {}, {}
    for n in (1, 2):
        params["launch"] = {"processes": n}
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        out, live = project / f"base{n}", project / f"dvclive_base{n}"
        ck = project / "ck"
        launch("base.py", "--out", str(out), "--live", str(live), "--checkpoints", str(ck), cwd=project)
        first[n] = curve_at(live, 1)
        model, processor, _ = load_base(out)
        losses[n] = pretrain_test_loss(model, processor, project)
    tiny = load_params(project / "params.yaml").base
    untrained, _ = build_tiny_llava(processor.tokenizer, tiny.tiny, tiny.seed)
    losses[0] = pretrain_test_loss(untrained, processor, project)
    assert abs(first[2] - first[1]) < 1e-4, first
    moved = abs(losses[0] - losses[1])
    print(f"untrained, 1, 2 processes: {losses}; off by {abs(losses[2] - losses[1]) / moved:.2%} of the move")
    assert moved > 0.1, losses
    assert abs(losses[2] - losses[1]) < 0.02 * moved, losses


def curve_at(live: Path, step: int) -> float:
    return dict(curve(live))[step]


def pretrain_test_loss(model, processor, root: Path) -> float:
    from posttrain.data.examples import load_split
    from posttrain.train.dataset import TeacherForcedCollator, TeacherForcedDataset
    from posttrain.train.trainer import answer_loss

    data = root / "data" / "prepared"
    ds = TeacherForcedDataset(load_split(data, "pretrain_test"), data, processor)
    batch = TeacherForcedCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_start")}
    with torch.no_grad():
        return answer_loss(model, inputs, batch["labels"])[0].item()


def running(marker: str) -> list[bytes]:
    """The ids of the processes whose command line contains `marker`."""
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout.split()


def test_sft_killed_under_two_processes_resumes_to_the_uninterrupted_result(project, tmp_path):
    """SIGKILL a 2-process SFT's torchrun after its first checkpoint: its workers die with it. Launched
    again, it resumes in both processes (each its own RNG state) and ends with the adapter and curves of an
    uninterrupted 2-process run, byte for byte."""

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["launch"] = {"processes": 2}
    params["sft"]["common"].update(max_steps=6, batch_size=8, save_steps=2, warmup_steps=0)
    params["sft"]["variants"]["sft3"]["dropout"] = 0.0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    runs = {}
    for kind in ("whole", "killed"):
        # the same paths for both runs: the adapter's config and provenance name the base's folder
        models, live, ckpts = tmp_path / "models", tmp_path / "live", tmp_path / "ck"
        for folder in (models, live, ckpts):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(project / "models" / "base", models / "base")
        args = ["--variant", "sft3", "--models", str(models), "--live", str(live)]
        args += ["--checkpoints", str(ckpts)]
        if kind == "killed":  # torchrun's group: its workers are in sessions of their own
            step = kill_after_first_checkpoint(
                project, "sft.py", *args, checkpoints=ckpts / "sft3", launcher=True, env=ENV
            )
            deadline = time.time() + 30
            while running(str(models)) and time.time() < deadline:
                time.sleep(0.1)
            assert not running(str(models)), "the workers must die with torchrun, or finish the run unseen"
            assert step < 6
            assert not (models / "sft" / "sft3").exists()
        log = launch("sft.py", *args, cwd=project)
        if kind == "killed":
            resumed = ckpts / "sft3" / f"checkpoint-{step}"
            assert f"resuming from {resumed}" in log and log.count("resumed") >= 2, log
        runs[kind] = {
            **{f"m/{p.name}": p.read_bytes() for p in (models / "sft" / "sft3").iterdir()},
            **{f"l/{p.name}": p.read_bytes() for p in (live / "sft" / "sft3").rglob("*.tsv")},
        }
        assert not (ckpts / "sft3").exists()
    assert runs["killed"] == runs["whole"]
