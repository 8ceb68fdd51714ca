"""Wall-clock of the default pipeline from a fresh clone, and of a no-op `dvc repro`.

    python bench/pipeline.py [--json bench/results/cpu.json]

Clones the current commit into a temporary folder, runs `dvc repro` there with this interpreter's venv on
PATH, and prints the seconds each stage took (from DVC's own output), the total, and the seconds of a second
`dvc repro` that has nothing to do. Numbers are only meaningful on a quiet machine.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from posttrain.core.layout import model_dir

ROOT = Path(__file__).resolve().parents[1]


def run_timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, dict[str, float]]:
    """Run `cmd`, echoing its output; return total seconds and seconds per DVC stage."""
    stages: dict[str, float] = {}
    current, started = None, time.perf_counter()
    t0 = started
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                stages[current] = round(now - started, 1)
            current, started = line.split("'")[1], now
    if proc.wait():
        raise SystemExit(f"{' '.join(cmd)} failed")
    end = time.perf_counter()
    if current:
        stages[current] = round(end - started, 1)
    return round(end - t0, 1), stages


def training_speed(clone: Path) -> dict:
    """Steps, seconds and samples/s of every trained model: timings from logs/, batch from the provenance."""
    training = {}
    for log in sorted((clone / "logs").glob("*.json")):
        summary = json.loads(log.read_text())
        prov_path = model_dir(log.stem, clone / "models") / "provenance.json"
        if not summary.get("train_seconds") or not prov_path.exists():
            continue
        params = json.loads(prov_path.read_text()).get("params", {})
        batch = (params.get("common") or params.get("train") or {}).get("batch_size")
        training[log.stem] = {
            "steps": summary["steps"],
            "train_seconds": summary["train_seconds"],
            "samples_per_s": round(summary["steps"] * batch / summary["train_seconds"], 1) if batch else None,
        }
    return training


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it (float results differ between instruction sets)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    avx512 = "AVX-512" if "avx512f" in fields.get("Flags", "") else "no AVX-512"
    return f"{name} ({avx512})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env["PYTHONPATH"] = str(clone / "src")  # the clone's code, not the editable install's
        total, stages = run_timed(["dvc", "repro", "--force"], clone, env)
        noop, _ = run_timed(["dvc", "repro"], clone, env)
        same = subprocess.run(
            ["git", "diff", "--stat", "--", "metrics/"], cwd=clone, capture_output=True, text=True
        )
        training = training_speed(clone)
    result = {
        "machine": (
            f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "fresh_clone_repro_seconds": total,
        "stage_seconds": stages,
        "noop_repro_seconds": noop,
        "sft_variants_seconds": round(sum(v for k, v in stages.items() if k.startswith("sft@")), 1),
        "training": training,
        "metrics_reproduced_exactly": same.stdout.strip() == "",
        "metrics_diff": same.stdout.strip(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
