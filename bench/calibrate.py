"""Where the embedded default's budget is best spent: per-family accuracy of one SFT variant per setting.

    python bench/calibrate.py -S sft.common.max_steps=200,400,800 [-S sft.common.learning_rate=0.005,0.01]
        [--variant sft1] [--work /tmp/calibrate] [--json bench/results/calibration.json]

Every combination of the ``-S`` values (as in `python -m posttrain grid`) is one setting. For each, the stage
scripts run outside DVC into ``--work/<name>``: `prepare` and `base` only when a setting changes their
sections (otherwise the workspace's `data/prepared` and `models/base` are used, so run `dvc repro base`
first), then `sft --variant` and `evaluate` of that variant. One line per setting: SFT seconds, and per study
family the accuracy with its Wilson 95% interval against the chance line (the best constant answer on the
test split); ``beats`` counts the families whose interval lies wholly above their chance line. Also the
study split's relaxed and negative accuracy and the retention split's relaxed accuracy.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))  # bench/pipeline.py

from pipeline import cpu_model  # noqa: E402

from posttrain.core.config import ParamsError, parse_params  # noqa: E402
from posttrain.experiments.grid import experiment_names, parse_settings, set_key  # noqa: E402

STUDY_FAMILIES = ("bar_shortest", "bar_value", "line_trend", "pie_count", "pie_smallest")


def stage_env() -> dict[str, str]:
    """The environment of a stage script: this checkout's src first, then a PYTHONPATH already set (the
    wheels set aside on a GPU host)."""
    path = [str(ROOT / "src"), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def stage(script: str, *args: str) -> float:
    """Run a stage script with this interpreter; its seconds. Output is echoed; a failure stops the run."""
    t0 = time.perf_counter()
    command = [sys.executable, str(ROOT / "stages" / script), *args]
    if subprocess.run(command, cwd=ROOT, env=stage_env()).returncode:
        raise SystemExit(f"stages/{script} {' '.join(args)} failed")
    return round(time.perf_counter() - t0, 1)


def row(name: str, overrides: dict, metrics: dict, seconds: dict) -> dict:
    """One calibration line: the setting, its stage seconds and what the variant learnt, per study family."""
    families = {}
    for f in STUDY_FAMILIES:
        families[f] = {
            "acc": metrics.get(f"acc_{f}"),
            "ci_low": metrics.get(f"acc_{f}_ci_low"),
            "chance": metrics.get(f"chance_{f}"),
        }
    beats = sum(
        1
        for v in families.values()
        if v["ci_low"] is not None and v["chance"] is not None and v["ci_low"] > v["chance"]
    )
    return {
        "name": name,
        "overrides": overrides,
        "seconds": seconds,
        "families": families,
        "beats_chance": beats,
        "relaxed_acc": metrics.get("relaxed_acc"),
        "negative_acc": metrics.get("negative_acc"),
        "retain_relaxed_acc": metrics.get("retain_relaxed_acc"),
        "critic": metrics.get("critic"),
    }


def num(x, digits: int = 0) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def family_cells(families: dict) -> list[str]:
    """``<family> <accuracy> [<interval low>] /<chance line>`` per family of a `row`."""
    return [f"{f} {num(v['acc'])} [{num(v['ci_low'])}] /{num(v['chance'])}" for f, v in families.items()]


def setting_params(text: str, overrides: dict[str, str], source: str, name: str) -> dict:
    """params.yaml's `text` with a setting's overrides; a bad key or value fails here, before any compute."""
    data = yaml.safe_load(text)
    problems = [set_key(data, k, yaml.safe_load(v), source) for k, v in overrides.items()]
    if any(problems):
        raise ParamsError([p for p in problems if p], source)
    parse_params(data, name)
    return data


def line(r: dict) -> str:
    cells = [f"{r['name']:<40}", f"sft {r['seconds'].get('sft', 0):>5.0f}s", *family_cells(r["families"])]
    cells += [
        f"beats {r['beats_chance']}/5",
        f"rel {r['relaxed_acc']:.1f}",
        f"neg {r['negative_acc']:.1f}",
        f"retain {r['retain_relaxed_acc']:.1f}",
    ]
    return "  ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", dest="settings", action="append", default=[], help="KEY=V1[,V2...]")
    ap.add_argument("--variant", default="sft1")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--work", default="/tmp/calibrate")
    ap.add_argument("--json", default=None, help="append the lines to this JSON file")
    args = ap.parse_args()

    grid = parse_settings(args.settings) if args.settings else [{}]
    names = experiment_names(args.variant, grid) if args.settings else [args.variant]
    base_text = Path(args.params).read_text(encoding="utf-8")
    rows = []
    for name, overrides in zip(names, grid):
        data = setting_params(base_text, overrides, args.params, name)
        work = Path(args.work) / name
        shutil.rmtree(work, ignore_errors=True)
        (work / "models").mkdir(parents=True)
        params = work / "params.yaml"
        params.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        seconds = {}
        own_prepare = any(k.startswith("prepare.") for k in overrides)
        own_base = own_prepare or any(k.startswith("base.") for k in overrides)
        data_dir = work / "prepared" if own_prepare else ROOT / "data" / "prepared"
        if own_prepare:
            seconds["prepare"] = stage("prepare.py", "--params", str(params), "--out", str(data_dir))
        if own_base:
            seconds["base"] = stage(
                "base.py", "--params", str(params), "--data", str(data_dir),
                "--out", str(work / "models/base"), "--checkpoints", str(work / "ckpt/base"), "--live", "",
                "--logs", str(work / "logs"),
            )  # fmt: skip
        else:
            (work / "models" / "base").symlink_to(ROOT / "models" / "base")
        common = ["--params", str(params), "--data", str(data_dir), "--models", str(work / "models")]
        seconds["sft"] = stage(
            "sft.py", "--variant", args.variant, *common, "--checkpoints", str(work / "ckpt"), "--live", "",
            "--logs", str(work / "logs"),
        )  # fmt: skip
        seconds["evaluate"] = stage(
            "evaluate.py", "--model", args.variant, *common, "--items", str(work / "eval"),
            "--metrics", str(work / "metrics"), "--logs", str(work / "logs"),
        )  # fmt: skip
        metrics = json.loads((work / "eval" / "metrics" / f"{args.variant}.json").read_text())
        rows.append(row(name, overrides, metrics, seconds))
        print("CALIBRATION " + line(rows[-1]), flush=True)
        if args.json:  # after every line: a long calibration killed midway keeps what it measured
            path = Path(args.json)
            old = json.loads(path.read_text()) if path.exists() else {"rows": []}
            old["machine"] = f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"
            old["rows"].append(rows[-1])
            path.write_text(json.dumps(old, indent=1) + "\n")
    print()
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
