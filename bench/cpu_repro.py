"""Same code and params, same bits on another CPU? The tiny base trained with the float paths pinned and not.

    python bench/cpu_repro.py [--steps 100] [--threads 2] [--out bench/results/cpu_repro_<host>.json]

Trains the embedded default's tiny base (`params.yaml`'s `base` section, `data/prepared` from `dvc repro
prepare`) for `--steps` steps in a fresh process twice: with `posttrain.core.runtime.CPU_NUMERICS` (what every
stage runs with) and with `POSTTRAIN_CPU_NUMERICS=native` (the libraries pick the kernels for this CPU).
Prints the CPU, torch's chosen capability, the seconds, the last logged loss and the SHA-256 of the weights;
run it on two machines and compare the hashes.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(steps: int, threads: int, data: str) -> None:
    from posttrain.core.config import load_params
    from posttrain.core.runtime import setup

    setup(threads)
    import torch

    from posttrain.train.training import train_tiny_base

    base = load_params("params.yaml").base
    params = dataclasses.replace(base, train=dataclasses.replace(base.train, max_steps=steps, save_steps=0))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train_tiny_base(params, Path(data), Path(tmp) / "base", Path(tmp) / "ck", None)
        seconds = time.perf_counter() - t0
        weights = hashlib.sha256((Path(tmp) / "base/model.safetensors").read_bytes()).hexdigest()
    print(
        json.dumps(
            {
                "capability": torch.backends.cpu.get_cpu_capability(),
                "env": {
                    k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
                },
                "train_seconds": round(seconds, 1),
                "final_loss": summary["final_loss"],
                "weights_sha256": weights,
            }
        )
    )


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    isa = "AVX-512" if "avx512f" in flags else "no AVX-512"
    return f"{fields.get('Model name', platform.processor()).strip()} ({isa})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.steps, args.threads, args.data)
    result = {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "steps": args.steps,
        "threads": args.threads,
    }
    for mode in ("pinned", "native"):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
        }
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, also on a GPU machine
        if mode == "native":
            env["POSTTRAIN_CPU_NUMERICS"] = "native"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run([*cmd, "--data", args.data], env=env, capture_output=True, text=True, check=True)
        result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(mode, result[mode], flush=True)
    import torch

    result["torch"] = torch.__version__
    out = args.out or f"bench/results/cpu_repro_{platform.node() or 'host'}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
