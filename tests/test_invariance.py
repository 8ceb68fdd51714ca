"""Invariance checks, opt in (minutes each; `-m invariance`): what must not change the bits does not.

    .venv/bin/python -m pytest -q -m invariance tests/test_invariance.py -s
    POSTTRAIN_INVARIANCE_OUT=docs/results .venv/bin/python -m pytest -q -m invariance tests/test_invariance.py

- The launcher (`python -m posttrain.launch`, ``launch.processes: 1``) changes nothing: the study preset end
  to end on stand-ins (`python -m posttrain e2e --shrink`; unshrunk with ``POSTTRAIN_INVARIANCE_FULL=1``, a
  GPU's work) through the launcher, as plain ``python stages/<stage>.py`` (``--direct``) and through the
  launcher again. What differs between the two launcher runs is this machine's own run-to-run noise (GPU
  kernels need not be deterministic); the direct run may differ from the first in nothing more.
- The CPU float paths are pinned (`posttrain.core.runtime.CPU_NUMERICS`): the tiny base trained in fresh
  processes gives the same weights twice, and with ``POSTTRAIN_CPU_NUMERICS=native`` the same again where
  torch picks AVX2 by itself. Its figures (CPU, capability, seconds, weights' SHA-256) are the ones to compare
  across machines: give another machine's JSON as ``POSTTRAIN_CPU_REPRO_REFERENCE`` to require its hashes.

Each writes its figures as JSON (``launch_check_<card>.json``, ``cpu_repro_<host>.json``) to
``POSTTRAIN_INVARIANCE_OUT`` (default: the test's temporary folder) and prints them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.invariance

COMPARED = ("data/eval/**/*.jsonl", "data/preferences/*.jsonl", "models/**/adapter_model.safetensors")
PINNED_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def out_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("POSTTRAIN_INVARIANCE_OUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def cpu_model() -> str:
    """The CPU's model name and whether it has AVX-512, from lscpu."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    isa = "AVX-512" if "avx512f" in fields.get("Flags", "") else "no AVX-512"
    return f"{fields.get('Model name', platform.processor()).strip()} ({isa})"


def digests(work: Path) -> dict[str, str]:
    files = sorted({p for pattern in COMPARED for p in work.glob(pattern)})
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in files}


def metric_values(work: Path) -> dict[str, float]:
    """Every number of every model's metrics file, as ``<model>.<key>``."""
    values = {}
    for path in sorted((work / "metrics").glob("*.json")):
        for k, v in json.loads(path.read_text()).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values[f"{path.stem}.{k}"] = v
    return values


def compare(a: Path, b: Path) -> dict:
    """Two e2e workdirs: the per-item rows, pairs and adapters that differ, and the metrics that moved."""
    da, db = digests(a), digests(b)
    ma, mb = metric_values(a), metric_values(b)
    differing = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    moved = {k: [ma.get(k), mb.get(k)] for k in sorted(ma.keys() | mb.keys()) if ma.get(k) != mb.get(k)}
    return {
        "files_compared": len(da),
        "files_differing": differing,
        "metrics_compared": len(ma),
        "metrics_differing": moved,
        "identical": not differing and not moved and len(da) > 0 and len(ma) > 0,
    }


def test_the_launcher_with_one_process_changes_nothing(tmp_path):
    import torch

    full = os.environ.get("POSTTRAIN_INVARIANCE_FULL") == "1"
    runs = {"launcher": [], "direct": ["--direct"], "launcher_again": []}
    shrink = [] if full else ["--shrink"]
    for name, extra in runs.items():
        cmd = [sys.executable, "-m", "posttrain", "e2e", str(tmp_path / name), *shrink]
        proc = subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "device": device,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "shrunk": not full,
        "launcher_vs_direct": compare(tmp_path / "launcher", tmp_path / "direct"),
        "launcher_vs_launcher_again": compare(tmp_path / "launcher", tmp_path / "launcher_again"),
    }
    card = device.replace("NVIDIA ", "").lower().replace(" ", "_")
    (out_dir(tmp_path) / f"launch_check_{card}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    direct, again = result["launcher_vs_direct"], result["launcher_vs_launcher_again"]
    assert direct["files_compared"] > 0 and direct["metrics_compared"] > 0
    assert set(direct["files_differing"]) <= set(again["files_differing"]), "the launcher changed files"
    assert set(direct["metrics_differing"]) <= set(again["metrics_differing"]), "the launcher moved metrics"


# Trains the embedded default's tiny base (params.yaml's `base`, STEPS steps) on DATA in this fresh process,
# with the numerics the environment asks for; prints one JSON line.
CHILD = """\
import dataclasses, hashlib, json, os, sys, tempfile, time
from pathlib import Path
from posttrain.core.config import load_params
from posttrain.core.runtime import setup
steps, threads, data = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
setup(threads)
import torch
from posttrain.train.base import train_tiny_base
base = load_params("params.yaml").base
params = dataclasses.replace(base, train=dataclasses.replace(base.train, max_steps=steps, save_steps=0))
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    summary = train_tiny_base(params, Path(data), Path(tmp) / "base", Path(tmp) / "ck", None)
    seconds = time.perf_counter() - t0
    weights = hashlib.sha256((Path(tmp) / "base/model.safetensors").read_bytes()).hexdigest()
env = {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "env": env,
                  "train_seconds": round(seconds, 1), "final_loss": summary["final_loss"],
                  "weights_sha256": weights}))
"""


def test_the_pinned_cpu_numerics_give_the_same_weights(tmp_path):
    """``data/prepared`` (`dvc repro prepare`) if there, as measured in docs/reproducibility.md; otherwise
    micro data prepared here (then the hashes compare only with runs on the same micro data)."""
    steps = int(os.environ.get("POSTTRAIN_INVARIANCE_STEPS", "100"))
    threads = 2
    data = ROOT / "data" / "prepared"
    if not data.is_dir() or not any(data.iterdir()):
        from conftest import micro_params, write_params

        from posttrain.core.config import load_params
        from posttrain.data.prepare import prepare_data

        data = tmp_path / "prepared"
        prepare_data(load_params(write_params(tmp_path / "micro.yaml", micro_params())).prepare, data)

    def train(native: bool) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV}
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, also on a GPU machine
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
        if native:
            env["POSTTRAIN_CPU_NUMERICS"] = "native"
        cmd = [sys.executable, "-c", CHILD, str(steps), str(threads), str(data)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    import torch

    result = {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__}
    result.update(steps=steps, threads=threads, data=str(data))
    result.update(pinned=train(False), pinned_again=train(False), native=train(True))
    host = platform.node() or "host"
    (out_dir(tmp_path) / f"cpu_repro_{host}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    pinned = result["pinned"]["weights_sha256"]
    assert result["pinned_again"]["weights_sha256"] == pinned, "two pinned runs on one machine differ"
    if result["native"]["capability"] == "AVX2":  # torch's own choice is the pinned one
        assert result["native"]["weights_sha256"] == pinned
    reference = os.environ.get("POSTTRAIN_CPU_REPRO_REFERENCE")
    if reference:
        other = json.loads(Path(reference).read_text())
        same = {k: other.get(k) == result[k] for k in ("steps", "threads", "torch")}
        assert all(same.values()), f"{reference} is of another setting: {same}"
        assert other["pinned"]["weights_sha256"] == pinned, f"pinned weights differ from {other['cpu']}'s"
