"""Shared fixtures: a micro params file, prepared micro data and a tiny model, built once per session."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Invariance checks (`@pytest.mark.invariance`, tests/test_invariance.py) run only when a ``-m``
    expression names them (``-m invariance``): minutes each, they are not part of the suite."""
    if "invariance" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="an invariance check: opt in with -m invariance")
    for item in items:
        if "invariance" in item.keywords:
            item.add_marker(skip)


def micro_params() -> dict:
    """The shipped params.yaml shrunk to seconds of work (same keys, same code paths)."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = copy.deepcopy(p)
    p["base"]["train"].update(max_steps=12, save_steps=6, batch_size=8, warmup_steps=2)
    p["prepare"]["synthetic"].update(
        pretrain_images=36, pretrain_test_images=9, study_images=36, study_test_images=9
    )
    p["evaluate"].update(resamples=50, batch_size=16, max_new_tokens=12)
    p["report"].update(resamples=50, examples=4)
    # decisive: a 12-step base answers almost nothing right, so correct-over-wrong pairs would be too few
    p["preferences"].update(
        judge="reference", keep="decisive", min_pairs=1, max_new_tokens=8, temperature=1.5
    )
    p["dpo"].update(batch_size=4, epochs=1.0)
    return p


# a params file whose aliases of aliases expand to 9**6 mappings (billion laughs)
BILLION_LAUGHS = (
    "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}' if prev else '{seed: 0}'] * 9)}]\n"
        for prev, name in zip([None, "a", "b", "c", "d", "e"], "abcdef")
    )
    + "base: *f\n"
)


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def micro_params_file(tmp_path_factory) -> Path:
    return write_params(tmp_path_factory.mktemp("params") / "params.yaml", micro_params())


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, micro_params_file) -> Path:
    from posttrain.core.config import load_params
    from posttrain.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_data(load_params(micro_params_file).prepare, out)
    return out


@pytest.fixture(scope="session")
def tiny(prepared):
    """(model, processor) of a randomly initialised tiny LLaVA with a tokenizer trained on the micro data."""
    from posttrain.core.config import load_params
    from posttrain.data.examples import load_split
    from posttrain.models.loading import build_tiny_llava, train_tokenizer
    from posttrain.models.template import conversation_text

    params = load_params(ROOT / "params.yaml").base
    examples = load_split(prepared, "pretrain_train") + load_split(prepared, "study_train")
    tok = train_tokenizer([conversation_text(e.history, e.question, e.answer) for e in examples], 400)
    model, processor = build_tiny_llava(tok, params.tiny, seed=0)
    return model.eval(), processor


@pytest.fixture(scope="session")
def base_dir(tiny, tmp_path_factory):
    """The tiny model saved as the `base` stage saves it."""
    from posttrain.models.loading import write_provenance

    model, processor = tiny
    out = tmp_path_factory.mktemp("models") / "base"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_provenance(out, kind="local")
    return out


LM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture()
def models(base_dir, tmp_path):
    """A fresh ``models/`` folder holding a copy of the tiny base, for adapters a test writes beside it."""
    import shutil

    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(base_dir, root / "base")
    return root


def make_adapter(
    base_dir: Path,
    out: Path,
    alpha: float,
    rank: int = 16,
    seed: int = 0,
    fingerprint=None,
    scale: float | None = 0.05,
    base_quantization: str = "none",
    dropout: float = 0.1,
) -> Path:
    """A LoRA adapter with random non-zero A and B (as if trained), saved with provenance.

    ``scale=None`` keeps PEFT's fresh initialisation (B = 0: the adapter starts as the base model).
    """
    from peft import LoraConfig, get_peft_model

    from posttrain.models.family import LLAVA_15
    from posttrain.models.loading import base_fingerprint, load_base, write_provenance

    model, _, _ = load_base(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LLAVA_15.lora_regex(LM_MODULES)
    )
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name and scale is not None:
                p.copy_(torch.randn_like(p) * scale)
    peft.save_pretrained(out)
    write_provenance(
        out,
        kind="adapter",
        base_fingerprint=fingerprint or base_fingerprint(base_dir),
        base_quantization=base_quantization,
    )
    return out


def run_stage(script: str, *args: str, cwd: Path = ROOT) -> str:
    """Run a stage script as DVC would, returning its output; fail the test with the output on error."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if proc.returncode:
        pytest.fail(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def kill_after_first_checkpoint(
    cwd: Path, script: str, *args: str, checkpoints: Path, launcher: bool = False, env: dict | None = None
) -> int:
    """Start a stage script (through `posttrain.launch` if `launcher`), SIGKILL its process group once it
    has a complete checkpoint in `checkpoints`; the checkpoint's step."""
    import signal
    import subprocess
    import time

    from posttrain.train.checkpoints import newest_checkpoint

    env = env or {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
    prefix = [sys.executable, "-m", "posttrain.launch"] if launcher else [sys.executable]
    proc = subprocess.Popen(
        [*prefix, str(ROOT / "stages" / script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and newest_checkpoint(checkpoints) is None:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = newest_checkpoint(checkpoints)
    assert step is not None, "no checkpoint before the deadline"
    return int(step.name.split("-")[1])
