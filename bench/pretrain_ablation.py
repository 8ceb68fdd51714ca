"""What the base learns decides what SFT can show: a setting of `prepare`/`base`, its base, SFT on it.

    python bench/pretrain_ablation.py --name captions -S prepare.synthetic.captions=true \
        [--variants sft1 sft2] [--base-threads 4] [--work /tmp/pretrain] [--json bench/results/pretrain.json]
    python bench/pretrain_ablation.py --collect /tmp/pretrain/captions --json ...   # rows of a finished run
    python bench/pretrain_ablation.py --rev seed1=<exp commit> --json ...     # rows of DVC experiments

The stage scripts run outside DVC into ``--work/<name>``: `prepare` and `base` (on ``--base-threads`` CPU
threads), then every variant's `sft` and `evaluate`, ``--jobs`` at a time (2 threads each: four fill 8 cores;
on 2 cores, ``--jobs 1 --base-threads 2``), then the base's evaluation. Several settings run side by side by
starting this script once per setting, as on the 16 cores of the lent GPU host
(`bench/results/pretrain_ablation.json`). One row per setting: the base's
training seconds and retention, and per model (base and each variant) each study family's accuracy with its
Wilson interval's lower end against the chance line, and how many families it beats (as `bench/calibrate.py`).
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from calibrate import family_cells, num, row, setting_params, stage, stage_env  # noqa: E402
from pipeline import cpu_model  # noqa: E402

from posttrain.experiments.grid import parse_settings  # noqa: E402

SFT_THREADS = 2


def write_params(work: Path, overrides: dict[str, str], threads: int, source: str) -> Path:
    """params.yaml with the overrides and `base.threads`; a bad key or value fails before any compute."""
    text = Path(source).read_text(encoding="utf-8")
    data = setting_params(text, {**overrides, "base.threads": str(threads)}, source, source)
    path = work / f"params_{threads}threads.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def model_row(metrics: dict) -> dict:
    """Each study family's accuracy, interval low and chance line, families beaten (`calibrate.row`)."""
    r = row("", {}, metrics, {})
    keep = ("families", "beats_chance", "relaxed_acc", "negative_acc", "retain_relaxed_acc", "critic")
    return {**{k: r[k] for k in keep}, "retain_negative_acc": metrics.get("retain_negative_acc")}


def collect(work: Path) -> dict:
    """The row of a finished run's workspace (`run`'s layout), read from its files alone."""
    setting = json.loads((work / "setting.json").read_text())
    base_log = json.loads((work / "logs" / "base.json").read_text())
    models = {}
    for path in sorted((work / "eval" / "metrics").glob("*.json")):
        models[path.stem] = model_row(json.loads(path.read_text()))
    return {
        **setting,
        "base_train_seconds": base_log.get("train_seconds"),
        "base_final_loss": base_log.get("final_loss"),
        "models": models,
    }


def collect_rev(name: str, rev: str) -> dict:
    """The row of a DVC experiment or commit (`dvc exp run`, `seeds run`): its models' evaluation metrics,
    read from the DVC cache through `dvc.api` (the base's training log is not a DVC output: None).
    """
    import dvc.api

    variants = yaml.safe_load(dvc.api.read("params.yaml", rev=rev))["sft"]["variants"]
    models = {}
    for model in ("base", *variants, "sfte", "sfte_dpo"):
        try:
            models[model] = model_row(json.loads(dvc.api.read(f"data/eval/metrics/{model}.json", rev=rev)))
        except FileNotFoundError:
            continue
    return {"name": name, "rev": rev, "base_train_seconds": None, "base_final_loss": None, "models": models}


def run(
    name: str,
    overrides: dict[str, str],
    variants: list[str],
    jobs: int,
    base_threads: int,
    work: Path,
    params: str,
):
    work.mkdir(parents=True, exist_ok=False)
    base_params = write_params(work, overrides, base_threads, params)
    sft_params = write_params(work, overrides, SFT_THREADS, params)
    setting = {
        "name": name,
        "overrides": overrides,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "threads": {"prepare_base": base_threads, "sft_evaluate": SFT_THREADS},
    }
    (work / "setting.json").write_text(json.dumps(setting, indent=1) + "\n")
    data, models = work / "prepared", work / "models"
    stage("prepare.py", "--params", str(base_params), "--out", str(data))
    t0 = time.perf_counter()
    stage(
        "base.py", "--params", str(base_params), "--data", str(data), "--out", str(models / "base"),
        "--checkpoints", str(work / "ckpt/base"), "--live", "", "--logs", str(work / "logs"),
    )  # fmt: skip
    print(f"{name}: base trained in {time.perf_counter() - t0:.0f} s", flush=True)
    common = ["--params", str(sft_params), "--data", str(data), "--models", str(models)]
    evaluate = [*common, "--items", str(work / "eval"), "--metrics", str(work / "metrics")]
    logs = ["--logs", str(work / "logs")]
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    for v in variants:  # SFT, then its evaluation; `jobs` variants at a time
        sft = [sys.executable, "stages/sft.py", "--variant", v, *common, "--checkpoints", str(work / "ckpt")]
        then = [sys.executable, "stages/evaluate.py", "--model", v, *evaluate, *logs]
        script = f"{shlex.join([*sft, '--live', '', *logs])} && {shlex.join(then)}"
        if len(running) == jobs:
            done, job = running.pop(0)
            failed += [done] if job.wait() else []
        with open(work / f"{v}.log", "w") as log:  # the child keeps its own descriptor
            job = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=stage_env(), stdout=log, stderr=log)
        running.append((v, job))
    failed += [v for v, job in running if job.wait()]
    stage("evaluate.py", "--model", "base", *evaluate, *logs)
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed: see {work}/<variant>.log")


def line(row: dict) -> str:
    trained = row["base_train_seconds"] is not None
    out = [
        f"{row['name']}: " + (f"base {row['base_train_seconds']:.0f} s" if trained else row.get("rev", ""))
    ]

    for m, r in row["models"].items():
        cells = "  ".join(family_cells(r["families"]))
        out.append(
            f"  {m:<5} {cells}  beats {r['beats_chance']}/5  rel {num(r['relaxed_acc'], 1)}  "
            f"neg {num(r['negative_acc'], 1)}  retain {num(r['retain_relaxed_acc'], 1)}"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", help="the setting's name (its folder under --work)")
    ap.add_argument("-S", "--set", dest="settings", action="append", default=[], help="KEY=VALUE (one value)")
    ap.add_argument("--variants", nargs="+", default=["sft1", "sft2"])
    ap.add_argument(
        "--jobs", type=int, default=4, help="SFT variants at a time (2 threads each); 1 on 2 cores"
    )
    ap.add_argument("--base-threads", type=int, default=4)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--work", default="/tmp/pretrain")
    ap.add_argument(
        "--collect", nargs="+", type=Path, default=[], help="only read finished workspaces into rows"
    )
    ap.add_argument(
        "--rev",
        nargs="+",
        default=[],
        metavar="NAME=REV",
        help="only read DVC experiments or commits into rows",
    )
    ap.add_argument("--json", help="append the rows to this JSON file")
    args = ap.parse_args()

    if args.collect or args.rev:
        workspaces = args.collect
    else:
        if not args.name:
            ap.error("--name is required unless --collect or --rev is given")
        grid = parse_settings(args.settings) if args.settings else [{}]
        if len(grid) != 1:
            ap.error("one value per key: start the script once per setting to run several side by side")
        work = Path(args.work) / args.name
        run(args.name, grid[0], args.variants, args.jobs, args.base_threads, work, args.params)
        workspaces = [work]
    rows = [collect(w) for w in workspaces] + [collect_rev(*nr.split("=", 1)) for nr in args.rev]
    for r in rows:
        print(line(r), flush=True)
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else {"rows": []}
        old["rows"] += rows
        path.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
