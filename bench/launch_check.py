"""Does the launcher change anything? The study preset end to end three times on this machine, compared.

    python bench/launch_check.py /tmp/check [--shrink] [--out bench/results/launch_check_<card>.json]

Runs `python -m posttrain e2e` (every stage of configs/study.yaml on stand-ins of the hub files) as
`dvc.yaml` does, through `python -m posttrain.launch` with ``launch.processes: 1``; then with every stage
started as plain ``python stages/<stage>.py`` (``--direct``); then through the launcher again, which shows
what differs between two identical runs on this machine (GPU kernels need not be deterministic). Compares
the per-item evaluation rows, the preference pairs, the adapters' weights and every metric.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("data/eval/**/*.jsonl", "data/preferences/*.jsonl", "models/**/adapter_model.safetensors")


def digests(work: Path) -> dict[str, str]:
    files = sorted({p for pattern in COMPARED for p in work.glob(pattern)})
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in files}


def metric_values(work: Path) -> dict[str, float]:
    """Every number of every model's metrics file, as ``<model>.<key>``."""
    values = {}
    for path in sorted((work / "metrics").glob("*.json")):
        data = json.loads(path.read_text())
        for k, v in data.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values[f"{path.stem}.{k}"] = v
    return values


def compare(a: Path, b: Path) -> dict:
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


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--shrink", action="store_true", help="2-layer towers (e2e --shrink)")
    ap.add_argument(
        "--out", type=Path, help="the JSON result (default bench/results/launch_check_<card>.json)"
    )
    args = ap.parse_args()
    runs = {"launcher": [], "direct": ["--direct"], "launcher_again": []}
    for name, extra in runs.items():
        work = args.workdir / name
        cmd = [
            sys.executable,
            "-m",
            "posttrain",
            "e2e",
            str(work),
            *(["--shrink"] if args.shrink else []),
            *extra,
        ]
        print(f"[launch_check] {name}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    w = {name: args.workdir / name for name in runs}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    result = {
        "device": device,
        "cpu": cpu,
        "torch": torch.__version__,
        "shrunk": args.shrink,
        "launcher_vs_direct": compare(w["launcher"], w["direct"]),
        "launcher_vs_launcher_again": compare(w["launcher"], w["launcher_again"]),
    }
    card = device.replace("NVIDIA ", "").lower().replace(" ", "_")
    out = args.out or ROOT / "bench" / "results" / f"launch_check_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
